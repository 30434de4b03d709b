import { EventEmitter } from 'node:events';
import * as grpc from '@grpc/grpc-js';
import {
  BundleSet,
  type JwtAuthority,
  JwtBundle,
  type JwtBundleSource,
  SpiffeBundle,
  X509Bundle,
  type X509BundleSource,
} from '../spiffe/bundle.ts';
import { isSpiffeError } from '../spiffe/errors.ts';
import { SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { type JwtSvid, parseJwtSvidInsecure } from '../spiffe/jwtsvid.ts';
import { parseX509Svid, verifyX509Svid, type X509Svid } from '../spiffe/x509svid.ts';
import { WorkloadError, WorkloadErrorCode } from './errors.ts';
import {
  ENDPOINT_SOCKET_ENV,
  fromStruct,
  type JwtBundlesResponse,
  type JwtSvidMessage,
  type JwtSvidResponse,
  parseEndpointAddress,
  SECURITY_HEADER,
  type ValidateJwtSvidResponse,
  WorkloadApiClient,
  type X509BundlesResponse,
  type X509SvidResponse,
} from './proto.ts';

export interface WorkloadClientOptions {
  /** `unix:///path/to/socket` (default: the SPIFFE_ENDPOINT_SOCKET environment variable). */
  readonly address?: string;
  /** Deadline of unary calls (default 10 s). */
  readonly timeoutMs?: number;
}

/** What the FetchX509SVID stream delivers: the caller's SVIDs (default first) and the bundles to verify peers. */
export interface X509Context {
  readonly svids: readonly X509Svid[];
  /** Own trust domain and federated ones, X.509 authorities only. */
  readonly bundles: BundleSet;
}

/** A gRPC failure of the Workload API, with its status code name (e.g. `PERMISSION_DENIED`). */
export class WorkloadApiError extends Error {
  readonly code: grpc.status;
  readonly codeName: string;
  constructor(code: grpc.status, details: string, options?: ErrorOptions) {
    const codeName = grpc.status[code] ?? String(code);
    super(`${codeName}: ${details}`, options);
    this.name = 'WorkloadApiError';
    this.code = code;
    this.codeName = codeName;
  }
}

function toWorkloadApiError(err: unknown): WorkloadApiError {
  if (err instanceof WorkloadApiError) return err;
  const e = err as Partial<grpc.ServiceError>;
  if (typeof e?.code === 'number') return new WorkloadApiError(e.code, e.details ?? e.message ?? '');
  return new WorkloadApiError(grpc.status.UNKNOWN, (err as Error)?.message ?? String(err));
}

/** Resolves the Workload API address from the option or SPIFFE_ENDPOINT_SOCKET; returns the socket path. */
export function resolveEndpoint(address: string | undefined): string {
  const value = address ?? process.env[ENDPOINT_SOCKET_ENV];
  if (value === undefined || value === '') {
    throw new RangeError(
      `no Workload API address: pass one or set ${ENDPOINT_SOCKET_ENV}=unix:///path/to/socket`,
    );
  }
  return parseEndpointAddress(value);
}

type StreamMethod = 'FetchX509SVID' | 'FetchX509Bundles' | 'FetchJWTBundles';

type RawClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;

/** A thin, typed client of the SPIFFE Workload API. Every call carries the security header. */
export class WorkloadClient {
  readonly socketPath: string;
  readonly #client: RawClient;
  readonly #timeoutMs: number;

  constructor(options: WorkloadClientOptions = {}) {
    this.socketPath = resolveEndpoint(options.address);
    this.#timeoutMs = options.timeoutMs ?? 10_000;
    this.#client = new WorkloadApiClient(`unix://${this.socketPath}`, grpc.credentials.createInsecure(), {
      // A local socket: reconnect quickly after the agent restarts.
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': 5000,
    }) as unknown as RawClient;
  }

  static metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    md.set(SECURITY_HEADER, 'true');
    return md;
  }

  #deadline(): grpc.CallOptions {
    return { deadline: Date.now() + this.#timeoutMs };
  }

  #unary<Res>(method: string, request: unknown): Promise<Res> {
    return new Promise((resolve, reject) => {
      const fn = this.#client[method] as (
        req: unknown,
        md: grpc.Metadata,
        opts: grpc.CallOptions,
        cb: (err: grpc.ServiceError | null, res: Res) => void,
      ) => void;
      fn.call(this.#client, request, WorkloadClient.metadata(), this.#deadline(), (err, res) =>
        err ? reject(toWorkloadApiError(err)) : resolve(res),
      );
    });
  }

  /** Opens a server stream; `onMessage` gets each message, `onEnd` the error that ended it (or undefined). */
  stream<Msg>(
    method: StreamMethod,
    onMessage: (message: Msg) => void,
    onEnd: (err: WorkloadApiError | undefined) => void,
  ): { cancel(): void } {
    const fn = this.#client[method] as (req: unknown, md: grpc.Metadata) => grpc.ClientReadableStream<Msg>;
    const call = fn.call(this.#client, {}, WorkloadClient.metadata());
    let ended = false;
    const end = (err: WorkloadApiError | undefined): void => {
      if (ended) return;
      ended = true;
      onEnd(err);
    };
    call.on('data', (message: Msg) => {
      try {
        onMessage(message);
      } catch (err) {
        call.cancel();
        end(toWorkloadApiError(err));
      }
    });
    call.on('error', (err) => end(toWorkloadApiError(err)));
    call.on('end', () => end(undefined));
    return {
      cancel: () => {
        ended = true;
        call.cancel();
      },
    };
  }

  /**
   * The first message of FetchX509SVID, every SVID verified against the bundle of its trust domain sent with it.
   * Throws a `WorkloadError` (`ERR_WORKLOAD_SVID_REFUSED`, `ERR_WORKLOAD_RESPONSE_REFUSED`) for a bad response.
   */
  fetchX509Context(): Promise<X509Context> {
    return this.#first<X509SvidResponse, X509Context>('FetchX509SVID', (m) => parseX509SvidResponse(m));
  }

  fetchX509Bundles(): Promise<BundleSet> {
    return this.#first<X509BundlesResponse, BundleSet>('FetchX509Bundles', parseX509BundlesResponse);
  }

  /** The first message of FetchJWTBundles; `onIgnoredKey` hears of every key ignored (see `parseJwtBundlesResponse`). */
  fetchJwtBundles(options: ParseJwtBundlesOptions = {}): Promise<BundleSet> {
    return this.#first<JwtBundlesResponse, BundleSet>('FetchJWTBundles', (m) =>
      parseJwtBundlesResponse(m, options),
    );
  }

  /**
   * Fetches JWT-SVIDs for `audience` (the default first). Each is parsed and checked before it is returned (its
   * `sub` is the `spiffe_id` it came with, and the one asked for if any; its `aud` holds every audience asked
   * for; it has an `exp` still in the future), or the call fails with `ERR_WORKLOAD_JWT_SVID_REFUSED`. The
   * signature is not verified here: that is the relying party's job, against the JWT bundle.
   */
  async fetchJwtSvids(
    audience: string | readonly string[],
    spiffeId?: SpiffeId | string,
  ): Promise<JwtSvid[]> {
    const requested = typeof audience === 'string' ? [audience] : [...audience];
    const res = await this.#unary<JwtSvidResponse>('FetchJWTSVID', {
      audience: requested,
      spiffe_id: spiffeId === undefined ? '' : spiffeId.toString(),
    });
    if (res.svids.length === 0)
      throw new WorkloadApiError(grpc.status.UNKNOWN, 'the response carried no JWT-SVID');
    const now = Date.now();
    return res.svids.map((s) => checkJwtSvid(s, requested, spiffeId?.toString(), now));
  }

  async validateJwtSvid(
    token: string,
    audience: string,
  ): Promise<{ id: SpiffeId; claims: Record<string, unknown> }> {
    const res = await this.#unary<ValidateJwtSvidResponse>('ValidateJWTSVID', { svid: token, audience });
    return { id: SpiffeId.parse(res.spiffe_id), claims: fromStruct(res.claims) };
  }

  close(): void {
    this.#client.close();
  }

  #first<Msg, T>(method: StreamMethod, parse: (m: Msg) => T): Promise<T> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const timer = setTimeout(() => {
        handle.cancel();
        settle(
          new WorkloadApiError(
            grpc.status.DEADLINE_EXCEEDED,
            `no ${method} response within ${this.#timeoutMs} ms`,
          ),
        );
      }, this.#timeoutMs);
      const settle = (err: Error | undefined, value?: T): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(value as T);
      };
      const handle = this.stream<Msg>(
        method,
        (message) => {
          handle.cancel();
          // A refused response rejects with its own WorkloadError, not as a stream failure.
          let value: T;
          try {
            value = parse(message);
          } catch (err) {
            settle(err as Error);
            return;
          }
          settle(undefined, value);
        },
        (err) =>
          settle(err ?? new WorkloadApiError(grpc.status.UNAVAILABLE, `${method} ended without a response`)),
      );
    });
  }
}

