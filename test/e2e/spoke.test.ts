/**
 * deploy/spoke on a real single-node cluster (dev/node.ts): kube-apiserver accepts it in a server-side dry run;
 * applied (through a kustomize overlay of the test's, below), the agent DaemonSet serves the Workload API on the
 * node; the proxy runs as the static pod from deploy/spoke/static-pod with its files on the host; a pod gets its
 * SVID through the k8s attestor against the real kubelet (and a pod the entry does not select gets none);
 * kubectl, authenticated by the exec credential plugin against the node's socket, runs exec, attach, logs -f and
 * port-forward through the proxy into busybox containers over WebSocket and over SPDY; a rolling restart of the
 * agent keeps the proxy serving and the CA unchanged. Last, the other install path, deploy/spoke/proxy (the proxy
 * as a Deployment, upstream.inCluster), replaces the static pod: its pod gets Ready, kube-apiserver reads the
 * token the kubelet projected into it as the service account kube-svid-proxy bound to that pod, and kubectl runs
 * `auth whoami` and `exec` through it.
 *
 * The overlay (a temporary directory, `resources:` the repository's deploy/spoke by relative path) changes only
 * what this environment needs, nothing the manifests decide:
 * - entries.yaml (replaced: the shipped file plus two entries): the test workload, selected by namespace, service
 *   account and pod label; and the test's own kubectl, which runs as root on the host, outside any pod (the agent
 *   has hostPID, so the unix attestor sees it): `unix:uid:0`;
 * - policy.yaml (replaced: the shipped rules plus one): the kubectl client's ID mapped to the fixed user
 *   `e2e:kubectl`, which a Role in the test namespace lets read pods and use pods/exec, attach, log, portforward;
 * - the impersonation ClusterRole (patched): `policy rbac` of that policy, as `npm run deploy:rbac` generates
 *   the shipped one, so the proxy's service account may impersonate `e2e:kubectl` too.
 * The static pod, copied from deploy/spoke/static-pod, differs in one hostPath: kube-apiserver's CA is the
 * suite's (written under /etc/kube-svid-proxy/) rather than kubeadm's /etc/kubernetes/pki/ca.crt, which this host
 * does not have. Its proxy.yaml differs in `upstream.url` (the suite's kube-apiserver). Its token is made as
 * deploy/spoke/static-pod/README.md says (`kubectl create token kube-svid-proxy`).
 * The Deployment's overlay (of deploy/spoke/proxy) has the same entries, policy and RBAC, and one patch for what
 * this environment lacks (no kube-proxy, no DNS: the `kubernetes` Service's virtual IP leads nowhere, and a pod on
 * the bridge cannot reach 127.0.0.1): `hostNetwork: true`, the env KUBERNETES_SERVICE_HOST=127.0.0.1 and
 * KUBERNETES_SERVICE_PORT=<the suite kube-apiserver's port> (explicit container env wins over the kubelet's
 * service env), and one replica (a second would want the same host ports on the only node). Its ports and
 * proxy.yaml are as shipped: the static pod is removed first, freeing the node's 8443 and 9443.
 *
 * Progress and timings go to stderr; none is asserted. Skips like test/e2e/node.test.ts (nodeSkip).
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import {
  chownSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { promisify } from 'node:util';
import { parse, parseAllDocuments, stringify } from 'yaml';
import { BUSYBOX_IMAGE, type Node, startNode } from '../../dev/node.ts';
import { nodeSkip } from '../../dev/skip.ts';
import { startClient } from '../../src/client/client.ts';
import { parseClientConfig } from '../../src/client/config.ts';
import { silentLogger } from '../../src/observability/logger.ts';

const run = promisify(execFile);
const REPO = join(import.meta.dirname, '..', '..');
const CLI = join(REPO, 'src', 'cli', 'main.ts');
const skip = await nodeSkip((line) => log(line));

const NS = 'kube-svid-proxy';
const TEST_NS = 'spoke-e2e';
const SOCKET_DIR = '/run/kube-svid-proxy';
const SOCKET = `unix://${SOCKET_DIR}/agent.sock`;
const STATE_DIR = '/var/lib/kube-svid-proxy';
const CONFIG_DIR = '/etc/kube-svid-proxy';
const PROXY_URL = 'https://127.0.0.1:8443';
const ADMIN_URL = 'http://127.0.0.1:9443';
const PROXY_ID = 'spiffe://spoke.example.org/kube-svid-proxy';
const CLIENT_ID = 'spiffe://spoke.example.org/e2e/kubectl';
const WORKLOAD_ID = `spiffe://spoke.example.org/ns/${TEST_NS}/sa/svid-client`;
const USER = 'e2e:kubectl';

function log(line: string): void {
  process.stderr.write(`[spoke.test] ${line}\n`);
}

function timing(what: string, since: number): void {
  log(`${what}: ${((Date.now() - since) / 1000).toFixed(1)} s`);
}

/** The test's additions to deploy/spoke/common/entries.yaml (appended to the shipped list). */
const EXTRA_ENTRIES = `
  # Added by test/e2e/spoke.test.ts. A pod of the test namespace, selected by namespace, service account and
  # pod label together (the k8s attestor against the real kubelet).
  - spiffeId: ${WORKLOAD_ID}
    selectors:
      - k8s:ns:${TEST_NS}
      - k8s:sa:svid-client
      - k8s:pod-label:app:svid-client
  # The test's kubectl (and its exec credential plugin): root on the host, outside any pod.
  - spiffeId: ${CLIENT_ID}
    selectors:
      - unix:uid:0
`;

/** The test's addition to deploy/spoke/common/policy.yaml (appended to the shipped rules). */
const EXTRA_RULE = `
  # Added by test/e2e/spoke.test.ts: the test's kubectl, as a fixed user with RBAC in ${TEST_NS} only.
  - name: e2e-kubectl
    match:
      id: ${CLIENT_ID}
    identity:
      user: ${USER}
`;

