import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { AggregatorRegistry } from 'prom-client';
import {
  type AdminServer,
  createAdminServer,
  type MetricsSource,
  type ReadinessCheck,
  type ReadinessReport,
} from '../admin/server.ts';
import { ProxyMetrics } from '../observability/metrics.ts';
import { type PolicyWatcher, watchPolicy } from '../policy/watch.ts';
import { type AuditEvent, type AuditSink, fileAuditSink } from './audit.ts';
import { WorkerPool } from './cluster.ts';
import { loadProxyConfig, type ProxyConfig } from './config.ts';
import { loadUpstreamCredential, type UpstreamCredential } from './credential.ts';
import { ProxyError, ProxyErrorCode } from './errors.ts';
import { Upstream } from './forward.ts';
import { ProxyServer } from './server.ts';
import { type IdentitySource, StaticIdentitySource, WorkloadIdentitySource } from './source.ts';
import { ServingTrust } from './trust.ts';
import type { IdentityMessage, PolicyMessage, UpstreamMessage, WorkerUsage } from './worker-protocol.ts';

export interface RunningProxy extends RunningService {
  /** The in-process front door (`startProxy` only). */
  readonly server: ProxyServer;
}

/** The proxy as `serve` runs it, one process or several. */
export interface RunningService {
  readonly admin: AdminServer;
  readonly metrics: ProxyMetrics;
  /** The data port actually bound (useful with port 0). */
  readonly port: number;
  /**
   * SIGHUP: re-read every file the proxy reads (the configuration, the policy, identity files, the upstream
   * credential files). A broken file is logged and the last good value kept; configuration changes that need a
   * restart are named in the log. Never throws.
   */
  reload(): Promise<void>;
  /**
   * SIGTERM: /readyz turns unready, the proxy stops accepting, sends GOAWAY, lets in-flight requests finish up to
   * `timeouts.shutdownDrain`, closes what is left, then closes everything else. Logs each step.
   */
  shutdown(): Promise<void>;
  /** Stops at once (tests): open connections are cut. */
  close(): Promise<void>;
}

export interface StartProxyOptions {
  readonly logger: Logger;
  /** Where audit Events go (default: `audit.file` of the configuration). */
  readonly audit?: AuditSink;
  /** Re-read poll for watched files (default 5 s). */
  readonly watchPollMs?: number;
  /** How often the upstream is probed for readiness (default 10 s). */
  readonly probeIntervalMs?: number;
  readonly defaultMetrics?: boolean;
  /** The file `config` came from: re-read on reload() to report changes. */
  readonly configFile?: string;
}

/**
 * Starts the whole proxy from its configuration: identity (Workload API or files), policy (watched), upstream
 * credential (token file re-read when it rotates), the TLS front door, and the admin listener. Anything invalid
 * at start is refused; later, broken edits keep the last good value and are reported.
 */
export async function startProxy(config: ProxyConfig, options: StartProxyOptions): Promise<RunningProxy> {
  const running = await start(config, options, 1);
  if (running.server === undefined) throw new Error('startProxy: no in-process server');
  return running as RunningProxy;
}

/**
 * Starts the proxy with `workers` processes serving the data port (node:cluster): this process keeps the
 * identity source, the policy, the upstream credential, the audit log and the admin port, and hands every change
 * to all workers at once; `/metrics` adds up the workers' metrics. With `workers: 1` it is `startProxy`.
 */
export async function startProxyWorkers(
  config: ProxyConfig,
  options: StartProxyOptions,
): Promise<RunningService> {
  return start(config, options, config.workers);
}

/** The front door: the in-process ProxyServer, or the workers serving it. */
interface FrontDoor {
  readonly port: number;
  readonly server?: ProxyServer;
  usage(): Promise<{ connections: number; upstream: ReturnType<Upstream['usage']> }>;
  policyChanged(): void;
  credentialChanged(credential: UpstreamCredential): void;
  /** Extra readiness checks (the workers). */
  checks(): ReadinessCheck[];
  drain(deadlineMs: number): Promise<void>;
  close(): Promise<void>;
}