/** `ERR_X509_EXPIRED: leaf certificate expired at …`: the rule's code first, when there is one. */
function reason(cause: unknown): string {
  const message = (cause as Error)?.message ?? String(cause);
  return isSpiffeError(cause) ? `${cause.code}: ${message}` : message;
}

function refused(message: string, cause?: unknown): WorkloadError {
  return new WorkloadError(WorkloadErrorCode.ResponseRefused, message, { cause });
}

function trustDomainOfKey(key: string, what: string): TrustDomain {
  try {
    return TrustDomain.parse(key);
  } catch (cause) {
    throw refused(
      `${what}: bundle key ${JSON.stringify(key)} is not a trust domain: ${reason(cause)}`,
      cause,
    );
  }
}

/** The X.509 authorities of `td` from concatenated DER, as a SPIFFE bundle. */
function x509SpiffeBundle(td: TrustDomain, der: Uint8Array, what: string): SpiffeBundle {
  try {
    return new SpiffeBundle(td, { x509Authorities: X509Bundle.parse(td, der).authorities });
  } catch (cause) {
    throw refused(`${what}: the X.509 bundle of "${td}" is malformed: ${reason(cause)}`, cause);
  }
}

/**
 * Decodes an X509SVIDResponse, refusing it whole rather than keeping part of it when any SVID or bundle is bad.
 * Every SVID is parsed (chain, key, leaf rules) and verified at `now` against the bundle of its own trust domain
 * sent with it, as a peer would verify it: an expired, badly signed or foreign-issued SVID is refused with
 * `ERR_WORKLOAD_SVID_REFUSED`, naming the SPIFFE ID and the rule broken. Anything else malformed is
 * `ERR_WORKLOAD_RESPONSE_REFUSED`.
 */
