/**
 * The agent with a SPIRE server as its issuer (`issuer: spire`): the same Workload API, attestors, streaming
 * and admin listener as the embedded-CA agent, with entries, SVIDs and bundles from the server (upstream.ts).
 */
import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import {
  type AdminServer,
  createAdminServer,
  type ReadinessCheck,
  type ReadinessReport,
} from '../../admin/server.ts';
import type { HostPort } from '../../config/common.ts';
import { StateDir } from '../../config/statedir.ts';
import { AgentMetrics } from '../../observability/agent-metrics.ts';
import type { LogLevel } from '../../observability/levels.ts';
import { BundleSet } from '../../spiffe/bundle.ts';
import type { SpiffeId, TrustDomain } from '../../spiffe/id.ts';
import { type JwtSvid, verifyJwtSvid } from '../../spiffe/jwtsvid.ts';
import type { AgentOptions } from '../agent.ts';
import { attestCaller, makeAttestors } from '../agent.ts';
import type { WorkloadAttestor } from '../attestors/types.ts';
import { AgentError, AgentErrorCode } from '../errors.ts';
import type { KeyType } from '../keys.ts';
import type { PeerCredentials } from '../peercred.ts';
import { assertPeerCredAvailable } from '../peercred.ts';
import {
  type ServedX509Svid,
  type WorkloadApiBackend,
  WorkloadApiServer,
  type WorkloadState,
} from '../workload-api.ts';
import { loadBootstrapBundle } from './bootstrap.ts';
import { makeCsr, SpireServerClient } from './client.ts';
import type { NodeAttestation, SpireServerAddress } from './types.ts';
import { type ServedEntry, type SpireConnector, SpireUpstream } from './upstream.ts';

/** How the agent proves its node to the server. */
export type NodeAttestorSettings =
  | { readonly type: 'join_token'; readonly token?: string }
  | {
      readonly type: 'k8s_psat';
      readonly cluster: string;
      /** The projected service-account token (audience `spire-server`), re-read at every attestation. */
      readonly tokenPath: string;
    };

/** agent.yaml's `spire` section. */
export interface SpireSettings {
  readonly serverAddress: SpireServerAddress;
  /** PEM roots or a SPIFFE bundle (JSON) of the server's trust domain: trusted until the first sync. */
  readonly bootstrapBundle: string;
  readonly nodeAttestor: NodeAttestorSettings;
  /** Default 5 s. */
  readonly syncIntervalMs?: number;
}

export interface SpireAgentOptions {
  readonly trustDomain: TrustDomain;
  readonly socketPath: string;
  readonly socketMode?: number;
  readonly stateDir?: string;
  readonly spire: SpireSettings;
  readonly svid?: { readonly keyType?: KeyType };
  readonly attestors?: AgentOptions['attestors'];
  readonly admin?: HostPort;
  readonly logger: Logger;
  /** Reads a k8s_psat token file (default readPsatToken). */
  readonly readToken?: (file: string) => Promise<string>;
  /** A stand-in server client in unit tests. */
  readonly connector?: SpireConnector;
}

export type SpireAgentSettings = Omit<SpireAgentOptions, 'logger' | 'readToken' | 'connector'> & {
  readonly logLevel?: LogLevel;
};

interface AgentEvents {
  change: [];
}

/**
 * Serves on the Workload API what a SPIRE server issued to this node. `stopped` resolves with the reason when
 * the server bans the agent: the caller (the `agent` command) then exits non-zero, as SPIRE's agent does.
 */
export class SpireAgent implements WorkloadApiBackend {
  readonly trustDomain: TrustDomain;
  readonly upstream: SpireUpstream;
  readonly server: WorkloadApiServer;
  readonly metrics: AgentMetrics;
  /** Resolves (never rejects) with the error that stopped the agent on its own: a ban. */
  readonly stopped: Promise<AgentError>;
  readonly #log: Logger;
  readonly #events = new EventEmitter<AgentEvents>();
  #attestors: readonly WorkloadAttestor[];
  #attestorsConfig: AgentOptions['attestors'];
  #admin: AdminServer | undefined;
  #closed = false;