async function start(
  config: ProxyConfig,
  options: StartProxyOptions,
  workers: number,
): Promise<RunningService & { server?: ProxyServer }> {
  const log = options.logger;
  const pollIntervalMs = options.watchPollMs ?? 5000;
  const metrics = new ProxyMetrics({ defaultMetrics: options.defaultMetrics ?? true });
  const closers: (() => unknown)[] = [];
  try {
    let audit = options.audit;
    /** Told when the file sink's full() changes; a sink given by the caller is polled instead. */
    const auditFullListeners = new Set<(full: boolean) => void>();
    if (audit === undefined) {
      let lastAuditError = 0;
      try {
        audit = fileAuditSink(config.audit.file, {
          bufferBytes: config.audit.bufferBytes,
          overflow: config.audit.overflow,
          onFullChange: (full) => {
            for (const listener of auditFullListeners) listener(full);
          },
          onError: (err) => {
            // At most one line a minute: a broken destination fails every write.
            if (Date.now() - lastAuditError < 60_000) return;
            lastAuditError = Date.now();
            log.error(
              { file: config.audit.file, overflow: config.audit.overflow, err: { message: err.message } },
              config.audit.overflow === 'refuse'
                ? 'audit destination failed: requests are refused (503) until a write succeeds'
                : 'audit destination failed: audit Events are dropped (audit.overflow: drop) until a write succeeds',
            );
          },
        });
      } catch (err) {
        throw new ProxyError(ProxyErrorCode.Config, `audit.file: ${(err as Error).message}`, {
          cause: err,
        });
      }
      const sink = audit;
      closers.push(() => sink.close());
    }
    let source: IdentitySource;
    try {
      source =
        config.identity.kind === 'files'
          ? await StaticIdentitySource.create(config.identity, log, pollIntervalMs)
          : await WorkloadIdentitySource.create({
              logger: log,
              ...(config.identity.socket ? { address: config.identity.socket } : {}),
              ...(config.identity.hint ? { hint: config.identity.hint } : {}),
            });
    } catch (err) {
      const where = config.identity.kind === 'files' ? 'identity.files' : 'identity.workloadApi';
      throw new ProxyError(ProxyErrorCode.Config, `${where}: ${(err as Error).message}`, { cause: err });
    }
    closers.push(() => source.close());
    const own = source.svid().id;
    if (!own.trustDomain.equals(config.trustDomain)) {
      throw new Error(
        `the proxy's SVID ${own} is not in the configured trust domain ${config.trustDomain.name}`,
      );
    }

    let front: FrontDoor | undefined;
    const policy = await watchPolicy(config.policyFile, {
      pollIntervalMs,
      onChange: (next) => {
        metrics.policyLoaded(policy.generation);
        front?.policyChanged();
        log.info(
          { file: config.policyFile, generation: policy.generation, trustDomains: next.trustDomains },
          'policy reloaded; open connections use it from their next request',
        );
      },
      onRecover: () => {
        metrics.policyLoaded(policy.generation);
        log.info(
          { file: config.policyFile, generation: policy.generation },
          'policy file valid again with the policy in force; nothing changed',
        );
      },
      onError: (err) => {
        metrics.policyReloadFailed();
        log.error(
          { file: config.policyFile, err: { message: err.message } },
          'policy file rejected; keeping the last good policy',
        );
      },
    });
    closers.push(() => policy.close());
    metrics.policyLoaded(policy.generation);

    let credential = await loadUpstreamCredential(config.upstream, { logger: log, pollIntervalMs });
    closers.push(() => credential.close());
    const upstreamTls = (c: UpstreamCredential) => ({
      url: c.url,
      ...(c.ca === undefined ? {} : { ca: c.ca }),
      ...(c.clientCert === undefined ? {} : { clientCert: c.clientCert }),
      ...(c.clientKey === undefined ? {} : { clientKey: c.clientKey }),
      authorization: () => c.authorization(),
    });
    const upstream = new Upstream({
      ...upstreamTls(credential),
      responseHeadersTimeoutMs: config.timeouts.responseHeadersMs,
      longRunningHeadersTimeoutMs: config.timeouts.longRunningResponseHeadersMs,
      maxSessions: config.limits.maxUpstreamSessions,
      maxLongRunningSessions: config.limits.maxLongRunningUpstreamSessions,
    });
    closers.push(() => upstream.close());

    if (workers <= 1) {
      front = await localFrontDoor(config, { source, policy, upstream, log, audit, metrics });
    } else {
      const sink = audit;
      const pool = await workerFrontDoor(config, {
        count: workers,
        source,
        policy,
        credential: () => credential,
        log,
        audit: sink,
        auditFullListeners: options.audit === undefined ? auditFullListeners : undefined,
      });
      front = pool;
    }
    const door = front;
    closers.push(() => door.close());

    metrics.setAuditStats(() => audit.stats?.());
    metrics.setSvidExpiry(() => currentSvid(source)?.certificates[0]?.validToDate);
    metrics.setBundleAges(() => source.bundleChangedAt());

    let upstreamOk = false;
    let lastProbe = 'not probed yet';
    const probe = async (): Promise<void> => {
      upstreamOk = await upstream.probe();
      lastProbe = new Date().toISOString();
    };
    await probe();
    const probeTimer = setInterval(() => void probe(), options.probeIntervalMs ?? 10_000);
    probeTimer.unref();
    closers.push(() => clearInterval(probeTimer));

    // A minSvidRemaining at or above the SVID's whole lifetime would keep the proxy unready for ever.
    let warnedLifetime: number | undefined;
    const checkLifetime = (): void => {
      const leaf = currentSvid(source)?.certificates[0];
      if (leaf === undefined) return;
      const lifetime = (leaf.validToDate.getTime() - leaf.validFromDate.getTime()) / 1000;
      if (config.minSvidRemainingSeconds >= lifetime && warnedLifetime !== lifetime) {
        // Once per SVID lifetime seen, not at every rotation.
        warnedLifetime = lifetime;
        log.warn(
          { minSvidRemaining: config.minSvidRemainingSeconds, svidLifetime: lifetime },
          'readiness.minSvidRemaining is not shorter than the SVID lifetime: the proxy will never be ready; ' +
            'lower it (a third of the lifetime is a sane value)',
        );
      }
    };
    checkLifetime();
    source.on('update', checkLifetime);

    let shuttingDown = false;
    const readiness = async (): Promise<ReadinessReport> => {
      const svid = currentSvid(source);
      const leaf = svid?.certificates[0];
      const remaining = leaf ? (leaf.validToDate.getTime() - Date.now()) / 1000 : -1;
      const health = source.health();
      const usageNow = await door.usage();
      const usage = usageNow.upstream.ordinary;
      const full = usage.sessions >= usage.max && usage.streams >= usage.capacity;
      const checks = [
        {
          name: 'svid',
          ok: svid !== undefined && remaining > config.minSvidRemainingSeconds,
          detail:
            svid === undefined
              ? 'no SVID to serve with'
              : `${svid.id} expires in ${Math.round(remaining)}s (needs more than ${config.minSvidRemainingSeconds}s)`,
        },
        { name: 'identitySource', ok: health.ok, detail: health.detail },
        { name: 'policy', ok: true, detail: `generation ${policy.generation} from ${config.policyFile}` },
        {
          name: 'upstream',
          ok: upstreamOk,
          detail: `${upstream.url.origin} ${upstreamOk ? 'answered' : 'did not answer'} (probed ${lastProbe})`,
        },
        {
          name: 'capacity',
          ok: !full && usageNow.connections < config.limits.maxConnections,
          detail:
            `${usageNow.connections}/${config.limits.maxConnections} connections (limits.maxConnections); ` +
            `${usage.streams} streams on ${usage.sessions}/${usage.max} upstream sessions (limits.maxUpstreamSessions)`,
        },
        ...door.checks(),
        {
          name: 'shutdown',
          ok: !shuttingDown,
          detail: shuttingDown ? 'draining for shutdown' : 'serving',
        },
      ];
      return { ready: checks.every((c) => c.ok), checks };
    };
    const admin = await createAdminServer({
      metrics: door.server === undefined ? clusterMetrics(metrics, door as WorkerFrontDoor) : metrics,
      readiness,
      logger: log,
      host: config.admin.host,
      port: config.admin.port,
    });
    closers.push(() => admin.close());
    log.info(
      {
        spiffeId: own.toString(),
        listen: `${config.listen.host}:${door.port}`,
        workers: Math.max(1, workers),
        admin: admin.address,
        upstream: upstream.url.origin,
        limits: config.limits,
        timeouts: config.timeouts,
      },
      'proxy started',
    );

    const reload = async (): Promise<void> => {
      if (options.configFile !== undefined) {
        try {
          const next = await loadProxyConfig(options.configFile);
          const changed = restartKeys(config, next);
          if (changed.length > 0) {
            log.warn(
              { file: options.configFile, keys: changed },
              'configuration changed in keys that take effect only after a restart; running with the old values',
            );
          } else {
            log.info({ file: options.configFile }, 'configuration re-read: no change that needs a restart');
          }
        } catch (err) {
          log.error(
            { file: options.configFile, err: { message: (err as Error).message } },
            'configuration file rejected on reload; running with the configuration it started with',
          );
        }
      }
      await policy.reload();
      await source.reload();
      try {
        const next = await loadUpstreamCredential(config.upstream, { logger: log, pollIntervalMs });
        try {
          upstream.replaceCredential(upstreamTls(next));
          door.credentialChanged(next);
        } catch (err) {
          next.close();
          throw err;
        }
        const previous = credential;
        credential = next;
        previous.close();
        log.info({ upstream: upstream.url.origin }, 'upstream credential re-read; new requests use it');
      } catch (err) {
        log.error(
          { err: { message: (err as Error).message } },
          'upstream credential rejected on reload; keeping the last good one',
        );
      }
    };

    return {
      ...(door.server === undefined ? {} : { server: door.server }),
      admin,
      metrics,
      port: door.port,
      reload,
      shutdown: async () => {
        shuttingDown = true;
        log.info('shutting down: /readyz now answers 503');
        await door.drain(config.timeouts.shutdownDrainMs);
        for (const close of closers.reverse()) await close();
      },
      close: async () => {
        for (const close of closers.reverse()) await close();
      },
    };
  } catch (err) {
    for (const close of closers.reverse()) await close();
    throw err;
  }
}

