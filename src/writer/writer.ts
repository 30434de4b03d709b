/**
 * The credential writer: for controllers that cannot take the client-mode sidecar, it keeps Argo CD cluster
 * Secrets and Flux kubeconfig Secrets filled with this workload's current X.509-SVID and the spoke's bundle.
 *
 * When: at start (a restart finds the Secrets as it left them and rewrites only what is stale), at every Workload
 * API update (the SVID rotates at half-life, so a Secret always holds a certificate with half its life left; a
 * bundle change rewrites the CA), every `resync` (someone edited a key it owns), and after a failure (backoff).
 * What: only the keys it owns (see content.ts), with a resourceVersion check, so a concurrent edit is never lost.
 */
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { type AdminServer, createAdminServer, type ReadinessCheck } from '../admin/server.ts';
import { WriterMetrics } from '../observability/writer-metrics.ts';
import { loadUpstreamCredential } from '../proxy/credential.ts';
import { WorkloadIdentitySource } from '../proxy/source.ts';
import { isKspError } from '../spiffe/errors.ts';
import type { ManagedSecret, WriterConfig } from './config.ts';
import { ANNOTATIONS, type Credential, ownedValue, type SecretObject, writtenLeaf } from './content.ts';
import { WriterError, WriterErrorCode } from './errors.ts';
import { KubeStatusError, SecretsApi } from './kube.ts';

export interface RunningWriter {
  readonly admin: AdminServer;
  readonly metrics: WriterMetrics;
  /** Each managed Secret: syncs finished, the last success and error, the expiry of what it holds. */
  status(): readonly {
    readonly secret: string;
    readonly rounds: number;
    readonly lastSuccess?: Date;
    readonly lastError?: string;
    readonly expires?: Date;
  }[];
  close(): Promise<void>;
}

export interface StartWriterOptions {
  readonly logger: Logger;
  readonly defaultMetrics?: boolean;
  /** First retry after a failure (default 1 s), doubling up to 60 s. */
  readonly initialBackoffMs?: number;
}

interface SecretState {
  readonly secret: ManagedSecret;
  readonly id: string;
  running: boolean;
  pending: string | undefined;
  timer: NodeJS.Timeout | undefined;
  backoffMs: number;
  lastSuccess?: Date;
  /** What the Secret holds as last confirmed: the SVID leaf's fingerprint and the CA certificates' digest. */
  holds?: string;
  expires?: Date;
  lastError?: string;
  /** Syncs finished (success or failure). */
  rounds: number;
}

const MAX_BACKOFF_MS = 60_000;
const CONFLICT_RETRIES = 3;

