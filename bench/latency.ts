// Latency the proxy adds to a request: a GET of a small object through the proxy against the same GET sent
// straight to kube-apiserver, both on a warm connection, in the same run.
//
// A real control plane (dev/controlplane.ts: etcd and kube-apiserver, built from their modules into the
// peer cache) and the proxy (startProxy, alone in a child process: this file, --proxy-child DIR). The client
// loops run in this process, one request at a time, each timed from request() to the response's 'end':
//   direct-h2: an HTTP/2 session to kube-apiserver that sends exactly the headers the proxy sends upstream
//     (built by the proxy's own upstreamHeaders: its token, Impersonate-User/-Group/-Extra-spiffe.io%2Fid,
//     X-Forwarded-For), so kube-apiserver does the same work (token, impersonation and RBAC checks) on both
//     paths and the only difference is the proxy hop;
//   proxy-h2: an HTTP/2 session to the proxy with the Argo CD client SVID, mapped by the policy to user
//     argocd (group gitops, extra spiffe.io/id), which the proxy forwards over its pooled HTTP/2 upstream;
//   direct-h1 / proxy-h1: the same over HTTP/1.1 keep-alive (one socket each, reuse checked on every request).
// Before measuring, a SelfSubjectReview on each path checks that kube-apiserver sees the same user on both,
// and the GET's body must be byte for byte the same on every request of every path.
// Warm-up and measured requests alternate between the paths in batches, in a rotating order, to cancel drift.
//
// Prints a table and writes bench/results/latency.json (with --skip-http1: bench/results/latency.partial.tmp).
// Run: node bench/latency.ts [--requests 2000] [--warmup 200] [--batch 10] [--skip-http1]
// Skips (exit 0, nothing written) when Go, to build the control plane, or kubectl is missing, unless
// KSP_REQUIRE_PEERS=1.
import { execFile, fork } from 'node:child_process';
import { openSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import type http from 'node:http';
import type { OutgoingHttpHeaders } from 'node:http';
import http2, { type ClientHttp2Session } from 'node:http2';
import https from 'node:https';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import { stringify } from 'yaml';
import { bundleJson, makeDevPki } from '../certs-dev/devpki.ts';
import { type ControlPlane, PROXY_USER, startControlPlane } from '../dev/controlplane.ts';
import { PEERS } from '../dev/peers/peers.ts';
import { e2eSkip } from '../dev/skip.ts';
import { createLogger } from '../src/observability/logger.ts';
import type { KubeIdentity } from '../src/policy/types.ts';
import { parseProxyConfig } from '../src/proxy/config.ts';
import { upstreamHeaders } from '../src/proxy/forward.ts';
import { machineInfo, positive, type Summary, summarize } from './stats.ts';

const run = promisify(execFile);

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const NAMESPACE = 'default';
const OBJECT = 'bench';
const OBJECT_PATH = `/api/v1/namespaces/${NAMESPACE}/configmaps/${OBJECT}`;
const REQUEST_TIMEOUT_MS = 10_000;
const RBAC_WAIT_MS = 30_000;
const HOUR = 3_600_000;

/** What the policy maps ARGOCD to, and so what the proxy asserts upstream (checked by a SelfSubjectReview). */
const MAPPED: KubeIdentity = { user: 'argocd', groups: ['gitops'], extra: { 'spiffe.io/id': [ARGOCD] } };

const POLICY = `rules:
  - name: argocd
    match:
      id: ${ARGOCD}
    identity:
      user: argocd
      groups: [gitops]
      extra:
        spiffe.io/id: ["{id}"]
`;

const RBAC = [
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRole',
    metadata: { name: 'ksp-proxy' },
    rules: [
      { apiGroups: [''], resources: ['users', 'groups'], verbs: ['impersonate'] },
      // RBAC does not match userextras/*: the extra the policy sets must be named.
      {
        apiGroups: ['authentication.k8s.io'],
        resources: ['userextras/spiffe.io/id'],
        verbs: ['impersonate'],
      },
    ],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRoleBinding',
    metadata: { name: 'ksp-proxy' },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'ksp-proxy' },
    subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: PROXY_USER }],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'Role',
    metadata: { name: 'bench-reader', namespace: NAMESPACE },
    rules: [{ apiGroups: [''], resources: ['configmaps'], verbs: ['get', 'list'] }],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'RoleBinding',
    metadata: { name: 'bench-reader', namespace: NAMESPACE },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'bench-reader' },
    subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: MAPPED.user }],
  },
];

