import type {
  IncomingHttpHeaders,
  IncomingMessage,
  OutgoingHttpHeaders,
  RequestOptions,
  ServerResponse,
} from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse, ServerHttp2Stream } from 'node:http2';
import http2 from 'node:http2';
import https from 'node:https';
import type { Duplex } from 'node:stream';
import type { KubeIdentity } from '../policy/types.ts';
import { ProxyError, ProxyErrorCode } from './errors.ts';

/** Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction. */
export const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'http2-settings',
]);

/** Request headers a client must never choose: credentials and identity assertions are the proxy's to set. */
function isIdentityHeader(name: string): boolean {
  return (
    name === 'authorization' ||
    name === 'proxy-authorization' ||
    name.startsWith('impersonate-') ||
    name.startsWith('x-remote-') ||
    name.startsWith('x-forwarded-') ||
    // Client addresses kube-apiserver may record as audit source IPs: only the proxy says where a client is.
    name === 'forwarded' ||
    name === 'x-real-ip' ||
    // kube-apiserver keeps a request's Audit-ID as its own audit ID: the ID is the proxy's, joining both logs.
    name === 'audit-id' ||
    // Some servers and proxies fold "_" into "-" (X_Remote_User would become X-Remote-User): never forwarded.
    name.includes('_')
  );
}

/** The headers a message's Connection header names: hop-by-hop for this message, never forwarded. */
export function namedInConnection(incoming: IncomingHttpHeaders): Set<string> {
  const named = new Set<string>();
  for (const value of [incoming.connection ?? []].flat()) {
    for (const token of String(value).split(',')) named.add(token.trim().toLowerCase());
  }
  return named;
}

/**
 * Escapes an Impersonate-Extra key as client-go does (and kube-apiserver unescapes): every byte that is not a
 * legal header-name character (RFC 7230 tchar), and '%', becomes %XX.
 */
