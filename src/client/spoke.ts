/**
 * One spoke proxy as the client mode reaches it: TLS connections that present our SVID and accept the server
 * only once its X.509-SVID verifies against the bundle of its own trust domain and its SPIFFE ID is the one the
 * spoke's configuration allows, before a byte of HTTP is sent. Ordinary requests and watches share a small pool
 * of HTTP/2 sessions; an upgrade (exec, attach, port-forward) gets a TLS connection of its own.
 *
 * Rotation: a session belongs to the SVID it was opened with. When the SVID changes the pool's sessions are
 * retired with a graceful close (no new streams; the ones open, watches included, run to their end), and new
 * requests open sessions with the new SVID. Nothing open is cut.
 */
import http2, { type ClientHttp2Session, type ClientHttp2Stream, type OutgoingHttpHeaders } from 'node:http2';
import tls, { type TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import type { RateLimitedLog } from '../proxy/limits.ts';
import { isKspError } from '../spiffe/errors.ts';
import { presentedIntermediates, verifyX509Svid } from '../spiffe/x509svid.ts';
import type { ClientLimits, ClientTimeouts, SpokeConfig } from './config.ts';
import { ClientError, ClientErrorCode } from './errors.ts';
import type { ClientIdentity } from './identity.ts';

export interface SpokeEvents {
  /** A connection attempt ended: `ok`, `refused` (the server is not who it must be) or `error`. */
  connect(result: 'ok' | 'refused' | 'error'): void;
}

interface PooledSession {
  readonly session: ClientHttp2Session;
  readonly fingerprint: string;
  active: number;
}

/** Streams one session may carry when the server has not said (it always does, in its first SETTINGS). */
const DEFAULT_STREAMS = 100;

export class SpokeUpstream {
  readonly config: SpokeConfig;
  /** `:authority` and `Host` sent to the spoke: its configured host and port. */
  readonly authority: string;
  readonly #identity: ClientIdentity;
  readonly #limits: ClientLimits;
  readonly #timeouts: ClientTimeouts;
  readonly #log: Logger;
  readonly #quiet: RateLimitedLog;
  readonly #events: SpokeEvents;
  #pool: PooledSession[] = [];
  #opening: Promise<PooledSession> | undefined;
  /** Sessions retired by a rotation or a GOAWAY, still carrying streams. */
  readonly #draining = new Set<ClientHttp2Session>();
  /** Upgraded tunnels open. */
  readonly #tunnels = new Set<TLSSocket>();
  #closed = false;

  constructor(options: {
    readonly config: SpokeConfig;
    readonly identity: ClientIdentity;
    readonly limits: ClientLimits;
    readonly timeouts: ClientTimeouts;
    readonly logger: Logger;
    readonly quiet: RateLimitedLog;
    readonly events: SpokeEvents;
  }) {
    this.config = options.config;
    this.authority = options.config.server.host;
    this.#identity = options.identity;
    this.#limits = options.limits;
    this.#timeouts = options.timeouts;
    this.#log = options.logger.child({ spoke: options.config.name });
    this.#quiet = options.quiet;
    this.#events = options.events;
  }

  /** HTTP/2 sessions open to the spoke: in the pool, and retired ones still carrying streams. */
  get sessions(): number {
    return this.#pool.length + this.#draining.size;
  }

  get tunnels(): number {
    return this.#tunnels.size;
  }

  /**
   * Opens a stream on a session of the current SVID (opening a session when none has room). Throws a
   * `ClientError`: no SVID, the server refused, the spoke unreachable, or every session full.
   */
  async request(headers: OutgoingHttpHeaders): Promise<ClientHttp2Stream> {
    const pooled = await this.#session();
    const stream = pooled.session.request(headers, { endStream: false });
    pooled.active++;
    stream.once('close', () => {
      pooled.active--;
    });
    return stream;
  }

  /** A verified TLS connection of its own (ALPN http/1.1), for an upgrade: the caller writes the request. */
  async tunnel(): Promise<TLSSocket> {
    const socket = await this.#connect('http/1.1');
    this.#tunnels.add(socket);
    socket.once('close', () => this.#tunnels.delete(socket));
    return socket;
  }

  /**
   * The SVID changed: sessions opened with the old one take no new streams and close once their streams (watches
   * included) end. Tunnels are left alone: they were authenticated when they opened.
   */
  retire(): void {
    const old = this.#pool;
    this.#pool = [];
    for (const pooled of old) this.#drain(pooled.session);
    if (old.length > 0) {
      this.#log.info(
        { sessions: old.length, streams: old.reduce((n, p) => n + p.active, 0) },
        'SVID rotated: sessions of the old SVID take no new requests and close when their streams end',
      );
    }
  }

  /** Graceful: no new streams; what is open may finish (the caller bounds how long). */
  shutdown(): void {
    this.#closed = true;
    this.retire();
  }

  /** Whether anything is still open (sessions with streams, tunnels). */
  get busy(): boolean {
    return this.sessions > 0 || this.#tunnels.size > 0;
  }

  /** Cuts everything at once. */
  close(): void {
    this.#closed = true;
    for (const pooled of this.#pool) pooled.session.destroy();
    for (const session of this.#draining) session.destroy();
    for (const socket of this.#tunnels) socket.destroy();
    this.#pool = [];
  }

  #drain(session: ClientHttp2Session): void {
    if (session.closed || session.destroyed) return;
    this.#draining.add(session);
    session.close();
  }

  async #session(): Promise<PooledSession> {
    if (this.#closed) throw new ClientError(ClientErrorCode.Upstream, 'the client is shutting down');
    const fingerprint = this.#identity.current().fingerprint;
    for (;;) {
      const free = this.#pool.find(
        (p) => p.fingerprint === fingerprint && usable(p.session) && p.active < capacity(p.session),
      );
      if (free !== undefined) return free;
      if (this.#opening === undefined) break;
      // Another request is opening a session: it may have room for this one too.
      await this.#opening.catch(() => undefined);
      if (this.#opening !== undefined) continue;
    }
    if (this.#pool.length >= this.#limits.maxSessionsPerSpoke) {
      throw new ClientError(
        ClientErrorCode.Limit,
        `spoke ${this.config.name}: every HTTP/2 session is full (limits.maxSessionsPerSpoke ` +
          `${this.#limits.maxSessionsPerSpoke}, each with the streams the spoke allows)`,
      );
    }
    const opening = this.#open(fingerprint);
    this.#opening = opening;
    try {
      return await opening;
    } finally {
      if (this.#opening === opening) this.#opening = undefined;
    }
  }

  async #open(fingerprint: string): Promise<PooledSession> {
    const socket = await this.#connect('h2');
    const session = http2.connect(this.config.server, {
      createConnection: () => socket,
      // Our requests only; the spoke pushes nothing.
      settings: { enablePush: false },
    });
    const pooled: PooledSession = { session, fingerprint, active: 0 };
    const forget = (): void => {
      this.#pool = this.#pool.filter((p) => p !== pooled);
    };
    session.on('goaway', () => {
      forget();
      this.#draining.add(session);
    });
    session.on('close', () => {
      forget();
      this.#draining.delete(session);
    });
    session.on('error', (err: Error) => {
      forget();
      this.#quiet.warn(
        `session:${this.config.name}`,
        { spoke: this.config.name, err: { message: err.message } },
        'session to the spoke failed',
      );
    });
    // An idle session costs the spoke a connection: closed when nothing has used it for `timeouts.idle`.
    session.setTimeout(this.#timeouts.idleMs, () => {
      if (pooled.active === 0) {
        forget();
        this.#drain(session);
      }
    });
    if (this.#identity.current().fingerprint !== fingerprint) {
      // The SVID rotated while this session was opening: it serves the request that asked, then goes.
      this.#drain(session);
    } else {
      this.#pool.push(pooled);
    }
    return pooled;
  }

  /** TCP and TLS to the spoke with the current SVID; resolves once the server is verified and authorized. */
  #connect(alpn: 'h2' | 'http/1.1'): Promise<TLSSocket> {
    const presented = this.#identity.current();
    const { server, serverName } = this.config;
    const host = server.hostname.replace(/^\[|\]$/g, '');
    const port = server.port === '' ? 443 : Number(server.port);
    return new Promise<TLSSocket>((resolve, reject) => {
      const socket = tls.connect({
        host,
        port,
        ...(serverName ? { servername: serverName } : {}),
        secureContext: presented.context,
        ALPNProtocols: [alpn],
        // Web PKI does not apply: the server's SVID is verified below, against the SPIFFE bundles.
        rejectUnauthorized: false,
      });
      const timer = setTimeout(() => {
        fail(
          'error',
          new ClientError(
            ClientErrorCode.Upstream,
            `spoke ${this.config.name}: no TLS connection to ${server.host} within ` +
              `${this.#timeouts.connectMs / 1000}s (timeouts.connect)`,
            { status: 504 },
          ),
        );
      }, this.#timeouts.connectMs);
      const fail = (result: 'refused' | 'error', err: ClientError): void => {
        clearTimeout(timer);
        socket.destroy();
        this.#events.connect(result);
        reject(err);
      };
      socket.once('error', (err: NodeJS.ErrnoException) => {
        const code = err.code === undefined ? '' : ` (${err.code})`;
        fail(
          'error',
          new ClientError(
            ClientErrorCode.Upstream,
            `spoke ${this.config.name}: cannot reach ${server.host}${code}: ${err.message}`,
            { cause: err },
          ),
        );
      });
      socket.once('secureConnect', () => {
        try {
          this.#verify(socket, alpn);
        } catch (err) {
          fail(
            err instanceof ClientError && err.code === ClientErrorCode.ServerRefused ? 'refused' : 'error',
            err as ClientError,
          );
          return;
        }
        clearTimeout(timer);
        socket.removeAllListeners('error');
        this.#events.connect('ok');
        this.#log.debug({ server: server.host, alpn }, 'connected to the spoke');
        resolve(socket);
      });
    });
  }

  #verify(socket: TLSSocket, alpn: string): void {
    const refuse = (why: string, cause?: unknown): ClientError =>
      new ClientError(
        ClientErrorCode.ServerRefused,
        `spoke ${this.config.name} (${this.config.server.host}): ${why}`,
        {
          cause,
        },
      );
    const leaf = socket.getPeerX509Certificate();
    if (leaf === undefined) throw refuse('the server presented no certificate');
    let id: string;
    try {
      const verified = verifyX509Svid(
        [leaf, ...presentedIntermediates(leaf)],
        this.#identity.bundles,
        new Date(),
      );
      id = verified.id.toString();
      const allowed = this.config.serverAuthorization;
      if (allowed.kind === 'id' && !verified.id.equals(allowed.id)) {
        throw refuse(`the server is ${id}, not the configured serverId ${allowed.id}`);
      }
      if (allowed.kind === 'trustDomain' && !verified.id.isMemberOf(allowed.trustDomain)) {
        throw refuse(`the server is ${id}, outside the configured trustDomain ${allowed.trustDomain.name}`);
      }
    } catch (err) {
      if (err instanceof ClientError) throw err;
      const code = isKspError(err) ? ` (${err.code})` : '';
      throw refuse(`the server's X.509-SVID is refused${code}: ${(err as Error).message}`, err);
    }
    if (socket.alpnProtocol !== alpn) {
      throw new ClientError(
        ClientErrorCode.Upstream,
        `spoke ${this.config.name}: the server ${id} did not agree to ${alpn} (ALPN ${String(socket.alpnProtocol)}); ` +
          'is it a kube-svid-proxy?',
      );
    }
  }
}

function usable(session: ClientHttp2Session): boolean {
  return !session.closed && !session.destroyed;
}

function capacity(session: ClientHttp2Session): number {
  return Math.min(session.remoteSettings.maxConcurrentStreams ?? DEFAULT_STREAMS, 10_000);
}
