import { createPublicKey, type JsonWebKeyInput } from 'node:crypto';
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
import { SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { type JwtSvid, parseJwtSvidInsecure } from '../spiffe/jwtsvid.ts';
import { parseX509Svid, type X509Svid } from '../spiffe/x509svid.ts';
import {
  ENDPOINT_SOCKET_ENV,
  fromStruct,
  type JwtBundlesResponse,
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
  constructor(code: grpc.status, details: string) {
    const codeName = grpc.status[code] ?? String(code);
    super(`${codeName}: ${details}`);
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

  /** The first message of FetchX509SVID. */
  fetchX509Context(): Promise<X509Context> {
    return this.#first<X509SvidResponse, X509Context>('FetchX509SVID', parseX509SvidResponse);
  }

  fetchX509Bundles(): Promise<BundleSet> {
    return this.#first<X509BundlesResponse, BundleSet>('FetchX509Bundles', parseX509BundlesResponse);
  }

  fetchJwtBundles(): Promise<BundleSet> {
    return this.#first<JwtBundlesResponse, BundleSet>('FetchJWTBundles', parseJwtBundlesResponse);
  }

  async fetchJwtSvids(
    audience: string | readonly string[],
    spiffeId?: SpiffeId | string,
  ): Promise<JwtSvid[]> {
    const res = await this.#unary<JwtSvidResponse>('FetchJWTSVID', {
      audience: typeof audience === 'string' ? [audience] : [...audience],
      spiffe_id: spiffeId === undefined ? '' : spiffeId.toString(),
    });
    if (res.svids.length === 0)
      throw new WorkloadApiError(grpc.status.UNKNOWN, 'the response carried no JWT-SVID');
    return res.svids.map((s) => {
      const parsed = parseJwtSvidInsecure(s.svid);
      return s.hint ? { ...parsed, hint: s.hint } : parsed;
    });
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
          settle(undefined, parse(message));
        },
        (err) =>
          settle(err ?? new WorkloadApiError(grpc.status.UNAVAILABLE, `${method} ended without a response`)),
      );
    });
  }
}

function trustDomainOfKey(key: string): TrustDomain {
  return TrustDomain.parse(key);
}

/** Decodes an X509SVIDResponse, refusing any malformed SVID or bundle rather than keeping part of it. */
export function parseX509SvidResponse(message: X509SvidResponse): X509Context {
  if (message.svids.length === 0) throw new Error('X509SVIDResponse carried no SVID');
  const svids: X509Svid[] = [];
  const bundles: SpiffeBundle[] = [];
  const seen = new Set<string>();
  for (const m of message.svids) {
    const svid = parseX509Svid(m.x509_svid, m.x509_svid_key, m.hint || undefined);
    if (svid.id.toString() !== m.spiffe_id) {
      throw new Error(
        `X509SVIDResponse: spiffe_id ${m.spiffe_id} does not match the certificate's ${svid.id}`,
      );
    }
    svids.push(svid);
    const td = svid.id.trustDomain;
    if (!seen.has(td.name)) {
      seen.add(td.name);
      bundles.push(new SpiffeBundle(td, { x509Authorities: X509Bundle.parse(td, m.bundle).authorities }));
    }
  }
  for (const [key, der] of Object.entries(message.federated_bundles ?? {})) {
    const td = trustDomainOfKey(key);
    if (seen.has(td.name)) continue;
    seen.add(td.name);
    bundles.push(new SpiffeBundle(td, { x509Authorities: X509Bundle.parse(td, der).authorities }));
  }
  return { svids, bundles: new BundleSet(bundles) };
}

export function parseX509BundlesResponse(message: X509BundlesResponse): BundleSet {
  return new BundleSet(
    Object.entries(message.bundles ?? {}).map(([key, der]) => {
      const td = trustDomainOfKey(key);
      return new SpiffeBundle(td, { x509Authorities: X509Bundle.parse(td, der).authorities });
    }),
  );
}

/** JWT bundles arrive as plain JWK Sets: every key with a `kid` is a JWT authority. */
export function parseJwtBundlesResponse(message: JwtBundlesResponse): BundleSet {
  return new BundleSet(
    Object.entries(message.bundles ?? {}).map(([key, json]) => {
      const td = trustDomainOfKey(key);
      const parsed = JSON.parse(Buffer.from(json).toString('utf8')) as { keys?: unknown };
      if (!Array.isArray(parsed.keys)) throw new Error(`JWT bundle of ${td.name} has no "keys" array`);
      const authorities: JwtAuthority[] = (parsed.keys as Record<string, unknown>[]).map((jwk, i) => {
        if (typeof jwk.kid !== 'string' || jwk.kid === '')
          throw new Error(`JWT bundle of ${td.name}: key ${i} has no kid`);
        return {
          kid: jwk.kid,
          publicKey: createPublicKey({ key: jwk as JsonWebKeyInput['key'], format: 'jwk' }),
        };
      });
      // JwtBundle checks the keys (unique kid, usable type) before they are trusted.
      return new SpiffeBundle(td, { jwtAuthorities: authoritiesOf(new JwtBundle(td, authorities)) });
    }),
  );
}

function authoritiesOf(bundle: JwtBundle): JwtAuthority[] {
  return [...bundle.authorities].map(([kid, publicKey]) => ({ kid, publicKey }));
}

