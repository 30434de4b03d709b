/**
 * Federation test kit: a Web-PKI style CA and server certificates for loopback (127.0.0.1 / localhost), SVIDs from
 * a real LocalCa, a mutable clock, a logger whose lines the test reads, and a one-shot HTTPS client that reports
 * what the server presented.
 */
// Must stay first: @peculiar/x509 (via tsyringe) refuses to load without a Reflect metadata polyfill.
import 'reflect-metadata';
import { KeyObject, type X509Certificate } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import type { IncomingHttpHeaders } from 'node:http';
import { request } from 'node:https';
import type { TLSSocket } from 'node:tls';
import { DAY, makeCa, makeLeaf, type TestIssuer } from '../../dev/certs.ts';
import type { LocalCa } from '../../src/agent/ca.ts';
import { generateKeyPair, x509 } from '../../src/agent/keys.ts';
import type { EndpointIdentity } from '../../src/federation/endpoint.ts';
import { createLogger, type Logger } from '../../src/observability/logger.ts';
import { SpiffeId } from '../../src/spiffe/id.ts';

/** A mutable clock to inject as `now`; starts at the current second. */
export interface Clock {
  ms: number;
  readonly now: () => Date;
  advance(seconds: number): void;
}

export function clock(ms = Math.floor(Date.now() / 1000) * 1000): Clock {
  const c: Clock = {
    ms,
    now: () => new Date(c.ms),
    advance: (seconds) => {
      c.ms += seconds * 1000;
    },
  };
  return c;
}

/** A logger at debug level whose JSON lines land in `lines`. */
export function capturingLogger(): { logger: Logger; lines: Record<string, unknown>[]; text: () => string } {
  const raw: string[] = [];
  const logger = createLogger({ level: 'debug', stream: { write: (line: string) => void raw.push(line) } });
  return {
    logger,
    get lines() {
      return raw.map((l) => JSON.parse(l) as Record<string, unknown>);
    },
    text: () => raw.join(''),
  };
}

/** A private "Web PKI": a root, and server certificates it issues for loopback names. */
export interface WebPki {
  readonly root: TestIssuer;
  /** The root as PEM (a fetcher's `caFile` content). */
  readonly caPem: string;
}

export async function makeWebPki(name = 'test web root'): Promise<WebPki> {
  const now = Date.now();
  const root = await makeCa({
    subject: `CN=${name}`,
    notBefore: new Date(now - DAY),
    notAfter: new Date(now + 30 * DAY),
  });
  return { root, caPem: root.node.toString() };
}

/** A server certificate (PEM, then the key's PEM) for `127.0.0.1` and `localhost`, or the names given. */
export async function webServerCert(
  pki: WebPki,
  options: { dns?: readonly string[]; ips?: readonly string[]; cn?: string } = {},
): Promise<{ certPem: string; keyPem: string; cert: X509Certificate }> {
  const now = Date.now();
  const names: x509.JsonGeneralName[] = [
    ...(options.dns ?? ['localhost']).map((value): x509.JsonGeneralName => ({ type: 'dns', value })),
    ...(options.ips ?? ['127.0.0.1']).map((value): x509.JsonGeneralName => ({ type: 'ip', value })),
  ];
  const leaf = await makeLeaf({
    subject: `CN=${options.cn ?? 'bundle endpoint'}`,
    issuer: pki.root,
    notBefore: new Date(now - DAY),
    notAfter: new Date(now + 7 * DAY),
    extensions: [new x509.SubjectAlternativeNameExtension(names, false)],
  });
  return { certPem: leaf.node.toString(), keyPem: leaf.keyPem, cert: leaf.node };
}

/** Writes a server certificate and key as files (e.g. for an https_web endpoint). */
export async function writeWebFiles(
  files: { certFile: string; keyFile: string },
  pair: { certPem: string; keyPem: string },
): Promise<void> {
  await writeFile(files.certFile, pair.certPem);
  await writeFile(files.keyFile, pair.keyPem);
}

/** An X509-SVID from a real LocalCa, as an endpoint identity. */
export async function svidFrom(ca: LocalCa, path: string, ttlSeconds = 3600): Promise<EndpointIdentity> {
  const keys = await generateKeyPair('ec-p256');
  const signed = await ca.signX509Svid({
    id: SpiffeId.fromPath(ca.trustDomain, path),
    publicKey: keys.publicKey,
    ttlSeconds,
  });
  return { certificates: signed.certificates, privateKey: KeyObject.from(keys.privateKey) };
}

export interface Answer {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly body: string;
  /** The leaf certificate the server presented. */
  readonly peer: X509Certificate | undefined;
}

/** One HTTPS request on a fresh connection; the server is not verified unless `ca` is given. */
export function httpsCall(
  port: number,
  options: { path?: string; method?: string; ca?: string; host?: string } = {},
): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: options.host ?? '127.0.0.1',
        port,
        path: options.path ?? '/',
        method: options.method ?? 'GET',
        agent: false,
        ...(options.ca === undefined ? { rejectUnauthorized: false } : { ca: options.ca }),
      },
      (res) => {
        const peer = (res.socket as TLSSocket).getPeerX509Certificate();
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: Buffer.concat(chunks).toString('utf8'),
            peer,
          }),
        );
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end();
  });
}

/** Polls `check` until it holds (file watching is asynchronous); fails after `ms`. */
export async function eventually(check: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
