import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';

/** What the scrape-time gauges read from a running client. */
export interface ClientReading {
  /** When the SVID presented now expires; undefined without one. */
  readonly svidExpiry?: Date;
  readonly spokes: readonly {
    readonly name: string;
    readonly connections: number;
    readonly sessions: number;
    readonly tunnels: number;
  }[];
}

export interface ClientMetricsOptions {
  /** Process and Node.js metrics, prefixed `ksp_`. Default true. */
  readonly defaultMetrics?: boolean;
}

/**
 * The client mode's Prometheus metrics. Labels are bounded: spoke names come from client.yaml, codes are HTTP
 * status codes or our own error codes.
 */
export class ClientMetrics {
  readonly registry: Registry;
  readonly #requests: Counter<'spoke' | 'code'>;
  readonly #upgrades: Counter<'spoke' | 'code'>;
  readonly #refusals: Counter<'spoke' | 'code'>;
  readonly #connects: Counter<'spoke' | 'result'>;
  readonly #rotations: Counter;
  #reading: () => ClientReading = () => ({ spokes: [] });

  constructor(options: ClientMetricsOptions = {}) {
    const registry = new Registry();
    this.registry = registry;
    const registers = [registry];
    this.#requests = new Counter({
      name: 'ksp_client_requests_total',
      help: "Requests forwarded to a spoke, by spoke and the status code the caller got (the spoke's, or ours on a refusal).",
      labelNames: ['spoke', 'code'],
      registers,
    });
    this.#upgrades = new Counter({
      name: 'ksp_client_upgrades_total',
      help: 'Upgrade requests (exec, attach, port-forward) tunnelled to a spoke, by spoke and outcome ("tunnel", or our status code).',
      labelNames: ['spoke', 'code'],
      registers,
    });
    this.#refusals = new Counter({
      name: 'ksp_client_refusals_total',
      help: 'Requests the client mode answered itself, by spoke and error code (ERR_CLIENT_*).',
      labelNames: ['spoke', 'code'],
      registers,
    });
    this.#connects = new Counter({
      name: 'ksp_client_upstream_connects_total',
      help: 'TLS connections opened to a spoke, by result: ok, refused (the server is not who it must be), error.',
      labelNames: ['spoke', 'result'],
      registers,
    });
    this.#rotations = new Counter({
      name: 'ksp_client_svid_rotations_total',
      help: 'Times the Workload API gave a new X.509-SVID; new connections present it, open ones carry on.',
      registers,
    });
    const self = this;
    new Gauge({
      name: 'ksp_client_svid_expiry_timestamp_seconds',
      help: 'When the X.509-SVID presented to spokes expires, Unix time. Absent without one.',
      registers,
      collect() {
        this.reset();
        const expiry = self.#reading().svidExpiry;
        if (expiry) this.set(expiry.getTime() / 1000);
      },
    });
    const perSpoke = (name: string, help: string, key: 'connections' | 'sessions' | 'tunnels'): void => {
      new Gauge({
        name,
        help,
        labelNames: ['spoke'],
        registers,
        collect() {
          this.reset();
          for (const spoke of self.#reading().spokes) this.set({ spoke: spoke.name }, spoke[key]);
        },
      });
    };
    perSpoke('ksp_client_connections', "Local connections open on a spoke's listener.", 'connections');
    perSpoke(
      'ksp_client_upstream_sessions',
      'HTTP/2 sessions open to a spoke, retired ones still carrying streams included.',
      'sessions',
    );
    perSpoke(
      'ksp_client_tunnels',
      'Upgraded connections (exec, attach, port-forward) open to a spoke.',
      'tunnels',
    );
    if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: registry, prefix: 'ksp_' });
  }

  read(getter: () => ClientReading): void {
    this.#reading = getter;
  }

  request(spoke: string, code: number): void {
    this.#requests.inc({ spoke, code: String(code) });
  }

  upgrade(spoke: string, code: number | 'tunnel'): void {
    this.#upgrades.inc({ spoke, code: String(code) });
  }

  refusal(spoke: string, code: string): void {
    this.#refusals.inc({ spoke, code });
  }

  connect(spoke: string, result: 'ok' | 'refused' | 'error'): void {
    this.#connects.inc({ spoke, result });
  }

  rotated(): void {
    this.#rotations.inc();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  metrics(): Promise<string> {
    return this.registry.metrics();
  }
}
