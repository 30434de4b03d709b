/**
 * Our SPIFFE bundle endpoint (SPIFFE Federation §4, §5): foreign trust domains fetch our trust bundle here with
 * an HTTP GET over TLS. Two ways to authenticate the server (§5.2): `https_spiffe`, with the agent's own X509-SVID
 * (swapped by `setIdentity` when it rotates), or `https_web`, with a Web-PKI certificate and key read from PEM
 * files that are watched and reloaded when they change.
 *
 * The bundle is public: no client certificate is requested and no request header is looked at (§5.2.1.3 forbids
 * requiring client authentication). TLS is "modern": TLS 1.2 and 1.3 only, renegotiation refused, Node.js's
 * default cipher list (forward-secret AEAD suites first; it meets Mozilla's "intermediate" profile that §5 asks
 * for). Everything is bounded: handshake, header and request timeouts, idle keep-alive, the number of connections.
 */
import {
  createPrivateKey,
  constants as cryptoConstants,
  type KeyObject,
  type X509Certificate,
} from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { createSecureContext, type SecureContextOptions, type TLSSocket } from 'node:tls';
import { type WatchedFile, watchFile } from '../config/watch.ts';
import type { Logger } from '../observability/logger.ts';
import { SpiffeBundle } from '../spiffe/bundle.ts';
import { parseCertificates } from '../spiffe/x509svid.ts';
import { FederationError, FederationErrorCode } from './errors.ts';

/** The certificate chain (leaf first) and private key the endpoint presents. */
export interface EndpointIdentity {
  readonly certificates: readonly X509Certificate[];
  readonly privateKey: KeyObject;
}

export type EndpointTls =
  /** Our X509-SVID, leaf first: the agent calls `setIdentity` with each new one. */
  | { readonly profile: 'https_spiffe'; readonly identity: EndpointIdentity }
  /**
   * A Web-PKI certificate chain and its key, PEM files. Both are watched; a replacement is taken once the pair is
   * valid and matches, and a broken one is logged while the last good pair keeps serving.
   */
  | { readonly profile: 'https_web'; readonly certFile: string; readonly keyFile: string };

export interface EndpointLimits {
  /** Open connections at most; more are dropped at accept. */
  readonly maxConnections: number;
  /** A TLS handshake must finish within this. */
  readonly handshakeTimeoutMs: number;
  /** A request's headers must arrive within this. */
  readonly headersTimeoutMs: number;
  /** A whole request must arrive within this. */
  readonly requestTimeoutMs: number;
  /** An idle keep-alive connection is closed after this. */
  readonly keepAliveTimeoutMs: number;
}

/** A bundle endpoint is polled every few minutes by a handful of peers: small bounds are plenty. */
export const DEFAULT_ENDPOINT_LIMITS: EndpointLimits = Object.freeze({
  maxConnections: 256,
  handshakeTimeoutMs: 10_000,
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
  keepAliveTimeoutMs: 5_000,
});

/**
 * All IPv4 interfaces: a bundle endpoint exists to be reached from other trust domains, and what it serves is
 * public. Choose 127.0.0.1 (behind a load balancer) or `::` (dual stack) explicitly.
 */
export const DEFAULT_ENDPOINT_HOST = '0.0.0.0';
export const DEFAULT_ENDPOINT_PATH = '/';
/** SPIFFE Federation §4.1 recommends five minutes when a bundle sets no hint. */
export const DEFAULT_REFRESH_HINT_SECONDS = 300;

export interface BundleEndpointOptions {
  /** Default `DEFAULT_ENDPOINT_HOST` (0.0.0.0). */
  readonly host?: string;
  /** 0 picks a free port (see `address.port`). */
  readonly port: number;
  /** The one path served, default `/`; any other is 404. The query string is ignored. */
  readonly path?: string;
  readonly tls: EndpointTls;
  /** Our current bundle; called on every request, so return the value held (its sequence comes from the CA). */
  readonly bundle: () => SpiffeBundle;
  /** Written as `spiffe_refresh_hint` (whole seconds ≥ 1), replacing any hint the bundle has; default 300. */
  readonly refreshHintSeconds?: number;
  readonly logger: Logger;
  /** How often the `https_web` files are re-read regardless of file system events (default 5000 ms). */
  readonly pollIntervalMs?: number;
  readonly limits?: Partial<EndpointLimits>;
}

const DROP_LOG_INTERVAL_MS = 10_000;

const JSON_HEADERS = {
  'content-type': 'application/json',
  // The bundle changes (a new CA is published ahead of use, a retired one removed): no cache between us and a
  // fetcher may hold it back; fetchers already poll at the refresh hint.
  'cache-control': 'no-store',
  'x-content-type-options': 'nosniff',
} as const;

