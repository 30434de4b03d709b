// Latency of the bundled agent's Workload API, against a bare Unix-socket round trip measured in the same run:
//  1. connect → first X509SVIDResponse: a new WorkloadClient (new channel, new connection) per call, with the
//     client in a child process (headline) and in the agent's own process (shared event loop);
//  2. rotation fan-out: one SVID rotation pushed to 1,000 open FetchX509SVID streams, from the issuer's
//     'rotated' event until the last stream has the new SVID (streams in the agent's process).
// Prints a table and writes bench/results/workload.json (a partial run: bench/results/workload.partial.tmp).
// Run: node bench/workload.ts [--iterations 200] [--client-process | --in-process] [--skip-connect] [--skip-fanout]
//   --client-process / --in-process: only that mode of the connect benchmark (default: both).
// Takes about 35 s, most of it waiting for the 2 s rotations of a 4 s SVID.
import { type ChildProcess, fork } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { WorkloadAgent } from '../src/agent/agent.ts';
import type { IssuedX509Svid } from '../src/agent/issuer.ts';
import { SvidIssuer } from '../src/agent/issuer.ts';
import { silentLogger } from '../src/observability/logger.ts';
import { TrustDomain } from '../src/spiffe/index.ts';
import { WorkloadClient, X509Source } from '../src/workload/client.ts';
import { WorkloadApiClient, type X509SvidResponse } from '../src/workload/proto.ts';
import { machineInfo, percentile, type Summary, summarize } from './stats.ts';

const WARMUP = 20;
const ROTATIONS = 5;
const STREAMS = 1000;
const CONNECT_BATCH = 100;
const X509_TTL_SECONDS = 4;

interface ConnectConfig {
  readonly socketPath: string;
  /** A second agent that nobody called yet: its SVID is minted by the last call, once every path is warm. */
  readonly unusedSocketPath: string;
  readonly echoPath: string;
  readonly iterations: number;
  readonly warmup: number;
}

interface ConnectResults {
  /** The process's first FetchX509SVID: new connection, SVID minted on demand, first use of every code path. */
  readonly coldMs: number;
  /** A new connection to an agent whose SVID is not minted yet, after the loops: the mint, without JIT warm-up. */
  readonly coldWarmProcessMs: number;
  readonly echo: Summary;
  readonly workloadClient: Summary;
  readonly x509Source: Summary;
}

interface ConnectRun extends ConnectResults {
  readonly mode: 'client-process' | 'in-process';
  /** Connections the agent accepted during the run, and the gRPC calls made (cold + warm-up + measured). */
  readonly connections: number;
  readonly grpcCalls: number;
}

interface RoundResult {
  /** Trigger ('rotated') → the last stream has the new SVID. */
  readonly lastMs: number;
  readonly firstMs: number;
  readonly p50Ms: number;
  /** FetchX509SVID messages the server sent between the trigger and the last arrival. */
  readonly messages: number;
}

interface FanoutRun {
  readonly layout: string;
  readonly connections: number;
  readonly streamsPerConnection: number;
  /** Opening every stream until each had its first message. */
  readonly setupMs: number;
  readonly agentConnections: number;
  readonly rounds: readonly RoundResult[];
  readonly medianLastMs: number;
}

// ---------------------------------------------------------------------------------------------------------------
// helpers

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1
    ? (sorted[mid] as number)
    : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const out = (line: string): void => {
  process.stdout.write(`${line}\n`);
};
const ms = (v: number, width = 8): string => v.toFixed(v < 10 ? 3 : v < 100 ? 2 : 1).padStart(width);

function fetchX509SvidRaw(
  client: grpc.Client,
  onMessage: (message: X509SvidResponse) => void,
  onEnd: (err: Error | undefined) => void,
): { cancel(): void } {
  // The same call WorkloadClient.stream makes (security header included), on a client we built ourselves.
  type Fetch = (request: unknown, metadata: grpc.Metadata) => grpc.ClientReadableStream<X509SvidResponse>;
  const fetch = (client as unknown as Record<string, Fetch>).FetchX509SVID as Fetch;
  const call = fetch.call(client, {}, WorkloadClient.metadata());
  let ended = false;
  call.on('data', onMessage);
  call.on('error', (err: Error) => {
    if (!ended) onEnd(err);
    ended = true;
  });
  call.on('end', () => {
    if (!ended) onEnd(undefined);
    ended = true;
  });
  return {
    cancel: () => {
      ended = true;
      call.cancel();
    },
  };
}

