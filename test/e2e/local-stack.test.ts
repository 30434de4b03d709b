/**
 * `npm start`'s local stack end to end: the agent, a real kube-apiserver and etcd, and the proxy; kubectl with the
 * printed kubeconfig, whose only credential is the exec plugin asking the agent for an SVID. Skips like the other
 * real-peer suites when Go (to build the control plane) or kubectl is missing.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { parse } from 'yaml';
import { e2eSkip } from '../../dev/skip.ts';
import { LOCAL_CLIENT_ID, LOCAL_USER, type LocalStack, startLocalStack } from '../../scripts/local-stack.ts';
import { silentLogger } from '../../src/observability/logger.ts';

const run = promisify(execFile);

const skip = await e2eSkip();

describe('npm start: the local stack', { skip }, () => {
  let dir: string;
  let stack: LocalStack;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-local-'));
    stack = await startLocalStack({ dir, logger: silentLogger() });
  });

  after(async () => {
    await stack?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('prints a kubeconfig with no stored credential: only the exec plugin', () => {
    const config = parse(readFileSync(stack.kubeconfig, 'utf8')) as {
      users: { user: Record<string, unknown> }[];
    };
    const user = config.users[0]?.user ?? {};
    assert.deepEqual(Object.keys(user), ['exec']);
    assert.doesNotMatch(readFileSync(stack.kubeconfig, 'utf8'), /PRIVATE KEY|token|client-key/i);
  });

  it('kubectl get ns works through the proxy, as the identity the SPIFFE ID maps to', async () => {
    const { stdout } = await run('kubectl', [`--kubeconfig=${stack.kubeconfig}`, 'get', 'ns', '-o', 'name']);
    assert.match(stdout, /namespace\/default/);
    const whoami = await run('kubectl', [`--kubeconfig=${stack.kubeconfig}`, 'auth', 'whoami', '-o', 'json']);
    const info = (
      JSON.parse(whoami.stdout) as {
        status: { userInfo: { username: string; extra: Record<string, string[]> } };
      }
    ).status.userInfo;
    assert.equal(info.username, LOCAL_USER);
    assert.deepEqual(info.extra['spiffe.io/id'], [LOCAL_CLIENT_ID]);
  });
});
