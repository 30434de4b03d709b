import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import {
  type AdminServer,
  createAdminServer,
  type ReadinessCheck,
  type ReadinessReport,
} from '../admin/server.ts';
import type { HostPort } from '../config/common.ts';
import { compareStrings } from '../config/compare.ts';
import { StateDir } from '../config/statedir.ts';
import { type WatchedFile, watchFile } from '../config/watch.ts';
import { AgentMetrics } from '../observability/agent-metrics.ts';
import type { LogLevel } from '../observability/levels.ts';
import { BundleSet, SpiffeBundle } from '../spiffe/bundle.ts';
import { type SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { type JwtSvid, verifyJwtSvid } from '../spiffe/jwtsvid.ts';
import { K8sAttestor, type K8sAttestorOptions } from './attestors/k8s.ts';
import type { WorkloadAttestor } from './attestors/types.ts';
import { UnixAttestor, type UnixAttestorOptions } from './attestors/unix.ts';
import { LocalCa, loadUpstreamAuthority, type UpstreamAuthority, type UpstreamFiles } from './ca.ts';
import type { BundleEndpointSettings, RelationshipSettings } from './config-federation.ts';
import { type EntriesWatcher, type EntrySet, type RegistrationEntry, watchEntries } from './entries.ts';
import { AgentError, AgentErrorCode } from './errors.ts';
import { AgentFederation } from './federation.ts';
import { type IssuedX509Svid, SvidIssuer } from './issuer.ts';
import type { KeyType } from './keys.ts';
import type { PeerCredentials } from './peercred.ts';
import { assertPeerCredAvailable } from './peercred.ts';
import { formatSelector } from './selectors.ts';
import { type WorkloadApiBackend, WorkloadApiServer, type WorkloadState } from './workload-api.ts';

export interface AgentOptions {
  readonly trustDomain: TrustDomain;
  readonly socketPath: string;
  /** Permissions of the socket file (default 0o777). */
  readonly socketMode?: number;
  readonly entriesFile: string;
  /**
   * Where the CA keys, CA chain, JWT keys and federated bundles are kept (0700, files 0600). Without it (library
   * use, tests) they live in memory only and a restart starts a new CA; agent.yaml always has one.
   */
  readonly stateDir?: string;
  readonly ca?: {
    readonly keyType?: KeyType;
    readonly ttlSeconds?: number;
    readonly upstream?: UpstreamFiles;
  };
  readonly svid?: {
    readonly keyType?: KeyType;
    readonly x509TtlSeconds?: number;
    readonly jwtTtlSeconds?: number;
    /** Fraction of the lifetime by which rotation may come before half-life (default 0.1). */
    readonly rotationJitter?: number;
  };
  readonly attestors?: {
    /** The unix attestor always runs; these are its options. */
    readonly unix?: UnixAttestorOptions;
    /** Enables the k8s attestor. */
    readonly k8s?: K8sAttestorOptions;
  };
  /** Federated trust domains: bundle files (SPIFFE bundle JSON), watched for changes. */
  readonly federatedBundles?: ReadonlyMap<string, string>;
  /** The bundle endpoint we serve, and the peers' endpoints we fetch (`federation` in agent.yaml). */
  readonly federation?: {
    readonly bundleEndpoint?: BundleEndpointSettings;
    readonly relationships: readonly RelationshipSettings[];
  };
  /** The admin listener (/healthz, /readyz, /metrics); off when absent. */
  readonly admin?: HostPort;
  /** Re-read poll interval for watched files (default 5 s). */
  readonly watchPollMs?: number;
  readonly logger: Logger;
}

/** What `reload` re-reads: the options without the logger, and the log level (when the command does not pin it). */
export type AgentSettings = Omit<AgentOptions, 'logger'> & { readonly logLevel?: LogLevel };

/** Settings that only a restart applies, under their names in agent.yaml. */
const RESTART_ONLY: readonly (readonly [keyof AgentSettings, string])[] = [
  ['trustDomain', 'trustDomain'],
  ['socketPath', 'socketPath'],
  ['socketMode', 'socketMode'],
  ['entriesFile', 'entriesFile'],
  ['stateDir', 'stateDir'],
  ['watchPollMs', 'watchPollInterval'],
  ['ca', 'ca'],
  ['svid', 'svid'],
  ['federation', 'federation.bundleEndpoint / federation.trustDomains'],
  ['admin', 'admin'],
];

/** Federated bundle files the agent follows, by trust domain name. */
interface FederatedFile {
  readonly file: string;
  readonly watcher: WatchedFile<SpiffeBundle>;
}

interface AgentEvents {
  change: [];
}

/**
 * The bundled agent: attests callers of the Workload API, matches them to registration entries, and serves
 * them SVIDs from the local CA, pushing a new message whenever an SVID rotates, a bundle changes or the
 * entries file is edited.
 */
export class WorkloadAgent implements WorkloadApiBackend {
  readonly trustDomain: TrustDomain;
  readonly ca: LocalCa;
  readonly issuer: SvidIssuer;
  readonly server: WorkloadApiServer;
  readonly metrics: AgentMetrics;
  readonly #log: Logger;
  readonly #stateDir: StateDir | undefined;
  /** The bundle endpoint's own SVID (https_spiffe), minted and rotated like a workload's. */
  readonly #endpointEntry: RegistrationEntry | undefined;
  #federation: AgentFederation | undefined;
  #admin: AdminServer | undefined;
  readonly #events = new EventEmitter<AgentEvents>();
  readonly #federated = new Map<string, SpiffeBundle>();
  readonly #federatedFiles = new Map<string, FederatedFile>();
  readonly #pollIntervalMs: number;
  /** The settings in force: what a reload compares the re-read configuration with. */
  #settings: AgentSettings;
  /** Swapped whole when a reload changes the attestors' configuration. */
  #attestors: readonly WorkloadAttestor[];
  #entries!: EntriesWatcher;
  #reloading: Promise<void> = Promise.resolve();
  #closed = false;

  private constructor(options: AgentOptions, ca: LocalCa, stateDir: StateDir | undefined) {
    this.trustDomain = options.trustDomain;
    this.#stateDir = stateDir;
    this.metrics = new AgentMetrics({ defaultMetrics: options.admin !== undefined });
    this.metrics.readCa(() => ({
      generation: this.ca.active.generation,
      notAfter: this.ca.active.notAfter,
      ...(this.ca.bundle.sequence !== undefined ? { sequence: this.ca.bundle.sequence } : {}),
    }));
    const endpointTls = options.federation?.bundleEndpoint?.tls;
    this.#endpointEntry =
      endpointTls?.profile === 'https_spiffe'
        ? {
            key: 'internal:bundle-endpoint',
            spiffeId: endpointTls.spiffeId,
            selectors: [],
            dnsNames: [],
            federatesWith: [],
            line: 0,
          }
        : undefined;
    this.#log = options.logger;
    const { logger: _, ...settings } = options;
    this.#settings = settings;
    this.#pollIntervalMs = options.watchPollMs ?? 5000;
    this.ca = ca;
    this.issuer = new SvidIssuer({
      ca,
      ...(options.svid?.keyType ? { keyType: options.svid.keyType } : {}),
      ...(options.svid?.x509TtlSeconds ? { x509SvidTtlSeconds: options.svid.x509TtlSeconds } : {}),
      ...(options.svid?.jwtTtlSeconds ? { jwtSvidTtlSeconds: options.svid.jwtTtlSeconds } : {}),
      ...(options.svid?.rotationJitter !== undefined ? { jitter: options.svid.rotationJitter } : {}),
    });
    this.#attestors = makeAttestors(options.attestors);
    this.server = new WorkloadApiServer({
      socketPath: options.socketPath,
      backend: this,
      logger: options.logger,
      ...(options.socketMode !== undefined ? { socketMode: options.socketMode } : {}),
    });
    this.#events.setMaxListeners(0);
  }

  /** Loads everything, refusing to start on any invalid input, then listens on the socket. */
  static async start(options: AgentOptions): Promise<WorkloadAgent> {
    const log = options.logger;
    assertPeerCredAvailable();
    const upstream = options.ca?.upstream ? await loadUpstreamAuthority(options.ca.upstream) : undefined;
    const stateDir = options.stateDir === undefined ? undefined : await StateDir.open(options.stateDir);
    const ca = await LocalCa.create({
      trustDomain: options.trustDomain,
      ...(stateDir ? { stateDir } : {}),
      ...(options.ca?.keyType ? { keyType: options.ca.keyType } : {}),
      ...(options.ca?.ttlSeconds ? { caTtlSeconds: options.ca.ttlSeconds } : {}),
      ...(upstream ? { upstream } : {}),
    });
    const agent = new WorkloadAgent(options, ca, stateDir);
    try {
      await agent.#init(options);
    } catch (err) {
      await agent.close();
      throw err;
    }
    log.info(
      {
        trustDomain: options.trustDomain.name,
        socket: options.socketPath,
        entries: agent.#entries.current.entries.length,
        ca: upstream ? 'upstream (disk)' : 'self-signed',
        caState: stateDir
          ? `${ca.origin === 'resumed' ? 'resumed from' : 'new, kept in'} ${stateDir.path}`
          : 'memory only',
        caGeneration: ca.active.generation,
        caNotAfter: ca.active.notAfter.toISOString(),
        bundleSequence: ca.bundle.sequence?.toString(),
      },
      'agent started',
    );
    if (!stateDir) {
      log.warn('no stateDir: the CA lives in memory only, and a restart will start a new, unrelated CA');
    }
    return agent;
  }

  async #init(options: AgentOptions): Promise<void> {
    const log = this.#log;
    const ca = this.ca;
    ca.on('bundle', (bundle) => {
      log.info(
        {
          trustDomain: bundle.trustDomain.name,
          sequence: bundle.sequence?.toString(),
          authorities: bundle.x509Authorities.length,
        },
        'trust bundle changed',
      );
      this.#changed();
    });
    ca.on('persistError', (err) => {
      log.error(
        { err: { code: (err as AgentError).code, message: err.message } },
        'CA state could not be written; the CA goes on in memory, but a restart now would lose this change',
      );
    });
    ca.on('activated', (slot) => {
      log.info(
        { generation: slot.generation, notAfter: slot.notAfter.toISOString() },
        'CA rotated: new CA active',
      );
    });
    this.issuer.on('rotated', (issued) => {
      if (issued.entryKey === this.#endpointEntry?.key) {
        this.#federation?.setEndpointIdentity(issued.svid);
        log.info(
          { spiffeId: issued.id.toString(), notAfter: issued.notAfter.toISOString() },
          'bundle endpoint SVID rotated',
        );
        return;
      }
      log.info(
        { spiffeId: issued.id.toString(), notAfter: issued.notAfter.toISOString() },
        'X509-SVID rotated',
      );
      this.#changed();
    });
    this.issuer.on('error', (err, spiffeId) => {
      log.error({ spiffeId, err: { message: err.message } }, 'minting an SVID failed; will retry');
    });
    const pollIntervalMs = this.#pollIntervalMs;
    this.#entries = await watchEntries(options.entriesFile, {
      trustDomain: options.trustDomain,
      pollIntervalMs,
      onChange: (set, previous) => {
        this.issuer.retain(this.#endpointEntry ? [...set.entries, this.#endpointEntry] : set.entries);
        log.info(
          { file: options.entriesFile, entries: set.entries.length, before: previous.entries.length },
          'registration entries reloaded',
        );
        this.#changed();
      },
      onError: (err) => {
        log.error(
          { file: options.entriesFile, err: { code: err.code, message: err.message } },
          'entries file rejected; keeping the last good entries',
        );
      },
    });
    for (const [name, file] of options.federatedBundles ?? []) {
      const watcher = await this.#watchFederatedBundle(name, file);
      this.#federatedFiles.set(name, { file, watcher });
      this.#federated.set(name, watcher.current);
    }
    const federation = options.federation;
    if (federation || this.#stateDir) {
      const endpointEntry = this.#endpointEntry;
      this.#federation = await AgentFederation.start({
        trustDomain: this.trustDomain,
        relationships: federation?.relationships ?? [],
        ...(federation?.bundleEndpoint ? { bundleEndpoint: federation.bundleEndpoint } : {}),
        staticTrustDomains: new Set(this.#federatedFiles.keys()),
        ...(this.#stateDir ? { stateDir: this.#stateDir } : {}),
        ownBundle: () => this.ca.bundle,
        ...(endpointEntry
          ? { endpointIdentity: async () => (await this.issuer.x509For(endpointEntry)).svid }
          : {}),
        onBundle: (bundle) => this.setFederatedBundle(bundle),
        metrics: this.metrics,
        logger: log.child({ component: 'federation' }),
      });
    }
    ca.start();
    await this.server.listen();
    if (options.admin) {
      this.#admin = await createAdminServer({
        metrics: this.metrics,
        readiness: () => this.readiness(),
        logger: log.child({ component: 'admin' }),
        host: options.admin.host,
        port: options.admin.port,
      });
    }
  }

  /** The admin listener's address, when one is configured. */
  get adminAddress(): { host: string; port: number } | undefined {
    return this.#admin?.address;
  }

  /** The federation side: relationships, set bundles, the bundle endpoint (undefined without any). */
  get federation(): AgentFederation | undefined {
    return this.#federation;
  }

  /**
   * /readyz: ready while the CA that signs is valid. Each federated trust domain adds a check that fails only
   * while no bundle of it is held; a dark endpoint is reported in the detail (age, last error) but does not make
   * the agent unready, since the last good bundle still serves and restarting the agent would not help.
   */
  readiness(): ReadinessReport {
    const now = Date.now();
    const active = this.ca.active;
    const checks: ReadinessCheck[] = [
      {
        name: 'ca',
        ok: active.notAfter.getTime() > now,
        detail: `generation ${active.generation} (${this.ca.origin === 'resumed' ? 'resumed from the state directory' : 'minted by this process'}), valid until ${active.notAfter.toISOString()}, bundle sequence ${this.ca.bundle.sequence ?? 'none'}`,
      },
    ];
    for (const td of this.#federation?.list() ?? []) {
      if (td.kind === 'set') {
        checks.push({
          name: `federation:${td.trustDomain}`,
          ok: true,
          detail: `bundle set by an operator at ${td.stored?.fetchedAt.toISOString()}; no endpoint is polled`,
        });
        continue;
      }
      const s = td.status;
      if (s === undefined) continue;
      const parts: string[] = [];
      if (s.bundle) {
        parts.push(`bundle from ${s.source ?? 'unknown'}, sequence ${s.bundle.sequence ?? 'none'}`);
      } else parts.push('no bundle held');
      parts.push(
        s.lastSuccess
          ? `age ${Math.round((now - s.lastSuccess.getTime()) / 1000)}s (last success ${s.lastSuccess.toISOString()})`
          : 'never fetched',
      );
      if (s.consecutiveFailures > 0 && s.lastError) {
        parts.push(
          `${s.consecutiveFailures} failure(s) since, last ${s.lastError.code}: ${s.lastError.message}`,
        );
      }
      checks.push({
        name: `federation:${td.trustDomain}`,
        ok: s.bundle !== undefined,
        detail: parts.join('; '),
      });
    }
    return { ready: checks.every((c) => c.ok), checks };
  }

  async #watchFederatedBundle(name: string, file: string): Promise<WatchedFile<SpiffeBundle>> {
    const trustDomain = TrustDomain.parse(name);
    if (trustDomain.equals(this.trustDomain)) {
      throw new AgentError(AgentErrorCode.Config, `federated bundle ${name}: that is our own trust domain`);
    }
    const parse = (text: string): SpiffeBundle => SpiffeBundle.parse(trustDomain, text);
    let watcher: WatchedFile<SpiffeBundle>;
    try {
      watcher = await watchFile(file, {
        parse,
        pollIntervalMs: this.#pollIntervalMs,
        onChange: (bundle) => {
          this.#log.info({ trustDomain: name, file }, 'federated bundle changed');
          this.setFederatedBundle(bundle);
        },
        onError: (err) => {
          this.#log.error(
            { trustDomain: name, file, err: { message: err.message } },
            'federated bundle rejected; keeping the last good one',
          );
        },
      });
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Config,
        `federated bundle ${name} (${file}): ${(err as Error).message}`,
        {
          cause: err,
        },
      );
    }
    return watcher;
  }

  /**
   * SIGHUP: applies a re-read configuration where that can be done live, then re-reads every file the agent
   * reads: the entries, the federated bundles and, with an upstream CA, its files. Never throws: a broken file
   * is logged and the last good content kept. `loadSettings` re-reads agent.yaml; keys that need a restart
   * (socket, entries file, CA, SVID settings, poll interval) are logged and keep their running values, while the
   * log level, the attestors and the federated bundle files apply at once. Reloads run one after another.
   */
  reload(loadSettings?: () => Promise<AgentSettings>): Promise<void> {
    const run = async (): Promise<void> => {
      if (this.#closed) return;
      if (loadSettings) await this.#reloadSettings(loadSettings);
      await Promise.all([
        this.#entries.reload(),
        ...[...this.#federatedFiles.values()].map((f) => f.watcher.reload()),
        this.#reloadUpstream(),
        this.#federation?.reload(),
      ]);
    };
    this.#reloading = this.#reloading.then(run, run);
    return this.#reloading;
  }

  async #reloadSettings(loadSettings: () => Promise<AgentSettings>): Promise<void> {
    const log = this.#log;
    let next: AgentSettings;
    try {
      next = await loadSettings();
    } catch (err) {
      const e = err as Error & { code?: string };
      log.error(
        { err: { code: e.code, message: e.message } },
        'configuration rejected; keeping the running configuration',
      );
      return;
    }
    const running = this.#settings;
    const restart = RESTART_ONLY.filter(([key]) => canonical(running[key]) !== canonical(next[key])).map(
      ([, name]) => name,
    );
    if (restart.length > 0) {
      log.warn(
        { keys: restart },
        'configuration changed in keys that need a restart; keeping their running values',
      );
    }
    let applied: AgentSettings = running;
    if (next.logLevel !== undefined && next.logLevel !== log.level) {
      log.info({ from: log.level, to: next.logLevel }, 'log level changed');
      log.level = next.logLevel;
      applied = { ...applied, logLevel: next.logLevel };
    }
    if (canonical(running.attestors) !== canonical(next.attestors)) {
      try {
        this.#attestors = makeAttestors(next.attestors);
        applied = { ...applied, attestors: next.attestors };
        log.info({ attestors: this.#attestors.map((a) => a.name) }, 'attestors reconfigured');
      } catch (err) {
        log.error(
          { err: { code: (err as AgentError).code, message: (err as Error).message } },
          'attestors configuration refused; keeping the running attestors',
        );
      }
    }
    const bundles = next.federatedBundles ?? new Map<string, string>();
    if (canonical(running.federatedBundles ?? new Map()) !== canonical(bundles)) {
      const files = await this.#applyFederation(bundles);
      applied = { ...applied, federatedBundles: files };
    }
    this.#settings = applied;
  }

  /** Follows the configured federated bundle files; returns the files in force afterwards. */
  async #applyFederation(wanted: ReadonlyMap<string, string>): Promise<Map<string, string>> {
    const log = this.#log;
    let changed = false;
    for (const [name, followed] of this.#federatedFiles) {
      if (wanted.has(name)) continue;
      followed.watcher.close();
      this.#federatedFiles.delete(name);
      this.#federated.delete(name);
      changed = true;
      log.info({ trustDomain: name, file: followed.file }, 'federated trust domain removed');
    }
    for (const [name, file] of wanted) {
      const followed = this.#federatedFiles.get(name);
      if (followed?.file === file) continue;
      try {
        const watcher = await this.#watchFederatedBundle(name, file);
        followed?.watcher.close();
        this.#federatedFiles.set(name, { file, watcher });
        this.#federated.set(name, watcher.current);
        changed = true;
        log.info(
          { trustDomain: name, file },
          followed ? 'federated bundle file changed' : 'federated trust domain added',
        );
      } catch (err) {
        log.error(
          {
            trustDomain: name,
            file,
            err: { code: (err as AgentError).code, message: (err as Error).message },
          },
          followed
            ? 'new federated bundle file rejected; keeping the last good bundle'
            : 'federated bundle file rejected; trust domain not added',
        );
      }
    }
    if (changed) this.#changed();
    return new Map([...this.#federatedFiles].map(([name, f]) => [name, f.file]));
  }

  /** Re-reads the upstream CA files (upstream mode); the next CA generation is signed by a changed authority. */
  async #reloadUpstream(): Promise<void> {
    const files = this.#settings.ca?.upstream;
    if (files === undefined) return;
    let upstream: UpstreamAuthority;
    try {
      upstream = await loadUpstreamAuthority(files);
    } catch (err) {
      this.#log.error(
        { err: { code: (err as AgentError).code, message: (err as Error).message } },
        'upstream CA files rejected; keeping the running upstream CA',
      );
      return;
    }
    if (this.ca.setUpstream(upstream)) {
      this.#log.info(
        { certFile: files.certFile, notAfter: upstream.certificates[0]?.validTo },
        'upstream CA reloaded; the next CA generation is signed by it',
      );
    }
  }

  /** Adds or replaces a federated trust domain's bundle (from a file, a fetch, the state directory). */
  setFederatedBundle(bundle: SpiffeBundle): void {
    if (bundle.trustDomain.equals(this.trustDomain)) {
      throw new AgentError(AgentErrorCode.Config, 'a federated bundle may not be for our own trust domain');
    }
    this.#federated.set(bundle.trustDomain.name, bundle);
    this.#changed();
  }

  get entries(): EntrySet {
    return this.#entries.current;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#entries?.close();
    for (const f of this.#federatedFiles.values()) f.watcher.close();
    this.ca.close();
    this.issuer.close();
    await this.#federation?.close();
    await this.#admin?.close();
    await this.server.close();
    await this.ca.flushed();
  }

  #changed(): void {
    this.#events.emit('change');
  }

  // WorkloadApiBackend

  async attest(caller: PeerCredentials, signal: AbortSignal): Promise<ReadonlySet<string>> {
    return attestCaller(this.#attestors, caller, signal, this.#log);
  }

  async state(selectors: ReadonlySet<string>): Promise<WorkloadState> {
    const entries = this.#entries.current.match(selectors);
    const svids: IssuedX509Svid[] = await Promise.all(entries.map((e) => this.issuer.x509For(e)));
    return { svids, bundle: this.ca.bundle, federatedBundles: this.#federatedFor(entries) };
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
    let entries = this.#entries.current.match(selectors);
    if (id !== undefined) entries = entries.filter((e) => e.spiffeId.equals(id)).slice(0, 1);
    return Promise.all(entries.map((e) => this.issuer.jwtFor(e, audience)));
  }

  async validateJwtSvid(selectors: ReadonlySet<string>, token: string, audience: string): Promise<JwtSvid> {
    const entries = this.#entries.current.match(selectors);
    const bundles = new BundleSet([this.ca.bundle, ...this.#federatedFor(entries)]);
    return verifyJwtSvid(token, bundles, audience);
  }

  #federatedFor(entries: readonly RegistrationEntry[]): SpiffeBundle[] {
    const names = new Set(entries.flatMap((e) => e.federatesWith.map((td) => td.name)));
    return [...names]
      .sort()
      .map((name) => this.#federated.get(name))
      .filter((b): b is SpiffeBundle => b !== undefined);
  }
}

/** A caller's selectors (`type:value`) from every attestor; throws to refuse it. */
export async function attestCaller(
  attestors: readonly WorkloadAttestor[],
  caller: PeerCredentials,
  signal: AbortSignal,
  log: Logger,
): Promise<ReadonlySet<string>> {
  const results = await Promise.all(attestors.map((a) => a.attest(caller, signal)));
  const selectors = new Set(results.flat().map(formatSelector));
  log.debug({ pid: caller.pid, uid: caller.uid, selectors: [...selectors] }, 'caller attested');
  return selectors;
}

/** The unix attestor always, the k8s attestor when configured. */
export function makeAttestors(options: AgentOptions['attestors']): readonly WorkloadAttestor[] {
  const attestors: WorkloadAttestor[] = [new UnixAttestor(options?.unix ?? {})];
  if (options?.k8s) attestors.push(new K8sAttestor(options.k8s));
  return attestors;
}

/** A comparable text of a setting: maps in key order, empty objects as absent (trust domains have toJSON). */
function canonical(value: unknown): string {
  const text = JSON.stringify(value, (_key, v: unknown) => {
    if (v instanceof Map) return [...v].sort(([a], [b]) => compareStrings(String(a), String(b)));
    if (typeof v === 'object' && v !== null && !Array.isArray(v) && Object.keys(v).length === 0)
      return undefined;
    return v;
  });
  return text === undefined || text === '{}' ? '' : text;
}
