// The shape of bench/results/compare.json and its Markdown rendering (compare.md): absolute figures per
// contender with the ratio to the row's reference peer, then the proxy's ratio to every peer.
import type { CryptoFloor } from './floor.ts';

export interface Figure {
  /** Median over rounds (latency percentiles: over every sample of every round). */
  readonly value: number;
  /** One value per round. */
  readonly rounds: number[];
  /** The load generator's CPU per operation (µs), median over rounds: kept apart from the server's. */
  readonly clientCpuUs?: number;
  /** The upstream stand-in's CPU per request (µs), median over rounds. */
  readonly upstreamCpuUs?: number;
  /** For resumed handshakes: the share that did resume (1 when every one did). */
  readonly resumedShare?: number;
}

export interface Row {
  readonly key: string;
  readonly label: string;
  readonly unit: string;
  /** Contender the ratios of this row divide by. */
  readonly reference: string;
  /** Smaller is better (CPU, latency, memory) or larger is (rates). */
  readonly better: 'lower' | 'higher';
  readonly values: Record<string, Figure>;
}

export interface ContenderReport {
  readonly id: string;
  readonly family: string;
  readonly description: string;
  readonly workers: number | null;
  readonly root: string | null;
  /** What the client speaks after the handshake, and what the contender speaks upstream. */
  readonly protocol: string;
  readonly upstream: string;
  /** A GET with no client certificate was refused (checked once per run). */
  readonly refusesWithoutClientCert: boolean | null;
  readonly notes: string[];
  /** Background CPU of the idle server tree (µs per second), measured once. */
  readonly idleCpuUsPerSecond: number;
  readonly processes: number;
  readonly groups: string[];
}

export interface CompareReport {
  readonly benchmark: 'compare';
  readonly date: string;
  readonly machine: { cpu: string; cores: number; node: string; os: string };
  readonly versions: Record<string, string | null>;
  readonly commit: { head: string | null; dirty: boolean | null; baseline: string | null };
  readonly params: Record<string, unknown>;
  readonly contenders: ContenderReport[];
  readonly skipped: { id: string; reason: string }[];
  readonly rows: Row[];
  /** Straight to the upstream stand-in, no proxy: the base that "added latency" subtracts. */
  readonly direct: Record<string, { p50Ms: number; p99Ms: number; upstreamCpuUs: number }>;
  readonly floor: CryptoFloor | { readonly error: string } | null;
  readonly policy: unknown;
  /** bench/policy.ts's formatPolicyBench of `policy`, when it exports one. */
  readonly policyText: string | null;
  readonly upstreamCounts: unknown;
  readonly totalSeconds: number;
}

