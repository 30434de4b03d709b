import { randomUUID, type X509Certificate } from 'node:crypto';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import http2, { type Http2ServerRequest, type Http2ServerResponse, type ServerHttp2Stream } from 'node:http2';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import { ProxyMetrics } from '../observability/metrics.ts';
import { NESTED_SPIFFE_ID_EXTRA, parseImpersonationHeaders } from '../policy/nested.ts';
import { requestInfo } from '../policy/request.ts';
import {
  type Decision,
  type KubeIdentity,
  type NestedImpersonationRequest,
  PolicyDenyCode,
  type RequestInfo,
} from '../policy/types.ts';
import type { TrustDomain } from '../spiffe/id.ts';
import { type AuditDraft, type AuditOutcome, type AuditSink, allowed, auditEvent, nowMs } from './audit.ts';
import {
  Authenticator,
  authFailureCode,
  type PeerIdentity,
  stillValid,
  type TrustState,
} from './authenticate.ts';
import { ClientConnections, type ConnectionState } from './connections.ts';
import { ProxyErrorCode } from './errors.ts';
import { type Upstream, UpstreamError } from './forward.ts';
import {
  DEFAULT_LIMITS,
  DEFAULT_TIMEOUTS,
  IdentityCounters,
  type ProxyLimits,
  type ProxyTimeouts,
  RateLimitedLog,
} from './limits.ts';
import { mayImpersonate } from './sar.ts';
import type { IdentitySource } from './source.ts';
import { respondStatus, sendStatus, writeRawStatus } from './status.ts';
import { type PolicyHolder, ServingTrust } from './trust.ts';

export interface ProxyServerOptions {
  readonly trustDomain: TrustDomain;
  readonly source: IdentitySource;
  readonly policy: PolicyHolder;
  readonly upstream: Upstream;
  /** Operational log. */
  readonly logger: Logger;
  /** One `audit.k8s.io/v1` Event per request of an authenticated client. */
  readonly audit: AuditSink;
  readonly metrics?: ProxyMetrics;
  /** Limits on what clients can hold (defaults: DEFAULT_LIMITS). */
  readonly limits?: Partial<ProxyLimits>;
  /** Timeouts (defaults: DEFAULT_TIMEOUTS). */
  readonly timeouts?: Partial<ProxyTimeouts>;
  /** A client authenticated with intermediates not known for its leaf before (workers pass them on). */
  readonly onIntermediatesLearned?: (
    leafFingerprint: string,
    intermediates: readonly X509Certificate[],
  ) => void;
}

const DECISION_CACHE_PER_CONNECTION = 64;
/** How long a SubjectAccessReview's answer is reused on one connection. */
const REVIEW_CACHE_MS = 10_000;

type Request = IncomingMessage | Http2ServerRequest;
type Response = ServerResponse | Http2ServerResponse;

/**
 * The SPIFFE mTLS front door: an HTTP/2 (and HTTP/1.1) TLS listener whose certificate and trust bundles come
 * from an IdentitySource, which authenticates every client to the X509-SVID specification, judges every request
 * by the current policy, and forwards allowed ones with the mapped Kubernetes identity.
 *
 * OpenSSL asks for a client certificate but decides nothing (`rejectUnauthorized: false`): the SPIFFE rules
 * (the bundle of the ID's own trust domain, leaf rules) are ours, and a refusal is answered with a Kubernetes
 * Status that names the rule broken, which is also logged and counted.
 */
export class ProxyServer {
  readonly server: http2.Http2SecureServer;
  readonly #options: ProxyServerOptions;
  readonly #log: Logger;
  readonly #authenticator: Authenticator;
  /** What clients are verified against and what new handshakes present. */
  readonly #serving: ServingTrust;
  readonly #limits: ProxyLimits;
  readonly #timeouts: ProxyTimeouts;
  readonly #counters: IdentityCounters;
  readonly #quiet: RateLimitedLog;
  /** The metrics given, or a registry nobody scrapes: the request path never asks whether metrics exist. */
  readonly #metrics: ProxyMetrics;
  /** The client connections: open, in flight, idle clocks, closes. */
  readonly #connections: ClientConnections;
  #closed = false;