/** The test namespace and what `e2e:kubectl` may do there. */
const TEST_RBAC = [
  { apiVersion: 'v1', kind: 'Namespace', metadata: { name: TEST_NS } },
  {
    apiVersion: 'v1',
    kind: 'ServiceAccount',
    metadata: { name: 'svid-client', namespace: TEST_NS },
    automountServiceAccountToken: false,
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'Role',
    metadata: { name: 'e2e-kubectl', namespace: TEST_NS },
    rules: [
      { apiGroups: [''], resources: ['pods'], verbs: ['get', 'list', 'watch'] },
      { apiGroups: [''], resources: ['pods/log'], verbs: ['get'] },
      {
        apiGroups: [''],
        resources: ['pods/exec', 'pods/attach', 'pods/portforward'],
        verbs: ['get', 'create'],
      },
    ],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'RoleBinding',
    metadata: { name: 'e2e-kubectl', namespace: TEST_NS },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'e2e-kubectl' },
    subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: USER }],
  },
];

function busybox(name: string, command: string[], extra: Record<string, unknown> = {}): object {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name, namespace: TEST_NS, labels: { app: name } },
    spec: {
      terminationGracePeriodSeconds: 1,
      automountServiceAccountToken: false,
      containers: [{ name, image: BUSYBOX_IMAGE, imagePullPolicy: 'Never', command, ...extra }],
    },
  };
}

/** A pod running our image's `api fetch x509` against the node's socket once. */
function svidClient(name: string, app: string): object {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name, namespace: TEST_NS, labels: { app } },
    spec: {
      serviceAccountName: 'svid-client',
      automountServiceAccountToken: false,
      restartPolicy: 'Never',
      terminationGracePeriodSeconds: 1,
      containers: [
        {
          name: 'fetch',
          image: 'kube-svid-proxy:dev',
          imagePullPolicy: 'IfNotPresent',
          args: ['api', 'fetch', 'x509', '--socket', SOCKET, '--json', '--timeout', '20s'],
          volumeMounts: [{ name: 'agent-socket', mountPath: SOCKET_DIR, readOnly: true }],
        },
      ],
      volumes: [{ name: 'agent-socket', hostPath: { path: SOCKET_DIR, type: 'Directory' } }],
    },
  };
}

interface PodStatus {
  readonly metadata: { readonly name: string; readonly annotations?: Record<string, string> };
  readonly status: {
    readonly phase: string;
    readonly conditions?: readonly { type: string; status: string }[];
  };
}

interface AuditEvent {
  readonly requestURI: string;
  readonly objectRef?: { readonly subresource?: string; readonly name?: string };
  readonly impersonatedUser?: { readonly username: string };
  readonly annotations?: Record<string, string>;
}

interface Streaming {
  readonly child: ChildProcess;
  stdout(): string;
  stderr(): string;
}

