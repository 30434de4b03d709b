/**
 * `kube-svid-proxy credential` (the client-go exec credential plugin) and `credential kubeconfig`, against a
 * REAL agent (local CA, unix attestor, real socket) running in this process; the CLI runs in child processes
 * started without blocking, so the agent keeps serving.
 */
// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { isAbsolute, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parse as parseYaml } from 'yaml';
import { refreshAt, requestedVersion } from '../../../src/cli/credential.ts';
import { entryFor, startTestAgent, type TestAgent, TRUST_DOMAIN } from '../../helpers/agent.ts';
import { CLI, type CliResult, cliEnv, runCli } from '../../helpers/cli.ts';

const uid = process.getuid?.() ?? 0;
const DEFAULT_ID = `spiffe://${TRUST_DOMAIN}/cli/credential`;
const KUBECTL_ID = `spiffe://${TRUST_DOMAIN}/cli/kubectl`;
const V1 = 'client.authentication.k8s.io/v1';
const V1BETA1 = 'client.authentication.k8s.io/v1beta1';

interface ExecCredential {
  apiVersion: string;
  kind: string;
  status: { expirationTimestamp: string; clientCertificateData: string; clientKeyData: string };
}

/** Splits a PEM chain into certificates, leaf first. */
function chainOf(pem: string): X509Certificate[] {
  return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----\n?/g) ?? []).map(
    (block) => new X509Certificate(block),
  );
}

/** Checks everything client-go and kube-apiserver will rely on; returns the leaf. */
function checkExecCredential(r: CliResult, apiVersion: string, id: string): X509Certificate {
  assert.equal(r.status, 0, r.stderr);
  assert.doesNotMatch(r.stderr, /PRIVATE KEY/, 'the key never goes to stderr');
  const cred = JSON.parse(r.stdout) as ExecCredential;
  assert.equal(cred.apiVersion, apiVersion);
  assert.equal(cred.kind, 'ExecCredential');
  const chain = chainOf(cred.status.clientCertificateData);
  assert.ok(chain.length >= 1);
  const leaf = chain[0] as X509Certificate;
  assert.equal(leaf.subjectAltName, `URI:${id}`);
  assert.match(cred.status.clientKeyData, /^-----BEGIN PRIVATE KEY-----\n/, 'PKCS#8 PEM');
  assert.ok(leaf.checkPrivateKey(createPrivateKey(cred.status.clientKeyData)), 'the key is the leaf’s');
  assert.match(cred.status.expirationTimestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/, 'RFC 3339, UTC');
  const expires = Date.parse(cred.status.expirationTimestamp);
  assert.ok(expires < leaf.validToDate.getTime(), 'expires before the certificate does');
  assert.ok(expires > Date.now() - 1000, 'and not in the past');
  return leaf;
}

/** Runs a command without blocking (the agent serves from this process). */
function runCommand(command: string, args: readonly string[], env: NodeJS.ProcessEnv): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