const PATHS = ['direct-h2', 'proxy-h2', 'direct-h1', 'proxy-h1'] as const;
type PathKind = (typeof PATHS)[number];

const LABELS: Record<PathKind, string> = {
  'direct-h2': 'direct HTTP/2 (proxy token + impersonation)',
  'proxy-h2': 'proxied HTTP/2 (client SVID)',
  'direct-h1': 'direct HTTP/1.1 keep-alive (same headers)',
  'proxy-h1': 'proxied HTTP/1.1 keep-alive (client SVID)',
};
/** Each proxied path and the direct path it is compared with (same client protocol). */
const PAIRS = [
  { proxied: 'proxy-h2', direct: 'direct-h2' },
  { proxied: 'proxy-h1', direct: 'direct-h1' },
] as const satisfies readonly { proxied: PathKind; direct: PathKind }[];

const out = (line: string): void => {
  process.stdout.write(`${line}\n`);
};
const ms = (v: number, width = 8): string => v.toFixed(3).padStart(width);
const signed = (v: number): string => `${v >= 0 ? '+' : '-'}${Math.abs(v).toFixed(3)}`;

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1
    ? (sorted[mid] as number)
    : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

// ---------------------------------------------------------------------------------------------------------------
// the proxy (child process)

type ToProxy = { readonly type: 'cpu' } | { readonly type: 'counts' } | { readonly type: 'exit' };

interface ProxyCounts {
  /** ksp_requests_total by status code, and ksp_handshakes_total{result="ok"}: connections authenticated. */
  readonly requests: Record<string, number>;
  readonly handshakesOk: number;
}

type FromProxy =
  | { readonly type: 'ready'; readonly port: number }
  | { readonly type: 'cpu'; readonly userUs: number; readonly systemUs: number }
  | { readonly type: 'counts'; readonly counts: ProxyCounts }
  | { readonly type: 'exited' }
  | { readonly type: 'error'; readonly message: string };

async function runProxyChild(dir: string): Promise<void> {
  const send = process.send?.bind(process);
  if (send === undefined)
    throw new Error('--proxy-child is internal: the parent runs it with an IPC channel');
  const reply = (message: FromProxy): Promise<void> =>
    new Promise((resolvePromise) => send(message, () => resolvePromise()));
  // Loaded here only: the client process does not run the proxy.
  const { startProxy } = await import('../src/proxy/proxy.ts');
  const configFile = join(dir, 'proxy.yaml');
  const config = parseProxyConfig(await readFile(configFile, 'utf8'), configFile);
  // As `kube-svid-proxy serve` logs (info, synchronous writes), but to /dev/null: every audit line is still
  // serialized and written.
  const logger = createLogger({ level: 'info', destination: openSync('/dev/null', 'w') });
  const { fileAuditSink } = await import('../src/proxy/audit.ts');
  const proxy = await startProxy(config, {
    logger,
    audit: fileAuditSink('/dev/null'),
    watchPollMs: HOUR,
    probeIntervalMs: HOUR,
  });
  process.on('disconnect', () => process.exit(1));
  process.on('message', (message: ToProxy) => {
    const handle = async (): Promise<void> => {
      switch (message.type) {
        case 'cpu': {
          const cpu = process.cpuUsage();
          await reply({ type: 'cpu', userUs: cpu.user, systemUs: cpu.system });
          return;
        }
        case 'counts': {
          const values = async (name: string) =>
            (await proxy.metrics.registry.getSingleMetric(name)?.get())?.values ?? [];
          const requests: Record<string, number> = {};
          for (const v of await values('ksp_requests_total')) requests[String(v.labels.code)] = v.value;
          const handshakesOk =
            (await values('ksp_handshakes_total')).find((v) => v.labels.result === 'ok')?.value ?? 0;
          await reply({ type: 'counts', counts: { requests, handshakesOk } });
          return;
        }
        case 'exit': {
          await proxy.close();
          await reply({ type: 'exited' });
          process.exit(0);
        }
      }
    };
    handle().catch((err: Error) => {
      void reply({ type: 'error', message: err.stack ?? err.message }).then(() => process.exit(1));
    });
  });
  await reply({ type: 'ready', port: proxy.port });
}