export function parseX509SvidResponse(message: X509SvidResponse, now: Date = new Date()): X509Context {
  const what = 'X509SVIDResponse';
  if (message.svids.length === 0) throw refused(`${what} carried no SVID`);
  const federated: SpiffeBundle[] = [];
  for (const [key, der] of Object.entries(message.federated_bundles ?? {})) {
    const td = trustDomainOfKey(key, what);
    if (!federated.some((b) => b.trustDomain.equals(td))) federated.push(x509SpiffeBundle(td, der, what));
  }
  const svids: X509Svid[] = [];
  const own: SpiffeBundle[] = [];
  for (const m of message.svids) {
    const claimed = m.spiffe_id || '(no spiffe_id)';
    const refuse = (why: string, cause?: unknown): WorkloadError =>
      new WorkloadError(WorkloadErrorCode.SvidRefused, `X.509-SVID ${claimed} refused: ${why}`, {
        cause,
        spiffeId: m.spiffe_id,
      });
    let svid: X509Svid;
    try {
      svid = parseX509Svid(m.x509_svid, m.x509_svid_key, m.hint || undefined);
    } catch (cause) {
      throw refuse(reason(cause), cause);
    }
    if (svid.id.toString() !== m.spiffe_id)
      throw refuse(`spiffe_id ${claimed} does not match the certificate's ${svid.id}`);
    const td = svid.id.trustDomain;
    const bundle = x509SpiffeBundle(td, m.bundle, what);
    try {
      // The other trust domains only let the error name a cross-domain issuer; they never vouch for this SVID.
      verifyX509Svid(
        svid.certificates,
        new BundleSet([bundle, ...federated.filter((b) => !b.trustDomain.equals(td))]),
        now,
      );
    } catch (cause) {
      throw refuse(reason(cause), cause);
    }
    svids.push(svid);
    if (!own.some((b) => b.trustDomain.equals(td))) own.push(bundle);
  }
  const others = federated.filter((f) => !own.some((b) => b.trustDomain.equals(f.trustDomain)));
  return { svids, bundles: new BundleSet([...own, ...others]) };
}