  private constructor(options: SpireAgentOptions, upstream: SpireUpstream) {
    this.trustDomain = options.trustDomain;
    this.upstream = upstream;
    this.#log = options.logger;
    this.metrics = new AgentMetrics({ defaultMetrics: options.admin !== undefined });
    this.#attestorsConfig = options.attestors;
    this.#attestors = makeAttestors(options.attestors);
    this.server = new WorkloadApiServer({
      socketPath: options.socketPath,
      backend: this,
      logger: options.logger,
      ...(options.socketMode !== undefined ? { socketMode: options.socketMode } : {}),
    });
    this.#events.setMaxListeners(0);
    upstream.on('change', () => this.#events.emit('change'));
    this.metrics.readSpire(() => {
      const s = upstream.status();
      return {
        ...(s.lastSync ? { lastSync: s.lastSync } : {}),
        ...(s.agentExpiresAt ? { agentExpiresAt: s.agentExpiresAt } : {}),
        consecutiveFailures: s.consecutiveFailures,
        entries: s.entries,
        svids: s.svids,
        ...(upstream.bundle.sequence !== undefined ? { bundleSequence: upstream.bundle.sequence } : {}),
      };
    });
    upstream.on('synced', (err) => this.metrics.spireSynced(err?.code));
    this.stopped = new Promise((resolve) => upstream.once('banned', resolve));
  }

  static async start(options: SpireAgentOptions): Promise<SpireAgent> {
    const log = options.logger;
    assertPeerCredAvailable();
    const spire = options.spire;
    const bootstrap = await loadBootstrapBundle(spire.bootstrapBundle, options.trustDomain);
    const stateDir = options.stateDir === undefined ? undefined : await StateDir.open(options.stateDir);
    const attestor = spire.nodeAttestor;
    const readToken = options.readToken ?? readPsatToken;
    const attestation = async (): Promise<NodeAttestation> => {
      if (attestor.type === 'join_token') {
        if (attestor.token === undefined || attestor.token === '') {
          throw new AgentError(
            AgentErrorCode.UpstreamAuth,
            'this node has no agent SVID (none in the state directory) and no join token to attest with: ' +
              'generate one with `spire-server token generate` and pass it with --join-token',
          );
        }
        return { type: 'join_token', token: attestor.token };
      }
      return { type: 'k8s_psat', cluster: attestor.cluster, token: await readToken(attestor.tokenPath) };
    };
    const upstream = await SpireUpstream.start({
      trustDomain: options.trustDomain,
      connector:
        options.connector ??
        new SpireServerClient({ address: spire.serverAddress, trustDomain: options.trustDomain }),
      makeCsr,
      bootstrapBundle: bootstrap,
      attestation,
      ...(stateDir ? { stateDir } : {}),
      ...(options.svid?.keyType ? { keyType: options.svid.keyType } : {}),
      ...(spire.syncIntervalMs ? { syncIntervalMs: spire.syncIntervalMs } : {}),
      logger: log.child({ component: 'spire' }),
    });
    const agent = new SpireAgent(options, upstream);
    try {
      await agent.server.listen();
      if (options.admin) {
        agent.#admin = await createAdminServer({
          metrics: agent.metrics,
          readiness: () => agent.readiness(),
          logger: log.child({ component: 'admin' }),
          host: options.admin.host,
          port: options.admin.port,
        });
      }
    } catch (err) {
      await agent.close();
      throw err;
    }
    log.info(
      {
        trustDomain: options.trustDomain.name,
        socket: options.socketPath,
        issuer: 'spire',
        server: `${spire.serverAddress.host}:${spire.serverAddress.port}`,
        nodeAttestor: attestor.type,
        state: stateDir ? stateDir.path : 'memory only',
      },
      'agent started',
    );
    return agent;
  }

  /** The admin listener's address, when one is configured. */
  get adminAddress(): { host: string; port: number } | undefined {
    return this.#admin?.address;
  }

  /** /readyz: ready once a sync with the server has completed, and while the agent is not banned. */
  readiness(): ReadinessReport {
    const s = this.upstream.status();
    const parts: string[] = [];
    parts.push(s.agentId ? `agent ${s.agentId} until ${s.agentExpiresAt?.toISOString()}` : 'not attested');
    parts.push(s.lastSync ? `last sync ${s.lastSync.toISOString()}` : 'never synced');
    parts.push(`${s.entries} entries, ${s.svids} X509-SVIDs held`);
    if (s.consecutiveFailures > 0 && s.lastError) {
      parts.push(
        `${s.consecutiveFailures} failure(s) since, last ${s.lastError.code}: ${s.lastError.message}`,
      );
    }
    if (s.banned) parts.push('banned by the server');
    const checks: ReadinessCheck[] = [{ name: 'spire', ok: this.upstream.ready, detail: parts.join('; ') }];
    return { ready: checks.every((c) => c.ok), checks };
  }

  /** SIGHUP: the log level and attestors of a re-read configuration, and a sync now. */
  async reload(loadSettings?: () => Promise<SpireAgentSettings>): Promise<void> {
    if (this.#closed) return;
    if (loadSettings) {
      try {
        const next = await loadSettings();
        if (next.logLevel !== undefined && next.logLevel !== this.#log.level) {
          this.#log.info({ from: this.#log.level, to: next.logLevel }, 'log level changed');
          this.#log.level = next.logLevel;
        }
        if (JSON.stringify(next.attestors ?? {}) !== JSON.stringify(this.#attestorsConfig ?? {})) {
          this.#attestors = makeAttestors(next.attestors);
          this.#attestorsConfig = next.attestors;
          this.#log.info({ attestors: this.#attestors.map((a) => a.name) }, 'attestors reconfigured');
        }
      } catch (err) {
        const e = err as Error & { code?: string };
        this.#log.error(
          { err: { code: e.code, message: e.message } },
          'configuration rejected; keeping the running configuration',
        );
      }
    }
    await this.upstream.syncNow();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.upstream.close();
    await this.#admin?.close();
    await this.server.close();
  }

  // WorkloadApiBackend

  async attest(caller: PeerCredentials, signal: AbortSignal): Promise<ReadonlySet<string>> {
    return attestCaller(this.#attestors, caller, signal, this.#log);
  }

  async state(selectors: ReadonlySet<string>): Promise<WorkloadState> {
    const entries = this.upstream.match(selectors);
    const svids: ServedX509Svid[] = [];
    for (const { entry } of entries) {
      const svid = this.upstream.x509For(entry.id);
      if (svid !== undefined) svids.push(svid);
    }
    return {
      svids,
      bundle: this.upstream.bundle,
      federatedBundles: this.upstream.federatedBundles(entries.flatMap((e) => e.entry.federatesWith)),
    };
  }

  subscribe(listener: () => void): () => void {
    this.#events.on('change', listener);
    return () => this.#events.off('change', listener);
  }

  async mintJwtSvids(
    selectors: ReadonlySet<string>,
    audience: readonly string[],
    id?: SpiffeId,
  ): Promise<JwtSvid[]> {
    let entries: ServedEntry[] = this.upstream.match(selectors);
    if (id !== undefined) entries = entries.filter((e) => e.entry.spiffeId.equals(id)).slice(0, 1);
    return Promise.all(entries.map((e) => this.upstream.jwtFor(e, audience)));
  }

  async validateJwtSvid(selectors: ReadonlySet<string>, token: string, audience: string): Promise<JwtSvid> {
    const entries = this.upstream.match(selectors);
    const bundles = new BundleSet([
      this.upstream.bundle,
      ...this.upstream.federatedBundles(entries.flatMap((e) => e.entry.federatesWith)),
    ]);
    return verifyJwtSvid(token, bundles, audience);
  }
}

/** Reads a projected service-account token (k8s_psat); the kubelet rewrites the file as it rotates it. */
export async function readPsatToken(file: string): Promise<string> {
  let token: string;
  try {
    token = (await readFile(file, 'utf8')).trim();
  } catch (err) {
    throw new AgentError(
      AgentErrorCode.UpstreamAuth,
      `k8s_psat: the service-account token ${file} cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); mount a projected token with audience spire-server there`,
      { cause: err },
    );
  }
  if (token === '')
    throw new AgentError(AgentErrorCode.UpstreamAuth, `k8s_psat: the token file ${file} is empty`);
  return token;
}