/** The PEM text of a certificate chain file, checked to hold at least one certificate. */
interface CertFile {
  readonly pem: string;
  readonly leaf: X509Certificate;
}

/** The PEM text of a key file, checked to hold a private key. Never logged. */
interface KeyFile {
  readonly pem: string;
  readonly key: KeyObject;
}

function parseCertFile(text: string): CertFile {
  const certificates = parseCertificates(text);
  const leaf = certificates[0];
  if (leaf === undefined) throw new Error('no certificate in the file');
  return { pem: certificates.map((c) => c.toString()).join(''), leaf };
}

function parseKeyFile(text: string): KeyFile {
  // Any unencrypted PEM key Node.js reads (PKCS#8, PKCS#1, SEC1): Web-PKI tooling writes all three.
  // OpenSSL's messages never quote key bytes.
  return { pem: text, key: createPrivateKey({ key: text, format: 'pem' }) };
}

function contextOptions(cert: string, key: string | Buffer): SecureContextOptions {
  return {
    cert,
    key,
    minVersion: 'TLSv1.2',
    // TLS 1.2 renegotiation is never needed here and has a history of attacks.
    secureOptions: cryptoConstants.SSL_OP_NO_RENEGOTIATION,
  };
}

function endpointError(message: string, cause?: unknown): FederationError {
  return new FederationError(FederationErrorCode.Endpoint, `bundle endpoint: ${message}`, { cause });
}

/** Checks an SVID and key pair and makes TLS options of it. */
function identityOptions(identity: EndpointIdentity): SecureContextOptions {
  const leaf = identity.certificates[0];
  if (leaf === undefined) throw endpointError('the identity has no certificate');
  if (identity.privateKey.type !== 'private') throw endpointError('the identity key is not a private key');
  if (!leaf.checkPrivateKey(identity.privateKey)) {
    throw endpointError('the identity key does not match its leaf certificate');
  }
  return contextOptions(
    identity.certificates.map((c) => c.toString()).join(''),
    identity.privateKey.export({ format: 'pem', type: 'pkcs8' }),
  );
}

/** A certificate and key file pair made into TLS options, or an error saying which is wrong. */
function webOptions(cert: CertFile, key: KeyFile, certFile: string, keyFile: string): SecureContextOptions {
  if (!cert.leaf.checkPrivateKey(key.key)) {
    throw endpointError(`the key in ${keyFile} does not match the certificate in ${certFile}`);
  }
  const options = contextOptions(cert.pem, key.pem);
  try {
    createSecureContext(options);
  } catch (cause) {
    throw endpointError(`${certFile} and ${keyFile} cannot be used: ${(cause as Error).message}`, cause);
  }
  return options;
}

