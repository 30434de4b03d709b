/**
 * K8sAttestor against recorded cgroup and mountinfo samples (fixtures/) in a fake /proc tree, and a STAND-IN
 * kubelet: a real node:https server on 127.0.0.1 with a self-signed test CA, which checks the bearer token and
 * serves a recorded PodList (fixtures/pods.json) on GET /pods. It is not a kubelet; it only answers the one
 * request the attestor makes, the way a kubelet does.
 */
// Must stay first: @peculiar/x509 (via tsyringe) refuses to load without a Reflect metadata polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, beforeEach, describe, it } from 'node:test';
import * as x509 from '@peculiar/x509';
import { DAY, makeCa, makeLeaf } from '../../../../dev/certs.ts';
import {
  locateContainer,
  parseCgroupPaths,
  parseMountinfoCgroupRoots,
} from '../../../../src/agent/attestors/containerid.ts';
import { K8sAttestor, type K8sAttestorOptions } from '../../../../src/agent/attestors/k8s.ts';
import { AgentErrorCode, isAgentError } from '../../../../src/agent/errors.ts';
import { formatSelector, type Selector } from '../../../../src/agent/selectors.ts';

const FIXTURES = join(import.meta.dirname, 'fixtures');
const fixture = (name: string): string => readFileSync(join(FIXTURES, name), 'utf8');

const POD_A = '2c48913c-b29f-11e7-9350-020968147796';
const APP = '9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961';
const INIT = '34a2062fd26c805aa8cf814cdfe479322b791f80afb9ea4db02d50375df14b41';
const POD_B = '72f7f152-440c-46ac-9084-e0fc1d8a910c';
const MAIN = 'b2a102854b4969b2ce98dc329c86b4fb2b06e4ad2cc8da9d8a7578c9cd2004a2';
const WORKER = '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef';
const POD_C = 'a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80';
const CRIO = '09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6';
const POD_D = 'd488cae9-b2a0-11e7-9350-020968147796';
const DOCKER = '8d461fa5765781bcf5f7eb192f101bc3103d4b932e26236f43feecfa20664f96';

/** pid → [cgroup fixture, mountinfo fixture] for the fake /proc. */
const PROCESSES: Record<number, readonly [string, string]> = {
  101: ['cgroup-v1-cgroupfs.txt', 'mountinfo-host.txt'],
  102: ['cgroup-v1-cgroupfs-init.txt', 'mountinfo-host.txt'],
  103: ['cgroup-v1-systemd-containerd.txt', 'mountinfo-host.txt'],
  104: ['cgroup-v2-systemd-containerd.txt', 'mountinfo-host.txt'],
  105: ['cgroup-v2-crio.txt', 'mountinfo-host.txt'],
  106: ['cgroup-v1-systemd-docker.txt', 'mountinfo-host.txt'],
  107: ['cgroup-v1-kind.txt', 'mountinfo-host.txt'],
  108: ['cgroup-v2-namespaced.txt', 'mountinfo-v2-namespaced.txt'],
  109: ['cgroup-v2-ephemeral.txt', 'mountinfo-host.txt'],
  201: ['cgroup-host-v1.txt', 'mountinfo-host.txt'],
  202: ['cgroup-host-v2.txt', 'mountinfo-host.txt'],
};

const caller = (pid: number) => ({ pid, uid: 1000, gid: 1000 });
const strings = (selectors: Selector[]): string[] => selectors.map(formatSelector);
const isKubeletError = (err: unknown): boolean => isAgentError(err, AgentErrorCode.Kubelet);

/** What the stand-in kubelet does on the next requests. */
interface StandIn {
  token: string;
  requests: number;
  lastAuthorization: string | undefined;
  /** Body for the n-th (1-based) authorised request. */
  body: (n: number) => string;
}

