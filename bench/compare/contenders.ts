// The contenders of bench/compare.ts, each a server process (tree) of its own on loopback, all serving the same
// certificates (the proxy's spoke SVID, leaf + intermediate) and requiring a client certificate from the hub
// root, and the upstream stand-in they forward to.
// Must stay first: @peculiar/x509 (via tsyringe) refuses to load without a Reflect metadata polyfill.
import 'reflect-metadata';
import { type ChildProcess, fork, spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { join, resolve } from 'node:path';
import * as x509 from '@peculiar/x509';
import { bundleJson, type DevPki } from '../../certs-dev/devpki.ts';
import { DAY, importIssuer, MINUTE, makeCa, makeLeaf } from '../../dev/certs.ts';
import type { UpstreamCounts, UpstreamMessage } from './upstream.ts';

export const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
export const GET_PATH = '/api/v1/namespaces/default/configmaps/bench';
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 5_000;

export type Family = 'tls' | 'h2-min' | 'proxy' | 'nginx' | 'ghostunnel';

export interface ContenderSpec {
  /** Column name: the family, `-wN` for N workers, `@baseline` for the baseline checkout. */
  readonly id: string;
  readonly family: Family;
  /** Worker processes asked for (proxy: `workers`; nginx: `worker_processes`); undefined: single process. */
  readonly workers?: number;
  /** Source root of a proxy contender. */
  readonly root?: string;
  /** How the load generator speaks to it after the handshake; undefined: handshake rows only. */
  readonly requests: 'h2' | 'http/1.1' | undefined;
  /** ALPN the client offers in handshake rows. */
  readonly alpn: readonly string[] | undefined;
}

export const DESCRIPTIONS: Record<Family, string> = {
  tls: 'bare node:tls server: OpenSSL chain verification of the client certificate, nothing else (handshake and idle rows only)',
  'h2-min':
    'a minimal Node HTTP/2 mTLS reverse proxy (bench/compare/h2-min.ts): OpenSSL verification, no SPIFFE ' +
    'authentication, policy or audit; one pooled HTTP/2 session upstream',
  proxy:
    'kube-svid-proxy (`serve`): SPIFFE authentication against per-trust-domain bundles, policy, impersonation ' +
    'headers, audit Events (to /dev/null); pooled HTTP/2 upstream',
  nginx:
    'Debian nginx, TLS-terminating reverse proxy with ssl_verify_client on (CA file = hub root): no SPIFFE ' +
    'authorization (any certificate from that CA passes); HTTP/2 to clients, HTTP/1.1 keep-alive over TLS ' +
    'upstream; access log to /dev/null',
  ghostunnel:
    'Ghostunnel (`server`), L4: Go TLS with client-certificate verification against the hub root and ' +
    '--allow-uri-san (an exact URI SAN match, not SPIFFE bundle validation); forwards the bytes to a plain ' +
    'TCP target, so the client speaks HTTP/1.1 inside its TLS and nothing above TLS is parsed',
};

/** Files every contender reads, in one directory. */
export interface BenchFiles {
  readonly dir: string;
  readonly token: string;
  readonly upstreamCaPem: string;
}

/** The shared certificates and files; the upstream stand-in's certificate is issued by a CA of its own. */
export async function writeBenchFiles(dir: string, pki: DevPki): Promise<BenchFiles> {
  const now = Date.now();
  const ca = await makeCa({
    subject: 'CN=bench upstream stand-in CA',
    notBefore: new Date(now - MINUTE),
    notAfter: new Date(now + DAY),
  });
  const upstream = await makeLeaf({
    subject: 'CN=bench upstream stand-in',
    issuer: ca,
    notBefore: new Date(now - MINUTE),
    notAfter: new Date(now + DAY),
    extensions: [
      new x509.SubjectAlternativeNameExtension([
        { type: 'dns', value: 'localhost' },
        { type: 'ip', value: '127.0.0.1' },
      ]),
    ],
  });
  const token = 'bench-token-not-a-secret';
  const upstreamCaPem = ca.node.toString();
  const write = (name: string, text: string): Promise<void> => writeFile(join(dir, name), text);
  await Promise.all([
    write('server.crt', pki.good.proxyServer.chainPem),
    write('server.key', pki.good.proxyServer.keyPem),
    write('client-ca.pem', pki.hub.rootPem),
    write('hub.json', bundleJson(pki.hub)),
    write('spoke.json', bundleJson(pki.spoke)),
    write('upstream.crt', upstream.node.toString()),
    write('upstream.key', upstream.keyPem),
    write('upstream-ca.pem', upstreamCaPem),
    write('token', `${token}\n`),
    write(
      'policy.yaml',
      `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: argocd\n` +
        '      groups: [gitops]\n      extra:\n        spiffe.io/id: ["{id}"]\n',
    ),
  ]);
  return { dir, token, upstreamCaPem };
}

/** A fresh client SVID for the Argo CD controller's SPIFFE ID: same identity, a key and serial never seen. */
export async function neverSeenSvids(pki: DevPki, count: number): Promise<{ cert: string; key: string }[]> {
  const hub = await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem);
  const out: { cert: string; key: string }[] = [];
  for (let i = 0; i < count; i++) {
    const leaf = await makeLeaf({
      subject: `CN=bench never seen ${i}`,
      issuer: hub,
      notBefore: new Date(Date.now() - MINUTE),
      notAfter: new Date(Date.now() + DAY),
      uris: [ARGOCD],
    });
    out.push({ cert: leaf.node.toString(), key: leaf.keyPem });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// processes

export interface Running {
  readonly spec: ContenderSpec;
  /** Root of the process tree whose CPU and memory are the contender's. */
  readonly pid: number;
  readonly port: number;
  /** Worker processes configured (undefined: the server has no such setting, or this source does not know it). */
  readonly workers: number | undefined;
  /** What the run found out about this contender (e.g. a setting the source does not know). */
  readonly notes: string[];
  stop(): Promise<void>;
}

export interface Upstream {
  readonly pid: number;
  readonly tlsPort: number;
  readonly tcpPort: number;
  counts(): Promise<UpstreamCounts>;
  stop(): Promise<void>;
}

const here = import.meta.dirname;

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((done, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => done());
  });
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((done) => server.close(() => done()));
  return port;
}