/** The SVID the source serves, or undefined when it has none to give (withdrawn by the Workload API). */
function currentSvid(source: IdentitySource): ReturnType<IdentitySource['svid']> | undefined {
  try {
    return source.svid();
  } catch {
    return undefined;
  }
}

/** Configuration keys (as written in proxy.yaml) that differ between two loads and that only a restart applies. */
function restartKeys(a: ProxyConfig, b: ProxyConfig): string[] {
  const keys: [keyof ProxyConfig, string][] = [
    ['trustDomain', 'trustDomain'],
    ['listen', 'listen'],
    ['admin', 'admin.listen'],
    ['policyFile', 'policyFile'],
    ['identity', 'identity'],
    ['upstream', 'upstream'],
    ['minSvidRemainingSeconds', 'readiness.minSvidRemaining'],
    ['logLevel', 'logLevel'],
    ['workers', 'workers'],
    ['limits', 'limits'],
    ['timeouts', 'timeouts'],
  ];
  const text = (v: unknown): string =>
    JSON.stringify(v, (_k, value) =>
      value instanceof Map ? [...value] : value instanceof URL ? value.href : value,
    ) ?? '';
  return keys.filter(([k]) => text(a[k]) !== text(b[k])).map(([, name]) => name);
}

interface FrontDoorState {
  readonly source: IdentitySource;
  readonly policy: PolicyWatcher;
  readonly log: Logger;
  readonly audit: AuditSink;
}

