import type { IncomingMessage, ServerResponse } from 'node:http';
import http, { type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import http2 from 'node:http2';
import https from 'node:https';
import type { Duplex } from 'node:stream';
import type { KubeIdentity } from '../policy/types.ts';

/** Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction. */
const HOP_BY_HOP = new Set([
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
    name.startsWith('x-forwarded-')
  );
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
): OutgoingHttpHeaders {
  const named = new Set<string>();
  for (const value of [incoming.connection ?? []].flat()) {
    for (const token of String(value).split(',')) named.add(token.trim().toLowerCase());
  }
  const out: OutgoingHttpHeaders = {};
  for (const [rawName, value] of Object.entries(incoming)) {
    const name = rawName.toLowerCase();
    if (value === undefined || name.startsWith(':') || name === 'host') continue;
    if (HOP_BY_HOP.has(name) || named.has(name) || isIdentityHeader(name)) continue;
    out[name] = value;
  }
  if (credential.authorization) out.authorization = credential.authorization;
  out['impersonate-user'] = identity.user;
  if (identity.groups.length > 0) out['impersonate-group'] = [...identity.groups];
  if (identity.uid) out['impersonate-uid'] = identity.uid;
  for (const [key, values] of Object.entries(identity.extra)) {
    if (values.length > 0) out[`impersonate-extra-${escapeExtraKey(key)}`] = [...values];
  }
  if (peerAddress) out['x-forwarded-for'] = peerAddress;
  return out;
}

/** Response headers relayed to the client: hop-by-hop ones removed (HTTP/2 forbids them outright). */
export function downstreamHeaders(incoming: IncomingHttpHeaders): OutgoingHttpHeaders {
  const named = new Set<string>();
  for (const value of [incoming.connection ?? []].flat()) {
    for (const token of String(value).split(',')) named.add(token.trim().toLowerCase());
  }
  const out: OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(incoming)) {
    if (value === undefined || HOP_BY_HOP.has(name) || named.has(name)) continue;
    out[name] = value;
  }
  return out;
}

export interface UpstreamOptions {
  /** kube-apiserver's URL, e.g. https://127.0.0.1:6443. */
  readonly url: URL;
  /** CA bundle (PEM) for the apiserver's serving certificate. */
  readonly ca?: string;
  /** The proxy's own credential. */
  readonly authorization: () => string | undefined;
  readonly clientCert?: string;
  readonly clientKey?: string;
  /** How long an ordinary (not long-running) request may wait for response headers (default 70 s). */
  readonly responseHeadersTimeoutMs?: number;
}

export class UpstreamError extends Error {
  /** 502: kube-apiserver answered badly or the TLS/HTTP exchange failed; 503: unreachable; 504: no answer in time. */
  readonly status: 502 | 503 | 504;
  constructor(status: 502 | 503 | 504, message: string, options?: ErrorOptions) {
    super(message, options);
    this.status = status;
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
  const status = err.code !== undefined && UNREACHABLE.has(err.code) ? 503 : 502;
  return new UpstreamError(status, `kube-apiserver at ${origin}: ${err.message}`, { cause: err });
}

/** How long a request that is not long-running may wait for kube-apiserver's response headers. */
export const RESPONSE_HEADERS_TIMEOUT_MS = 70_000;
/** Multiplexed HTTP/2 sessions kept to kube-apiserver; a new one opens only when the others are full. */
const MAX_SESSIONS = 4;

interface PooledSession {
  readonly session: http2.ClientHttp2Session;
  active: number;
}

/**
 * Forwards requests to kube-apiserver and streams answers back without buffering.
 *
 * Ordinary requests go over a few multiplexed HTTP/2 sessions (a session that receives GOAWAY or fails leaves
 * the pool; its open streams finish). Upgrade requests (SPDY/3.1 and WebSocket: exec, attach, cp,
 * port-forward) go over a fresh HTTP/1.1 connection each, since an upgrade is impossible over HTTP/2; a 101 joins
 * the two connections, and any other answer is relayed unchanged and the connection closed, so kubectl can fall
 * back (WebSocket → SPDY) and no second request can slip through a raw tunnel. An `http:` upstream (tests) is
 * spoken to over HTTP/1.1 keep-alive.
 */
export class Upstream {
  readonly url: URL;
  readonly #options: UpstreamOptions;
  readonly #agent: http.Agent;
  readonly #pool: PooledSession[] = [];
  readonly #headersTimeoutMs: number;
  #closed = false;