describe('deploy/spoke on a real single-node cluster', { skip, timeout: 900_000 }, () => {
  let node: Node;
  let dir: string;
  let dryRun = '';
  /** The test's overlay of deploy/spoke (its entries.yaml, policy.yaml and impersonation-rbac.yaml). */
  let overlay: string;
  /** kubectl through the proxy, authenticated by `kube-svid-proxy credential` (the exec plugin). */
  let viaPlugin: string;
  /** kubectl through the proxy with the client SVID fetched once (a client certificate in the kubeconfig). */
  let viaCertificate: string;

  async function kubectlJson<T>(...args: string[]): Promise<T> {
    const { stdout } = await node.kubectl([...args, '-o', 'json']);
    return JSON.parse(stdout) as T;
  }

  async function podReady(namespace: string, name: string, timeoutMs = 120_000): Promise<PodStatus> {
    return podUntil(namespace, name, timeoutMs, (pod) =>
      pod.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'),
    );
  }

  async function podUntil(
    namespace: string,
    name: string,
    timeoutMs: number,
    done: (pod: PodStatus) => boolean | undefined,
  ): Promise<PodStatus> {
    const deadline = Date.now() + timeoutMs;
    let last = 'not found';
    for (;;) {
      try {
        const pod = await kubectlJson<PodStatus>('get', 'pod', '-n', namespace, name);
        if (done(pod)) return pod;
        last = `phase ${pod.status.phase}`;
      } catch (err) {
        last = (err as Error).message;
      }
      if (Date.now() > deadline)
        throw new Error(`pod ${namespace}/${name} not there after ${timeoutMs} ms: ${last}`);
      await sleep(250);
    }
  }

  function ksp(...args: string[]): Promise<{ stdout: string; stderr: string }> {
    return run(process.execPath, [CLI, ...args], { timeout: 60_000 });
  }

  /** kubectl with a kubeconfig of ours; `spdy` turns kubectl's WebSocket streaming off. */
  function env(spdy: boolean): NodeJS.ProcessEnv {
    return spdy
      ? {
          ...process.env,
          KUBECTL_REMOTE_COMMAND_WEBSOCKETS: 'false',
          KUBECTL_PORT_FORWARD_WEBSOCKETS: 'false',
        }
      : {
          ...process.env,
          KUBECTL_REMOTE_COMMAND_WEBSOCKETS: 'true',
          KUBECTL_PORT_FORWARD_WEBSOCKETS: 'true',
        };
  }

  function kubectlAs(
    kubeconfig: string,
    args: string[],
    options: { input?: string; spdy?: boolean } = {},
  ): Promise<{ stdout: string; stderr: string }> {
    return new Promise((resolve, reject) => {
      const child = spawn(
        'kubectl',
        [`--kubeconfig=${kubeconfig}`, `--cache-dir=${join(dir, 'cache')}`, ...args],
        {
          env: env(options.spdy ?? false),
          stdio: ['pipe', 'pipe', 'pipe'],
        },
      );
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => {
        stdout += d;
      });
      child.stderr.setEncoding('utf8').on('data', (d: string) => {
        stderr += d;
      });
      const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
      child.on('error', reject);
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        if (code === 0) resolve({ stdout, stderr });
        else
          reject(
            Object.assign(new Error(`kubectl ${args.join(' ')} failed (${signal ?? code}): ${stderr}`), {
              stderr,
            }),
          );
      });
      child.stdin.end(options.input ?? '');
    });
  }

  /** A long-running kubectl (attach, logs -f, port-forward) through the proxy, stopped by the caller. */
  function kubectlStream(args: string[], spdy: boolean, kubeconfig = viaPlugin): Streaming {
    const child = spawn(
      'kubectl',
      [`--kubeconfig=${kubeconfig}`, `--cache-dir=${join(dir, 'cache')}`, ...args],
      {
        env: env(spdy),
        stdio: ['pipe', 'pipe', 'pipe'],
      },
    );
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
    });
    child.stderr?.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    return { child, stdout: () => stdout, stderr: () => stderr };
  }

  async function until<T>(
    what: string,
    timeoutMs: number,
    probe: () => Promise<T | undefined> | T | undefined,
  ): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    let last = '';
    for (;;) {
      try {
        const value = await probe();
        if (value !== undefined) return value;
      } catch (err) {
        last = (err as Error).message;
      }
      if (Date.now() > deadline) throw new Error(`${what}: not after ${timeoutMs} ms ${last}`);
      await sleep(200);
    }
  }

  async function stop(s: Streaming): Promise<void> {
    if (s.child.exitCode !== null || s.child.signalCode !== null) return;
    const closed = new Promise((resolve) => s.child.once('close', resolve));
    s.child.kill('SIGTERM');
    await closed;
  }

  /** The proxy's metrics: the sum of a counter's series whose labels include `match`. */
  async function counter(name: string, match = ''): Promise<number> {
    const text = await (await fetch(`${ADMIN_URL}/metrics`)).text();
    let sum = 0;
    for (const line of text.split('\n'))
      if (line.startsWith(`${name}{`) && line.includes(match)) sum += Number(line.split(' ').at(-1));
    return sum;
  }

  /** The proxy's audit Events (its stdout, in its pod's log: the static pod's by default) for the test's rule. */
  async function auditEvents(pod = `kube-svid-proxy-${node.nodeName}`): Promise<AuditEvent[]> {
    const { stdout } = await node.kubectl(['logs', '-n', NS, pod]);
    return stdout
      .split('\n')
      .filter((line) => line.startsWith('{') && line.includes('"audit.k8s.io/v1"'))
      .map((line) => JSON.parse(line) as AuditEvent)
      .filter((e) => e.annotations?.['kube-svid-proxy/rule'] === 'e2e-kubectl');
  }

  /** An overlay's kustomization: `base` with the test's entries and policy, and `patches` (files in `root`). */
  function kustomization(root: string, base: string, patches: string[]): object {
    return {
      apiVersion: 'kustomize.config.k8s.io/v1beta1',
      kind: 'Kustomization',
      resources: [relative(root, base)],
      configMapGenerator: ['kube-svid-proxy-agent-entries', 'kube-svid-proxy-policy'].map((name) => ({
        name,
        namespace: NS,
        behavior: 'replace',
        files: [name.endsWith('entries') ? 'entries.yaml' : 'policy.yaml'],
        options: { disableNameSuffixHash: true },
      })),
      patches: patches.map((path) => ({ path })),
    };
  }

  /** The subjectAltName of the certificate served on 127.0.0.1:`port`. */
  function servedSan(port: number): Promise<string> {
    return new Promise<string>((resolve, reject) => {
      const socket = tls.connect(
        { host: '127.0.0.1', port, servername: 'spoke.example.org', rejectUnauthorized: false },
        () => {
          resolve(socket.getPeerX509Certificate()?.subjectAltName ?? '');
          socket.destroy();
        },
      );
      socket.on('error', reject);
    });
  }

  /** Whether something accepts TCP connections on 127.0.0.1:`port`. */
  function listening(port: number): Promise<boolean> {
    return new Promise((resolve) => {
      const socket = connect({ host: '127.0.0.1', port }, () => {
        socket.destroy();
        resolve(true);
      });
      socket.on('error', () => resolve(false));
    });
  }

  before(async () => {
    const started = Date.now();
    node = await startNode({ productImage: true });
    timing('node Ready (with the product image)', started);
    dir = mkdtempSync(join(tmpdir(), 'ksp-spoke-'));
    // Every host path the manifests or this test create, removed with the node (even after a crash).
    for (const path of [SOCKET_DIR, STATE_DIR, CONFIG_DIR]) {
      assert.ok(!existsSync(path), `${path} exists on this host: not the test's to reuse or remove`);
      node.removeOnClose(path);
    }

    // 1. The namespace for real (a dry run cannot create what the rest goes into), then the shipped spoke.
    await node.kubectl(['apply', '-f', join(REPO, 'deploy', 'base', 'agent', 'namespace.yaml')]);
    dryRun = (await node.kubectl(['apply', '--dry-run=server', '-k', join(REPO, 'deploy', 'spoke')])).stdout;

    // The overlay (see the header for what and why).
    overlay = join(dir, 'overlay');
    mkdirSync(overlay);
    const common = join(REPO, 'deploy', 'spoke', 'common');
    writeFileSync(
      join(overlay, 'entries.yaml'),
      readFileSync(join(common, 'entries.yaml'), 'utf8') + EXTRA_ENTRIES,
    );
    const policy = readFileSync(join(common, 'policy.yaml'), 'utf8') + EXTRA_RULE;
    writeFileSync(join(overlay, 'policy.yaml'), policy);
    const rbac = (
      await ksp('policy', 'rbac', join(overlay, 'policy.yaml'), '--service-account', `${NS}/kube-svid-proxy`)
    ).stdout;
    const role = parseAllDocuments(rbac)
      .map((d) => d.toJS() as { kind?: string })
      .find((o) => o?.kind === 'ClusterRole');
    assert.ok(role, rbac);
    writeFileSync(join(overlay, 'impersonation-rbac.yaml'), stringify(role));
    writeFileSync(
      join(overlay, 'kustomization.yaml'),
      stringify(kustomization(overlay, join(REPO, 'deploy', 'spoke'), ['impersonation-rbac.yaml'])),
    );
    await node.kubectl(['apply', '-k', overlay]);
    await node.kubectl(['apply', '-f', '-'], { input: TEST_RBAC.map((o) => stringify(o)).join('---\n') });

    let step = Date.now();
    await node.kubectl(['rollout', 'status', `daemonset/kube-svid-proxy-agent`, '-n', NS, '--timeout=180s'], {
      timeoutMs: 200_000,
    });
    timing('agent DaemonSet rolled out', step);

    // The static pod's host files, as deploy/spoke/static-pod/README.md installs them.
    step = Date.now();
    mkdirSync(CONFIG_DIR, { mode: 0o755 });
    const proxyYaml = readFileSync(join(REPO, 'deploy', 'spoke', 'static-pod', 'proxy.yaml'), 'utf8').replace(
      'url: https://127.0.0.1:6443',
      `url: ${node.apiserverUrl}`,
    );
    assert.ok(proxyYaml.includes(node.apiserverUrl), 'upstream.url replaced');
    writeFileSync(join(CONFIG_DIR, 'proxy.yaml'), proxyYaml, { mode: 0o644 });
    writeFileSync(join(CONFIG_DIR, 'policy.yaml'), policy, { mode: 0o644 });
    writeFileSync(join(CONFIG_DIR, 'apiserver-ca.crt'), node.caPem, { mode: 0o644 });
    mkdirSync(join(CONFIG_DIR, 'upstream'), { mode: 0o750 });
    chownSync(join(CONFIG_DIR, 'upstream'), 0, 65532);
    const token = (
      await node.kubectl(['-n', NS, 'create', 'token', 'kube-svid-proxy', '--duration=1h'])
    ).stdout.trim();
    writeFileSync(join(CONFIG_DIR, 'upstream', 'token'), `${token}\n`, { mode: 0o640 });
    chownSync(join(CONFIG_DIR, 'upstream', 'token'), 0, 65532);
    const manifest = parse(
      readFileSync(join(REPO, 'deploy', 'spoke', 'static-pod', 'kube-svid-proxy.yaml'), 'utf8'),
    ) as { spec: { volumes: { name: string; hostPath: { path: string } }[] } };
    const ca = manifest.spec.volumes.find((v) => v.name === 'apiserver-ca');
    assert.ok(ca);
    ca.hostPath.path = join(CONFIG_DIR, 'apiserver-ca.crt');
    writeFileSync(join(node.staticPodDir, 'kube-svid-proxy.yaml'), stringify(manifest));
    await podReady(NS, `kube-svid-proxy-${node.nodeName}`);
    timing('static proxy pod Ready', step);

    // The client's kubeconfigs: the exec plugin, and a client certificate fetched once (for the restart).
    step = Date.now();
    const svid = join(dir, 'svid');
    await until('the client SVID', 30_000, async () => {
      await ksp('api', 'fetch', 'x509', '--socket', SOCKET, '--write', svid);
      return true;
    });
    viaPlugin = join(dir, 'plugin.kubeconfig');
    const generated = parse(
      (
        await ksp(
          'credential',
          'kubeconfig',
          '--server',
          PROXY_URL,
          '--socket',
          SOCKET,
          '--ca-file',
          join(svid, 'bundle.0.pem'),
          '--name',
          'spoke',
        )
      ).stdout,
    ) as { clusters: { cluster: Record<string, string> }[]; users: { name: string; user: unknown }[] };
    // The proxy's SVID names the DNS names of its entry (entries.yaml), not 127.0.0.1.
    for (const c of generated.clusters) c.cluster['tls-server-name'] = 'spoke.example.org';
    writeFileSync(viaPlugin, stringify(generated));
    viaCertificate = join(dir, 'certificate.kubeconfig');
    const withCertificate = structuredClone(generated);
    for (const u of withCertificate.users)
      u.user = {
        'client-certificate-data': readFileSync(join(svid, 'svid.0.pem')).toString('base64'),
        'client-key-data': readFileSync(join(svid, 'svid.0.key')).toString('base64'),
      };
    writeFileSync(viaCertificate, stringify(withCertificate));

    // The workloads kubectl streams into (busybox), and the pods asking for an SVID.
    await node.kubectl(['apply', '-f', '-'], {
      input: [
        busybox('shell', ['sleep', '3600']),
        busybox('attach-me', ['sh', '-c', 'while read line; do echo "got: $line"; done'], {
          stdin: true,
          tty: false,
        }),
        busybox('talker', ['sh', '-c', 'i=0; while true; do echo "line $i"; i=$((i+1)); sleep 0.2; done']),
        busybox('web', [
          'sh',
          '-c',
          'mkdir -p /tmp/www && echo hello-from-httpd > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www',
        ]),
        svidClient('svid-match', 'svid-client'),
        svidClient('svid-other', 'other'),
      ]
        .map((o) => stringify(o))
        .join('---\n'),
    });
    for (const name of ['shell', 'attach-me', 'talker', 'web']) await podReady(TEST_NS, name);
    // RBAC reaches the authorizer through an informer: wait until the mapped user may list pods.
    await until('e2e:kubectl may list pods through the proxy', 30_000, () =>
      kubectlAs(viaPlugin, ['get', 'pods', '-n', TEST_NS]).then(() => true),
    );
    timing('client kubeconfigs and test pods ready', step);
    timing('before() in all', started);
  });

  after(async () => {
    const started = Date.now();
    await node?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
    timing('teardown', started);
  });

  it('kube-apiserver accepts `kubectl apply --dry-run=server -k deploy/spoke`', () => {
    for (const object of [
      'serviceaccount/kube-svid-proxy-agent',
      'serviceaccount/kube-svid-proxy',
      'clusterrole.rbac.authorization.k8s.io/kube-svid-proxy-agent',
      'clusterrole.rbac.authorization.k8s.io/kube-svid-proxy-impersonate',
      'clusterrolebinding.rbac.authorization.k8s.io/kube-svid-proxy-agent',
      'clusterrolebinding.rbac.authorization.k8s.io/kube-svid-proxy-impersonate',
      'configmap/kube-svid-proxy-agent-entries',
      'configmap/kube-svid-proxy-policy',
      'daemonset.apps/kube-svid-proxy-agent',
    ])
      assert.match(
        dryRun,
        new RegExp(`^${object.replaceAll('.', '\\.')} created \\(server dry run\\)$`, 'm'),
      );
  });

  it('the agent DaemonSet is Ready and serves the Workload API on the node', async () => {
    const ds = await kubectlJson<{ status: { desiredNumberScheduled: number; numberReady: number } }>(
      'get',
      'daemonset',
      '-n',
      NS,
      'kube-svid-proxy-agent',
    );
    assert.equal(ds.status.desiredNumberScheduled, 1);
    assert.equal(ds.status.numberReady, 1);
    const { stdout } = await ksp('api', 'fetch', 'x509', '--socket', SOCKET, '--json');
    const fetched = JSON.parse(stdout) as { svids: { spiffeId: string }[]; bundles: unknown };
    assert.deepEqual(
      fetched.svids.map((s) => s.spiffeId),
      [CLIENT_ID],
    );
    // The init container handed the host directories to the agent's user; the agent's checks accepted them.
    const { stdout: stat } = await run('stat', ['-c', '%n %u:%g %a', SOCKET_DIR, `${STATE_DIR}/agent`]);
    assert.equal(stat, `${SOCKET_DIR} 65532:65532 755\n${STATE_DIR}/agent 65532:65532 700\n`);
  });

  it('the proxy runs as a static pod (a mirror pod, Ready) and /readyz on the host port says ready', async () => {
    const mirror = await podReady(NS, `kube-svid-proxy-${node.nodeName}`);
    assert.equal(mirror.metadata.annotations?.['kubernetes.io/config.source'], 'file');
    assert.ok(mirror.metadata.annotations?.['kubernetes.io/config.mirror'], 'a mirror pod');
    const res = await fetch(`${ADMIN_URL}/readyz`);
    const body = await res.text();
    assert.equal(res.status, 200, body);
    // It serves with the SVID of its entry (the k8s attestor selected the static pod by namespace and label).
    assert.match(await servedSan(8443), new RegExp(`URI:${PROXY_ID}(,|$)`));
  });

  it('a pod selected by namespace, service account and label gets its SVID from the k8s attestor; another does not', async () => {
    const finished = (pod: PodStatus) => pod.status.phase === 'Succeeded' || pod.status.phase === 'Failed';
    const match = await podUntil(TEST_NS, 'svid-match', 120_000, finished);
    const matchLogs = (await node.kubectl(['logs', '-n', TEST_NS, 'svid-match'])).stdout;
    assert.equal(match.status.phase, 'Succeeded', matchLogs);
    const fetched = JSON.parse(matchLogs) as { svids: { spiffeId: string }[] };
    assert.deepEqual(
      fetched.svids.map((s) => s.spiffeId),
      [WORKLOAD_ID],
    );
    const other = await podUntil(TEST_NS, 'svid-other', 120_000, finished);
    const otherLogs = (await node.kubectl(['logs', '-n', TEST_NS, 'svid-other'])).stdout;
    assert.equal(other.status.phase, 'Failed', otherLogs);
    assert.match(otherLogs, /PermissionDenied|PERMISSION_DENIED|no identity/i);
  });

  for (const spdy of [false, true]) {
    const protocol = spdy ? 'SPDY' : 'WebSocket';
    it(`kubectl through the proxy (exec plugin): exec, attach, logs -f and port-forward over ${protocol}`, async () => {
      const decisionsBefore = await counter('ksp_decisions_total', 'rule="e2e-kubectl"');
      const who = JSON.parse((await kubectlAs(viaPlugin, ['auth', 'whoami', '-o', 'json'])).stdout) as {
        status: { userInfo: { username: string } };
      };
      assert.equal(who.status.userInfo.username, USER);

      // exec, with and without stdin.
      const exec = await kubectlAs(
        viaPlugin,
        ['exec', '-n', TEST_NS, 'shell', '--', 'sh', '-c', 'echo "hi from $(hostname)"'],
        {
          spdy,
        },
      );
      assert.equal(exec.stdout, 'hi from shell\n');
      const cat = await kubectlAs(viaPlugin, ['exec', '-i', '-n', TEST_NS, 'shell', '--', 'cat'], {
        spdy,
        input: `ping over ${protocol}\n`,
      });
      assert.equal(cat.stdout, `ping over ${protocol}\n`);

      // attach -i: a line to the container's stdin comes back on its stdout (attached, and in its log).
      const line = `attached over ${protocol}`;
      const attach = kubectlStream(['attach', '-i', '-n', TEST_NS, 'attach-me'], spdy);
      try {
        await until(`attach over ${protocol}`, 30_000, async () => {
          attach.child.stdin?.write(`${line}\n`);
          await sleep(500);
          return attach.stdout().includes(`got: ${line}`) ? true : undefined;
        });
      } finally {
        await stop(attach);
      }
      const logs = (await kubectlAs(viaPlugin, ['logs', '-n', TEST_NS, 'attach-me'])).stdout;
      assert.match(logs, new RegExp(`^got: ${line}$`, 'm'));

      // logs -f: a few lines as they come, then stop following.
      const follow = kubectlStream(['logs', '-f', '--tail=1', '-n', TEST_NS, 'talker'], spdy);
      try {
        const lines = await until('three followed lines', 30_000, () => {
          const got = follow
            .stdout()
            .split('\n')
            .filter((l) => /^line \d+$/.test(l));
          return got.length >= 3 ? got : undefined;
        });
        const numbers = lines.map((l) => Number(l.slice(5)));
        for (let i = 1; i < numbers.length; i++) assert.equal(numbers[i], (numbers[i - 1] as number) + 1);
      } finally {
        await stop(follow);
      }

      // port-forward to busybox httpd, fetched through the forwarded local port.
      const forward = kubectlStream(['port-forward', '-n', TEST_NS, 'pod/web', ':8080'], spdy);
      try {
        const port = await until(
          'port-forward listening',
          30_000,
          () => forward.stdout().match(/127\.0\.0\.1:(\d+) -> 8080/)?.[1],
        );
        for (let i = 0; i < 2; i++) {
          const res = await fetch(`http://127.0.0.1:${port}/`);
          assert.equal(await res.text(), 'hello-from-httpd\n');
        }
      } finally {
        await stop(forward);
      }

      // Through the proxy, in the protocol asked for: the proxy's audit Events name the upgrade of each stream
      // (kubectl falls back from WebSocket to SPDY silently when an upgrade fails: none may be SPDY yet).
      const upgrade = spdy ? /^spdy\//i : /^websocket$/i;
      const events = await until(`the proxy's audit Events of the ${protocol} streams`, 30_000, async () => {
        const all = await auditEvents();
        const streams = all.filter((e) => upgrade.test(e.annotations?.['kube-svid-proxy/upgrade'] ?? ''));
        const subresources = new Set(streams.map((e) => e.objectRef?.subresource));
        // The `logs -f` stream too, though kubectl was killed while it followed: an abandoned stream is audited.
        const followed = all.some(
          (e) => e.objectRef?.subresource === 'log' && e.requestURI.includes('follow=true'),
        );
        if (followed && ['exec', 'attach', 'portforward'].every((sub) => subresources.has(sub))) return all;
        throw new Error(
          `${all.length} Events: ${all
            .map(
              (e) =>
                `${e.objectRef?.subresource ?? e.requestURI}:${e.annotations?.['kube-svid-proxy/upgrade'] ?? '-'}`,
            )
            .join(' ')}`,
        );
      });
      if (!spdy)
        assert.deepEqual(
          events.filter((e) => /spdy/i.test(e.annotations?.['kube-svid-proxy/upgrade'] ?? '')),
          [],
        );
      for (const e of events) assert.equal(e.impersonatedUser?.username, USER);
      log(
        `${protocol}: the proxy audited ${events.filter((e) => upgrade.test(e.annotations?.['kube-svid-proxy/upgrade'] ?? '')).length} upgraded streams`,
      );

      // Through the proxy: its policy decided every request for the mapped rule.
      const decisionsAfter = await counter('ksp_decisions_total', 'rule="e2e-kubectl"');
      log(`ksp_decisions_total{rule="e2e-kubectl"} ${decisionsBefore} -> ${decisionsAfter} (${protocol})`);
      assert.ok(decisionsAfter >= decisionsBefore + 6, `${decisionsBefore} -> ${decisionsAfter}`);
    });
  }

  it('the client mode (kube-svid-proxy client) carries exec, attach and port-forward over WebSocket and SPDY, and a watch', async () => {
    // The client mode on the host, as a GitOps sidecar would run: the node's agent gives it the test's SVID; its
    // loopback listener takes kubectl's plain HTTP; the kubeconfig holds no credential at all.
    const client = await startClient(
      parseClientConfig(
        stringify({
          workloadApi: { socket: SOCKET },
          admin: { listen: '127.0.0.1:0' },
          spokes: [
            {
              name: 'spoke',
              listen: '127.0.0.1:0',
              server: PROXY_URL,
              serverName: 'spoke.example.org',
              serverId: PROXY_ID,
            },
          ],
        }),
        join(dir, 'client.yaml'),
      ),
      { logger: silentLogger(), defaultMetrics: false },
    );
    try {
      const viaClient = join(dir, 'client-mode.kubeconfig');
      writeFileSync(
        viaClient,
        stringify({
          apiVersion: 'v1',
          kind: 'Config',
          clusters: [{ name: 'spoke', cluster: { server: client.listeners[0]?.url } }],
          users: [{ name: 'spoke', user: {} }],
          contexts: [{ name: 'spoke', context: { cluster: 'spoke', user: 'spoke' } }],
          'current-context': 'spoke',
        }),
      );
      const who = JSON.parse((await kubectlAs(viaClient, ['auth', 'whoami', '-o', 'json'])).stdout) as {
        status: { userInfo: { username: string } };
      };
      assert.equal(who.status.userInfo.username, USER);
      for (const spdy of [false, true]) {
        const protocol = spdy ? 'SPDY' : 'WebSocket';
        const cat = await kubectlAs(viaClient, ['exec', '-i', '-n', TEST_NS, 'shell', '--', 'cat'], {
          spdy,
          input: `ping through the client mode over ${protocol}\n`,
        });
        assert.equal(cat.stdout, `ping through the client mode over ${protocol}\n`);
        const line = `attached through the client mode over ${protocol}`;
        const attach = kubectlStream(['attach', '-i', '-n', TEST_NS, 'attach-me'], spdy, viaClient);
        try {
          await until(`attach through the client mode over ${protocol}`, 30_000, async () => {
            attach.child.stdin?.write(`${line}\n`);
            await sleep(500);
            return attach.stdout().includes(`got: ${line}`) ? true : undefined;
          });
        } finally {
          await stop(attach);
        }
        const forward = kubectlStream(['port-forward', '-n', TEST_NS, 'pod/web', ':8080'], spdy, viaClient);
        try {
          const port = await until(
            'port-forward listening',
            30_000,
            () => forward.stdout().match(/127\.0\.0\.1:(\d+) -> 8080/)?.[1],
          );
          const res = await fetch(`http://127.0.0.1:${port}/`);
          assert.equal(await res.text(), 'hello-from-httpd\n');
        } finally {
          await stop(forward);
        }
      }
      // A watch through it sees an event that happens after it opened: the pod listed first, then modified.
      const watch = kubectlStream(
        ['get', 'pods', '-n', TEST_NS, 'shell', '--watch', '-o', 'name'],
        false,
        viaClient,
      );
      try {
        await until('the watch to list the pod', 30_000, () =>
          watch.stdout().includes('pod/shell') ? true : undefined,
        );
        await node.kubectl([
          'label',
          'pod',
          'shell',
          '-n',
          TEST_NS,
          '--overwrite',
          `seen-by-watch=${Date.now()}`,
        ]);
        await until('the watch event', 30_000, () =>
          watch
            .stdout()
            .split('\n')
            .filter((l) => l === 'pod/shell').length >= 2
            ? true
            : undefined,
        );
      } finally {
        await stop(watch);
      }
      // Every upgrade went through as one: tunnels counted by the client, none refused.
      const metrics = await (await fetch(`http://127.0.0.1:${client.admin.address.port}/metrics`)).text();
      assert.match(metrics, /ksp_client_upgrades_total\{spoke="spoke",code="tunnel"\} ([4-9]|\d{2,})/);
      assert.doesNotMatch(metrics, /^ksp_client_refusals_total\{/m);
      log(`client mode: ${metrics.match(/ksp_client_upgrades_total\{[^}]*\} \d+/)?.[0]}`);
    } finally {
      await client.close();
    }
  });

  it('a rolling restart of the agent keeps the proxy serving and the CA unchanged', async () => {
    const started = Date.now();
    const bundleBefore = join(dir, 'before');
    await ksp('api', 'fetch', 'x509', '--socket', SOCKET, '--write', bundleBefore);
    const activeBefore = (
      JSON.parse(readFileSync(`${STATE_DIR}/agent/ca.json`, 'utf8')) as { active: { certificate: string } }
    ).active.certificate;
    const podsBefore = (
      await node.kubectl(['get', 'pods', '-n', NS, '-l', 'app.kubernetes.io/component=agent', '-o', 'name'])
    ).stdout;
    const requestsBefore = await counter('ksp_requests_total');

    await node.kubectl(['rollout', 'restart', 'daemonset/kube-svid-proxy-agent', '-n', NS]);
    let rolledOut = false;
    const rollout = node
      .kubectl(['rollout', 'status', 'daemonset/kube-svid-proxy-agent', '-n', NS, '--timeout=180s'], {
        timeoutMs: 200_000,
      })
      .finally(() => {
        rolledOut = true;
      });
    // Through the proxy during the restart, with the client certificate fetched before it (the plugin needs
    // the agent; the proxy must not): every request succeeds.
    let during = 0;
    while (!rolledOut) {
      const { stdout } = await kubectlAs(viaCertificate, [
        'get',
        'pod',
        'shell',
        '-n',
        TEST_NS,
        '-o',
        'name',
      ]);
      assert.equal(stdout, 'pod/shell\n');
      during++;
      await sleep(200);
    }
    await rollout;
    log(`${during} requests through the proxy while the agent rolled`);
    assert.ok(during >= 1);
    const podsAfter = (
      await node.kubectl(['get', 'pods', '-n', NS, '-l', 'app.kubernetes.io/component=agent', '-o', 'name'])
    ).stdout;
    assert.notEqual(podsAfter, podsBefore, 'a new agent pod');

    // After: the new agent issues SVIDs the proxy accepts (the exec plugin again), the proxy still ready.
    const { stdout } = await until('kubectl through the proxy after the restart', 60_000, () =>
      kubectlAs(viaPlugin, ['exec', '-n', TEST_NS, 'shell', '--', 'echo', 'after the restart']),
    );
    assert.equal(stdout, 'after the restart\n');
    assert.equal((await fetch(`${ADMIN_URL}/readyz`)).status, 200);
    assert.ok((await counter('ksp_requests_total')) > requestsBefore);

    // The same CA: the bundle from the Workload API and the state file's active certificate.
    const bundleAfter = join(dir, 'after');
    await until('the client SVID from the new agent', 60_000, () =>
      ksp('api', 'fetch', 'x509', '--socket', SOCKET, '--write', bundleAfter),
    );
    assert.equal(
      readFileSync(join(bundleAfter, 'bundle.0.pem'), 'utf8'),
      readFileSync(join(bundleBefore, 'bundle.0.pem'), 'utf8'),
    );
    const activeAfter = (
      JSON.parse(readFileSync(`${STATE_DIR}/agent/ca.json`, 'utf8')) as { active: { certificate: string } }
    ).active.certificate;
    assert.equal(activeAfter, activeBefore);
    timing('rolling restart', started);
  });

  // Last: it replaces the static pod (the proxy of every test above) with deploy/spoke/proxy's Deployment.
  it('deploy/spoke/proxy: the proxy Deployment is Ready on its service-account token, and kubectl runs through it', async () => {
    const started = Date.now();
    // The static pod goes first: on the host network (below) the Deployment's pod listens on the same 8443 and
    // 9443 of the node, which proxy.yaml and the Deployment's ports ship and this test keeps.
    rmSync(join(node.staticPodDir, 'kube-svid-proxy.yaml'));
    await until('the static pod and its listeners gone', 120_000, async () => {
      const { stdout } = await node.kubectl([
        'get',
        'pods',
        '-n',
        NS,
        '-l',
        'app.kubernetes.io/component=proxy',
        '-o',
        'name',
      ]);
      if (stdout.trim() !== '') throw new Error(`still there: ${stdout.trim()}`);
      if ((await listening(8443)) || (await listening(9443))) throw new Error('8443 or 9443 still listening');
      return true;
    });
    timing('static pod gone', started);

    // An overlay of deploy/spoke/proxy: the same entries, policy and impersonation RBAC as the overlay of
    // deploy/spoke (so ../common is applied unchanged), and one patch of the Deployment for what this environment
    // lacks. No kube-proxy and no DNS run here, so the `kubernetes` Service's virtual IP (the kubelet's
    // KUBERNETES_SERVICE_HOST) leads nowhere, and a pod on the bridge reaches neither kube-apiserver (127.0.0.1)
    // nor the test: the pod uses the host's network, and the explicit container env (which wins over the
    // kubelet's service env) names the suite's kube-apiserver for upstream.inCluster. One replica: the second of
    // the shipped two would want the same host ports on the only node and stay Pending.
    const proxyOverlay = join(dir, 'overlay-proxy');
    mkdirSync(proxyOverlay);
    for (const file of ['entries.yaml', 'policy.yaml', 'impersonation-rbac.yaml'])
      copyFileSync(join(overlay, file), join(proxyOverlay, file));
    const apiserver = new URL(node.apiserverUrl);
    writeFileSync(
      join(proxyOverlay, 'environment.yaml'),
      stringify({
        apiVersion: 'apps/v1',
        kind: 'Deployment',
        metadata: { name: 'kube-svid-proxy', namespace: NS },
        spec: {
          replicas: 1,
          template: {
            spec: {
              hostNetwork: true,
              containers: [
                {
                  name: 'proxy',
                  env: [
                    { name: 'KUBERNETES_SERVICE_HOST', value: apiserver.hostname },
                    { name: 'KUBERNETES_SERVICE_PORT', value: apiserver.port },
                  ],
                },
              ],
            },
          },
        },
      }),
    );
    writeFileSync(
      join(proxyOverlay, 'kustomization.yaml'),
      stringify(
        kustomization(proxyOverlay, join(REPO, 'deploy', 'spoke', 'proxy'), [
          'impersonation-rbac.yaml',
          'environment.yaml',
        ]),
      ),
    );
    let step = Date.now();
    await node.kubectl(['apply', '-k', proxyOverlay]);
    await node.kubectl(['rollout', 'status', 'deployment/kube-svid-proxy', '-n', NS, '--timeout=180s'], {
      timeoutMs: 200_000,
    });
    timing('proxy Deployment rolled out', step);

    // Its one pod, Ready by the shipped readiness probe (/readyz on the admin port), with no file of the host:
    // the configuration and policy ConfigMaps, the agent's socket and the projected service-account token.
    interface ProxyPod extends PodStatus {
      readonly metadata: PodStatus['metadata'] & { readonly ownerReferences?: readonly { kind: string }[] };
      readonly spec: {
        readonly serviceAccountName: string;
        readonly volumes: readonly { name: string; hostPath?: { path: string }; projected?: unknown }[];
      };
    }
    const { items } = await kubectlJson<{ items: ProxyPod[] }>(
      'get',
      'pods',
      '-n',
      NS,
      '-l',
      'app.kubernetes.io/component=proxy',
    );
    assert.equal(items.length, 1);
    const pod = items[0] as ProxyPod;
    const name = pod.metadata.name;
    assert.deepEqual(
      pod.metadata.ownerReferences?.map((o) => o.kind),
      ['ReplicaSet'],
    );
    assert.ok(pod.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'));
    assert.equal(pod.spec.serviceAccountName, 'kube-svid-proxy');
    assert.deepEqual(
      pod.spec.volumes.filter((v) => v.hostPath).map((v) => v.hostPath?.path),
      [SOCKET_DIR],
    );
    assert.ok(pod.spec.volumes.some((v) => v.projected && v.name.startsWith('kube-api-access-')));
    const readyz = await fetch(`${ADMIN_URL}/readyz`);
    assert.equal(readyz.status, 200, await readyz.text());
    assert.match(await servedSan(8443), new RegExp(`URI:${PROXY_ID}(,|$)`));

    // Its upstream is upstream.inCluster: the URL from the env above, and the token the kubelet projected into
    // the pod, which kube-apiserver reads as the service account kube-svid-proxy bound to this very pod (a
    // SelfSubjectReview from inside the pod, with the files inCluster reads; the image has node and no shell).
    const startLine = (await node.kubectl(['logs', '-n', NS, name])).stdout
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as { msg?: string; upstream?: string })
      .find((l) => l.msg === 'proxy started');
    assert.equal(startLine?.upstream, apiserver.origin);
    const review = `
      const fs = require('node:fs');
      const dir = '/var/run/secrets/kubernetes.io/serviceaccount';
      const req = require('node:https').request({
        host: process.env.KUBERNETES_SERVICE_HOST,
        port: process.env.KUBERNETES_SERVICE_PORT,
        path: '/apis/authentication.k8s.io/v1/selfsubjectreviews',
        method: 'POST',
        ca: fs.readFileSync(dir + '/ca.crt'),
        headers: {
          authorization: 'Bearer ' + fs.readFileSync(dir + '/token', 'utf8').trim(),
          'content-type': 'application/json',
        },
      }, (res) => res.pipe(process.stdout));
      req.end(JSON.stringify({ apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' }));`;
    const { stdout: reviewed } = await node.kubectl([
      'exec',
      '-n',
      NS,
      name,
      '-c',
      'proxy',
      '--',
      '/usr/local/bin/node',
      '-e',
      review,
    ]);
    const userInfo = (
      JSON.parse(reviewed) as {
        status: { userInfo: { username: string; extra?: Record<string, string[]> } };
      }
    ).status.userInfo;
    assert.equal(userInfo.username, `system:serviceaccount:${NS}:kube-svid-proxy`);
    assert.deepEqual(userInfo.extra?.['authentication.kubernetes.io/pod-name'], [name]);

    // kubectl through it: the exec plugin's kubeconfig of before(), whose server 127.0.0.1:8443 is now this pod.
    step = Date.now();
    const who = JSON.parse(
      (
        await until('e2e:kubectl through the Deployment', 30_000, () =>
          kubectlAs(viaPlugin, ['auth', 'whoami', '-o', 'json']),
        )
      ).stdout,
    ) as { status: { userInfo: { username: string } } };
    assert.equal(who.status.userInfo.username, USER);
    const exec = await kubectlAs(viaPlugin, [
      'exec',
      '-n',
      TEST_NS,
      'shell',
      '--',
      'sh',
      '-c',
      'echo "hi from $(hostname)"',
    ]);
    assert.equal(exec.stdout, 'hi from shell\n');
    // Decided and audited by the Deployment's proxy: the exec in its log, impersonating the mapped user.
    const events = await until('the Deployment proxy audited the exec', 30_000, async () => {
      const all = await auditEvents(name);
      return all.some((e) => e.objectRef?.subresource === 'exec') ? all : undefined;
    });
    for (const e of events) assert.equal(e.impersonatedUser?.username, USER);
    assert.ok((await counter('ksp_decisions_total', 'rule="e2e-kubectl"')) >= 2);
    timing('kubectl through the Deployment', step);
    timing('the Deployment variant in all', started);
  });
});
