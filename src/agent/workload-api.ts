import { randomBytes } from 'node:crypto';
import { chmod, link, unlink } from 'node:fs/promises';
import net from 'node:net';
import { dirname, join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { SpiffeBundle } from '../spiffe/bundle.ts';
import { isSpiffeError } from '../spiffe/errors.ts';
import { SpiffeId } from '../spiffe/id.ts';
import type { JwtSvid } from '../spiffe/jwtsvid.ts';
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
} from '../workload/proto.ts';
import { readProcessStartTime } from './attestors/proc.ts';
import { AgentError, AgentErrorCode } from './errors.ts';
import { type PeerCredentials, peerCredentials } from './peercred.ts';
import {
  prepareSocketPath,
  removeSocketFile,
  type SocketFileId,
  socketDirectoryMode,
  socketFileId,
} from './socket.ts';

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
  /**
   * Permissions of the socket file (default 0o777: every local process may ask). A directory the server creates
   * for it gets the matching search bits (0755 for 0777, 0750 for 0660, 0700 for 0600).
   */
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
  /** The socket this server linked into place, at its real path: the only file `close()` may remove. */
  #socket: { readonly path: string; readonly id: SocketFileId } | undefined;
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

  /**
   * Creates the socket (and its directory), refusing unsafe or occupied paths (see socket.ts). The socket is
   * bound under a temporary name, given its mode, then linked into place: it is never reachable with the
   * umask's mode, and the name libuv unlinks when the server closes is the temporary one, not the socket path,
   * which `close()` removes only if it still holds this very socket.
   */
  async listen(): Promise<void> {
    const { state, realPath } = await prepareSocketPath(this.socketPath, {
      directoryMode: socketDirectoryMode(this.#socketMode),
    });
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
    const bound = join(dirname(realPath), `.${randomBytes(4).toString('hex')}.sock`);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(bound, () => {
        server.off('error', reject);
        resolve();
      });
    });
    try {
      await chmod(bound, this.#socketMode);
      const id = await socketFileId(bound);
      // The directory passed the checks, so only root or this user could have changed the path since.
      if (state === 'stale') await unlink(realPath).catch(() => {});
      await link(bound, realPath).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'EEXIST') throw err;
        throw new AgentError(
          AgentErrorCode.SocketInUse,
          `socket ${this.socketPath}: created by someone else while this server was starting`,
        );
      });
      this.#socket = { path: realPath, id };
      await unlink(bound);
    } catch (err) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      throw err;
    }
    this.#net = server;
    this.#log.info({ socket: this.socketPath, mode: this.#socketMode.toString(8) }, 'Workload API listening');
  }

  /** Stops accepting, ends every stream, and removes the socket if the path still holds the one it created. */
  async close(): Promise<void> {
    this.#closing = true;
    const server = this.#net;
    this.#net = undefined;
    this.#injector?.destroy();
    for (const socket of this.#sockets) socket.destroy();
    this.#grpc.forceShutdown();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    const own = this.#socket;
    this.#socket = undefined;
    if (own === undefined) return; // never bound: whatever is at the path belongs to someone else
    if ((await removeSocketFile(own.path, own.id)) === 'replaced') {
      this.#log.warn(
        { socket: this.socketPath },
        'the socket path holds a file this server did not create; left in place',
      );
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
