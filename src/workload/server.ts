import { chmod, lstat, mkdir, stat, unlink } from 'node:fs/promises';
import net from 'node:net';
import { dirname } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { readProcessStartTime } from '../agent/attestors/proc.ts';
import { AgentError, AgentErrorCode } from '../agent/errors.ts';
import type { SpiffeBundle } from '../spiffe/bundle.ts';
import { isSpiffeError } from '../spiffe/errors.ts';
import { SpiffeId } from '../spiffe/id.ts';
import type { JwtSvid } from '../spiffe/jwtsvid.ts';
import { type PeerCredentials, peerCredentials } from './peercred.ts';
import {
  type JwtBundlesResponse,
  type JwtSvidRequest,
  type JwtSvidResponse,
  SECURITY_HEADER,
  toStruct,
  type ValidateJwtSvidRequest,
  type ValidateJwtSvidResponse,
  workloadApiService,
  type X509BundlesResponse,
  type X509SvidResponse,
} from './proto.ts';

/** One X.509-SVID as the Workload API sends it. */
export interface ServedX509Svid {
  readonly id: SpiffeId;
  /** Leaf then intermediates, concatenated DER. */
  readonly chainDer: Buffer;
  /** PKCS#8 DER. */
  readonly keyDer: Buffer;
  readonly hint?: string;
  readonly notAfter: Date;
}

/**
 * What one caller is entitled to at one moment. Immutable: a change produces a new state (new objects), which
 * is how the server tells that something must be pushed.
 */
export interface WorkloadState {
  /** Default identity first; hints unique. Empty: the caller has no identity (PermissionDenied). */
  readonly svids: readonly ServedX509Svid[];
  /** The bundle of the server's own trust domain. */
  readonly bundle: SpiffeBundle;
  /** Bundles of the trust domains the caller's entries federate with. */
  readonly federatedBundles: readonly SpiffeBundle[];
}

/** The agent behind the Workload API: who a caller is, what it gets, and when that changes. */
export interface WorkloadApiBackend {
  /** Selectors of the caller (formatted `type:value`). Throws to refuse the caller. */
  attest(caller: PeerCredentials, signal: AbortSignal): Promise<ReadonlySet<string>>;
  state(selectors: ReadonlySet<string>): Promise<WorkloadState>;
  /** Calls `listener` after anything that may change some caller's state; returns the unsubscribe function. */
  subscribe(listener: () => void): () => void;
  mintJwtSvids(
    selectors: ReadonlySet<string>,
    audience: readonly string[],
    id?: SpiffeId,
  ): Promise<JwtSvid[]>;
  validateJwtSvid(selectors: ReadonlySet<string>, token: string, audience: string): Promise<JwtSvid>;
}

export interface WorkloadApiServerOptions {
  readonly socketPath: string;
  readonly backend: WorkloadApiBackend;
  readonly logger: Logger;
  /** Permissions of the socket file (default 0o777: every local process may ask; the directory guards it). */
  readonly socketMode?: number;
  /** procfs root for the PID-reuse guard (default /proc; tests use a fake tree). */
  readonly procRoot?: string;
}

export interface WorkloadApiStats {
  readonly connections: number;
  /** Streams and unary calls opened, by method name. */
  readonly calls: Readonly<Record<string, number>>;
  /** Stream messages sent, by method name. */
  readonly messages: Readonly<Record<string, number>>;
}

interface Connection {
  readonly credentials: PeerCredentials;
  readonly startTime: bigint;
}

type StreamKind = 'FetchX509SVID' | 'FetchX509Bundles' | 'FetchJWTBundles';

class RpcError extends Error {
  readonly grpcCode: grpc.status;
  constructor(code: grpc.status, message: string) {
    super(message);
    this.grpcCode = code;
  }
}

const CONNECTION_PREFIX = 'workload-api-conn:';
const ENCODED_CACHE_LIMIT = 256;

/**
 * The SPIFFE Workload API over a Unix socket.
 *
 * The server owns the listening socket so it can read SO_PEERCRED of every accepted connection before gRPC sees
 * it, then hands the connection to grpc-js. Each call is attested from its connection's credentials, with a
 * guard against PID reuse: the process start time is read when the connection is accepted and again after
 * attestation, and any difference refuses the call.
 */