describe('K8sAttestor', () => {
  let dir: string;
  let procRoot: string;
  let tokenPath: string;
  let caPem: string;
  let otherCaPem: string;
  let server: Server;
  let kubeletUrl: string;
  const podList = fixture('pods.json');
  const standIn: StandIn = { token: '', requests: 0, lastAuthorization: undefined, body: () => podList };

  const setToken = (token: string): void => {
    standIn.token = token;
    writeFileSync(tokenPath, `${token}\n`);
  };

  const attestor = (options: Partial<K8sAttestorOptions> = {}): K8sAttestor =>
    new K8sAttestor({
      procRoot,
      nodeName: 'node-1',
      kubeletUrl,
      tokenPath,
      kubeletCa: caPem,
      pollIntervalMs: 1,
      maxPollAttempts: 5,
      ...options,
    });

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-k8s-'));
    procRoot = join(dir, 'proc');
    for (const [pid, [cgroup, mountinfo]] of Object.entries(PROCESSES)) {
      mkdirSync(join(procRoot, pid), { recursive: true });
      writeFileSync(join(procRoot, pid, 'cgroup'), fixture(cgroup));
      writeFileSync(join(procRoot, pid, 'mountinfo'), fixture(mountinfo));
    }
    tokenPath = join(dir, 'token');

    const notBefore = new Date(Date.now() - DAY);
    const notAfter = new Date(Date.now() + DAY);
    const ca = await makeCa({ subject: 'CN=stand-in kubelet CA', notBefore, notAfter });
    const otherCa = await makeCa({ subject: 'CN=some other CA', notBefore, notAfter });
    // Like a kubelet serving certificate: issued for the node name.
    const leaf = await makeLeaf({
      subject: 'CN=system:node:node-1',
      issuer: ca,
      notBefore,
      notAfter,
      extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'dns', value: 'node-1' }], false)],
    });
    caPem = ca.node.toString();
    otherCaPem = otherCa.node.toString();

    server = createServer({ cert: leaf.node.toString(), key: leaf.keyPem }, (req, res) => {
      standIn.lastAuthorization = req.headers.authorization;
      if (req.method !== 'GET' || req.url !== '/pods') {
        res.writeHead(404).end('404 page not found');
        return;
      }
      if (req.headers.authorization !== `Bearer ${standIn.token}`) {
        // Echo what was sent, so the test can check the attestor keeps it out of its error message.
        res
          .writeHead(401, { 'content-type': 'text/plain' })
          .end(`Unauthorized: ${req.headers.authorization}`);
        return;
      }
      standIn.requests++;
      res.writeHead(200, { 'content-type': 'application/json' }).end(standIn.body(standIn.requests));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    kubeletUrl = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  beforeEach(() => {
    setToken('token-one');
    standIn.requests = 0;
    standIn.body = () => podList;
  });

  after(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    rmSync(dir, { recursive: true, force: true });
  });

  it('emits the full selector set for a container of a pod (cgroup v1, cgroupfs driver)', async () => {
    const selectors = await attestor().attest(caller(101));
    assert.ok(selectors.every((s) => s.type === 'k8s'));
    assert.deepEqual(strings(selectors), [
      'k8s:container-image:registry.example.com/shop/web:2.3.1',
      'k8s:container-image:registry.example.com/shop/web@sha256:2222222222222222222222222222222222222222222222222222222222222222',
      'k8s:container-name:app',
      'k8s:node-name:node-1',
      'k8s:ns:shop',
      'k8s:pod-image-count:2',
      'k8s:pod-image:docker.io/envoyproxy/envoy:v1.30.2',
      'k8s:pod-image:docker.io/envoyproxy/envoy@sha256:3333333333333333333333333333333333333333333333333333333333333333',
      'k8s:pod-image:registry.example.com/shop/web:2.3.1',
      'k8s:pod-image:registry.example.com/shop/web@sha256:2222222222222222222222222222222222222222222222222222222222222222',
      'k8s:pod-init-image-count:1',
      'k8s:pod-init-image:registry.example.com/shop/migrate:2.3.1',
      'k8s:pod-init-image:registry.example.com/shop/migrate@sha256:1111111111111111111111111111111111111111111111111111111111111111',
      'k8s:pod-label:app.kubernetes.io/part-of:shop',
      'k8s:pod-label:app:web',
      'k8s:pod-label:pod-template-hash:7d4b9c6f8',
      'k8s:pod-name:web-7d4b9c6f8-x2x9q',
      'k8s:pod-owner-uid:ReplicaSet:5d0a3a8e-6f64-4f0e-a1d4-3a3c1e5b9e10',
      'k8s:pod-owner:ReplicaSet:web-7d4b9c6f8',
      `k8s:pod-uid:${POD_A}`,
      'k8s:sa:web',
    ]);
    assert.equal(standIn.lastAuthorization, 'Bearer token-one');
  });

  it('finds an init container', async () => {
    const selectors = strings(await attestor().attest(caller(102)));
    assert.ok(selectors.includes('k8s:container-name:migrate'));
    assert.ok(selectors.includes('k8s:container-image:registry.example.com/shop/migrate:2.3.1'));
    assert.ok(selectors.includes(`k8s:pod-uid:${POD_A}`));
  });

  it('finds an ephemeral (debug) container', async () => {
    const selectors = strings(await attestor().attest(caller(109)));
    assert.ok(selectors.includes('k8s:container-name:debugger-7xq2p'));
    assert.ok(selectors.includes('k8s:container-image:docker.io/library/busybox:1.36'));
    assert.ok(!selectors.includes('k8s:pod-image:docker.io/library/busybox:1.36'));
  });

  it('finds the same container through the systemd driver (cri-containerd scope, underscored pod UID)', async () => {
    const selectors = strings(await attestor().attest(caller(103)));
    assert.ok(selectors.includes('k8s:container-name:app'));
    assert.ok(selectors.includes(`k8s:pod-uid:${POD_A}`));
  });

  it('finds a container on the unified cgroup v2 hierarchy', async () => {
    const selectors = strings(await attestor().attest(caller(104)));
    assert.ok(selectors.includes('k8s:container-name:main'));
    assert.ok(selectors.includes('k8s:ns:jobs'));
    assert.ok(selectors.includes('k8s:sa:batch'));
    assert.ok(selectors.includes(`k8s:pod-uid:${POD_B}`));
    assert.ok(!selectors.some((s) => s.startsWith('k8s:pod-owner')));
  });

  it('finds a cri-o container (cri-o:// container ID)', async () => {
    const selectors = strings(await attestor().attest(caller(105)));
    assert.ok(selectors.includes('k8s:container-name:redis'));
    assert.ok(selectors.includes('k8s:pod-owner:StatefulSet:cache'));
    assert.ok(selectors.includes(`k8s:pod-uid:${POD_C}`));
  });

  it('finds a docker container (docker:// container ID), listing an image equal to its ID once', async () => {
    const selectors = strings(await attestor().attest(caller(106)));
    assert.ok(selectors.includes('k8s:container-name:legacy'));
    assert.ok(selectors.includes(`k8s:pod-uid:${POD_D}`));
    assert.deepEqual(
      selectors.filter((s) => s.startsWith('k8s:container-image:')),
      ['k8s:container-image:legacy:latest'],
    );
  });

  it('prefers the cgroup lines naming a pod over the node container (kind)', async () => {
    const selectors = strings(await attestor().attest(caller(107)));
    assert.ok(selectors.includes('k8s:container-name:app'));
  });

  it('falls back to the cgroup mount root in mountinfo when the cgroup namespace hides the path', async () => {
    const selectors = strings(await attestor().attest(caller(108)));
    assert.ok(selectors.includes('k8s:container-name:worker'));
    assert.ok(selectors.includes(`k8s:pod-uid:${POD_B}`));
  });

  it('returns no selectors for a host process, without asking the kubelet', async () => {
    assert.deepEqual(await attestor().attest(caller(201)), []);
    assert.deepEqual(await attestor().attest(caller(202)), []);
    assert.equal(standIn.requests, 0);
  });

  it('re-reads the token file for every request', async () => {
    const k8s = attestor();
    await k8s.attest(caller(101));
    assert.equal(standIn.lastAuthorization, 'Bearer token-one');
    setToken('token-two');
    const selectors = strings(await k8s.attest(caller(101)));
    assert.equal(standIn.lastAuthorization, 'Bearer token-two');
    assert.ok(selectors.includes('k8s:container-name:app'));
  });

  it('fails with ERR_AGENT_KUBELET on a rejected token, and keeps the token out of the message', async () => {
    const secret = 'eyJhbGciOiJSUzI1NiJ9.super-secret-token-text';
    writeFileSync(tokenPath, secret);
    await assert.rejects(attestor().attest(caller(101)), (err: unknown) => {
      assert.ok(isKubeletError(err));
      const message = (err as Error).message;
      assert.match(message, /401/);
      assert.ok(!message.includes(secret), `the token leaked into: ${message}`);
      assert.ok(!message.includes('super-secret'), `part of the token leaked into: ${message}`);
      return true;
    });
  });

  it('keeps asking until the kubelet lists the container (here on the 3rd request)', async () => {
    standIn.body = (n) => (n < 3 ? JSON.stringify({ kind: 'PodList', items: [] }) : podList);
    const selectors = strings(await attestor({ maxPollAttempts: 10 }).attest(caller(101)));
    assert.ok(selectors.includes('k8s:container-name:app'));
    assert.equal(standIn.requests, 3);
  });

  it('fails with ERR_AGENT_KUBELET when the container never shows up', async () => {
    standIn.body = () => JSON.stringify({ kind: 'PodList', items: [] });
    await assert.rejects(attestor({ maxPollAttempts: 4 }).attest(caller(101)), (err: unknown) => {
      assert.ok(isKubeletError(err));
      assert.match((err as Error).message, new RegExp(APP));
      assert.match((err as Error).message, /4 attempt/);
      return true;
    });
    assert.equal(standIn.requests, 4);
  });

  it('stops polling when the signal aborts', async () => {
    const controller = new AbortController();
    standIn.body = (n) => {
      if (n === 2) {
        controller.abort();
      }
      return JSON.stringify({ kind: 'PodList', items: [] });
    };
    await assert.rejects(
      attestor({ maxPollAttempts: 1000 }).attest(caller(101), controller.signal),
      isKubeletError,
    );
    assert.ok(standIn.requests <= 3);
  });

  it('fails with ERR_AGENT_KUBELET when the kubelet certificate does not chain to the CA', async () => {
    await assert.rejects(attestor({ kubeletCa: otherCaPem }).attest(caller(101)), (err: unknown) => {
      assert.ok(isKubeletError(err));
      assert.match((err as Error).message, /request failed/);
      return true;
    });
  });

  it('fails with ERR_AGENT_KUBELET when the kubelet certificate names another node', async () => {
    await assert.rejects(attestor({ nodeName: 'node-2' }).attest(caller(101)), isKubeletError);
  });

  it('connects without verification only when told to', async () => {
    const selectors = strings(
      await attestor({ kubeletCa: otherCaPem, skipKubeletVerification: true }).attest(caller(101)),
    );
    assert.ok(selectors.includes('k8s:container-name:app'));
  });

  it('reads the CA from caPath when no PEM is given', async () => {
    const caPath = join(dir, 'ca.crt');
    writeFileSync(caPath, caPem);
    const selectors = strings(await attestor({ kubeletCa: undefined, caPath }).attest(caller(101)));
    assert.ok(selectors.includes('k8s:container-name:app'));
  });

  it('fails with ERR_AGENT_KUBELET on a non-JSON answer', async () => {
    standIn.body = () => '<html>not json</html>';
    await assert.rejects(attestor().attest(caller(101)), isKubeletError);
  });

  it('fails with ERR_AGENT_KUBELET when the kubelet is unreachable', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as AddressInfo).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    await assert.rejects(
      attestor({ kubeletUrl: `https://127.0.0.1:${port}` }).attest(caller(101)),
      isKubeletError,
    );
  });

  it('fails with ERR_AGENT_ATTESTATION when the process is gone', async () => {
    await assert.rejects(attestor().attest(caller(999)), (err: unknown) =>
      isAgentError(err, AgentErrorCode.Attestation),
    );
  });

  it('reuses the pod list within cacheTtlMs', async () => {
    const k8s = attestor({ cacheTtlMs: 60_000 });
    await k8s.attest(caller(101));
    await k8s.attest(caller(104));
    assert.equal(standIn.requests, 1);
  });
});