function exited(child: ChildProcess): Promise<void> {
  return child.exitCode !== null || child.signalCode !== null
    ? Promise.resolve()
    : new Promise((done) => child.once('exit', () => done()));
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = exited(child);
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
  await gone;
  clearTimeout(timer);
}

function logTail(file: string): string {
  try {
    return readFileSync(file, 'utf8').split('\n').slice(-20).join('\n');
  } catch {
    return '(no log)';
  }
}

/** Resolves once `check` does, rejecting if the child exits first or START_TIMEOUT_MS pass. */
async function whenReady(
  name: string,
  child: ChildProcess,
  log: string,
  check: () => Promise<boolean>,
): Promise<void> {
  const deadline = performance.now() + START_TIMEOUT_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new StartError(
        `${name} exited (${child.exitCode ?? child.signalCode}) while starting:\n${logTail(log)}`,
        logTail(log),
      );
    }
    if (await check().catch(() => false)) return;
    if (performance.now() > deadline) {
      await stopChild(child);
      throw new Error(`${name} not ready after ${START_TIMEOUT_MS} ms:\n${logTail(log)}`);
    }
    await new Promise((done) => setTimeout(done, 100));
  }
}

class StartError extends Error {
  readonly log: string;
  constructor(message: string, log: string) {
    super(message);
    this.log = log;
  }
}

function tcpOpen(port: number): Promise<boolean> {
  return new Promise((done) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      done(true);
    });
    socket.once('error', () => done(false));
  });
}

function httpOk(port: number, path: string): Promise<boolean> {
  return new Promise((done) => {
    const req = http.get({ host: '127.0.0.1', port, path, timeout: 2000 }, (res) => {
      res.resume();
      done(res.statusCode === 200);
    });
    req.once('error', () => done(false));
    req.once('timeout', () => req.destroy());
  });
}

/** A Node child of this directory, which reports `{ type: 'ready', ... }` over IPC. */
async function forkReady<T extends { type: string }>(
  script: string,
  args: string[],
  log: string,
): Promise<{ child: ChildProcess; ready: T }> {
  const fd = openSync(log, 'a');
  const child = fork(join(here, script), args, { stdio: ['ignore', fd, fd, 'ipc'] });
  closeSync(fd);
  const ready = await new Promise<T>((done, reject) => {
    child.once('message', (message: T) => done(message));
    child.once('exit', (code) => reject(new Error(`${script} exited (${code}):\n${logTail(log)}`)));
  });
  return { child, ready };
}

