/**
 * A spoke's local listener: plain HTTP/1.1 or h2c (prior knowledge) from the controller on loopback or a Unix
 * socket, forwarded to the spoke proxy over SPIFFE mTLS. HTTP-aware on purpose, not a TCP pipe: every request
 * goes on a session of the SVID current when it starts, so a keep-alive connection client-go holds for hours
 * never outlives the certificate it was opened with, and a rotation never cuts an open watch.
 *
 * The request target is forwarded exactly as received (never parsed, normalised or resolved: the spoke proxy
 * judges it, and kube-apiserver executes the same bytes); only origin-form targets are accepted. Headers go as
 * received, minus hop-by-hop ones; `Authorization` and `Impersonate-*` too, for the spoke proxy to refuse or
 * judge (it never honours a caller's credential). The upstream origin is the configured `server` alone.
 */
import { lstatSync, rmSync } from 'node:fs';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import http2, {
  type Http2ServerRequest,
  type Http2ServerResponse,
  type IncomingHttpHeaders,
  type OutgoingHttpHeaders,
} from 'node:http2';
import net, { type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import type { ClientMetrics } from '../observability/client-metrics.ts';
import { downstreamHeaders, HOP_BY_HOP, namedInConnection } from '../proxy/forward.ts';
import type { RateLimitedLog } from '../proxy/limits.ts';
import { sendStatus, writeRawStatus } from '../proxy/status.ts';
import { isKspError } from '../spiffe/errors.ts';
import type { ClientLimits, ClientTimeouts } from './config.ts';
import { ClientError, ClientErrorCode } from './errors.ts';
import type { SpokeUpstream } from './spoke.ts';

const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

/** The status a refusal answers with. */
function statusOf(err: unknown): number {
  if (!(err instanceof ClientError)) return 502;
  switch (err.code) {
    case ClientErrorCode.NoSvid:
    case ClientErrorCode.Limit:
      return 503;
    case ClientErrorCode.BadRequest:
      return 400;
    default:
      return err.status ?? 502;
  }
}

/**
 * Request headers for the spoke: lower-case names; hop-by-hop ones, those named in Connection and Host (the
 * spoke's `:authority` replaces it) dropped.
 */
export function forwardedHeaders(incoming: IncomingHttpHeaders): OutgoingHttpHeaders {
  const named = namedInConnection(incoming);
  const out: OutgoingHttpHeaders = {};
  for (const [rawName, value] of Object.entries(incoming)) {
    const name = rawName.toLowerCase();
    if (
      value === undefined ||
      name.startsWith(':') ||
      name === 'host' ||
      HOP_BY_HOP.has(name) ||
      named.has(name)
    )
      continue;
    out[name] = value;
  }
  return out;
}

export class SpokeListener {
  readonly spoke: SpokeUpstream;
  readonly #front: net.Server;
  readonly #h1: http.Server;
  readonly #h2: http2.Http2Server;
  readonly #metrics: ClientMetrics;
  readonly #log: Logger;
  readonly #quiet: RateLimitedLog;
  readonly #sockets = new Set<Socket>();
  readonly #h2Sessions = new Set<http2.ServerHttp2Session>();
  /** Per connection: requests in flight, and the timer that closes it while it has none. */
  readonly #idle = new WeakMap<object, { inFlight: number; timer?: NodeJS.Timeout; served: boolean }>();
  readonly #timeouts: ClientTimeouts;
  #address: string | undefined;
  #draining = false;

  constructor(options: {
    readonly spoke: SpokeUpstream;
    readonly limits: ClientLimits;
    readonly timeouts: ClientTimeouts;
    readonly metrics: ClientMetrics;
    readonly logger: Logger;
    readonly quiet: RateLimitedLog;
  }) {
    this.spoke = options.spoke;
    this.#metrics = options.metrics;
    this.#log = options.logger.child({ spoke: options.spoke.config.name });
    this.#quiet = options.quiet;
    const { timeouts } = options;
    this.#timeouts = timeouts;
    const handler = (
      req: IncomingMessage | Http2ServerRequest,
      res: ServerResponse | Http2ServerResponse,
    ): void => {
      this.#forward(req, res).catch((err: Error) => {
        this.#log.error({ err: { message: err.message } }, 'forwarding failed');
        this.#metrics.refusal(this.spoke.config.name, ClientErrorCode.Upstream);
        this.#metrics.request(this.spoke.config.name, 502);
        sendStatus(res, 502, `kube-svid-proxy client: ${ClientErrorCode.Upstream}: ${err.message}`, {
          'x-kube-svid-proxy-error': ClientErrorCode.Upstream,
        });
      });
    };
    this.#h1 = http.createServer(
      {
        // Watches and followed logs run for as long as they run: no whole-request deadline. The header and idle
        // deadlines are ours (#busy, #done): Node enforces its own only on a server that listens, and this one
        // is handed its connections by the front listener.
        requestTimeout: 0,
        keepAliveTimeout: timeouts.idleMs,
      },
      (req: IncomingMessage, res: ServerResponse) => {
        const socket = req.socket;
        this.#busy(socket);
        res.once('close', () => this.#done(socket, () => socket.destroy()));
        if (this.#draining) res.shouldKeepAlive = false;
        handler(req, res);
      },
    );
    this.#h1.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      // A tunnel stays for as long as both ends keep it: no idle deadline from here on.
      this.#busy(socket);
      this.#upgrade(req, socket, head).catch((err: Error) => {
        this.#log.error({ err: { message: err.message } }, 'upgrade failed');
        socket.destroy();
      });
    });
    this.#h1.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
      if (socket.writable && err.code !== 'ECONNRESET') {
        socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      } else {
        socket.destroy();
      }
    });
    this.#h2 = http2.createServer({ settings: { enablePush: false } }, handler);
    this.#h2.on('session', (session: http2.ServerHttp2Session) => {
      this.#h2Sessions.add(session);
      session.once('close', () => this.#h2Sessions.delete(session));
      // Idle means no stream in flight, not no frame: a quiet watch is not idle.
      this.#arm(session, () => session.close());
      session.on('stream', (stream) => {
        this.#busy(session);
        stream.once('close', () => this.#done(session, () => session.close()));
      });
    });
    this.#front = net.createServer((socket) => this.#accept(socket));
    this.#front.maxConnections = options.limits.maxConnections;
    this.#front.on('drop', () => {
      this.#metrics.refusal(this.spoke.config.name, ClientErrorCode.Limit);
      this.#quiet.warn(
        `drop:${this.spoke.config.name}`,
        { spoke: this.spoke.config.name, limit: 'maxConnections', max: options.limits.maxConnections },
        'local connection refused: limits.maxConnections reached',
      );
    });
  }

  get connections(): number {
    return this.#sockets.size;
  }

  /** Where it listens, for logs and `client kubeconfig`: `127.0.0.1:7443` or a socket path. */
  get address(): string | undefined {
    return this.#address;
  }

  /** The URL a local client uses: http://host:port (a Unix socket has none). */
  get url(): string | undefined {
    const bound = this.#front.address();
    if (bound === null || typeof bound === 'string') return undefined;
    const host = bound.family === 'IPv6' ? `[${bound.address}]` : bound.address;
    return `http://${host}:${bound.port}`;
  }

  async listen(): Promise<void> {
    const listen = this.spoke.config.listen;
    if (listen.kind === 'unix') await removeStaleSocket(listen.path);
    await new Promise<void>((resolve, reject) => {
      this.#front.once('error', reject);
      const done = (): void => {
        this.#front.off('error', reject);
        resolve();
      };
      if (listen.kind === 'unix') {
        // Bound with umask 0177, so the socket is 0600 from its first instant (never the process umask's mode).
        const umask = process.umask(0o177);
        try {
          this.#front.listen({ path: listen.path }, done);
        } finally {
          process.umask(umask);
        }
      } else {
        this.#front.listen({ host: listen.host, port: listen.port }, done);
      }
    });
    if (listen.kind === 'unix') {
      this.#address = listen.path;
    } else {
      this.#address = this.url?.slice('http://'.length);
    }
  }

  /** Stops accepting; idle connections are closed, requests in flight (watches too) go on. */
  drain(): void {
    this.#draining = true;
    this.#front.close();
    for (const socket of this.#sockets) {
      if ((this.#idle.get(socket)?.inFlight ?? 0) === 0) socket.destroy();
    }
    for (const session of this.#h2Sessions) session.close();
  }

  get busy(): boolean {
    return this.#sockets.size > 0;
  }

  /** Cuts every connection. */
  close(): void {
    this.#front.close();
    for (const socket of this.#sockets) socket.destroy();
    const listen = this.spoke.config.listen;
    if (listen.kind === 'unix') rmSync(listen.path, { force: true });
  }

  /** A request started on `conn` (a socket, or an h2c session): no idle deadline while it runs. */
  #busy(conn: object): void {
    const state = this.#idle.get(conn) ?? { inFlight: 0, served: false };
    state.inFlight++;
    state.served = true;
    if (state.timer) clearTimeout(state.timer);
    state.timer = undefined;
    this.#idle.set(conn, state);
  }

  /** A request on `conn` ended: with none left, it gets `timeouts.idle` (closed at once when draining). */
  #done(conn: object, close: () => void): void {
    const state = this.#idle.get(conn);
    if (state === undefined) return;
    state.inFlight = Math.max(0, state.inFlight - 1);
    if (state.inFlight > 0) return;
    if (this.#draining) close();
    else this.#arm(conn, close);
  }

  /**
   * Closes `conn` unless a request starts within the deadline: `timeouts.requestHeaders` before its first
   * request (a caller that connects and sends nothing, or half a request head, holds a slot no longer), then
   * `timeouts.idle`.
   */
  #arm(conn: object, close: () => void): void {
    const state = this.#idle.get(conn) ?? { inFlight: 0, served: false };
    if (state.timer) clearTimeout(state.timer);
    const ms = state.served ? this.#timeouts.idleMs : this.#timeouts.requestHeadersMs;
    state.timer = setTimeout(() => {
      if (state.inFlight === 0) close();
    }, ms);
    state.timer.unref();
    this.#idle.set(conn, state);
  }

  #accept(socket: Socket): void {
    this.#sockets.add(socket);
    socket.once('close', () => {
      this.#sockets.delete(socket);
      const timer = this.#idle.get(socket)?.timer;
      if (timer) clearTimeout(timer);
    });
    socket.on('error', () => socket.destroy());
    // Until it has sent something, and (HTTP/1.1) a whole request head, the connection has requestHeaders.
    this.#arm(socket, () => socket.destroy());
    // h2c with prior knowledge starts with the HTTP/2 preface; anything else is HTTP/1.1.
    let seen = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      seen = Buffer.concat([seen, chunk]);
      const n = Math.min(seen.length, H2_PREFACE.length);
      const h2 = seen.subarray(0, n).equals(H2_PREFACE.subarray(0, n));
      if (h2 && seen.length < H2_PREFACE.length) return;
      socket.off('data', onData);
      socket.pause();
      if (h2) {
        const timer = this.#idle.get(socket)?.timer;
        if (timer) clearTimeout(timer);
        // Node's HTTP/2 session reads a net.Socket's handle directly and would miss the bytes read already; a
        // stream in front of the socket replays them first.
        this.#h2.emit('connection', replay(socket, seen));
      } else {
        socket.unshift(seen);
        this.#h1.emit('connection', socket);
      }
      socket.resume();
    };
    socket.on('data', onData);
    if (this.#draining) socket.destroy();
  }

  async #forward(
    req: IncomingMessage | Http2ServerRequest,
    res: ServerResponse | Http2ServerResponse,
  ): Promise<void> {
    const name = this.spoke.config.name;
    const target = req.url ?? '';
    const refuse = (err: unknown): void => {
      const status = statusOf(err);
      const code = isKspError(err) ? err.code : ClientErrorCode.Upstream;
      const message = (err as Error).message;
      this.#metrics.refusal(name, code);
      this.#metrics.request(name, status);
      this.#quiet.warn(
        `refuse:${name}:${code}`,
        { spoke: name, code, status, err: { message } },
        'request refused',
      );
      sendStatus(res, status, `kube-svid-proxy client: ${code}: ${message}`, {
        'x-kube-svid-proxy-error': code,
      });
    };
    if (req.method === 'CONNECT' || !target.startsWith('/')) {
      refuse(
        new ClientError(
          ClientErrorCode.BadRequest,
          `only origin-form request targets are forwarded (got ${req.method} ${JSON.stringify(target.slice(0, 100))})`,
        ),
      );
      return;
    }
    let stream: http2.ClientHttp2Stream;
    try {
      stream = await this.spoke.request({
        ...forwardedHeaders(req.headers),
        ':method': req.method,
        ':path': target,
        ':authority': this.spoke.authority,
      });
    } catch (err) {
      req.resume();
      refuse(err);
      return;
    }
    // The caller went away (a stopped watch, a killed kubectl): the spoke's stream is cancelled with it.
    res.once('close', () => {
      if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
    });
    stream.once('response', (headers) => {
      const status = Number(headers[':status']);
      this.#metrics.request(name, status);
      const out = downstreamHeaders(
        Object.fromEntries(
          Object.entries(headers).filter(([k]) => !k.startsWith(':')),
        ) as IncomingHttpHeaders,
      );
      (res as ServerResponse).writeHead(status, out as http.OutgoingHttpHeaders);
      // A watch: each event reaches the caller when it arrives, not when a buffer fills.
      (res as ServerResponse).flushHeaders?.();
      stream.pipe(res as NodeJS.WritableStream);
    });
    stream.once('error', (err: Error) => {
      if (res.headersSent) {
        res.destroy();
        return;
      }
      refuse(
        new ClientError(ClientErrorCode.Upstream, `spoke ${name}: the exchange broke: ${err.message}`, {
          cause: err,
        }),
      );
    });
    req.pipe(stream);
  }

  async #upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const name = this.spoke.config.name;
    const refuse = (err: unknown): void => {
      const status = statusOf(err);
      const code = isKspError(err) ? err.code : ClientErrorCode.Upstream;
      this.#metrics.refusal(name, code);
      this.#metrics.upgrade(name, status);
      this.#quiet.warn(
        `upgrade:${name}:${code}`,
        { spoke: name, code, status, err: { message: (err as Error).message } },
        'upgrade refused',
      );
      writeRawStatus(socket, status, `kube-svid-proxy client: ${code}: ${(err as Error).message}`, {
        'X-Kube-Svid-Proxy-Error': code,
      });
    };
    const protocol = String(req.headers.upgrade ?? '').toLowerCase();
    if (!req.url?.startsWith('/') || protocol === 'h2c') {
      refuse(
        new ClientError(
          ClientErrorCode.BadRequest,
          protocol === 'h2c'
            ? 'an h2c upgrade is not taken: speak HTTP/2 with prior knowledge, or HTTP/1.1'
            : 'only origin-form request targets are forwarded',
        ),
      );
      return;
    }
    let upstream: Awaited<ReturnType<SpokeUpstream['tunnel']>>;
    try {
      upstream = await this.spoke.tunnel();
    } catch (err) {
      refuse(err);
      return;
    }
    // The request head as received (target, header names and order), with the spoke's Host: the spoke proxy
    // and kube-apiserver read the same bytes the caller sent. Node's parser refused any CR or LF in them.
    let text = `${req.method} ${req.url} HTTP/1.1\r\nHost: ${this.spoke.authority}\r\n`;
    const raw = req.rawHeaders;
    for (let i = 0; i + 1 < raw.length; i += 2) {
      if ((raw[i] as string).toLowerCase() === 'host') continue;
      text += `${raw[i]}: ${raw[i + 1]}\r\n`;
    }
    upstream.write(`${text}\r\n`);
    if (head.length > 0) upstream.write(head);
    this.#metrics.upgrade(name, 'tunnel');
    this.#log.debug({ method: req.method, upgrade: protocol }, 'upgrade tunnelled to the spoke');
    const end = (): void => {
      socket.destroy();
      upstream.destroy();
    };
    upstream.on('error', end);
    socket.on('error', end);
    upstream.on('close', end);
    socket.on('close', end);
    socket.pipe(upstream);
    upstream.pipe(socket);
  }
}

/** A duplex over `socket` that first yields `first` (bytes read from it already), then what the socket reads. */
function replay(socket: Socket, first: Buffer): Duplex {
  const wrapped = new Duplex({
    read() {
      socket.resume();
    },
    write(chunk: Buffer, _encoding, callback) {
      socket.write(chunk, callback);
    },
    final(callback) {
      socket.end(callback);
    },
    destroy(err, callback) {
      socket.destroy(err ?? undefined);
      callback(err);
    },
  });
  wrapped.push(first);
  socket.on('data', (chunk: Buffer) => {
    if (!wrapped.push(chunk)) socket.pause();
  });
  socket.once('end', () => wrapped.push(null));
  socket.once('close', () => wrapped.destroy());
  return wrapped;
}

/**
 * Removes a socket an earlier run left at `path`. A socket something still answers on is another process's:
 * refused. Anything that is not a socket is left for listen to refuse.
 */
async function removeStaleSocket(path: string): Promise<void> {
  try {
    if (!lstatSync(path).isSocket()) return;
  } catch {
    return;
  }
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new Error(`${path} is a socket another process is listening on`);
  rmSync(path, { force: true });
}
