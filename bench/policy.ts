// Policy at fleet scale: the policy file parsed and checked, and uncached policy decisions, at 10, 1,000 and
// 10,000 rules.
//
// The policies are generated like a fleet's: per spoke cluster, an exact-ID rule for Argo CD's application
// controller and one for Flux's kustomize-controller (hub trust domain, the cluster in the path), a pattern for
// the cluster's workloads (`…/cluster/<c>/ns/*/sa/*`) and one for its node agents (`…/cluster/<c>/agent/**`),
// and a trust-domain rule for the spoke's own trust domain: five rules a cluster, 2 exact, 2 pattern and 1 trust
// domain. Identity templates, limits and nested impersonation as a real policy has them.
//
// parse: parsePolicy on the file's text (YAML, every validation, compilation), as a reload does; min and median
// of several runs, each after a full garbage collection. check: `kube-svid-proxy policy check FILE` end to end, in
// a new node process (start-up, reading the file, parsing, printing), as an operator runs it.
// decide: Policy.decide(id, request) with nothing cached in front, timed one call at a time with
// process.hrtime.bigint, over IDs spread evenly across the kinds of outcome (exact ID, pattern, trust domain, no
// rule: a hub ID under a known cluster that no path rule names, and an unknown trust domain) and across the
// clusters, in a seeded random order; each ID's rule is checked before timing. Two sets of IDs: `hot`, 64 IDs
// (a proxy's working set: the cost of the lookup itself, its data in the CPU caches), and `spread`, up to 2,000
// IDs over every cluster, one decision each in turn (memory-bound: most of a decision's data is a cache miss).
// Decisions are timed after a full garbage collection (the parse's garbage gone, as in a proxy that has been
// running), forced through v8.setFlagsFromString('--expose-gc'). The timer's own cost (an empty hrtime pair) is
// reported beside the figures and not subtracted; so is the load average, since other work on the machine
// shows in the tails.
//
// Prints a table and writes bench/results/policy.json (--quick: bench/results/policy.partial.tmp).
// Run: node bench/policy.ts [--quick]
//   --quick: fewer samples and runs (about 15 s); for a smoke test, not the reference figures.
// `runPolicyBench({ quick })` runs the same from another script and returns the report without writing it.
import { execFile, execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { Policy } from '../src/policy/model.ts';
import { parsePolicy } from '../src/policy/parse.ts';
import { requestInfo } from '../src/policy/request.ts';
import type { RequestInfo } from '../src/policy/types.ts';
import { SpiffeId } from '../src/spiffe/id.ts';
import { machineInfo, type Summary, summarize } from './stats.ts';

const SIZES = [10, 1000, 10_000] as const;
const RULES_PER_CLUSTER = 5;
const HUB = 'hub.example.org';
const OUTCOMES = ['id', 'pattern', 'trustDomain', 'noRule'] as const;
type Outcome = (typeof OUTCOMES)[number];

export interface PolicyBenchOptions {
  /** Fewer samples and parse runs: a smoke test, not the reference figures. */
  readonly quick?: boolean;
}

/** Milliseconds over a few runs. */
export interface RunsMs {
  readonly runs: number;
  readonly min: number;
  readonly p50: number;
  readonly max: number;
}

/** Decisions over one set of IDs: microseconds a call, over all of them and by the kind of outcome. */
export interface DecideResult {
  readonly distinctIds: number;
  readonly us: Summary;
  readonly usByOutcome: Readonly<Record<Outcome, Summary>>;
}

export interface PolicySizeResult {
  readonly rules: number;
  readonly counts: { readonly id: number; readonly pattern: number; readonly trustDomain: number };
  readonly trustDomains: number;
  readonly fileBytes: number;
  /** parsePolicy, milliseconds. */
  readonly parseMs: RunsMs;
  /** `kube-svid-proxy policy check FILE` end to end (a new node process: start-up, read, parse, print). */
  readonly checkMs: RunsMs;
  /** Policy.decide over a working set of 64 IDs, and over up to 2,000 IDs taken in turn. */
  readonly decide: { readonly hot: DecideResult; readonly spread: DecideResult };
}

export interface PolicyBenchReport {
  readonly benchmark: 'policy';
  readonly date: string;
  readonly machine: ReturnType<typeof machineInfo> & {
    /** os.loadavg() (1, 5, 15 minutes) when the run started and when it ended. */
    readonly loadAverage: { readonly start: readonly number[]; readonly end: readonly number[] };
  };
  readonly params: {
    readonly quick: boolean;
    readonly sizes: readonly number[];
    /** Timed decisions per set of IDs and size, after `warmup` untimed ones. */
    readonly samples: number;
    readonly warmup: number;
    readonly request: string;
    readonly mix: string;
  };
  /** An empty process.hrtime.bigint pair, microseconds: the floor under every decide figure. */
  readonly timerUs: Summary;
  readonly results: readonly PolicySizeResult[];
  readonly totalSeconds: number;
}

const cluster = (i: number): string => `c${String(i).padStart(5, '0')}`;
const spokeDomain = (i: number): string => `${cluster(i)}.spoke.example.org`;

/** A fleet policy of `rules` rules (a multiple of five): five rules a spoke cluster. */
export function fleetPolicy(rules: number): string {
  const lines = ['# Generated by bench/policy.ts: five rules per spoke cluster.', 'rules:'];
  for (let i = 0; i < rules / RULES_PER_CLUSTER; i++) {
    const c = cluster(i);
    lines.push(
      `  - name: argocd-${c}`,
      '    match:',
      `      id: spiffe://${HUB}/cluster/${c}/ns/argocd/sa/argocd-application-controller`,
      '    identity:',
      '      user: "spiffe:{trustDomain}:{path}"',
      `      groups: ["gitops", "cluster:${c}"]`,
      '      extra:',
      '        spiffe.io/id: ["{id}"]',
      '    limits:',
      '      verbs: [get, list, watch, create, update, patch, delete]',
      '      nonResourcePaths: ["/healthz", "/version", "/openapi/*", "/api", "/apis"]',
      '    impersonate:',
      '      serviceAccounts: ["team-a/*", "team-b/deployer"]',
      `  - name: flux-${c}`,
      '    match:',
      `      id: spiffe://${HUB}/cluster/${c}/ns/flux-system/sa/kustomize-controller`,
      '    identity:',
      '      user: "spiffe:{trustDomain}:{path}"',
      `      groups: ["gitops", "cluster:${c}"]`,
      '    impersonate:',
      '      serviceAccounts: ["team-c/flux-deployer"]',
      `  - name: workloads-${c}`,
      '    match:',
      `      pattern: spiffe://${HUB}/cluster/${c}/ns/*/sa/*`,
      '    identity:',
      '      user: "spiffe:{trustDomain}:{path}"',
      `      groups: ["workloads", "cluster:${c}", "ns:{segment:3}"]`,
      '    limits:',
      '      verbs: [get, list, watch]',
      '      resources: ["pods", "pods/log", "configmaps", "apps/deployments"]',
      `  - name: agents-${c}`,
      '    match:',
      `      pattern: spiffe://${HUB}/cluster/${c}/agent/**`,
      '    identity:',
      '      user: "agent:{segment:1}:{segment:3}"',
      `      groups: ["agents"]`,
      '    limits:',
      '      verbs: [get, list, watch]',
      '      resources: ["nodes", "pods"]',
      '      nonResourcePaths: ["/healthz"]',
      `  - name: spoke-${c}`,
      '    match:',
      `      trustDomain: ${spokeDomain(i)}`,
      '    identity:',
      '      user: "spoke:{trustDomain}:{path}"',
      '      groups: ["spoke"]',
      '    limits:',
      '      verbs: [get, list, watch]',
      '      namespaces: ["*"]',
    );
  }
  return `${lines.join('\n')}\n`;
}

/** IDs spread over every outcome and every cluster, each with the rule it must get (undefined: none). */
function fleetIds(clusters: number, perOutcome: number): { id: SpiffeId; outcome: Outcome; rule?: string }[] {
  const out: { id: SpiffeId; outcome: Outcome; rule?: string }[] = [];
  for (let n = 0; n < perOutcome; n++) {
    const i = Math.floor((n * clusters) / perOutcome) % clusters;
    const c = cluster(i);
    const add = (outcome: Outcome, text: string, rule?: string): void => {
      out.push({ id: SpiffeId.parse(text), outcome, ...(rule !== undefined && { rule }) });
    };
    if (n % 2 === 0)
      add('id', `spiffe://${HUB}/cluster/${c}/ns/argocd/sa/argocd-application-controller`, `argocd-${c}`);
    else add('id', `spiffe://${HUB}/cluster/${c}/ns/flux-system/sa/kustomize-controller`, `flux-${c}`);
    if (n % 2 === 0)
      add('pattern', `spiffe://${HUB}/cluster/${c}/ns/team-${n % 7}/sa/app-${n}`, `workloads-${c}`);
    else add('pattern', `spiffe://${HUB}/cluster/${c}/agent/node-${n}/kubelet`, `agents-${c}`);
    add('trustDomain', `spiffe://${spokeDomain(i)}/ns/team-${n % 7}/sa/app-${n}`, `spoke-${c}`);
    // Misses: a hub ID under a known cluster that no path rule names (every hub pattern is a candidate), and
    // an ID of a trust domain no rule names.
    if (n % 2 === 0) add('noRule', `spiffe://${HUB}/cluster/${c}/ns/team-${n % 7}/pods/app-${n}`);
    else add('noRule', `spiffe://elsewhere-${n % 13}.example.org/ns/default/sa/app`);
  }
  return out;
}

/** A small seeded PRNG (mulberry32), so that every run times the IDs in the same order. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function shuffle<T>(items: T[], random: () => number): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [items[i], items[j]] = [items[j] as T, items[i] as T];
  }
  return items;
}

const nsToUs = (ns: bigint): number => Number(ns) / 1000;

function timerOverhead(samples: number): Summary {
  const out = new Array<number>(samples);
  for (let i = 0; i < samples; i++) {
    const start = process.hrtime.bigint();
    out[i] = nsToUs(process.hrtime.bigint() - start);
  }
  return summarize(out);
}

/** A full garbage collection, so that each phase starts from a heap holding only what is live. */
function collectGarbage(): void {
  setFlagsFromString('--expose-gc');
  (runInNewContext('gc') as () => void)();
}

type TimedId = ReturnType<typeof fleetIds>[number];

function timeDecisions(
  policy: Policy,
  ids: readonly TimedId[],
  request: RequestInfo,
  config: { samples: number; warmup: number },
): DecideResult {
  for (const { id, outcome, rule } of ids) {
    const decision = policy.decide(id, request);
    if (decision.rule !== rule || decision.allowed !== (outcome !== 'noRule')) {
      throw new Error(`${id.toString()}: expected ${rule ?? 'no rule'}, got ${JSON.stringify(decision)}`);
    }
  }
  for (let i = 0; i < config.warmup; i++) policy.decide((ids[i % ids.length] as TimedId).id, request);
  const all = new Array<number>(config.samples);
  const byOutcome: Record<Outcome, number[]> = { id: [], pattern: [], trustDomain: [], noRule: [] };
  for (let i = 0; i < config.samples; i++) {
    const { id, outcome } = ids[i % ids.length] as TimedId;
    const start = process.hrtime.bigint();
    policy.decide(id, request);
    const us = nsToUs(process.hrtime.bigint() - start);
    all[i] = us;
    byOutcome[outcome].push(us);
  }
  return {
    distinctIds: ids.length,
    us: summarize(all),
    usByOutcome: {
      id: summarize(byOutcome.id),
      pattern: summarize(byOutcome.pattern),
      trustDomain: summarize(byOutcome.trustDomain),
      noRule: summarize(byOutcome.noRule),
    },
  };
}

const CLI = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));