export function escapeExtraKey(key: string): string {
  let out = '';
  for (const byte of Buffer.from(key, 'utf8')) {
    const c = String.fromCharCode(byte);
    if (/[A-Za-z0-9!#$&'*+\-.^_`|~]/.test(c)) out += c;
    else out += `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/**
 * The request headers sent upstream, built in a fixed order: drop hop-by-hop headers and every header the
 * client named in Connection; drop every credential and identity header, whatever its case; then add ours.
 * HTTP/2 pseudo-headers are dropped (the upstream request sets method and path itself).
 */
export function upstreamHeaders(
  incoming: IncomingHttpHeaders,
  identity: KubeIdentity,
  credential: { authorization?: string },
  peerAddress: string | undefined,
  auditId?: string,
): OutgoingHttpHeaders {
  const named = incoming.connection === undefined ? undefined : namedInConnection(incoming);
  const out: OutgoingHttpHeaders = {};
  for (const rawName in incoming) {
    const value = incoming[rawName];
    const name = rawName.toLowerCase();
    if (value === undefined || name.startsWith(':') || name === 'host') continue;
    if (HOP_BY_HOP.has(name) || named?.has(name) || isIdentityHeader(name)) continue;
    out[name] = value;
  }
  if (credential.authorization) out.authorization = credential.authorization;
  const impersonation = impersonationHeaders(identity);
  for (let i = 0; i < impersonation.length; i += 2) {
    out[impersonation[i] as string] = impersonation[i + 1];
  }
  if (peerAddress) out['x-forwarded-for'] = peerAddress;
  if (auditId) out['audit-id'] = auditId;
  return out;
}

/**
 * The Impersonate-* headers of an identity, as name/value pairs, built once per identity object: the policy's
 * decision (and so its identity) is reused across a connection's requests, so most requests find them here.
 */
const impersonationCache = new WeakMap<KubeIdentity, readonly (string | string[])[]>();

function impersonationHeaders(identity: KubeIdentity): readonly (string | string[])[] {
  let pairs = impersonationCache.get(identity);
  if (pairs !== undefined) return pairs;
  // The arrays are shared by every request of the identity: nothing downstream mutates header values.
  const built: (string | string[])[] = ['impersonate-user', identity.user];
  if (identity.groups.length > 0) built.push('impersonate-group', [...identity.groups]);
  if (identity.uid) built.push('impersonate-uid', identity.uid);
  for (const [key, values] of Object.entries(identity.extra)) {
    if (values.length > 0) built.push(`impersonate-extra-${escapeExtraKey(key)}`, [...values]);
  }
  pairs = Object.freeze(built);
  impersonationCache.set(identity, pairs);
  return pairs;
}

/** Response headers relayed to the client: hop-by-hop ones removed (HTTP/2 forbids them outright). */
export function downstreamHeaders(incoming: IncomingHttpHeaders): OutgoingHttpHeaders {
  const named = incoming.connection === undefined ? undefined : namedInConnection(incoming);
  const out: OutgoingHttpHeaders = {};
  for (const name in incoming) {
    const value = incoming[name];
    if (value === undefined || HOP_BY_HOP.has(name) || named?.has(name)) continue;
    out[name] = value;
  }
  return out;
}

export interface UpstreamOptions {
  /** kube-apiserver's origin, e.g. https://127.0.0.1:6443 (a path is never used: targets go as received). */
  readonly url: URL;
  /** CA bundle (PEM) for the apiserver's serving certificate. */
  readonly ca?: string;
  /** The proxy's own credential. */
  readonly authorization: () => string | undefined;
  readonly clientCert?: string;
  readonly clientKey?: string;
  /** How long an ordinary (not long-running) request may wait for response headers (default 70 s). */
  readonly responseHeadersTimeoutMs?: number;
  /** How long a long-running request (watch, exec, follow…) may wait for its headers or its 101 (default 30 s). */
  readonly longRunningHeadersTimeoutMs?: number;
  /** HTTP/2 sessions to kube-apiserver for ordinary requests (default 4); a new one opens when all are full. */
  readonly maxSessions?: number;
  /** HTTP/2 sessions to kube-apiserver for long-running requests (default 16), apart from ordinary ones. */
  readonly maxLongRunningSessions?: number;
}

/** Where an answer from kube-apiserver goes: an HTTP/1.1 response, or an HTTP/2 stream. */
interface Downstream {
  /** The request body to relay upstream; undefined when the request has none (HTTP/2 END_STREAM). */
  readonly body: NodeJS.ReadableStream | undefined;
  /** The client's HTTP/2 stream, if any: an upload still coming after the answer is reset (endUnreadUpload). */
  readonly stream: ServerHttp2Stream | undefined;
  /** Sends the response head; returns where the body goes. */
  respond(status: number, headers: OutgoingHttpHeaders): NodeJS.WritableStream;
  destroy(): void;
  onClose(listener: () => void): void;
}

/** A failed forward: `ERR_PROXY_LIMIT` when a limit refused it (`limit` names the key), else `ERR_UPSTREAM`. */
export class UpstreamError extends ProxyError {
  /** 502: kube-apiserver answered badly or the TLS/HTTP exchange failed; 503: unreachable or full; 504: no answer in time. */
  readonly status: 502 | 503 | 504;
  /** The configuration key of the limit that refused the request, when one did. */
  readonly limit: string | undefined;
  constructor(status: 502 | 503 | 504, message: string, options?: ErrorOptions & { limit?: string }) {
    super(options?.limit ? ProxyErrorCode.Limit : ProxyErrorCode.Upstream, message, options);
    this.name = 'UpstreamError';
    this.status = status;
    this.limit = options?.limit;
  }
}

/** Connection errors that mean "nobody is there" (503), as opposed to a broken exchange (502). */
const UNREACHABLE = new Set([
  'ECONNREFUSED',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ECONNRESET',
]);

function upstreamFailure(origin: string, err: Error & { code?: string }): UpstreamError {
  if (err instanceof UpstreamError) return err;
  // HTTP/2 reports a failed connect as a cancelled stream whose cause is the connect error.
  const cause = (err as { cause?: { code?: string } }).cause;
  const code = err.code === 'ERR_HTTP2_STREAM_CANCEL' && cause?.code !== undefined ? cause.code : err.code;
  const status = code !== undefined && UNREACHABLE.has(code) ? 503 : 502;
  return new UpstreamError(status, `kube-apiserver at ${origin}: ${err.message}`, { cause: err });
}

/** How long a request that is not long-running may wait for kube-apiserver's response headers. */
export const RESPONSE_HEADERS_TIMEOUT_MS = 70_000;
/** How long a watch, exec, attach, port-forward or followed log may wait for its headers (or its 101). */
export const LONG_RUNNING_HEADERS_TIMEOUT_MS = 30_000;
/** HTTP/2 sessions kept to kube-apiserver for ordinary requests; a new one opens only when the others are full. */
export const MAX_SESSIONS = 4;
/** HTTP/2 sessions for long-running requests, so watches can never take the streams ordinary requests need. */
export const MAX_LONG_RUNNING_SESSIONS = 16;
/** Streams assumed per session until kube-apiserver's SETTINGS say otherwise (Go's transport assumes 100 too). */
const DEFAULT_STREAMS_PER_SESSION = 100;

interface PooledSession {
  readonly session: http2.ClientHttp2Session;
  active: number;
}

/** One set of multiplexed sessions: grows while every session's streams are taken, up to `max`. */
class SessionPool {
  readonly #sessions: PooledSession[] = [];
  readonly name: string;
  readonly key: string;
  readonly max: number;

  constructor(name: string, key: string, max: number) {
    this.name = name;
    this.key = key;
    this.max = max;
  }

  /** Sessions open now and streams in use, for metrics and readiness. */
  usage(): { sessions: number; streams: number; capacity: number } {
    const live = this.#live();
    let streams = 0;
    let capacity = (this.max - live.length) * DEFAULT_STREAMS_PER_SESSION;
    for (const p of live) {
      streams += p.active;
      capacity += limitOf(p);
    }
    return { sessions: live.length, streams, capacity };
  }

  #live(): PooledSession[] {
    return this.#sessions.filter((p) => !p.session.closed && !p.session.destroyed);
  }

  /** A session with room for one more stream, a new one while under `max`, or undefined when all are full. */
  acquire(connect: () => http2.ClientHttp2Session): PooledSession | undefined {
    const live = this.#live();
    let best: PooledSession | undefined;
    for (const p of live)
      if (p.active < limitOf(p) && (best === undefined || p.active < best.active)) best = p;
    if (best !== undefined) return best;
    if (live.length >= this.max) return undefined;
    const pooled: PooledSession = { session: connect(), active: 0 };
    const leave = (): void => {
      const i = this.#sessions.indexOf(pooled);
      if (i >= 0) this.#sessions.splice(i, 1);
    };
    pooled.session.on('goaway', leave);
    pooled.session.on('close', leave);
    pooled.session.on('error', leave);
    // Idle sessions must not keep the process alive; streams ref it while they run.
    pooled.session.unref();
    this.#sessions.push(pooled);
    return pooled;
  }

  /** Closes every session gracefully (open streams finish) and forgets them. */
  close(): void {
    for (const { session } of this.#sessions.splice(0)) session.close();
  }
}

function limitOf(p: PooledSession): number {
  return p.session.remoteSettings?.maxConcurrentStreams ?? DEFAULT_STREAMS_PER_SESSION;
}

/** Options for node:https.request that reach the configured origin with `target` sent exactly as given. */
function originRequest(url: URL, target: string): RequestOptions {
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  return {
    protocol: url.protocol,
    hostname: host,
    port: url.port === '' ? 443 : Number(url.port),
    // The target is never parsed or resolved against the origin (WHATWG URL parsing reads "\\" as "/" and resolves
    // dot segments, which once sent the proxy's credential to a host the client named): it goes byte for byte, as
    // the policy judged it.
    path: target,
    // The configured origin, not the client's Host.
    setHost: true,
  };
}

/**
 * Forwards requests to kube-apiserver and streams answers back without buffering. Every request goes to the
 * configured origin with the client's request target exactly as received (and as the policy judged it).
 *
 * Ordinary requests go over a few multiplexed HTTP/2 sessions; long-running ones (watch, exec, follow…) over a
 * pool of their own, so a client holding many watches cannot take the streams every other client's GET needs.
 * Each pool opens another session when all streams of its sessions are taken (as Go's HTTP/2 transport does), up
 * to its cap; past that a request is refused at once with a 503 naming the limit. A session that receives GOAWAY
 * or fails leaves its pool; its open streams finish. Upgrade requests (SPDY/3.1 and WebSocket: exec, attach, cp,
 * port-forward) go over a fresh HTTP/1.1 connection each, since an upgrade is impossible over HTTP/2; a 101 joins
 * the two connections, and any other answer is relayed unchanged and the connection closed, so kubectl can fall
 * back (WebSocket → SPDY) and no second request can slip through a raw tunnel. The origin is `https:` only:
 * the proxy's credential and the impersonation headers never travel in clear.
 */
export class Upstream {
  #options: UpstreamOptions;
  #agent: https.Agent;
  #ordinary: SessionPool;
  #longRunning: SessionPool;
  readonly #headersTimeoutMs: number;
  readonly #longRunningHeadersTimeoutMs: number;
  #closed = false;

  constructor(options: UpstreamOptions) {
    if (options.url.protocol !== 'https:') {
      throw new Error(`the upstream must be https:// (got ${options.url.protocol}//${options.url.host})`);
    }
    this.#options = options;
    this.#headersTimeoutMs = options.responseHeadersTimeoutMs ?? RESPONSE_HEADERS_TIMEOUT_MS;
    this.#longRunningHeadersTimeoutMs =
      options.longRunningHeadersTimeoutMs ?? LONG_RUNNING_HEADERS_TIMEOUT_MS;
    this.#agent = this.#newAgent();
    this.#ordinary = new SessionPool(
      'ordinary',
      'limits.maxUpstreamSessions',
      options.maxSessions ?? MAX_SESSIONS,
    );
    this.#longRunning = new SessionPool(
      'long-running',
      'limits.maxLongRunningUpstreamSessions',
      options.maxLongRunningSessions ?? MAX_LONG_RUNNING_SESSIONS,
    );
  }

  /** kube-apiserver's origin. */
  get url(): URL {
    return this.#options.url;
  }

  #newAgent(): https.Agent {
    return new https.Agent({ keepAlive: true, ...this.#tlsOptions() });
  }

  /**
   * Swaps the credential and trust (SIGHUP, a rotated client certificate): new requests use it; sessions opened
   * with the old one finish their streams and close. The origin must stay the same.
   */
  replaceCredential(
    options: Pick<UpstreamOptions, 'url' | 'ca' | 'authorization' | 'clientCert' | 'clientKey'>,
  ): void {
    if (options.url.origin !== this.url.origin) {
      throw new Error(
        `the upstream origin changed (${this.url.origin} → ${options.url.origin}); restart to apply`,
      );
    }
    this.#options = { ...this.#options, ...options };
    const oldAgent = this.#agent;
    this.#agent = this.#newAgent();
    oldAgent.destroy();
    const { ordinary, longRunning } = { ordinary: this.#ordinary, longRunning: this.#longRunning };
    this.#ordinary = new SessionPool(ordinary.name, ordinary.key, ordinary.max);
    this.#longRunning = new SessionPool(longRunning.name, longRunning.key, longRunning.max);
    ordinary.close();
    longRunning.close();
  }

  /** Sessions and streams in use per pool, for metrics and readiness. */
  usage(): Record<
    'ordinary' | 'longRunning',
    { sessions: number; streams: number; capacity: number; max: number }
  > {
    return {
      ordinary: { ...this.#ordinary.usage(), max: this.#ordinary.max },
      longRunning: { ...this.#longRunning.usage(), max: this.#longRunning.max },
    };
  }

  #tlsOptions(): { ca?: string; cert?: string; key?: string } {
    const o = this.#options;
    return {
      ...(o.ca ? { ca: o.ca } : {}),
      ...(o.clientCert ? { cert: o.clientCert } : {}),
      ...(o.clientKey ? { key: o.clientKey } : {}),
    };
  }

  #timeoutError(longRunning: boolean): UpstreamError {
    const ms = longRunning ? this.#longRunningHeadersTimeoutMs : this.#headersTimeoutMs;
    const key = longRunning ? 'timeouts.longRunningResponseHeaders' : 'timeouts.responseHeaders';
    return new UpstreamError(504, `kube-apiserver did not answer within ${ms / 1000}s (${key})`, {
      limit: key,
    });
  }

  /** An HTTP/1.1 request (or an HTTP/2 one through the compatibility API), answered on `res`. */
  forward(
    req: IncomingMessage | Http2ServerRequest,
    res: ServerResponse | Http2ServerResponse,
    identity: KubeIdentity,
    peerAddress: string | undefined,
    options: { longRunning?: boolean; auditId?: string } = {},
  ): Promise<number> {
    const authorization = this.#options.authorization();
    const headers = upstreamHeaders(
      req.headers,
      identity,
      authorization ? { authorization } : {},
      peerAddress,
      options.auditId,
    );
    return this.#forwardHttp2(
      req.method ?? 'GET',
      req.url ?? '/',
      headers,
      {
        // A request that ended with its headers (HTTP/2 END_STREAM) goes upstream the same way: no body to relay.
        body:
          'stream' in req && req.stream?.endAfterHeaders === true
            ? undefined
            : (req as NodeJS.ReadableStream),
        stream: 'stream' in req ? req.stream : undefined,
        respond: (status, relayed) => {
          // One call for the whole head (headers set earlier, e.g. Connection: close while draining, stay).
          (res as ServerResponse).writeHead(status, relayed);
          // Flush the headers now: a watch may send its first event much later.
          if ('flushHeaders' in res && typeof res.flushHeaders === 'function') res.flushHeaders();
          return res as NodeJS.WritableStream;
        },
        destroy: () => res.destroy(),
        onClose: (listener) => res.on('close', listener),
      },
      options,
    );
  }

  /**
   * An HTTP/2 stream, answered on the stream itself (no compatibility objects: the proxy's HTTP/2 hot path).
   * `headers` are the stream's, pseudo-headers included (they are never forwarded as such).
   */
  forwardStream(
    stream: ServerHttp2Stream,
    headers: IncomingHttpHeaders,
    identity: KubeIdentity,
    peerAddress: string | undefined,
    options: { longRunning?: boolean; auditId?: string } = {},
  ): Promise<number> {
    const authorization = this.#options.authorization();
    const outgoing = upstreamHeaders(
      headers,
      identity,
      authorization ? { authorization } : {},
      peerAddress,
      options.auditId,
    );
    return this.#forwardHttp2(
      String(headers[':method'] ?? 'GET'),
      String(headers[':path'] ?? '/'),
      outgoing,
      {
        body: stream.endAfterHeaders ? undefined : stream,
        stream,
        respond: (status, relayed) => {
          relayed[':status'] = status;
          stream.respond(relayed);
          return stream;
        },
        destroy: () => stream.destroy(),
        onClose: (listener) => stream.on('close', listener),
      },
      options,
    );
  }

  #forwardHttp2(
    method: string,
    target: string,
    headers: OutgoingHttpHeaders,
    downstream: Downstream,
    options: { longRunning?: boolean },
  ): Promise<number> {
    if (this.#closed) return Promise.reject(new UpstreamError(503, 'the proxy is shutting down'));
    const longRunning = options.longRunning === true;
    const pool = longRunning ? this.#longRunning : this.#ordinary;
    let pooled: PooledSession | undefined;
    try {
      pooled = pool.acquire(() => http2.connect(this.url.origin, this.#tlsOptions()));
    } catch (err) {
      return Promise.reject(upstreamFailure(this.url.origin, err as Error));
    }
    if (pooled === undefined) {
      return Promise.reject(
        new UpstreamError(
          503,
          `all ${pool.max} HTTP/2 sessions to kube-apiserver for ${pool.name} requests are full (${pool.key})`,
          { limit: pool.key },
        ),
      );
    }
    const { session } = pooled;
    const active = pooled;
    const bodiless = downstream.body === undefined;
    return new Promise((resolve, reject) => {
      let stream: http2.ClientHttp2Stream;
      try {
        headers[':method'] = method;
        // Exactly the target the policy judged.
        headers[':path'] = target;
        headers[':authority'] = this.url.host;
        headers[':scheme'] = 'https';
        stream = session.request(headers, { endStream: bodiless });
      } catch (err) {
        reject(upstreamFailure(this.url.origin, err as Error));
        return;
      }
      session.ref();
      active.active++;
      let answered = false;
      let answeredStatus = 502;
      const timer = setTimeout(
        () => {
          stream.close(http2.constants.NGHTTP2_CANCEL);
          reject(this.#timeoutError(longRunning));
        },
        longRunning ? this.#longRunningHeadersTimeoutMs : this.#headersTimeoutMs,
      );
      stream.on('close', () => {
        active.active--;
        if (active.active === 0) session.unref();
        clearTimeout(timer);
        if (!answered)
          reject(upstreamFailure(this.url.origin, new Error('the stream closed before an answer')));
        // A client that leaves mid-answer (a killed `logs -f`, a dropped watch) cancels the stream, so 'end'
        // never comes: the request is still finished, and must still be audited and counted.
        else resolve(answeredStatus);
      });
      stream.on('response', (upstreamHeaders) => {
        answered = true;
        clearTimeout(timer);
        const status = Number(upstreamHeaders[':status'] ?? 502);
        answeredStatus = status;
        const relayed = downstreamHeaders(upstreamHeaders as IncomingHttpHeaders);
        delete relayed[':status'];
        stream.pipe(downstream.respond(status, relayed));
        stream.on('end', () => resolve(status));
      });
      stream.on('error', (err) => {
        if (!answered) reject(upstreamFailure(this.url.origin, err));
        else downstream.destroy();
      });
      downstream.onClose(() => {
        if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
      });
      if (downstream.body === undefined) return;
      endUnreadUpload(downstream.stream);
      downstream.body.pipe(stream);
    });
  }

  /**
   * The upgrade path (HTTP/1.1 only): sends the sanitised request with its `Upgrade` to kube-apiserver on a new
   * connection. On 101 the two sockets are joined; on anything else the answer is relayed unchanged with
   * `Connection: close`, and both connections end. Resolves with the upstream status; rejects with a 504 when
   * neither comes within the long-running header timeout.
   */
  upgrade(
    req: IncomingMessage,
    client: Duplex,
    head: Buffer,
    identity: KubeIdentity,
    peerAddress: string | undefined,
    auditId?: string,
  ): Promise<number> {
    if (this.#closed) return Promise.reject(new UpstreamError(503, 'the proxy is shutting down'));
    const authorization = this.#options.authorization();
    const headers = upstreamHeaders(
      req.headers,
      identity,
      authorization ? { authorization } : {},
      peerAddress,
      auditId,
    );
    // The sanitiser dropped the hop-by-hop Upgrade and Connection; an upgrade needs exactly these back.
    headers.connection = 'Upgrade';
    headers.upgrade = req.headers.upgrade ?? '';
    return new Promise((resolve, reject) => {
      const upstreamReq = https.request({
        ...originRequest(this.url, req.url ?? '/'),
        method: req.method,
        headers,
        agent: false,
        ...this.#tlsOptions(),
      });
      const timer = setTimeout(() => {
        upstreamReq.destroy();
        reject(this.#timeoutError(true));
      }, this.#longRunningHeadersTimeoutMs);
      // The client may leave before kube-apiserver answers: do not keep the upstream attempt.
      const clientGone = (): void => {
        clearTimeout(timer);
        upstreamReq.destroy();
      };
      client.once('close', clientGone);
      upstreamReq.on('upgrade', (upstreamRes, upstreamSocket, upstreamHead) => {
        clearTimeout(timer);
        client.off('close', clientGone);
        client.write(responseHead(upstreamRes, false));
        if (upstreamHead.length > 0) client.write(upstreamHead);
        if (head.length > 0) upstreamSocket.write(head);
        upstreamSocket.pipe(client);
        client.pipe(upstreamSocket);
        const end = (): void => {
          upstreamSocket.destroy();
          client.destroy();
        };
        upstreamSocket.on('error', end);
        client.on('error', end);
        upstreamSocket.on('close', () => client.end());
        client.on('close', () => upstreamSocket.destroy());
        resolve(101);
      });
      upstreamReq.on('response', (upstreamRes) => {
        clearTimeout(timer);
        client.off('close', clientGone);
        // Not upgraded: relay the answer as it is, then close, so nothing else rides this connection.
        client.write(responseHead(upstreamRes, true));
        upstreamRes.pipe(client);
        upstreamRes.on('end', () => resolve(upstreamRes.statusCode ?? 502));
        // The client may leave before the answer ends: the request is finished all the same.
        upstreamRes.on('close', () => resolve(upstreamRes.statusCode ?? 502));
        upstreamRes.on('error', () => client.destroy());
      });
      upstreamReq.on('error', (err) => {
        clearTimeout(timer);
        reject(upstreamFailure(this.url.origin, err));
      });
      upstreamReq.end();
    });
  }

  /**
   * A request of the proxy's own, as itself (its credential, no impersonation): e.g. a SubjectAccessReview.
   * The body is JSON; resolves with the status and the parsed JSON answer.
   */
  call(
    method: string,
    path: string,
    body?: unknown,
    timeoutMs = 10_000,
  ): Promise<{ status: number; json: unknown }> {
    const authorization = this.#options.authorization();
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = https.request(
        {
          ...originRequest(this.url, path),
          method,
          agent: this.#agent,
          timeout: timeoutMs,
          headers: {
            accept: 'application/json',
            ...(authorization ? { authorization } : {}),
            ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}),
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            let json: unknown;
            try {
              json = JSON.parse(text);
            } catch {
              json = undefined;
            }
            resolve({ status: res.statusCode ?? 0, json });
          });
        },
      );
      req.on('timeout', () =>
        req.destroy(new UpstreamError(504, `kube-apiserver did not answer ${path} in time`)),
      );
      req.on('error', (err) => reject(upstreamFailure(this.url.origin, err)));
      req.end(payload);
    });
  }

  /** A cheap reachability probe for readiness: any HTTP answer from /readyz counts as reachable. */
  probe(timeoutMs = 2000): Promise<boolean> {
    const authorization = this.#options.authorization();
    return new Promise((resolve) => {
      const req = https.request(
        {
          ...originRequest(this.url, '/readyz'),
          method: 'GET',
          agent: this.#agent,
          headers: authorization ? { authorization } : {},
          timeout: timeoutMs,
        },
        (res) => {
          res.resume();
          resolve(true);
        },
      );
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', () => resolve(false));
      req.end();
    });
  }

  close(): void {
    this.#closed = true;
    this.#agent.destroy();
    this.#ordinary.close();
    this.#longRunning.close();
  }
}

/**
 * When the answer is complete before the client finished its upload, the rest of the upload is refused rather
 * than left hanging: on HTTP/2 the stream is reset with NO_ERROR once the answer is sent (RFC 9113 §8.1: the
 * client stops sending); on HTTP/1.1 node:http reads and discards what is left, or closes the connection.
 */
function endUnreadUpload(stream: ServerHttp2Stream | undefined): void {
  if (stream === undefined || stream.endAfterHeaders) return;
  // 'finish' means nghttp2 holds the last DATA frame, not that it was sent, and a RST_STREAM would overtake it:
  // give the answer time to leave, then reset only a stream whose client half is still open.
  stream.once('finish', () => {
    setTimeout(() => {
      if (!stream.closed && stream.state?.remoteClose === 0) stream.close(http2.constants.NGHTTP2_NO_ERROR);
    }, UNREAD_UPLOAD_GRACE_MS).unref();
  });
}

/** How long an answered HTTP/2 stream may keep uploading before it is reset. */
const UNREAD_UPLOAD_GRACE_MS = 1000;

/** An HTTP/1.1 response head for the raw client socket: upstream's status and headers (minus framing when closing). */
function responseHead(res: IncomingMessage, closing: boolean): string {
  let head = `HTTP/1.1 ${res.statusCode ?? 502} ${res.statusMessage ?? ''}\r\n`;
  const raw = res.rawHeaders;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = (raw[i] as string).toLowerCase();
    // When relaying a refusal the body is delimited by closing the connection, so framing headers go.
    if (closing && (name === 'transfer-encoding' || name === 'connection' || name === 'keep-alive')) continue;
    head += `${raw[i]}: ${raw[i + 1]}\r\n`;
  }
  if (closing) head += 'Connection: close\r\n';
  return `${head}\r\n`;
}
