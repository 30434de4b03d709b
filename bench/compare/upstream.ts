// The upstream STAND-IN for bench/compare.ts: not kube-apiserver, a Node server answering every request with the
// same 1 KB JSON body, so that the contenders' figures hold their own work and not an API server's. Two
// listeners: TLS with ALPN h2 and http/1.1 (for the proxy, h2-min and nginx, which open TLS upstream) and plain
// TCP HTTP/1.1 (Ghostunnel's target: it forwards the client's bytes, which are HTTP/1.1 inside its TLS).
// Its CPU is not counted in any contender's. Run by the bench (fork, IPC): --dir DIR with upstream.crt/.key.
import { readFile } from 'node:fs/promises';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import http2, { type Http2ServerRequest, type Http2ServerResponse } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

/** 1024 bytes, the size of a small Kubernetes object (a ConfigMap with a few keys). */
export const BODY = ((): Buffer => {
  const head =
    '{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"bench","namespace":"default"},"data":{"pad":"';
  const tail = '"}}';
  return Buffer.from(head + 'x'.repeat(1024 - head.length - tail.length) + tail);
})();

export interface UpstreamCounts {
  /** Requests by how they came: 'h2', 'https/1.1' (TLS) or 'http/1.1' (plain TCP). */
  readonly byProtocol: Record<string, number>;
  /** Requests that carried a bearer token (the proxy, h2-min and nginx add one; direct requests do not). */
  readonly withToken: number;
  /** Requests that carried Impersonate-User (only the proxy asserts an identity). */
  readonly impersonated: number;
}

export type UpstreamMessage =
  | { readonly type: 'ready'; readonly tlsPort: number; readonly tcpPort: number }
  | { readonly type: 'counts'; readonly counts: UpstreamCounts };

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { dir: { type: 'string' } } });
  const dir = values.dir;
  const send = process.send?.bind(process);
  if (dir === undefined || send === undefined)
    throw new Error('run by bench/compare.ts: --dir DIR, with IPC');
  const byProtocol: Record<string, number> = {};
  let withToken = 0;
  let impersonated = 0;
  const answer = (
    protocol: string,
    req: IncomingMessage | Http2ServerRequest,
    res: ServerResponse | Http2ServerResponse,
  ): void => {
    byProtocol[protocol] = (byProtocol[protocol] ?? 0) + 1;
    if (typeof req.headers.authorization === 'string') withToken++;
    if (req.headers['impersonate-user'] !== undefined) impersonated++;
    req.resume();
    // The two response types' writeHead overloads do not unify; both take (status, headers).
    (res as ServerResponse).writeHead(200, {
      'content-type': 'application/json',
      'content-length': BODY.length,
    });
    res.end(BODY);
  };
  const [cert, key] = await Promise.all(
    ['upstream.crt', 'upstream.key'].map((f) => readFile(join(dir, f), 'utf8')),
  );
  const secure = http2.createSecureServer(
    { cert, key, allowHTTP1: true, minVersion: 'TLSv1.2' },
    (req, res) => answer(req.httpVersion === '2.0' ? 'h2' : 'https/1.1', req, res),
  );
  // Plenty of concurrent streams: the proxy may multiplex every client's requests on one session.
  secure.updateSettings({ maxConcurrentStreams: 1000 });
  const plain = http.createServer({ keepAliveTimeout: 600_000 }, (req, res) => answer('http/1.1', req, res));
  const listen = (server: http.Server | http2.Http2SecureServer): Promise<number> =>
    new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port));
    });
  const [tlsPort, tcpPort] = await Promise.all([listen(secure), listen(plain)]);
  process.on('disconnect', () => process.exit(0));
  process.on('message', (message: { type: string }) => {
    if (message.type === 'counts') {
      send({ type: 'counts', counts: { byProtocol, withToken, impersonated } } satisfies UpstreamMessage);
    }
  });
  send({ type: 'ready', tlsPort, tcpPort } satisfies UpstreamMessage);
}

if (import.meta.main) await main();