  constructor(options: ProxyServerOptions) {
    this.#options = options;
    this.#log = options.logger;
    this.#authenticator = new Authenticator(
      options.onIntermediatesLearned ? { onLearned: options.onIntermediatesLearned } : {},
    );
    this.#metrics = options.metrics ?? new ProxyMetrics({ defaultMetrics: false });
    this.#limits = { ...DEFAULT_LIMITS, ...options.limits };
    this.#timeouts = { ...DEFAULT_TIMEOUTS, ...options.timeouts };
    this.#counters = new IdentityCounters(this.#limits);
    this.#quiet = new RateLimitedLog(options.logger);
    this.#serving = new ServingTrust({
      trustDomain: options.trustDomain,
      source: options.source,
      policy: options.policy,
      logger: options.logger,
    });
    this.server = http2.createSecureServer({
      ...this.#serving.initialContext(),
      allowHTTP1: true,
      requestCert: true,
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
      handshakeTimeout: this.#timeouts.handshakeMs,
      settings: { maxConcurrentStreams: this.#limits.maxStreamsPerConnection },
    });
    this.server.maxConnections = this.#limits.maxConnections;
    this.#connections = new ClientConnections(this.server, {
      metrics: this.#metrics,
      logger: options.logger,
      timeouts: this.#timeouts,
    });
    const metrics = this.#metrics;
    this.server.on('drop', (data?: { remoteAddress?: string }) => {
      metrics.limitRefused('limits.maxConnections');
      metrics.connectionClosedByProxy('max_connections');
      this.#quiet.warn(
        'drop',
        { peer: data?.remoteAddress, limit: 'limits.maxConnections', max: this.#limits.maxConnections },
        'connection refused: the proxy holds limits.maxConnections connections already',
      );
    });
    this.server.on('secureConnection', (socket: TLSSocket) => this.#onSecureConnection(socket));
    this.server.on('tlsClientError', (err: Error & { code?: string }, socket: TLSSocket) => {
      const code = err.code ?? ProxyErrorCode.TlsHandshake;
      // Nothing received at all: a TCP probe, a port scan or a load balancer check, not a failed client.
      if (this.#connections.silent(socket)) {
        metrics.handshake('no_client_hello');
        if (code === 'ERR_TLS_HANDSHAKE_TIMEOUT') metrics.connectionClosedByProxy('handshake_timeout');
        this.#log.debug({ peer: socket.remoteAddress, code }, 'connection closed before a ClientHello');
        return;
      }
      if (code === 'ERR_TLS_HANDSHAKE_TIMEOUT') metrics.connectionClosedByProxy('handshake_timeout');
      metrics.handshake('error');
      metrics.authFailure(code);
      this.#quiet.warn(
        `tls:${code}`,
        { peer: socket.remoteAddress, code, err: { message: err.message } },
        'TLS handshake failed',
      );
    });
    this.server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      this.#onUpgrade(req, socket, head).catch((err: Error) => {
        this.#log.error({ err: { message: err.message } }, 'upgrade handling failed');
        socket.destroy();
      });
    });
    this.server.on('request', (req: Request, res: Response) => {
      this.#onRequest(req, res).catch((err: Error) => {
        this.#log.error({ err: { message: err.message } }, 'request handling failed');
        sendStatus(res, 500, 'kube-svid-proxy: internal error');
      });
    });
    // HTTP/2 streams are served on the stream API (#onStream), without the compatibility layer's request and
    // response objects: the 'request' listener above is there for HTTP/1.1, and adding it made Node install a
    // compatibility 'stream' listener that would serve every HTTP/2 stream a second time. It goes.
    for (const listener of this.server.listeners('stream')) {
      this.server.off('stream', listener as (...args: unknown[]) => void);
    }
    this.server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
      // A client's reset is the stream's close, handled there; no 'error' may go unheard.
      stream.on('error', () => {});
      this.#onStream(stream, headers).catch((err: Error) => {
        this.#log.error({ err: { message: err.message } }, 'request handling failed');
        respondStatus(stream, 500, 'kube-svid-proxy: internal error');
      });
    });
    this.#serving.attach(this.server);
    options.source.on('update', () => this.#onIdentityUpdate());
  }

  /** Intermediates another worker saw with this leaf (see ProxyServerOptions.onIntermediatesLearned). */
  learnIntermediates(leafFingerprint: string, intermediates: readonly X509Certificate[]): void {
    this.#authenticator.learn(leafFingerprint, intermediates);
  }

  /** The limits and timeouts in force. */
  get limits(): ProxyLimits {
    return this.#limits;
  }

  get timeouts(): ProxyTimeouts {
    return this.#timeouts;
  }

  /** Open client connections, requests in flight, and whether the proxy is draining (metrics, readiness). */
  usage(): {
    connections: number;
    inFlight: { ordinary: number; longRunning: number };
    draining: boolean;
  } {
    return {
      connections: this.#connections.count,
      inFlight: this.#counters.inFlight(),
      draining: this.#connections.draining,
    };
  }

  /** Requests in flight for one SPIFFE ID (tests, diagnostics). */
  inFlight(spiffeId: string): { ordinary: number; longRunning: number } {
    return this.#counters.inFlight(spiffeId);
  }

  /**
   * The policy changed: recompute the trust state now, so a trust domain the policy dropped is refused from the
   * next handshake on (and its resumable sessions voided), not only after the next request.
   */
  policyChanged(): void {
    this.#serving.refresh();
  }

  /** The bundles clients are verified against: ours and those of the trust domains the policy names. */
  get trust(): TrustState {
    return this.#serving.state;
  }

  /**
   * `reusePort` (the workers): a listening socket of this process's own on the shared port (SO_REUSEPORT), the
   * kernel spreading new connections over the workers' sockets; no connection passes through the main process.
   */
  async listen(port: number, host = '0.0.0.0', options: { reusePort?: boolean } = {}): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      const shared = options.reusePort === true ? { reusePort: true, exclusive: true } : {};
      this.server.listen({ port, host, ...shared }, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    const address = this.server.address() as AddressInfo;
    this.#log.info({ address: address.address, port: address.port }, 'proxy listening');
    return address;
  }

  /**
   * Graceful stop: stop accepting, send GOAWAY to every HTTP/2 client and close idle HTTP/1.1 connections, let
   * in-flight requests finish for up to `deadlineMs`, then close whatever is left. Logs each step.
   */
  async drain(deadlineMs: number = this.#timeouts.shutdownDrainMs): Promise<void> {
    if (this.#closed) return;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    const inFlight = this.#counters.inFlight();
    this.#log.info(
      {
        connections: this.#connections.count,
        requests: inFlight.ordinary,
        longRunning: inFlight.longRunning,
        deadlineSeconds: deadlineMs / 1000,
      },
      'draining: no new connections; GOAWAY to HTTP/2 clients, idle HTTP/1.1 connections closed',
    );
    this.#connections.startDrain();
    let timer: NodeJS.Timeout | undefined;
    const expired = await Promise.race([
      closed.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), deadlineMs);
      }),
    ]);
    clearTimeout(timer);
    if (expired && this.#connections.count > 0) {
      const left = this.#counters.inFlight();
      this.#log.warn(
        { connections: this.#connections.count, requests: left.ordinary, longRunning: left.longRunning },
        'drain deadline reached (timeouts.shutdownDrain): closing the connections left',
      );
    } else {
      this.#log.info('drained: every client connection finished');
    }
    await this.close();
  }

  /** Stops at once: every connection is destroyed. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#connections.destroyAll();
    if (!this.server.listening) return;
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  #onIdentityUpdate(): void {
    if (this.#closed) return;
    this.#serving.identityChanged();
  }

  #onSecureConnection(socket: TLSSocket): void {
    const { state, handshakeSeconds: seconds } = this.#connections.register(socket);
    const metrics = this.#metrics;
    metrics.connectionOpened();
    socket.once('close', () => metrics.connectionClosed());
    if (this.#serving.withoutSvid !== undefined) {
      // The SVID this handshake presented was withdrawn: nothing is served under it.
      metrics.connectionClosedByProxy('no_svid');
      this.#quiet.warn(
        'no_svid',
        { peer: socket.remoteAddress, reason: this.#serving.withoutSvid },
        'connection closed: no SVID to serve with',
      );
      socket.destroy();
      return;
    }
    try {
      state.identity = this.#authenticator.authenticate(socket, this.trust);
      metrics.handshake('ok', seconds);
      if (state.active === 0) this.#connections.arm(state, this.#timeouts.idleMs, 'idle');
      if (this.#log.isLevelEnabled('debug'))
        this.#log.debug(
          {
            spiffeId: state.identity.id.toString(),
            resumed: state.identity.resumed,
            peer: socket.remoteAddress,
          },
          'client authenticated',
        );
    } catch (err) {
      metrics.handshake('refused', seconds);
      this.#refuseAuthentication(socket, state, err);
    }
  }

  /**
   * The client's SVID is refused (at the handshake, or later after an expiry or a bundle change): remembered for
   * this trust generation, counted, logged at a limited rate, and the connection gets `timeouts.unauthenticated`
   * to send one request and read why; then it goes.
   */
  #refuseAuthentication(
    socket: TLSSocket,
    state: ConnectionState,
    err: unknown,
  ): { code: string; message: string } {
    const code = authFailureCode(err);
    state.identity = undefined;
    state.refused = { code, message: (err as Error).message, generation: this.trust.generation };
    this.#metrics.authFailure(code);
    this.#connections.arm(state, this.#timeouts.unauthenticatedMs, 'unauthenticated');
    this.#quiet.warn(
      `auth:${code}`,
      {
        code,
        peer: socket.remoteAddress,
        resumed: socket.isSessionReused(),
        err: { message: state.refused.message },
      },
      'client authentication refused',
    );
    return state.refused;
  }

  /** The connection's identity for this request, or why it is refused (counted and logged once per cause). */
  #authenticated(
    socket: TLSSocket,
    state: ConnectionState,
  ): PeerIdentity | { code: string; message: string } {
    const trust = this.trust;
    if (state.identity !== undefined && stillValid(state.identity, trust)) return state.identity;
    if (state.refused !== undefined && state.refused.generation === trust.generation) return state.refused;
    // First use after a bundle change or an expiry: check again, now.
    try {
      state.identity = this.#authenticator.authenticate(socket, trust);
      state.refused = undefined;
      return state.identity;
    } catch (err) {
      return this.#refuseAuthentication(socket, state, err);
    }
  }

  #decide(state: ConnectionState, identity: PeerIdentity, info: RequestInfo): Decision {
    const policy = this.#options.policy;
    if (state.decisionsGeneration !== policy.generation) {
      state.decisions.clear();
      state.decisionsGeneration = policy.generation;
    }
    const key = info.isResourceRequest
      ? `${info.verb}|${info.apiGroup}|${info.resource}|${info.subresource}|${info.namespace}`
      : `${info.verb}|${info.path}`;
    let decision = state.decisions.get(key);
    if (decision === undefined) {
      decision = policy.current.decide(identity.id, info);
      if (state.decisions.size >= DECISION_CACHE_PER_CONNECTION) state.decisions.clear();
      state.decisions.set(key, decision);
    }
    return decision;
  }

  /**
   * The request path up to forwarding, shared by ordinary and upgrade requests: request target, authentication,
   * impersonation headers, policy. Returns what to forward, or the refusal to answer; synchronously, except for
   * nested impersonation (which may ask kube-apiserver), so an ordinary request costs no extra turn.
   */
  #admit(
    socket: TLSSocket,
    method: string,
    url: string,
    headers: IncomingHttpHeaders,
  ): Admission | Promise<Admission> {
    const userAgent = headers['user-agent'];
    const entry: AuditDraft = {
      auditID: randomUUID(),
      started: performance.now(),
      received: nowMs(),
      requestURI: url,
      verb: method.toLowerCase(),
      peer: socket.remoteAddress,
      ...(userAgent !== undefined ? { userAgent } : {}),
    };
    // Authentication first: a client without a valid SVID gets its one 401 and the connection closes, whatever
    // its request target (a bad target must not buy an unauthenticated client an audit line per request).
    const state = this.#connections.get(socket);
    const identity = this.#authenticated(socket, state);
    if (!('id' in identity)) {
      return {
        ok: false,
        entry,
        status: 401,
        close: true,
        message: `kube-svid-proxy: SPIFFE authentication failed (${identity.code}): ${identity.message}`,
        outcome: { decision: 'unauthenticated', code: identity.code },
      };
    }
    entry.spiffeId = identity.id.toString();
    let info: RequestInfo;
    try {
      info = requestInfo(method, url);
    } catch (err) {
      const code = (err as { code?: string }).code ?? ProxyErrorCode.BadRequest;
      return {
        ok: false,
        entry,
        status: 400,
        message: `kube-svid-proxy: ${(err as Error).message} (${code})`,
        outcome: { decision: 'bad-request', code },
      };
    }
    entry.verb = info.verb;
    entry.info = info;
    const metrics = this.#metrics;
    const requested = parseImpersonationHeaders(headers);
    if (requested !== undefined) return this.#admitNested(state, identity, info, entry, requested);
    const decision = this.#decide(state, identity, info);
    if (!decision.allowed)
      return this.#deny(identity, info, entry, decision.rule, decision.code, decision.reason);
    metrics.decision(decision.rule, true, '');
    entry.rule = decision.rule;
    entry.impersonated = decision.identity;
    return { ok: true, entry, identity: decision.identity, longRunning: isLongRunning(info) };
  }

  /**
   * A request with the client's own Impersonate-* headers (Argo CD's sync impersonation, Flux's
   * serviceAccountName): allowed only when the rule lists that identity, and then only when kube-apiserver agrees,
   * through a SubjectAccessReview, that the client's mapped identity may impersonate it. The nested identity is
   * forwarded, with the client's SPIFFE ID in the extra `spiffe.io/id`.
   */
  async #admitNested(
    state: ConnectionState,
    identity: PeerIdentity,
    info: RequestInfo,
    entry: AuditDraft,
    requested: NestedImpersonationRequest | { readonly refused: string },
  ): Promise<Admission> {
    const metrics = this.#metrics;
    const refuse = (rule: string | undefined, code: string, reason: string): Admission =>
      this.#deny(identity, info, entry, rule, code, reason);
    if ('refused' in requested)
      return refuse(undefined, PolicyDenyCode.NestedImpersonation, requested.refused);
    const decision = this.#options.policy.current.decideNested(identity.id, info, requested);
    if (!decision.allowed) return refuse(decision.rule, decision.code, decision.reason);
    entry.rule = decision.rule;
    entry.mappedUser = decision.identity.user;
    const key = `${this.#options.policy.generation}|${decision.nested.user}|${decision.nested.groups.join(',')}`;
    const cached = state.reviews.get(key);
    let review = cached !== undefined && cached.until > Date.now() ? cached.result : undefined;
    if (review === undefined) {
      review = await mayImpersonate(this.#options.upstream, decision.identity, decision.nested);
      if (state.reviews.size >= DECISION_CACHE_PER_CONNECTION) state.reviews.clear();
      state.reviews.set(key, { result: review, until: Date.now() + REVIEW_CACHE_MS });
    }
    if (!review.allowed) return refuse(decision.rule, PolicyDenyCode.NestedImpersonation, review.reason);
    metrics.decision(decision.rule, true, '');
    const forwarded: KubeIdentity = {
      user: decision.nested.user,
      groups: decision.nested.groups,
      extra: { [NESTED_SPIFFE_ID_EXTRA]: [identity.id.toString()] },
    };
    entry.impersonated = forwarded;
    return { ok: true, entry, identity: forwarded, longRunning: isLongRunning(info) };
  }

  /** A policy refusal: 403 with a Status naming who, what, why and the code; counted per rule and code. */
  #deny(
    identity: PeerIdentity,
    info: RequestInfo,
    entry: AuditDraft,
    rule: string | undefined,
    code: string,
    reason: string,
  ): Admission {
    this.#metrics.decision(rule ?? '', false, code);
    return {
      ok: false,
      entry,
      status: 403,
      message: `kube-svid-proxy: ${identity.id} is not allowed to ${info.verb} ${info.path}: ${reason} (${code})`,
      outcome: { decision: 'deny', ...(rule ? { rule } : {}), code, reason },
    };
  }

  /** Counts the request and writes its audit Event. */
  #audit(entry: AuditDraft, status: number, outcome: AuditOutcome, message?: string): void {
    this.#metrics.request(status, (performance.now() - entry.started) / 1000);
    this.#options.audit.write(auditEvent(entry, status, outcome, message));
  }

  async #onRequest(req: Request, res: Response): Promise<void> {
    const socket = req.socket as TLSSocket;
    const state = this.#connections.get(socket);
    // HTTP/2 streams are counted from 'stream' to their 'close'; HTTP/1.1 requests here.
    if (state.session === undefined) {
      this.#connections.begin(state);
      res.once('close', () => this.#connections.end(state));
    }
    if (state.closing) {
      // The 401 went out and the connection is closing: later requests get no answer and no log line.
      if ('stream' in req && req.stream !== undefined)
        req.stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      else socket.destroy();
      return;
    }
    if (this.#connections.draining && state.session === undefined) res.setHeader('connection', 'close');
    const admitted = this.#admit(socket, req.method ?? 'GET', req.url ?? '/', req.headers);
    const admission = admitted instanceof Promise ? await admitted : admitted;
    if (!admission.ok) {
      if (admission.close) this.#connections.closeAfterAnswer(state, res);
      sendStatus(res, admission.status, admission.message);
      this.#auditRefusal(admission);
      return;
    }
    const release = this.#hold(admission.entry, admission.longRunning, res, sendStatus);
    if (release === undefined) return;
    res.once('close', release);
    try {
      const status = await this.#options.upstream.forward(
        req,
        res,
        admission.identity,
        socket.remoteAddress,
        { longRunning: admission.longRunning, auditId: admission.entry.auditID },
      );
      this.#audit(admission.entry, status, allowed(admission.entry));
    } catch (err) {
      const failure = this.#forwardingFailed(err, 'forwarding failed', admission.entry);
      sendStatus(res, failure.status, failure.message, failure.headers);
    }
  }

  /** An HTTP/2 request: the same steps as #onRequest, on the stream itself. */
  async #onStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): Promise<void> {
    const socket = stream.session?.socket as TLSSocket | undefined;
    if (socket === undefined) {
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    const state = this.#connections.get(socket);
    if (state.closing) {
      // The 401 went out and the connection is closing: later requests get no answer and no log line.
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    const admitted = this.#admit(
      socket,
      String(headers[':method'] ?? 'GET'),
      String(headers[':path'] ?? '/'),
      headers,
    );
    const admission = admitted instanceof Promise ? await admitted : admitted;
    if (!admission.ok) {
      if (admission.close) this.#connections.closeAfterAnswer(state, stream);
      respondStatus(stream, admission.status, admission.message);
      this.#auditRefusal(admission);
      return;
    }
    const release = this.#hold(admission.entry, admission.longRunning, stream, respondStatus);
    if (release === undefined) return;
    stream.once('close', release);
    try {
      const status = await this.#options.upstream.forwardStream(
        stream,
        headers,
        admission.identity,
        socket.remoteAddress,
        { longRunning: admission.longRunning, auditId: admission.entry.auditID },
      );
      this.#audit(admission.entry, status, allowed(admission.entry));
    } catch (err) {
      const failure = this.#forwardingFailed(err, 'forwarding failed', admission.entry);
      respondStatus(stream, failure.status, failure.message, failure.headers);
    }
  }

  /**
   * Forwarding failed (kube-apiserver unreachable, broken, too slow, or an upstream limit): counted, logged at a
   * limited rate, audited with ERR_PROXY_LIMIT or ERR_UPSTREAM; returns the answer for the client.
   */
  #forwardingFailed(
    err: unknown,
    what: string,
    entry: AuditDraft,
    upgrade?: string,
  ): { status: number; message: string; headers: Record<string, string> } {
    const status = err instanceof UpstreamError ? err.status : 502;
    const limit = err instanceof UpstreamError ? err.limit : undefined;
    const message = `kube-svid-proxy: ${(err as Error).message}`;
    if (limit !== undefined) this.#metrics.limitRefused(limit);
    this.#quiet.warn(
      `${what}:${limit ?? status}`,
      { err: { message: (err as Error).message }, ...(limit ? { limit } : {}) },
      what,
    );
    this.#audit(
      entry,
      status,
      {
        ...allowed(entry, upgrade),
        code: limit ? ProxyErrorCode.Limit : ProxyErrorCode.Upstream,
        ...(limit ? { limit } : {}),
      },
      message,
    );
    return { status, message, headers: limit ? { 'retry-after': '1' } : {} };
  }

  /** A request over a per-identity limit: 429 with Retry-After, counted, audited with the limit's key. */
  #refuseLimit(
    entry: AuditDraft,
    limit: string,
    max: number,
    upgrade?: string,
  ): { status: 429; message: string; headers: Record<string, string> } {
    this.#metrics.limitRefused(limit);
    const message =
      `kube-svid-proxy: ${entry.spiffeId} already has ${max} requests of this kind in flight (${limit}); ` +
      'retry later';
    this.#audit(entry, 429, { ...allowed(entry, upgrade), code: ProxyErrorCode.Limit, limit }, message);
    return { status: 429, message, headers: { 'retry-after': '1' } };
  }

  /**
   * The checks between admission and forwarding, the same for every kind of request: the audit log can take the
   * Event, and the client is under its limits. A refusal is answered here, with `answer` on `target` (a module
   * function, so nothing is allocated per request), and undefined returned; else the slot's release.
   */
  #hold<T>(
    entry: AuditDraft,
    longRunning: boolean,
    target: T,
    answer: (target: T, status: number, message: string, headers: Record<string, string>) => void,
    upgrade?: string,
  ): (() => void) | undefined {
    if (this.#auditFull()) {
      const refusal = this.#refuseAuditFull(entry);
      answer(target, refusal.status, refusal.message, refusal.headers);
      return undefined;
    }
    const slot = this.#counters.acquire(entry.spiffeId ?? '', longRunning);
    if ('limit' in slot) {
      const refusal = this.#refuseLimit(entry, slot.limit, slot.max, upgrade);
      answer(target, refusal.status, refusal.message, refusal.headers);
      return undefined;
    }
    return slot.release;
  }

  /** True while the audit sink cannot take an Event and `audit.overflow` is `refuse`. */
  #auditFull(): boolean {
    return this.#options.audit.full?.() === true;
  }

  /**
   * An allowed request the proxy cannot audit (`audit.overflow: refuse` and the buffer full, or the destination
   * failing): 503 with Retry-After, counted under the limit `audit.bufferBytes`, logged at a limited rate. Its own
   * Event cannot be written either: the count and the log line are its record.
   */
  #refuseAuditFull(entry: AuditDraft): { status: 503; message: string; headers: Record<string, string> } {
    const limit = 'audit.bufferBytes';
    this.#metrics.limitRefused(limit);
    this.#metrics.request(503, (performance.now() - entry.started) / 1000);
    this.#quiet.warn(
      'audit-full',
      { auditID: entry.auditID, spiffeId: entry.spiffeId, verb: entry.verb, limit },
      'request refused: the audit destination is not keeping up (audit.bufferBytes full) or failing; ' +
        'audit.overflow is refuse',
    );
    return {
      status: 503,
      message: `kube-svid-proxy: the audit log is not keeping up; request not served unaudited (${limit}); retry later`,
      headers: { 'retry-after': '1' },
    };
  }

  /** Refusals before a policy decision by an authenticated client are audited; 401s only at a limited rate. */
  #auditRefusal(admission: Extract<Admission, { ok: false }>): void {
    const { entry, status, outcome } = admission;
    if (status !== 401) {
      this.#audit(entry, status, outcome, admission.message);
      return;
    }
    // Not in the audit sink: a client without an SVID must not be able to fill it.
    this.#metrics.request(401, (performance.now() - entry.started) / 1000);
    this.#quiet.warn(
      `401:${String(outcome.code)}`,
      {
        auditID: entry.auditID,
        peer: entry.peer,
        verb: entry.verb,
        requestURI: entry.requestURI,
        decision: outcome.decision,
        code: outcome.code,
        ...(outcome.upgrade ? { upgrade: outcome.upgrade } : {}),
        status: 401,
      },
      'request refused: no valid SVID',
    );
  }

  /** HTTP/1.1 `Upgrade` requests (exec, attach, port-forward over SPDY or WebSocket): same checks, raw tunnel. */
  async #onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const upgrade = req.headers.upgrade;
    const state = this.#connections.get(req.socket as TLSSocket);
    this.#connections.begin(state);
    socket.once('close', () => this.#connections.end(state));
    if (state.closing) {
      socket.destroy();
      return;
    }
    const admission = await this.#admit(
      req.socket as TLSSocket,
      req.method ?? 'GET',
      req.url ?? '/',
      req.headers,
    );
    if (!admission.ok) {
      if (admission.close) state.closing = true;
      writeRawStatus(socket, admission.status, admission.message);
      this.#auditRefusal({
        ...admission,
        outcome: { ...admission.outcome, ...(upgrade ? { upgrade } : {}) },
      });
      return;
    }
    const release = this.#hold(admission.entry, true, socket, writeRawStatus, upgrade);
    if (release === undefined) return;
    socket.once('close', release);
    // From here the connection carries one tunnel or one relayed refusal, then ends: never idle-closed.
    this.#connections.tunnel(state);
    try {
      const status = await this.#options.upstream.upgrade(
        req,
        socket,
        head,
        admission.identity,
        req.socket.remoteAddress,
        admission.entry.auditID,
      );
      this.#audit(admission.entry, status, allowed(admission.entry, upgrade));
    } catch (err) {
      const failure = this.#forwardingFailed(err, 'upgrade forwarding failed', admission.entry, upgrade);
      writeRawStatus(socket, failure.status, failure.message, failure.headers);
    }
  }
}

type Admission =
  | { ok: true; entry: AuditDraft; identity: KubeIdentity; longRunning: boolean }
  | {
      ok: false;
      entry: AuditDraft;
      status: number;
      message: string;
      outcome: AuditOutcome;
      close?: boolean;
    };

/**
 * Requests kube-apiserver itself treats as long-running (its LongRunningRequestCheck: the verbs watch and proxy,
 * the subresources attach, exec, log, portforward and proxy): no 70 s limit, and the long-running pool.
 */
function isLongRunning(info: RequestInfo): boolean {
  if (info.verb === 'watch' || info.verb === 'proxy') return true;
  return ['attach', 'exec', 'log', 'portforward', 'proxy'].includes(info.subresource);
}
