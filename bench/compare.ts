// Side by side, in one run and with the same certificates: our proxy against bare node:tls, a minimal Node
// HTTP/2 mTLS proxy, nginx from Debian and Ghostunnel, plus the crypto floor from `openssl speed` and the policy
// decisions of bench/policy.ts. See docs/development.md ("Benchmarks") for how to run it and read it.
//
// Contenders (bench/compare/contenders.ts), each its own process tree on loopback: the server certificate is
// the proxy's spoke SVID (P-256 leaf + intermediate), a client certificate from the hub root is required, TLS
// 1.3. The proxy and nginx run with one worker, and again with N (--workers, default the number of cores) as
// `proxy-wN` and `nginx-wN`; `--baseline DIR` adds `proxy@baseline`, the proxy of another checkout. Those that
// forward do so to one upstream STAND-IN (bench/compare/upstream.ts, a fixed 1 KB answer).
//
// Server CPU is what the kernel accounts to the contender's whole process tree (bench/compare/procfs.ts: every
// thread of the process and of its descendants), read once the tree is quiet before and after each measured
// loop. The load generator (bench/compare/load.ts) runs in this process; its CPU, and the stand-in's, are
// reported apart. Every round starts the contenders afresh and measures idle-connection memory first; rounds
// interleave the contenders in a rotating order; figures are medians over rounds, latency percentiles over
// every request of every round.
//
// Writes compare.json and compare.md into --out (default bench/results/) and prints the Markdown; into the
// default directory, it also refreshes the copy of the summary in docs/operator/performance.md.
// Run: npm run bench [-- --quick] [--rounds R] [--baseline DIR] [--only a,b] [--out DIR] [--workers N]
//      [--handshakes N] [--new-certs N] [--requests N] [--conns 1,10,100] [--idle K] [--warmup N]
//      [--idle-cpu-ms MS] [--floor-seconds S] [--skip-policy]
// Needs nginx (Debian's package) and Go (to build Ghostunnel into the peer cache): without them those
// contenders are skipped, saying why, unless KSP_REQUIRE_PEERS=1, which makes that a failure.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { SecureContext } from 'node:tls';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { makeDevPki } from '../certs-dev/devpki.ts';
import { peer, peersRequired } from '../dev/peers/peers.ts';
import {
  type ContenderSpec,
  DESCRIPTIONS,
  findNginx,
  neverSeenSvids,
  outputOf,
  type Running,
  startContender,
  startUpstream,
  UnsupportedError,
  type Upstream,
  writeBenchFiles,
} from './compare/contenders.ts';
import { type CryptoFloor, cryptoFloor } from './compare/floor.ts';
import {
  type Clients,
  clientContext,
  handshakeLoop,
  openClients,
  openIdle,
  type RequestKind,
  refusesWithoutClientCert,
  requestLoop,
} from './compare/load.ts';
import { cpuDeltaUs, sampleTree, settledSample } from './compare/procfs.ts';
import {
  type CompareReport,
  type ContenderReport,
  type Figure,
  type Row,
  renderMarkdown,
  renderSummary,
  spliceSummary,
} from './compare/report.ts';
import { machineInfo, percentile, positive } from './stats.ts';

const FULL = { rounds: 3, handshakes: 400, newCerts: 300, requests: 4000, idle: 500, warmup: 200 };
const QUICK = { rounds: 2, handshakes: 100, newCerts: 60, requests: 1000, idle: 200, warmup: 50 };
const CONCURRENT_CLIENTS = 16;
const DEFAULT_OUT = resolve(fileURLToPath(new URL('./results/', import.meta.url)));

const log = (line: string): void => {
  process.stderr.write(`${line}\n`);
};
const sleep = (ms: number): Promise<void> => new Promise((done) => setTimeout(done, ms));
const median = (values: readonly number[]): number =>
  percentile(
    [...values].sort((a, b) => a - b),
    50,
  );

// ---------------------------------------------------------------------------------------------------------------
// collected figures

