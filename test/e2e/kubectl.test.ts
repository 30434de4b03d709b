/**
 * End to end: the real `kubectl` through the proxy to a real kube-apiserver and etcd (dev/controlplane.ts),
 * with the client SVIDs of the dev PKI and no stored credential of the client's own. Everything RBAC decides is
 * decided by kube-apiserver for the mapped identity; the proxy only proves who the client is and forwards.
 * Skips like the other real-peer suites when Go (to build the control plane) or kubectl is missing.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import http2 from 'node:http2';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { promisify } from 'node:util';
import { stringify } from 'yaml';
import { type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { type ControlPlane, proxyRbac, startControlPlane } from '../../dev/controlplane.ts';
import { e2eSkip } from '../../dev/skip.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import {
  clientTls,
  memoryAudit,
  type ProxyFiles,
  proxyConfigYaml,
  writeProxyFiles,
} from '../helpers/proxy-fixture.ts';

const run = promisify(execFile);
const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const FLUX = 'spiffe://hub.example.org/ns/flux-system/sa/kustomize-controller';

const skip = await e2eSkip();

const POLICY = `rules:
  - name: argocd
    match:
      id: ${ARGOCD}
    identity:
      user: argocd
      groups: [gitops]
      extra:
        spiffe.io/id: ["{id}"]
    impersonate:
      serviceAccounts: [apps/deployer]
  - name: flux
    match:
      id: ${FLUX}
    identity:
      user: flux
`;

/** RBAC of the test cluster: what the proxy, the mapped users and the nested service account may do. */
const RBAC = [
  ...proxyRbac(),
  { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'apps' } },
  { apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'deployer', namespace: 'apps' } },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'Role',
    metadata: { name: 'argocd', namespace: 'apps' },
    rules: [
      {
        apiGroups: [''],
        resources: ['configmaps'],
        verbs: ['get', 'list', 'watch', 'create', 'patch', 'delete'],
      },
      { apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] },
      { apiGroups: [''], resources: ['pods/exec', 'pods/portforward'], verbs: ['get', 'create'] },
      {
        apiGroups: [''],
        resources: ['serviceaccounts'],
        verbs: ['impersonate'],
        resourceNames: ['deployer'],
      },
    ],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'RoleBinding',
    metadata: { name: 'argocd', namespace: 'apps' },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'argocd' },
    subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: 'argocd' }],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'Role',
    metadata: { name: 'deployer', namespace: 'apps' },
    rules: [{ apiGroups: [''], resources: ['secrets'], verbs: ['list'] }],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'RoleBinding',
    metadata: { name: 'deployer', namespace: 'apps' },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'deployer' },
    subjects: [{ kind: 'ServiceAccount', name: 'deployer', namespace: 'apps' }],
  },
  {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name: 'web', namespace: 'apps' },
    spec: { containers: [{ name: 'web', image: 'registry.invalid/web:1' }] },
  },
];

interface Failure {
  readonly stderr: string;
  readonly code?: number;
}