function checkOptions(o: BundleEndpointOptions): { path: string; refreshHint: number } {
  const path = o.path ?? DEFAULT_ENDPOINT_PATH;
  if (!path.startsWith('/') || /[?#\s]/.test(path)) {
    throw endpointError(`path "${path}" must start with "/" and hold no query, fragment or space`);
  }
  const refreshHint = o.refreshHintSeconds ?? DEFAULT_REFRESH_HINT_SECONDS;
  if (!Number.isSafeInteger(refreshHint) || refreshHint < 1) {
    throw endpointError(`refreshHintSeconds must be whole seconds ≥ 1, got ${refreshHint}`);
  }
  return { path, refreshHint };
}

/** Serves our trust bundle as SPIFFE bundle JSON. Create with `start`. */
export class BundleEndpointServer {
  readonly address: { readonly host: string; readonly port: number };
  readonly #server: Server;
  readonly #profile: EndpointTls['profile'];
  readonly #path: string;
  readonly #refreshHint: number;
  readonly #bundle: () => SpiffeBundle;
  readonly #log: Logger;
  readonly #watched: { cert: WatchedFile<CertFile>; key: WatchedFile<KeyFile> } | undefined;
  readonly #files: { certFile: string; keyFile: string } | undefined;
  /** The web pair last installed, by identity of the parsed values. */
  #installed: { cert: CertFile; key: KeyFile } | undefined;
  /** The web pair last refused, so that it is reported once. */
  #refused: { cert: CertFile; key: KeyFile } | undefined;
  /** The last body served and the bundle it was made from: a bundle is immutable, so identity says "unchanged". */
  #cache: { bundle: SpiffeBundle; body: Buffer } | undefined;
  #closed = false;

  private constructor(
    server: Server,
    address: { host: string; port: number },
    o: BundleEndpointOptions,
    checked: { path: string; refreshHint: number },
    web: { cert: WatchedFile<CertFile>; key: WatchedFile<KeyFile> } | undefined,
  ) {
    this.#server = server;
    this.address = Object.freeze(address);
    this.#profile = o.tls.profile;
    this.#path = checked.path;
    this.#refreshHint = checked.refreshHint;
    this.#bundle = o.bundle;
    this.#log = o.logger;
    this.#watched = web;
    if (o.tls.profile === 'https_web') {
      this.#files = { certFile: o.tls.certFile, keyFile: o.tls.keyFile };
      if (web !== undefined) this.#installed = { cert: web.cert.current, key: web.key.current };
    }
  }

  /**
   * Loads the credentials, listens, then resolves. Rejects with `ERR_FEDERATION_ENDPOINT` (nothing left listening
   * or watching) when a file is unreadable or invalid, the key does not match, or the address cannot be bound.
   */
  static async start(o: BundleEndpointOptions): Promise<BundleEndpointServer> {
    const checked = checkOptions(o);
    const limits = { ...DEFAULT_ENDPOINT_LIMITS, ...o.limits };
    const log = o.logger;
    let web: { cert: WatchedFile<CertFile>; key: WatchedFile<KeyFile> } | undefined;
    let tls: SecureContextOptions;
    // Changes seen before the server exists are picked up by the install after it does.
    let self: BundleEndpointServer | undefined;
    if (o.tls.profile === 'https_web') {
      const { certFile, keyFile } = o.tls;
      const watchOptions = {
        pollIntervalMs: o.pollIntervalMs ?? 5000,
        onChange: () => {
          if (self !== undefined) self.#installWeb();
        },
        onRecover: () => log.info({ certFile, keyFile }, 'bundle endpoint: TLS files are valid again'),
      };
      let cert: WatchedFile<CertFile> | undefined;
      try {
        cert = await watchFile(certFile, {
          ...watchOptions,
          parse: parseCertFile,
          onError: (err) => {
            if (self !== undefined) self.#webFileFailed(certFile, err);
          },
        });
        const key = await watchFile(keyFile, {
          ...watchOptions,
          parse: parseKeyFile,
          onError: (err) => {
            if (self !== undefined) self.#webFileFailed(keyFile, err);
          },
        }).catch((cause: unknown) => {
          throw endpointError(`cannot load the key file ${keyFile}: ${(cause as Error).message}`, cause);
        });
        web = { cert, key };
        tls = webOptions(cert.current, key.current, certFile, keyFile);
      } catch (cause) {
        cert?.close();
        web?.key.close();
        if (cause instanceof FederationError) throw cause;
        throw endpointError(
          `cannot load the certificate file ${certFile}: ${(cause as Error).message}`,
          cause,
        );
      }
    } else {
      tls = identityOptions(o.tls.identity);
    }

    const server = createServer({
      ...tls,
      requestCert: false,
      handshakeTimeout: limits.handshakeTimeoutMs,
      headersTimeout: limits.headersTimeoutMs,
      requestTimeout: limits.requestTimeoutMs,
      keepAliveTimeout: limits.keepAliveTimeoutMs,
    });
    server.maxConnections = limits.maxConnections;
    const host = o.host ?? DEFAULT_ENDPOINT_HOST;
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ host, port: o.port }, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (cause) {
      web?.cert.close();
      web?.key.close();
      const code = (cause as NodeJS.ErrnoException).code;
      throw endpointError(
        `cannot listen on ${host}:${o.port}${code === 'EADDRINUSE' ? ' (the port is in use)' : ''}: ${(cause as Error).message}`,
        cause,
      );
    }
    const bound = server.address() as AddressInfo;
    self = new BundleEndpointServer(server, { host: bound.address, port: bound.port }, o, checked, web);
    const endpoint = self;
    server.on('request', (req: IncomingMessage, res: ServerResponse) => endpoint.#onRequest(req, res));
    server.on('tlsClientError', (err: Error & { code?: string }, socket: TLSSocket) => {
      // Scanners and probes make these all day; the peer that failed has the log that matters.
      log.debug(
        { peer: socket.remoteAddress, code: err.code, err: { message: err.message } },
        'bundle endpoint: TLS handshake failed',
      );
    });
    // At most one warning per DROP_LOG_INTERVAL_MS, with the count since the last: a flood must not flood the log.
    let dropped = 0;
    let lastDropLog = 0;
    server.on('drop', (data?: { remoteAddress?: string }) => {
      dropped++;
      if (Date.now() - lastDropLog < DROP_LOG_INTERVAL_MS) return;
      lastDropLog = Date.now();
      log.warn(
        { peer: data?.remoteAddress, dropped, max: limits.maxConnections },
        'bundle endpoint: connections dropped, too many open (limits.maxConnections)',
      );
      dropped = 0;
    });
    // A change that landed between loading the files and listening.
    self.#installWeb();
    log.info(
      { host: bound.address, port: bound.port, path: checked.path, profile: o.tls.profile },
      'federation bundle endpoint listening',
    );
    return self;
  }

  /**
   * `https_spiffe`: presents a new SVID (the agent's rotated one) from the next handshake on; connections open now
   * keep theirs. Throws `ERR_FEDERATION_ENDPOINT` when the key does not match the leaf, or on an `https_web` server.
   */
  setIdentity(identity: EndpointIdentity): void {
    if (this.#profile !== 'https_spiffe') {
      throw endpointError('setIdentity is for an https_spiffe endpoint; an https_web one reads its files');
    }
    this.#server.setSecureContext(identityOptions(identity));
    this.#log.info(
      { notAfter: identity.certificates[0]?.validToDate.toISOString() },
      'bundle endpoint: serving a new SVID',
    );
  }

  /** `https_web`: re-reads the certificate and key files now (SIGHUP, tests). Resolves once both were handled. */
  async reload(): Promise<void> {
    if (this.#watched === undefined) return;
    await Promise.all([this.#watched.cert.reload(), this.#watched.key.reload()]);
    this.#installWeb();
  }

  /** Stops listening and watching, and closes every connection. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#watched?.cert.close();
    this.#watched?.key.close();
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    this.#server.closeAllConnections();
    await closed;
  }

  #installWeb(): void {
    const watched = this.#watched;
    const files = this.#files;
    if (watched === undefined || files === undefined || this.#closed) return;
    const cert = watched.cert.current;
    const key = watched.key.current;
    if (this.#installed?.cert === cert && this.#installed.key === key) return;
    if (this.#refused?.cert === cert && this.#refused.key === key) return;
    try {
      this.#server.setSecureContext(webOptions(cert, key, files.certFile, files.keyFile));
    } catch (err) {
      this.#refused = { cert, key };
      // Usually the first of the two files of a renewal: the other follows, and the pair is complete again.
      this.#log.warn(
        { code: FederationErrorCode.Endpoint, err: { message: (err as Error).message } },
        'bundle endpoint: new TLS files not installed, still serving the previous certificate',
      );
      return;
    }
    this.#installed = { cert, key };
    this.#log.info(
      { certFile: files.certFile, notAfter: cert.leaf.validToDate.toISOString() },
      'bundle endpoint: serving a new certificate',
    );
  }

  #webFileFailed(file: string, err: Error): void {
    this.#log.warn(
      { code: FederationErrorCode.Endpoint, file, err: { message: err.message } },
      'bundle endpoint: TLS file unreadable or invalid, still serving the previous certificate',
    );
  }

  #body(): { bundle: SpiffeBundle; body: Buffer } {
    const current = this.#bundle();
    if (this.#cache?.bundle === current) return this.#cache;
    const served = new SpiffeBundle(current.trustDomain, {
      x509Authorities: current.x509Authorities,
      jwtAuthorities: [...current.jwtAuthorities].map(([kid, publicKey]) => ({ kid, publicKey })),
      ...(current.sequence === undefined ? {} : { sequence: current.sequence }),
      refreshHint: this.#refreshHint,
    });
    this.#cache = { bundle: current, body: Buffer.from(served.marshal(), 'utf8') };
    return this.#cache;
  }

  #onRequest(req: IncomingMessage, res: ServerResponse): void {
    // Nothing in a request matters beyond its method and path; drain whatever body it has.
    req.resume();
    const url = req.url ?? '';
    const query = url.indexOf('?');
    const path = query === -1 ? url : url.slice(0, query);
    const peer = req.socket.remoteAddress;
    const send = (status: number, text: string, headers: Record<string, string> = {}): void => {
      res.writeHead(status, {
        'content-type': 'text/plain; charset=utf-8',
        'cache-control': 'no-store',
        ...headers,
      });
      res.end(req.method === 'HEAD' ? undefined : `${text}\n`);
      this.#log.debug({ peer, method: req.method, path, status }, 'bundle endpoint request');
    };
    if (path !== this.#path) {
      send(404, 'not found');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      send(405, 'method not allowed: the bundle endpoint answers GET and HEAD', { allow: 'GET, HEAD' });
      return;
    }
    let served: { bundle: SpiffeBundle; body: Buffer };
    try {
      served = this.#body();
    } catch (err) {
      this.#log.warn(
        { code: FederationErrorCode.Endpoint, err: { message: (err as Error).message } },
        'bundle endpoint: our bundle could not be served',
      );
      send(500, 'the bundle is not available');
      return;
    }
    res.writeHead(200, { ...JSON_HEADERS, 'content-length': served.body.length });
    res.end(req.method === 'HEAD' ? undefined : served.body);
    this.#log.debug(
      { peer, method: req.method, path, status: 200, sequence: served.bundle.sequence?.toString() },
      'bundle endpoint request',
    );
  }
}