describe('kube-svid-proxy credential', () => {
  let agent: TestAgent;
  let denying: TestAgent;
  let dir: string;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-credential-'));
    [agent, denying] = await Promise.all([
      startTestAgent(
        `entries:\n${entryFor(uid, 'cli/credential')}${entryFor(uid, 'cli/kubectl', '    hint: kubectl\n')}`,
      ),
      // No entry for this process: every call is PermissionDenied.
      startTestAgent(`entries:\n${entryFor(uid + 4711, 'someone/else')}`),
    ]);
  });

  after(async () => {
    await Promise.all([agent?.close(), denying?.close()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('prints an ExecCredential (v1) with the SVID chain, its PKCS#8 key, and an expiry before notAfter', async () => {
    const r = await runCli(['credential', '--socket', agent.address]);
    const leaf = checkExecCredential(r, V1, DEFAULT_ID);
    const cred = JSON.parse(r.stdout) as ExecCredential;
    // The half-life point, to the second.
    const half = (leaf.validFromDate.getTime() + leaf.validToDate.getTime()) / 2;
    assert.ok(Math.abs(Date.parse(cred.status.expirationTimestamp) - half) < 1000);
  });

  it('takes the socket from SPIFFE_ENDPOINT_SOCKET and picks an SVID by --hint', async () => {
    const r = await runCli(
      ['credential', '--hint', 'kubectl'],
      cliEnv({ SPIFFE_ENDPOINT_SOCKET: agent.address }),
    );
    checkExecCredential(r, V1, KUBECTL_ID);
    const missing = await runCli(['credential', '--socket', agent.address, '--hint', 'nope']);
    assert.equal(missing.status, 1);
    assert.equal(missing.stdout, '');
    assert.match(missing.stderr, /no X\.509-SVID with hint "nope"/);
  });

  it('answers in v1beta1 when KUBERNETES_EXEC_INFO asks for it, and ignores "interactive"', async () => {
    const info = (apiVersion: string, interactive: boolean): string =>
      JSON.stringify({ kind: 'ExecCredential', apiVersion, spec: { interactive } });
    const [beta, v1] = await Promise.all([
      runCli(
        ['credential', '--socket', agent.address],
        cliEnv({ KUBERNETES_EXEC_INFO: info(V1BETA1, true) }),
      ),
      runCli(['credential', '--socket', agent.address], cliEnv({ KUBERNETES_EXEC_INFO: info(V1, false) })),
    ]);
    checkExecCredential(beta, V1BETA1, DEFAULT_ID);
    checkExecCredential(v1, V1, DEFAULT_ID);
  });

  it('refuses an ExecCredential version it does not speak', async () => {
    const r = await runCli(
      ['credential', '--socket', agent.address],
      cliEnv({ KUBERNETES_EXEC_INFO: '{"apiVersion":"client.authentication.k8s.io/v1alpha1"}' }),
    );
    assert.equal(r.status, 1);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, /v1alpha1/);
    assert.throws(() => requestedVersion('{'), /not JSON/);
    assert.equal(requestedVersion(undefined), V1);
    assert.equal(requestedVersion(''), V1);
  });

  it('exits 1 with PERMISSION_DENIED on stderr and nothing on stdout when the Workload API refuses', async () => {
    const r = await runCli(['credential', '--socket', denying.address]);
    assert.equal(r.status, 1);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, /^kube-svid-proxy credential: PERMISSION_DENIED/);
  });

  it('exits 1 with UNAVAILABLE or DEADLINE_EXCEEDED when nothing listens; bad flags exit 2', async () => {
    const [gone, positional, tcp, timeout] = await Promise.all([
      runCli(['credential', '--socket', `unix://${join(dir, 'nothing.sock')}`, '--timeout', '2s']),
      runCli(['credential', 'extra']),
      runCli(['credential', '--socket', 'tcp://127.0.0.1:8081']),
      runCli(['credential', '--timeout', 'soon']),
    ]);
    assert.equal(gone.status, 1, gone.stderr);
    assert.equal(gone.stdout, '');
    assert.match(gone.stderr, /UNAVAILABLE|DEADLINE_EXCEEDED/);
    for (const r of [positional, tcp, timeout]) {
      assert.equal(r.status, 2, r.stderr);
      assert.equal(r.stdout, '');
    }
  });

  it('refreshes at the half-life, or halfway through what is left past it, never at or after notAfter', async () => {
    const r = await runCli(['credential', '--socket', agent.address]);
    const leaf = checkExecCredential(r, V1, DEFAULT_ID);
    const from = leaf.validFromDate.getTime();
    const to = leaf.validToDate.getTime();
    const late = from + (to - from) * 0.9;
    const at = refreshAt(leaf, late).getTime();
    assert.ok(at > late - 1000 && at < to, 'past the half-life: between now and notAfter');
    assert.throws(() => refreshAt(leaf, to), /expired/);
  });

  it('kubeconfig prints a kubeconfig whose exec plugin yields a valid ExecCredential', async () => {
    const first = await runCli(['credential', '--socket', agent.address]);
    const caPem = (JSON.parse(first.stdout) as ExecCredential).status.clientCertificateData;
    const caFile = join(dir, 'ca.pem');
    writeFileSync(caFile, caPem);
    const r = await runCli([
      'credential',
      'kubeconfig',
      '--server',
      'https://spoke.example.org:8443',
      '--socket',
      agent.socketPath,
      '--hint',
      'kubectl',
      '--ca-file',
      caFile,
      '--name',
      'spoke',
    ]);
    assert.equal(r.status, 0, r.stderr);
    const config = parseYaml(r.stdout) as {
      apiVersion: string;
      kind: string;
      clusters: { name: string; cluster: Record<string, string> }[];
      users: {
        name: string;
        user: {
          exec: {
            apiVersion: string;
            command: string;
            args: string[];
            provideClusterInfo: boolean;
            interactiveMode: string;
          };
        };
      }[];
      contexts: { name: string; context: { cluster: string; user: string } }[];
      'current-context': string;
    };
    assert.equal(config.apiVersion, 'v1');
    assert.equal(config.kind, 'Config');
    assert.deepEqual(config.clusters, [
      {
        name: 'spoke',
        cluster: {
          server: 'https://spoke.example.org:8443',
          'certificate-authority-data': Buffer.from(caPem).toString('base64'),
        },
      },
    ]);
    assert.deepEqual(config.contexts, [{ name: 'spoke', context: { cluster: 'spoke', user: 'spoke' } }]);
    assert.equal(config['current-context'], 'spoke');
    const exec = config.users[0]?.user.exec;
    assert.ok(exec);
    assert.equal(config.users[0]?.name, 'spoke');
    assert.equal(exec.apiVersion, V1);
    assert.equal(exec.provideClusterInfo, false);
    assert.equal(exec.interactiveMode, 'Never');
    assert.equal(exec.command, process.execPath);
    assert.ok(isAbsolute(exec.command));
    // The bare path became a unix:// address.
    assert.deepEqual(exec.args, [CLI, 'credential', '--socket', agent.address, '--hint', 'kubectl']);

    // Run the plugin as client-go does: the kubeconfig's command and args, KUBERNETES_EXEC_INFO set.
    const env: NodeJS.ProcessEnv = cliEnv({
      KUBERNETES_EXEC_INFO: JSON.stringify({
        kind: 'ExecCredential',
        apiVersion: V1,
        spec: { interactive: false },
      }),
    });
    checkExecCredential(await runCommand(exec.command, exec.args, env), V1, KUBECTL_ID);
  });

  it('kubeconfig refuses a missing or non-https --server (exit 2) and an unreadable --ca-file (exit 1)', async () => {
    const [none, http, ca] = await Promise.all([
      runCli(['credential', 'kubeconfig']),
      runCli(['credential', 'kubeconfig', '--server', 'http://x:6443']),
      runCli(['credential', 'kubeconfig', '--server', 'https://x:6443', '--ca-file', join(dir, 'none.pem')]),
    ]);
    assert.equal(none.status, 2);
    assert.match(none.stderr, /needs --server/);
    assert.equal(http.status, 2);
    assert.match(http.stderr, /https/);
    assert.equal(ca.status, 1);
    assert.match(ca.stderr, /--ca-file .*none\.pem/);
    for (const r of [none, http, ca]) assert.equal(r.stdout, '');
  });
});