interface ProxyHandle {
  readonly port: number;
  request(message: ToProxy): Promise<FromProxy>;
}

async function startProxyChild(dir: string): Promise<ProxyHandle> {
  const child = fork(fileURLToPath(import.meta.url), ['--proxy-child', dir], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const next = (): Promise<FromProxy> =>
    new Promise((resolvePromise, reject) => {
      const onMessage = (message: FromProxy): void => {
        child.off('exit', onExit);
        if (message.type === 'error') reject(new Error(`proxy: ${message.message}`));
        else resolvePromise(message);
      };
      const onExit = (code: number | null): void => {
        child.off('message', onMessage);
        reject(new Error(`the proxy exited with code ${code}`));
      };
      child.once('message', onMessage);
      child.once('exit', onExit);
    });
  const ready = await next();
  if (ready.type !== 'ready') throw new Error(`proxy: expected 'ready', got '${ready.type}'`);
  return {
    port: ready.port,
    request: (message) => {
      const answer = next();
      child.send(message);
      return answer;
    },
  };
}

async function proxyCpuUs(proxy: ProxyHandle): Promise<number> {
  const answer = await proxy.request({ type: 'cpu' });
  if (answer.type !== 'cpu') throw new Error(`proxy: expected cpu, got '${answer.type}'`);
  return answer.userUs + answer.systemUs;
}

// ---------------------------------------------------------------------------------------------------------------
// client side

interface Answer {
  readonly ms: number;
  readonly status: number;
  readonly body: Buffer;
  /** HTTP/1.1: the request went over an already used socket. */
  readonly reused?: boolean;
}

function h2Request(
  session: ClientHttp2Session,
  headers: OutgoingHttpHeaders,
  body?: string,
): Promise<Answer> {
  return new Promise((resolvePromise, reject) => {
    const start = performance.now();
    const stream = session.request(headers, { endStream: body === undefined });
    let status = 0;
    const chunks: Buffer[] = [];
    stream.on('response', (h) => {
      status = Number(h[':status']);
    });
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    stream.on('end', () => {
      const elapsed = performance.now() - start;
      resolvePromise({ ms: elapsed, status, body: Buffer.concat(chunks) });
    });
    stream.on('error', reject);
    stream.setTimeout(REQUEST_TIMEOUT_MS, () => {
      stream.close(http2.constants.NGHTTP2_CANCEL);
      reject(new Error(`no answer within ${REQUEST_TIMEOUT_MS} ms`));
    });
    if (body !== undefined) stream.end(body);
  });
}

function h1Request(agent: https.Agent, port: number, headers: OutgoingHttpHeaders): Promise<Answer> {
  return new Promise((resolvePromise, reject) => {
    const start = performance.now();
    const req = https.request(
      { host: '127.0.0.1', port, path: OBJECT_PATH, method: 'GET', agent, headers },
      (res: http.IncomingMessage) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => {
          const elapsed = performance.now() - start;
          if (res.httpVersion !== '1.1') reject(new Error(`HTTP/${res.httpVersion}, not 1.1`));
          else
            resolvePromise({
              ms: elapsed,
              status: res.statusCode ?? 0,
              body: Buffer.concat(chunks),
              reused: req.reusedSocket,
            });
        });
        res.on('error', reject);
      },
    );
    req.setTimeout(REQUEST_TIMEOUT_MS, () =>
      req.destroy(new Error(`no answer within ${REQUEST_TIMEOUT_MS} ms`)),
    );
    req.on('error', reject);
    req.end();
  });
}

function admin(cp: ControlPlane, ...args: string[]): Promise<{ stdout: string; stderr: string }> {
  return run('kubectl', [`--kubeconfig=${cp.kubeconfig('admin')}`, ...args]);
}