export async function startUpstream(files: BenchFiles): Promise<Upstream> {
  const log = join(files.dir, 'upstream.log');
  const { child, ready } = await forkReady<UpstreamMessage>('upstream.ts', ['--dir', files.dir], log);
  if (ready.type !== 'ready') throw new Error('upstream stand-in: no ready message');
  return {
    pid: child.pid as number,
    tlsPort: ready.tlsPort,
    tcpPort: ready.tcpPort,
    counts: () =>
      new Promise((done) => {
        child.once('message', (message: UpstreamMessage) => {
          if (message.type === 'counts') done(message.counts);
        });
        child.send({ type: 'counts' });
      }),
    stop: () => stopChild(child),
  };
}

export interface StartContext {
  readonly files: BenchFiles;
  readonly upstream: Upstream;
  readonly nginx: string;
  readonly ghostunnel: string | undefined;
}

export async function startContender(spec: ContenderSpec, ctx: StartContext): Promise<Running> {
  switch (spec.family) {
    case 'tls':
    case 'h2-min': {
      const log = join(ctx.files.dir, `${spec.id}.log`);
      const args = ['--dir', ctx.files.dir];
      if (spec.family === 'h2-min') args.push('--upstream', String(ctx.upstream.tlsPort));
      const { child, ready } = await forkReady<{ type: 'ready'; port: number }>(
        spec.family === 'tls' ? 'tls-server.ts' : 'h2-min.ts',
        args,
        log,
      );
      return {
        spec,
        pid: child.pid as number,
        port: ready.port,
        workers: undefined,
        notes: [],
        stop: () => stopChild(child),
      };
    }
    case 'proxy':
      return startProxy(spec, ctx);
    case 'nginx':
      return startNginx(spec, ctx);
    case 'ghostunnel':
      return startGhostunnel(spec, ctx);
  }
}

/**
 * Our proxy as an operator runs it, `kube-svid-proxy serve` from the given source root (a baseline checkout
 * included: the command line is stable where startProxy's options may not be). `workers` is set explicitly
 * when the source knows the key; a source that refuses it is run without it (and a multi-worker contender is
 * then not measured).
 */
async function startProxy(spec: ContenderSpec, ctx: StartContext): Promise<Running> {
  const root = spec.root ?? resolve(here, '../..');
  const main = join(root, 'src/cli/main.ts');
  if (!existsSync(main)) throw new Error(`${spec.id}: no ${main}`);
  const notes: string[] = [];
  const attempt = async (workers: number | undefined): Promise<Running> => {
    const [port, admin] = [await freePort(), await freePort()];
    const config = join(ctx.files.dir, `${spec.id}.yaml`);
    await writeFile(
      config,
      'trustDomain: spoke.example.org\n' +
        `listen: 127.0.0.1:${port}\n` +
        `admin: { listen: 127.0.0.1:${admin} }\n` +
        'policyFile: policy.yaml\n' +
        'audit: { file: /dev/null }\n' +
        'identity:\n' +
        '  files: { certFile: server.crt, keyFile: server.key, bundles: ' +
        '{ spoke.example.org: spoke.json, hub.example.org: hub.json } }\n' +
        `upstream: { url: "https://127.0.0.1:${ctx.upstream.tlsPort}", caFile: upstream-ca.pem, tokenFile: token }\n` +
        (workers === undefined ? '' : `workers: ${workers}\n`),
    );
    const log = join(ctx.files.dir, `${spec.id}.log`);
    const fd = openSync(log, 'w');
    const child = spawn(process.execPath, [main, 'serve', '--config', config], {
      cwd: root,
      stdio: ['ignore', fd, fd],
    });
    closeSync(fd);
    await whenReady(spec.id, child, log, () => httpOk(admin, '/readyz'));
    return { spec, pid: child.pid as number, port, workers, notes, stop: () => stopChild(child) };
  };
  try {
    return await attempt(spec.workers);
  } catch (err) {
    if (!(err instanceof StartError) || !err.log.includes('unknown key "workers"')) throw err;
    if ((spec.workers ?? 1) > 1) {
      throw new UnsupportedError(`${spec.id}: this source has no \`workers\` setting`);
    }
    notes.push('this source has no `workers` setting: run as it starts by default (one process)');
    return attempt(undefined);
  }
}

/** A contender this run cannot measure (reported as such, not an error). */
export class UnsupportedError extends Error {}