export function parseX509BundlesResponse(message: X509BundlesResponse): BundleSet {
  const what = 'X509BundlesResponse';
  return new BundleSet(
    Object.entries(message.bundles ?? {}).map(([key, der]) =>
      x509SpiffeBundle(trustDomainOfKey(key, what), der, what),
    ),
  );
}

export interface ParseJwtBundlesOptions {
  /** Called for every key ignored (see `parseJwtBundlesResponse`), with its trust domain, index and why. */
  readonly onIgnoredKey?: (trustDomain: TrustDomain, index: number, reason: string) => void;
}

/**
 * JWT bundles arrive as standard JWK Sets, read by `JwtBundle.parse` exactly as `SpiffeBundle.parse` reads the
 * `jwt-svid` keys of a SPIFFE bundle: a key of unknown `kty`, or whose `use` is other than `jwt-svid`, or that
 * cannot verify a JWT-SVID, is ignored and reported through `onIgnoredKey`; the rest of the bundle applies.
 * Anything else malformed refuses the whole response (`ERR_WORKLOAD_RESPONSE_REFUSED`).
 */
export function parseJwtBundlesResponse(
  message: JwtBundlesResponse,
  options: ParseJwtBundlesOptions = {},
): BundleSet {
  const what = 'JWTBundlesResponse';
  return new BundleSet(
    Object.entries(message.bundles ?? {}).map(([key, json]) => {
      const td = trustDomainOfKey(key, what);
      let bundle: JwtBundle;
      try {
        bundle = JwtBundle.parse(td, json, {
          onIgnoredKey: (index, why) => options.onIgnoredKey?.(td, index, why),
        });
      } catch (cause) {
        throw refused(`${what}: the JWT bundle of "${td}" is malformed: ${reason(cause)}`, cause);
      }
      return new SpiffeBundle(td, { jwtAuthorities: authoritiesOf(bundle) });
    }),
  );
}

function authoritiesOf(bundle: JwtBundle): JwtAuthority[] {
  return [...bundle.authorities].map(([kid, publicKey]) => ({ kid, publicKey }));
}

/** Parses one JWT-SVID of a FetchJWTSVID response and checks it says what was asked for (see `fetchJwtSvids`). */
function checkJwtSvid(
  message: JwtSvidMessage,
  audience: readonly string[],
  spiffeId: string | undefined,
  now: number,
): JwtSvid {
  const claimed = message.spiffe_id || '(no spiffe_id)';
  const refuse = (why: string, cause?: unknown): WorkloadError =>
    new WorkloadError(WorkloadErrorCode.JwtSvidRefused, `JWT-SVID ${claimed} refused: ${why}`, {
      cause,
      spiffeId: message.spiffe_id,
    });
  let svid: JwtSvid;
  try {
    svid = parseJwtSvidInsecure(message.svid);
  } catch (cause) {
    throw refuse(reason(cause), cause);
  }
  const sub = svid.id.toString();
  if (sub !== message.spiffe_id) throw refuse(`spiffe_id ${claimed} does not match the token's sub ${sub}`);
  if (spiffeId !== undefined && sub !== spiffeId) throw refuse(`${spiffeId} was asked for`);
  const missing = audience.filter((a) => !svid.audience.includes(a));
  if (missing.length > 0) throw refuse(`its aud lacks ${missing.map((a) => JSON.stringify(a)).join(', ')}`);
  if (typeof svid.claims.exp !== 'number') throw refuse('it has no exp claim');
  if (svid.expiry.getTime() <= now) throw refuse(`it expired at ${svid.expiry.toISOString()}`);
  return message.hint ? { ...svid, hint: message.hint } : svid;
}

export interface SourceOptions extends WorkloadClientOptions {
  /** First wait between reconnects (default 100 ms); doubles up to `maxBackoffMs` (default 30 s), with jitter. */
  readonly initialBackoffMs?: number;
  readonly maxBackoffMs?: number;
  /** How long `create()` waits for the first update (default 30 s). */
  readonly startTimeoutMs?: number;
}

