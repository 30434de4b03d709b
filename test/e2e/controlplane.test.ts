/**
 * Smoke test of the end-to-end control plane (dev/controlplane.ts): real etcd and kube-apiserver, driven
 * with the real `kubectl` on PATH. Without Go (to build them) or kubectl the suite skips, saying why; with
 * KSP_REQUIRE_PEERS=1 (CI) a missing peer fails the run instead.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import {
  ADMIN_USER,
  type ControlPlane,
  type ControlPlaneUser,
  PROXY_USER,
  startControlPlane,
} from '../../dev/controlplane.ts';
import { e2eSkip } from '../../dev/skip.ts';

// Never execFileSync here: this process must stay responsive while kubectl runs.
const run = promisify(execFile);

const skip = await e2eSkip();

interface Failure {
  readonly stderr: string;
}

function isFailure(err: unknown): err is Failure {
  return typeof err === 'object' && err !== null && 'stderr' in err && typeof err.stderr === 'string';
}

describe('e2e control plane (etcd + kube-apiserver)', { skip }, () => {
  let cp: ControlPlane;

  function kubectl(user: ControlPlaneUser, ...args: string[]): Promise<{ stdout: string; stderr: string }> {
    return run('kubectl', [
      `--kubeconfig=${cp.kubeconfig(user)}`,
      `--cache-dir=${join(cp.dir, 'kubectl-cache')}`,
      ...args,
    ]);
  }

  before(async () => {
    cp = await startControlPlane();
  });

  after(async () => {
    await cp?.close();
  });

  it('serves HTTPS on loopback with the CA it hands out', () => {
    assert.match(cp.url, /^https:\/\/127\.0\.0\.1:\d+$/);
    assert.match(cp.caPem, /^-----BEGIN CERTIFICATE-----\n/);
    assert.notEqual(cp.adminToken, cp.proxyToken);
  });

  it('lists the bootstrap namespaces for the admin', async () => {
    const { stdout } = await kubectl('admin', 'get', 'namespaces', '-o', 'name');
    const names = stdout.trim().split('\n');
    assert.ok(names.includes('namespace/default'), stdout);
    assert.ok(names.includes('namespace/kube-system'), stdout);
  });

  it('authenticates the admin token as a system:masters user', async () => {
    const { stdout } = await kubectl('admin', 'auth', 'whoami', '-o', 'json');
    const review = JSON.parse(stdout) as { status: { userInfo: { username: string; groups: string[] } } };
    assert.equal(review.status.userInfo.username, ADMIN_USER);
    assert.ok(review.status.userInfo.groups.includes('system:masters'), stdout);
  });

  it('authenticates the proxy token as a user with no groups of its own', async () => {
    const { stdout } = await kubectl('proxy', 'auth', 'whoami', '-o', 'json');
    const review = JSON.parse(stdout) as { status: { userInfo: { username: string; groups: string[] } } };
    assert.equal(review.status.userInfo.username, PROXY_USER);
    assert.deepEqual(review.status.userInfo.groups, ['system:authenticated']);
  });

  it('enforces RBAC: the proxy user may not list namespaces until granted', async () => {
    await assert.rejects(kubectl('proxy', 'get', 'namespaces'), (err: unknown) => {
      assert.ok(isFailure(err));
      assert.match(
        err.stderr,
        new RegExp(`Forbidden.*User "${PROXY_USER}" cannot list resource "namespaces"`, 's'),
      );
      return true;
    });

    await kubectl(
      'admin',
      'create',
      'clusterrole',
      'e2e-list-namespaces',
      '--verb=list',
      '--resource=namespaces',
    );
    await kubectl(
      'admin',
      'create',
      'clusterrolebinding',
      'e2e-list-namespaces',
      '--clusterrole=e2e-list-namespaces',
      `--user=${PROXY_USER}`,
    );
    // The authorizer reads RBAC objects through an informer: give it a moment.
    for (let attempt = 0; ; attempt++) {
      try {
        const { stdout } = await kubectl('proxy', 'get', 'namespaces', '-o', 'name');
        assert.ok(stdout.includes('namespace/default'), stdout);
        break;
      } catch (err) {
        if (attempt >= 20) throw err;
        await sleep(250);
      }
    }
  });
});