  constructor(options: UpstreamOptions) {
    this.url = options.url;
    this.#options = options;
    this.#headersTimeoutMs = options.responseHeadersTimeoutMs ?? RESPONSE_HEADERS_TIMEOUT_MS;
    this.#agent =
      options.url.protocol === 'https:'
        ? new https.Agent({ keepAlive: true, ...this.#tlsOptions() })
        : new http.Agent({ keepAlive: true });
  }

  #tlsOptions(): { ca?: string; cert?: string; key?: string } {
    const o = this.#options;
    return {
      ...(o.ca ? { ca: o.ca } : {}),
      ...(o.clientCert ? { cert: o.clientCert } : {}),
      ...(o.clientKey ? { key: o.clientKey } : {}),
    };
  }

  /** A session with room for one more stream: the least busy, or a new one while the pool is not full. */
  #session(): PooledSession {
    const live = this.#pool.filter((p) => !p.session.closed && !p.session.destroyed);
    const limit = (p: PooledSession): number => p.session.remoteSettings?.maxConcurrentStreams ?? 100;
    const roomy = live.filter((p) => p.active < limit(p)).sort((a, b) => a.active - b.active)[0];
    if (roomy !== undefined) return roomy;
    if (live.length < MAX_SESSIONS || live.length === 0) return this.#connect();
    return live.sort((a, b) => a.active - b.active)[0] as PooledSession;
  }

  #connect(): PooledSession {
    const session = http2.connect(this.url, this.#tlsOptions());
    const pooled: PooledSession = { session, active: 0 };
    const leave = (): void => {
      const i = this.#pool.indexOf(pooled);
      if (i >= 0) this.#pool.splice(i, 1);
    };
    session.on('goaway', leave);
    session.on('close', leave);
    session.on('error', leave);
    // Idle sessions must not keep the process alive; streams ref it while they run.
    session.unref();
    this.#pool.push(pooled);
    return pooled;
  }

  forward(
    req: IncomingMessage | Http2ServerRequest,
    res: ServerResponse | Http2ServerResponse,
    identity: KubeIdentity,
    peerAddress: string | undefined,
    options: { longRunning?: boolean } = {},
  ): Promise<number> {
    const authorization = this.#options.authorization();
    const headers = upstreamHeaders(
      req.headers,
      identity,
      authorization ? { authorization } : {},
      peerAddress,
    );
    if (this.url.protocol !== 'https:') return this.#forwardHttp1(req, res, headers, options);
    return this.#forwardHttp2(req, res, headers, options);
  }