/** What every source emits. */
export interface SourceEvents<T> {
  /** A new value from the agent, now the one the source hands out. */
  update: [T];
  /** The stream failed (a gRPC status); the source keeps the last good value and reconnects unless fatal. */
  error: [WorkloadApiError];
  /**
   * A response was refused (`ERR_WORKLOAD_SVID_REFUSED`, `ERR_WORKLOAD_RESPONSE_REFUSED`): the source keeps the
   * last good value and stays on the stream for the next response.
   */
  refused: [WorkloadError];
  /** Part of a response was ignored (`ERR_WORKLOAD_KEY_IGNORED`); the rest of it was applied. */
  warning: [WorkloadError];
}

/** What an X509Source emits: the events of every source, and `withdrawn`. */
export interface X509SourceEvents extends SourceEvents<X509Context> {
  /**
   * The agent answered PermissionDenied (`ERR_WORKLOAD_SVID_WITHDRAWN`): `svid()` throws from now on, until an
   * `update` brings SVIDs again. Emitted before the `error` that carries the gRPC status.
   */
  withdrawn: [WorkloadError];
}

/** Turns a parse failure into the refusal to report; anything not already a WorkloadError is a malformed response. */
function asRefusal(err: unknown, method: StreamMethod): WorkloadError {
  if (err instanceof WorkloadError) return err;
  return refused(`${method} response: ${reason(err)}`, err);
}

/**
 * Follows one Workload API stream forever: reconnects with exponential backoff and jitter, stops for good on
 * InvalidArgument (a client bug the server will never accept), keeps the last good value meanwhile. A response
 * that does not parse is refused and reported, and the stream stays open: the agent pushes the next one on the
 * same stream, and reconnecting would only fetch the same bad response again.
 */
class StreamFollower<Msg, T> extends EventEmitter<SourceEvents<T>> {
  readonly #client: WorkloadClient;
  readonly #method: StreamMethod;
  readonly #parse: (message: Msg, warn: (warning: WorkloadError) => void) => T;
  readonly #initialBackoff: number;
  readonly #maxBackoff: number;
  #backoff: number;
  #handle: { cancel(): void } | undefined;
  #timer: NodeJS.Timeout | undefined;
  #current: T | undefined;
  #warnings: readonly WorkloadError[] = [];
  #closed = false;
  #fatal: WorkloadApiError | undefined;
  /** Streams opened so far (1 + reconnects). */
  connects = 0;

  constructor(
    client: WorkloadClient,
    method: StreamMethod,
    parse: (message: Msg, warn: (warning: WorkloadError) => void) => T,
    options: SourceOptions,
  ) {
    super();
    this.#client = client;
    this.#method = method;
    this.#parse = parse;
    this.#initialBackoff = options.initialBackoffMs ?? 100;
    this.#maxBackoff = options.maxBackoffMs ?? 30_000;
    this.#backoff = this.#initialBackoff;
  }

  get current(): T | undefined {
    return this.#current;
  }

  /** What was ignored in the current value (see the `warning` event). */
  get warnings(): readonly WorkloadError[] {
    return this.#warnings;
  }

  get fatal(): WorkloadApiError | undefined {
    return this.#fatal;
  }