function fmt(value: number | undefined, unit: string): string {
  if (value === undefined || !Number.isFinite(value)) return '—';
  if (unit === 'ms') return value < 1 ? value.toFixed(3) : value.toFixed(2);
  if (Math.abs(value) >= 100) return value.toFixed(0);
  if (Math.abs(value) >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

function ratio(a: number | undefined, b: number | undefined): string {
  // A ratio with a figure at or below zero (an added latency lost in noise) means nothing.
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || a < 0 || b <= 0) {
    return '—';
  }
  return `${(a / b).toFixed(2)}×`;
}

function table(header: string[], lines: string[][]): string {
  const row = (cells: string[]): string => `| ${cells.join(' | ')} |`;
  return [row(header), row(header.map((_, i) => (i === 0 ? '---' : '---:'))), ...lines.map(row)].join('\n');
}

/** The proxy column the peers are compared with: workers 1 from this checkout. */
export const PROXY = 'proxy';

/** Where compare.md's summary (header, main table, ratios) sits; docs/operator/performance.md holds a copy. */
export const SUMMARY_BEGIN = '<!-- bench/compare.ts summary: begin -->';
export const SUMMARY_END = '<!-- bench/compare.ts summary: end -->';

/** `doc` with the text between the summary markers replaced by `summary`; undefined if it has no markers. */
export function spliceSummary(doc: string, summary: string): string | undefined {
  const begin = doc.indexOf(SUMMARY_BEGIN);
  const end = doc.indexOf(SUMMARY_END);
  if (begin < 0 || end < begin) return undefined;
  return `${doc.slice(0, begin + SUMMARY_BEGIN.length)}\n${summary}\n${doc.slice(end)}`;
}

/** The text between the summary markers, or undefined. */
export function summaryOf(doc: string): string | undefined {
  const begin = doc.indexOf(SUMMARY_BEGIN);
  const end = doc.indexOf(SUMMARY_END);
  return begin < 0 || end < begin ? undefined : doc.slice(begin + SUMMARY_BEGIN.length, end).trim();
}

/** When and where it ran, the table of figures with ratios to each row's reference, the proxy's ratio per peer. */
export function renderSummary(r: CompareReport): string {
  const ids = r.contenders.map((c) => c.id);
  const out: string[] = [];
  out.push(
    `${r.date.slice(0, 19).replace('T', ' ')} UTC, \`npm run bench${r.params.quick ? ' -- --quick' : ''}\` ` +
      `(${r.params.rounds} rounds, contenders interleaved in a rotating order). ` +
      `${r.machine.cpu} ×${r.machine.cores}, ${r.machine.os}. ` +
      `Commit ${r.commit.head?.slice(0, 12) ?? '?'}${r.commit.dirty ? ' (uncommitted changes in the tree)' : ''}` +
      `${r.commit.baseline === null ? '' : `, baseline ${r.commit.baseline.slice(0, 12)}`}.`,
  );
  out.push('');
  const versions = Object.entries(r.versions).filter(([, v]) => v !== null);
  out.push(`${versions.map(([k, v]) => `${k}: ${v}`).join('; ')}.`);
  out.push('');
  out.push(
    'Every contender is its own process (tree) on loopback with the same certificates: the spoke SVID (P-256 ' +
      'leaf + intermediate) as server certificate, a client certificate from the hub root required, TLS 1.3. ' +
      'Server CPU is the kernel’s account of the whole process tree’s time on CPU (every thread of the master ' +
      'and its workers, from /proc); the ' +
      'load generator (one Node process) and the upstream stand-in are counted apart. Figures: median over ' +
      'rounds; latency percentiles over every request of every round. In brackets: the ratio to the row’s ' +
      'reference (bare `tls` for handshakes and memory, `h2-min` for requests).',
  );
  out.push('');
  const header = ['', ...ids];
  const lines: string[][] = [
    ['Protocol after the handshake', ...r.contenders.map((c) => c.protocol)],
    ['Upstream hop', ...r.contenders.map((c) => c.upstream)],
    ['Processes (tree)', ...r.contenders.map((c) => String(c.processes))],
  ];
  for (const row of r.rows) {
    const ref = row.values[row.reference]?.value;
    lines.push([
      `${row.label} (${row.unit})${ref === undefined ? '' : `, ÷ ${row.reference}`}`,
      ...ids.map((id) => {
        const f = row.values[id];
        if (f === undefined) return '—';
        const share =
          f.resumedShare !== undefined && f.resumedShare < 1
            ? ` [${Math.round(f.resumedShare * 100)}% resumed]`
            : '';
        const rel = ref === undefined || id === row.reference ? '' : ` (${ratio(f.value, ref)})`;
        return `${fmt(f.value, row.unit)}${rel}${share}`;
      }),
    ]);
  }
  out.push(table(header, lines));
  out.push('');

  const peers = ids.filter((id) => id !== PROXY);
  if (ids.includes(PROXY) && peers.length > 0) {
    out.push(`**The proxy relative to each peer** (${PROXY} ÷ peer; below 1× the proxy does better):`);
    out.push('');
    const ratioLines = r.rows.map((row) => [
      row.label,
      ...peers.map((peer) => ratio(row.values[PROXY]?.value, row.values[peer]?.value)),
    ]);
    out.push(table(['', ...peers], ratioLines));
    out.push('');
  }
  return out.join('\n').trim();
}

export function renderMarkdown(r: CompareReport): string {
  const ids = r.contenders.map((c) => c.id);
  const out: string[] = [];
  out.push('# Side by side: kube-svid-proxy, bare node:tls, a minimal Node HTTP/2 proxy, nginx, Ghostunnel');
  out.push('');
  out.push(SUMMARY_BEGIN);
  out.push(renderSummary(r));
  out.push(SUMMARY_END);
  out.push('');
  out.push('## Load generator and upstream stand-in CPU (µs per operation, not in the figures above)');
  out.push('');
  const side = r.rows.filter((row) => Object.values(row.values).some((f) => f.clientCpuUs !== undefined));
  out.push(
    table(
      ['', ...ids],
      side.flatMap((row) => [
        [`${row.label}: client`, ...ids.map((id) => fmt(row.values[id]?.clientCpuUs, 'µs'))],
        ...(Object.values(row.values).some((f) => f.upstreamCpuUs !== undefined)
          ? [[`${row.label}: upstream`, ...ids.map((id) => fmt(row.values[id]?.upstreamCpuUs, 'µs'))]]
          : []),
      ]),
    ),
  );
  out.push('');
  const direct = Object.entries(r.direct);
  if (direct.length > 0) {
    out.push(
      'Straight to the upstream stand-in, the base of "added latency" over what each contender speaks ' +
        'upstream (direct-h2 for h2-min and the proxy, direct-https1 for nginx, direct-h1 for Ghostunnel): ' +
        direct
          .map(
            ([k, d]) =>
              `${k} p50 ${fmt(d.p50Ms, 'ms')} ms, p99 ${fmt(d.p99Ms, 'ms')} ms, stand-in CPU ${fmt(d.upstreamCpuUs, 'µs')} µs/request`,
          )
          .join('; ') +
        '.',
    );
    out.push('');
  }

  out.push('## Crypto floor');
  out.push('');
  if (r.floor === null) out.push('Not measured (--only without it).');
  else if ('error' in r.floor) out.push(`Not measured: ${r.floor.error}`);
  else {
    const f = r.floor;
    out.push(
      `\`${f.command}\` (${f.openssl}): ECDSA P-256 sign ${fmt(f.ecdsaP256SignUs, 'µs')} µs, verify ` +
        `${fmt(f.ecdsaP256VerifyUs, 'µs')} µs; ECDH P-256 ${fmt(f.ecdhP256Us, 'µs')} µs; X25519 ` +
        `${fmt(f.x25519Us, 'µs')} µs. The primitives of a server's full mTLS handshake (one sign, two verifies, ` +
        `two X25519): **${fmt(f.fullHandshakeUs, 'µs')} µs**; of a resumed one (two X25519): ` +
        `**${fmt(f.resumedHandshakeUs, 'µs')} µs**. Node links its own OpenSSL and Ghostunnel uses Go's crypto, ` +
        'so this is the floor’s order of magnitude, not theirs exactly.',
    );
  }
  out.push('');

  out.push('## Policy decisions');
  out.push('');
  out.push(renderPolicy(r.policy, r.policyText));
  out.push('');

  out.push('## Contenders');
  out.push('');
  for (const c of r.contenders) {
    const extra = [
      c.workers === null ? '' : `workers ${c.workers}`,
      c.root === null ? '' : `source ${c.root}`,
      c.refusesWithoutClientCert === null
        ? ''
        : c.refusesWithoutClientCert
          ? 'refuses a client without a certificate (checked)'
          : '**answered a client without a certificate**',
      c.groups.length === 0 ? '' : `key exchange ${c.groups.join(', ')}`,
      `idle CPU ${fmt(c.idleCpuUsPerSecond, 'µs')} µs/s`,
      ...c.notes,
    ].filter((s) => s !== '');
    out.push(`- **${c.id}**: ${c.description}. ${extra.join('; ')}.`);
  }
  for (const s of r.skipped) out.push(`- **${s.id}**: not measured: ${s.reason}.`);
  out.push('');
  out.push(`Run time ${Math.round(r.totalSeconds)} s. Parameters: \`${JSON.stringify(r.params)}\`.`);
  out.push('');
  return out.join('\n');
}

/** bench/policy.ts's result: its own text rendering when it has one, else its JSON. */
function renderPolicy(policy: unknown, text: string | null): string {
  if (policy === null || policy === undefined)
    return 'Not measured in this run (bench/policy.ts absent or skipped).';
  if (typeof policy === 'object' && 'error' in policy) return `Not measured: ${String(policy.error)}`;
  const body = text ?? JSON.stringify(policy, null, 2);
  return `From bench/policy.ts (\`runPolicyBench\`, in the bench's own process):\n\n\`\`\`\n${body}\n\`\`\``;
}