/**
 * A client with its own HTTP/2 connection. Concurrent WorkloadClient instances in one process share one
 * connection (grpc-js keeps a process-wide subchannel pool), so spreading streams over N connections needs
 * clients with a local subchannel pool; the other options are WorkloadClient's.
 */
function clientWithOwnConnection(socketPath: string): grpc.Client {
  return new WorkloadApiClient(`unix://${socketPath}`, grpc.credentials.createInsecure(), {
    'grpc.initial_reconnect_backoff_ms': 100,
    'grpc.max_reconnect_backoff_ms': 5000,
    'grpc.use_local_subchannel_pool': 1,
  });
}

async function startAgent(dir: string, name: string, ttl?: string): Promise<WorkloadAgent> {
  const entriesFile = join(dir, `${name}.yaml`);
  const uid = process.getuid?.() ?? 0;
  await writeFile(
    entriesFile,
    'entries:\n' +
      '  - spiffeId: spiffe://example.org/bench\n' +
      `    selectors: ["unix:uid:${uid}"]\n` +
      (ttl === undefined ? '' : `    x509SvidTtl: ${ttl}\n`),
  );
  return WorkloadAgent.start({
    trustDomain: TrustDomain.parse('example.org'),
    socketPath: join(dir, `${name}.sock`),
    entriesFile,
    logger: silentLogger(),
    svid: { rotationJitter: 0 },
  });
}

async function startEcho(path: string): Promise<net.Server> {
  const server = net.createServer((socket) => {
    socket.on('data', (chunk) => socket.write(chunk));
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  return server;
}

// ---------------------------------------------------------------------------------------------------------------
// 1. connect → first message (runs in the agent's process or in a child)

function echoOnce(path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const socket = net.connect(path, () => socket.write(Buffer.of(1)));
    socket.once('data', () => {
      const elapsed = performance.now() - start;
      socket.destroy();
      resolve(elapsed);
    });
    socket.once('error', reject);
  });
}

function firstX509SvidOnce(socketPath: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const client = new WorkloadClient({ address: `unix://${socketPath}` });
    const handle = client.stream<X509SvidResponse>(
      'FetchX509SVID',
      () => {
        const elapsed = performance.now() - start;
        handle.cancel();
        client.close();
        resolve(elapsed);
      },
      (err) => {
        client.close();
        reject(err ?? new Error('FetchX509SVID ended without a message'));
      },
    );
  });
}

async function x509SourceOnce(socketPath: string): Promise<number> {
  const start = performance.now();
  const source = await X509Source.create({ address: `unix://${socketPath}` });
  const elapsed = performance.now() - start;
  source.close();
  return elapsed;
}

async function sample(config: ConnectConfig, once: () => Promise<number>): Promise<Summary> {
  for (let i = 0; i < config.warmup; i++) await once();
  const samples: number[] = [];
  for (let i = 0; i < config.iterations; i++) samples.push(await once());
  return summarize(samples);
}

async function runConnect(config: ConnectConfig): Promise<ConnectResults> {
  const coldMs = await firstX509SvidOnce(config.socketPath);
  const echo = await sample(config, () => echoOnce(config.echoPath));
  const workloadClient = await sample(config, () => firstX509SvidOnce(config.socketPath));
  const x509Source = await sample(config, () => x509SourceOnce(config.socketPath));
  const coldWarmProcessMs = await firstX509SvidOnce(config.unusedSocketPath);
  return { coldMs, coldWarmProcessMs, echo, workloadClient, x509Source };
}

