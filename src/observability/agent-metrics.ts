import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';

export const FETCH_RESULTS = ['updated', 'unchanged', 'error'] as const;
/** updated: a new bundle was accepted; unchanged: the endpoint served the bundle we hold; error: see the code. */
export type FetchResult = (typeof FETCH_RESULTS)[number];

/** One federation relationship as the metrics read it at scrape time. */
export interface RelationshipReading {
  readonly trustDomain: string;
  /** Last successful fetch (restored from the state directory after a restart); undefined before the first. */
  readonly lastSuccess?: Date;
  /** spiffe_sequence of the bundle held, when it has one. */
  readonly sequence?: bigint;
  /** Whether a bundle is held at all. */
  readonly hasBundle: boolean;
}

/** The SPIRE upstream (issuer: spire) as the metrics read it at scrape time. */
export interface SpireReading {
  readonly lastSync?: Date;
  readonly agentExpiresAt?: Date;
  readonly consecutiveFailures: number;
  readonly entries: number;
  readonly svids: number;
  readonly bundleSequence?: bigint;
}

export interface AgentMetricsOptions {
  /** Process and Node.js metrics, prefixed `ksp_`. Default true. */
  defaultMetrics?: boolean;
  /** Clock for the scrape-time gauges, epoch milliseconds. Default `Date.now`. */
  now?: () => number;
}

/**
 * The agent's Prometheus metrics, on a registry of their own. Label values are bounded by the configuration:
 * trust domains come from agent.yaml, codes are our own error codes.
 */
export class AgentMetrics {
  readonly registry: Registry;
  readonly #fetches: Counter<'trust_domain' | 'result'>;
  readonly #fetchErrors: Counter<'trust_domain' | 'code'>;
  readonly #now: () => number;
  #relationships: () => readonly RelationshipReading[] = () => [];
  #ca: () => { generation: number; notAfter: Date; sequence?: bigint } | undefined = () => undefined;
  #spire: () => SpireReading | undefined = () => undefined;
  #spireSyncs: Counter<'result'> | undefined;
  #spireSyncErrors: Counter<'code'> | undefined;

