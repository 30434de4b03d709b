import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';

export const HANDSHAKE_RESULTS = ['ok', 'refused', 'error', 'no_client_hello'] as const;
/**
 * ok: the peer presented a valid SVID; refused: it presented none or an invalid one; error: the TLS layer failed;
 * no_client_hello: the connection closed or timed out before sending a single byte (TCP probes, port scans).
 */
export type HandshakeResult = (typeof HANDSHAKE_RESULTS)[number];

/** Handshakes (mTLS with a local key) take about a millisecond; a second means something is very wrong. */
export const HANDSHAKE_BUCKETS: readonly number[] = [
  0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
];

/**
 * Proxied requests, measured until the response ends: most take milliseconds, but watches and log follows last
 * minutes and land in the last buckets or +Inf.
 */
export const REQUEST_BUCKETS: readonly number[] = [
  0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
];

export interface ProxyMetricsOptions {
  /** Process and Node.js metrics (CPU, memory, event loop lag, GC, handles), prefixed `ksp_`. Default true. */
  defaultMetrics?: boolean;
  /** Clock for the scrape-time gauges (SVID expiry, bundle age), in epoch milliseconds. Default `Date.now`. */
  now?: () => number;
}

/** When the proxy's own SVID expires; undefined while it has none. */
export type SvidExpiryGetter = () => Date | undefined;
/** Requests in flight and upstream sessions, read at each scrape. */
export type UsageGetter = () =>
  | {
      inFlight: { ordinary: number; longRunning: number };
      upstream: Record<'ordinary' | 'longRunning', { sessions: number; streams: number }>;
    }
  | undefined;
/** When each trust domain's bundle last changed, keyed by trust domain name. */
export type BundleAgesGetter = () => ReadonlyMap<string, Date>;
/** What the audit sink reports (src/proxy/audit.ts AuditStats; declared here, the layer below the proxy). */
export interface AuditStatsLike {
  readonly bufferedBytes: number;
  readonly dropped: number;
  readonly writeErrors: number;
}
/** Most cached label children per counter. */
const CHILD_CACHE = 1024;

/**
 * The proxy's Prometheus metrics, on a registry of their own (never prom-client's global one), so that two
 * instances (tests, or two proxies in one process) never clash over metric names.
 *
 * Label values are bounded by construction: results and decisions are fixed sets, codes are the proxy's own
 * error codes or HTTP status codes, rules and trust domains come from the policy file. No SPIFFE ID, user name or
 * path ever becomes a label value.
 */
export class ProxyMetrics {
  readonly registry: Registry;

  readonly #handshakes: Counter<'result'>;
  readonly #handshakeDuration: Histogram;
  readonly #authFailures: Counter<'code'>;
  readonly #decisions: Counter<'rule' | 'decision' | 'code'>;
  readonly #requests: Counter<'code'>;
  readonly #requestDuration: Histogram;
  readonly #policyGeneration: Gauge;
  readonly #policyReloadErrors: Counter;
  readonly #policyLastReloadSuccess: Gauge;
  readonly #openConnections: Gauge;
  readonly #limitRefusals: Counter<'limit'>;
  readonly #connectionsClosed: Counter<'reason'>;
  #usage: UsageGetter = () => undefined;
  readonly #now: () => number;
  #svidExpiry: SvidExpiryGetter = () => undefined;
  #bundleAges: BundleAgesGetter = () => new Map();
  #audit: () => AuditStatsLike | undefined = () => undefined;
  /** Per-label children of the request-path counters, so a request does not hash its labels again. */
  readonly #requestChildren = new Map<number, { inc(): void }>();
  readonly #decisionChildren = new Map<string, { inc(): void }>();
  readonly #handshakeChildren = new Map<HandshakeResult, { inc(): void }>();