  start(): void {
    if (this.#closed) return;
    this.connects++;
    this.#handle = this.#client.stream<Msg>(
      this.#method,
      (message) => {
        const warnings: WorkloadError[] = [];
        let value: T;
        try {
          value = this.#parse(message, (w) => warnings.push(w));
        } catch (err) {
          this.emit('refused', asRefusal(err, this.#method));
          return;
        }
        this.#current = value;
        this.#warnings = Object.freeze(warnings);
        this.#backoff = this.#initialBackoff;
        for (const w of warnings) this.emit('warning', w);
        this.emit('update', value);
      },
      (err) => {
        this.#handle = undefined;
        if (this.#closed) return;
        const error = err ?? new WorkloadApiError(grpc.status.UNAVAILABLE, `${this.#method} stream ended`);
        if (error.code === grpc.status.INVALID_ARGUMENT) this.#fatal = error;
        if (!this.#fatal) {
          const delay = this.#backoff * (0.5 + Math.random() / 2);
          this.#backoff = Math.min(this.#maxBackoff, this.#backoff * 2);
          this.#timer = setTimeout(() => this.start(), delay);
        }
        if (this.listenerCount('error') > 0) this.emit('error', error);
      },
    );
  }

  close(): void {
    this.#closed = true;
    this.#handle?.cancel();
    if (this.#timer) clearTimeout(this.#timer);
  }

  /** Resolves with the first value, or rejects on a fatal error or after `timeoutMs`. */
  waitForFirst(timeoutMs: number): Promise<T> {
    if (this.#current !== undefined) return Promise.resolve(this.#current);
    return new Promise((resolve, reject) => {
      let lastError: WorkloadApiError | WorkloadError | undefined;
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('update', onUpdate);
        this.off('error', onError);
        this.off('refused', onRefused);
      };
      const onUpdate = (value: T): void => {
        cleanup();
        resolve(value);
      };
      const onError = (err: WorkloadApiError): void => {
        lastError = err;
        if (this.#fatal) {
          cleanup();
          reject(err);
        }
      };
      const onRefused = (err: WorkloadError): void => {
        lastError = err;
      };
      const timer = setTimeout(() => {
        cleanup();
        const last =
          lastError instanceof WorkloadError ? `${lastError.code}: ${lastError.message}` : lastError?.message;
        reject(
          new WorkloadApiError(
            grpc.status.DEADLINE_EXCEEDED,
            `no ${this.#method} update within ${timeoutMs} ms${last ? ` (last error: ${last})` : ''}`,
            lastError === undefined ? undefined : { cause: lastError },
          ),
        );
      }, timeoutMs);
      this.on('update', onUpdate);
      this.on('error', onError);
      this.on('refused', onRefused);
    });
  }
}

/** What X509Source and JwtSource share: one followed stream, its events, start-up and shutdown. */
abstract class FollowingSource<
  Msg,
  T,
  E extends SourceEvents<T> & Record<keyof E, unknown[]>,
> extends EventEmitter<E> {
  protected readonly client: WorkloadClient;
  readonly #follower: StreamFollower<Msg, T>;

  protected constructor(
    options: SourceOptions,
    method: StreamMethod,
    parse: (message: Msg, warn: (warning: WorkloadError) => void) => T,
  ) {
    super();
    this.client = new WorkloadClient(options);
    this.#follower = new StreamFollower(this.client, method, parse, options);
    // The events every source has, whatever else a subclass adds.
    const self = this as unknown as EventEmitter<SourceEvents<T>>;
    this.#follower.on('update', (value) => {
      this.beforeUpdate();
      self.emit('update', value);
    });
    this.#follower.on('error', (err) => {
      this.beforeError(err);
      if (self.listenerCount('error') > 0) self.emit('error', err);
    });
    this.#follower.on('refused', (err) => self.emit('refused', err));
    this.#follower.on('warning', (err) => self.emit('warning', err));
  }

  /** Called when a new value arrives, before `update` is emitted. */
  protected beforeUpdate(): void {}

  /** Called when the stream fails, before `error` is emitted. */
  protected beforeError(_err: WorkloadApiError): void {}

  /** Opens the stream and waits for its first message; closes everything if that fails. */
  protected async begin(options: SourceOptions): Promise<void> {
    this.#follower.start();
    try {
      await this.#follower.waitForFirst(options.startTimeoutMs ?? 30_000);
    } catch (err) {
      this.close();
      throw err;
    }
  }

  /** The latest value (set once `begin()` resolved). */
  protected get latest(): T {
    return this.#follower.current as T;
  }

  /** Streams opened so far: 1 plus the number of reconnects. */
  get connects(): number {
    return this.#follower.connects;
  }

  /**
   * What was ignored in the current value (`ERR_WORKLOAD_KEY_IGNORED`), each also emitted as a `warning` when
   * it arrived. Read it after `create()` for the first value, whose warnings came before any listener could.
   */
  get warnings(): readonly WorkloadError[] {
    return this.#follower.warnings;
  }

  close(): void {
    this.#follower.close();
    this.client.close();
  }
}

/**
 * The caller's X.509-SVIDs and bundles, kept current from the Workload API. `update` fires on every change
 * (rotation, bundle change, entries edit); `svid` and `bundles` always give the latest good ones. Every SVID is
 * verified against the bundle sent with it before it is used; a bad response is refused (`refused`) and the last
 * good one kept. When the agent answers PermissionDenied the SVIDs are withdrawn: `svid()` throws
 * `ERR_WORKLOAD_SVID_WITHDRAWN` (and `withdrawn` fires) until the agent issues SVIDs again.
 */
