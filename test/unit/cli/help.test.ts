import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { runCli } from '../../helpers/cli.ts';

/** Every command and subcommand, and what its synopsis line must show besides its own name. */
const COMMANDS: readonly (readonly [string, RegExp])[] = [
  ['svid', /svid verify CHAIN/],
  ['svid verify', /--bundle TRUST_DOMAIN=FILE/],
  ['serve', /--config FILE/],
  ['agent', /--config FILE/],
  ['api', /api fetch x509\|jwt\|bundles/],
  ['api fetch', /x509\|jwt\|bundles/],
  ['api fetch x509', /--write DIR/],
  ['api fetch jwt', /--spiffe-id ID/],
  ['api fetch bundles', /--socket ADDR/],
  ['api validate', /jwt --audience AUD --svid TOKEN/],
  ['api validate jwt', /--svid TOKEN/],
  ['credential', /--hint HINT/],
  ['credential kubeconfig', /--server URL/],
  ['policy', /check\|explain\|rbac/],
  ['policy check', /FILE$/],
  ['policy explain', /--id SPIFFE_ID/],
  ['policy rbac', /--service-account NAMESPACE\/NAME/],
  ['help', /\[COMMAND/],
  ['version', /version$/],
  ['bundle', /show\|list\|set/],
  ['bundle show', /--format spiffe\|pem/],
  ['bundle list', /--json/],
  ['bundle set', /--trust-domain NAME --file FILE\|-/],
  ['client', /--config FILE/],
  ['client kubeconfig', /--spoke NAME/],
  ['writer', /--config FILE/],
];

const words = (path: string): string[] => path.split(' ');
const literal = (text: string): string => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('kube-svid-proxy help', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ksp-help-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const [path, mark] of COMMANDS) {
    it(`${path} --help, ${path} -h and help ${path} print the usage of ${path} and exit 0`, async () => {
      const [long, short, viaHelp] = await Promise.all([
        runCli([...words(path), '--help']),
        runCli([...words(path), '-h']),
        runCli(['help', ...words(path)]),
      ]);
      for (const r of [long, short, viaHelp]) {
        assert.equal(r.status, 0, r.stderr);
        assert.equal(r.stderr, '');
      }
      const synopsis = long.stdout.split('\n')[0] ?? '';
      assert.match(synopsis, new RegExp(`^Usage: kube-svid-proxy ${literal(path)}( |$)`));
      assert.match(synopsis, mark);
      assert.match(long.stdout, /^Flags:\n(.*\n)* {2}-h, --help /m);
      assert.match(long.stdout, /^Examples?:\n {2}kube-svid-proxy /m);
      assert.equal(short.stdout, long.stdout);
      assert.equal(viaHelp.stdout, long.stdout);
    });
  }

  it('describes every flag of a command with its meaning and default', async () => {
    const [x509, kubeconfig, explain] = await Promise.all([
      runCli(['api', 'fetch', 'x509', '--help']),
      runCli(['credential', 'kubeconfig', '--help']),
      runCli(['policy', 'explain', '--help']),
    ]);
    for (const flag of ['--socket ADDR', '--write DIR', '--json', '--timeout DURATION']) {
      assert.match(x509.stdout, new RegExp(`^ {6}${literal(flag)} `, 'm'));
    }
    assert.match(x509.stdout, /default 5s/);
    assert.match(x509.stdout, /unix:\/\/\/run\/kube-svid-proxy\/agent\.sock/);
    for (const flag of ['--server URL', '--socket ADDR', '--hint HINT', '--ca-file FILE', '--name NAME']) {
      assert.match(kubeconfig.stdout, new RegExp(`^ {6}${literal(flag)} `, 'm'));
    }
    assert.match(kubeconfig.stdout, /default kube-svid-proxy\)/);
    for (const flag of ['--id', '--verb', '--resource', '--namespace', '--path', '--impersonate-user']) {
      assert.match(explain.stdout, new RegExp(`^ {6}${literal(flag)} `, 'm'));
    }
    assert.match(explain.stdout, /^Arguments:\n {2}FILE /m);
  });

  it('--help and -h alone, and help alone, print the command list and exit 0', async () => {
    const [long, short, help] = await Promise.all([runCli(['--help']), runCli(['-h']), runCli(['help'])]);
    for (const r of [long, short, help]) {
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /^Usage: kube-svid-proxy <command> \[flags\]$/m);
      assert.match(r.stdout, /Run 'kube-svid-proxy help COMMAND'/);
    }
  });

  it('help with an unknown command exits 2 naming it', async () => {
    const [nosuch, nosub, flag] = await Promise.all([
      runCli(['help', 'nosuch']),
      runCli(['help', 'api', 'nosuch']),
      runCli(['nosuch', '--help']),
    ]);
    assert.equal(nosuch.status, 2);
    assert.equal(nosuch.stdout, '');
    assert.match(nosuch.stderr, /unknown command "nosuch"/);
    assert.equal(nosub.status, 2);
    assert.match(nosub.stderr, /unknown command "api nosuch"/);
    assert.equal(flag.status, 2);
    assert.match(flag.stderr, /unknown command "nosuch"/);
  });

  it('a --help among other flags prints help and exits 0 without doing the work', async () => {
    const missing = join(dir, 'nonexistent');
    const written = join(dir, 'written');
    const runs = await Promise.all([
      runCli(['serve', '--config', missing, '--help']),
      runCli(['agent', '-h', '--config', missing, '--log-level', 'loud']),
      runCli(['svid', 'verify', missing, '--bundle', `example.org=${missing}`, '--help']),
      runCli(['api', 'fetch', 'x509', '--socket', `unix://${missing}`, '--write', written, '--help']),
      runCli(['credential', 'kubeconfig', '--server', 'http://not-tls', '-h']),
      runCli(['policy', 'check', missing, '--help']),
      runCli(['serve', '--bogus', '--help']),
    ]);
    const paths = [
      'serve',
      'agent',
      'svid verify',
      'api fetch x509',
      'credential kubeconfig',
      'policy check',
      'serve',
    ];
    runs.forEach((r, i) => {
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stderr, '');
      assert.match(r.stdout, new RegExp(`^Usage: kube-svid-proxy ${literal(paths[i] ?? '')} `));
    });
    assert.equal(existsSync(written), false);
  });

  it('--help after -- is an argument, not a request for help', async () => {
    const r = await runCli(['policy', 'check', '--', '--help']);
    assert.equal(r.status, 1, r.stderr);
    assert.doesNotMatch(r.stdout, /Usage:/);
  });

  it('unknown flags exit 2 and point at the help of the command they were given to', async () => {
    const [serve, jwt, rbac, unknown] = await Promise.all([
      runCli(['serve', '--bogus']),
      runCli(['api', 'fetch', 'jwt', '--audience', 'a', '--bogus']),
      runCli(['policy', 'rbac', 'policy.yaml', '--bogus']),
      runCli(['frobnicate']),
    ]);
    for (const r of [serve, jwt, rbac, unknown]) assert.equal(r.status, 2, r.stderr);
    assert.match(serve.stderr, /'--bogus'[\s\S]*Run 'kube-svid-proxy serve --help' for usage\./);
    assert.match(jwt.stderr, /Run 'kube-svid-proxy api fetch jwt --help' for usage\./);
    assert.match(rbac.stderr, /Run 'kube-svid-proxy policy rbac --help' for usage\./);
    assert.match(unknown.stderr, /unknown command "frobnicate"\nRun 'kube-svid-proxy help' for usage\./);
  });
});