describe('locating the container in cgroup paths', () => {
  const locate = (cgroup: string, mountinfo = '') =>
    locateContainer(parseCgroupPaths(cgroup)) ?? locateContainer(parseMountinfoCgroupRoots(mountinfo));

  it('reads each recorded sample', () => {
    const cases: ReadonlyArray<readonly [string, string, string | undefined]> = [
      ['cgroup-v1-cgroupfs.txt', APP, POD_A],
      ['cgroup-v1-cgroupfs-init.txt', INIT, POD_A],
      ['cgroup-v1-systemd-containerd.txt', APP, POD_A],
      ['cgroup-v2-systemd-containerd.txt', MAIN, POD_B],
      ['cgroup-v2-crio.txt', CRIO, POD_C],
      ['cgroup-v1-systemd-docker.txt', DOCKER, POD_D],
      ['cgroup-v1-kind.txt', APP, POD_A],
    ];
    for (const [name, containerId, podUid] of cases) {
      assert.deepEqual(locate(fixture(name)), { containerId, podUid }, name);
    }
    assert.deepEqual(locate(fixture('cgroup-v2-namespaced.txt'), fixture('mountinfo-v2-namespaced.txt')), {
      containerId: WORKER,
      podUid: POD_B,
    });
    assert.equal(locate(fixture('cgroup-host-v1.txt'), fixture('mountinfo-host.txt')), undefined);
    assert.equal(locate(fixture('cgroup-host-v2.txt'), fixture('mountinfo-host.txt')), undefined);
  });

  it('reads the colon-separated systemd form and paths seen from inside a cgroup namespace', () => {
    assert.deepEqual(
      locate(`0::/kubepods-besteffort-pod${POD_B.replaceAll('-', '_')}.slice:cri-containerd:${MAIN}\n`),
      { containerId: MAIN, podUid: POD_B },
    );
    assert.deepEqual(locate(`0::/../crio-${CRIO}.scope\n`), { containerId: CRIO });
    assert.deepEqual(locate(`0::/../../pod${POD_C}/${CRIO}\n`), { containerId: CRIO, podUid: POD_C });
  });

  it('does not take "kubepods" for a pod UID prefix', () => {
    assert.deepEqual(locate(`0::/kubepods${POD_A}/${APP}\n`), { containerId: APP });
  });

  it('refuses cgroups naming two different containers', () => {
    assert.throws(
      () => locate(`1:cpu:/kubepods/pod${POD_A}/${APP}\n2:memory:/kubepods/pod${POD_A}/${INIT}\n`),
      (err: unknown) => isAgentError(err, AgentErrorCode.Attestation),
    );
  });

  it('refuses cgroups naming two different pods', () => {
    assert.throws(
      () => locate(`1:cpu:/kubepods/pod${POD_A}/${APP}\n2:memory:/kubepods/pod${POD_B}/${APP}\n`),
      (err: unknown) => isAgentError(err, AgentErrorCode.Attestation),
    );
  });

  it('unescapes octal escapes in mount roots and ignores non-cgroup mounts', () => {
    const mountinfo = [
      `30 25 0:26 /a\\040b/pod${POD_A}/${APP} /sys/fs/cgroup ro shared:4 - cgroup2 cgroup rw`,
      `31 25 0:27 /pod${POD_B}/${MAIN} /data rw - ext4 /dev/sda1 rw`,
    ].join('\n');
    assert.deepEqual(parseMountinfoCgroupRoots(mountinfo), [`/a b/pod${POD_A}/${APP}`]);
  });
});