async function startNginx(spec: ContenderSpec, ctx: StartContext): Promise<Running> {
  const dir = join(ctx.files.dir, spec.id);
  for (const sub of ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'])
    mkdirSync(join(dir, 'tmp', sub), { recursive: true });
  const port = await freePort();
  const f = (name: string): string => join(ctx.files.dir, name);
  // Running as root, nginx would switch its workers to nobody; the bench runs them as whoever runs it.
  const user = process.getuid?.() === 0 ? 'user root root;\n' : '';
  const conf =
    `${user}worker_processes ${spec.workers ?? 1};\n` +
    `pid ${join(dir, 'nginx.pid')};\n` +
    `error_log ${join(dir, 'error.log')} warn;\n` +
    'events { worker_connections 8192; }\n' +
    'http {\n' +
    '  access_log /dev/null;\n' +
    `  client_body_temp_path ${join(dir, 'tmp/body')};\n` +
    `  proxy_temp_path ${join(dir, 'tmp/proxy')};\n` +
    `  fastcgi_temp_path ${join(dir, 'tmp/fastcgi')};\n` +
    `  uwsgi_temp_path ${join(dir, 'tmp/uwsgi')};\n` +
    `  scgi_temp_path ${join(dir, 'tmp/scgi')};\n` +
    '  keepalive_timeout 600s;\n' +
    '  keepalive_requests 10000000;\n' +
    `  upstream standin { server 127.0.0.1:${ctx.upstream.tlsPort}; keepalive 256; }\n` +
    '  server {\n' +
    `    listen 127.0.0.1:${port} ssl http2;\n` +
    `    ssl_certificate ${f('server.crt')};\n` +
    `    ssl_certificate_key ${f('server.key')};\n` +
    `    ssl_client_certificate ${f('client-ca.pem')};\n` +
    '    ssl_verify_client on;\n' +
    '    ssl_protocols TLSv1.3;\n' +
    '    location / {\n' +
    '      proxy_pass https://standin;\n' +
    '      proxy_http_version 1.1;\n' +
    '      proxy_set_header Connection "";\n' +
    `      proxy_set_header Authorization "Bearer ${ctx.files.token}";\n` +
    '      proxy_ssl_verify on;\n' +
    `      proxy_ssl_trusted_certificate ${f('upstream-ca.pem')};\n` +
    '      proxy_ssl_name localhost;\n' +
    '      proxy_ssl_session_reuse on;\n' +
    '    }\n' +
    '  }\n' +
    '}\n';
  await writeFile(join(dir, 'nginx.conf'), conf);
  const log = join(dir, 'error.log');
  const fd = openSync(join(dir, 'stderr.log'), 'w');
  const child = spawn(ctx.nginx, ['-p', `${dir}/`, '-e', log, '-c', 'nginx.conf', '-g', 'daemon off;'], {
    stdio: ['ignore', fd, fd],
  });
  closeSync(fd);
  await whenReady(spec.id, child, log, () => tcpOpen(port));
  return {
    spec,
    pid: child.pid as number,
    port,
    workers: spec.workers ?? 1,
    notes: [],
    stop: () => stopChild(child),
  };
}

async function startGhostunnel(spec: ContenderSpec, ctx: StartContext): Promise<Running> {
  if (ctx.ghostunnel === undefined) throw new UnsupportedError('Ghostunnel was not built');
  const port = await freePort();
  const f = (name: string): string => join(ctx.files.dir, name);
  const log = join(ctx.files.dir, `${spec.id}.log`);
  const fd = openSync(log, 'w');
  const child = spawn(
    ctx.ghostunnel,
    [
      'server',
      '--listen',
      `127.0.0.1:${port}`,
      '--target',
      `127.0.0.1:${ctx.upstream.tcpPort}`,
      '--cert',
      f('server.crt'),
      '--key',
      f('server.key'),
      '--cacert',
      f('client-ca.pem'),
      '--allow-uri-san',
      ARGOCD,
      // Its default waits 5 minutes for connections to finish on SIGTERM.
      '--shutdown-timeout',
      '1s',
    ],
    { stdio: ['ignore', fd, fd] },
  );
  closeSync(fd);
  await whenReady(spec.id, child, log, () => tcpOpen(port));
  return {
    spec,
    pid: child.pid as number,
    port,
    workers: undefined,
    notes: [],
    stop: () => stopChild(child),
  };
}

/** The nginx binary (Debian puts it in /usr/sbin, not always on a user's PATH), or undefined. */
export function findNginx(): string | undefined {
  for (const candidate of ['nginx', '/usr/sbin/nginx']) {
    if (spawnSync(candidate, ['-v']).status === 0) return candidate;
  }
  return undefined;
}

/** What a command prints (stdout, then stderr), or undefined when it cannot run. */
export function outputOf(command: string, args: string[]): string | undefined {
  const run = spawnSync(command, args, { encoding: 'utf8' });
  if (run.error !== undefined) return undefined;
  const text = `${run.stdout ?? ''}${run.stderr ?? ''}`.trim();
  return text === '' ? undefined : text;
}
