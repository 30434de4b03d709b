import { randomBytes } from 'node:crypto';
import { type IncomingHttpHeaders, type IncomingMessage, type ServerResponse, STATUS_CODES } from 'node:http';
import http2, { type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import type { AddressInfo, Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import type { ProxyMetrics } from '../observability/metrics.ts';
import { NESTED_SPIFFE_ID_EXTRA, parseImpersonationHeaders } from '../policy/nested.ts';
import { requestInfo } from '../policy/request.ts';
import {
  type CompiledPolicy,
  type Decision,
  type KubeIdentity,
  type NestedImpersonationRequest,
  PolicyDenyCode,
  type RequestInfo,
} from '../policy/types.ts';
import { BundleSet } from '../spiffe/bundle.ts';
import type { TrustDomain } from '../spiffe/id.ts';
import {
  Authenticator,
  authFailureCode,
  type PeerIdentity,
  stillValid,
  type TrustState,
} from './authenticate.ts';
import { type Upstream, UpstreamError } from './forward.ts';
import { mayImpersonate, type SarResult } from './sar.ts';
import type { IdentitySource } from './source.ts';
import { kubeStatus, sendStatus } from './status.ts';

/** The policy as the proxy sees it: the current compiled policy and its generation, swapped whole on reload. */
export interface PolicyHolder {
  readonly current: CompiledPolicy;
  readonly generation: number;
}

export interface ProxyServerOptions {
  readonly trustDomain: TrustDomain;
  readonly source: IdentitySource;
  readonly policy: PolicyHolder;
  readonly upstream: Upstream;
  /** Operational log. */
  readonly logger: Logger;
  /** One line per request (SPIFFE ID, rule, mapped identity, verb, path, status, duration). */
  readonly audit: Logger;
  readonly metrics?: ProxyMetrics;
}

interface ConnectionState {
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
const DECISION_CACHE_PER_CONNECTION = 64;
/** How long a SubjectAccessReview's answer is reused on one connection. */
const REVIEW_CACHE_MS = 10_000;

type Request = IncomingMessage | Http2ServerRequest;
type Response = ServerResponse | Http2ServerResponse;
type StatefulSocket = TLSSocket & { [kConnection]?: ConnectionState };

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
  readonly #authenticator = new Authenticator();
  readonly #handshakeStarts = new Map<string, number>();
  #trust: TrustState;
  #trustKey = '';
  #roots = new Set<string>();
  /** The inputs the trust state was last computed from; unchanged objects mean nothing to recompute. */
  #trustInputs: { bundles: BundleSet; policy: CompiledPolicy } | undefined;
  #closed = false;

  constructor(options: ProxyServerOptions) {
    this.#options = options;
    this.#log = options.logger;
    this.#trust = { bundles: new BundleSet(), generation: 0 };
    this.#refreshTrust();
    this.server = http2.createSecureServer({
      ...this.#secureContextOptions(),
      allowHTTP1: true,
      requestCert: true,
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
    });
    this.server.on('connection', (socket: Socket) => {
      // Small writes (headers, then body; watch events) must not wait for the peer's delayed ACK (Nagle): on
      // HTTP/1.1 that cost about 40 ms per request.
      socket.setNoDelay(true);
      this.#handshakeStarts.set(`${socket.remoteAddress}:${socket.remotePort}`, performance.now());
    });
    this.server.on('secureConnection', (socket: TLSSocket) => this.#onSecureConnection(socket));
    this.server.on('tlsClientError', (err: Error & { code?: string }, socket: TLSSocket) => {
      this.#handshakeStarts.delete(`${socket.remoteAddress}:${socket.remotePort}`);
      options.metrics?.handshake('error', 0);
      options.metrics?.authFailure(err.code ?? 'ERR_TLS_HANDSHAKE');
      this.#log.info(
        { peer: socket.remoteAddress, code: err.code ?? 'ERR_TLS_HANDSHAKE', err: { message: err.message } },
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
    options.source.on('update', () => this.#onIdentityUpdate());
  }

  /** The bundles clients are verified against: ours and those of the trust domains the policy names. */
  get trust(): TrustState {
    this.#refreshTrust();
    return this.#trust;
  }

  async listen(port: number, host = '0.0.0.0'): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    const address = this.server.address() as AddressInfo;
    this.#log.info({ address: address.address, port: address.port }, 'proxy listening');
    return address;
  }

  async close(): Promise<void> {
    this.#closed = true;
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      // Open HTTP/2 sessions would hold close() forever; end them.
      setImmediate(() => this.server.emit('close'));
    });
  }

  #secureContextOptions(): { cert: string; key: string; ca: string[] } {
    const svid = this.#options.source.svid();
    return {
      cert: svid.certificates.map((c) => c.toString()).join(''),
      key: svid.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
      // Only offered to clients as acceptable CA names; the decision is ours.
      ca: this.#trust.bundles.allX509Authorities().map((c) => c.toString()),
    };
  }

  /** Recomputes the trust state when the bundles or the policy's trust domains changed. */
  /** Returns whether the trust state changed (and the secure context with it). */
  #refreshTrust(): boolean {
    const policy = this.#options.policy.current;
    const all = this.#options.source.bundles();
    // Called on every request: both inputs are immutable values swapped whole, so identity says "unchanged".
    if (this.#trustInputs?.bundles === all && this.#trustInputs.policy === policy) return false;
    this.#trustInputs = { bundles: all, policy };
    const accepted = new Set([this.#options.trustDomain.name, ...policy.trustDomains]);
    const bundles = new BundleSet(all.bundles().filter((b) => accepted.has(b.trustDomain.name)));
    const roots = new Set(bundles.allX509Authorities().map((c) => c.fingerprint256));
    const key = `${[...roots].sort().join(',')}|${[...accepted].sort().join(',')}`;
    if (key === this.#trustKey) return false;
    const lost = [...this.#roots].some((fp) => !roots.has(fp));
    this.#trustKey = key;
    this.#roots = roots;
    this.#trust = { bundles, generation: this.#trust.generation + 1 };
    if (this.server !== undefined) {
      this.server.setSecureContext(this.#secureContextOptions());
      if (lost) {
        // A removed authority must not live on in resumable sessions: new ticket keys void every old ticket.
        this.server.setTicketKeys(randomBytes(48));
        this.#log.info('a trust bundle lost an authority: session ticket keys replaced');
      }
    }
    return true;
  }

  #onIdentityUpdate(): void {
    if (this.#closed) return;
    // A changed trust state installed the new context already; otherwise only the SVID changed.
    if (!this.#refreshTrust()) this.server.setSecureContext(this.#secureContextOptions());
    const svid = this.#options.source.svid();
    this.#log.info(
      {
        spiffeId: svid.id.toString(),
        notAfter: svid.certificates[0]?.validTo,
        trustGeneration: this.#trust.generation,
      },
      'serving SVID or bundles updated; new handshakes use them, open connections stay',
    );
  }

  #onSecureConnection(socket: StatefulSocket): void {
    const key = `${socket.remoteAddress}:${socket.remotePort}`;
    const started = this.#handshakeStarts.get(key);
    this.#handshakeStarts.delete(key);
    const seconds = started === undefined ? 0 : (performance.now() - started) / 1000;
    const metrics = this.#options.metrics;
    const state: ConnectionState = {
      identity: undefined,
      refused: undefined,
      reviews: new Map(),
      decisions: new Map(),
      decisionsGeneration: -1,
    };
    socket[kConnection] = state;
    metrics?.connectionOpened();
    socket.once('close', () => metrics?.connectionClosed());
    try {
      state.identity = this.#authenticator.authenticate(socket, this.trust);
      metrics?.handshake('ok', seconds);
      this.#log.debug(
        {
          spiffeId: state.identity.id.toString(),
          resumed: state.identity.resumed,
          peer: socket.remoteAddress,
        },
        'client authenticated',
      );
    } catch (err) {
      const code = authFailureCode(err);
      state.refused = { code, message: (err as Error).message, generation: this.trust.generation };
      metrics?.handshake('refused', seconds);
      metrics?.authFailure(code);
      this.#log.warn(
        {
          code,
          peer: socket.remoteAddress,
          resumed: socket.isSessionReused(),
          err: { message: (err as Error).message },
        },
        'client authentication refused',
      );
    }
  }

  /** The connection's identity for this request, or why it is refused (counted and logged once per cause). */
  #authenticated(
    socket: StatefulSocket,
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
      const code = authFailureCode(err);
      state.identity = undefined;
      state.refused = { code, message: (err as Error).message, generation: trust.generation };
      this.#options.metrics?.authFailure(code);
      this.#log.warn(
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
   * impersonation headers, policy. Returns what to forward, or the refusal to answer.
   */
  async #admit(
    socket: StatefulSocket,
    method: string,
    url: string,
    headers: IncomingHttpHeaders,
  ): Promise<Admission> {
    const entry: Record<string, unknown> = { peer: socket.remoteAddress };
    let info: RequestInfo;
    try {
      info = requestInfo(method, url);
    } catch (err) {
      const code = (err as { code?: string }).code ?? 'ERR_BAD_REQUEST';
      return {
        ok: false,
        entry,
        status: 400,
        message: `kube-svid-proxy: ${(err as Error).message}`,
        extra: { code },
      };
    }
    entry.verb = info.verb;
    entry.path = info.path;
    const state = socket[kConnection];
    if (state === undefined) {
      return {
        ok: false,
        entry,
        status: 500,
        message: 'kube-svid-proxy: connection state missing',
        extra: {},
      };
    }
    const identity = this.#authenticated(socket, state);
    if (!('id' in identity)) {
      return {
        ok: false,
        entry,
        status: 401,
        close: true,
        message: `kube-svid-proxy: SPIFFE authentication failed (${identity.code}): ${identity.message}`,
        extra: { decision: 'unauthenticated', code: identity.code },
      };
    }
    entry.spiffeId = identity.id.toString();
    const metrics = this.#options.metrics;
    const requested = parseImpersonationHeaders(headers);
    if (requested !== undefined) return this.#admitNested(state, identity, info, url, entry, requested);
    const decision = this.#decide(state, identity, info);
    if (!decision.allowed) {
      metrics?.decision(decision.rule ?? '', false, decision.code);
      return {
        ok: false,
        entry,
        status: 403,
        message: `kube-svid-proxy: ${identity.id} is not allowed to ${info.verb} ${info.path}: ${decision.reason} (${decision.code})`,
        extra: { decision: 'deny', rule: decision.rule, code: decision.code, reason: decision.reason },
      };
    }
    metrics?.decision(decision.rule, true, '');
    entry.rule = decision.rule;
    entry.user = decision.identity.user;
    entry.groups = decision.identity.groups;
    return { ok: true, entry, identity: decision.identity, longRunning: isLongRunning(info, url) };
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
    url: string,
    entry: Record<string, unknown>,
    requested: NestedImpersonationRequest | { readonly refused: string },
  ): Promise<Admission> {
    const metrics = this.#options.metrics;
    const refuse = (rule: string | undefined, code: string, reason: string): Admission => {
      metrics?.decision(rule ?? '', false, code);
      return {
        ok: false,
        entry,
        status: 403,
        message: `kube-svid-proxy: ${identity.id} is not allowed to ${info.verb} ${info.path}: ${reason} (${code})`,
        extra: { decision: 'deny', ...(rule ? { rule } : {}), code, reason },
      };
    };
    if ('refused' in requested)
      return refuse(undefined, PolicyDenyCode.NestedImpersonation, requested.refused);
    const decision = this.#options.policy.current.decideNested(identity.id, info, requested);
    if (!decision.allowed) return refuse(decision.rule, decision.code, decision.reason);
    entry.rule = decision.rule;
    entry.user = decision.identity.user;
    entry.groups = decision.identity.groups;
    entry.impersonating = decision.nested.user;
    const key = `${this.#options.policy.generation}|${decision.nested.user}|${decision.nested.groups.join(',')}`;
    const cached = state.reviews.get(key);
    let review = cached !== undefined && cached.until > Date.now() ? cached.result : undefined;
    if (review === undefined) {
      review = await mayImpersonate(this.#options.upstream, decision.identity, decision.nested);
      if (state.reviews.size >= DECISION_CACHE_PER_CONNECTION) state.reviews.clear();
      state.reviews.set(key, { result: review, until: Date.now() + REVIEW_CACHE_MS });
    }
    if (!review.allowed) return refuse(decision.rule, PolicyDenyCode.NestedImpersonation, review.reason);
    metrics?.decision(decision.rule, true, '');
    const forwarded: KubeIdentity = {
      user: decision.nested.user,
      groups: decision.nested.groups,
      extra: { [NESTED_SPIFFE_ID_EXTRA]: [identity.id.toString()] },
    };
    return { ok: true, entry, identity: forwarded, longRunning: isLongRunning(info, url) };
  }

  #audit(
    started: number,
    entry: Record<string, unknown>,
    status: number,
    extra: Record<string, unknown>,
  ): void {
    const seconds = (performance.now() - started) / 1000;
    this.#options.metrics?.request(status, seconds);
    this.#options.audit.info(
      { ...entry, ...extra, status, durationMs: Math.round(seconds * 10000) / 10 },
      'request',
    );
  }

  async #onRequest(req: Request, res: Response): Promise<void> {
    const started = performance.now();
    const socket = req.socket as StatefulSocket;
    const admission = await this.#admit(socket, req.method ?? 'GET', req.url ?? '/', req.headers);
    if (!admission.ok) {
      if (admission.close) closeAfter(req, res);
      sendStatus(res, admission.status, admission.message);
      this.#audit(started, admission.entry, admission.status, admission.extra);
      return;
    }
    try {
      const status = await this.#options.upstream.forward(
        req,
        res,
        admission.identity,
        socket.remoteAddress,
        {
          longRunning: admission.longRunning,
        },
      );
      this.#audit(started, admission.entry, status, { decision: 'allow' });
    } catch (err) {
      const status = err instanceof UpstreamError ? err.status : 502;
      this.#log.warn({ err: { message: (err as Error).message } }, 'forwarding failed');
      sendStatus(res, status, `kube-svid-proxy: ${(err as Error).message}`);
      this.#audit(started, admission.entry, status, { decision: 'allow', code: 'ERR_UPSTREAM' });
    }
  }

  /** HTTP/1.1 `Upgrade` requests (exec, attach, port-forward over SPDY or WebSocket): same checks, raw tunnel. */
  async #onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const started = performance.now();
    const admission = await this.#admit(
      req.socket as StatefulSocket,
      req.method ?? 'GET',
      req.url ?? '/',
      req.headers,
    );
    if (!admission.ok) {
      writeRawStatus(socket, admission.status, admission.message);
      this.#audit(started, admission.entry, admission.status, {
        ...admission.extra,
        upgrade: req.headers.upgrade,
      });
      return;
    }
    try {
      const status = await this.#options.upstream.upgrade(
        req,
        socket,
        head,
        admission.identity,
        req.socket.remoteAddress,
      );
      this.#audit(started, admission.entry, status, { decision: 'allow', upgrade: req.headers.upgrade });
    } catch (err) {
      const status = err instanceof UpstreamError ? err.status : 502;
      this.#log.warn({ err: { message: (err as Error).message } }, 'upgrade forwarding failed');
      writeRawStatus(socket, status, `kube-svid-proxy: ${(err as Error).message}`);
      this.#audit(started, admission.entry, status, { decision: 'allow', code: 'ERR_UPSTREAM' });
    }
  }
}

type Admission =
  | { ok: true; entry: Record<string, unknown>; identity: KubeIdentity; longRunning: boolean }
  | {
      ok: false;
      entry: Record<string, unknown>;
      status: number;
      message: string;
      extra: Record<string, unknown>;
      close?: boolean;
    };

/** Requests kube-apiserver itself treats as long-running: no response timeout on them. */
function isLongRunning(info: RequestInfo, url: string): boolean {
  if (info.verb === 'watch') return true;
  if (['exec', 'attach', 'portforward', 'proxy'].includes(info.subresource)) return true;
  return info.subresource === 'log' && /[?&]follow=(true|1)(&|$)/.test(url);
}

/** A Kubernetes Status as a whole HTTP/1.1 response on a raw socket (the upgrade path), then close. */
function writeRawStatus(socket: Duplex, status: number, message: string): void {
  const body = kubeStatus(status, message);
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

/** After a refused authentication, end the connection once the answer is out. */
function closeAfter(req: Request, res: Response): void {
  if ('stream' in req && req.stream !== undefined) {
    res.on('finish', () => req.stream.session?.close());
  } else {
    (res as ServerResponse).setHeader?.('connection', 'close');
  }
}