interface UserInfo {
  readonly username: string;
  readonly groups: readonly string[];
  readonly extra: Record<string, readonly string[]>;
}

async function whoami(session: ClientHttp2Session, headers: OutgoingHttpHeaders): Promise<UserInfo> {
  const answer = await h2Request(
    session,
    {
      ...headers,
      ':method': 'POST',
      ':path': '/apis/authentication.k8s.io/v1/selfsubjectreviews',
      'content-type': 'application/json',
    },
    JSON.stringify({ apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' }),
  );
  if (answer.status !== 201 && answer.status !== 200) {
    throw new Error(`SelfSubjectReview answered ${answer.status}: ${answer.body.toString()}`);
  }
  const info = (JSON.parse(answer.body.toString()) as { status: { userInfo: Partial<UserInfo> } }).status
    .userInfo;
  return {
    username: info.username ?? '',
    groups: [...(info.groups ?? [])].sort(),
    extra: info.extra ?? {},
  };
}

// ---------------------------------------------------------------------------------------------------------------
// reporting

interface PathResult {
  readonly path: PathKind;
  readonly description: string;
  readonly ms: Summary;
}

interface Added {
  readonly proxied: PathKind;
  readonly direct: PathKind;
  /** proxied − direct, of each statistic. */
  readonly p50Ms: number;
  readonly p90Ms: number;
  readonly p99Ms: number;
  readonly meanMs: number;
  /** proxied / direct. */
  readonly ratioP50: number;
  readonly ratioP99: number;
  /** Median over the rounds of (median of the proxied batch − median of the direct batch): drift-free. */
  readonly pairedBatchMedianMs: number;
}

function printTable(results: readonly PathResult[], added: readonly Added[]): void {
  const cols = ['p50', 'p90', 'p99', 'mean', 'min', 'max'];
  out(`${'ms, request() to end'.padEnd(46)}${cols.map((h) => h.padStart(8)).join('')}`);
  for (const r of results) {
    const s = r.ms;
    out(
      `${r.description.padEnd(46)}${[s.p50, s.p90, s.p99, s.mean, s.min, s.max].map((v) => ms(v)).join('')}`,
    );
  }
  out('');
  out(
    `${'added by the proxy (proxied - direct)'.padEnd(46)}${['p50', 'p90', 'p99', 'mean'].map((h) => h.padStart(8)).join('')}` +
      `${'x p50'.padStart(8)}${'x p99'.padStart(8)}${'paired'.padStart(9)}`,
  );
  for (const a of added) {
    out(
      `${`${a.proxied} - ${a.direct}`.padEnd(46)}` +
        [a.p50Ms, a.p90Ms, a.p99Ms, a.meanMs].map((v) => signed(v).padStart(8)).join('') +
        `${`${a.ratioP50.toFixed(2)}x`.padStart(8)}${`${a.ratioP99.toFixed(2)}x`.padStart(8)}` +
        `${signed(a.pairedBatchMedianMs).padStart(9)}`,
    );
  }
  out("(paired: median over the rounds of the difference of the two batches' medians, in ms)");
}

// ---------------------------------------------------------------------------------------------------------------
// main

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      requests: { type: 'string', default: '2000' },
      warmup: { type: 'string', default: '200' },
      batch: { type: 'string', default: '10' },
      'skip-http1': { type: 'boolean', default: false },
      'proxy-child': { type: 'string' },
    },
  });
  if (values['proxy-child'] !== undefined) {
    await runProxyChild(values['proxy-child']);
    return;
  }
  const requests = positive('requests', values.requests);
  const warmup = positive('warmup', values.warmup);
  const batch = positive('batch', values.batch);
  const paths: PathKind[] = values['skip-http1'] ? ['direct-h2', 'proxy-h2'] : [...PATHS];
  const pairs = PAIRS.filter((p) => paths.includes(p.proxied) && paths.includes(p.direct));

  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  const machine = machineInfo();
  const cpu = machine.cpu;
  out(`node ${machine.node}, ${cpu} x${machine.cores}, ${machine.os}`);
  const skip = (await e2eSkip()) || undefined;
  if (skip !== undefined) {
    out(`latency benchmark skipped: ${skip}`);
    return;
  }
  const started = performance.now();

  const pki = await makeDevPki();
  const dir = await mkdtemp(join(tmpdir(), 'ksp-latency-'));
  let controlPlane: ControlPlane | undefined;
  let proxy: ProxyHandle | undefined;
  const sessions: ClientHttp2Session[] = [];
  const agents: https.Agent[] = [];
  try {
    const cp = await startControlPlane();
    controlPlane = cp;
    const write = (name: string, text: string): Promise<void> => writeFile(join(dir, name), text);
    await Promise.all([
      write('proxy.crt', pki.good.proxyServer.chainPem),
      write('proxy.key', pki.good.proxyServer.keyPem),
      write('spoke.json', bundleJson(pki.spoke)),
      write('hub.json', bundleJson(pki.hub)),
      write('apiserver-ca.pem', cp.caPem),
      write('token', `${cp.proxyToken}\n`),
      write('policy.yaml', POLICY),
      write('rbac.yaml', RBAC.map((o) => stringify(o)).join('---\n')),
      write(
        'proxy.yaml',
        'trustDomain: spoke.example.org\n' +
          'listen: 127.0.0.1:0\n' +
          'admin: { listen: 127.0.0.1:0 }\n' +
          'policyFile: policy.yaml\n' +
          'identity:\n' +
          '  files: { certFile: proxy.crt, keyFile: proxy.key, bundles: ' +
          '{ spoke.example.org: spoke.json, hub.example.org: hub.json } }\n' +
          `upstream: { url: "${cp.url}", caFile: apiserver-ca.pem, tokenFile: token }\n`,
      ),
    ]);
    await admin(cp, 'apply', '-f', join(dir, 'rbac.yaml'));
    await admin(cp, 'create', 'configmap', OBJECT, '-n', NAMESPACE, '--from-literal=greeting=hello');
    proxy = await startProxyChild(dir);

    const direct = http2.connect(cp.url, { ca: cp.caPem });
    const proxied = http2.connect(`https://127.0.0.1:${proxy.port}`, {
      cert: pki.good.clientArgocd.chainPem,
      key: pki.good.clientArgocd.keyPem,
      ca: pki.spoke.rootPem,
      servername: 'localhost',
    });
    sessions.push(direct, proxied);
    for (const s of sessions) s.on('error', () => {});
    const directAgent = new https.Agent({ keepAlive: true, maxSockets: 1, ca: cp.caPem });
    const proxiedAgent = new https.Agent({
      keepAlive: true,
      maxSockets: 1,
      cert: pki.good.clientArgocd.chainPem,
      key: pki.good.clientArgocd.keyPem,
      ca: pki.spoke.rootPem,
      servername: 'localhost',
    });
    agents.push(directAgent, proxiedAgent);

    // Exactly what the proxy sends upstream for this client's GET (the client sends only `accept`).
    const clientHeaders = { accept: 'application/json' };
    const directHeaders = upstreamHeaders(
      clientHeaders,
      MAPPED,
      { authorization: `Bearer ${cp.proxyToken}` },
      '127.0.0.1',
    );
    const get = (session: ClientHttp2Session, headers: OutgoingHttpHeaders): Promise<Answer> =>
      h2Request(session, { ...headers, ':method': 'GET', ':path': OBJECT_PATH });
    const proxyPort = proxy.port;
    const once: Record<PathKind, () => Promise<Answer>> = {
      'direct-h2': () => get(direct, directHeaders),
      'proxy-h2': () => get(proxied, clientHeaders),
      'direct-h1': () => h1Request(directAgent, Number(new URL(cp.url).port), directHeaders),
      'proxy-h1': () => h1Request(proxiedAgent, proxyPort, clientHeaders),
    };

    // RBAC reaches the authorizer through an informer: wait until the mapped user may read the object.
    const deadline = Date.now() + RBAC_WAIT_MS;
    let reference: Buffer | undefined;
    for (;;) {
      const answer = await once['proxy-h2']();
      if (answer.status === 200) {
        reference = answer.body;
        break;
      }
      if (Date.now() > deadline) {
        throw new Error(
          `proxied GET still ${answer.status} after ${RBAC_WAIT_MS} ms: ${answer.body.toString()}`,
        );
      }
      await new Promise((r) => setTimeout(r, 200));
    }
    const [directUser, proxiedUser] = [
      await whoami(direct, directHeaders),
      await whoami(proxied, clientHeaders),
    ];
    if (JSON.stringify(directUser) !== JSON.stringify(proxiedUser)) {
      throw new Error(
        `kube-apiserver sees different users: direct ${JSON.stringify(directUser)}, proxied ${JSON.stringify(proxiedUser)}`,
      );
    }
    const version = await h2Request(direct, {
      authorization: `Bearer ${cp.adminToken}`,
      ':method': 'GET',
      ':path': '/version',
    });
    const apiserverVersion =
      (JSON.parse(version.body.toString()) as { gitVersion?: string }).gitVersion ?? '?';
    const versions = {
      kubeApiserver: apiserverVersion,
      etcd: PEERS.etcd.description,
      kubeSvidProxy: pkg.version,
    };
    out(
      `kube-apiserver ${versions.kubeApiserver} (/version), ${versions.etcd}, kube-svid-proxy ${versions.kubeSvidProxy}`,
    );
    out(
      `proxy in a child process (startProxy; info logger writing every audit line to /dev/null); client, ` +
        `etcd, kube-apiserver and the proxy share the ${machine.cores} cores`,
    );
    out(
      `GET ${OBJECT_PATH} (${reference.length} B of JSON), ${requests} per path after ${warmup} warm-up, ` +
        `one at a time, in batches of ${batch} alternating between the paths in a rotating order`,
    );
    out(
      `kube-apiserver sees the same user on every path: ${proxiedUser.username}, groups ` +
        `[${proxiedUser.groups.join(', ')}], extra ${JSON.stringify(proxiedUser.extra)}`,
    );

    const expected = reference;
    const failures: string[] = [];
    let reusedMisses = 0;
    const check = (kind: PathKind, i: number, answer: Answer): void => {
      if (answer.status !== 200 || !answer.body.equals(expected)) {
        throw new Error(`${kind} request ${i + 1}: ${answer.status} ${answer.body.toString().slice(0, 200)}`);
      }
      if (answer.reused === false) reusedMisses++;
    };
    const runBatch = async (kind: PathKind, n: number, into: number[] | undefined): Promise<void> => {
      for (let i = 0; i < n; i++) {
        const answer = await once[kind]();
        check(kind, i, answer);
        into?.push(answer.ms);
      }
    };
    // Warm-up: the first HTTP/1.1 request of each agent opens its socket (the only unreused one allowed).
    for (let done = 0; done < warmup; done += batch) {
      for (const kind of paths) await runBatch(kind, Math.min(batch, warmup - done), undefined);
    }
    const firstConnections = reusedMisses;
    reusedMisses = 0;

    const samples = new Map<PathKind, number[]>(paths.map((p) => [p, []]));
    const batchMedians = new Map<PathKind, number[]>(paths.map((p) => [p, []]));
    // Other work on the machine shows in the tails: the 1-minute load average before and after the loop.
    const loadBefore = loadavg()[0] ?? Number.NaN;
    const cpuBefore = await proxyCpuUs(proxy);
    const loopStart = performance.now();
    let round = 0;
    for (let done = 0; done < requests; done += batch, round++) {
      const order = paths.map((_, i) => paths[(i + round) % paths.length] as PathKind);
      for (const kind of order) {
        const times: number[] = [];
        await runBatch(kind, Math.min(batch, requests - done), times);
        samples.get(kind)?.push(...times);
        batchMedians.get(kind)?.push(median(times));
      }
    }
    const loopSeconds = (performance.now() - loopStart) / 1000;
    const cpuAfter = await proxyCpuUs(proxy);
    const loadAfter = loadavg()[0] ?? Number.NaN;
    if (reusedMisses > 0) failures.push(`${reusedMisses} measured HTTP/1.1 requests opened a new socket`);

    const countsAnswer = await proxy.request({ type: 'counts' });
    if (countsAnswer.type !== 'counts') throw new Error('proxy: expected counts');
    const counts = countsAnswer.counts;
    const proxiedPaths = paths.filter((p) => p.startsWith('proxy-')).length;
    const proxiedMeasured = proxiedPaths * requests;
    const proxyCpuUsPerRequest = (cpuAfter - cpuBefore) / proxiedMeasured;

    const results: PathResult[] = paths.map((path) => ({
      path,
      description: LABELS[path],
      ms: summarize(samples.get(path) ?? []),
    }));
    const result = (path: PathKind): PathResult => results.find((r) => r.path === path) as PathResult;
    const added: Added[] = pairs.map(({ proxied: p, direct: d }) => {
      const [ps, ds] = [result(p).ms, result(d).ms];
      const pm = batchMedians.get(p) ?? [];
      const dm = batchMedians.get(d) ?? [];
      return {
        proxied: p,
        direct: d,
        p50Ms: ps.p50 - ds.p50,
        p90Ms: ps.p90 - ds.p90,
        p99Ms: ps.p99 - ds.p99,
        meanMs: ps.mean - ds.mean,
        ratioP50: ps.p50 / ds.p50,
        ratioP99: ps.p99 / ds.p99,
        pairedBatchMedianMs: median(pm.map((v, i) => v - (dm[i] ?? Number.NaN))),
      };
    });

    out('');
    printTable(results, added);
    out('');
    out(
      `proxy process CPU over the measured loop: ${proxyCpuUsPerRequest.toFixed(0)} µs per proxied request ` +
        `(user + system, ${proxiedMeasured} proxied requests in ${loopSeconds.toFixed(1)} s)`,
    );
    const answered = Object.entries(counts.requests)
      .map(([code, n]) => `${n} x ${code}`)
      .join(', ');
    out(
      `proxy counted ${answered} (setup included) over ${counts.handshakesOk} authenticated connections; ` +
        `HTTP/1.1 sockets opened: ${firstConnections} during warm-up, ${reusedMisses} while measuring`,
    );
    out(
      `1-minute load average: ${loadBefore.toFixed(2)} before the measured loop, ${loadAfter.toFixed(2)} after`,
    );
    const expectedConnections = proxiedPaths;
    if (counts.handshakesOk !== expectedConnections) {
      failures.push(`the proxy authenticated ${counts.handshakesOk} connections, not ${expectedConnections}`);
    }
    const totalSeconds = (performance.now() - started) / 1000;
    out('');
    out(`total ${totalSeconds.toFixed(1)} s`);
    if (failures.length > 0) throw new Error(failures.join('; '));

    const resultsDir = fileURLToPath(new URL('./results/', import.meta.url));
    await mkdir(resultsDir, { recursive: true });
    const partial = paths.length < PATHS.length;
    const file = join(resultsDir, partial ? 'latency.partial.tmp' : 'latency.json');
    const report = {
      benchmark: 'latency',
      date: new Date().toISOString(),
      machine,
      versions,
      params: { requests, warmup, batch, paths, object: OBJECT_PATH, objectBytes: expected.length },
      setup: {
        proxy: 'child process; startProxy, info logger writing every audit line to /dev/null',
        client: 'this process; one request at a time, timed from request() to the response end',
        identity: { spiffeId: ARGOCD, kubernetes: proxiedUser },
        direct:
          'proxy token + the Impersonate-* and X-Forwarded-For headers the proxy sends (upstreamHeaders)',
      },
      results,
      added,
      proxyCpuUsPerRequest,
      proxyCounts: counts,
      loadAverage1m: { before: loadBefore, after: loadAfter },
      measuredSeconds: loopSeconds,
      totalSeconds,
    };
    const rounded = (_key: string, v: unknown): unknown =>
      typeof v === 'number' && !Number.isInteger(v) ? Math.round(v * 1000) / 1000 : v;
    await writeFile(file, `${JSON.stringify(report, rounded, 2)}\n`);
    out(`wrote ${file}`);
  } finally {
    for (const s of sessions) s.close();
    for (const a of agents) a.destroy();
    if (proxy !== undefined) await proxy.request({ type: 'exit' }).catch(() => undefined);
    await controlPlane?.close();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