  #forwardHttp2(
    req: IncomingMessage | Http2ServerRequest,
    res: ServerResponse | Http2ServerResponse,
    headers: OutgoingHttpHeaders,
    options: { longRunning?: boolean },
  ): Promise<number> {
    if (this.#closed) return Promise.reject(new UpstreamError(503, 'the proxy is shutting down'));
    const pooled = this.#session();
    const { session } = pooled;
    return new Promise((resolve, reject) => {
      let stream: http2.ClientHttp2Stream;
      try {
        stream = session.request({
          ...headers,
          ':method': req.method ?? 'GET',
          ':path': req.url ?? '/',
          ':authority': this.url.host,
          ':scheme': 'https',
        });
      } catch (err) {
        reject(upstreamFailure(this.url.origin, err as Error));
        return;
      }
      session.ref();
      pooled.active++;
      let answered = false;
      const timer = options.longRunning
        ? undefined
        : setTimeout(() => {
            stream.close(http2.constants.NGHTTP2_CANCEL);
            reject(
              new UpstreamError(
                504,
                `kube-apiserver did not answer within ${this.#headersTimeoutMs / 1000}s`,
              ),
            );
          }, this.#headersTimeoutMs);
      stream.on('close', () => {
        pooled.active--;
        if (pooled.active === 0) session.unref();
        if (timer) clearTimeout(timer);
      });
      stream.on('response', (upstreamHeaders) => {
        answered = true;
        if (timer) clearTimeout(timer);
        const status = Number(upstreamHeaders[':status'] ?? 502);
        res.statusCode = status;
        for (const [name, value] of Object.entries(
          downstreamHeaders(upstreamHeaders as IncomingHttpHeaders),
        )) {
          if (value !== undefined && !name.startsWith(':')) res.setHeader(name, value);
        }
        // Flush the headers now: a watch may send its first event much later.
        if ('flushHeaders' in res && typeof res.flushHeaders === 'function') res.flushHeaders();
        stream.pipe(res as NodeJS.WritableStream);
        stream.on('end', () => resolve(status));
      });
      stream.on('error', (err) => {
        if (!answered) reject(upstreamFailure(this.url.origin, err));
        else (res as NodeJS.WritableStream & { destroy(): void }).destroy();
      });
      res.on('close', () => {
        if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
      });
      (req as NodeJS.ReadableStream).pipe(stream);
    });
  }

  #forwardHttp1(
    req: IncomingMessage | Http2ServerRequest,
    res: ServerResponse | Http2ServerResponse,
    headers: OutgoingHttpHeaders,
    options: { longRunning?: boolean },
  ): Promise<number> {
    const target = new URL(req.url ?? '/', this.url);
    return new Promise((resolve, reject) => {
      const upstreamReq = http.request(
        target,
        { method: req.method, headers, agent: this.#agent },
        (upstreamRes) => {
          if (timer) clearTimeout(timer);
          res.statusCode = upstreamRes.statusCode ?? 502;
          for (const [name, value] of Object.entries(downstreamHeaders(upstreamRes.headers))) {
            if (value !== undefined) res.setHeader(name, value);
          }
          if ('flushHeaders' in res && typeof res.flushHeaders === 'function') res.flushHeaders();
          upstreamRes.pipe(res as NodeJS.WritableStream);
          upstreamRes.on('end', () => resolve(res.statusCode));
          upstreamRes.on('error', (err) => reject(upstreamFailure(this.url.origin, err)));
        },
      );
      const timer = options.longRunning
        ? undefined
        : setTimeout(() => {
            upstreamReq.destroy();
            reject(
              new UpstreamError(
                504,
                `kube-apiserver did not answer within ${this.#headersTimeoutMs / 1000}s`,
              ),
            );
          }, this.#headersTimeoutMs);
      upstreamReq.on('error', (err) => {
        if (timer) clearTimeout(timer);
        reject(upstreamFailure(this.url.origin, err));
      });
      res.on('close', () => {
        if (!upstreamReq.destroyed) upstreamReq.destroy();
      });
      (req as NodeJS.ReadableStream).pipe(upstreamReq);
    });
  }

  /**
   * The upgrade path (HTTP/1.1 only): sends the sanitised request with its `Upgrade` to kube-apiserver on a new
   * connection. On 101 the two sockets are joined; on anything else the answer is relayed unchanged with
   * `Connection: close`, and both connections end. Resolves with the upstream status.
   */
  upgrade(
    req: IncomingMessage,
    client: Duplex,
    head: Buffer,
    identity: KubeIdentity,
    peerAddress: string | undefined,
  ): Promise<number> {
    const authorization = this.#options.authorization();
    const headers = upstreamHeaders(
      req.headers,
      identity,
      authorization ? { authorization } : {},
      peerAddress,
    );
    // The sanitiser dropped the hop-by-hop Upgrade and Connection; an upgrade needs exactly these back.
    headers.connection = 'Upgrade';
    headers.upgrade = req.headers.upgrade ?? '';
    const target = new URL(req.url ?? '/', this.url);
    const transport = this.url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const upstreamReq = transport.request(target, {
        method: req.method,
        headers,
        agent: false,
        ...(this.url.protocol === 'https:' ? this.#tlsOptions() : {}),
      });
      upstreamReq.on('upgrade', (upstreamRes, upstreamSocket, upstreamHead) => {
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
        // Not upgraded: relay the answer as it is, then close, so nothing else rides this connection.
        client.write(responseHead(upstreamRes, true));
        upstreamRes.pipe(client);
        upstreamRes.on('end', () => resolve(upstreamRes.statusCode ?? 502));
        upstreamRes.on('error', () => client.destroy());
      });
      upstreamReq.on('error', (err) => reject(upstreamFailure(this.url.origin, err)));
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
    const transport = this.url.protocol === 'https:' ? https : http;
    const authorization = this.#options.authorization();
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = transport.request(
        new URL(path, this.url),
        {
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
    const transport = this.url.protocol === 'https:' ? https : http;
    const authorization = this.#options.authorization();
    return new Promise((resolve) => {
      const req = transport.request(
        new URL('/readyz', this.url),
        {
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
    for (const { session } of this.#pool.splice(0)) session.close();
  }
}

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
