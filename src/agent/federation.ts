/**
 * The agent's side of federation: it runs one `BundleFetcher` per configured trust domain, serves our bundle on
 * the bundle endpoint, keeps fetched and operator-set bundles in the state directory, and hands every change to
 * the agent, which pushes it to the workloads whose entries federate with that trust domain.
 *
 * Where a federated bundle comes from, in order: the state directory (the last one fetched, or one an operator
 * set with `kube-svid-proxy bundle set`), else the relationship's `bootstrapBundle` file. A restart therefore
 * never falls back to an old bootstrap bundle once a newer one was fetched.
 */
import type { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { StateDir } from '../config/statedir.ts';
import { BundleEndpointServer, type EndpointIdentity, type EndpointTls } from '../federation/endpoint.ts';
import { BundleFetcher, type Relationship, type RelationshipStatus } from '../federation/fetcher.ts';
import { FederationStore, type StoredBundle } from '../federation/store.ts';
import type { AgentMetrics, RelationshipReading } from '../observability/agent-metrics.ts';
import { SpiffeBundle } from '../spiffe/bundle.ts';
import { TrustDomain } from '../spiffe/id.ts';
import type { BundleEndpointSettings, RelationshipSettings } from './config-federation.ts';
import { AgentError, AgentErrorCode } from './errors.ts';

/** The file (in the state directory) where each relationship's last status is written for `bundle list`. */
export const FEDERATION_STATUS_FILE = 'federation-status.json';

export interface FederationOptions {
  readonly trustDomain: TrustDomain;
  readonly relationships: readonly RelationshipSettings[];
  readonly bundleEndpoint?: BundleEndpointSettings;
  /** Trust domains that have a static bundle file (federation.bundles): a stored `set` bundle never shadows one. */
  readonly staticTrustDomains: ReadonlySet<string>;
  readonly stateDir?: StateDir;
  /** Our bundle, as the bundle endpoint serves it. */
  readonly ownBundle: () => SpiffeBundle;
  /** Our endpoint SVID (https_spiffe); resolves with the current one. */
  readonly endpointIdentity?: () => Promise<EndpointIdentity>;
  /** A federated trust domain's bundle changed (or appeared). */
  readonly onBundle: (bundle: SpiffeBundle) => void;
  readonly metrics?: AgentMetrics;
  readonly logger: Logger;
}

/** What `bundle list` and `/readyz` show of one federated trust domain. */
export interface FederatedTrustDomain {
  readonly trustDomain: string;
  /** `endpoint` for a relationship; `set` for a bundle an operator set without one. */
  readonly kind: 'endpoint' | 'set';
  readonly status?: RelationshipStatus;
  readonly stored?: StoredBundle;
}

export class AgentFederation {
  readonly #options: FederationOptions;
  readonly #log: Logger;
  readonly #fetchers = new Map<string, BundleFetcher>();
  /** Bundles an operator set for trust domains without a relationship or a bundle file. */
  readonly #setOnly = new Map<string, StoredBundle>();
  /** Stored bundles of relationships that were removed from the configuration (warned about once). */
  readonly #ignored = new Set<string>();
  #store: FederationStore | undefined;
  #endpoint: BundleEndpointServer | undefined;
  #statusWrite: Promise<void> = Promise.resolve();
  #closed = false;

  private constructor(options: FederationOptions) {
    this.#options = options;
    this.#log = options.logger;
  }

  /** Restores stored bundles, starts the fetchers and the bundle endpoint. Throws on unusable configuration. */
  static async start(options: FederationOptions): Promise<AgentFederation> {
    const federation = new AgentFederation(options);
    try {
      await federation.#init();
    } catch (err) {
      await federation.close();
      throw err;
    }
    return federation;
  }

  async #init(): Promise<void> {
    const o = this.#options;
    if (o.stateDir) this.#store = await FederationStore.open(o.stateDir);
    o.metrics?.readRelationships(() => this.#readings());
    for (const rel of o.relationships) {
      const initial = await this.#initialFor(rel);
      const relationship: Relationship = {
        trustDomain: rel.trustDomain,
        url: rel.url,
        fetch:
          rel.profile === 'https_web'
            ? { profile: 'https_web', ...(rel.caFile ? { caFile: rel.caFile } : {}) }
            : { profile: 'https_spiffe', endpointSpiffeId: rel.endpointSpiffeId },
      };
      const fetcher = new BundleFetcher({
        relationship,
        ...(initial ? { initial } : {}),
        ...(this.#store ? { store: this.#store } : {}),
        logger: this.#log,
      });
      const name = rel.trustDomain.name;
      o.metrics?.declare(name);
      this.#lastBundle.set(name, initial?.bundle.marshal() ?? '');
      fetcher.on('bundle', (bundle) => o.onBundle(bundle));
      fetcher.on('status', (status) => this.#onStatus(status));
      this.#fetchers.set(name, fetcher);
      if (initial) {
        this.#log.info(
          { trustDomain: name, source: initial.source, fetchedAt: initial.fetchedAt.toISOString() },
          'federated bundle restored',
        );
        o.onBundle(initial.bundle);
      } else {
        // Only https_web gets here: an https_spiffe relationship without a bundle is refused by the fetcher.
        this.#log.info(
          { trustDomain: name, url: rel.url },
          'no bundle yet for this trust domain: fetching it',
        );
      }
    }
    await this.#loadSetOnly();
    if (o.bundleEndpoint) this.#endpoint = await this.#startEndpoint(o.bundleEndpoint);
    for (const fetcher of this.#fetchers.values()) fetcher.start();
  }

  /** The stored bundle, else the bootstrap file (https_spiffe), else nothing. */
  async #initialFor(rel: RelationshipSettings): Promise<StoredBundle | undefined> {
    const stored = await this.#store?.load(rel.trustDomain);
    if (stored) return stored;
    if (rel.profile !== 'https_spiffe' || rel.bootstrapBundle === undefined) return undefined;
    const file = rel.bootstrapBundle;
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Config,
        `federation.trustDomains.${rel.trustDomain.name}.bootstrapBundle: cannot read ${file}: ${(err as Error).message}`,
        { cause: err },
      );
    }
    try {
      return {
        bundle: SpiffeBundle.parse(rel.trustDomain, text),
        source: 'bootstrap',
        fetchedAt: new Date(),
      };
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Config,
        `federation.trustDomains.${rel.trustDomain.name}.bootstrapBundle ${file}: ${(err as Error).message}`,
        { cause: err },
      );
    }
  }

  /** Bundles set by an operator for trust domains that have neither a relationship nor a bundle file. */
  async #loadSetOnly(): Promise<void> {
    const store = this.#store;
    if (store === undefined) return;
    const own = this.#options.trustDomain.name;
    for (const stored of await store.list()) {
      const name = stored.bundle.trustDomain.name;
      if (name === own || this.#fetchers.has(name) || this.#options.staticTrustDomains.has(name)) continue;
      if (stored.source !== 'set') {
        // Fetched for a relationship that is no longer configured: never trusted again by itself.
        if (!this.#ignored.has(name)) {
          this.#ignored.add(name);
          this.#log.warn(
            { trustDomain: name, source: stored.source, file: store.path },
            'stored bundle of a trust domain no longer in federation.trustDomains: ignored (delete its file to clean up)',
          );
        }
        continue;
      }
      const held = this.#setOnly.get(name);
      if (held?.bundle.equals(stored.bundle)) continue;
      this.#setOnly.set(name, stored);
      this.#log.info(
        { trustDomain: name, source: stored.source },
        'federated bundle loaded from the state directory',
      );
      this.#options.onBundle(stored.bundle);
    }
  }

  async #startEndpoint(settings: BundleEndpointSettings): Promise<BundleEndpointServer> {
    const o = this.#options;
    let tls: EndpointTls;
    if (settings.tls.profile === 'https_spiffe') {
      if (o.endpointIdentity === undefined)
        throw new Error('https_spiffe bundle endpoint without an identity');
      tls = { profile: 'https_spiffe', identity: await o.endpointIdentity() };
    } else {
      tls = { profile: 'https_web', certFile: settings.tls.certFile, keyFile: settings.tls.keyFile };
    }
    const server = await BundleEndpointServer.start({
      host: settings.listen.host,
      port: settings.listen.port,
      path: settings.path,
      tls,
      bundle: o.ownBundle,
      refreshHintSeconds: settings.refreshHintSeconds,
      logger: this.#log,
    });
    if (settings.tls.profile === 'https_spiffe') {
      this.#log.info(
        { spiffeId: settings.tls.spiffeId.toString() },
        'bundle endpoint serves with this SPIFFE ID: peers configure it as the endpoint SPIFFE ID',
      );
    }
    return server;
  }

  /** The bundle endpoint's address (tests; the log has it too). */
  get endpointAddress(): { host: string; port: number } | undefined {
    return this.#endpoint?.address;
  }

  /** Our endpoint SVID rotated (https_spiffe): new handshakes present the new one. */
  setEndpointIdentity(identity: {
    certificates: readonly X509Certificate[];
    privateKey: EndpointIdentity['privateKey'];
  }): void {
    this.#endpoint?.setIdentity(identity);
  }

  #onStatus(status: RelationshipStatus): void {
    const metrics = this.#options.metrics;
    const held = status.bundle?.marshal() ?? '';
    const before = this.#lastBundle.get(status.trustDomain);
    this.#lastBundle.set(status.trustDomain, held);
    const attempt = status.lastAttempt?.getTime();
    // setBundle (an operator's bundle) reports a status too, without an attempt of its own: count attempts only.
    if (metrics && attempt !== undefined && attempt !== this.#lastAttempt.get(status.trustDomain)) {
      this.#lastAttempt.set(status.trustDomain, attempt);
      if (status.consecutiveFailures > 0) {
        metrics.fetched(status.trustDomain, 'error', status.lastError?.code);
      } else {
        metrics.fetched(status.trustDomain, before === held ? 'unchanged' : 'updated');
      }
    }
    // The fetcher stores a bundle when it changes; an unchanged one is stored again with the time it was
    // confirmed, so that after a restart its age counts from the last success, not from the last change.
    const store = this.#store;
    if (
      store &&
      status.bundle &&
      status.source === 'endpoint' &&
      status.lastSuccess !== undefined &&
      status.lastSuccess.getTime() === attempt &&
      before === held
    ) {
      const bundle = status.bundle;
      const stored = { bundle, source: 'endpoint' as const, fetchedAt: status.lastSuccess, url: status.url };
      this.#statusWrite = this.#statusWrite
        .then(() => store.save(bundle.trustDomain, stored))
        .catch((err: unknown) => {
          this.#log.warn(
            { err: { message: (err as Error).message } },
            'federated bundle could not be stored',
          );
        });
    }
    this.#writeStatus();
  }

  /** Per trust domain: the bundle held after the last status, and the time of the last attempt counted. */
  readonly #lastBundle = new Map<string, string>();
  readonly #lastAttempt = new Map<string, number>();

  /** Writes every relationship's status to the state directory, one write after another. */
  #writeStatus(): void {
    const dir = this.#options.stateDir;
    if (dir === undefined || this.#closed) return;
    const text = `${JSON.stringify(
      [...this.#fetchers.values()].map((f) => statusJson(f.status)),
      null,
      2,
    )}\n`;
    this.#statusWrite = this.#statusWrite
      .then(() => dir.write(FEDERATION_STATUS_FILE, text))
      .catch((err: unknown) => {
        this.#log.warn(
          { err: { message: (err as Error).message } },
          'federation status could not be written',
        );
      });
  }

  #readings(): RelationshipReading[] {
    return [...this.#fetchers.values()].map((f) => {
      const s = f.status;
      return {
        trustDomain: s.trustDomain,
        ...(s.lastSuccess ? { lastSuccess: s.lastSuccess } : {}),
        ...(s.bundle?.sequence !== undefined ? { sequence: s.bundle.sequence } : {}),
        hasBundle: s.bundle !== undefined,
      };
    });
  }

  /** Every federated trust domain this module manages, sorted by name. */
  list(): FederatedTrustDomain[] {
    const out: FederatedTrustDomain[] = [
      ...[...this.#fetchers.values()].map((f) => ({
        trustDomain: f.status.trustDomain,
        kind: 'endpoint' as const,
        status: f.status,
      })),
      ...[...this.#setOnly.values()].map((stored) => ({
        trustDomain: stored.bundle.trustDomain.name,
        kind: 'set' as const,
        stored,
      })),
    ];
    return out.sort((a, b) => (a.trustDomain < b.trustDomain ? -1 : a.trustDomain > b.trustDomain ? 1 : 0));
  }

  /**
   * SIGHUP: takes bundles an operator set since (`bundle set`), fetches every endpoint now, and re-reads the
   * bundle endpoint's https_web certificate. A stored bundle
   * whose source is `set` replaces a relationship's held bundle when it differs: that is how an operator repairs
   * an https_spiffe relationship whose endpoint can no longer be authenticated.
   */
  async reload(): Promise<void> {
    const store = this.#store;
    if (store) {
      for (const [name, fetcher] of this.#fetchers) {
        let stored: StoredBundle | undefined;
        try {
          stored = await store.load(TrustDomain.parse(name));
        } catch (err) {
          this.#log.error(
            { trustDomain: name, err: { message: (err as Error).message } },
            'stored federated bundle rejected',
          );
          continue;
        }
        if (stored?.source === 'set' && !(fetcher.bundle && stored.bundle.equals(fetcher.bundle))) {
          this.#log.info(
            { trustDomain: name },
            'federated bundle set by an operator; it replaces the held one',
          );
          fetcher.setBundle(stored);
        }
      }
      try {
        await this.#loadSetOnly();
      } catch (err) {
        this.#log.error({ err: { message: (err as Error).message } }, 'stored federated bundles rejected');
      }
    }
    await Promise.all([
      ...[...this.#fetchers.values()].map((f) => f.refreshNow()),
      // https_web: re-read the certificate and key now (a renewed certificate without waiting for the poll).
      this.#endpoint?.reload(),
    ]);
  }

  /** Fetches every endpoint now (tests, SIGHUP). */
  refreshNow(): Promise<RelationshipStatus[]> {
    return Promise.all([...this.#fetchers.values()].map((f) => f.refreshNow()));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const fetcher of this.#fetchers.values()) fetcher.close();
    await this.#endpoint?.close();
    await this.#statusWrite;
  }
}

/** A relationship's status as `federation-status.json` keeps it (read by `kube-svid-proxy bundle list`). */
export function statusJson(status: RelationshipStatus): Record<string, unknown> {
  return {
    trustDomain: status.trustDomain,
    url: status.url,
    profile: status.profile,
    ...(status.source ? { source: status.source } : {}),
    ...(status.bundle?.sequence !== undefined ? { sequence: status.bundle.sequence.toString() } : {}),
    ...(status.bundle ? { x509Authorities: status.bundle.x509Authorities.length } : {}),
    ...(status.lastSuccess ? { lastSuccess: status.lastSuccess.toISOString() } : {}),
    ...(status.lastAttempt ? { lastAttempt: status.lastAttempt.toISOString() } : {}),
    ...(status.lastError
      ? {
          lastError: {
            code: status.lastError.code,
            message: status.lastError.message,
            at: status.lastError.at.toISOString(),
          },
        }
      : {}),
    ...(status.nextAttempt ? { nextAttempt: status.nextAttempt.toISOString() } : {}),
    consecutiveFailures: status.consecutiveFailures,
  };
}