function runConnectInChild(config: ConnectConfig): Promise<ConnectResults> {
  return new Promise((resolve, reject) => {
    const child: ChildProcess = fork(fileURLToPath(import.meta.url), ['--child', JSON.stringify(config)], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    let result: ConnectResults | undefined;
    child.on('message', (message) => {
      result = message as ConnectResults;
    });
    child.once('error', reject);
    child.once('exit', (code) => {
      if (result !== undefined) resolve(result);
      else reject(new Error(`client process exited with code ${code} before reporting`));
    });
  });
}

async function connectBenchmark(
  dir: string,
  mode: 'client-process' | 'in-process',
  iterations: number,
): Promise<ConnectRun> {
  // A fresh agent, so that the first call finds no SVID minted.
  const agent = await startAgent(dir, `connect-${mode}`);
  const unused = await startAgent(dir, `unused-${mode}`);
  const echoPath = join(dir, `echo-${mode}.sock`);
  const echo = await startEcho(echoPath);
  try {
    const config: ConnectConfig = {
      socketPath: agent.server.socketPath,
      unusedSocketPath: unused.server.socketPath,
      echoPath,
      iterations,
      warmup: WARMUP,
    };
    const before = agent.server.stats.connections;
    const results = mode === 'client-process' ? await runConnectInChild(config) : await runConnect(config);
    return {
      mode,
      ...results,
      connections: agent.server.stats.connections - before,
      grpcCalls: 1 + 2 * (WARMUP + iterations),
    };
  } finally {
    await new Promise<void>((resolve) => echo.close(() => resolve()));
    await agent.close();
    await unused.close();
  }
}

async function mintBenchmark(dir: string): Promise<Summary> {
  // Key pair + signature by the local CA: what the cold call pays on top of a warm one.
  const agent = await startAgent(dir, 'mint');
  try {
    const entry = agent.entries.entries[0];
    if (entry === undefined) throw new Error('no entry');
    const samples: number[] = [];
    for (let i = 0; i < 5 + 30; i++) {
      const issuer = new SvidIssuer({ ca: agent.ca, jitter: 0 });
      const start = performance.now();
      await issuer.x509For(entry);
      if (i >= 5) samples.push(performance.now() - start);
      issuer.close();
    }
    return summarize(samples);
  } finally {
    await agent.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. rotation fan-out (streams in the agent's process)

interface Round {
  readonly chain: Buffer;
  readonly start: number;
  readonly messagesBefore: number;
  readonly arrivals: number[];
  readonly seen: Uint8Array;
}

async function fanoutBenchmark(
  agent: WorkloadAgent,
  layout: string,
  connections: number,
  streamsPerConnection: number,
): Promise<FanoutRun> {
  const socketPath = agent.server.socketPath;
  const total = connections * streamsPerConnection;
  const messagesSent = (): number => agent.server.stats.messages.FetchX509SVID ?? 0;
  let round: Round | undefined;
  let failure: Error | undefined;
  let onRoundDone: (() => void) | undefined;
  const gotFirst = new Uint8Array(total);
  let ready = 0;
  let onReady: (() => void) | undefined;

  const onMessage = (index: number, message: X509SvidResponse): void => {
    if (gotFirst[index] === 0) {
      gotFirst[index] = 1;
      ready++;
      onReady?.();
    }
    const r = round;
    if (r === undefined || r.seen[index] === 1) return;
    if (!message.svids[0]?.x509_svid.equals(r.chain)) return;
    r.seen[index] = 1;
    r.arrivals.push(performance.now() - r.start);
    if (r.arrivals.length === total) onRoundDone?.();
  };
  const onEnd = (err: Error | undefined): void => {
    failure ??= err ?? new Error('a FetchX509SVID stream ended');
  };

  const clients: { close(): void }[] = [];
  const handles: { cancel(): void }[] = [];
  const connectionsBefore = agent.server.stats.connections;
  const setupStart = performance.now();
  for (let base = 0; base < connections; base += CONNECT_BATCH) {
    // In batches, to stay within the listen backlog; each batch waits for the first message of all its streams.
    const batchEnd = Math.min(connections, base + CONNECT_BATCH);
    for (let c = base; c < batchEnd; c++) {
      if (connections === 1) {
        // One connection: the WorkloadClient as shipped, every stream multiplexed on it.
        const client = new WorkloadClient({ address: `unix://${socketPath}` });
        clients.push(client);
        for (let s = 0; s < streamsPerConnection; s++) {
          const index = c * streamsPerConnection + s;
          handles.push(client.stream<X509SvidResponse>('FetchX509SVID', (m) => onMessage(index, m), onEnd));
        }
      } else {
        const client = clientWithOwnConnection(socketPath);
        clients.push(client);
        for (let s = 0; s < streamsPerConnection; s++) {
          const index = c * streamsPerConnection + s;
          handles.push(fetchX509SvidRaw(client, (m) => onMessage(index, m), onEnd));
        }
      }
    }
    const want = batchEnd * streamsPerConnection;
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (ready >= want) {
          onReady = undefined;
          resolve();
        } else if (failure !== undefined) reject(failure);
      };
      onReady = check;
      check();
      setTimeout(
        () => reject(failure ?? new Error(`${layout}: streams not ready after 30 s`)),
        30_000,
      ).unref();
    });
  }
  const setupMs = performance.now() - setupStart;
  const agentConnections = agent.server.stats.connections - connectionsBefore;

  const rounds: RoundResult[] = [];
  try {
    await new Promise<void>((resolve, reject) => {
      const timeout = setTimeout(
        () => reject(new Error(`${layout}: rotations did not complete in time`)),
        (ROTATIONS + 2) * X509_TTL_SECONDS * 1000,
      );
      const stop = (err?: Error): void => {
        clearTimeout(timeout);
        agent.issuer.off('rotated', onRotated);
        if (err) reject(err);
        else resolve();
      };
      onRoundDone = () => {
        const r = round as Round;
        round = undefined;
        const arrivals = [...r.arrivals].sort((a, b) => a - b);
        rounds.push({
          lastMs: arrivals[arrivals.length - 1] as number,
          firstMs: arrivals[0] as number,
          p50Ms: percentile(arrivals, 50),
          messages: messagesSent() - r.messagesBefore,
        });
        if (rounds.length === ROTATIONS) stop();
      };
      // Prepended: runs before the agent's own listener starts the fan-out, so `start` is the trigger.
      const onRotated = (issued: IssuedX509Svid): void => {
        const start = performance.now();
        if (failure !== undefined) {
          stop(failure);
          return;
        }
        if (round !== undefined) {
          stop(new Error(`${layout}: a rotation came before the previous one reached every stream`));
          return;
        }
        round = {
          chain: issued.chainDer,
          start,
          messagesBefore: messagesSent(),
          arrivals: [],
          seen: new Uint8Array(total),
        };
      };
      agent.issuer.prependListener('rotated', onRotated);
    });
  } finally {
    for (const h of handles) h.cancel();
    for (const c of clients) c.close();
    await sleep(300); // let the server see the cancellations, so no stream of this layout outlives it
  }
  return {
    layout,
    connections,
    streamsPerConnection,
    setupMs,
    agentConnections,
    rounds,
    medianLastMs: median(rounds.map((r) => r.lastMs)),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// reporting

function printConnect(run: ConnectRun): void {
  const where =
    run.mode === 'client-process'
      ? 'client in a child process'
      : 'client in the agent process (one event loop)';
  out('');
  out(`connect → first X509SVIDResponse, ${where}: ${run.echo.n} iterations after ${WARMUP} warm-up`);
  out(`${'ms'.padEnd(52)}${['p50', 'p90', 'p99', 'min', 'max'].map((h) => h.padStart(8)).join('')}`);
  const row = (label: string, s: Summary): void =>
    out(`${label.padEnd(52)}${[s.p50, s.p90, s.p99, s.min, s.max].map((v) => ms(v)).join('')}`);
  row('baseline: net.connect + 1-byte echo (no gRPC)', run.echo);
  row('new WorkloadClient, FetchX509SVID, first message', run.workloadClient);
  row('X509Source.create (+ parsing the response)', run.x509Source);
  out(`${'cold: first call of the process, SVID minted'.padEnd(52)}${ms(run.coldMs)}`);
  out(`${'cold SVID, warm process (new agent, after the loops)'.padEnd(52)}${ms(run.coldWarmProcessMs)}`);
  out(
    `ratio p50 WorkloadClient / baseline: ${(run.workloadClient.p50 / run.echo.p50).toFixed(1)}x; ` +
      `agent accepted ${run.connections} connections for ${run.grpcCalls} gRPC calls`,
  );
}

function printFanout(runs: readonly FanoutRun[]): void {
  out('');
  out(
    `rotation fan-out to ${STREAMS} FetchX509SVID streams (streams in the agent process), ${ROTATIONS} rotations:`,
  );
  out('trigger = issuer "rotated" event (new SVID minted); done = the last stream received it');
  for (const run of runs) {
    out('');
    out(
      `${run.layout}: setup ${ms(run.setupMs, 0)} ms (agent accepted ${run.agentConnections} connections); ` +
        `median last-arrival ${ms(run.medianLastMs, 0)} ms`,
    );
    out(
      `  ${'rotation'.padEnd(10)}${['last ms', 'first ms', 'p50 ms', 'msgs sent'].map((h) => h.padStart(11)).join('')}`,
    );
    run.rounds.forEach((r, i) => {
      out(
        `  ${String(i + 1).padEnd(10)}${[r.lastMs, r.firstMs, r.p50Ms].map((v) => ms(v, 11)).join('')}` +
          `${String(r.messages).padStart(11)}`,
      );
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// main

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      iterations: { type: 'string', default: '200' },
      'client-process': { type: 'boolean', default: false },
      'in-process': { type: 'boolean', default: false },
      'skip-connect': { type: 'boolean', default: false },
      'skip-fanout': { type: 'boolean', default: false },
      child: { type: 'string' },
    },
  });
  if (values.child !== undefined) {
    // The client side of --client-process: run the loops, report to the parent, exit.
    const results = await runConnect(JSON.parse(values.child) as ConnectConfig);
    const send = process.send?.bind(process);
    if (send === undefined) throw new Error('--child is internal: the parent runs it with an IPC channel');
    await new Promise<void>((resolve) => send(results, () => resolve()));
    process.exit(0);
  }
  const iterations = Number(values.iterations);
  if (!Number.isInteger(iterations) || iterations < 1)
    throw new RangeError('--iterations must be a positive integer');
  const modes: ('client-process' | 'in-process')[] = values['skip-connect']
    ? []
    : values['client-process'] && !values['in-process']
      ? ['client-process']
      : values['in-process'] && !values['client-process']
        ? ['in-process']
        : ['client-process', 'in-process'];

  const machine = machineInfo();
  const cpu = machine.cpu;
  out(`node ${machine.node}, ${cpu} x${machine.cores}, ${machine.os}`);
  const started = performance.now();
  const dir = await mkdtemp(join(tmpdir(), 'ksp-bench-'));
  try {
    const connect: ConnectRun[] = [];
    for (const mode of modes) {
      const run = await connectBenchmark(dir, mode, iterations);
      connect.push(run);
      printConnect(run);
    }
    let mint: Summary | undefined;
    if (modes.length > 0) {
      mint = await mintBenchmark(dir);
      out(
        `mint alone (EC P-256 key pair + CA signature), ${mint.n} runs: p50 ${ms(mint.p50, 0)} ms, ` +
          `min ${ms(mint.min, 0)} ms, max ${ms(mint.max, 0)} ms`,
      );
    }

    const fanout: FanoutRun[] = [];
    let fanoutServerStats: { calls: number; messages: number; connections: number } | undefined;
    if (!values['skip-fanout']) {
      const agent = await startAgent(dir, 'fanout', `${X509_TTL_SECONDS}s`);
      try {
        fanout.push(await fanoutBenchmark(agent, `1 connection x ${STREAMS} streams`, 1, STREAMS));
        fanout.push(
          await fanoutBenchmark(agent, `10 connections x ${STREAMS / 10} streams`, 10, STREAMS / 10),
        );
        fanout.push(await fanoutBenchmark(agent, `${STREAMS} connections x 1 stream`, STREAMS, 1));
        const stats = agent.server.stats;
        fanoutServerStats = {
          calls: stats.calls.FetchX509SVID ?? 0,
          messages: stats.messages.FetchX509SVID ?? 0,
          connections: stats.connections,
        };
      } finally {
        await agent.close();
      }
      printFanout(fanout);
      out('');
      out(
        `agent stats over the fan-out runs: ${fanoutServerStats?.calls} FetchX509SVID streams, ` +
          `${fanoutServerStats?.messages} messages sent, ${fanoutServerStats?.connections} connections`,
      );
    }

    const totalSeconds = (performance.now() - started) / 1000;
    out('');
    out(`total ${totalSeconds.toFixed(1)} s`);
    const resultsDir = fileURLToPath(new URL('./results/', import.meta.url));
    await mkdir(resultsDir, { recursive: true });
    // A run of only some parts writes beside the committed results, not over them (*.tmp is git-ignored).
    const partial = modes.length < 2 || values['skip-fanout'];
    const file = join(resultsDir, partial ? 'workload.partial.tmp' : 'workload.json');
    const report = {
      benchmark: 'workload',
      date: new Date().toISOString(),
      machine,
      params: {
        iterations,
        warmup: WARMUP,
        streams: STREAMS,
        rotations: ROTATIONS,
        x509SvidTtlSeconds: X509_TTL_SECONDS,
      },
      connect,
      ...(mint === undefined ? {} : { mint }),
      fanout,
      ...(fanoutServerStats === undefined ? {} : { fanoutServerStats }),
      totalSeconds,
    };
    const rounded = (_key: string, v: unknown): unknown =>
      typeof v === 'number' && !Number.isInteger(v) ? Math.round(v * 1000) / 1000 : v;
    await writeFile(file, `${JSON.stringify(report, rounded, 2)}\n`);
    out(`wrote ${file}`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