export interface SourceOptions extends WorkloadClientOptions {
  /** First wait between reconnects (default 100 ms); doubles up to `maxBackoffMs` (default 30 s), with jitter. */
  readonly initialBackoffMs?: number;
  readonly maxBackoffMs?: number;
  /** How long `create()` waits for the first update (default 30 s). */
  readonly startTimeoutMs?: number;
}

interface SourceEvents<T> {
  update: [T];
  /** A stream failed; the source keeps the last good value and reconnects unless the error is fatal. */
  error: [WorkloadApiError];
}

/**
 * Follows one Workload API stream forever: reconnects with exponential backoff and jitter, stops for good on
 * InvalidArgument (a client bug the server will never accept), keeps the last good value meanwhile.
 */
class StreamFollower<Msg, T> extends EventEmitter<SourceEvents<T>> {
  readonly #client: WorkloadClient;
  readonly #method: StreamMethod;
  readonly #parse: (message: Msg) => T;
  readonly #initialBackoff: number;
  readonly #maxBackoff: number;
  #backoff: number;
  #handle: { cancel(): void } | undefined;
  #timer: NodeJS.Timeout | undefined;
  #current: T | undefined;
  #closed = false;
  #fatal: WorkloadApiError | undefined;
  /** Streams opened so far (1 + reconnects). */
  connects = 0;

  constructor(
    client: WorkloadClient,
    method: StreamMethod,
    parse: (message: Msg) => T,
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

  get fatal(): WorkloadApiError | undefined {
    return this.#fatal;
  }

  start(): void {
    if (this.#closed) return;
    this.connects++;
    this.#handle = this.#client.stream<Msg>(
      this.#method,
      (message) => {
        const value = this.#parse(message);
        this.#current = value;
        this.#backoff = this.#initialBackoff;
        this.emit('update', value);
      },
      (err) => {
        this.#handle = undefined;
        if (this.#closed) return;
        const error = err ?? new WorkloadApiError(grpc.status.UNAVAILABLE, `${this.#method} stream ended`);
        if (error.code === grpc.status.INVALID_ARGUMENT) this.#fatal = error;
        if (this.listenerCount('error') > 0) this.emit('error', error);
        if (this.#fatal) return;
        const delay = this.#backoff * (0.5 + Math.random() / 2);
        this.#backoff = Math.min(this.#maxBackoff, this.#backoff * 2);
        this.#timer = setTimeout(() => this.start(), delay);
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
      let lastError: WorkloadApiError | undefined;
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('update', onUpdate);
        this.off('error', onError);
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
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new WorkloadApiError(
            grpc.status.DEADLINE_EXCEEDED,
            `no ${this.#method} update within ${timeoutMs} ms${lastError ? ` (last error: ${lastError.message})` : ''}`,
          ),
        );
      }, timeoutMs);
      this.on('update', onUpdate);
      this.on('error', onError);
    });
  }
}

/** What X509Source and JwtSource share: one followed stream, its events, start-up and shutdown. */
abstract class FollowingSource<Msg, T> extends EventEmitter<SourceEvents<T>> {
  protected readonly client: WorkloadClient;
  readonly #follower: StreamFollower<Msg, T>;

  protected constructor(options: SourceOptions, method: StreamMethod, parse: (message: Msg) => T) {
    super();
    this.client = new WorkloadClient(options);
    this.#follower = new StreamFollower(this.client, method, parse, options);
    this.#follower.on('update', (value) => this.emit('update', value));
    this.#follower.on('error', (err) => {
      if (this.listenerCount('error') > 0) this.emit('error', err);
    });
  }

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

  close(): void {
    this.#follower.close();
    this.client.close();
  }
}

/**
 * The caller's X.509-SVIDs and bundles, kept current from the Workload API. `update` fires on every change
 * (rotation, bundle change, entries edit); `svid` and `bundles` always give the latest.
 */
export class X509Source extends FollowingSource<X509SvidResponse, X509Context> implements X509BundleSource {
  private constructor(options: SourceOptions) {
    super(options, 'FetchX509SVID', parseX509SvidResponse);
  }

  /** Connects and waits for the first X509SVIDResponse. */
  static async create(options: SourceOptions = {}): Promise<X509Source> {
    const source = new X509Source(options);
    await source.begin(options);
    return source;
  }

  get context(): X509Context {
    return this.latest;
  }

  /** The default SVID (the first), or the one with `hint`. */
  svid(hint?: string): X509Svid {
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

/** JWT bundles kept current from the Workload API, and JWT-SVIDs fetched on demand. */
export class JwtSource extends FollowingSource<JwtBundlesResponse, BundleSet> implements JwtBundleSource {
  private constructor(options: SourceOptions) {
    super(options, 'FetchJWTBundles', parseJwtBundlesResponse);
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

  /** Fetches fresh JWT-SVIDs (the default first) for `audience`. */
  fetchJwtSvids(audience: string | readonly string[], spiffeId?: SpiffeId | string): Promise<JwtSvid[]> {
    return this.client.fetchJwtSvids(audience, spiffeId);
  }

  /** The default JWT-SVID for `audience`. */
  async fetchJwtSvid(audience: string | readonly string[], spiffeId?: SpiffeId | string): Promise<JwtSvid> {
    return (await this.fetchJwtSvids(audience, spiffeId))[0] as JwtSvid;
  }
}