export class WorkloadApiServer {
  readonly socketPath: string;
  readonly #backend: WorkloadApiBackend;
  readonly #log: Logger;
  readonly #socketMode: number;
  readonly #procRoot: string | undefined;
  readonly #grpc = new grpc.Server();
  readonly #connections = new Map<string, Connection>();
  readonly #sockets = new Set<net.Socket>();
  readonly #encoded = new Map<string, Buffer>();
  readonly #objectIds = new WeakMap<object, number>();
  readonly #calls: Record<string, number> = {};
  readonly #messages: Record<string, number> = {};
  #nextObjectId = 1;
  #nextConnection = 1;
  #totalConnections = 0;
  #net: net.Server | undefined;
  #injector: ReturnType<grpc.Server['createConnectionInjector']> | undefined;
  #closing = false;

  constructor(options: WorkloadApiServerOptions) {
    this.socketPath = options.socketPath;
    this.#backend = options.backend;
    this.#log = options.logger;
    this.#socketMode = options.socketMode ?? 0o777;
    this.#procRoot = options.procRoot;
    this.#grpc.addService(preEncodedService(), {
      FetchX509SVID: (call: grpc.ServerWritableStream<unknown, unknown>) =>
        this.#stream('FetchX509SVID', call),
      FetchX509Bundles: (call: grpc.ServerWritableStream<unknown, unknown>) =>
        this.#stream('FetchX509Bundles', call),
      FetchJWTBundles: (call: grpc.ServerWritableStream<unknown, unknown>) =>
        this.#stream('FetchJWTBundles', call),
      FetchJWTSVID: (
        call: grpc.ServerUnaryCall<JwtSvidRequest, JwtSvidResponse>,
        callback: grpc.sendUnaryData<JwtSvidResponse>,
      ) =>
        this.#unary(
          'FetchJWTSVID',
          call,
          callback,
          (selectors) => this.#fetchJwtSvid(call.request, selectors),
          {
            beforeAttest: () => requestedJwtSvid(call.request),
          },
        ),
      ValidateJWTSVID: (
        call: grpc.ServerUnaryCall<ValidateJwtSvidRequest, ValidateJwtSvidResponse>,
        callback: grpc.sendUnaryData<ValidateJwtSvidResponse>,
      ) =>
        this.#unary(
          'ValidateJWTSVID',
          call,
          callback,
          (selectors) => this.#validateJwtSvid(call.request, selectors),
          {
            beforeAttest: () => validateJwtRequest(call.request),
          },
        ),
      FetchWITSVID: (call: grpc.ServerWritableStream<unknown, unknown>) =>
        unimplemented(call, 'FetchWITSVID'),
      FetchWITBundles: (call: grpc.ServerWritableStream<unknown, unknown>) =>
        unimplemented(call, 'FetchWITBundles'),
    });
  }

  get stats(): WorkloadApiStats {
    return {
      connections: this.#totalConnections,
      calls: { ...this.#calls },
      messages: { ...this.#messages },
    };
  }

  /** Creates the socket (and its directory), refusing unsafe or occupied paths. */
  async listen(): Promise<void> {
    await prepareSocketPath(this.socketPath);
    this.#injector = this.#grpc.createConnectionInjector(grpc.ServerCredentials.createInsecure());
    const server = net.createServer((socket) => {
      this.#accept(socket).catch((err: Error) => {
        this.#log.warn(
          { err: { message: err.message, code: (err as AgentError).code } },
          'connection refused',
        );
        socket.destroy();
      });
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.#net = server;
    await chmod(this.socketPath, this.#socketMode);
    this.#log.info({ socket: this.socketPath, mode: this.#socketMode.toString(8) }, 'Workload API listening');
  }

  /** Stops accepting, ends every stream, and removes the socket. */
  async close(): Promise<void> {
    this.#closing = true;
    const server = this.#net;
    this.#net = undefined;
    this.#injector?.destroy();
    for (const socket of this.#sockets) socket.destroy();
    this.#grpc.forceShutdown();
    if (server) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      // Only the socket this server created: one that never listened (e.g. refused because another server
      // answers on the path) must leave that server's socket alone.
      await unlink(this.socketPath).catch(() => {});
    }
  }

  async #accept(socket: net.Socket): Promise<void> {
    if (this.#closing) throw new Error('server closing');
    const credentials = peerCredentials(socket);
    const startTime = await readProcessStartTime(credentials.pid, this.#procRoot);
    const token = `${CONNECTION_PREFIX}${this.#nextConnection++}`;
    // grpc-js reports a call's peer as its socket's remoteAddress (undefined for Unix sockets), so naming the
    // connection there is how a call finds the credentials of the connection it arrived on.
    Object.defineProperty(socket, 'remoteAddress', { value: token, configurable: true });
    this.#connections.set(token, { credentials, startTime });
    this.#sockets.add(socket);
    this.#totalConnections++;
    socket.once('close', () => {
      this.#connections.delete(token);
      this.#sockets.delete(socket);
    });
    this.#injector?.injectConnection(socket);
  }

  /** Security header, caller lookup, attestation, PID-reuse guard. Throws RpcError. */
  async #admit(
    call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>,
    signal: AbortSignal,
  ): Promise<ReadonlySet<string>> {
    const header = call.metadata.get(SECURITY_HEADER);
    if (header.length !== 1 || header[0] !== 'true') {
      throw new RpcError(
        grpc.status.INVALID_ARGUMENT,
        `security header missing from request: ${SECURITY_HEADER}: true`,
      );
    }
    const connection = this.#connections.get(call.getPeer());
    if (connection === undefined)
      throw new RpcError(grpc.status.INTERNAL, 'the connection of this call is unknown');
    const { credentials, startTime } = connection;
    let selectors: ReadonlySet<string>;
    try {
      selectors = await this.#backend.attest(credentials, signal);
    } catch (err) {
      this.#log.warn(
        { pid: credentials.pid, uid: credentials.uid, err: errInfo(err) },
        'workload attestation failed',
      );
      throw new RpcError(
        grpc.status.PERMISSION_DENIED,
        `workload attestation failed: ${(err as Error).message}`,
      );
    }
    const after = await readProcessStartTime(credentials.pid, this.#procRoot).catch(() => undefined);
    if (after !== startTime) {
      this.#log.warn({ pid: credentials.pid }, 'caller exited or its PID was reused during attestation');
      throw new RpcError(grpc.status.PERMISSION_DENIED, 'the calling process exited or its PID was reused');
    }
    return selectors;
  }

  #count(method: string): void {
    this.#calls[method] = (this.#calls[method] ?? 0) + 1;
  }

  async #stream(kind: StreamKind, call: grpc.ServerWritableStream<unknown, unknown>): Promise<void> {
    this.#count(kind);
    const abort = new AbortController();
    let unsubscribe = (): void => {};
    let finished = false;
    const finish = (error?: RpcError): void => {
      if (finished) return;
      finished = true;
      unsubscribe();
      abort.abort();
      if (error) {
        call.emit('error', { code: error.grpcCode, details: error.message });
      } else {
        call.end();
      }
    };
    call.on('cancelled', () => finish());
    call.on('close', () => finish());
    call.on('error', () => finish());
    let selectors: ReadonlySet<string>;
    try {
      selectors = await this.#admit(call, abort.signal);
    } catch (err) {
      finish(asRpcError(err));
      return;
    }
    if (finished) return;
    let last = '';
    let running = false;
    let again = false;
    const push = async (): Promise<void> => {
      if (running) {
        again = true;
        return;
      }
      running = true;
      try {
        do {
          again = false;
          const state = await this.#backend.state(selectors);
          if (finished) return;
          const encoded = this.#encode(kind, state);
          if (encoded instanceof RpcError) {
            finish(encoded);
            return;
          }
          if (encoded.fingerprint !== last) {
            last = encoded.fingerprint;
            call.write(encoded.bytes);
            this.#messages[kind] = (this.#messages[kind] ?? 0) + 1;
          }
        } while (again && !finished);
      } catch (err) {
        this.#log.error({ err: errInfo(err), method: kind }, 'stream update failed');
        finish(
          new RpcError(grpc.status.UNAVAILABLE, `could not build the response: ${(err as Error).message}`),
        );
      } finally {
        running = false;
      }
    };
    unsubscribe = this.#backend.subscribe(() => {
      void push();
    });
    this.#log.debug({ method: kind, selectors: [...selectors] }, 'stream opened');
    await push();
  }

  async #unary<Req, Res>(
    method: string,
    call: grpc.ServerUnaryCall<Req, Res>,
    callback: grpc.sendUnaryData<Res>,
    handle: (selectors: ReadonlySet<string>) => Promise<Res>,
    hooks: { beforeAttest?: () => void } = {},
  ): Promise<void> {
    this.#count(method);
    const abort = new AbortController();
    call.on('cancelled', () => abort.abort());
    try {
      const header = call.metadata.get(SECURITY_HEADER);
      if (header.length === 1 && header[0] === 'true') hooks.beforeAttest?.();
      const selectors = await this.#admit(call, abort.signal);
      callback(null, await handle(selectors));
    } catch (err) {
      const rpc = asRpcError(err);
      callback({ code: rpc.grpcCode, details: rpc.message });
    }
  }

  async #fetchJwtSvid(request: JwtSvidRequest, selectors: ReadonlySet<string>): Promise<JwtSvidResponse> {
    const { audience, id } = requestedJwtSvid(request);
    const svids = await this.#backend.mintJwtSvids(selectors, audience, id);
    if (svids.length === 0) throw new RpcError(grpc.status.PERMISSION_DENIED, 'no identity issued');
    return { svids: svids.map((s) => ({ spiffe_id: s.id.toString(), svid: s.token, hint: s.hint ?? '' })) };
  }

  async #validateJwtSvid(
    request: ValidateJwtSvidRequest,
    selectors: ReadonlySet<string>,
  ): Promise<ValidateJwtSvidResponse> {
    try {
      const svid = await this.#backend.validateJwtSvid(selectors, request.svid, request.audience);
      const claims: Record<string, unknown> = { ...svid.claims };
      // Always an array, as SPIRE answers, whatever form the token used.
      if (typeof claims.aud === 'string') claims.aud = [claims.aud];
      return { spiffe_id: svid.id.toString(), claims: toStruct(claims) };
    } catch (err) {
      if (isSpiffeError(err)) throw new RpcError(grpc.status.INVALID_ARGUMENT, `${err.code}: ${err.message}`);
      throw err;
    }
  }

  /** Encodes a stream message once per distinct state, so a change pushed to many streams is encoded once. */
  #encode(kind: StreamKind, state: WorkloadState): { fingerprint: string; bytes: Buffer } | RpcError {
    if (state.svids.length === 0) return new RpcError(grpc.status.PERMISSION_DENIED, 'no identity issued');
    const bundles = [state.bundle, ...state.federatedBundles];
    const bundleIds = bundles.map((b) => this.#objectId(b)).join(',');
    const fingerprint =
      kind === 'FetchX509SVID'
        ? `${kind}|${state.svids.map((s) => this.#objectId(s)).join(',')}|${bundleIds}`
        : `${kind}|${bundleIds}`;
    const cached = this.#encoded.get(fingerprint);
    if (cached !== undefined) return { fingerprint, bytes: cached };
    let message: X509SvidResponse | X509BundlesResponse | JwtBundlesResponse;
    if (kind === 'FetchX509SVID') {
      const own = derBundle(state.bundle);
      message = {
        svids: state.svids.map((s) => ({
          spiffe_id: s.id.toString(),
          x509_svid: s.chainDer,
          x509_svid_key: s.keyDer,
          bundle: own,
          hint: s.hint ?? '',
        })),
        crl: [],
        federated_bundles: Object.fromEntries(
          state.federatedBundles.map((b) => [b.trustDomain.idString, derBundle(b)]),
        ),
      };
    } else if (kind === 'FetchX509Bundles') {
      message = {
        crl: [],
        bundles: Object.fromEntries(bundles.map((b) => [b.trustDomain.idString, derBundle(b)])),
      };
    } else {
      message = { bundles: Object.fromEntries(bundles.map((b) => [b.trustDomain.idString, jwks(b)])) };
    }
    const bytes = serializeResponse(kind, message);
    if (this.#encoded.size >= ENCODED_CACHE_LIMIT) this.#encoded.clear();
    this.#encoded.set(fingerprint, bytes);
    return { fingerprint, bytes };
  }

  #objectId(object: object): number {
    let id = this.#objectIds.get(object);
    if (id === undefined) {
      id = this.#nextObjectId++;
      this.#objectIds.set(object, id);
    }
    return id;
  }
}

