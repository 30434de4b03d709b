// Contender `h2-min`: the least an HTTP/2 mTLS reverse proxy in Node can be. It requires a client certificate
// from the hub root (OpenSSL verification, no SPIFFE authentication, no policy, no audit), and forwards each
// stream to the upstream over one pooled HTTP/2 session, with a bearer token. The floor under our proxy's
// per-request cost in the same runtime. Run by bench/compare.ts (fork, IPC): --dir DIR --upstream PORT.
import { readFile } from 'node:fs/promises';
import http2, { type ClientHttp2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { dir: { type: 'string' }, upstream: { type: 'string' } } });
const dir = values.dir as string;
const origin = `https://127.0.0.1:${values.upstream}`;
const [cert, key, ca, upstreamCa, token] = await Promise.all(
  ['server.crt', 'server.key', 'client-ca.pem', 'upstream-ca.pem', 'token'].map((f) =>
    readFile(join(dir, f), 'utf8'),
  ),
);
const authorization = `Bearer ${String(token).trim()}`;
let pooled: ClientHttp2Session | undefined;
const upstream = (): ClientHttp2Session => {
  if (pooled === undefined || pooled.closed || pooled.destroyed) {
    const session = http2.connect(origin, { ca: upstreamCa });
    session.on('error', () => {});
    session.on('close', () => {
      if (pooled === session) pooled = undefined;
    });
    pooled = session;
  }
  return pooled;
};
const server = http2.createSecureServer({
  cert,
  key,
  ca,
  requestCert: true,
  rejectUnauthorized: true,
  minVersion: 'TLSv1.3',
});
server.on('stream', (stream, headers) => {
  const out = upstream().request({
    ':method': headers[':method'],
    ':path': headers[':path'],
    accept: headers.accept ?? '*/*',
    authorization,
  });
  out.on('response', (answer) => {
    if (stream.destroyed) return;
    stream.respond({ ':status': answer[':status'], 'content-type': answer['content-type'] ?? 'text/plain' });
    out.pipe(stream);
  });
  out.on('error', () => {
    if (!stream.headersSent && !stream.destroyed) stream.respond({ ':status': 502 }, { endStream: true });
  });
  stream.on('error', () => out.close());
  stream.pipe(out);
});
server.on('sessionError', () => {});
server.on('tlsClientError', () => {});
server.listen(0, '127.0.0.1', () => {
  process.send?.({ type: 'ready', port: (server.address() as AddressInfo).port });
});
process.on('disconnect', () => process.exit(0));
