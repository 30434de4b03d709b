/**
 * The life of the front door's client connections, apart from what is asked on them: which are open, which are
 * still in their TLS handshake, how many requests each has in flight, and when the proxy closes one (idle, a
 * refused client, shutdown). server.ts decides; this module keeps count and keeps time.
 */
import type { ServerResponse } from 'node:http';
import type http2 from 'node:http2';
import type { Http2ServerResponse, ServerHttp2Session } from 'node:http2';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import type { ProxyMetrics } from '../observability/metrics.ts';
import type { Decision } from '../policy/types.ts';
import type { PeerIdentity } from './authenticate.ts';
import type { ProxyTimeouts } from './limits.ts';
import type { SarResult } from './sar.ts';

/** What the proxy knows of one client connection. */
export interface ConnectionState {
  readonly socket: TLSSocket;
  /** The HTTP/2 session on this connection (undefined for HTTP/1.1). */
  session: ServerHttp2Session | undefined;
  /** Requests in flight on this connection. */
  active: number;
  /** The connection became a raw tunnel (exec, attach, port-forward): no idle timeout, no more requests. */
  tunnel: boolean;
  /** Closes the connection when nothing happens on it for a while (idle, or unauthenticated). */
  timer: NodeJS.Timeout | undefined;
  /** A 401 went out: the connection is closing, later requests on it are dropped without an answer. */
  closing: boolean;
  identity: PeerIdentity | undefined;
  /** Why this connection's client was refused, for the trust generation it was checked against. */
  refused: { code: string; message: string; generation: number } | undefined;
  /** SubjectAccessReview answers for nested impersonation, briefly reused. */
  reviews: Map<string, { result: SarResult; until: number }>;
  /** Decisions of this connection, for one policy generation. */
  decisions: Map<string, Decision>;
  decisionsGeneration: number;
}

const kConnection = Symbol('kube-svid-proxy.connection');
const kSession = Symbol('kube-svid-proxy.session');
type StatefulSocket = TLSSocket & { [kConnection]?: ConnectionState; [kSession]?: ServerHttp2Session };

/** How long a connection told to close (GOAWAY, Connection: close) gets to finish before it is destroyed. */
const CLOSE_GRACE_MS = 2_000;

/** The TCP socket under a server-side TLS socket (node:tls keeps it as `_parent`). */
function rawSocket(socket: TLSSocket): Socket | undefined {
  return (socket as TLSSocket & { _parent?: Socket })._parent ?? undefined;
}

export class ClientConnections {
  readonly #metrics: ProxyMetrics;
  readonly #log: Logger;
  readonly #timeouts: ProxyTimeouts;
  /** When each accepted TCP connection started its TLS handshake. */
  readonly #handshakeStarts = new WeakMap<Socket, number>();
  /** TCP connections whose TLS handshake finished. */
  readonly #handshakeDone = new WeakSet<Socket>();
  /** Every accepted TCP connection, until it closes (shutdown destroys what is left). */
  readonly #sockets = new Set<Socket>();
  readonly #states = new Set<ConnectionState>();
  #draining = false;

