/**
 * Every resource a client can hold through the proxy has a limit here, with its default and the configuration
 * key that sets it (`limits.*` and `timeouts.*` in proxy.yaml; docs/security.md lists them all).
 */
import type { Logger } from 'pino';

export interface ProxyLimits {
  /** TLS connections open at once (all clients); past it a new TCP connection is closed at once. */
  readonly maxConnections: number;
  /** HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: requests in flight on one client connection. */
  readonly maxStreamsPerConnection: number;
  /** Ordinary (not long-running) requests in flight per SPIFFE ID, over all its connections (429 past it). */
  readonly maxRequestsPerIdentity: number;
  /** Long-running requests (watch, exec, attach, port-forward, proxy, follow) per SPIFFE ID (429 past it). */
  readonly maxLongRunningPerIdentity: number;
  /** HTTP/2 sessions to kube-apiserver for ordinary requests (503 past them). */
  readonly maxUpstreamSessions: number;
  /** HTTP/2 sessions to kube-apiserver for long-running requests, apart from the ordinary ones (503 past them). */
  readonly maxLongRunningUpstreamSessions: number;
}

export interface ProxyTimeouts {
  /** From TCP accept to a finished TLS handshake. */
  readonly handshakeMs: number;
  /** A connection with no request in flight (and no upgraded tunnel) is closed after this long. */
  readonly idleMs: number;
  /** How long an ordinary request waits for kube-apiserver's response headers (504 after). */
  readonly responseHeadersMs: number;
  /** How long a watch, exec, attach, port-forward or followed log waits for its headers or its 101 (504 after). */
  readonly longRunningResponseHeadersMs: number;
  /** On SIGTERM: how long in-flight requests may finish before what is left is closed. */
  readonly shutdownDrainMs: number;
  /** A client refused at the handshake gets this long to send a request and read the 401, then is closed. */
  readonly unauthenticatedMs: number;
}

export const DEFAULT_LIMITS: ProxyLimits = {
  maxConnections: 2048,
  maxStreamsPerConnection: 250,
  maxRequestsPerIdentity: 250,
  maxLongRunningPerIdentity: 500,
  maxUpstreamSessions: 4,
  maxLongRunningUpstreamSessions: 16,
};

export const DEFAULT_TIMEOUTS: ProxyTimeouts = {
  handshakeMs: 10_000,
  idleMs: 300_000,
  responseHeadersMs: 70_000,
  longRunningResponseHeadersMs: 30_000,
  shutdownDrainMs: 25_000,
  unauthenticatedMs: 10_000,
};

/**
 * Requests in flight per SPIFFE ID, ordinary and long-running apart. `acquire` returns a release function, or
 * the name of the limit that refused.
 */
export class IdentityCounters {
  readonly #counts = new Map<string, { ordinary: number; longRunning: number }>();
  readonly #limits: Pick<ProxyLimits, 'maxRequestsPerIdentity' | 'maxLongRunningPerIdentity'>;

  constructor(limits: Pick<ProxyLimits, 'maxRequestsPerIdentity' | 'maxLongRunningPerIdentity'>) {
    this.#limits = limits;
  }

  acquire(id: string, longRunning: boolean): { release: () => void } | { limit: string; max: number } {
    let c = this.#counts.get(id);
    if (c === undefined) {
      c = { ordinary: 0, longRunning: 0 };
      this.#counts.set(id, c);
    }
    const kind = longRunning ? 'longRunning' : 'ordinary';
    const max = longRunning ? this.#limits.maxLongRunningPerIdentity : this.#limits.maxRequestsPerIdentity;
    if (c[kind] >= max) {
      return {
        limit: longRunning ? 'limits.maxLongRunningPerIdentity' : 'limits.maxRequestsPerIdentity',
        max,
      };
    }
    c[kind]++;
    const counts = c;
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        counts[kind]--;
        if (counts.ordinary === 0 && counts.longRunning === 0) this.#counts.delete(id);
      },
    };
  }

  /** In flight now, for one identity (tests) or all (metrics). */
  inFlight(id?: string): { ordinary: number; longRunning: number } {
    if (id !== undefined) return { ...(this.#counts.get(id) ?? { ordinary: 0, longRunning: 0 }) };
    let ordinary = 0;
    let longRunning = 0;
    for (const c of this.#counts.values()) {
      ordinary += c.ordinary;
      longRunning += c.longRunning;
    }
    return { ordinary, longRunning };
  }
}

/**
 * Log lines that an unauthenticated client can cause (refused handshakes, 401s, dropped connections), at most one
 * per key per interval; the next line says how many were suppressed meanwhile. Metrics still count every one.
 */
export class RateLimitedLog {
  readonly #log: Logger;
  readonly #intervalMs: number;
  readonly #last = new Map<string, { at: number; suppressed: number }>();

  constructor(log: Logger, intervalMs = 10_000) {
    this.#log = log;
    this.#intervalMs = intervalMs;
  }

  warn(key: string, fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    const last = this.#last.get(key);
    if (last !== undefined && now - last.at < this.#intervalMs) {
      last.suppressed++;
      return;
    }
    if (this.#last.size > 1000) this.#last.clear();
    this.#last.set(key, { at: now, suppressed: 0 });
    const suppressed = last?.suppressed ?? 0;
    this.#log.warn(suppressed > 0 ? { ...fields, suppressed } : fields, message);
  }
}