  constructor(options: AgentMetricsOptions = {}) {
    this.#now = options.now ?? Date.now;
    const registry = new Registry();
    this.registry = registry;
    const registers = [registry];
    this.#fetches = new Counter({
      name: 'ksp_federation_fetches_total',
      help: 'Fetches of a federated bundle endpoint, by trust domain and result (updated, unchanged, error).',
      labelNames: ['trust_domain', 'result'],
      registers,
    });
    this.#fetchErrors = new Counter({
      name: 'ksp_federation_fetch_errors_total',
      help: 'Failed fetches of a federated bundle endpoint, by trust domain and error code (ERR_FEDERATION_*).',
      labelNames: ['trust_domain', 'code'],
      registers,
    });
    const self = this;
    new Gauge({
      name: 'ksp_federation_bundle_age_seconds',
      help:
        'Seconds since the bundle of a federated trust domain was last fetched successfully (or confirmed unchanged). ' +
        'Grows while its endpoint is dark; alert well before the peer rotates its keys. Absent until the first success.',
      labelNames: ['trust_domain'],
      registers,
      collect() {
        this.reset();
        const now = self.#now();
        for (const r of self.#relationships()) {
          if (r.lastSuccess)
            this.set({ trust_domain: r.trustDomain }, Math.max(0, (now - r.lastSuccess.getTime()) / 1000));
        }
      },
    });
    new Gauge({
      name: 'ksp_federation_last_success_timestamp_seconds',
      help: 'When the bundle of a federated trust domain was last fetched successfully, Unix time.',
      labelNames: ['trust_domain'],
      registers,
      collect() {
        this.reset();
        for (const r of self.#relationships()) {
          if (r.lastSuccess) this.set({ trust_domain: r.trustDomain }, r.lastSuccess.getTime() / 1000);
        }
      },
    });
    new Gauge({
      name: 'ksp_federation_bundle_present',
      help: '1 when a bundle of the federated trust domain is held (fetched, restored or bootstrap), else 0.',
      labelNames: ['trust_domain'],
      registers,
      collect() {
        this.reset();
        for (const r of self.#relationships()) this.set({ trust_domain: r.trustDomain }, r.hasBundle ? 1 : 0);
      },
    });
    new Gauge({
      name: 'ksp_federation_bundle_sequence',
      help: 'spiffe_sequence of the federated bundle held, when it carries one.',
      labelNames: ['trust_domain'],
      registers,
      collect() {
        this.reset();
        for (const r of self.#relationships()) {
          if (r.sequence !== undefined) this.set({ trust_domain: r.trustDomain }, Number(r.sequence));
        }
      },
    });
    new Gauge({
      name: 'ksp_agent_bundle_sequence',
      help: 'spiffe_sequence of our own trust bundle (what the bundle endpoint serves, or the SPIRE server sent); increases on every change.',
      registers,
      collect() {
        this.reset();
        // With issuer: spire, the sequence of the bundle the server sent.
        const sequence = self.#ca()?.sequence ?? self.#spire()?.bundleSequence;
        if (sequence !== undefined) this.set(Number(sequence));
      },
    });
    if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: registry, prefix: 'ksp_' });
  }

  /**
   * The SPIRE upstream's series (issuer: spire): registered here, not in the constructor, so that an agent with
   * the embedded CA exports none of them.
   */
  readSpire(getter: () => SpireReading | undefined): void {
    this.#spire = getter;
    const registers = [this.registry];
    const self = this;
    this.#spireSyncs = new Counter({
      name: 'ksp_agent_spire_syncs_total',
      help: 'Syncs with the SPIRE server (entries, bundles, due SVIDs), by result (ok, error).',
      labelNames: ['result'],
      registers,
    });
    this.#spireSyncs.inc({ result: 'ok' }, 0);
    this.#spireSyncs.inc({ result: 'error' }, 0);
    this.#spireSyncErrors = new Counter({
      name: 'ksp_agent_spire_sync_errors_total',
      help: 'Failed syncs with the SPIRE server, by error code (ERR_AGENT_UPSTREAM, ERR_AGENT_UPSTREAM_AUTH, ERR_AGENT_BANNED).',
      labelNames: ['code'],
      registers,
    });
    const gauge = (name: string, help: string, read: (r: SpireReading) => number | undefined): void => {
      new Gauge({
        name,
        help,
        registers,
        collect() {
          this.reset();
          const r = self.#spire();
          const value = r === undefined ? undefined : read(r);
          if (value !== undefined) this.set(value);
        },
      });
    };
    gauge(
      'ksp_agent_spire_last_sync_timestamp_seconds',
      'When the last sync with the SPIRE server succeeded, Unix time; absent before the first.',
      (r) => (r.lastSync ? r.lastSync.getTime() / 1000 : undefined),
    );
    gauge(
      'ksp_agent_spire_consecutive_failures',
      'Failed syncs with the SPIRE server since the last success (0 while all is well).',
      (r) => r.consecutiveFailures,
    );
    gauge(
      'ksp_agent_spire_agent_svid_expiry_timestamp_seconds',
      "When the agent's own SVID expires, Unix time; absent before attestation.",
      (r) => (r.agentExpiresAt ? r.agentExpiresAt.getTime() / 1000 : undefined),
    );
    gauge(
      'ksp_agent_spire_entries',
      'Registration entries the SPIRE server authorized this agent for.',
      (r) => r.entries,
    );
    gauge('ksp_agent_spire_x509_svids', 'X.509-SVIDs held for those entries.', (r) => r.svids);
  }

  /** One sync with the SPIRE server ended: ok, or failed with this code. */
  spireSynced(code?: string): void {
    this.#spireSyncs?.inc({ result: code === undefined ? 'ok' : 'error' });
    if (code !== undefined) this.#spireSyncErrors?.inc({ code });
  }

  /** Where the federation gauges read from at scrape time. */
  readRelationships(getter: () => readonly RelationshipReading[]): void {
    this.#relationships = getter;
  }

  /** Where the CA gauges read from at scrape time. */
  readCa(getter: () => { generation: number; notAfter: Date; sequence?: bigint } | undefined): void {
    this.#ca = getter;
    const registers = [this.registry];
    const self = this;
    new Gauge({
      name: 'ksp_agent_ca_expiry_timestamp_seconds',
      help: 'When the CA generation that signs now expires, Unix time.',
      registers,
      collect() {
        this.reset();
        const ca = self.#ca();
        if (ca) this.set(ca.notAfter.getTime() / 1000);
      },
    });
    new Gauge({
      name: 'ksp_agent_ca_generation',
      help: 'Generation of the CA that signs now: 1 for the first, +1 with each rotation; kept across restarts with a state directory.',
      registers,
      collect() {
        this.reset();
        const ca = self.#ca();
        if (ca) this.set(ca.generation);
      },
    });
  }

  /** Counts one fetch; `code` for errors. */
  fetched(trustDomain: string, result: FetchResult, code?: string): void {
    this.#fetches.inc({ trust_domain: trustDomain, result });
    if (result === 'error') this.#fetchErrors.inc({ trust_domain: trustDomain, code: code ?? 'unknown' });
  }

  /** Shows every result for a relationship from the first scrape, so rate() works before the first failure. */
  declare(trustDomain: string): void {
    for (const result of FETCH_RESULTS) this.#fetches.inc({ trust_domain: trustDomain, result }, 0);
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  metrics(): Promise<string> {
    return this.registry.metrics();
  }
}