interface Samples {
  rounds: number[];
  client: number[];
  upstream: number[];
  latencies: number[];
  shares: number[];
}

class Collector {
  readonly #cells = new Map<string, Map<string, Samples>>();

  cell(row: string, id: string): Samples {
    const byId = this.#cells.get(row) ?? new Map<string, Samples>();
    this.#cells.set(row, byId);
    const s = byId.get(id) ?? { rounds: [], client: [], upstream: [], latencies: [], shares: [] };
    byId.set(id, s);
    return s;
  }

  ids(row: string): string[] {
    return [...(this.#cells.get(row)?.keys() ?? [])];
  }

  figure(row: string, id: string, pooled?: number): Figure | undefined {
    const s = this.#cells.get(row)?.get(id);
    if (s === undefined || s.rounds.length === 0) return undefined;
    return {
      value:
        pooled === undefined
          ? median(s.rounds)
          : percentile(
              [...s.latencies].sort((a, b) => a - b),
              pooled,
            ),
      rounds: s.rounds,
      ...(s.client.length === 0 ? {} : { clientCpuUs: median(s.client) }),
      ...(s.upstream.length === 0 ? {} : { upstreamCpuUs: median(s.upstream) }),
      ...(s.shares.length === 0 ? {} : { resumedShare: Math.min(...s.shares) }),
    };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// setup

function contenderSpecs(workers: number, baseline: string | undefined): ContenderSpec[] {
  const h2 = { requests: 'h2', alpn: ['h2'] } as const;
  const specs: ContenderSpec[] = [
    { id: 'tls', family: 'tls', requests: undefined, alpn: undefined },
    { id: 'h2-min', family: 'h2-min', ...h2 },
    { id: 'proxy', family: 'proxy', workers: 1, ...h2 },
  ];
  if (workers > 1) specs.push({ id: `proxy-w${workers}`, family: 'proxy', workers, ...h2 });
  if (baseline !== undefined) {
    specs.push({ id: 'proxy@baseline', family: 'proxy', workers: 1, root: baseline, ...h2 });
  }
  specs.push({ id: 'nginx', family: 'nginx', workers: 1, ...h2 });
  if (workers > 1) specs.push({ id: `nginx-w${workers}`, family: 'nginx', workers, ...h2 });
  specs.push({ id: 'ghostunnel', family: 'ghostunnel', requests: 'http/1.1', alpn: undefined });
  return specs;
}

const PROTOCOL: Record<ContenderSpec['family'], [string, string]> = {
  tls: ['none (TLS only)', '—'],
  'h2-min': ['HTTP/2', 'HTTP/2 over TLS, one pooled session'],
  proxy: ['HTTP/2', 'HTTP/2 over TLS, pooled sessions'],
  nginx: ['HTTP/2', 'HTTP/1.1 over TLS, keep-alive pool'],
  ghostunnel: ['HTTP/1.1 keep-alive inside TLS (L4)', 'plain TCP, one connection per client connection'],
};

/**
 * The base of "added latency": straight to the stand-in over what the contender itself speaks upstream, so that
 * the stand-in does the same work on both paths.
 */
const DIRECT_BASE: Record<ContenderSpec['family'], 'direct-h2' | 'direct-https1' | 'direct-h1'> = {
  tls: 'direct-h2',
  'h2-min': 'direct-h2',
  proxy: 'direct-h2',
  nginx: 'direct-https1',
  ghostunnel: 'direct-h1',
};

function directPaths(up: Upstream): ['direct-h2' | 'direct-https1' | 'direct-h1', number][] {
  return [
    ['direct-h2', up.tlsPort],
    ['direct-https1', up.tlsPort],
    ['direct-h1', up.tcpPort],
  ];
}

function git(dir: string, args: string[]): string | null {
  try {
    return execFileSync('git', ['-C', dir, ...args], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    });
  } catch {
    return null;
  }
}

function versions(nginx: string | undefined, ghostunnel: string | undefined): Record<string, string | null> {
  const nginxV = nginx === undefined ? undefined : outputOf(nginx, ['-V']);
  return {
    node: `${process.version} (OpenSSL ${process.versions.openssl})`,
    nginx:
      nginxV === undefined
        ? null
        : `${/nginx\/(\S+)/.exec(nginxV)?.[1] ?? '?'} (${/built with (OpenSSL [^\n]*)/.exec(nginxV)?.[1] ?? '?'})`,
    ghostunnel:
      ghostunnel === undefined ? null : (outputOf(ghostunnel, ['--version'])?.split('\n')[0] ?? null),
    openssl: outputOf('openssl', ['version']) ?? null,
  };
}

/** Says so when a contender's "resumed" handshakes were not all resumed, and why where it is known. */
function resumptionNote(spec: ContenderSpec, col: Collector): string[] {
  const share = col.figure('handshake.resumed.cpuUs', spec.id)?.resumedShare;
  if (share === undefined || share >= 1) return [];
  const why =
    spec.family === 'ghostunnel'
      ? ': it sends session tickets but cannot take them back, as its listener hands every connection a fresh ' +
        'clone of its tls.Config (certloader/listener.go), each with ticket keys of its own; its "resumed" ' +
        'figure is a full handshake'
      : '';
  return [`${Math.round(share * 100)}% of the handshakes offering a session ticket resumed${why}`];
}

// ---------------------------------------------------------------------------------------------------------------
// main

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      rounds: { type: 'string' },
      handshakes: { type: 'string' },
      'new-certs': { type: 'string' },
      requests: { type: 'string' },
      conns: { type: 'string', default: '1,10,100' },
      idle: { type: 'string' },
      warmup: { type: 'string' },
      workers: { type: 'string', default: String(cpus().length) },
      baseline: { type: 'string' },
      only: { type: 'string' },
      out: { type: 'string' },
      'idle-cpu-ms': { type: 'string', default: '1000' },
      'floor-seconds': { type: 'string', default: '1' },
      'skip-policy': { type: 'boolean', default: false },
    },
  });
  const quick = values.quick;
  const base = quick ? QUICK : FULL;
  const count = (name: string, given: string | undefined, fallback: number): number =>
    given === undefined ? fallback : positive(name, given);
  const params = {
    quick,
    rounds: count('rounds', values.rounds, base.rounds),
    handshakes: count('handshakes', values.handshakes, base.handshakes),
    newCerts: count('new-certs', values['new-certs'], base.newCerts),
    requests: count('requests', values.requests, base.requests),
    conns: values.conns.split(',').map((c) => positive('conns', c)),
    idle: count('idle', values.idle, base.idle),
    warmup: count('warmup', values.warmup, base.warmup),
    workers: positive('workers', values.workers),
    concurrentClients: CONCURRENT_CLIENTS,
    idleCpuMs: positive('idle-cpu-ms', values['idle-cpu-ms']),
    floorSeconds: positive('floor-seconds', values['floor-seconds']),
    baseline: values.baseline === undefined ? null : resolve(values.baseline),
    only: values.only ?? null,
  };
  const outDir = resolve(values.out ?? DEFAULT_OUT);
  const started = performance.now();
  const machine = machineInfo();
  log(`bench/compare: ${machine.cpu} x${machine.cores}, ${machine.os}, node ${machine.node}`);

  const skipped: { id: string; reason: string }[] = [];
  let specs = contenderSpecs(params.workers, params.baseline ?? undefined);
  if (params.only !== null) {
    const wanted = params.only.split(',');
    specs = specs.filter((s) => wanted.includes(s.id) || wanted.includes(s.family));
    if (specs.length === 0) throw new RangeError(`--only ${params.only}: no such contender`);
  }
  const needs = (family: string): boolean => specs.some((s) => s.family === family);
  const nginx = needs('nginx') ? findNginx() : undefined;
  if (needs('nginx') && nginx === undefined) {
    const reason = 'nginx is not installed (Debian: apt-get install nginx)';
    if (peersRequired()) throw new Error(`${reason}; KSP_REQUIRE_PEERS=1 makes this a failure`);
    for (const s of specs.filter((x) => x.family === 'nginx')) skipped.push({ id: s.id, reason });
    specs = specs.filter((s) => s.family !== 'nginx');
  }
  let ghostunnel: string | undefined;
  if (needs('ghostunnel')) {
    const built = peer('ghostunnel'); // throws under KSP_REQUIRE_PEERS=1 when Go is absent
    if ('skip' in built) {
      skipped.push({ id: 'ghostunnel', reason: built.skip });
      specs = specs.filter((s) => s.family !== 'ghostunnel');
    } else ghostunnel = built.path;
  }

  log(`crypto floor: openssl speed (${params.floorSeconds} s a primitive) ...`);
  const floor: CryptoFloor | { error: string } = cryptoFloor(params.floorSeconds);

  const pki = await makeDevPki();
  const dir = await mkdtemp(join(tmpdir(), 'ksp-compare-'));
  let upstream: Upstream | undefined;
  const running: Running[] = [];
  try {
    const files = await writeBenchFiles(dir, pki);
    const identity = { cert: pki.good.clientArgocd.chainPem, key: pki.good.clientArgocd.keyPem };
    const ca = pki.spoke.rootPem;
    const known = clientContext(identity, ca);
    log(`${params.newCerts * params.rounds} never-seen client SVIDs ...`);
    const neverSeen: SecureContext[] = (await neverSeenSvids(pki, params.newCerts * params.rounds)).map(
      (pem) => clientContext(pem, ca),
    );

    upstream = await startUpstream(files);
    const up = upstream;
    const startedAs = new Map<string, { notes: string[]; workers: number | undefined }>();
    for (const spec of specs) {
      try {
        const c = await startContender(spec, { files, upstream: up, nginx: nginx ?? 'nginx', ghostunnel });
        running.push(c);
        startedAs.set(spec.id, { notes: c.notes, workers: c.workers });
        log(`started ${spec.id} (pid ${c.pid})`);
      } catch (err) {
        if (!(err instanceof UnsupportedError)) throw err;
        skipped.push({ id: spec.id, reason: err.message });
        log(`not measured: ${err.message}`);
      }
    }

    // Once, before measuring: a GET without a client certificate is refused by every forwarding contender.
    const refuses = new Map<string, boolean>();
    for (const c of running) {
      if (c.spec.requests !== undefined)
        refuses.set(c.spec.id, await refusesWithoutClientCert(c.spec.requests, c.port, ca));
    }

    const col = new Collector();
    const groups = new Map<string, Set<string>>();
    const noteGroups = (id: string, found: readonly string[]): void => {
      const set = groups.get(id) ?? new Set();
      for (const g of found) set.add(g);
      groups.set(id, set);
    };
    /** Runs `op` between two quiet samples of the contender's tree (and the stand-in's). */
    const measured = async <T>(
      c: Running,
      phase: string,
      op: () => Promise<T>,
    ): Promise<{ result: T; cpuUs: number; upstreamCpuUs: number }> => {
      const before = await settledSample(c.pid);
      const upBefore = sampleTree(up.pid);
      const result = await op().catch((err: Error) => {
        throw new Error(`${c.spec.id}, ${phase}: ${err.message}`, { cause: err });
      });
      const after = await settledSample(c.pid);
      const upAfter = sampleTree(up.pid);
      return { result, cpuUs: cpuDeltaUs(before, after), upstreamCpuUs: cpuDeltaUs(upBefore, upAfter) };
    };
    const requestKind = (c: Running): RequestKind => c.spec.requests as RequestKind;
    const open = (kind: RequestKind, port: number, conns: number): Promise<Clients> =>
      kind === 'direct-h2' || kind === 'direct-https1'
        ? openClients(kind, port, conns, { ca: files.upstreamCaPem })
        : kind === 'direct-h1'
          ? openClients(kind, port, conns, { ca: '' })
          : openClients(kind, port, conns, { identity, ca });

    const warmUp = async (c: Running): Promise<void> => {
      const hs = await handshakeLoop({
        port: c.port,
        alpn: c.spec.alpn,
        context: () => known,
        n: params.warmup,
        concurrency: 1,
      });
      noteGroups(c.spec.id, hs.groups);
      if (c.spec.requests !== undefined) {
        const clients = await open(requestKind(c), c.port, 10);
        await requestLoop(clients, params.warmup * 5);
        await clients.close();
      }
    };
    for (const [kind, port] of directPaths(up)) {
      const clients = await open(kind, port, 10);
      await requestLoop(clients, params.warmup * 5);
      await clients.close();
    }
    const idleCpu = new Map<string, number>();
    const processes = new Map<string, number>();

    /** Straight to the stand-in at 1 connection: per-round p50 and p99, every latency, stand-in CPU. */
    const direct = new Map<
      string,
      { p50: number[]; p99: number[]; latencies: number[]; upstream: number[] }
    >();
    for (let round = 0; round < params.rounds; round++) {
      // Every round starts from fresh server processes: memory a server kept from earlier loops (free lists,
      // heaps) would hide what an idle connection costs, and the rounds are then independent samples.
      if (round > 0) {
        for (const [i, c] of running.entries()) {
          await c.stop();
          // A source found not to know `workers` is started without it again, without the failed first try.
          const spec =
            c.spec.family === 'proxy' && c.workers === undefined ? { ...c.spec, workers: undefined } : c.spec;
          running[i] = await startContender(spec, {
            files,
            upstream: up,
            nginx: nginx ?? 'nginx',
            ghostunnel,
          });
        }
      }
      const order = running.map((_, i) => running[(i + round) % running.length] as Running);
      log(`round ${round + 1}/${params.rounds}: ${order.map((c) => c.spec.id).join(', ')}`);

      for (const c of order) {
        // Marginal memory, on a fresh process: the second K idle connections over the first K, so that what the
        // first connections cost once (buffers, code) is left out.
        const k = params.idle;
        const idle = () =>
          openIdle({
            port: c.port,
            h2: c.spec.requests === 'h2',
            alpn: c.spec.alpn,
            identity,
            ca,
            context: known,
            k,
          });
        const closeFirst = await idle();
        await sleep(200);
        const level1 = await settledSample(c.pid);
        const closeSecond = await idle().catch(async (err: Error) => {
          await closeFirst();
          throw new Error(`${c.spec.id}, idle connections: ${err.message}`, { cause: err });
        });
        await sleep(200);
        const level2 = await settledSample(c.pid);
        await closeSecond();
        await closeFirst();
        col.cell('idle.rssKiB', c.spec.id).rounds.push((level2.rssBytes - level1.rssBytes) / k / 1024);
      }

      for (const c of order) await warmUp(c);
      if (round === 0) {
        for (const c of order) {
          const before = await settledSample(c.pid);
          await sleep(params.idleCpuMs);
          const after = sampleTree(c.pid);
          idleCpu.set(c.spec.id, (cpuDeltaUs(before, after) * 1000) / params.idleCpuMs);
          processes.set(c.spec.id, after.processes);
        }
      }

      for (const c of order) {
        const n = params.handshakes;
        const { result, cpuUs } = await measured(c, 'full handshakes', () =>
          handshakeLoop({ port: c.port, alpn: c.spec.alpn, context: () => known, n, concurrency: 1 }),
        );
        if (result.reused > 0) throw new Error(`${c.spec.id}: ${result.reused} "full" handshakes resumed`);
        const full = col.cell('handshake.full.cpuUs', c.spec.id);
        full.rounds.push(cpuUs / n);
        full.client.push(result.clientCpuUs / n);
        col.cell('handshake.c1.perSecond', c.spec.id).rounds.push(n / (result.wallMs / 1000));
        noteGroups(c.spec.id, result.groups);
      }
      for (const c of order) {
        const n = params.newCerts;
        const pool = neverSeen.slice(round * n, (round + 1) * n);
        const { result, cpuUs } = await measured(c, 'never-seen handshakes', () =>
          handshakeLoop({
            port: c.port,
            alpn: c.spec.alpn,
            context: (i) => pool[i] as SecureContext,
            n,
            concurrency: 1,
          }),
        );
        const cell = col.cell('handshake.neverSeen.cpuUs', c.spec.id);
        cell.rounds.push(cpuUs / n);
        cell.client.push(result.clientCpuUs / n);
      }
      for (const c of order) {
        const n = params.handshakes;
        const tickets: (Buffer | undefined)[] = [undefined];
        const hs = (count: number) =>
          handshakeLoop({
            port: c.port,
            alpn: c.spec.alpn,
            context: () => known,
            n: count,
            concurrency: 1,
            tickets,
          });
        await hs(1); // the first ticket, outside the measured loop
        const { result, cpuUs } = await measured(c, 'resumed handshakes', () => hs(n));
        const cell = col.cell('handshake.resumed.cpuUs', c.spec.id);
        cell.rounds.push(cpuUs / n);
        cell.client.push(result.clientCpuUs / n);
        cell.shares.push(result.reused / n);
      }
      for (const c of order) {
        const n = Math.max(params.handshakes, 2 * CONCURRENT_CLIENTS);
        const { result, cpuUs } = await measured(c, 'concurrent handshakes', () =>
          handshakeLoop({
            port: c.port,
            alpn: c.spec.alpn,
            context: () => known,
            n,
            concurrency: CONCURRENT_CLIENTS,
          }),
        );
        col.cell('handshake.c16.perSecond', c.spec.id).rounds.push(n / (result.wallMs / 1000));
        const cell = col.cell('handshake.c16.cpuUs', c.spec.id);
        cell.rounds.push(cpuUs / n);
        cell.client.push(result.clientCpuUs / n);
      }

      for (const conns of params.conns) {
        const n = Math.max(params.requests, 2 * conns);
        if (conns === 1) {
          for (const [kind, port] of directPaths(up)) {
            const clients = await open(kind, port, 1);
            const before = await settledSample(up.pid);
            const result = await requestLoop(clients, n);
            const after = await settledSample(up.pid);
            await clients.close();
            const s = direct.get(kind) ?? { p50: [], p99: [], latencies: [], upstream: [] };
            direct.set(kind, s);
            const sorted = [...result.latenciesMs].sort((a, b) => a - b);
            s.latencies.push(...result.latenciesMs);
            s.p50.push(percentile(sorted, 50));
            s.p99.push(percentile(sorted, 99));
            s.upstream.push(cpuDeltaUs(before, after) / n);
          }
        }
        for (const c of order) {
          if (c.spec.requests === undefined) continue;
          const clients = await open(requestKind(c), c.port, conns);
          const { result, cpuUs, upstreamCpuUs } = await measured(c, `GETs on ${conns}`, () =>
            requestLoop(clients, n),
          );
          await clients.close();
          const id = c.spec.id;
          const cpu = col.cell(`requests.c${conns}.cpuUs`, id);
          cpu.rounds.push(cpuUs / n);
          cpu.client.push(result.clientCpuUs / n);
          cpu.upstream.push(upstreamCpuUs / n);
          col.cell(`requests.c${conns}.perSecond`, id).rounds.push(n / (result.wallMs / 1000));
          const sorted = [...result.latenciesMs].sort((a, b) => a - b);
          for (const [p, key] of [
            [50, 'p50Ms'],
            [99, 'p99Ms'],
          ] as const) {
            const cell = col.cell(`requests.c${conns}.${key}`, id);
            cell.rounds.push(percentile(sorted, p));
            cell.latencies.push(...result.latenciesMs);
          }
        }
      }
    }

    const upstreamCounts = await up.counts();
    for (const c of running.splice(0)) await c.stop();

    // Rows, in the order of the table.
    const rows: Row[] = [];
    const row = (
      key: string,
      label: string,
      unit: string,
      reference: string,
      better: Row['better'],
      pooled?: number,
    ): void => {
      const values: Record<string, Figure> = {};
      for (const id of col.ids(key)) {
        const f = col.figure(key, id, pooled);
        if (f !== undefined) values[id] = f;
      }
      if (Object.keys(values).length > 0) rows.push({ key, label, unit, reference, better, values });
    };
    row(
      'handshake.full.cpuUs',
      'Server CPU per full handshake, known client certificate',
      'µs',
      'tls',
      'lower',
    );
    row(
      'handshake.neverSeen.cpuUs',
      'Server CPU per full handshake, never-seen client certificate',
      'µs',
      'tls',
      'lower',
    );
    row('handshake.resumed.cpuUs', 'Server CPU per resumed handshake (TLS 1.3 ticket)', 'µs', 'tls', 'lower');
    row(
      'handshake.c16.cpuUs',
      `Server CPU per full handshake, ${CONCURRENT_CLIENTS} clients`,
      'µs',
      'tls',
      'lower',
    );
    row('handshake.c1.perSecond', 'Full handshakes per second, 1 client', '/s', 'tls', 'higher');
    row(
      'handshake.c16.perSecond',
      `Full handshakes per second, ${CONCURRENT_CLIENTS} clients`,
      '/s',
      'tls',
      'higher',
    );
    for (const conns of params.conns) {
      const on = `${conns} connection${conns === 1 ? '' : 's'}`;
      row(`requests.c${conns}.cpuUs`, `Server CPU per proxied 1 KB GET, ${on}`, 'µs', 'h2-min', 'lower');
      row(`requests.c${conns}.perSecond`, `GETs per second, ${on}`, '/s', 'h2-min', 'higher');
      row(`requests.c${conns}.p50Ms`, `GET latency p50, ${on}`, 'ms', 'h2-min', 'lower', 50);
      row(`requests.c${conns}.p99Ms`, `GET latency p99, ${on}`, 'ms', 'h2-min', 'lower', 99);
    }
    const directFigures: CompareReport['direct'] = {};
    for (const [kind, s] of direct) {
      const sorted = [...s.latencies].sort((a, b) => a - b);
      directFigures[kind] = {
        p50Ms: percentile(sorted, 50),
        p99Ms: percentile(sorted, 99),
        upstreamCpuUs: median(s.upstream),
      };
    }
    if (params.conns.includes(1)) {
      for (const [p, key] of [
        [50, 'p50Ms'],
        [99, 'p99Ms'],
      ] as const) {
        const from = rows.find((r) => r.key === `requests.c1.${key}`);
        if (from === undefined) continue;
        const values: Record<string, Figure> = {};
        for (const [id, f] of Object.entries(from.values)) {
          const spec = specs.find((s) => s.id === id);
          const kind = spec === undefined ? 'direct-h2' : DIRECT_BASE[spec.family];
          const base = direct.get(kind);
          const d = directFigures[kind];
          if (base === undefined || d === undefined) continue;
          const perRound = p === 50 ? base.p50 : base.p99;
          values[id] = {
            value: (f.value - (p === 50 ? d.p50Ms : d.p99Ms)) * 1000,
            rounds: f.rounds.map((v, i) => (v - (perRound[i] ?? Number.NaN)) * 1000),
          };
        }
        rows.push({
          key: `requests.c1.added${p === 50 ? 'P50' : 'P99'}Us`,
          label: `Added latency p${p} over a GET straight to the stand-in, 1 connection`,
          unit: 'µs',
          reference: 'h2-min',
          better: 'lower',
          values,
        });
      }
    }
    row('idle.rssKiB', 'RSS per idle mTLS connection (the second K over the first K)', 'KiB', 'tls', 'lower');

    let policy: unknown = null;
    let policyText: string | null = null;
    const policyModule = new URL('./policy.ts', import.meta.url);
    if (!values['skip-policy'] && existsSync(fileURLToPath(policyModule))) {
      log('policy decisions: bench/policy.ts ...');
      try {
        const mod = (await import(policyModule.href)) as {
          runPolicyBench?: (opts: { quick?: boolean }) => Promise<unknown>;
          formatPolicyBench?: (report: never) => string;
        };
        if (mod.runPolicyBench === undefined) policy = { error: 'bench/policy.ts has no runPolicyBench' };
        else {
          policy = await mod.runPolicyBench({ quick });
          policyText = mod.formatPolicyBench?.(policy as never) ?? null;
        }
      } catch (err) {
        policy = { error: (err as Error).message };
      }
    }

    const root = fileURLToPath(new URL('..', import.meta.url));
    const contenders: ContenderReport[] = specs
      .filter((s) => idleCpu.has(s.id))
      .map((s) => ({
        id: s.id,
        family: s.family,
        description: DESCRIPTIONS[s.family],
        workers: startedAs.get(s.id)?.workers ?? null,
        root: s.root ?? null,
        protocol: PROTOCOL[s.family][0],
        upstream: PROTOCOL[s.family][1],
        refusesWithoutClientCert: refuses.get(s.id) ?? null,
        notes: [...(startedAs.get(s.id)?.notes ?? []), ...resumptionNote(s, col)],
        idleCpuUsPerSecond: idleCpu.get(s.id) ?? Number.NaN,
        processes: processes.get(s.id) ?? 0,
        groups: [...(groups.get(s.id) ?? [])],
      }));
    const report: CompareReport = {
      benchmark: 'compare',
      date: new Date().toISOString(),
      machine,
      versions: versions(nginx, ghostunnel),
      commit: {
        head: git(root, ['rev-parse', 'HEAD'])?.trim() ?? null,
        dirty: ((): boolean | null => {
          const status = git(root, ['status', '--porcelain', '--untracked-files=no']);
          return status === null ? null : status.trim() !== '';
        })(),
        baseline:
          params.baseline === null ? null : (git(params.baseline, ['rev-parse', 'HEAD'])?.trim() ?? null),
      },
      params,
      contenders,
      skipped,
      rows,
      direct: directFigures,
      floor,
      policy,
      policyText,
      upstreamCounts,
      totalSeconds: (performance.now() - started) / 1000,
    };
    await mkdir(outDir, { recursive: true });
    const rounded = (_key: string, v: unknown): unknown =>
      typeof v === 'number' && !Number.isInteger(v) ? Math.round(v * 1000) / 1000 : v;
    const json = join(outDir, 'compare.json');
    await writeFile(json, `${JSON.stringify(report, rounded, 2)}\n`);
    // Results in the repository pass `npm run lint`: laid out as Biome formats JSON (short arrays on one line).
    // (Biome refuses files outside the repository, such as a test's --out.)
    const repo = resolve(fileURLToPath(new URL('..', import.meta.url)));
    const biome = join(repo, 'node_modules/.bin/biome');
    if (outDir.startsWith(`${repo}/`) && existsSync(biome)) {
      try {
        execFileSync(biome, ['format', '--write', json], { stdio: 'ignore' });
      } catch {
        log(`could not format ${json} with Biome: run npm run format before committing it`);
      }
    }
    const markdown = renderMarkdown(report);
    await writeFile(join(outDir, 'compare.md'), markdown);
    if (outDir === DEFAULT_OUT) {
      // The operator's page shows the committed results: keep its copy of the summary the same.
      const page = fileURLToPath(new URL('../docs/operator/performance.md', import.meta.url));
      const updated = existsSync(page)
        ? spliceSummary(await readFile(page, 'utf8'), renderSummary(report))
        : undefined;
      if (updated !== undefined) {
        await writeFile(page, updated);
        log(`updated the summary in ${page}`);
      }
    }
    process.stdout.write(markdown);
    log(`wrote ${join(outDir, 'compare.json')} and compare.md (${report.totalSeconds.toFixed(0)} s)`);
  } finally {
    for (const c of running) await c.stop().catch(() => undefined);
    await upstream?.stop().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