function derBundle(bundle: SpiffeBundle): Buffer {
  return Buffer.concat(bundle.x509Authorities.map((c) => c.raw));
}

/** A JWK Set of the bundle's JWT authorities only (the Workload API must not include other keys). */
function jwks(bundle: SpiffeBundle): Buffer {
  const keys = [...bundle.jwtAuthorities].map(([kid, key]) => {
    const { kty, crv, x, y, n, e } = key.export({ format: 'jwk' });
    return Object.fromEntries(
      Object.entries({ kty, kid, crv, x, y, n, e }).filter(([, v]) => v !== undefined),
    );
  });
  return Buffer.from(JSON.stringify({ keys }));
}

function requestedJwtSvid(request: JwtSvidRequest): { audience: string[]; id: SpiffeId | undefined } {
  const audience = request.audience ?? [];
  if (audience.length === 0 || audience.some((a) => a === '')) {
    throw new RpcError(grpc.status.INVALID_ARGUMENT, 'audience must be specified');
  }
  if (!request.spiffe_id) return { audience, id: undefined };
  try {
    return { audience, id: SpiffeId.parse(request.spiffe_id) };
  } catch (err) {
    throw new RpcError(
      grpc.status.INVALID_ARGUMENT,
      `invalid requested SPIFFE ID: ${(err as Error).message}`,
    );
  }
}