/** `workers: 1`: the ProxyServer in this process. */
async function localFrontDoor(
  config: ProxyConfig,
  state: FrontDoorState & { readonly upstream: Upstream; readonly metrics: ProxyMetrics },
): Promise<FrontDoor> {
  const { upstream, metrics } = state;
  const server = new ProxyServer({
    trustDomain: config.trustDomain,
    source: state.source,
    policy: state.policy,
    upstream,
    logger: state.log,
    audit: state.audit,
    metrics,
    limits: config.limits,
    timeouts: config.timeouts,
  });
  const address = await server.listen(config.listen.port, config.listen.host);
  metrics.setUsage(() => ({ inFlight: server.usage().inFlight, upstream: upstream.usage() }));
  return {
    port: address.port,
    server,
    usage: async () => ({ connections: server.usage().connections, upstream: upstream.usage() }),
    policyChanged: () => server.policyChanged(),
    credentialChanged: () => {},
    checks: () => [],
    drain: (ms) => server.drain(ms),
    close: () => server.close(),
  };
}

interface WorkerFrontDoor extends FrontDoor {
  readonly pool: WorkerPool;
}

/** How often the main process looks for a rotated upstream token, and at the state of an audit sink it was given. */
const TOKEN_CHECK_MS = 1000;
const AUDIT_STATE_CHECK_MS = 50;

