// Server CPU per full mTLS handshake: the proxy's front door (startProxy: HTTP/2 listener, SPIFFE authentication
// of the client on 'secureConnection') against a bare node:tls server (OpenSSL verification only), measured in
// the same run. A third server, a bare http2 secure server with the proxy's TLS options and no handlers, splits
// the difference into HTTP/2 session setup and the proxy's own work.
//
// Each server runs alone in a child process (this file, --server tls|h2|proxy) and reports its
// process.cpuUsage() over IPC before and after each measured loop; the client loop runs in this process, one
// full handshake at a time (no session reuse: checked on every connection), closing right after 'secureConnect'
// and waiting for the connection to close before the next. Rounds interleave the servers, in a rotating order.
// Client: the hub SVID of the Argo CD controller (issued by the hub root); server: the proxy's spoke SVID
// (leaf + spoke intermediate); all keys ECDSA P-256.
//
// Prints a table and writes bench/results/handshake.json (a partial or profiled run:
// bench/results/handshake.partial.tmp).
// Run: node bench/handshake.ts [--handshakes 500] [--rounds 3] [--warmup 50] [--tls13-only] [--cpu-prof DIR]
//   --cpu-prof DIR: also profile each server child over the measured rounds (V8 sampling profiler, 100 µs),
//   write DIR/<server>.cpuprofile and print where each server's JavaScript time goes. Profiling slows the
//   servers down, so such a run's figures are not the reference ones.
import { type ChildProcess, fork } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import http2 from 'node:http2';
import type { Profiler } from 'node:inspector';
import { Session } from 'node:inspector/promises';
import net, { type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import tls, { type SecureContext, type TLSSocket } from 'node:tls';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { bundleJson, makeDevPki } from '../certs-dev/devpki.ts';
import { importIssuer, makeLeaf } from '../dev/certs.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { parseProxyConfig } from '../src/proxy/config.ts';
import { machineInfo, positive, type Summary, summarize } from './stats.ts';

const SERVERS = ['tls', 'h2', 'proxy'] as const;
type ServerKind = (typeof SERVERS)[number];
type Protocol = 'TLSv1.3' | 'TLSv1.2';

const LABELS: Record<ServerKind, string> = {
  tls: 'tls: bare node:tls, OpenSSL verification only',
  h2: "h2: bare http2 server, the proxy's TLS options",
  proxy: 'proxy: startProxy, SPIFFE authentication',
};
const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const IDLE_MS = 1000;
const HANDSHAKE_TIMEOUT_MS = 5000;
const PROFILE_INTERVAL_US = 100;

// ---------------------------------------------------------------------------------------------------------------
// IPC between the client (parent) and a server (child)

type ToServer =
  /** Reply with the process's CPU time once `closed` connections have closed (or after 10 s, whatever then). */
  | { readonly type: 'sample'; readonly closed: number }
  | { readonly type: 'counts' }
  | { readonly type: 'profile-start' }
  | { readonly type: 'exit' };

interface CpuSample {
  readonly userUs: number;
  readonly systemUs: number;
  readonly closed: number;
}

interface ServerCounts {
  /** 'secureConnection' events, connections closed, and clients accepted (tls/h2: OpenSSL's `authorized`;
   * proxy: ksp_handshakes_total{result="ok"}, i.e. SPIFFE authentication passed) and refused. */
  readonly handshakes: number;
  readonly closed: number;
  readonly authenticated: number;
  readonly refused: number;
  readonly tlsClientErrors: number;
}

type FromServer =
  | { readonly type: 'ready'; readonly port: number }
  | { readonly type: 'sample'; readonly sample: CpuSample }
  | { readonly type: 'counts'; readonly counts: ServerCounts }
  | { readonly type: 'exited' }
  | { readonly type: 'error'; readonly message: string };

interface Files {
  readonly dir: string;
  readonly certFile: string;
  readonly keyFile: string;
  readonly hubRootFile: string;
  readonly spokeRootFile: string;
  readonly configFile: string;
}

function filesIn(dir: string): Files {
  return {
    dir,
    certFile: join(dir, 'proxy.crt'),
    keyFile: join(dir, 'proxy.key'),
    hubRootFile: join(dir, 'hub-root.pem'),
    spokeRootFile: join(dir, 'spoke-root.pem'),
    configFile: join(dir, 'proxy.yaml'),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// server side (child process)

async function listen(server: net.Server): Promise<number> {
  await new Promise<void>((resolvePromise, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolvePromise();
    });
  });
  return (server.address() as AddressInfo).port;
}

async function runServer(kind: ServerKind, dir: string, profileDir: string | undefined): Promise<void> {
  const send = process.send?.bind(process);
  if (send === undefined) throw new Error('--server is internal: the parent runs it with an IPC channel');
  const reply = (message: FromServer): Promise<void> =>
    new Promise((resolvePromise) => send(message, () => resolvePromise()));
  const files = filesIn(dir);

  let handshakes = 0;
  let closed = 0;
  let authorized = 0;
  let tlsClientErrors = 0;
  let closeWaiter: { readonly closed: number; readonly resolve: () => void } | undefined;
  const onSecureConnection = (socket: TLSSocket): void => {
    handshakes++;
    if (socket.authorized) authorized++;
    socket.on('error', () => {});
    socket.once('close', () => {
      closed++;
      if (closeWaiter !== undefined && closed >= closeWaiter.closed) closeWaiter.resolve();
    });
  };
  const onTlsClientError = (): void => {
    tlsClientErrors++;
  };

  let port: number;
  let close: () => Promise<void>;
  let accepted: () => Promise<{ authenticated: number; refused: number }> = async () => ({
    authenticated: authorized,
    refused: handshakes - authorized,
  });
  if (kind === 'tls' || kind === 'h2') {
    const [cert, key, hubRoot, spokeRoot] = await Promise.all(
      [files.certFile, files.keyFile, files.hubRootFile, files.spokeRootFile].map((f) => readFile(f, 'utf8')),
    );
    const common = { cert, key, ca: [hubRoot as string, spokeRoot as string], requestCert: true };
    const server =
      kind === 'tls'
        ? tls.createServer({ ...common, rejectUnauthorized: true, minVersion: 'TLSv1.2' }, (socket) =>
            socket.end(),
          )
        : // As ProxyServer builds its listener; no 'request' or 'stream' handler.
          http2.createSecureServer({
            ...common,
            allowHTTP1: true,
            rejectUnauthorized: false,
            minVersion: 'TLSv1.2',
          });
    server.on('secureConnection', onSecureConnection);
    server.on('tlsClientError', onTlsClientError);
    port = await listen(server);
    close = () => new Promise((resolvePromise) => server.close(() => resolvePromise()));
  } else {
    // Loaded here only: the other servers and the client do not load the proxy at all.
    const { startProxy } = await import('../src/proxy/proxy.ts');
    const config = parseProxyConfig(await readFile(files.configFile, 'utf8'), files.configFile);
    const hour = 3_600_000;
    const { fileAuditSink } = await import('../src/proxy/audit.ts');
    const proxy = await startProxy(config, {
      logger: silentLogger(),
      audit: fileAuditSink('/dev/null'),
      defaultMetrics: false,
      watchPollMs: hour,
      probeIntervalMs: hour,
    });
    proxy.server.server.on('secureConnection', onSecureConnection);
    proxy.server.server.on('tlsClientError', onTlsClientError);
    port = proxy.port;
    close = () => proxy.close();
    accepted = async () => {
      const metric = await proxy.metrics.registry.getSingleMetric('ksp_handshakes_total')?.get();
      const value = (result: string): number =>
        metric?.values.find((v) => v.labels.result === result)?.value ?? Number.NaN;
      return { authenticated: value('ok'), refused: value('refused') };
    };
  }

  let session: Session | undefined;
  process.on('disconnect', () => process.exit(1));
  process.on('message', (message: ToServer) => {
    const handle = async (): Promise<void> => {
      switch (message.type) {
        case 'sample': {
          if (closed < message.closed) {
            await new Promise<void>((resolvePromise) => {
              const timer = setTimeout(resolvePromise, 10_000);
              closeWaiter = {
                closed: message.closed,
                resolve: () => {
                  clearTimeout(timer);
                  resolvePromise();
                },
              };
            });
            closeWaiter = undefined;
          }
          const cpu = process.cpuUsage();
          await reply({ type: 'sample', sample: { userUs: cpu.user, systemUs: cpu.system, closed } });
          return;
        }
        case 'counts': {
          const { authenticated, refused } = await accepted();
          await reply({
            type: 'counts',
            counts: { handshakes, closed, authenticated, refused, tlsClientErrors },
          });
          return;
        }
        case 'profile-start': {
          session = new Session();
          session.connect();
          await session.post('Profiler.enable');
          await session.post('Profiler.setSamplingInterval', { interval: PROFILE_INTERVAL_US });
          await session.post('Profiler.start');
          await reply({ type: 'sample', sample: { userUs: 0, systemUs: 0, closed } });
          return;
        }
        case 'exit': {
          if (session !== undefined && profileDir !== undefined) {
            const { profile } = await session.post('Profiler.stop');
            await writeFile(join(profileDir, `${kind}.cpuprofile`), JSON.stringify(profile));
            session.disconnect();
          }
          await close();
          await reply({ type: 'exited' });
          process.exit(0);
        }
      }
    };
    handle().catch((err: Error) => {
      void reply({ type: 'error', message: err.stack ?? err.message }).then(() => process.exit(1));
    });
  });
  await reply({ type: 'ready', port });
}

// ---------------------------------------------------------------------------------------------------------------
// client side (parent process)

interface ServerHandle {
  readonly kind: ServerKind;
  readonly port: number;
  request(message: ToServer): Promise<FromServer>;
  /** Connections the client completed (warm-up included): the server must have closed as many. */
  expected: number;
}

function nextMessage(child: ChildProcess, kind: ServerKind): Promise<FromServer> {
  return new Promise((resolvePromise, reject) => {
    const onMessage = (message: FromServer): void => {
      child.off('exit', onExit);
      if (message.type === 'error') reject(new Error(`${kind} server: ${message.message}`));
      else resolvePromise(message);
    };
    const onExit = (code: number | null): void => {
      child.off('message', onMessage);
      reject(new Error(`${kind} server exited with code ${code}`));
    };
    child.once('message', onMessage);
    child.once('exit', onExit);
  });
}

async function startServer(
  kind: ServerKind,
  dir: string,
  profileDir: string | undefined,
): Promise<ServerHandle> {
  const args = [
    '--server',
    kind,
    '--dir',
    dir,
    ...(profileDir === undefined ? [] : ['--cpu-prof', profileDir]),
  ];
  const child = fork(fileURLToPath(import.meta.url), args, {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const ready = await nextMessage(child, kind);
  if (ready.type !== 'ready') throw new Error(`${kind} server: expected 'ready', got '${ready.type}'`);
  return {
    kind,
    port: ready.port,
    expected: 0,
    request: (message) => {
      const answer = nextMessage(child, kind);
      child.send(message);
      return answer;
    },
  };
}

async function sampleCpu(server: ServerHandle): Promise<CpuSample> {
  const answer = await server.request({ type: 'sample', closed: server.expected });
  if (answer.type !== 'sample')
    throw new Error(`${server.kind} server: expected a sample, got '${answer.type}'`);
  if (answer.sample.closed < server.expected) {
    throw new Error(`${server.kind} server closed ${answer.sample.closed} of ${server.expected} connections`);
  }
  return answer.sample;
}

/** One full handshake; resolves with connect → 'secureConnect' in ms once the connection has closed. */
function handshakeOnce(
  port: number,
  context: SecureContext,
  protocol: Protocol,
  alpn: readonly string[] | undefined,
): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    let elapsed: number | undefined;
    let failure: Error | undefined;
    const start = performance.now();
    const socket = tls.connect({
      host: '127.0.0.1',
      port,
      servername: 'localhost',
      // The protocol versions are the context's (connect's minVersion/maxVersion are ignored with one).
      secureContext: context,
      ...(alpn === undefined ? {} : { ALPNProtocols: [...alpn] }),
    });
    const timer = setTimeout(() => {
      failure ??= new Error(`handshake not done and closed after ${HANDSHAKE_TIMEOUT_MS} ms`);
      socket.destroy();
    }, HANDSHAKE_TIMEOUT_MS);
    socket.once('secureConnect', () => {
      elapsed = performance.now() - start;
      if (!socket.authorized) failure = new Error(`server not authorized: ${socket.authorizationError}`);
      else if (socket.isSessionReused()) failure = new Error('session reused: not a full handshake');
      else if (socket.getProtocol() !== protocol) failure = new Error(`negotiated ${socket.getProtocol()}`);
      else if (alpn !== undefined && socket.alpnProtocol !== alpn[0]) {
        failure = new Error(`ALPN ${String(socket.alpnProtocol)}, not ${alpn[0]}`);
      }
      socket.end();
      socket.resume(); // read (and drop) tickets, SETTINGS and the server's end, so that 'close' comes
    });
    socket.on('error', (err) => {
      // A reset after the handshake (a server ending first) is not a failed handshake.
      if (elapsed === undefined) failure ??= err;
    });
    socket.once('close', () => {
      clearTimeout(timer);
      if (failure !== undefined) reject(failure);
      else if (elapsed === undefined) reject(new Error('closed before secureConnect'));
      else resolvePromise(elapsed);
    });
  });
}

