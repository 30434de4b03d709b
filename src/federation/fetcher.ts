/**
 * One SPIFFE Federation relationship, kept alive (SPIFFE Federation §6): fetch the foreign trust domain's bundle
 * from its bundle endpoint, poll again at the bundle's refresh hint, and hold the last good bundle through any
 * failure. What the endpoint serves is always taken as the bundle of the relationship's configured trust domain
 * (§7.2, §7.3): a bundle does not say whose it is, so the configuration is the only safe source of that name.
 *
 * Stricter than the specification allows, on purpose: redirects are not followed (§5.2.1.4 says clients SHOULD;
 * §7.5.1 lets operators disable them, and a configured final URL leaves nothing to an HTTP answer), there is never
 * a fallback between profiles (§7.1), a bundle whose `spiffe_sequence` is lower than the held one's is refused as
 * a replay, and an `https_spiffe` endpoint must be self-serving (its SPIFFE ID in the relationship's trust domain).
 */
import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { isIP } from 'node:net';
import { type TLSSocket, connect as tlsConnect } from 'node:tls';
import type { Logger } from '../observability/logger.ts';
import { SpiffeBundle } from '../spiffe/bundle.ts';
import { isKspError } from '../spiffe/errors.ts';
import type { SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { parseCertificates, presentedIntermediates, verifyX509Svid } from '../spiffe/x509svid.ts';
import { FederationError, FederationErrorCode } from './errors.ts';
import type { FederationStore, StoredBundle } from './store.ts';

/** How the bundle endpoint is authenticated (SPIFFE Federation §5.2). */
export type FetchProfile =
  /** Web PKI: Node.js's default CA store, or only the CAs of `caFile` when given; the URL's host is verified. */
  | { readonly profile: 'https_web'; readonly caFile?: string }
  /**
   * SPIFFE authentication: the server must present an X509-SVID for exactly `endpointSpiffeId`, chaining to the
   * current bundle of the relationship's trust domain (the bootstrap bundle at first, then the latest fetched).
   */
  | { readonly profile: 'https_spiffe'; readonly endpointSpiffeId: SpiffeId };

/** The three parameters of §5.1, plus the profile's own. */
export interface Relationship {
  readonly trustDomain: TrustDomain;
  /** `https:` only, without userinfo. */
  readonly url: string;
  readonly fetch: FetchProfile;
}

export interface RelationshipStatus {
  readonly trustDomain: string;
  readonly url: string;
  readonly profile: FetchProfile['profile'];
  readonly bundle?: SpiffeBundle;
  readonly source?: StoredBundle['source'];
  /** The last fetch that succeeded (or, for a bundle restored from a fetch, when it was fetched). */
  readonly lastSuccess?: Date;
  readonly lastAttempt?: Date;
  /** The last failure; kept after a later success, so compare `at` with `lastSuccess`. */
  readonly lastError?: { readonly code: string; readonly message: string; readonly at: Date };
  /** When the next fetch is due; polling only happens after `start()`. */
  readonly nextAttempt?: Date;
  /** Failed attempts since the last success. */
  readonly consecutiveFailures: number;
}

export interface RefreshOptions {
  /** The refresh hint is raised to this (default 30 s). */
  readonly minSeconds?: number;
  /** The refresh hint is lowered to this (default 3600 s). */
  readonly maxSeconds?: number;
  /** The poll interval of a bundle without a hint (default 300 s, as SPIFFE Federation §4.1 recommends). */
  readonly defaultSeconds?: number;
  /** The first retry after a failure (default 5 s), doubling on each further failure up to the poll interval. */
  readonly retrySeconds?: number;
}

export interface BundleFetcherOptions {
  readonly relationship: Relationship;
  /** The bundle held at start: restored from the store, else the bootstrap bundle (required for https_spiffe). */
  readonly initial?: StoredBundle;
  /** Where every accepted new bundle is saved. */
  readonly store?: FederationStore;
  readonly logger: Logger;
  readonly now?: () => Date;
  readonly refresh?: RefreshOptions;
  /** Connection, handshake, response and body together, default 10 000 ms. */
  readonly timeoutMs?: number;
  /** Larger bodies are refused, default 1 MiB. */
  readonly maxBytes?: number;
}

export interface BundleFetcherEvents {
  /** The held bundle changed (a new one fetched, or one set). */
  bundle: [SpiffeBundle];
  /** After every attempt, and after `setBundle`. */
  status: [RelationshipStatus];
}

export const DEFAULT_REFRESH: Required<RefreshOptions> = Object.freeze({
  minSeconds: 30,
  maxSeconds: 3600,
  defaultSeconds: 300,
  retrySeconds: 5,
});
export const DEFAULT_FETCH_TIMEOUT_MS = 10_000;
export const DEFAULT_MAX_BUNDLE_BYTES = 1024 * 1024;
const MAX_TIMER_MS = 2 ** 31 - 1;

/** OpenSSL's certificate verification results as Node.js names them, and its host name check. */
const UNTRUSTED_CODES: ReadonlySet<string> = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

function configError(message: string, cause?: unknown): FederationError {
  return new FederationError(FederationErrorCode.Config, message, { cause });
}

function checkRefresh(r: RefreshOptions | undefined): Required<RefreshOptions> {
  const o = { ...DEFAULT_REFRESH, ...r };
  for (const [name, value] of Object.entries(o)) {
    if (!(Number.isFinite(value) && value > 0))
      throw configError(`refresh.${name} must be > 0, got ${value}`);
  }
  if (o.minSeconds > o.maxSeconds) {
    throw configError(`refresh.minSeconds (${o.minSeconds}) is above refresh.maxSeconds (${o.maxSeconds})`);
  }
  if (o.maxSeconds * 1000 > MAX_TIMER_MS)
    throw configError(`refresh.maxSeconds is above ${MAX_TIMER_MS / 1000}`);
  return o;
}

/** §5.2.1.1 and §5.2.2.1: `https`, no userinfo. */
function checkUrl(relationship: Relationship): URL {
  let url: URL;
  try {
    url = new URL(relationship.url);
  } catch (cause) {
    throw configError(
      `federation with "${relationship.trustDomain}": "${relationship.url}" is not a URL`,
      cause,
    );
  }
  if (url.protocol !== 'https:') {
    throw configError(
      `federation with "${relationship.trustDomain}": the bundle endpoint URL must be https:, got ${url.protocol}`,
    );
  }
  if (url.username !== '' || url.password !== '') {
    throw configError(
      `federation with "${relationship.trustDomain}": the bundle endpoint URL must not carry userinfo`,
    );
  }
  return url;
}

/** Fetches the bundle of one federated trust domain and keeps it fresh. */
export class BundleFetcher extends EventEmitter<BundleFetcherEvents> {
  readonly relationship: Relationship;
  readonly #url: URL;
  readonly #store: FederationStore | undefined;
  readonly #log: Logger;
  readonly #now: () => Date;
  readonly #refresh: Required<RefreshOptions>;
  readonly #timeoutMs: number;
  readonly #maxBytes: number;
  #held: StoredBundle | undefined;
  #status: RelationshipStatus;
  #inflight: Promise<RelationshipStatus> | undefined;
  #abort: AbortController | undefined;
  #timer: NodeJS.Timeout | undefined;
  #started = false;
  #closed = false;

  /** Throws `ERR_FEDERATION_CONFIG` for a relationship that cannot work. */
  constructor(o: BundleFetcherOptions) {
    super();
    const { relationship, initial } = o;
    const td = relationship.trustDomain;
    this.relationship = relationship;
    this.#url = checkUrl(relationship);
    this.#refresh = checkRefresh(o.refresh);
    this.#timeoutMs = o.timeoutMs ?? DEFAULT_FETCH_TIMEOUT_MS;
    this.#maxBytes = o.maxBytes ?? DEFAULT_MAX_BUNDLE_BYTES;
    if (!(this.#timeoutMs > 0)) throw configError(`timeoutMs must be > 0, got ${this.#timeoutMs}`);
    if (!(Number.isSafeInteger(this.#maxBytes) && this.#maxBytes > 0)) {
      throw configError(`maxBytes must be a whole number > 0, got ${this.#maxBytes}`);
    }
    if (initial !== undefined && !initial.bundle.trustDomain.equals(td)) {
      throw configError(
        `federation with "${td}": the initial bundle is the bundle of "${initial.bundle.trustDomain}"`,
      );
    }
    const fetch = relationship.fetch;
    if (fetch.profile === 'https_spiffe') {
      const id = fetch.endpointSpiffeId;
      if (!id.isMemberOf(td)) {
        // A non-self-serving endpoint needs the current bundle of another trust domain, which this fetcher does
        // not have; federate with that trust domain's own endpoint, or serve this bundle from a self-serving one.
        throw configError(
          `federation with "${td}": endpoint SPIFFE ID ${id} is in trust domain "${id.trustDomain}"; only ` +
            `self-serving https_spiffe endpoints (an endpoint ID in "${td}") are supported`,
        );
      }
      if (id.isRoot) {
        throw configError(
          `federation with "${td}": endpoint SPIFFE ID ${id} names a trust domain, not a server`,
        );
      }
      if (initial === undefined || initial.bundle.x509Authorities.length === 0) {
        throw configError(
          `federation with "${td}" (https_spiffe): a bootstrap bundle with X.509 authorities is required to ` +
            `authenticate the endpoint ${id} on the first fetch`,
        );
      }
    }
    this.#store = o.store;
    this.#log = o.logger.child({ trustDomain: td.name, url: relationship.url, profile: fetch.profile });
    this.#now = o.now ?? (() => new Date());
    this.#held = initial;
    this.#status = Object.freeze({
      trustDomain: td.name,
      url: relationship.url,
      profile: fetch.profile,
      consecutiveFailures: 0,
      ...(initial === undefined
        ? {}
        : {
            bundle: initial.bundle,
            source: initial.source,
            ...(initial.source === 'endpoint' ? { lastSuccess: initial.fetchedAt } : {}),
          }),
    });
  }

  get status(): RelationshipStatus {
    return this.#status;
  }

  /** The bundle held, undefined until one is fetched when there was no initial one. */
  get bundle(): SpiffeBundle | undefined {
    return this.#held?.bundle;
  }

  /** Fetches now, then polls at the refresh hint (retrying with backoff after failures). Timers are unref'd. */
  start(): void {
    if (this.#started || this.#closed) return;
    this.#started = true;
    void this.refreshNow();
  }

  /**
   * One fetch now (SIGHUP, tests); resolves with the status after it. Never rejects: a failure is in the status.
   * While a fetch is running, resolves with that one's outcome.
   */
  refreshNow(): Promise<RelationshipStatus> {
    if (this.#closed) return Promise.resolve(this.#status);
    this.#inflight ??= this.#attempt().finally(() => {
      this.#inflight = undefined;
      this.#arm();
    });
    return this.#inflight;
  }

  /**
   * Replaces the held bundle, whatever its sequence (SPIFFE Federation §4.2: an operator's local update counts as
   * the latest until a later refresh replaces it). For https_spiffe it becomes the anchor the endpoint is
   * authenticated with. Not saved: the caller (an operator's `bundle set`) has already written the store.
   * Throws `ERR_FEDERATION_BUNDLE` for another trust domain's bundle or one without X.509 authorities.
   */
  setBundle(stored: StoredBundle): void {
    const td = this.relationship.trustDomain;
    if (!stored.bundle.trustDomain.equals(td)) {
      throw new FederationError(
        FederationErrorCode.Bundle,
        `the bundle of "${stored.bundle.trustDomain}" cannot be set for the federation with "${td}"`,
      );
    }
    if (stored.bundle.x509Authorities.length === 0) {
      throw new FederationError(
        FederationErrorCode.Bundle,
        `the bundle set for "${td}" has no X.509 authority`,
      );
    }
    const changed = this.#held === undefined || !this.#held.bundle.equals(stored.bundle);
    this.#held = stored;
    this.#log.info(
      { source: stored.source, sequence: stored.bundle.sequence?.toString(), changed },
      'federated bundle set',
    );
    this.#update({ bundle: stored.bundle, source: stored.source });
    if (changed) this.emit('bundle', stored.bundle);
    this.emit('status', this.#status);
  }

  /** Stops polling and abandons a fetch in flight; no event follows. */
  close(): void {
    this.#closed = true;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#abort?.abort();
  }

  /** The poll interval: the held bundle's refresh hint, bounded. */
  #pollSeconds(): number {
    const { minSeconds, maxSeconds, defaultSeconds } = this.#refresh;
    const hint = this.#held?.bundle.refreshHint ?? defaultSeconds;
    return Math.min(maxSeconds, Math.max(minSeconds, hint));
  }

  /** §6.2 asks not to retry aggressively: doubling from `retrySeconds`, never beyond the poll interval. */
  #retrySeconds(failures: number): number {
    const poll = this.#pollSeconds();
    return Math.min(poll, this.#refresh.retrySeconds * 2 ** Math.min(failures - 1, 30));
  }

  #update(patch: Partial<RelationshipStatus>): void {
    this.#status = Object.freeze({ ...this.#status, ...patch });
  }

  #arm(): void {
    if (!this.#started || this.#closed) return;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    const due = this.#status.nextAttempt?.getTime() ?? this.#now().getTime();
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, due - this.#now().getTime()));
    this.#timer = setTimeout(() => void this.refreshNow(), delay);
    this.#timer.unref();
  }

  async #attempt(): Promise<RelationshipStatus> {
    const attemptAt = this.#now();
    const abort = new AbortController();
    this.#abort = abort;
    let outcome: 'new' | 'unchanged' | FederationError;
    try {
      const bundle = await this.#fetch(abort.signal);
      outcome = await this.#accept(bundle);
    } catch (err) {
      outcome =
        err instanceof FederationError
          ? err
          : new FederationError(FederationErrorCode.Fetch, `fetch failed: ${(err as Error).message}`, {
              cause: err,
            });
    }
    if (this.#closed) return this.#status;
    const now = this.#now();
    if (outcome instanceof FederationError) {
      const failures = this.#status.consecutiveFailures + 1;
      const nextAttempt = new Date(now.getTime() + this.#retrySeconds(failures) * 1000);
      this.#update({
        lastAttempt: attemptAt,
        lastError: { code: outcome.code, message: outcome.message, at: now },
        consecutiveFailures: failures,
        nextAttempt,
      });
      const level = outcome.code === FederationErrorCode.Fetch ? 'warn' : 'error';
      this.#log[level](
        {
          code: outcome.code,
          err: { message: outcome.message },
          consecutiveFailures: failures,
          nextAttempt: nextAttempt.toISOString(),
          holding:
            this.#held?.bundle.sequence?.toString() ?? (this.#held ? 'a bundle without sequence' : 'none'),
        },
        'federated bundle fetch failed; keeping the bundle held',
      );
    } else {
      const nextAttempt = new Date(now.getTime() + this.#pollSeconds() * 1000);
      this.#update({
        ...(this.#held === undefined ? {} : { bundle: this.#held.bundle, source: this.#held.source }),
        lastAttempt: attemptAt,
        lastSuccess: now,
        consecutiveFailures: 0,
        nextAttempt,
      });
      if (outcome === 'new') {
        this.#log.info(
          {
            sequence: this.#held?.bundle.sequence?.toString(),
            x509Authorities: this.#held?.bundle.x509Authorities.length,
            jwtAuthorities: this.#held?.bundle.jwtAuthorities.size,
            nextAttempt: nextAttempt.toISOString(),
          },
          'federated bundle updated',
        );
        if (this.#held !== undefined) this.emit('bundle', this.#held.bundle);
      } else {
        this.#log.debug({ nextAttempt: nextAttempt.toISOString() }, 'federated bundle unchanged');
      }
    }
    this.emit('status', this.#status);
    return this.#status;
  }

  /** Takes a fetched bundle, or throws `ERR_FEDERATION_BUNDLE` saying why it cannot replace the held one. */
  async #accept(bundle: SpiffeBundle): Promise<'new' | 'unchanged'> {
    const td = this.relationship.trustDomain;
    if (bundle.x509Authorities.length === 0) {
      throw new FederationError(
        FederationErrorCode.Bundle,
        `the bundle served for "${td}" has no X.509 authority`,
      );
    }
    const held = this.#held?.bundle;
    if (held?.sequence !== undefined && bundle.sequence !== undefined && bundle.sequence < held.sequence) {
      throw new FederationError(
        FederationErrorCode.Bundle,
        `the bundle served for "${td}" has spiffe_sequence ${bundle.sequence}, below the held ${held.sequence}: ` +
          'sequence went backwards (a replayed older bundle, or the foreign trust domain reset its sequence; ' +
          'an operator can set its bundle by hand)',
      );
    }
    if (held?.equals(bundle)) return 'unchanged';
    const stored: StoredBundle = {
      bundle,
      source: 'endpoint',
      fetchedAt: this.#now(),
      url: this.relationship.url,
    };
    if (this.#closed) return 'unchanged';
    this.#held = stored;
    if (this.#store !== undefined) {
      try {
        await this.#store.save(td, stored);
      } catch (err) {
        // The bundle is good and in force; only a restart would lose it. Said loudly, not counted as a failure.
        this.#log.error(
          {
            code: isKspError(err) ? err.code : FederationErrorCode.State,
            err: { message: (err as Error).message },
          },
          'federated bundle accepted but not saved',
        );
      }
    }
    return 'new';
  }

  /** One GET of the endpoint URL; the body parsed as the bundle of the relationship's trust domain. */
  async #fetch(signal: AbortSignal): Promise<SpiffeBundle> {
    const fetch = this.relationship.fetch;
    let ca: string | undefined;
    if (fetch.profile === 'https_web' && fetch.caFile !== undefined) {
      try {
        ca = parseCertificates(await readFile(fetch.caFile))
          .map((c) => c.toString())
          .join('');
      } catch (cause) {
        throw configError(`the CA file ${fetch.caFile} is unusable: ${(cause as Error).message}`, cause);
      }
      if (ca === '') throw configError(`the CA file ${fetch.caFile} holds no certificate`);
    }
    // The anchor of this attempt: a bundle accepted meanwhile does not change whom this connection trusts.
    const anchor = fetch.profile === 'https_spiffe' ? this.#held?.bundle.x509Bundle : undefined;
    const body = await this.#get(
      signal,
      (socket) => {
        if (fetch.profile !== 'https_spiffe') return;
        const leaf = socket.getPeerX509Certificate();
        if (leaf === undefined) throw this.#untrusted('the endpoint presented no certificate');
        if (anchor === undefined) throw this.#untrusted('no bundle to authenticate the endpoint with');
        let id: SpiffeId;
        try {
          ({ id } = verifyX509Svid([leaf, ...presentedIntermediates(leaf)], anchor, this.#now()));
        } catch (cause) {
          const code = isKspError(cause) ? ` (${cause.code})` : '';
          throw this.#untrusted(
            `the endpoint's X509-SVID is refused${code}: ${(cause as Error).message}`,
            cause,
          );
        }
        if (!id.equals(fetch.endpointSpiffeId)) {
          throw this.#untrusted(`the endpoint presented ${id}, not the configured ${fetch.endpointSpiffeId}`);
        }
      },
      ca,
    );
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(body);
    } catch (cause) {
      throw this.#fetchError('the response body is not UTF-8', cause);
    }
    try {
      JSON.parse(text);
    } catch (cause) {
      throw this.#fetchError(`the response body is not JSON: ${(cause as Error).message}`, cause);
    }
    try {
      return SpiffeBundle.parse(this.relationship.trustDomain, text, {
        onIgnoredKey: (index, reason) => this.#log.debug({ index, reason }, 'bundle key ignored'),
      });
    } catch (cause) {
      const code = isKspError(cause) ? ` (${cause.code})` : '';
      throw new FederationError(
        FederationErrorCode.Bundle,
        `the endpoint did not serve a valid SPIFFE bundle${code}: ${(cause as Error).message}`,
        { cause },
      );
    }
  }

  #untrusted(message: string, cause?: unknown): FederationError {
    return new FederationError(FederationErrorCode.Untrusted, message, { cause });
  }

  #fetchError(message: string, cause?: unknown): FederationError {
    return new FederationError(FederationErrorCode.Fetch, message, { cause });
  }

  /**
   * The HTTP exchange over a TLS connection of our own, so `authenticate` runs on `secureConnect`, before a byte
   * of the response is read. One connection per fetch: no pooling, no session resumption across anchors.
   */
  #get(
    signal: AbortSignal,
    authenticate: (socket: TLSSocket) => void,
    ca: string | undefined,
  ): Promise<Buffer> {
    const url = this.#url;
    const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    const port = url.port === '' ? 443 : Number(url.port);
    const web = this.relationship.fetch.profile === 'https_web';
    const maxBytes = this.#maxBytes;
    return new Promise<Buffer>((resolve, reject) => {
      let settled = false;
      let authenticated = false;
      const socket = tlsConnect({
        host,
        port,
        ...(isIP(host) === 0 ? { servername: host } : {}),
        minVersion: 'TLSv1.2',
        ALPNProtocols: ['http/1.1'],
        // https_web: OpenSSL verifies the chain (default store, or the CA file alone) and Node.js the host name.
        // https_spiffe: Web-PKI verification does not apply; the SVID is verified on secureConnect instead.
        rejectUnauthorized: web,
        ...(ca === undefined ? {} : { ca }),
      });
      const finish = (err: FederationError | undefined, body?: Buffer): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        req.destroy();
        socket.destroy();
        if (err === undefined) resolve(body as Buffer);
        else reject(err);
      };
      const onAbort = (): void => finish(this.#fetchError('the fetcher was closed'));
      signal.addEventListener('abort', onAbort, { once: true });
      const timer = setTimeout(
        () => finish(this.#fetchError(`no complete answer within ${this.#timeoutMs} ms`)),
        this.#timeoutMs,
      );
      socket.once('secureConnect', () => {
        try {
          authenticate(socket);
          authenticated = true;
        } catch (err) {
          finish(err as FederationError);
        }
      });
      const req = httpRequest({
        method: 'GET',
        host,
        port,
        path: `${url.pathname}${url.search}`,
        headers: { host: url.host, accept: 'application/json', connection: 'close' },
        createConnection: () => socket,
      });
      req.on('error', (err: Error & { code?: string }) => {
        if (err.code !== undefined && UNTRUSTED_CODES.has(err.code)) {
          finish(
            this.#untrusted(`the endpoint's certificate is not trusted (${err.code}): ${err.message}`, err),
          );
        } else {
          const code = err.code === undefined ? '' : ` (${err.code})`;
          finish(this.#fetchError(`cannot reach ${url.host}${code}: ${err.message}`, err));
        }
      });
      req.on('response', (res: IncomingMessage) => {
        if (!authenticated)
          return finish(this.#untrusted('a response arrived before the endpoint was authenticated'));
        const status = res.statusCode ?? 0;
        if (status !== 200) {
          const location = res.headers.location;
          const redirect =
            status >= 300 && status < 400 && location !== undefined
              ? ` redirecting to ${JSON.stringify(location.slice(0, 200))}, not followed: configure the final URL`
              : '';
          finish(this.#fetchError(`HTTP status ${status}${redirect}`));
          return;
        }
        const declared = Number(res.headers['content-length']);
        if (Number.isFinite(declared) && declared > maxBytes) {
          finish(this.#fetchError(`the bundle is ${declared} bytes, above the limit of ${maxBytes}`));
          return;
        }
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > maxBytes) finish(this.#fetchError(`the bundle is above the limit of ${maxBytes} bytes`));
          else chunks.push(chunk);
        });
        res.on('end', () => finish(undefined, Buffer.concat(chunks)));
        res.on('close', () => {
          if (!res.complete)
            finish(this.#fetchError('the connection closed before the response was complete'));
        });
        res.on('error', (err) => finish(this.#fetchError(`the response failed: ${err.message}`, err)));
      });
      req.end();
    });
  }
}
