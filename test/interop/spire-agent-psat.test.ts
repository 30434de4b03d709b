/**
 * Our agent (issuer: spire) attesting with k8s_psat: a real SPIRE server whose k8s_psat node attestor reviews
 * the agent's projected service-account token against the suite's real kube-apiserver (TokenReview), then
 * serving a workload SVID of an entry parented to the agent ID the server derived (cluster and node UID). An
 * eviction makes the agent attest again by itself, with the token file re-read. Skips like the other real-peer
 * suites when Go (for the control plane and SPIRE) or kubectl is missing; CI turns a skip into a failure.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { pino } from 'pino';
import { type ControlPlane, startControlPlane } from '../../dev/controlplane.ts';
import { peer } from '../../dev/peers/peers.ts';
import { e2eSkip } from '../../dev/skip.ts';
import { type SpireServer, startSpireServer } from '../../dev/spire-server.ts';
import { AgentErrorCode } from '../../src/agent/errors.ts';
import { SpireAgent } from '../../src/agent/spire/agent.ts';
import { SpiffeBundle } from '../../src/spiffe/bundle.ts';
import { TrustDomain } from '../../src/spiffe/id.ts';
import { parseCertificates, verifyX509Svid } from '../../src/spiffe/x509svid.ts';

const run = promisify(execFile);
const uid = process.getuid?.() ?? 0;

const spireServerPeer = peer('spire-server');
const e2e = await e2eSkip();
const skip = 'skip' in spireServerPeer ? spireServerPeer.skip : e2e;

const TD = TrustDomain.parse('fleet.test');
const CLUSTER = 'spoke-1';
const NS = 'kube-svid-proxy';
const SA = 'agent';
const NODE = 'node-1';
const POD = 'agent-node-1';
const log = pino({ level: process.env.KSP_TEST_LOG ?? 'silent' });

async function waitFor<T>(
  what: string,
  check: () => Promise<T | undefined> | T | undefined,
  ms = 60_000,
): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value !== undefined) return value;
    } catch (err) {
      last = err;
    }
    await sleep(250);
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
}

describe('our agent attesting with k8s_psat to a real SPIRE server and kube-apiserver', {
  skip,
  timeout: 600_000,
}, () => {
  let dir: string;
  let cp: ControlPlane;
  let server: SpireServer;
  let agent: SpireAgent | undefined;
  let nodeUid: string;
  let podUid: string;
  const tokenFile = (): string => join(dir, 'token');

  function kubectl(...args: string[]): Promise<{ stdout: string; stderr: string }> {
    return run('kubectl', [`--kubeconfig=${cp.kubeconfig('admin')}`, ...args]);
  }

  /** A projected-style token: audience spire-server, bound to the agent's pod (as the kubelet would mount it). */
  async function writeToken(): Promise<void> {
    const { stdout } = await kubectl(
      'create',
      'token',
      SA,
      '-n',
      NS,
      '--audience=spire-server',
      '--duration=10m',
      '--bound-object-kind=Pod',
      `--bound-object-name=${POD}`,
      `--bound-object-uid=${podUid}`,
    );
    writeFileSync(tokenFile(), stdout.trim(), { mode: 0o600 });
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-spire-psat-'));
    mkdirSync(join(dir, 'server'));
    mkdirSync(join(dir, 'sock'), { mode: 0o755 });
    cp = await startControlPlane({ dir: join(dir, 'cp') });
    const objects = [
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS } },
      { apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: SA, namespace: NS } },
      { apiVersion: 'v1', kind: 'Node', metadata: { name: NODE } },
      {
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: POD, namespace: NS },
        spec: {
          nodeName: NODE,
          serviceAccountName: SA,
          automountServiceAccountToken: false,
          containers: [{ name: 'agent', image: 'kube-svid-proxy:dev' }],
        },
      },
    ];
    const manifest = join(dir, 'objects.json');
    writeFileSync(manifest, JSON.stringify({ apiVersion: 'v1', kind: 'List', items: objects }));
    await kubectl('apply', '-f', manifest);
    nodeUid = (await kubectl('get', 'node', NODE, '-o', 'jsonpath={.metadata.uid}')).stdout.trim();
    podUid = (await kubectl('get', 'pod', POD, '-n', NS, '-o', 'jsonpath={.metadata.uid}')).stdout.trim();
    assert.ok(nodeUid && podUid);
    server = await startSpireServer({
      binary: 'path' in spireServerPeer ? spireServerPeer.path : '',
      trustDomain: TD.name,
      dir: join(dir, 'server'),
      cacheReloadInterval: '1s',
      logLevel: 'INFO',
      nodeAttestors: {
        k8sPsat: {
          clusters: {
            [CLUSTER]: { serviceAccountAllowList: [`${NS}:${SA}`], kubeConfigFile: cp.kubeconfig('admin') },
          },
        },
      },
    });
    writeFileSync(join(dir, 'bootstrap.pem'), await server.bundleShow('pem'));
    await writeToken();
  });

  after(async () => {
    await agent?.close();
    await server?.stop();
    await cp?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('attests with the token the server reviews, and serves an entry parented to the derived agent ID', async () => {
    const agentId = `spiffe://${TD.name}/spire/agent/k8s_psat/${CLUSTER}/${nodeUid}`;
    const entryId = await server.createEntry({
      spiffeId: `spiffe://${TD.name}/kube-svid-proxy/${CLUSTER}`,
      parentId: agentId,
      selectors: [`unix:uid:${uid}`],
    });
    agent = await SpireAgent.start({
      trustDomain: TD,
      socketPath: join(dir, 'sock', 'agent.sock'),
      stateDir: join(dir, 'state'),
      spire: {
        serverAddress: { host: '127.0.0.1', port: server.serverPort },
        bootstrapBundle: join(dir, 'bootstrap.pem'),
        nodeAttestor: { type: 'k8s_psat', cluster: CLUSTER, tokenPath: tokenFile() },
        syncIntervalMs: 1000,
      },
      logger: log,
    });
    const a = agent;
    const svid = await waitFor('the entry SVID', () => a.upstream.x509For(entryId));
    assert.equal(a.upstream.status().agentId, agentId);
    const bundle = SpiffeBundle.parse(TD, await server.bundleShow('spiffe'));
    const verified = verifyX509Svid(parseCertificates(svid.chainDer), bundle);
    assert.equal(verified.id.toString(), `spiffe://${TD.name}/kube-svid-proxy/${CLUSTER}`);
  });

  it('attests again by itself, with a fresh token, after the server evicts it', async () => {
    const a = agent;
    assert.ok(a, 'the first test started the agent');
    const agentId = `spiffe://${TD.name}/spire/agent/k8s_psat/${CLUSTER}/${nodeUid}`;
    const before = a.upstream.status().agentExpiresAt;
    await writeToken();
    await server.evictAgent(agentId);
    await waitFor('a new agent SVID after the eviction', () => {
      const s = a.upstream.status();
      return s.agentExpiresAt &&
        before &&
        s.agentExpiresAt.getTime() !== before.getTime() &&
        s.consecutiveFailures === 0
        ? true
        : undefined;
    });
    assert.equal(a.upstream.status().agentId, agentId);
    assert.equal(a.readiness().ready, true);
  });

  it('refuses a token of a service account the server does not allow, naming the refusal', async () => {
    await kubectl('create', 'serviceaccount', 'intruder', '-n', NS);
    const { stdout } = await kubectl('create', 'token', 'intruder', '-n', NS, '--audience=spire-server');
    const file = join(dir, 'intruder-token');
    writeFileSync(file, stdout.trim(), { mode: 0o600 });
    const intruder = await SpireAgent.start({
      trustDomain: TD,
      socketPath: join(dir, 'sock', 'intruder.sock'),
      spire: {
        serverAddress: { host: '127.0.0.1', port: server.serverPort },
        bootstrapBundle: join(dir, 'bootstrap.pem'),
        nodeAttestor: { type: 'k8s_psat', cluster: CLUSTER, tokenPath: file },
        syncIntervalMs: 1000,
      },
      logger: log,
    });
    try {
      const error = await waitFor('a refused attestation', () => intruder.upstream.status().lastError);
      assert.equal(error.code, AgentErrorCode.UpstreamAuth, error.message);
      assert.equal(intruder.upstream.status().agentId, undefined);
      assert.equal(intruder.readiness().ready, false);
    } finally {
      await intruder.close();
    }
  });
});
