import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { prepareHost } from './node/setup.ts';
import { peer, peersRequired } from './peers/peers.ts';

const run = promisify(execFile);

async function kubectlMissing(): Promise<string | false> {
  try {
    await run('kubectl', ['version', '--client']);
    return false;
  } catch (err) {
    const reason = `kubectl is not on PATH (${(err as Error).message.split('\n')[0]})`;
    if (peersRequired()) throw new Error(reason);
    return `${reason}; set KSP_REQUIRE_PEERS=1 to make this a failure`;
  }
}

/**
 * Why an e2e suite must skip (Go absent, so no control plane; or no kubectl), or false to run it. Building the
 * peers happens here, on first use. Under KSP_REQUIRE_PEERS=1 a missing peer throws instead: CI fails.
 */
export async function e2eSkip(): Promise<string | false> {
  const etcd = peer('etcd');
  if ('skip' in etcd) return etcd.skip;
  const apiserver = peer('kube-apiserver');
  if ('skip' in apiserver) return apiserver.skip;
  return kubectlMissing();
}

/**
 * Why the real-node suites must skip, or false to run them: what e2eSkip() checks, the node's peers (kubelet,
 * kube-controller-manager, kube-scheduler, pause: built here on first use), and the host (root, Linux, Debian's
 * containerd, runc, CNI plugins and busybox-static, which dev/node/setup.ts installs when missing). Under
 * KSP_REQUIRE_PEERS=1 every reason is a failure instead.
 */
export async function nodeSkip(log?: (line: string) => void): Promise<string | false> {
  const e2e = await e2eSkip();
  if (e2e !== false) return e2e;
  for (const name of ['kubelet', 'kube-controller-manager', 'kube-scheduler', 'pause'] as const) {
    const found = peer(name);
    if ('skip' in found) return found.skip;
  }
  return prepareHost(log);
}