  constructor(options: ProxyMetricsOptions = {}) {
    this.#now = options.now ?? Date.now;
    const registry = new Registry();
    this.registry = registry;
    const registers = [registry];

    this.#handshakes = new Counter({
      name: 'ksp_handshakes_total',
      help: 'TLS handshakes on the data port, by result: ok (valid SVID), refused (no or invalid SVID), error (TLS failure), no_client_hello (closed or timed out before sending a byte).',
      labelNames: ['result'],
      registers,
    });
    // Every result shows from the first scrape, so rate() and ratios work before the first refusal.
    for (const result of HANDSHAKE_RESULTS) this.#handshakes.inc({ result }, 0);
    this.#handshakeDuration = new Histogram({
      name: 'ksp_handshake_duration_seconds',
      help: 'Duration of TLS handshakes on the data port that completed (ok or refused).',
      buckets: [...HANDSHAKE_BUCKETS],
      registers,
    });
    this.#authFailures = new Counter({
      name: 'ksp_authentication_failures_total',
      help: 'Clients refused before any request was read, by error code (e.g. ERR_X509_EXPIRED).',
      labelNames: ['code'],
      registers,
    });
    this.#decisions = new Counter({
      name: 'ksp_decisions_total',
      help: 'Policy decisions, by matching rule ("" when none), decision (allow or deny) and deny code ("" on allow).',
      labelNames: ['rule', 'decision', 'code'],
      registers,
    });
    this.#requests = new Counter({
      name: 'ksp_requests_total',
      help: 'Requests answered on the data port, by HTTP status code (from the proxy or kube-apiserver).',
      labelNames: ['code'],
      registers,
    });
    this.#requestDuration = new Histogram({
      name: 'ksp_request_duration_seconds',
      help: 'Duration of requests on the data port, until the response ended (watches last long).',
      buckets: [...REQUEST_BUCKETS],
      registers,
    });
    this.#policyGeneration = new Gauge({
      name: 'ksp_policy_generation',
      help: 'Generation of the policy in force: 1 after the first load, +1 with each change; 0 before the first load.',
      registers,
    });
    this.#policyReloadErrors = new Counter({
      name: 'ksp_policy_reload_errors_total',
      help: 'Policy reloads refused (the previous policy stays in force).',
      registers,
    });
    this.#policyLastReloadSuccess = new Gauge({
      name: 'ksp_policy_last_reload_success',
      help: '1 if the last policy load or reload succeeded, 0 if it failed or none happened yet.',
      registers,
    });
    const svidExpiry: Gauge = new Gauge({
      name: 'ksp_svid_expiry_seconds',
      help: "Seconds until the proxy's own X.509-SVID expires (negative once expired, 0 while it has none).",
      registers,
      collect: () => {
        const expiry = safely(this.#svidExpiry, undefined);
        svidExpiry.set(expiry === undefined ? 0 : (expiry.getTime() - this.#now()) / 1000);
      },
    });
    const bundleAge: Gauge<'trust_domain'> = new Gauge({
      name: 'ksp_bundle_age_seconds',
      help: 'Seconds since the X.509 bundle of each trust domain last changed.',
      labelNames: ['trust_domain'],
      registers,
      collect: () => {
        // Rebuilt at each scrape: a trust domain that left the getter's map leaves the metric too.
        bundleAge.reset();
        const now = this.#now();
        for (const [trustDomain, changed] of safely(this.#bundleAges, new Map<string, Date>())) {
          bundleAge.set({ trust_domain: trustDomain }, (now - changed.getTime()) / 1000);
        }
      },
    });
    this.#openConnections = new Gauge({
      name: 'ksp_open_connections',
      help: 'TLS connections currently open on the data port.',
      registers,
    });

    this.#limitRefusals = new Counter({
      name: 'ksp_limit_refusals_total',
      help: 'Requests or connections refused by a limit, by its configuration key (e.g. limits.maxLongRunningPerIdentity).',
      labelNames: ['limit'],
      registers,
    });
    this.#connectionsClosed = new Counter({
      name: 'ksp_connections_closed_by_proxy_total',
      help: 'Client connections the proxy closed itself, by reason: idle, unauthenticated, handshake_timeout, max_connections, shutdown.',
      labelNames: ['reason'],
      registers,
    });
    // Gauges read at scrape time from the usage getter, one value per label.
    const usageGauge = <L extends string>(
      name: string,
      help: string,
      label: L,
      values: (u: NonNullable<ReturnType<UsageGetter>>) => Record<string, number>,
    ): void => {
      const gauge: Gauge<L> = new Gauge({
        name,
        help,
        labelNames: [label],
        registers,
        collect: () => {
          const u = safely(this.#usage, undefined);
          if (u === undefined) return;
          for (const [value, n] of Object.entries(values(u))) {
            gauge.set({ [label]: value } as Partial<Record<L, string>>, n);
          }
        },
      });
    };
    usageGauge(
      'ksp_requests_in_flight',
      'Requests being forwarded now, by kind (ordinary or long_running).',
      'kind',
      (u) => ({ ordinary: u.inFlight.ordinary, long_running: u.inFlight.longRunning }),
    );
    usageGauge(
      'ksp_upstream_sessions',
      'HTTP/2 sessions open to kube-apiserver, by pool (ordinary or long_running).',
      'pool',
      (u) => ({ ordinary: u.upstream.ordinary.sessions, long_running: u.upstream.longRunning.sessions }),
    );
    usageGauge(
      'ksp_upstream_streams',
      'Streams in use on the HTTP/2 sessions to kube-apiserver, by pool.',
      'pool',
      (u) => ({ ordinary: u.upstream.ordinary.streams, long_running: u.upstream.longRunning.streams }),
    );

    const auditBuffered: Gauge = new Gauge({
      name: 'ksp_audit_buffered_bytes',
      help: 'Bytes of audit Events waiting for the audit destination (bounded by audit.bufferBytes).',
      registers,
      collect: () => auditBuffered.set(safely(this.#audit, undefined)?.bufferedBytes ?? 0),
    });
    // Counters read from the sink's own totals at each scrape: incremented by what changed since the last one.
    const auditTotal = (name: string, help: string, read: (s: AuditStatsLike) => number): void => {
      let reported = 0;
      const counter: Counter = new Counter({
        name,
        help,
        registers,
        collect: () => {
          const stats = safely(this.#audit, undefined);
          if (stats === undefined) return;
          const now = read(stats);
          if (now > reported) counter.inc(now - reported);
          reported = now;
        },
      });
    };
    auditTotal(
      'ksp_audit_events_dropped_total',
      'Audit Events that did not fit in audit.bufferBytes (or met a failed destination) and were dropped.',
      (s) => s.dropped,
    );
    auditTotal(
      'ksp_audit_write_errors_total',
      'Writes to the audit destination that failed (the sink counts as full until a write succeeds).',
      (s) => s.writeErrors,
    );

    if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: registry, prefix: 'ksp_' });
  }

  /** Prometheus text exposition format, with `contentType`. */
  get contentType(): string {
    return this.registry.contentType;
  }

  metrics(): Promise<string> {
    return this.registry.metrics();
  }

  /** `seconds` is the handshake's duration when it was measured (not for probes and TLS failures). */
  handshake(result: HandshakeResult, seconds?: number): void {
    let child = this.#handshakeChildren.get(result);
    if (child === undefined) {
      child = this.#handshakes.labels({ result });
      this.#handshakeChildren.set(result, child);
    }
    child.inc();
    if (seconds !== undefined) this.#handshakeDuration.observe(seconds);
  }

  authFailure(code: string): void {
    this.#authFailures.inc({ code });
  }

  /** `rule` undefined or '' when no rule matched; `code` is the deny code and is ignored when allowed. */
  decision(rule: string | undefined, allowed: boolean, code = ''): void {
    const key = `${allowed ? 'allow' : 'deny'}|${allowed ? '' : code}|${rule ?? ''}`;
    let child = this.#decisionChildren.get(key);
    if (child === undefined) {
      child = this.#decisions.labels({
        rule: rule ?? '',
        decision: allowed ? 'allow' : 'deny',
        code: allowed ? '' : code,
      });
      // Rules come and go with policy edits: the cache is bounded like the label set it mirrors.
      if (this.#decisionChildren.size >= CHILD_CACHE) this.#decisionChildren.clear();
      this.#decisionChildren.set(key, child);
    }
    child.inc();
  }

  request(status: number, seconds: number): void {
    let child = this.#requestChildren.get(status);
    if (child === undefined) {
      child = this.#requests.labels({ code: String(status) });
      this.#requestChildren.set(status, child);
    }
    child.inc();
    this.#requestDuration.observe(seconds);
  }

  /** The audit sink's buffer and drop counts, read at each scrape. */
  setAuditStats(getter: () => AuditStatsLike | undefined): void {
    this.#audit = getter;
  }

  /** A request or connection refused by the limit with this configuration key. */
  limitRefused(limit: string): void {
    this.#limitRefusals.inc({ limit });
  }

  connectionClosedByProxy(reason: string): void {
    this.#connectionsClosed.inc({ reason });
  }

  /** Read at each scrape. */
  setUsage(getter: UsageGetter): void {
    this.#usage = getter;
  }

  policyLoaded(generation: number): void {
    this.#policyGeneration.set(generation);
    this.#policyLastReloadSuccess.set(1);
  }

  policyReloadFailed(): void {
    this.#policyReloadErrors.inc();
    this.#policyLastReloadSuccess.set(0);
  }

  /** Read at each scrape. */
  setSvidExpiry(getter: SvidExpiryGetter): void {
    this.#svidExpiry = getter;
  }

  /** Read at each scrape. */
  setBundleAges(getter: BundleAgesGetter): void {
    this.#bundleAges = getter;
  }

  connectionOpened(): void {
    this.#openConnections.inc();
  }

  connectionClosed(): void {
    this.#openConnections.dec();
  }
}

/** A getter that throws must not fail the whole scrape: its metric reads as if it had nothing to report. */
function safely<T>(getter: () => T, fallback: T): T {
  try {
    return getter();
  } catch {
    return fallback;
  }
}