/**
 * `workers` > 1: the workers serve the data port; this process hands them the SVID and bundles, the policy, the
 * upstream credential and the session ticket keys, and writes the audit lines they send.
 */
async function workerFrontDoor(
  config: ProxyConfig,
  state: FrontDoorState & {
    readonly count: number;
    readonly credential: () => UpstreamCredential;
    /** Where to hear of the audit sink's full() changing; undefined: poll it. */
    readonly auditFullListeners: Set<(full: boolean) => void> | undefined;
  },
): Promise<WorkerFrontDoor> {
  const { source, policy, log, audit } = state;
  const identity = (): IdentityMessage => identityMessage(source);
  const policyMessage = (): PolicyMessage => ({
    type: 'policy',
    file: config.policyFile,
    text: policy.text,
    generation: policy.generation,
  });
  const upstreamMessage = (c: UpstreamCredential = state.credential()): UpstreamMessage => {
    const authorization = c.authorization();
    return {
      type: 'upstream',
      url: c.url.href,
      ...(c.ca === undefined ? {} : { ca: c.ca }),
      ...(c.clientCert === undefined ? {} : { clientCert: c.clientCert }),
      ...(c.clientKey === undefined ? {} : { clientKey: c.clientKey }),
      ...(authorization === undefined ? {} : { authorization }),
      responseHeadersMs: config.timeouts.responseHeadersMs,
      longRunningHeadersMs: config.timeouts.longRunningResponseHeadersMs,
      maxSessions: config.limits.maxUpstreamSessions,
      maxLongRunningSessions: config.limits.maxLongRunningUpstreamSessions,
    };
  };
  let ticketKeys: Buffer = randomBytes(48);
  // limits.maxConnections bounds the whole proxy: each worker holds its share.
  const limits = { ...config.limits, maxConnections: Math.ceil(config.limits.maxConnections / state.count) };
  const pool = new WorkerPool({
    count: state.count,
    logger: log,
    init: (index) => ({
      type: 'init',
      index,
      trustDomain: config.trustDomain.name,
      listen: { host: config.listen.host, port: pool.port || config.listen.port },
      logLevel: log.level,
      limits,
      timeouts: { ...config.timeouts },
      identity: identity(),
      policy: policyMessage(),
      upstream: upstreamMessage(),
      ticketKeys: ticketKeys.toString('base64'),
    }),
    onAudit: (lines, events) => {
      if (audit.writeLines !== undefined) audit.writeLines(lines, events);
      else for (const line of lines.split('\n')) if (line !== '') audit.write(JSON.parse(line) as AuditEvent);
    },
  });
  // The trust the workers compute, computed here too, for one thing: when an authority goes, every worker gets
  // the same new ticket keys (each has voided the old ones itself already), so sessions keep resuming anywhere.
  const serving = new ServingTrust({ trustDomain: config.trustDomain, source, policy, logger: log });
  serving.attach({
    setSecureContext: () => {},
    setTicketKeys: (keys) => {
      ticketKeys = keys;
      pool.broadcast({ type: 'ticketKeys', keys: keys.toString('base64') });
    },
  });
  const onIdentity = (): void => {
    pool.broadcast(identity());
    serving.refresh();
  };
  source.on('update', onIdentity);
  let lastAuthorization = state.credential().authorization();
  const tokenTimer = setInterval(() => {
    const now = state.credential().authorization();
    if (now === lastAuthorization) return;
    lastAuthorization = now;
    pool.broadcast(upstreamMessage());
  }, TOKEN_CHECK_MS);
  tokenTimer.unref();
  let auditFull = false;
  const onAuditFull = (full: boolean): void => {
    if (full === auditFull) return;
    auditFull = full;
    pool.broadcast({ type: 'auditFull', full });
  };
  state.auditFullListeners?.add(onAuditFull);
  const auditTimer =
    state.auditFullListeners === undefined
      ? setInterval(() => onAuditFull(audit.full?.() === true), AUDIT_STATE_CHECK_MS).unref()
      : undefined;
  const stop = (): void => {
    clearInterval(tokenTimer);
    clearInterval(auditTimer);
    state.auditFullListeners?.delete(onAuditFull);
    source.off('update', onIdentity);
  };
  /** Each worker's open connections at the last readiness check (how evenly the kernel spreads them). */
  let lastConnections: number[] = [];
  try {
    await pool.start();
  } catch (err) {
    stop();
    await pool.close();
    throw err;
  }
  return {
    pool,
    port: pool.port,
    usage: async () => {
      const all = await pool.usage();
      lastConnections = all.map((u) => u.connections);
      const sum = (pick: (u: WorkerUsage) => ReturnType<Upstream['usage']>['ordinary']) => {
        const out = { sessions: 0, streams: 0, capacity: 0, max: 0 };
        for (const u of all) {
          const p = pick(u);
          out.sessions += p.sessions;
          out.streams += p.streams;
          out.capacity += p.capacity;
          out.max += p.max;
        }
        return out;
      };
      return {
        connections: all.reduce((n, u) => n + u.connections, 0),
        upstream: {
          ordinary: sum((u) => u.upstream.ordinary),
          longRunning: sum((u) => u.upstream.longRunning),
        },
      };
    },
    policyChanged: () => {
      pool.broadcast(policyMessage());
      serving.refresh();
    },
    credentialChanged: (next) => {
      lastAuthorization = next.authorization();
      pool.broadcast(upstreamMessage(next));
    },
    checks: () => [
      {
        name: 'workers',
        ok: pool.listening === pool.count,
        detail:
          `${pool.listening}/${pool.count} workers listening on the data port` +
          (lastConnections.length > 0 ? ` (connections per worker: ${lastConnections.join(', ')})` : ''),
      },
    ],
    drain: async (ms) => {
      stop();
      await pool.drain(ms);
    },
    close: async () => {
      stop();
      await pool.close();
    },
  };
}