function validateJwtRequest(request: ValidateJwtSvidRequest): void {
  if (!request.audience) throw new RpcError(grpc.status.INVALID_ARGUMENT, 'audience must be specified');
  if (!request.svid) throw new RpcError(grpc.status.INVALID_ARGUMENT, 'svid must be specified');
}

function unimplemented(call: grpc.ServerWritableStream<unknown, unknown>, method: string): void {
  call.emit('error', {
    code: grpc.status.UNIMPLEMENTED,
    details: `${method}: the WIT-SVID profile is not supported by this server`,
  });
}

function asRpcError(err: unknown): RpcError {
  if (err instanceof RpcError) return err;
  return new RpcError(grpc.status.UNAVAILABLE, (err as Error).message);
}

function errInfo(err: unknown): { message: string; code?: string } {
  const e = err as { message?: string; code?: string };
  return { message: String(e?.message ?? err), ...(typeof e?.code === 'string' ? { code: e.code } : {}) };
}

const streamSerializers = new Map<string, grpc.serialize<unknown>>();

/** The service definition with stream responses that accept bytes encoded in advance. */
function preEncodedService(): grpc.ServiceDefinition {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [name, method] of Object.entries(workloadApiService)) {
    const serialize = method.responseSerialize;
    streamSerializers.set(name, serialize);
    out[name] = {
      ...method,
      responseSerialize: (value: unknown) => (Buffer.isBuffer(value) ? value : serialize(value)),
    };
  }
  return out;
}