function runsMs(values: readonly number[]): RunsMs {
  const s = summarize(values);
  return { runs: s.n, min: s.min, p50: s.p50, max: s.max };
}

/** `policy check` on the file in a new process, as an operator runs it; checks that it accepted every rule. */
async function timeCheck(file: string, rules: number, runs: number): Promise<RunsMs> {
  const times: number[] = [];
  for (let run = 0; run < runs; run++) {
    const start = process.hrtime.bigint();
    const { stdout } = await promisify(execFile)(process.execPath, [CLI, 'policy', 'check', file], {
      maxBuffer: 64 * 1024 * 1024,
    });
    times.push(Number(process.hrtime.bigint() - start) / 1e6);
    if (!stdout.startsWith(`OK: ${rules} rules `)) throw new Error(`policy check: ${stdout.slice(0, 200)}`);
  }
  return runsMs(times);
}

async function measureSize(
  rules: number,
  request: RequestInfo,
  config: { samples: number; warmup: number; parseRuns: number; checkRuns: number; dir: string },
): Promise<PolicySizeResult> {
  const text = fleetPolicy(rules);
  const file = join(config.dir, `fleet-${rules}.yaml`);
  await writeFile(file, text);
  const checkMs = await timeCheck(file, rules, config.checkRuns);
  const parseMs: number[] = [];
  let policy: Policy | undefined;
  for (let run = 0; run < config.parseRuns; run++) {
    policy = undefined;
    collectGarbage();
    const start = process.hrtime.bigint();
    policy = parsePolicy(text, { file: `fleet-${rules}.yaml` });
    parseMs.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  if (policy === undefined) throw new Error('no parse run');

  const clusters = rules / RULES_PER_CLUSTER;
  const random = prng(rules);
  const hot = shuffle(fleetIds(clusters, 16), random);
  const spread = shuffle(fleetIds(clusters, 500), random);
  collectGarbage();
  const decide = {
    hot: timeDecisions(policy, hot, request, config),
    spread: timeDecisions(policy, spread, request, config),
  };
  return {
    rules: policy.rules.length,
    counts: policy.counts(),
    trustDomains: policy.trustDomains.length,
    fileBytes: Buffer.byteLength(text),
    parseMs: runsMs(parseMs),
    checkMs,
    decide,
  };
}

/** Runs the policy benchmark at 10, 1,000 and 10,000 rules; returns the report (JSON-able), writes nothing. */
export async function runPolicyBench(opts: PolicyBenchOptions = {}): Promise<PolicyBenchReport> {
  const quick = opts.quick === true;
  const started = performance.now();
  const loadAtStart = loadavg();
  const samples = quick ? 10_000 : 100_000;
  const warmup = quick ? 2_000 : 20_000;
  const requestTarget = '/api/v1/namespaces/default/pods';
  const request = requestInfo('GET', requestTarget);
  const timerUs = timerOverhead(samples);
  const results: PolicySizeResult[] = [];
  const dir = await mkdtemp(join(tmpdir(), 'ksp-bench-policy-'));
  try {
    for (const rules of SIZES) {
      const parseRuns = quick ? 1 : rules >= 10_000 ? 5 : 10;
      const checkRuns = quick ? 1 : 3;
      results.push(await measureSize(rules, request, { samples, warmup, parseRuns, checkRuns, dir }));
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return {
    benchmark: 'policy',
    date: new Date().toISOString(),
    machine: { ...machineInfo(), loadAverage: { start: loadAtStart, end: loadavg() } },
    params: {
      quick,
      sizes: [...SIZES],
      samples,
      warmup,
      request: `GET ${requestTarget}`,
      mix: 'per spoke cluster: 2 exact-ID (hub controllers), 2 pattern (…/ns/*/sa/*, …/agent/**), 1 trust-domain rule',
    },
    timerUs,
    results,
    totalSeconds: (performance.now() - started) / 1000,
  };
}

const fixed = (value: number, digits: number): string => value.toFixed(digits);

/** The report as two tables (reading the file; deciding), one line a size. */
export function formatPolicyBench(report: PolicyBenchReport): string {
  const m = report.machine;
  const load = (l: readonly number[]): string => l.map((x) => x.toFixed(2)).join(' ');
  const col = (text: string | number, width: number): string => String(text).padStart(width);
  const lines = [
    `policy: ${m.cpu}, ${m.cores} cores, node ${m.node}, ${m.os}; load average ${load(m.loadAverage.start)} ` +
      `at the start, ${load(m.loadAverage.end)} at the end${report.params.quick ? ' (quick)' : ''}`,
    '',
    `${col('rules', 6)} ${col('exact/pattern/td', 17)} ${col('KB', 6)}   ${col('parsePolicy ms', 15)}   ${col('policy check ms', 16)}`,
    `${col('', 32)}   ${col('min', 7)} ${col('p50', 7)}   ${col('min', 8)} ${col('p50', 7)}`,
  ];
  for (const r of report.results) {
    lines.push(
      `${col(r.rules, 6)} ${col(`${r.counts.id}/${r.counts.pattern}/${r.counts.trustDomain}`, 17)} ` +
        `${col(fixed(r.fileBytes / 1024, 0), 6)}   ${col(fixed(r.parseMs.min, 0), 7)} ${col(fixed(r.parseMs.p50, 0), 7)}` +
        `   ${col(fixed(r.checkMs.min, 0), 8)} ${col(fixed(r.checkMs.p50, 0), 7)}`,
    );
  }
  const cells = (d: DecideResult): string => {
    const worst = Math.max(...OUTCOMES.map((o) => d.usByOutcome[o].p99));
    return [fixed(d.us.p50, 2), fixed(d.us.p99, 2), fixed(worst, 2), fixed(d.us.max, 0)]
      .map((c) => col(c, 9))
      .join('');
  };
  lines.push(
    '',
    `decide, µs a call: ${report.params.samples} uncached calls a size and set of IDs, ${report.params.request}; ` +
      `timer floor p50 ${fixed(report.timerUs.p50, 3)}, p99 ${fixed(report.timerUs.p99, 3)} (not subtracted)`,
    `${col('', 6)}   ${'hot: 64 IDs'.padStart(20).padEnd(36)}   ${'spread: 2,000 IDs'.padStart(25)}`,
    `${col('rules', 6)}   ${['p50', 'p99', 'p99 kind', 'max'].map((c) => col(c, 9)).join('')}   ` +
      ['p50', 'p99', 'p99 kind', 'max'].map((c) => col(c, 9)).join(''),
  );
  for (const r of report.results) {
    lines.push(`${col(r.rules, 6)}   ${cells(r.decide.hot)}   ${cells(r.decide.spread)}`);
  }
  lines.push(
    '"p99 kind": the highest p99 of the four kinds of outcome (exact ID, pattern, trust domain, no rule).',
  );
  return lines.join('\n');
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { quick: { type: 'boolean', default: false } } });
  const report = await runPolicyBench({ quick: values.quick });
  process.stdout.write(`${formatPolicyBench(report)}\n\ntotal ${report.totalSeconds.toFixed(1)} s\n`);
  const resultsDir = fileURLToPath(new URL('./results/', import.meta.url));
  await mkdir(resultsDir, { recursive: true });
  const file = join(resultsDir, report.params.quick ? 'policy.partial.tmp' : 'policy.json');
  const rounded = (_key: string, v: unknown): unknown =>
    typeof v === 'number' && !Number.isInteger(v) ? Math.round(v * 1000) / 1000 : v;
  await writeFile(file, `${JSON.stringify(report, rounded, 2)}\n`);
  // Laid out as Biome formats JSON (short arrays on one line), so that the result passes `npm run lint`.
  const biome = fileURLToPath(new URL('../node_modules/.bin/biome', import.meta.url));
  if (!report.params.quick && existsSync(biome)) {
    try {
      execFileSync(biome, ['format', '--write', file], { stdio: 'ignore' });
    } catch {
      process.stderr.write(`could not format ${file} with Biome: run npm run format before committing it\n`);
    }
  }
  process.stdout.write(`wrote ${file}\n`);
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url))
  await main();
