// Contender `tls`: a bare node:tls server requiring a client certificate (OpenSSL's chain verification against
// the hub root, nothing else). It holds a connection open until the client ends it and never reads a request:
// the handshake and idle-connection rows only. Run by bench/compare.ts (fork, IPC): --dir DIR.
import { readFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { dir: { type: 'string' } } });
const dir = values.dir as string;
const [cert, key, ca] = await Promise.all(
  ['server.crt', 'server.key', 'client-ca.pem'].map((f) => readFile(join(dir, f), 'utf8')),
);
const server = tls.createServer(
  { cert, key, ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' },
  (socket) => {
    socket.on('error', () => {});
    socket.on('end', () => socket.end());
    socket.resume();
  },
);
server.on('tlsClientError', () => {});
server.listen(0, '127.0.0.1', () => {
  process.send?.({ type: 'ready', port: (server.address() as AddressInfo).port });
});
process.on('disconnect', () => process.exit(0));
