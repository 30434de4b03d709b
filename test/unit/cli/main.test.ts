import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { bundleJson, type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import { LocalCa } from '../../../src/agent/ca.ts';
import { TrustDomain } from '../../../src/spiffe/id.ts';
import { CLI, type CliResult, cliEnv, runCli } from '../../helpers/cli.ts';
import {
  derBundle,
  jwtBundlesResponse,
  type StandIn,
  startStandIn,
  svidResponse,
} from '../../helpers/workload-standin.ts';

const main = CLI;

type RunResult = CliResult;
const cleanEnv = cliEnv;

function run(...args: string[]): RunResult {
  const r = spawnSync(process.execPath, [main, ...args], { encoding: 'utf8', env: cleanEnv() });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs the CLI without blocking, so independent runs can go in parallel. */
const runAsync = (args: string[], env: NodeJS.ProcessEnv = cleanEnv()): Promise<RunResult> =>
  runCli(args, env);

const literal = (text: string): string => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('kube-svid-proxy CLI', () => {
  let dir: string;
  let pki: DevPki;
  const file = (name: string, content: string): string => {
    const path = join(dir, name);
    writeFileSync(path, content);
    return path;
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-cli-'));
    pki = await makeDevPki();
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('prints help and exits 0; with no command it prints help and exits 2', () => {
    const help = run('help');
    assert.equal(help.status, 0);
    assert.match(help.stdout, /svid verify/);
    assert.match(help.stdout, /^ {2}agent --config FILE/m);
    assert.match(help.stdout, /^ {2}api fetch x509/m);
    assert.equal(run().status, 2);
  });

  it('refuses serve without --config as a usage error, and a missing config file as a failure', () => {
    const bare = run('serve');
    assert.equal(bare.status, 2);
    assert.match(bare.stderr, /serve needs --config FILE/);
    const missing = run('serve', '--config', '/nonexistent/proxy.yaml');
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /ERR_PROXY_CONFIG: cannot read \/nonexistent\/proxy.yaml/);
  });

  it('client and writer need --config, and refuse a bad one naming the file, line and column', async () => {
    const bad = file(
      'client.yaml',
      'spokes:\n  - name: a\n    listen: 0.0.0.0:7443\n    server: https://x:1\n    trustDomain: x.org\n',
    );
    const badWriter = file('writer.yaml', 'kubernetes: { inCluster: true }\nsecrets: []\n');
    const [noConfig, invalid, invalidWriter, kubeconfig] = await Promise.all([
      runAsync(['client']),
      runAsync(['client', '--config', bad]),
      runAsync(['writer', '--config', badWriter]),
      runAsync(['client', 'kubeconfig', '--config', bad, '--spoke', 'a']),
    ]);
    assert.equal(noConfig.status, 2, noConfig.stderr);
    assert.match(noConfig.stderr, /client needs --config FILE/);
    assert.equal(invalid.status, 1, invalid.stderr);
    assert.match(
      invalid.stderr,
      new RegExp(`ERR_CLIENT_CONFIG: ${literal(bad)}:3:13: .*not a loopback address`),
    );
    assert.equal(invalidWriter.status, 1, invalidWriter.stderr);
    assert.match(invalidWriter.stderr, /ERR_WRITER_CONFIG: .*writer\.yaml:2:10: secrets is empty/);
    assert.equal(kubeconfig.status, 1);
    const good = file(
      'client-good.yaml',
      'spokes:\n  - name: a\n    listen: 127.0.0.1:7443\n    server: https://x:1\n    trustDomain: x.org\n',
    );
    const printed = await runAsync(['client', 'kubeconfig', '--config', good, '--spoke', 'a']);
    assert.equal(printed.status, 0, printed.stderr);
    assert.match(printed.stdout, /server: http:\/\/127\.0\.0\.1:7443/);
    assert.doesNotMatch(printed.stdout, /token|client-key|exec/);
  });

  it('refuses unknown commands and flags with usage errors (exit 2)', () => {
    assert.equal(run('frobnicate').status, 2);
    assert.equal(run('svid', 'verify', 'x', '--bogus').status, 2);
    assert.match(run('svid', 'verify', 'x', '--bundle', 'no-equals').stderr, /TRUST_DOMAIN=FILE/);
  });

  it('svid verify prints the SPIFFE ID of a good SVID, reading JSON and PEM bundles', () => {
    const hub = file('hub.json', bundleJson(pki.hub));
    const spoke = file('spoke.pem', pki.spoke.rootPem);
    const chain = file('client.pem', pki.good.clientSpoke.chainPem);
    const r = run(
      'svid',
      'verify',
      chain,
      '--bundle',
      `hub.example.org=${hub}`,
      '--bundle',
      `spoke.example.org=${spoke}`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^OK spiffe:\/\/spoke\.example\.org\/ns\/ops\/sa\/debugger$/m);
  });

  it('svid verify names the rule a bad SVID breaks and exits 1', () => {
    const hub = file('hub2.json', bundleJson(pki.hub));
    const spoke = file('spoke2.json', bundleJson(pki.spoke));
    const forged = file('forged.pem', pki.bad.forgedTrustDomain.chainPem);
    const r = run(
      'svid',
      'verify',
      forged,
      '--bundle',
      `hub.example.org=${hub}`,
      '--bundle',
      `spoke.example.org=${spoke}`,
    );
    assert.equal(r.status, 1);
    assert.match(r.stderr, /^REFUSED ERR_X509_WRONG_TRUST_DOMAIN/);
    const late = run(
      'svid',
      'verify',
      file('argocd.pem', pki.good.clientArgocd.chainPem),
      '--bundle',
      `hub.example.org=${hub}`,
      '--at',
      '2099-01-01T00:00:00Z',
    );
    assert.equal(late.status, 1);
    assert.match(late.stderr, /^REFUSED ERR_X509_EXPIRED/);
  });

  it('reports a missing file by name', () => {
    const r = run(
      'svid',
      'verify',
      join(dir, 'absent.pem'),
      '--bundle',
      `hub.example.org=${join(dir, 'absent.json')}`,
    );
    assert.equal(r.status, 1);
    assert.match(r.stderr, /ENOENT.*absent\.json/);
  });
});

describe('kube-svid-proxy agent: refusals before it starts', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-cli-agent-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('needs --config, refuses a missing or invalid config, and an unknown --log-level', async () => {
    const good = join(dir, 'good.yaml');
    writeFileSync(join(dir, 'entries.yaml'), 'entries: []\n');
    writeFileSync(
      good,
      'trustDomain: example.org\nentriesFile: entries.yaml\nstateDir: state\nsocketPath: s/agent.sock\n',
    );
    const bad = join(dir, 'bad.yaml');
    writeFileSync(bad, 'trustDomain: example.org\nentriesFile: entries.yaml\nbogus: 1\nlogLevel: loud\n');
    const missing = join(dir, 'missing.yaml');
    const [noConfig, absent, invalid, loud] = await Promise.all([
      runAsync(['agent']),
      runAsync(['agent', '--config', missing]),
      runAsync(['agent', '--config', bad]),
      runAsync(['agent', '--config', good, '--log-level', 'loud']),
    ]);

    // agent exists now: a usage error (2), not "not built yet" (3).
    assert.equal(noConfig.status, 2, noConfig.stderr);
    assert.doesNotMatch(noConfig.stderr, /not built yet/);
    assert.match(noConfig.stderr, /agent needs --config FILE/);
    assert.match(noConfig.stderr, /Run 'kube-svid-proxy agent --help' for usage/);

    assert.equal(absent.status, 1, absent.stderr);
    assert.match(absent.stderr, /ERR_AGENT_CONFIG/);
    assert.match(absent.stderr, new RegExp(literal(missing)));

    assert.equal(invalid.status, 1, invalid.stderr);
    assert.match(invalid.stderr, /ERR_AGENT_CONFIG/);
    assert.match(invalid.stderr, new RegExp(`${literal(bad)}:3:1: unknown key "bogus"`));
    assert.match(invalid.stderr, new RegExp(`^${literal(bad)}:4:11: logLevel "loud"`, 'm'));

    assert.equal(loud.status, 2, loud.stderr);
    assert.match(loud.stderr, /--log-level must be one of/);
    // Refused before anything was started.
    assert.equal(existsSync(join(dir, 's', 'agent.sock')), false);
  });
});

describe('kube-svid-proxy agent and api: a real agent in a child process', () => {
  const uid = process.getuid?.() ?? 0;
  const id = 'spiffe://example.org/cli/test';
  let dir: string;
  let socketPath: string;
  let address: string;
  let entriesFile: string;
  let agent: ChildProcess | undefined;
  let agentStdout = '';
  let agentStderr = '';
  let exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  const api = (args: string[], env: NodeJS.ProcessEnv = cleanEnv()): Promise<RunResult> =>
    runAsync(['api', ...args], env);

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-cli-agent-'));
    socketPath = join(dir, 'sock', 'agent.sock');
    address = `unix://${socketPath}`;
    entriesFile = join(dir, 'entries.yaml');
    writeFileSync(
      entriesFile,
      `entries:\n  - spiffeId: ${id}\n    selectors: ["unix:uid:${uid}"]\n    hint: cli\n`,
    );
    const config = join(dir, 'agent.yaml');
    writeFileSync(
      config,
      'trustDomain: example.org\nentriesFile: entries.yaml\nstateDir: state\nsocketPath: sock/agent.sock\nlogLevel: info\n',
    );
    const child = spawn(process.execPath, [main, 'agent', '--config', config], {
      env: cleanEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    agent = child;
    exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => resolve({ code, signal }));
    });
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      agentStdout += d;
    });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the agent did not start:\n${agentStderr}`)), 15_000);
      child.stderr.setEncoding('utf8').on('data', (d: string) => {
        agentStderr += d;
        if (agentStderr.includes('"msg":"agent started"')) {
          clearTimeout(timer);
          resolve();
        }
      });
      void exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`the agent exited (${code ?? signal}) before starting:\n${agentStderr}`));
      });
    });
  });

  after(async () => {
    if (agent && agent.exitCode === null && agent.signalCode === null) {
      agent.kill('SIGKILL');
      await exited;
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('api fetch x509 --socket prints the SPIFFE ID and validity', async () => {
    const r = await api(['fetch', 'x509', '--socket', address]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^received 1 X\.509-SVID\(s\)/);
    assert.match(r.stdout, new RegExp(`SPIFFE ID +${literal(id)}$`, 'm'));
    assert.match(r.stdout, /valid until +\d{4}-\d\d-\d\dT/);
    assert.match(r.stdout, /^bundle spiffe:\/\/example\.org$/m);
  });

  it('api fetch x509 --json --write (socket from SPIFFE_ENDPOINT_SOCKET) writes chain, key (0600), bundle', async () => {
    const out = join(dir, 'out');
    const r = await api(
      ['fetch', 'x509', '--json', '--write', out],
      cleanEnv({ SPIFFE_ENDPOINT_SOCKET: address }),
    );
    assert.equal(r.status, 0, r.stderr);
    const json = JSON.parse(r.stdout) as {
      svids: { spiffeId: string; hint: string; chainLength: number }[];
      bundles: Record<string, unknown>;
      written: string[];
    };
    assert.equal(json.svids.length, 1);
    assert.equal(json.svids[0]?.spiffeId, id);
    assert.equal(json.svids[0]?.hint, 'cli');
    assert.deepEqual(Object.keys(json.bundles), ['example.org']);
    const [pem, key, bundle] = ['svid.0.pem', 'svid.0.key', 'bundle.0.pem'].map((f) => join(out, f));
    assert.deepEqual([...json.written].sort(), [bundle, key, pem].sort());
    assert.equal(statSync(key as string).mode & 0o777, 0o600);
    assert.match(readFileSync(key as string, 'utf8'), /^-----BEGIN PRIVATE KEY-----/);
    const leaf = new X509Certificate(readFileSync(pem as string));
    const root = new X509Certificate(readFileSync(bundle as string));
    assert.match(leaf.subjectAltName ?? '', new RegExp(`URI:${literal(id)}`));
    assert.ok(leaf.verify(root.publicKey), 'the SVID is signed by the bundle');
    assert.equal(root.ca, true);
  });

  it('api fetch jwt mints a token for the audience; api validate jwt accepts it for that audience only', async () => {
    const fetched = await api(['fetch', 'jwt', '--socket', address, '--audience', 'a', '--json']);
    assert.equal(fetched.status, 0, fetched.stderr);
    const list = JSON.parse(fetched.stdout) as { spiffeId: string; audience: string[]; token: string }[];
    assert.equal(list.length, 1);
    assert.equal(list[0]?.spiffeId, id);
    assert.deepEqual(list[0]?.audience, ['a']);
    const token = list[0]?.token ?? '';
    const payload = JSON.parse(Buffer.from(token.split('.')[1] ?? '', 'base64url').toString('utf8')) as {
      sub: string;
      aud: string[] | string;
    };
    assert.equal(payload.sub, id);
    assert.deepEqual([payload.aud].flat(), ['a']);

    const [valid, wrongAudience] = await Promise.all([
      api(['validate', 'jwt', '--socket', address, '--audience', 'a', '--svid', token]),
      api(['validate', 'jwt', '--socket', address, '--audience', 'b', '--svid', token]),
    ]);
    assert.equal(valid.status, 0, valid.stderr);
    assert.match(valid.stdout, new RegExp(`^valid: ${literal(id)}$`, 'm'));
    assert.equal(wrongAudience.status, 1, wrongAudience.stdout);
    assert.match(wrongAudience.stderr, /INVALID_ARGUMENT/);
  });

  it('api fetch bundles --json prints the X.509 and JWT bundles by trust domain name', async () => {
    const r = await api(['fetch', 'bundles', '--socket', address, '--json']);
    assert.equal(r.status, 0, r.stderr);
    const json = JSON.parse(r.stdout) as {
      x509: Record<string, { x509Authorities: unknown[] }>;
      jwt: Record<string, { jwtAuthorities: string[] }>;
    };
    assert.deepEqual(Object.keys(json.x509), ['example.org']);
    assert.deepEqual(Object.keys(json.jwt), ['example.org']);
    assert.ok((json.x509['example.org']?.x509Authorities.length ?? 0) >= 1);
    assert.ok((json.jwt['example.org']?.jwtAuthorities.length ?? 0) >= 1);
  });

  it('refuses bad api usage with exit 2, and an unreachable socket with exit 1', async () => {
    const [noAudience, nonsense, tcp, unreachable] = await Promise.all([
      api(['fetch', 'jwt', '--socket', address]),
      api(['fetch', 'nonsense', '--socket', address]),
      api(['fetch', 'x509', '--socket', 'tcp://127.0.0.1:1']),
      api(['fetch', 'x509', '--socket', 'unix:///nonexistent/x.sock', '--timeout', '1s']),
    ]);
    assert.equal(noAudience.status, 2, noAudience.stderr);
    assert.match(noAudience.stderr, /needs --audience/);
    assert.equal(nonsense.status, 2, nonsense.stderr);
    assert.doesNotMatch(nonsense.stderr, /not built yet/);
    assert.match(nonsense.stderr, /unknown api subcommand "fetch nonsense"/);
    assert.equal(tcp.status, 2, tcp.stderr);
    assert.match(tcp.stderr, /only unix:\/\/\/path is supported/);
    assert.equal(unreachable.status, 1, unreachable.stderr);
    assert.match(unreachable.stderr, /DEADLINE_EXCEEDED|UNAVAILABLE/);
  });

  it('api fetch … | head: a reader that goes away ends the CLI quietly with status 0, no stack trace', async () => {
    const closedEarly = (args: string[]): Promise<RunResult> =>
      new Promise((resolve, reject) => {
        const child = spawn(process.execPath, [main, 'api', ...args], {
          env: cleanEnv(),
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        // The reader goes away before the CLI's first line: every write meets a closed pipe (EPIPE).
        child.stdout.destroy();
        let stderr = '';
        child.stderr.setEncoding('utf8').on('data', (d: string) => {
          stderr += d;
        });
        child.on('error', reject);
        child.on('close', (status) => resolve({ status, stdout: '', stderr }));
      });
    const runs = [
      ['fetch', 'x509', '--socket', address],
      ['fetch', 'bundles', '--socket', address, '--json'],
      ['fetch', 'jwt', '--socket', address, '--audience', 'a'],
    ];
    const results = await Promise.all(runs.map(closedEarly));
    for (const [i, r] of results.entries()) {
      assert.equal(r.status, 0, `${runs[i]?.join(' ')}: ${r.stderr}`);
      assert.equal(r.stderr, '', `${runs[i]?.join(' ')}`);
    }
  });

  it('follows an edit of the entries file: with no matching entry the caller gets PERMISSION_DENIED', async () => {
    const next = `${entriesFile}.next`;
    writeFileSync(next, `entries:\n  - spiffeId: ${id}\n    selectors: ["unix:uid:${uid + 1}"]\n`);
    renameSync(next, entriesFile);
    const deadline = Date.now() + 15_000;
    let last: RunResult | undefined;
    while (Date.now() < deadline) {
      last = await api(['fetch', 'x509', '--socket', address, '--timeout', '2s']);
      if (last.status !== 0) break;
      await sleep(200);
    }
    assert.equal(last?.status, 1, `the agent did not pick up the change: ${last?.stdout}`);
    assert.match(last?.stderr ?? '', /PERMISSION_DENIED/);
  });

  it('stops on SIGTERM with exit 0 and removes its socket', async () => {
    assert.ok(existsSync(socketPath));
    assert.ok(agent?.kill('SIGTERM'));
    const { code, signal } = await exited;
    assert.equal(signal, null);
    assert.equal(code, 0, agentStderr);
    assert.equal(existsSync(socketPath), false);
    assert.match(agentStderr, /"msg":"agent stopped"/);
  });

  it('never logs a private key or a JWT', () => {
    assert.match(agentStderr, /"msg":"registration entries reloaded"/);
    for (const text of [agentStderr, agentStdout]) {
      assert.doesNotMatch(text, /PRIVATE KEY/);
      assert.doesNotMatch(text, /eyJ/);
    }
  });
});

describe('kube-svid-proxy api against a stand-in Workload API (what the real agent never sends)', () => {
  const td = TrustDomain.parse('example.org');
  let dir: string;
  let ca: LocalCa;
  let other: LocalCa;
  let standIn: StandIn;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-cli-standin-'));
    ca = await LocalCa.create({ trustDomain: td });
    other = await LocalCa.create({ trustDomain: td });
    const forged = await svidResponse(other, 'forged', { bundle: derBundle(ca) });
    const jwk = (type: 'ec' | 'ed25519') =>
      (type === 'ec'
        ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
        : generateKeyPairSync('ed25519')
      ).publicKey.export({ format: 'jwk' });
    standIn = await startStandIn(join(dir, 'standin.sock'), {
      FetchX509SVID: (call) => call.write(forged),
      FetchX509Bundles: (call) => call.write({ crl: [], bundles: { 'spiffe://example.org': derBundle(ca) } }),
      FetchJWTBundles: (call) =>
        call.write(
          jwtBundlesResponse('spiffe://example.org', [
            { kid: 'good', ...jwk('ec') },
            { kid: 'okp', ...jwk('ed25519') },
          ]),
        ),
    });
  });
  after(async () => {
    await standIn?.stop();
    ca?.close();
    other?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('api fetch x509 refuses an SVID that does not chain to its bundle: exit 1, code and SPIFFE ID, nothing written', async () => {
    const out = join(dir, 'out');
    const r = await runAsync(['api', 'fetch', 'x509', '--socket', standIn.address, '--write', out]);
    assert.equal(r.status, 1, r.stdout);
    assert.match(
      r.stderr,
      /^kube-svid-proxy api: ERR_WORKLOAD_SVID_REFUSED: X\.509-SVID spiffe:\/\/example\.org\/forged refused: ERR_X509_UNTRUSTED: /,
    );
    assert.equal(r.stdout, '');
    assert.equal(existsSync(out), false);
  });

  it('api fetch bundles notes an ignored JWT bundle key on stderr and prints the rest', async () => {
    const r = await runAsync(['api', 'fetch', 'bundles', '--socket', standIn.address, '--json']);
    assert.equal(r.status, 0, r.stderr);
    const json = JSON.parse(r.stdout) as { jwt: Record<string, { jwtAuthorities: string[] }> };
    assert.deepEqual(json.jwt['example.org']?.jwtAuthorities, ['good']);
    assert.equal(
      r.stderr,
      'note: JWT bundle of example.org: keys[1] ignored: key type "OKP" cannot verify a JWT-SVID\n',
    );
  });
});
