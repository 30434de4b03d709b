import type { IncomingMessage, ServerResponse } from 'node:http';
import http, { type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import https from 'node:https';
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

/** True when the client sent any Impersonate-* header (nested impersonation; refused unless the policy allows). */
export function hasImpersonationHeaders(headers: IncomingHttpHeaders): boolean {
  return Object.keys(headers).some((name) => name.toLowerCase().startsWith('impersonate-'));
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
}

export class UpstreamError extends Error {
  readonly status: 502 | 504;
  constructor(status: 502 | 504, message: string, options?: ErrorOptions) {
    super(message, options);
    this.status = status;
  }
}

/**
 * Forwards one request to kube-apiserver and streams the answer back without buffering. (Part 1 of the proxy:
 * HTTP/1.1 keep-alive upstream; the multiplexed HTTP/2 upstream and the upgrade path come with part 2.)
 */
export class Upstream {
  readonly url: URL;
  readonly #options: UpstreamOptions;
  readonly #agent: http.Agent;

  constructor(options: UpstreamOptions) {
    this.url = options.url;
    this.#options = options;
    const secure = options.url.protocol === 'https:';
    this.#agent = secure
      ? new https.Agent({
          keepAlive: true,
          ...(options.ca ? { ca: options.ca } : {}),
          ...(options.clientCert ? { cert: options.clientCert } : {}),
          ...(options.clientKey ? { key: options.clientKey } : {}),
        })
      : new http.Agent({ keepAlive: true });
  }

  forward(
    req: IncomingMessage | Http2ServerRequest,
    res: ServerResponse | Http2ServerResponse,
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
    const target = new URL(req.url ?? '/', this.url);
    const transport = this.url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const upstreamReq = transport.request(
        target,
        { method: req.method, headers, agent: this.#agent },
        (upstreamRes) => {
          res.statusCode = upstreamRes.statusCode ?? 502;
          for (const [name, value] of Object.entries(downstreamHeaders(upstreamRes.headers))) {
            if (value !== undefined) res.setHeader(name, value);
          }
          upstreamRes.pipe(res as NodeJS.WritableStream);
          upstreamRes.on('end', () => resolve(res.statusCode));
          upstreamRes.on('error', (err) =>
            reject(new UpstreamError(502, `upstream response failed: ${err.message}`)),
          );
        },
      );
      upstreamReq.on('error', (err) =>
        reject(
          new UpstreamError(502, `kube-apiserver at ${this.url.origin} is unreachable: ${err.message}`, {
            cause: err,
          }),
        ),
      );
      res.on('close', () => {
        if (!upstreamReq.destroyed) upstreamReq.destroy();
      });
      (req as NodeJS.ReadableStream).pipe(upstreamReq);
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
    this.#agent.destroy();
  }
}