  /** Follows the connections and HTTP/2 sessions of `server`. */
  constructor(
    server: http2.Http2SecureServer,
    options: { metrics: ProxyMetrics; logger: Logger; timeouts: ProxyTimeouts },
  ) {
    this.#metrics = options.metrics;
    this.#log = options.logger;
    this.#timeouts = options.timeouts;
    server.on('connection', (socket: Socket) => {
      // Small writes (headers, then body; watch events) must not wait for the peer's delayed ACK (Nagle): on
      // HTTP/1.1 that cost about 40 ms per request.
      socket.setNoDelay(true);
      this.#sockets.add(socket);
      this.#handshakeStarts.set(socket, performance.now());
      socket.once('close', () => this.#sockets.delete(socket));
    });
    server.on('session', (session: ServerHttp2Session) => {
      // 'session' comes before 'secureConnection'; session.socket is a guard proxy that forwards property writes
      // to the TLS socket, so the session is left there for register().
      const socket = session.socket as StatefulSocket;
      socket[kSession] = session;
      // Every stream counts while it lives, answered or reset before its request was read.
      session.on('stream', (stream: http2.ServerHttp2Stream) => {
        const state = socket[kConnection];
        if (state === undefined) return;
        this.begin(state);
        stream.once('close', () => this.end(state));
      });
    });
  }

  /** TCP connections open now, handshakes included. */
  get count(): number {
    return this.#sockets.size;
  }

  get draining(): boolean {
    return this.#draining;
  }

  /** Whether a connection whose handshake failed never sent a byte (a TCP probe, a scan, a health check). */
  silent(socket: TLSSocket): boolean {
    return rawSocket(socket)?.bytesRead === 0;
  }

  /** Creates a finished handshake's state, and says how long the handshake took (seconds). */
  register(socket: TLSSocket): { state: ConnectionState; handshakeSeconds: number } {
    const s = socket as StatefulSocket;
    const raw = rawSocket(socket);
    if (raw !== undefined) this.#handshakeDone.add(raw);
    const started = raw === undefined ? undefined : this.#handshakeStarts.get(raw);
    const state: ConnectionState = {
      socket,
      session: s[kSession],
      active: 0,
      tunnel: false,
      timer: undefined,
      closing: false,
      identity: undefined,
      refused: undefined,
      reviews: new Map(),
      decisions: new Map(),
      decisionsGeneration: -1,
    };
    s[kConnection] = state;
    this.#states.add(state);
    socket.once('close', () => {
      if (state.timer) clearTimeout(state.timer);
      this.#states.delete(state);
    });
    return { state, handshakeSeconds: started === undefined ? 0 : (performance.now() - started) / 1000 };
  }

  /** The connection's state (on HTTP/2, `socket` may be the session's guard proxy). */
  get(socket: TLSSocket): ConnectionState {
    const state = (socket as StatefulSocket)[kConnection];
    if (state === undefined) throw new Error('kube-svid-proxy: connection state missing');
    return state;
  }

  /** A request started on the connection: it is not idle. */
  begin(state: ConnectionState): void {
    state.active++;
    if (state.timer !== undefined && state.refused === undefined) {
      clearTimeout(state.timer);
      state.timer = undefined;
    }
  }

  /** A request ended: once none is left, the idle clock runs (or, when draining, the connection closes). */
  end(state: ConnectionState): void {
    state.active = Math.max(0, state.active - 1);
    if (state.active > 0 || state.tunnel) return;
    if (this.#draining) {
      this.close(state, 'shutdown');
      return;
    }
    this.arm(state, this.#timeouts.idleMs, 'idle');
  }

  /** The connection now carries one raw tunnel (or one relayed refusal), then ends: never idle-closed. */
  tunnel(state: ConnectionState): void {
    state.tunnel = true;
    if (state.timer) clearTimeout(state.timer);
  }

  /** Closes the connection after `ms` unless, for `idle`, a request or a tunnel is in flight by then. */
  arm(state: ConnectionState, ms: number, reason: 'idle' | 'unauthenticated'): void {
    if (state.timer) clearTimeout(state.timer);
    state.timer = setTimeout(() => {
      state.timer = undefined;
      if (reason === 'idle' && (state.active > 0 || state.tunnel)) return;
      this.#log.debug({ peer: state.socket.remoteAddress, reason }, 'closing connection');
      this.close(state, reason);
    }, ms);
    state.timer.unref();
  }

  /** GOAWAY (HTTP/2) or end (HTTP/1.1), then destroy whatever has not closed after a short grace. */
  close(state: ConnectionState, reason: string): void {
    if (state.socket.destroyed) return;
    this.#metrics.connectionClosedByProxy(reason);
    if (state.session !== undefined && !state.session.closed) state.session.close();
    else if (state.active === 0) state.socket.end();
    setTimeout(() => state.socket.destroy(), CLOSE_GRACE_MS);
  }

  /** After a refused authentication, end the connection once the answer is out. */
  closeAfterAnswer(
    state: ConnectionState,
    res: ServerResponse | Http2ServerResponse | http2.ServerHttp2Stream,
  ): void {
    state.closing = true;
    if (state.session === undefined) (res as ServerResponse).setHeader?.('connection', 'close');
    res.once('finish', () => {
      this.#metrics.connectionClosedByProxy('unauthenticated');
      // At 'finish' an HTTP/2 stream has left its session already: close the session the connection holds.
      if (state.session !== undefined) state.session.close();
      else state.socket.end();
      setTimeout(() => state.socket.destroy(), CLOSE_GRACE_MS);
    });
  }

  /**
   * Starts draining: GOAWAY to every HTTP/2 client, idle HTTP/1.1 connections ended, connections still in their
   * TLS handshake destroyed. In-flight requests go on; each connection closes as its last one ends.
   */
  startDrain(): void {
    this.#draining = true;
    for (const state of this.#states) {
      if (state.session !== undefined) {
        if (!state.session.closed) state.session.close();
      } else if (state.active === 0 && !state.tunnel) {
        state.socket.end();
      }
    }
    for (const raw of this.#sockets) if (!this.#handshakeDone.has(raw)) raw.destroy();
  }

  /** Destroys every connection at once. */
  destroyAll(): void {
    this.#draining = true;
    for (const socket of this.#sockets) {
      this.#metrics.connectionClosedByProxy('shutdown');
      socket.destroy();
    }
  }
}