async function handshakes(
  server: ServerHandle,
  context: (i: number) => SecureContext,
  protocol: Protocol,
  n: number,
): Promise<number[]> {
  const alpn = server.kind === 'tls' ? undefined : ['h2'];
  const times: number[] = [];
  for (let i = 0; i < n; i++) {
    try {
      times.push(await handshakeOnce(server.port, context(i), protocol, alpn));
    } catch (err) {
      throw new Error(`${server.kind} ${protocol} handshake ${i + 1}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    server.expected++;
  }
  return times;
}

// ---------------------------------------------------------------------------------------------------------------
// statistics and reporting

interface RoundCpu {
  readonly userUs: number;
  readonly systemUs: number;
  readonly handshakes: number;
}

interface Cell {
  readonly protocol: Protocol;
  readonly server: ServerKind;
  readonly rounds: RoundCpu[];
  readonly wallMs: number[];
}

interface CellResult {
  readonly protocol: Protocol;
  readonly server: ServerKind;
  readonly description: string;
  readonly handshakes: number;
  /** Server CPU (user + system) per handshake over all rounds; and user, system, and each round's. */
  readonly cpuUsPerHandshake: number;
  readonly userUsPerHandshake: number;
  readonly systemUsPerHandshake: number;
  readonly roundsCpuUsPerHandshake: number[];
  /** Client side, connect → 'secureConnect'. */
  readonly wallMs: Summary;
  readonly cpuRatioToTls: number;
}

function cellResult(cell: Cell, tlsCpu: number): CellResult {
  const total = (f: (r: RoundCpu) => number): number => cell.rounds.reduce((a, r) => a + f(r), 0);
  const n = total((r) => r.handshakes);
  const cpu = (total((r) => r.userUs) + total((r) => r.systemUs)) / n;
  return {
    protocol: cell.protocol,
    server: cell.server,
    description: LABELS[cell.server],
    handshakes: n,
    cpuUsPerHandshake: cpu,
    userUsPerHandshake: total((r) => r.userUs) / n,
    systemUsPerHandshake: total((r) => r.systemUs) / n,
    roundsCpuUsPerHandshake: cell.rounds.map((r) => (r.userUs + r.systemUs) / r.handshakes),
    wallMs: summarize(cell.wallMs),
    cpuRatioToTls: cpu / tlsCpu,
  };
}

const out = (line: string): void => {
  process.stdout.write(`${line}\n`);
};
const num = (v: number, width: number, digits = 0): string => v.toFixed(digits).padStart(width);

function printTable(results: readonly CellResult[]): void {
  out(
    `${''.padEnd(57)}${'server CPU µs / handshake'.padEnd(42)}${'client ms'.padEnd(14)}${'CPU ratio'.padStart(9)}`,
  );
  out(
    `${'protocol'.padEnd(9)}${'server'.padEnd(48)}` +
      `${['total', 'user', 'sys'].map((h) => h.padStart(7)).join('')}${'rounds'.padStart(21)}` +
      `${['p50', 'p99'].map((h) => h.padStart(7)).join('')}${'/ tls'.padStart(9)}`,
  );
  for (const r of results) {
    const rounds = r.roundsCpuUsPerHandshake.map((v) => v.toFixed(0)).join(' ');
    out(
      `${r.protocol.padEnd(9)}${r.description.padEnd(48)}` +
        `${num(r.cpuUsPerHandshake, 7)}${num(r.userUsPerHandshake, 7)}${num(r.systemUsPerHandshake, 7)}` +
        `${rounds.padStart(21)}${num(r.wallMs.p50, 7, 2)}${num(r.wallMs.p99, 7, 2)}` +
        `${`${r.cpuRatioToTls.toFixed(2)}x`.padStart(9)}`,
    );
  }
}

interface FrameTime {
  readonly frame: string;
  readonly selfMs: number;
  readonly totalMs: number;
}

interface ProfileSummary {
  readonly server: ServerKind;
  /** Sampled time that was not idle, and the measured handshakes it covers. */
  readonly busyMs: number;
  readonly handshakes: number;
  readonly topSelf: FrameTime[];
  /** Inclusive time of the proxy's own functions (src/), largest first. */
  readonly topSrc: FrameTime[];
}

function frameKey(frame: Profiler.ProfileNode['callFrame']): string {
  const name = frame.functionName === '' ? '(anonymous)' : frame.functionName;
  if (frame.url === '') return name;
  const path = frame.url.startsWith('file://') ? fileURLToPath(frame.url) : frame.url;
  const src = path.lastIndexOf('/src/');
  const where = src >= 0 ? path.slice(src + 1) : basename(path);
  return `${name} ${where}:${frame.lineNumber + 1}`;
}

function summarizeProfile(server: ServerKind, profile: Profiler.Profile, measured: number): ProfileSummary {
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
  const selfUs = new Map<number, number>();
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  // timeDeltas[i + 1] is the time spent in the node of samples[i].
  for (let i = 0; i < samples.length; i++) {
    const id = samples[i] as number;
    selfUs.set(id, (selfUs.get(id) ?? 0) + (deltas[i + 1] ?? 0));
  }
  const self = new Map<string, number>();
  const total = new Map<string, number>();
  const inclusive = (id: number, onStack: Set<string>): number => {
    const node = nodes.get(id);
    if (node === undefined) return 0;
    const key = frameKey(node.callFrame);
    const own = selfUs.get(id) ?? 0;
    self.set(key, (self.get(key) ?? 0) + own);
    const recursive = onStack.has(key);
    onStack.add(key);
    let sum = own;
    for (const child of node.children ?? []) sum += inclusive(child, onStack);
    if (!recursive) {
      onStack.delete(key);
      total.set(key, (total.get(key) ?? 0) + sum);
    }
    return sum;
  };
  const root = profile.nodes[0];
  if (root !== undefined) inclusive(root.id, new Set());
  const idle = self.get('(idle)') ?? 0;
  const all = [...self.values()].reduce((a, b) => a + b, 0);
  const frames = [...self.keys()].map((frame) => ({
    frame,
    selfMs: (self.get(frame) ?? 0) / 1000,
    totalMs: (total.get(frame) ?? 0) / 1000,
  }));
  return {
    server,
    busyMs: (all - idle) / 1000,
    handshakes: measured,
    topSelf: frames
      .filter((f) => f.frame !== '(idle)')
      .sort((a, b) => b.selfMs - a.selfMs)
      .slice(0, 15),
    topSrc: frames
      .filter((f) => f.frame.includes(' src/'))
      .sort((a, b) => b.totalMs - a.totalMs)
      .slice(0, 12),
  };
}

function printProfile(p: ProfileSummary): void {
  const us = (ms: number): string => num((ms * 1000) / p.handshakes, 7, 1);
  out('');
  out(
    `${p.server}: ${p.busyMs.toFixed(0)} ms sampled busy over ${p.handshakes} measured handshakes ` +
      `(${((p.busyMs * 1000) / p.handshakes).toFixed(0)} µs each); µs per handshake:`,
  );
  out(`  ${'self'.padStart(7)}${'total'.padStart(8)}  frame (self time, largest first)`);
  for (const f of p.topSelf) out(`  ${us(f.selfMs)} ${us(f.totalMs)}  ${f.frame}`);
  if (p.topSrc.length > 0) {
    out(
      `  ${'self'.padStart(7)}${'total'.padStart(8)}  the proxy's own functions (inclusive time, largest first)`,
    );
    for (const f of p.topSrc) out(`  ${us(f.selfMs)} ${us(f.totalMs)}  ${f.frame}`);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// main

async function closedPort(): Promise<number> {
  const server = net.createServer();
  const port = await listen(server);
  await new Promise<void>((resolvePromise) => server.close(() => resolvePromise()));
  return port;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      handshakes: { type: 'string', default: '500' },
      rounds: { type: 'string', default: '3' },
      warmup: { type: 'string', default: '50' },
      'tls13-only': { type: 'boolean', default: false },
      'cpu-prof': { type: 'string' },
      // Every handshake presents an SVID the server has not seen (the proxy's verification cache never hits).
      'new-svids': { type: 'boolean', default: false },
      server: { type: 'string' },
      dir: { type: 'string' },
    },
  });
  const profileDir = values['cpu-prof'] === undefined ? undefined : resolve(values['cpu-prof']);
  if (values.server !== undefined) {
    const kind = SERVERS.find((s) => s === values.server);
    if (kind === undefined || values.dir === undefined) throw new Error('--server tls|h2|proxy --dir DIR');
    await runServer(kind, values.dir, profileDir);
    return;
  }
  const n = positive('handshakes', values.handshakes);
  const roundCount = positive('rounds', values.rounds);
  const warmup = positive('warmup', values.warmup);
  const protocols: Protocol[] = values['tls13-only'] ? ['TLSv1.3'] : ['TLSv1.3', 'TLSv1.2'];

  const machine = machineInfo();
  const cpu = machine.cpu;
  out(`node ${machine.node}, ${cpu} x${machine.cores}, ${machine.os}`);
  out(
    `${n} full handshakes x ${roundCount} rounds per server and protocol, after ${warmup} warm-up; ` +
      'each server alone in a child process, client in this one',
  );
  out(
    'client: hub SVID (hub root -> leaf); server: spoke SVID (leaf + intermediate); ECDSA P-256; no session reuse',
  );
  if (profileDir !== undefined)
    out(`profiling the servers into ${profileDir}: these figures are not reference ones`);
  const started = performance.now();

  const pki = await makeDevPki();
  const dir = await mkdtemp(join(tmpdir(), 'ksp-handshake-'));
  const files = filesIn(dir);
  const servers: ServerHandle[] = [];
  try {
    const upstreamPort = await closedPort();
    await Promise.all([
      writeFile(files.certFile, pki.good.proxyServer.chainPem),
      writeFile(files.keyFile, pki.good.proxyServer.keyPem),
      writeFile(files.hubRootFile, pki.hub.rootPem),
      writeFile(files.spokeRootFile, pki.spoke.rootPem),
      writeFile(join(dir, 'hub.json'), bundleJson(pki.hub)),
      writeFile(join(dir, 'spoke.json'), bundleJson(pki.spoke)),
      writeFile(
        join(dir, 'policy.yaml'),
        `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: argocd\n`,
      ),
      writeFile(
        files.configFile,
        'trustDomain: spoke.example.org\n' +
          'listen: 127.0.0.1:0\n' +
          'admin: { listen: 127.0.0.1:0 }\n' +
          'policyFile: policy.yaml\n' +
          'identity:\n' +
          '  files:\n' +
          '    certFile: proxy.crt\n' +
          '    keyFile: proxy.key\n' +
          '    bundles:\n' +
          '      spoke.example.org: spoke.json\n' +
          '      hub.example.org: hub.json\n' +
          // Nothing listens there: the handshake bench forwards nothing, and a failed probe is harmless.
          `upstream:\n  url: https://127.0.0.1:${upstreamPort}\n`,
      ),
    ]);
    if (profileDir !== undefined) await mkdir(profileDir, { recursive: true });
    for (const kind of SERVERS) servers.push(await startServer(kind, dir, profileDir));
    const contexts = new Map(
      protocols.map((protocol) => [
        protocol,
        tls.createSecureContext({
          cert: pki.good.clientArgocd.chainPem,
          key: pki.good.clientArgocd.keyPem,
          ca: pki.spoke.rootPem,
          minVersion: protocol,
          maxVersion: protocol,
        }),
      ]),
    );
    // --new-svids: a pool of distinct client SVIDs (same SPIFFE ID, new key and serial), one per handshake.
    const pool = new Map<Protocol, SecureContext[]>();
    if (values['new-svids']) {
      const hub = await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem);
      // Per protocol, enough for the warm-up and every round: no SVID is ever presented twice.
      let total = 0;
      for (const protocol of protocols) {
        const fresh: SecureContext[] = [];
        for (let i = 0; i < warmup + n * roundCount; i++) {
          const leaf = await makeLeaf({
            subject: `CN=bench ${protocol} ${i}`,
            issuer: hub,
            notBefore: new Date(Date.now() - 60_000),
            notAfter: new Date(Date.now() + 3_600_000),
            uris: [ARGOCD],
          });
          fresh.push(
            tls.createSecureContext({
              cert: leaf.node.toString(),
              key: leaf.keyPem,
              ca: pki.spoke.rootPem,
              minVersion: protocol,
              maxVersion: protocol,
            }),
          );
        }
        pool.set(protocol, fresh);
        total += fresh.length;
      }
      out(
        `--new-svids: every proxy handshake presents an SVID the server has not seen (${total} distinct SVIDs)`,
      );
    }
    const used = new Map<Protocol, number>();
    // Only the proxy caches verifications, so only its handshakes draw from the pool.
    const contextFor =
      (protocol: Protocol, kind: ServerKind) =>
      (_i: number): SecureContext => {
        const fresh = kind === 'proxy' ? pool.get(protocol) : undefined;
        if (fresh === undefined) return contexts.get(protocol) as SecureContext;
        const next = used.get(protocol) ?? 0;
        used.set(protocol, next + 1);
        return fresh[next % fresh.length] as SecureContext;
      };

    for (const protocol of protocols) {
      for (const server of servers)
        await handshakes(server, contextFor(protocol, server.kind), protocol, warmup);
    }
    // Background CPU of an idle server (timers, the proxy's admin listener): should be about nothing.
    const idleUsPerSecond: Record<string, number> = {};
    for (const server of servers) {
      const before = await sampleCpu(server);
      await new Promise((r) => setTimeout(r, IDLE_MS));
      const after = await sampleCpu(server);
      idleUsPerSecond[server.kind] =
        ((after.userUs + after.systemUs - before.userUs - before.systemUs) * 1000) / IDLE_MS;
    }
    if (profileDir !== undefined)
      for (const server of servers) await server.request({ type: 'profile-start' });

    const cells = new Map<string, Cell>();
    for (const protocol of protocols) {
      for (const server of SERVERS) {
        cells.set(`${protocol} ${server}`, { protocol, server, rounds: [], wallMs: [] });
      }
    }
    for (let round = 0; round < roundCount; round++) {
      for (const protocol of protocols) {
        // A rotating order, so that no server is always the first (or the last) of a round.
        const order = servers.map((_, i) => servers[(i + round) % servers.length] as ServerHandle);
        for (const server of order) {
          const cell = cells.get(`${protocol} ${server.kind}`) as Cell;
          const before = await sampleCpu(server);
          const times = await handshakes(server, contextFor(protocol, server.kind), protocol, n);
          const after = await sampleCpu(server);
          cell.rounds.push({
            userUs: after.userUs - before.userUs,
            systemUs: after.systemUs - before.systemUs,
            handshakes: n,
          });
          cell.wallMs.push(...times);
        }
      }
    }

    const counts: Record<string, ServerCounts> = {};
    for (const server of servers) {
      const answer = await server.request({ type: 'counts' });
      if (answer.type !== 'counts') throw new Error(`${server.kind} server: expected counts`);
      counts[server.kind] = answer.counts;
      const c = answer.counts;
      if (c.handshakes !== server.expected || c.authenticated !== server.expected || c.refused !== 0) {
        throw new Error(
          `${server.kind} server: ${c.handshakes} handshakes, ${c.authenticated} authenticated, ${c.refused} ` +
            `refused, ${c.tlsClientErrors} TLS errors, for ${server.expected} client connections`,
        );
      }
    }
    for (const server of servers.splice(0)) await server.request({ type: 'exit' });

    const results: CellResult[] = [];
    for (const protocol of protocols) {
      const tlsCpu = cellResult(cells.get(`${protocol} tls`) as Cell, 1).cpuUsPerHandshake;
      for (const server of SERVERS)
        results.push(cellResult(cells.get(`${protocol} ${server}`) as Cell, tlsCpu));
    }
    const find = (protocol: Protocol, server: ServerKind): CellResult =>
      results.find((r) => r.protocol === protocol && r.server === server) as CellResult;
    const ratios = protocols.map((protocol) => {
      const [t, h, p] = SERVERS.map((s) => find(protocol, s).cpuUsPerHandshake) as [number, number, number];
      return {
        protocol,
        proxyOverTls: p / t,
        h2OverTls: h / t,
        proxyOverH2: p / h,
        proxyExtraUs: p - t,
        http2SetupUs: h - t,
        proxyOwnUs: p - h,
      };
    });

    out('');
    printTable(results);
    out('');
    for (const r of ratios) {
      out(
        `${r.protocol}: proxy / tls ${r.proxyOverTls.toFixed(2)}x (+${r.proxyExtraUs.toFixed(0)} µs: ` +
          `HTTP/2 session ${r.http2SetupUs.toFixed(0)} µs [h2 - tls], the proxy's own work ` +
          `${r.proxyOwnUs.toFixed(0)} µs [proxy - h2])`,
      );
    }
    out(
      `idle server CPU over ${IDLE_MS} ms (µs/s): ` +
        SERVERS.map((s) => `${s} ${(idleUsPerSecond[s] ?? Number.NaN).toFixed(0)}`).join(', '),
    );
    out(
      'every connection checked: full handshake (isSessionReused() false), expected protocol and ALPN; ' +
        'server side: ' +
        SERVERS.map((s) => `${s} ${counts[s]?.authenticated}/${counts[s]?.handshakes} authenticated`).join(
          ', ',
        ),
    );

    const profiles: ProfileSummary[] = [];
    if (profileDir !== undefined) {
      const measured = n * roundCount * protocols.length;
      for (const kind of SERVERS) {
        const file = join(profileDir, `${kind}.cpuprofile`);
        const profile = JSON.parse(await readFile(file, 'utf8')) as Profiler.Profile;
        const summary = summarizeProfile(kind, profile, measured);
        profiles.push(summary);
        printProfile(summary);
      }
    }

    const totalSeconds = (performance.now() - started) / 1000;
    out('');
    out(`total ${totalSeconds.toFixed(1)} s`);
    const resultsDir = fileURLToPath(new URL('./results/', import.meta.url));
    await mkdir(resultsDir, { recursive: true });
    const partial = profileDir !== undefined || protocols.length < 2;
    const name = values['new-svids'] ? 'handshake-new-svids' : 'handshake';
    const file = join(resultsDir, partial ? `${name}.partial.tmp` : `${name}.json`);
    const report = {
      benchmark: 'handshake',
      date: new Date().toISOString(),
      machine,
      params: { handshakes: n, rounds: roundCount, warmup, protocols, profiled: profileDir !== undefined },
      client: {
        identity: ARGOCD,
        chain: 'leaf <- hub root (not sent)',
        alpn: { tls: 'none', h2: 'h2', proxy: 'h2' },
      },
      server: { identity: 'spiffe://spoke.example.org/kube-svid-proxy', chain: 'leaf + spoke intermediate' },
      results,
      ratios,
      idleUsPerSecond,
      counts,
      ...(profiles.length === 0 ? {} : { profiles }),
      totalSeconds,
    };
    const rounded = (_key: string, v: unknown): unknown =>
      typeof v === 'number' && !Number.isInteger(v) ? Math.round(v * 1000) / 1000 : v;
    await writeFile(file, `${JSON.stringify(report, rounded, 2)}\n`);
    out(`wrote ${file}`);
  } finally {
    for (const server of servers) await server.request({ type: 'exit' }).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
