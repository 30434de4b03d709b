/**
 * Smoke test of the real single-node cluster (dev/node.ts): kubelet, containerd and runc, the controllers and
 * the scheduler around the suite's etcd and kube-apiserver, images built and imported locally. The node gets
 * Ready, a pod on the pod network runs and `kubectl exec` reaches it through kube-apiserver and the kubelet, a
 * static pod shows up as a mirror pod, and kube-apiserver accepts deploy/spoke in a server-side dry run.
 * Timings go to stderr; none is asserted. Skips like the other real-peer suites (no Go, no kubectl, not root,
 * packages not installable), and under KSP_REQUIRE_PEERS=1 fails instead.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { BUSYBOX_IMAGE, type Node, POD_CIDR, startNode } from '../../dev/node.ts';
import { nodeSkip } from '../../dev/skip.ts';

const REPO = join(import.meta.dirname, '..', '..');
const skip = await nodeSkip((line) => process.stderr.write(`[node.test] ${line}\n`));

function timing(what: string, since: number): void {
  process.stderr.write(`[node.test] ${what}: ${((Date.now() - since) / 1000).toFixed(1)} s\n`);
}

interface PodStatus {
  readonly metadata: { readonly name: string; readonly annotations?: Record<string, string> };
  readonly spec: { readonly nodeName?: string };
  readonly status: {
    readonly phase: string;
    readonly podIP?: string;
    readonly conditions?: readonly { type: string; status: string }[];
  };
}

describe('a real single-node cluster (dev/node.ts)', { skip, timeout: 600_000 }, () => {
  let node: Node;

  async function kubectlJson<T>(...args: string[]): Promise<T> {
    const { stdout } = await node.kubectl([...args, '-o', 'json']);
    return JSON.parse(stdout) as T;
  }

  /** Polls a pod until it is Ready (kubectl wait fails at once on a pod that does not exist yet). */
  async function podReady(namespace: string, name: string, timeoutMs = 60_000): Promise<PodStatus> {
    const deadline = Date.now() + timeoutMs;
    let last = 'not found';
    for (;;) {
      try {
        const pod = await kubectlJson<PodStatus>('get', 'pod', '-n', namespace, name);
        if (pod.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True')) return pod;
        last = `phase ${pod.status.phase}`;
      } catch (err) {
        last = (err as Error).message;
      }
      if (Date.now() > deadline)
        throw new Error(`pod ${namespace}/${name} not Ready after ${timeoutMs} ms: ${last}`);
      await sleep(250);
    }
  }

  before(async () => {
    const started = Date.now();
    node = await startNode();
    timing('bring-up (node Ready)', started);
    for (const [phase, ms] of Object.entries(node.timings))
      process.stderr.write(`[node.test]   ${phase}: ${(ms / 1000).toFixed(1)} s\n`);
  });

  after(async () => {
    const started = Date.now();
    // Throws if anything the node created on the host is left (processes, mounts, cgroups, the bridge, …).
    await node?.close();
    timing('teardown', started);
  });

  it('registers node 127.0.0.1, Ready, with the kubelet and runtime it was built with', async () => {
    const n = await kubectlJson<{
      status: {
        conditions: { type: string; status: string }[];
        addresses: { type: string; address: string }[];
        nodeInfo: { kubeletVersion: string; containerRuntimeVersion: string };
      };
    }>('get', 'node', node.nodeName);
    assert.equal(n.status.conditions.find((c) => c.type === 'Ready')?.status, 'True');
    assert.equal(n.status.nodeInfo.kubeletVersion, 'v1.33.13');
    assert.match(n.status.nodeInfo.containerRuntimeVersion, /^containerd:\/\//);
    assert.ok(
      n.status.addresses.some((a) => a.address === '127.0.0.1'),
      JSON.stringify(n.status.addresses),
    );
  });

  it('runs a busybox pod on the pod network and execs into it through kube-apiserver', async () => {
    const started = Date.now();
    await node.kubectl(['apply', '-f', '-'], {
      input: JSON.stringify({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'shell', namespace: 'default' },
        spec: {
          terminationGracePeriodSeconds: 1,
          containers: [
            { name: 'shell', image: BUSYBOX_IMAGE, imagePullPolicy: 'Never', command: ['sleep', '3600'] },
          ],
        },
      }),
    });
    const pod = await podReady('default', 'shell');
    timing('busybox pod Ready', started);
    assert.equal(pod.spec.nodeName, node.nodeName);
    const prefix = POD_CIDR.split('.').slice(0, 3).join('.');
    assert.ok(pod.status.podIP?.startsWith(`${prefix}.`), `pod IP ${pod.status.podIP} outside ${POD_CIDR}`);

    const execStarted = Date.now();
    const { stdout } = await node.kubectl([
      'exec',
      'shell',
      '--',
      'sh',
      '-c',
      'echo "hello from $(hostname)"',
    ]);
    assert.equal(stdout, 'hello from shell\n');
    // stdin too (kubectl exec -i streams it to the container).
    const echoed = await node.kubectl(['exec', '-i', 'shell', '--', 'cat'], { input: 'ping\n' });
    assert.equal(echoed.stdout, 'ping\n');
    timing('two kubectl exec', execStarted);
  });

  it('runs a manifest dropped in staticPodDir as a static pod with a mirror pod', async () => {
    const started = Date.now();
    writeFileSync(
      join(node.staticPodDir, 'static-sleeper.yaml'),
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'static-sleeper', namespace: 'default', labels: { test: 'static' } },
        spec: {
          terminationGracePeriodSeconds: 1,
          containers: [
            { name: 'sleep', image: BUSYBOX_IMAGE, imagePullPolicy: 'Never', command: ['sleep', '3600'] },
          ],
        },
      }),
    );
    const mirror = await podReady('default', `static-sleeper-${node.nodeName}`);
    timing('static pod Ready (mirror pod)', started);
    assert.equal(mirror.metadata.annotations?.['kubernetes.io/config.source'], 'file');
    assert.ok(mirror.metadata.annotations?.['kubernetes.io/config.mirror'], 'a mirror pod');
  });

  it('accepts deploy/spoke in a server-side dry run (namespace applied first)', async (t) => {
    // The namespace for real: a dry run cannot create the namespace the other objects go into.
    await node.kubectl(['apply', '-f', join(REPO, 'deploy', 'base', 'agent', 'namespace.yaml')]);
    const { stdout, stderr } = await node.kubectl([
      'apply',
      '--dry-run=server',
      '-k',
      join(REPO, 'deploy', 'spoke'),
    ]);
    t.diagnostic(`kube-apiserver says:\n${stdout}${stderr}`);
    for (const object of [
      'serviceaccount/kube-svid-proxy-agent',
      'serviceaccount/kube-svid-proxy',
      'clusterrole.rbac.authorization.k8s.io/kube-svid-proxy-agent',
      'clusterrolebinding.rbac.authorization.k8s.io/kube-svid-proxy-agent',
      'configmap/kube-svid-proxy-policy',
      'daemonset.apps/kube-svid-proxy-agent',
    ])
      assert.match(
        stdout,
        new RegExp(`^${object.replaceAll('.', '\\.')} created \\(server dry run\\)$`, 'm'),
      );
  });
});