/** The SVID and bundles as the workers receive them. */
function identityMessage(source: IdentitySource): IdentityMessage {
  let svid: IdentityMessage['svid'];
  let withdrawn: string | undefined;
  try {
    const s = source.svid();
    svid = {
      chain: s.certificates.map((c) => c.toString()).join(''),
      key: s.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
      ...(s.hint === undefined ? {} : { hint: s.hint }),
    };
  } catch (err) {
    withdrawn = (err as Error).message;
  }
  return {
    type: 'identity',
    ...(svid === undefined ? {} : { svid }),
    ...(withdrawn === undefined ? {} : { withdrawn }),
    bundles: source
      .bundles()
      .bundles()
      .map((b) => [b.trustDomain.name, b.marshal()] as const),
    changedAt: [...source.bundleChangedAt()].map(([td, at]) => [td, at.toISOString()] as const),
    health: source.health(),
  };
}

/** Metrics the main process keeps (the workers' copies of them read nothing). */
const MAIN_PROCESS_METRICS = new Set([
  'ksp_policy_generation',
  'ksp_policy_reload_errors_total',
  'ksp_policy_last_reload_success',
  'ksp_svid_expiry_seconds',
  'ksp_bundle_age_seconds',
  'ksp_audit_buffered_bytes',
  'ksp_audit_events_dropped_total',
  'ksp_audit_write_errors_total',
]);
/** Metrics of the data port, which only the workers count. */
const WORKER_METRICS = new Set([
  'ksp_handshakes_total',
  'ksp_handshake_duration_seconds',
  'ksp_authentication_failures_total',
  'ksp_decisions_total',
  'ksp_requests_total',
  'ksp_request_duration_seconds',
  'ksp_open_connections',
  'ksp_limit_refusals_total',
  'ksp_connections_closed_by_proxy_total',
  'ksp_requests_in_flight',
  'ksp_upstream_sessions',
  'ksp_upstream_streams',
]);

/**
 * `/metrics` with workers: the data-port metrics summed over the workers, the main process's own (policy, SVID,
 * bundles, audit), and the process metrics of every process (CPU seconds and memory add up).
 */
function clusterMetrics(own: ProxyMetrics, door: WorkerFrontDoor): MetricsSource {
  return {
    contentType: own.contentType,
    metrics: async () => {
      const named = (m: unknown): string => (m as { name: string }).name;
      const mine = (await own.registry.getMetricsAsJSON()).filter((m) => !WORKER_METRICS.has(named(m)));
      const theirs = (await door.pool.metrics()).map((json) =>
        (json as unknown[]).filter((m) => !MAIN_PROCESS_METRICS.has(named(m))),
      );
      return AggregatorRegistry.aggregate([mine, ...theirs]).metrics();
    },
  };
}
