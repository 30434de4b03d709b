/**
 * bench/compare.ts runs end to end with tiny counts: every contender starts from the same certificates (bare
 * node:tls, the minimal Node HTTP/2 proxy, our proxy, nginx with one and N workers, Ghostunnel built from its
 * module), answers the load generator, and every row of compare.json is filled. No figure is judged: this checks
 * that the bench works, not how fast anything is. Needs Go (Ghostunnel, built into the peer cache) and Debian's
 * nginx; without either it skips, saying why, unless KSP_REQUIRE_PEERS=1 (CI), which makes that a failure.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { findNginx } from '../../bench/compare/contenders.ts';
import { type CompareReport, summaryOf } from '../../bench/compare/report.ts';
import { peer, peersRequired } from '../../dev/peers/peers.ts';

const run = promisify(execFile);
const bench = join(import.meta.dirname, '../../bench/compare.ts');

function nginxSkip(): string | false {
  if (findNginx() !== undefined) return false;
  const reason = 'nginx is not installed (Debian: apt-get install nginx)';
  if (peersRequired()) throw new Error(`${reason}; KSP_REQUIRE_PEERS=1 makes this a failure`);
  return `${reason}; set KSP_REQUIRE_PEERS=1 to make this a failure`;
}

const ghostunnel = peer('ghostunnel');
const skip = 'skip' in ghostunnel ? ghostunnel.skip : nginxSkip();

const HANDSHAKE_ROWS = [
  'handshake.full.cpuUs',
  'handshake.neverSeen.cpuUs',
  'handshake.resumed.cpuUs',
  'handshake.c16.cpuUs',
  'handshake.c1.perSecond',
  'handshake.c16.perSecond',
];
const REQUEST_ROWS = [1, 3].flatMap((c) =>
  ['cpuUs', 'perSecond', 'p50Ms', 'p99Ms'].map((m) => `requests.c${c}.${m}`),
);

describe('bench/compare.ts with tiny counts', { skip }, () => {
  const out = mkdtempSync(join(tmpdir(), 'ksp-compare-test-'));
  after(() => rmSync(out, { recursive: true, force: true }));

  it('measures every contender on every row it applies to and writes JSON and Markdown', async () => {
    await run(
      process.execPath,
      [
        bench,
        ...['--rounds', '1', '--handshakes', '4', '--new-certs', '3', '--requests', '20', '--conns', '1,3'],
        ...['--idle', '4', '--warmup', '4', '--idle-cpu-ms', '100', '--workers', '2', '--skip-policy'],
        ...['--out', out],
      ],
      { timeout: 300_000, maxBuffer: 16 * 1024 * 1024 },
    );
    const report = JSON.parse(readFileSync(join(out, 'compare.json'), 'utf8')) as CompareReport;
    const ids = report.contenders.map((c) => c.id);
    for (const id of ['tls', 'h2-min', 'proxy', 'nginx', 'nginx-w2', 'ghostunnel']) {
      assert.ok(ids.includes(id), `${id} measured (measured: ${ids.join(', ')})`);
    }
    // The proxy with two workers is measured, or named as not measured with the reason (a source without the
    // setting).
    assert.ok(
      ids.includes('proxy-w2') || report.skipped.some((s) => s.id === 'proxy-w2' && s.reason !== ''),
      'proxy-w2 measured or skipped with a reason',
    );

    const row = (key: string) => {
      const found = report.rows.find((r) => r.key === key);
      assert.ok(found, `row ${key}`);
      return found;
    };
    for (const key of HANDSHAKE_ROWS) {
      for (const id of ids) assert.ok((row(key).values[id]?.value ?? 0) > 0, `${key} ${id} is positive`);
    }
    for (const key of REQUEST_ROWS) {
      for (const c of report.contenders.filter((x) => x.id !== 'tls')) {
        assert.ok((row(key).values[c.id]?.value ?? 0) > 0, `${key} ${c.id} is positive`);
      }
      assert.equal(row(key).values.tls, undefined, `${key}: bare TLS answers no requests`);
    }
    for (const key of ['requests.c1.addedP50Us', 'requests.c1.addedP99Us', 'idle.rssKiB']) {
      for (const id of key.startsWith('idle') ? ids : ids.filter((id) => id !== 'tls')) {
        assert.ok(Number.isFinite(row(key).values[id]?.value), `${key} ${id} is a number`);
      }
    }
    // Servers that resume TLS 1.3 sessions did so on every "resumed" handshake.
    for (const id of ['tls', 'h2-min', 'proxy', 'nginx']) {
      assert.equal(row('handshake.resumed.cpuUs').values[id]?.resumedShare ?? 1, 1, `${id} resumed`);
    }
    for (const c of report.contenders.filter((x) => x.id !== 'tls')) {
      assert.equal(c.refusesWithoutClientCert, true, `${c.id} refuses a client without a certificate`);
    }
    const counts = report.upstreamCounts as { impersonated: number; withToken: number };
    assert.ok(counts.impersonated > 0, 'the proxy forwarded with impersonation headers');
    assert.ok(counts.withToken > counts.impersonated, 'h2-min and nginx forwarded with the token');
    assert.ok(report.floor !== null && !('error' in report.floor) && report.floor.fullHandshakeUs > 0);
    assert.ok(report.versions.nginx !== null && report.versions.ghostunnel !== null);

    const markdown = readFileSync(join(out, 'compare.md'), 'utf8');
    for (const id of ids) assert.ok(markdown.includes(`| ${id} |`) || markdown.includes(` ${id} |`), id);
  });
});

describe('docs/operator/performance.md', () => {
  it('shows the summary of the committed bench/results/compare.md, unchanged', () => {
    const root = join(import.meta.dirname, '../..');
    const page = summaryOf(readFileSync(join(root, 'docs/operator/performance.md'), 'utf8'));
    const results = summaryOf(readFileSync(join(root, 'bench/results/compare.md'), 'utf8'));
    assert.ok(results !== undefined && results !== '', 'bench/results/compare.md has a summary');
    assert.equal(page, results, 'run `npm run bench` (it rewrites both), or copy the summary over');
  });
});