export class X509Source
  extends FollowingSource<X509SvidResponse, X509Context, X509SourceEvents>
  implements X509BundleSource
{
  #withdrawn: WorkloadError | undefined;

  private constructor(options: SourceOptions) {
    super(options, 'FetchX509SVID', (m) => parseX509SvidResponse(m));
  }

  /** Connects and waits for the first X509SVIDResponse. */
  static async create(options: SourceOptions = {}): Promise<X509Source> {
    const source = new X509Source(options);
    await source.begin(options);
    return source;
  }

  protected override beforeUpdate(): void {
    this.#withdrawn = undefined;
  }

  protected override beforeError(err: WorkloadApiError): void {
    if (err.code !== grpc.status.PERMISSION_DENIED || this.#withdrawn || this.latest === undefined) return;
    const ids = this.latest.svids.map((s) => s.id.toString()).join(', ');
    this.#withdrawn = new WorkloadError(
      WorkloadErrorCode.SvidWithdrawn,
      `the Workload API withdrew ${ids} at ${new Date().toISOString()} (${err.message}); ` +
        'no X.509-SVID to present until the agent issues one again',
      { cause: err, spiffeId: this.latest.svids[0]?.id.toString() },
    );
    this.emit('withdrawn', this.#withdrawn);
  }

  /**
   * The last good context, as received: after a withdrawal it still holds the withdrawn SVIDs, for display
   * only. Take SVIDs to present from `svid()`, which refuses withdrawn ones.
   */
  get context(): X509Context {
    return this.latest;
  }

  /** Why the SVIDs are withdrawn, while they are (see `svid()`). */
  get withdrawn(): WorkloadError | undefined {
    return this.#withdrawn;
  }

  /**
   * The default SVID (the first), or the one with `hint`. Throws the `ERR_WORKLOAD_SVID_WITHDRAWN` error while
   * the agent has withdrawn the SVIDs, and a RangeError when no SVID has `hint`.
   */
  svid(hint?: string): X509Svid {
    if (this.#withdrawn) throw this.#withdrawn;
    const svids = this.context.svids;
    const found = hint === undefined ? svids[0] : svids.find((s) => s.hint === hint);
    if (found === undefined) throw new RangeError(`no X509-SVID with hint "${hint}"`);
    return found;
  }

  get bundles(): BundleSet {
    return this.context.bundles;
  }

  getX509Bundle(trustDomain: TrustDomain): X509Bundle | undefined {
    return this.context.bundles.getX509Bundle(trustDomain);
  }
}

/**
 * JWT bundles kept current from the Workload API, and JWT-SVIDs fetched on demand. A bundle key the
 * specifications say to ignore is ignored and reported as a `warning` (`ERR_WORKLOAD_KEY_IGNORED`); the rest of
 * the bundle applies.
 */
export class JwtSource
  extends FollowingSource<JwtBundlesResponse, BundleSet, SourceEvents<BundleSet>>
  implements JwtBundleSource
{
  private constructor(options: SourceOptions) {
    super(options, 'FetchJWTBundles', (message, warn) =>
      parseJwtBundlesResponse(message, {
        onIgnoredKey: (td, index, why) =>
          warn(
            new WorkloadError(
              WorkloadErrorCode.KeyIgnored,
              `JWT bundle of "${td}": keys[${index}] ignored: ${why}`,
            ),
          ),
      }),
    );
  }

  static async create(options: SourceOptions = {}): Promise<JwtSource> {
    const source = new JwtSource(options);
    await source.begin(options);
    return source;
  }

  get bundles(): BundleSet {
    return this.latest;
  }

  getJwtBundle(trustDomain: TrustDomain): JwtBundle | undefined {
    return this.bundles.getJwtBundle(trustDomain);
  }

  /** Fetches fresh JWT-SVIDs (the default first) for `audience`, checked as `WorkloadClient.fetchJwtSvids` does. */
  fetchJwtSvids(audience: string | readonly string[], spiffeId?: SpiffeId | string): Promise<JwtSvid[]> {
    return this.client.fetchJwtSvids(audience, spiffeId);
  }

  /** The default JWT-SVID for `audience`. */
  async fetchJwtSvid(audience: string | readonly string[], spiffeId?: SpiffeId | string): Promise<JwtSvid> {
    return (await this.fetchJwtSvids(audience, spiffeId))[0] as JwtSvid;
  }
}