export async function startWriter(config: WriterConfig, options: StartWriterOptions): Promise<RunningWriter> {
  const log = options.logger;
  const metrics = new WriterMetrics({ defaultMetrics: options.defaultMetrics ?? true });
  let credential: Awaited<ReturnType<typeof loadUpstreamCredential>>;
  try {
    credential = await loadUpstreamCredential(config.kubernetes, { logger: log, key: 'kubernetes' });
  } catch (err) {
    throw new WriterError(WriterErrorCode.Config, (err as Error).message, { cause: err });
  }
  const api = new SecretsApi(credential);
  let source: WorkloadIdentitySource;
  try {
    source = await WorkloadIdentitySource.create({
      ...(config.workloadApi.socket ? { address: config.workloadApi.socket } : {}),
      ...(config.workloadApi.hint ? { hint: config.workloadApi.hint } : {}),
      logger: log,
      who: 'the writer',
    });
  } catch (err) {
    api.close();
    throw new WriterError(WriterErrorCode.NoSvid, `workloadApi: ${(err as Error).message}`, { cause: err });
  }
  const initialBackoff = options.initialBackoffMs ?? 1000;
  const states: SecretState[] = config.secrets.map((secret) => ({
    secret,
    id: `${secret.namespace}/${secret.name}`,
    running: false,
    pending: undefined,
    timer: undefined,
    backoffMs: initialBackoff,
    rounds: 0,
  }));
  let closed = false;

  const credentialFor = (secret: ManagedSecret): Credential & { version: string } => {
    let svid: ReturnType<WorkloadIdentitySource['svid']>;
    try {
      svid = source.svid();
    } catch (err) {
      throw new WriterError(WriterErrorCode.NoSvid, (err as Error).message, { cause: err });
    }
    const leaf = svid.certificates[0];
    if (leaf === undefined)
      throw new WriterError(WriterErrorCode.NoSvid, 'the X.509-SVID has no certificate');
    const bundle = source.bundles().getX509Bundle(secret.trustDomain);
    if (bundle === undefined || bundle.authorities.length === 0) {
      throw new WriterError(
        WriterErrorCode.Secret,
        `Secret ${secret.namespace}/${secret.name}: the Workload API gives no bundle of trust domain ` +
          `${secret.trustDomain.name}; federate this workload's entry with it (federatesWith)`,
      );
    }
    const caPem = bundle.authorities.map((c) => c.toString()).join('');
    return {
      chainPem: svid.certificates.map((c) => c.toString()).join(''),
      keyPem: svid.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
      caPem,
      spiffeId: svid.id.toString(),
      expires: leaf.validToDate,
      version: `${leaf.fingerprint256} ${createHash('sha256').update(caPem).digest('hex')}`,
    };
  };

  /** One read-compare-write of a Secret. Returns what happened. */
  const syncOnce = async (state: SecretState): Promise<'written' | 'unchanged'> => {
    const { secret } = state;
    for (let attempt = 1; ; attempt++) {
      const wanted = credentialFor(secret);
      let object: SecretObject;
      try {
        object = await api.get(secret.namespace, secret.name);
      } catch (err) {
        if (err instanceof KubeStatusError && err.status === 404) {
          throw new WriterError(
            WriterErrorCode.Secret,
            `Secret ${state.id} does not exist: the writer fills Secrets, it never creates them (create it with ` +
              'its labels and the keys you own; docs/operator/gitops.md)',
          );
        }
        throw err;
      }
      // What readers of the Secret present until the write below lands: the expiry gauge reports it meanwhile.
      const held = writtenLeaf(secret, object);
      state.expires = held?.validToDate;
      const { key, value } = ownedValue(secret, object, wanted);
      const annotations = object.metadata.annotations ?? {};
      if (object.data?.[key] === value && annotations[ANNOTATIONS.expires] === wanted.expires.toISOString()) {
        state.holds = wanted.version;
        state.expires = wanted.expires;
        return 'unchanged';
      }
      const { managedFields: _managed, ...metadata } = object.metadata;
      const next: SecretObject = {
        ...object,
        metadata: {
          ...metadata,
          annotations: {
            ...annotations,
            [ANNOTATIONS.spiffeId]: wanted.spiffeId,
            [ANNOTATIONS.expires]: wanted.expires.toISOString(),
            [ANNOTATIONS.written]: new Date().toISOString(),
          },
        },
        data: { ...object.data, [key]: value },
      };
      try {
        await api.put(secret.namespace, secret.name, next);
      } catch (err) {
        // Someone wrote the Secret between our read and write: read it again, keep their change, redo ours.
        if (err instanceof KubeStatusError && err.status === 409 && attempt < CONFLICT_RETRIES) continue;
        throw err;
      }
      state.holds = wanted.version;
      state.expires = wanted.expires;
      return 'written';
    }
  };

  const sync = (state: SecretState, reason: string): void => {
    if (closed) return;
    if (state.running) {
      state.pending = reason;
      return;
    }
    if (state.timer) clearTimeout(state.timer);
    state.timer = undefined;
    state.running = true;
    syncOnce(state)
      .then(
        (result) => {
          state.backoffMs = initialBackoff;
          state.lastSuccess = new Date();
          state.lastError = undefined;
          metrics.sync(state.id, result);
          const fields = {
            secret: state.id,
            kind: state.secret.kind,
            reason,
            expires: state.expires?.toISOString(),
          };
          if (result === 'written') log.info(fields, 'Secret written with the current SVID and bundle');
          else log.debug(fields, 'Secret already holds the current SVID and bundle');
        },
        (err: Error) => {
          const code = isKspError(err) ? err.code : WriterErrorCode.Kubernetes;
          state.lastError = `${code}: ${err.message}`;
          metrics.sync(state.id, 'error', code);
          const delay = state.backoffMs;
          state.backoffMs = Math.min(MAX_BACKOFF_MS, state.backoffMs * 2);
          log.error(
            { secret: state.id, code, reason, retryInSeconds: delay / 1000, err: { message: err.message } },
            'Secret not written; retrying',
          );
          if (!closed) state.timer = setTimeout(() => sync(state, 'retry'), delay);
        },
      )
      .finally(() => {
        state.running = false;
        state.rounds++;
        if (state.pending !== undefined) {
          const again = state.pending;
          state.pending = undefined;
          sync(state, again);
        }
      });
  };

  // A new SVID or bundle; also a withdrawal, after which each sync fails with ERR_WRITER_NO_SVID and the Secrets
  // keep what they hold.
  source.on('update', () => {
    for (const state of states) sync(state, 'workload API update');
  });
  const resync = setInterval(() => {
    for (const state of states) sync(state, 'resync');
  }, config.resyncMs);
  resync.unref();

  metrics.read(() => {
    let svidExpiry: Date | undefined;
    try {
      svidExpiry = source.svid().certificates[0]?.validToDate;
    } catch {
      svidExpiry = undefined;
    }
    return {
      ...(svidExpiry ? { svidExpiry } : {}),
      secrets: states.map((s) => ({
        secret: s.id,
        ...(s.expires ? { expires: s.expires } : {}),
        ...(s.lastSuccess ? { lastSuccess: s.lastSuccess } : {}),
      })),
    };
  });

  let admin: AdminServer;
  try {
    admin = await createAdminServer({
      metrics,
      logger: log,
      host: config.admin.host,
      port: config.admin.port,
      readiness: () => {
        const checks: ReadinessCheck[] = [{ name: 'svid', ...source.health() }];
        for (const s of states) {
          // Current means this SVID and the bundle as it is now: a new bundle not written yet is not ready.
          let wanted: string | undefined;
          try {
            wanted = credentialFor(s.secret).version;
          } catch {
            wanted = undefined;
          }
          const current = wanted !== undefined && s.holds === wanted;
          checks.push({
            name: `secret ${s.id}`,
            ok: current,
            detail: current
              ? `holds the current SVID and bundle, expires ${s.expires?.toISOString()}`
              : (s.lastError ?? 'not written yet'),
          });
        }
        return { ready: checks.every((c) => c.ok), checks };
      },
    });
  } catch (err) {
    clearInterval(resync);
    source.close();
    api.close();
    throw err;
  }
  log.info(
    { secrets: states.map((s) => `${s.secret.kind}:${s.id}`), resyncSeconds: config.resyncMs / 1000 },
    'credential writer started',
  );
  for (const state of states) sync(state, 'start');

  return {
    admin,
    metrics,
    status: () =>
      states.map((s) => ({
        secret: s.id,
        rounds: s.rounds,
        ...(s.lastSuccess ? { lastSuccess: s.lastSuccess } : {}),
        ...(s.lastError ? { lastError: s.lastError } : {}),
        ...(s.expires ? { expires: s.expires } : {}),
      })),
    close: async () => {
      closed = true;
      clearInterval(resync);
      for (const state of states) if (state.timer) clearTimeout(state.timer);
      source.close();
      api.close();
      await admin.close();
    },
  };
}
