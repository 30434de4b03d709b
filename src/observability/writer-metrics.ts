import { Counter, collectDefaultMetrics, Gauge, Registry } from 'prom-client';

export const WRITE_RESULTS = ['written', 'unchanged', 'error'] as const;
/** written: the Secret was replaced; unchanged: it held the current credential already; error: see the code. */
export type WriteResult = (typeof WRITE_RESULTS)[number];

/** One managed Secret as the gauges read it at scrape time. */
export interface SecretReading {
  /** `namespace/name`. */
  readonly secret: string;
  /** When the certificate the Secret holds (as last read or written) expires. */
  readonly expires?: Date;
  readonly lastSuccess?: Date;
}

/** The credential writer's Prometheus metrics. Labels are bounded by writer.yaml (Secrets) and our codes. */
export class WriterMetrics {
  readonly registry: Registry;
  readonly #syncs: Counter<'secret' | 'result'>;
  readonly #errors: Counter<'secret' | 'code'>;
  #reading: () => { svidExpiry?: Date; secrets: readonly SecretReading[] } = () => ({ secrets: [] });

  constructor(options: { readonly defaultMetrics?: boolean } = {}) {
    const registry = new Registry();
    this.registry = registry;
    const registers = [registry];
    this.#syncs = new Counter({
      name: 'ksp_writer_syncs_total',
      help: 'Syncs of a managed Secret, by Secret (namespace/name) and result: written, unchanged, error.',
      labelNames: ['secret', 'result'],
      registers,
    });
    this.#errors = new Counter({
      name: 'ksp_writer_errors_total',
      help: 'Failed syncs of a managed Secret, by Secret and error code (ERR_WRITER_*).',
      labelNames: ['secret', 'code'],
      registers,
    });
    const self = this;
    new Gauge({
      name: 'ksp_writer_secret_cert_expiry_timestamp_seconds',
      help:
        'When the certificate a managed Secret holds expires, Unix time. Its readers fail after it: alert when ' +
        'it comes closer than half the SVID lifetime (the writer should have replaced it at half-life).',
      labelNames: ['secret'],
      registers,
      collect() {
        this.reset();
        for (const s of self.#reading().secrets)
          if (s.expires) this.set({ secret: s.secret }, s.expires.getTime() / 1000);
      },
    });
    new Gauge({
      name: 'ksp_writer_last_success_timestamp_seconds',
      help: 'When a managed Secret was last confirmed or written with the current credential, Unix time.',
      labelNames: ['secret'],
      registers,
      collect() {
        this.reset();
        for (const s of self.#reading().secrets) {
          if (s.lastSuccess) this.set({ secret: s.secret }, s.lastSuccess.getTime() / 1000);
        }
      },
    });
    new Gauge({
      name: 'ksp_writer_svid_expiry_timestamp_seconds',
      help: "When the writer's current X.509-SVID expires, Unix time. Absent without one.",
      registers,
      collect() {
        this.reset();
        const expiry = self.#reading().svidExpiry;
        if (expiry) this.set(expiry.getTime() / 1000);
      },
    });
    if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: registry, prefix: 'ksp_' });
  }

  read(getter: () => { svidExpiry?: Date; secrets: readonly SecretReading[] }): void {
    this.#reading = getter;
  }

  sync(secret: string, result: WriteResult, code?: string): void {
    this.#syncs.inc({ secret, result });
    if (code !== undefined) this.#errors.inc({ secret, code });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  metrics(): Promise<string> {
    return this.registry.metrics();
  }
}