describe('kubectl through the proxy, against a real kube-apiserver', { skip, timeout: 600_000 }, () => {
  let cp: ControlPlane;
  let pki: DevPki;
  let files: ProxyFiles;
  let proxy: RunningProxy;
  const logs: string[] = [];
  const audit = memoryAudit();

  before(async () => {
    cp = await startControlPlane();
    pki = await makeDevPki();
    files = writeProxyFiles('ksp-e2e-', pki, {
      policy: POLICY,
      token: `${cp.proxyToken}\n`,
      upstreamCa: cp.caPem,
    });
    const rbac = files.write('rbac.yaml', RBAC.map((o) => stringify(o)).join('---\n'));
    await admin('apply', '-f', rbac);
    // No kubelet runs: mark the pod Running so kubectl port-forward tries (and kube-apiserver answers "no host").
    await admin(
      'patch',
      'pod',
      'web',
      '-n',
      'apps',
      '--subresource=status',
      '--type=merge',
      '-p',
      '{"status":{"phase":"Running"}}',
    );
    const logger = createLogger({ level: 'info', stream: { write: (line: string) => void logs.push(line) } });
    proxy = await startProxy(
      parseProxyConfig(proxyConfigYaml(files, { upstreamUrl: cp.url }), files.configFile),
      { logger, audit: audit.sink, defaultMetrics: false, probeIntervalMs: 60_000 },
    );
    for (const [who, identity] of [
      ['argocd', pki.good.clientArgocd],
      ['flux', pki.good.clientFlux],
    ] as const) {
      files.write(
        `${who}.kubeconfig`,
        stringify({
          apiVersion: 'v1',
          kind: 'Config',
          clusters: [
            {
              name: 'spoke',
              cluster: {
                server: `https://127.0.0.1:${proxy.port}`,
                'certificate-authority-data': Buffer.from(pki.spoke.rootPem).toString('base64'),
                'tls-server-name': 'localhost',
              },
            },
          ],
          users: [
            {
              name: who,
              user: {
                'client-certificate-data': Buffer.from(identity.chainPem).toString('base64'),
                'client-key-data': Buffer.from(identity.keyPem).toString('base64'),
              },
            },
          ],
          contexts: [{ name: who, context: { cluster: 'spoke', user: who } }],
          'current-context': who,
        }),
      );
    }
    // RBAC reaches the authorizer through an informer: wait until the proxy's user can review access.
    for (let i = 0; i < 50; i++) {
      try {
        await kubectl('argocd', 'get', 'configmaps', '-n', 'apps');
        break;
      } catch {
        await sleep(200);
      }
    }
  });

  after(async () => {
    await proxy?.close();
    await cp?.close();
    files?.remove();
  });

  function admin(...args: string[]): Promise<{ stdout: string; stderr: string }> {
    return run('kubectl', [`--kubeconfig=${cp.kubeconfig('admin')}`, ...args]);
  }

  function kubectl(who: 'argocd' | 'flux', ...args: string[]): Promise<{ stdout: string; stderr: string }> {
    return run('kubectl', [
      `--kubeconfig=${join(files.dir, `${who}.kubeconfig`)}`,
      `--cache-dir=${join(files.dir, 'cache')}`,
      ...args,
    ]);
  }

  async function refused(promise: Promise<unknown>, message: RegExp): Promise<void> {
    await assert.rejects(promise, (err: unknown) => {
      assert.match((err as Failure).stderr, message);
      return true;
    });
  }

  it('auth whoami shows the identity the policy maps the SPIFFE ID to', async () => {
    const { stdout } = await kubectl('argocd', 'auth', 'whoami', '-o', 'json');
    const info = (
      JSON.parse(stdout) as {
        status: { userInfo: { username: string; groups: string[]; extra: Record<string, string[]> } };
      }
    ).status.userInfo;
    assert.equal(info.username, 'argocd');
    assert.deepEqual(info.groups.sort(), ['gitops', 'system:authenticated']);
    assert.deepEqual(info.extra['spiffe.io/id'], [ARGOCD]);
  });

  it('get, create, apply --server-side and delete are allowed or forbidden exactly as RBAC says', async () => {
    await kubectl('argocd', 'create', 'configmap', 'e2e-a', '-n', 'apps', '--from-literal=k=v');
    const manifest = join(files.dir, 'cm.yaml');
    writeFileSync(
      manifest,
      stringify({
        apiVersion: 'v1',
        kind: 'ConfigMap',
        metadata: { name: 'e2e-b', namespace: 'apps' },
        data: { a: '1' },
      }),
    );
    await kubectl('argocd', 'apply', '--server-side', '--field-manager=e2e', '-f', manifest);
    const { stdout } = await kubectl('argocd', 'get', 'configmaps', '-n', 'apps', '-o', 'name');
    assert.match(stdout, /configmap\/e2e-a/);
    assert.match(stdout, /configmap\/e2e-b/);
    await kubectl('argocd', 'delete', 'configmap', 'e2e-a', '-n', 'apps');
    await refused(
      kubectl('argocd', 'get', 'secrets', '-n', 'apps'),
      /User "argocd" cannot list resource "secrets"/,
    );
    await refused(
      kubectl('argocd', 'create', 'configmap', 'x', '-n', 'default'),
      /User "argocd" cannot create/,
    );
    await refused(kubectl('argocd', 'get', 'namespaces'), /User "argocd" cannot list resource "namespaces"/);
    // flux is mapped, but RBAC grants "flux" nothing.
    await refused(kubectl('flux', 'get', 'configmaps', '-n', 'apps'), /User "flux" cannot list/);
  });

  it('get -w streams events as they happen', async () => {
    const watch = spawn('kubectl', [
      `--kubeconfig=${join(files.dir, 'argocd.kubeconfig')}`,
      'get',
      'configmaps',
      '-n',
      'apps',
      '-w',
      '-o',
      'name',
    ]);
    let out = '';
    let err = '';
    watch.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    const seen = (text: string): Promise<void> =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`no "${text}" from kubectl get -w; got: ${out}; stderr: ${err}`)),
          30_000,
        );
        const check = (): void => {
          if (out.includes(text)) {
            clearTimeout(timer);
            resolve();
          }
        };
        watch.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          check();
        });
        check();
      });
    try {
      await seen('configmap/e2e-b');
      await admin('create', 'configmap', 'e2e-watched', '-n', 'apps');
      await seen('configmap/e2e-watched');
      assert.equal(watch.exitCode, null, 'the watch is still running: events were streamed, not buffered');
    } finally {
      watch.kill();
    }
  });

  it('refuses auth can-i --as unless the policy allows that nested impersonation, which then kube-apiserver checks', async () => {
    await refused(
      kubectl('argocd', 'auth', 'can-i', 'list', 'secrets', '-n', 'apps', '--as=system:admin'),
      /ERR_POLICY_NESTED_IMPERSONATION|Forbidden/,
    );
    await refused(
      kubectl(
        'flux',
        'auth',
        'can-i',
        'list',
        'secrets',
        '-n',
        'apps',
        '--as=system:serviceaccount:apps:deployer',
      ),
      /ERR_POLICY_NESTED_IMPERSONATION|Forbidden/,
    );
    const allowed = await kubectl(
      'argocd',
      'auth',
      'can-i',
      'list',
      'secrets',
      '-n',
      'apps',
      '--as=system:serviceaccount:apps:deployer',
    );
    assert.equal(allowed.stdout.trim(), 'yes', 'the nested identity (the service account) may list secrets');
    const { stdout } = await kubectl(
      'argocd',
      'auth',
      'whoami',
      '-o',
      'json',
      '--as=system:serviceaccount:apps:deployer',
    );
    const info = (
      JSON.parse(stdout) as { status: { userInfo: { username: string; extra: Record<string, string[]> } } }
    ).status.userInfo;
    assert.equal(info.username, 'system:serviceaccount:apps:deployer');
    assert.deepEqual(info.extra['spiffe.io/id'], [ARGOCD], 'the original SPIFFE ID is recorded');
  });

  it('takes exec and port-forward through the upgrade path, relaying kube-apiserver’s answer unchanged', async () => {
    await refused(
      kubectl('argocd', 'exec', '-n', 'apps', 'web', '--', 'true'),
      /does not have a host assigned/,
    );
    const upgraded = (subresource: string): boolean =>
      audit.events.some(
        (e) =>
          e.annotations['kube-svid-proxy/upgrade'] !== undefined &&
          e.annotations['kube-svid-proxy/path']?.endsWith(`/pods/web/${subresource}`) === true,
      );
    assert.ok(upgraded('exec'), 'exec went through the upgrade path');
    const pf = spawn('kubectl', [
      `--kubeconfig=${join(files.dir, 'argocd.kubeconfig')}`,
      'port-forward',
      '-n',
      'apps',
      'pod/web',
      '0:80',
    ]);
    let stderr = '';
    pf.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    const code = await new Promise<number | null>((resolve) => pf.on('close', resolve));
    assert.notEqual(code, 0);
    assert.match(stderr, /does not have a host assigned/);
    assert.ok(upgraded('portforward'), 'port-forward too');
  });

  it('never lets a smuggled credential or identity through, over HTTP/1.1 and HTTP/2', async () => {
    // A stolen admin token and identity headers, hidden every way a naive proxy lets through: named in Connection
    // (so a proxy that strips after adding would strip its own), mixed case, duplicated, X-Remote-*.
    const review = JSON.stringify({ apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' });
    const who = (body: string): { username: string; groups: string[] } =>
      (
        JSON.parse(body.slice(body.indexOf('{'))) as {
          status: { userInfo: { username: string; groups: string[] } };
        }
      ).status.userInfo;
    const h1 = await new Promise<string>((resolve, reject) => {
      const socket = tls.connect({
        host: '127.0.0.1',
        port: proxy.port,
        ...clientTls(pki, pki.good.clientArgocd),
        ALPNProtocols: ['http/1.1'],
      });
      let answer = '';
      socket.setEncoding('utf8');
      socket.on('secureConnect', () =>
        socket.write(
          'POST /apis/authentication.k8s.io/v1/selfsubjectreviews HTTP/1.1\r\nHost: localhost\r\n' +
            'Connection: close, Impersonate-User, Impersonate-Group, Authorization\r\n' +
            `Authorization: Bearer ${cp.adminToken}\r\nAUTHORIZATION: Bearer ${cp.adminToken}\r\n` +
            'X-Remote-User: ksp-admin\r\nx-remote-group: system:masters\r\nX-Forwarded-User: ksp-admin\r\n' +
            `Content-Type: application/json\r\nContent-Length: ${review.length}\r\n\r\n${review}`,
        ),
      );
      socket.on('data', (d: string) => {
        answer += d;
      });
      socket.on('close', () => resolve(answer));
      socket.on('error', reject);
    });
    assert.match(h1, /^HTTP\/1.1 201 /);
    assert.equal(who(h1).username, 'argocd');
    assert.ok(!who(h1).groups.includes('system:masters'));

    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, clientTls(pki, pki.good.clientArgocd));
    try {
      const h2 = await new Promise<string>((resolve, reject) => {
        const stream = session.request({
          ':method': 'POST',
          ':path': '/apis/authentication.k8s.io/v1/selfsubjectreviews',
          'content-type': 'application/json',
          authorization: `Bearer ${cp.adminToken}`,
          'x-remote-user': ['ksp-admin', 'ksp-admin'],
          'x-remote-group': 'system:masters',
        });
        let body = '';
        stream.setEncoding('utf8');
        stream.on('data', (d: string) => {
          body += d;
        });
        stream.on('end', () => resolve(body));
        stream.on('error', reject);
        stream.end(review);
      });
      assert.equal(who(h2).username, 'argocd');
      assert.ok(!who(h2).groups.includes('system:masters'));
    } finally {
      session.close();
    }
  });

  it('never lets a client-supplied identity through: kubectl --as with a group or a uid is refused', async () => {
    await refused(
      kubectl(
        'argocd',
        'get',
        'secrets',
        '-n',
        'apps',
        '--as=system:serviceaccount:apps:deployer',
        '--as-group=system:masters',
      ),
      /ERR_POLICY_NESTED_IMPERSONATION|Forbidden/,
    );
    await refused(
      kubectl(
        'argocd',
        'get',
        'secrets',
        '-n',
        'apps',
        '--as=system:serviceaccount:apps:deployer',
        '--as-uid=0',
      ),
      /ERR_POLICY_NESTED_IMPERSONATION|Forbidden/,
    );
  });
});