function serializeResponse(kind: StreamKind, message: unknown): Buffer {
  const serialize =
    streamSerializers.get(kind) ?? (workloadApiService[kind]?.responseSerialize as grpc.serialize<unknown>);
  return serialize(message);
}

/**
 * Makes the socket's directory if needed and refuses paths another user could tamper with: a directory writable
 * by others without the sticky bit, an existing non-socket file, or a socket another server still answers on.
 */
export async function prepareSocketPath(socketPath: string): Promise<void> {
  const fail = (message: string): never => {
    throw new AgentError(AgentErrorCode.Config, `socket ${socketPath}: ${message}`);
  };
  const dir = dirname(socketPath);
  await mkdir(dir, { recursive: true, mode: 0o755 });
  const dirStat = await stat(dir);
  if ((dirStat.mode & 0o002) !== 0 && (dirStat.mode & 0o1000) === 0) {
    fail(`directory ${dir} is writable by every user and not sticky; anyone could replace the socket`);
  }
  const existing = await lstat(socketPath).catch(() => undefined);
  if (existing === undefined) return;
  if (!existing.isSocket()) fail('the path exists and is not a socket; refusing to replace it');
  // Only a refused connection proves the socket is stale; any other error (EAGAIN: a live server's backlog is
  // full, EACCES) leaves the question open, and then we refuse rather than unlink someone's live socket.
  const probe = await new Promise<'live' | 'stale' | string>((resolve) => {
    const socket = net.connect(socketPath);
    socket.once('connect', () => {
      socket.destroy();
      resolve('live');
    });
    socket.once('error', (err: NodeJS.ErrnoException) =>
      resolve(err.code === 'ECONNREFUSED' ? 'stale' : (err.code ?? err.message)),
    );
  });
  if (probe !== 'live' && probe !== 'stale')
    fail(`cannot tell whether another server is listening on it (${probe})`);
  const live = probe === 'live';
  if (live) fail('another server is listening on it');
  await unlink(socketPath);
}
