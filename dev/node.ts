/**
 * A real single-node Kubernetes cluster on this machine, for end-to-end tests: etcd and kube-apiserver
 * (dev/controlplane.ts), kube-controller-manager, kube-scheduler and a kubelet v1.33.13 built from the same Go
 * module (dev/peers/peers.ts), Debian's containerd, runc and CNI plugins (installed by dev/node/setup.ts when
 * missing), and images built here and imported into containerd (dev/node/images.ts): no registry is involved.
 *
 *   node dev/node.ts up [--product-image]   start one, print its kubeconfig, stop on Ctrl-C
 *   node dev/node.ts clean                  remove what a node whose process died left behind
 *
 * The node is `127.0.0.1` (the kubelet's --hostname-override; its serving certificate, signed by the cluster
 * CA, names 127.0.0.1 and it listens on 127.0.0.1:10250, where the agent's k8s attestor calls it). Pods get
 * addresses on a bridge (ksp0, 10.244.0.0/24: no gateway, no masquerade, so no way out of the node) or use the
 * host's network. No kube-proxy and no DNS run: Services have no virtual IPs here.
 *
 * One node per machine, shared: a lock file (/run/ksp-test-node.lock) holds the running node's state; a second process waits for it, and a start after a process that died cleans up after it
 * first (dev/node/cleanup.ts). In one process, startNode() calls share one node until the last close().
 * Everything lives in a new temporary directory (configuration, certificates, sockets, the kubelet's root,
 * containerd's root and state, the logs `<component>.log`), removed on close() with everything else the node
 * created on the host.
 */
import { spawn } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  Child,
  type ControlPlane,
  freePorts,
  get,
  startControlPlane,
  track,
  waitFor,
} from './controlplane.ts';
import {
  HOST_PATHS,
  leftovers,
  type NodeState,
  netnsNames,
  processStartTime,
  sweep,
} from './node/cleanup.ts';
import { CriClient } from './node/cri.ts';
import {
  BUSYBOX_IMAGE,
  busyboxArchive,
  importArchive,
  PAUSE_IMAGE,
  PRODUCT_IMAGE,
  pauseArchive,
  productArchive,
} from './node/images.ts';
import { ensureHostPackages, HOST, hostProblem, NodeUnavailableError } from './node/setup.ts';
import { type PeerName, PeerUnavailableError, peer } from './peers/peers.ts';

export { BUSYBOX_IMAGE, PAUSE_IMAGE, PRODUCT_IMAGE };

/** The node's name, and the address of its kubelet. */
export const NODE_NAME = '127.0.0.1';
/** The kubelet's port on 127.0.0.1 (its default; what the deploy/ manifests' agent.yaml calls). */
export const KUBELET_PORT = 10250;
/** The pods' network (host-local IPAM on the bridge). */
export const POD_CIDR = '10.244.0.0/24';
export const BRIDGE = 'ksp0';

export interface NodeOptions {
  /** Receives every line the node's processes print, prefixed `[kubelet] ` etc., and its progress. */
  readonly logger?: (line: string) => void;
  /**
   * Also import the product's image kube-svid-proxy:dev (deploy/image/build.ts). `{ build: false }` packs dist/
   * as it is instead of running `npm run build` first.
   */
  readonly productImage?: boolean | { readonly build: boolean };
  /** How long to wait for the node to be Ready; default 180 s. */
  readonly readyTimeoutMs?: number;
  /** How long to wait for another process's node to go; default 20 minutes. */
  readonly lockTimeoutMs?: number;
}

export interface Node {
  /** Admin kubeconfig (a system:masters token). */
  readonly kubeconfig: string;
  /** https://127.0.0.1:<port> */
  readonly apiserverUrl: string;
  /** The cluster CA (PEM): kube-apiserver's and the kubelet's serving certificates, client certificates. */
  readonly caPem: string;
  /** '127.0.0.1' */
  readonly nodeName: string;
  /** The kubelet's staticPodPath: a manifest written here runs as a static pod (mirror pod `<name>-127.0.0.1`). */
  readonly staticPodDir: string;
  /** The node's working directory (logs: `<component>.log`, and controlplane/ for etcd and kube-apiserver). */
  readonly dir: string;
  /** containerd's socket (`ctr --address`, CRI). */
  readonly containerdSocket: string;
  /** The control plane: tokens (admin, proxy), the proxy's kubeconfig, issue() for certificates. */
  readonly controlPlane: ControlPlane;
  /** CRI calls to containerd (list pods and containers, stop a container as `crictl stop` does). */
  readonly cri: CriClient;
  /** Milliseconds each phase of the bring-up took. */
  readonly timings: Readonly<Record<string, number>>;
  /** Runs kubectl as the admin; rejects with its stderr when it fails. */
  kubectl(
    args: readonly string[],
    options?: { readonly input?: string; readonly timeoutMs?: number },
  ): Promise<{ stdout: string; stderr: string }>;
  /** Imports an OCI or Docker image archive into the kubelet's containerd namespace (k8s.io). */
  importImage(archive: string): Promise<void>;
  /** A host path (e.g. a pod's hostPath directory) to remove when the node goes, even after a crash. */
  removeOnClose(path: string): void;
  /** Releases this handle; the last one stops the node and cleans up. Idempotent. */
  close(): Promise<void>;
}

interface LockContent extends Partial<NodeState> {
  readonly pid: number;
  readonly pidStart: string | undefined;
}

/**
 * Machine-wide, not in the cache directory: $KSP_CACHE_DIR may differ between two runs on one machine (a cold CI
 * measurement beside a developer's run), and the node's resources (port 10250, the kubepods cgroups, fixed host
 * paths) are the machine's. /run is cleared at boot, when nothing of a node survives anyway.
 */
export const LOCK_FILE = '/run/ksp-test-node.lock';

function lockPath(): string {
  return LOCK_FILE;
}

function holderAlive(content: LockContent): boolean {
  return content.pid !== process.pid && processStartTime(content.pid) === content.pidStart;
}

function readLock(path: string): LockContent | undefined {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as LockContent;
  } catch {
    return undefined;
  }
}

/** Cleans up after a node whose lock file is `path` (its process is gone), then removes the file. */
async function sweepStale(path: string, log: (line: string) => void): Promise<string[]> {
  // Renamed first: of two processes finding the same stale lock, one sweeps and the other retries.
  const mine = `${path}.stale.${process.pid}`;
  try {
    renameSync(path, mine);
  } catch {
    return [];
  }
  const content = readLock(mine);
  let problems: string[] = [];
  if (content?.dir !== undefined) {
    log(`cleaning up after the node of process ${content.pid} (${content.dir})`);
    problems = await sweep(
      {
        dir: content.dir,
        startedAt: content.startedAt ?? 0,
        createdHostPaths: content.createdHostPaths ?? [],
        netnsBefore: content.netnsBefore ?? [],
        bridge: content.bridge ?? BRIDGE,
        removeOnClose: content.removeOnClose ?? [],
      },
      log,
    );
  }
  unlinkSync(mine);
  return problems;
}

/** Takes the machine's node lock, waiting for a live holder and sweeping after a dead one. */
async function acquireLock(
  timeoutMs: number,
  log: (line: string) => void,
): Promise<(state: NodeState) => void> {
  const path = lockPath();
  const deadline = Date.now() + timeoutMs;
  let waiting = false;
  for (;;) {
    try {
      const fd = openSync(path, 'wx');
      writeFileSync(fd, JSON.stringify({ pid: process.pid, pidStart: processStartTime(process.pid) }));
      closeSync(fd);
      return (state) =>
        writeFileSync(
          path,
          JSON.stringify({ pid: process.pid, pidStart: processStartTime(process.pid), ...state }),
        );
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = readLock(path);
    if (holder !== undefined && holderAlive(holder)) {
      if (Date.now() > deadline)
        throw new Error(`the test node of process ${holder.pid} is still up after ${timeoutMs} ms (${path})`);
      // Always said, logger or not: a node left up by hand (`node dev/node.ts up`) holds up every test of it.
      if (!waiting)
        process.stderr.write(
          `[node] waiting up to ${Math.round(timeoutMs / 1000)} s for the test node of process ${holder.pid} to stop (${path})\n`,
        );
      waiting = true;
      await sleep(1_000);
      continue;
    }
    if (holder === undefined) {
      // Being written right now, or garbage: give a writer a moment, then treat it as stale.
      await sleep(200);
      if (readLock(path) !== undefined) continue;
    }
    const problems = await sweepStale(path, log);
    for (const problem of problems) log(`cleanup: ${problem}`);
  }
}

function binary(name: PeerName): string {
  const found = peer(name);
  if ('skip' in found) throw new PeerUnavailableError(found.skip);
  return found.path;
}

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

function kubeconfigWithCertificate(
  url: string,
  caPem: string,
  user: string,
  cert: { certPem: string; keyPem: string },
): string {
  const b64 = (s: string): string => Buffer.from(s).toString('base64');
  return `${JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'node', cluster: { server: url, 'certificate-authority-data': b64(caPem) } }],
      users: [
        {
          name: user,
          user: { 'client-certificate-data': b64(cert.certPem), 'client-key-data': b64(cert.keyPem) },
        },
      ],
      contexts: [{ name: user, context: { cluster: 'node', user } }],
      'current-context': user,
    },
    null,
    2,
  )}\n`;
}

function containerdConfig(dir: string, socket: string): string {
  const q = JSON.stringify;
  return `# The test node's containerd (dev/node.ts): its own root, state and socket; the CRI plugin for the kubelet.
version = 2
root = ${q(join(dir, 'containerd', 'root'))}
state = ${q(join(dir, 'containerd', 'state'))}
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = ${q(socket)}

[ttrpc]
  address = ${q(`${socket}.ttrpc`)}

[plugins."io.containerd.internal.v1.opt"]
  path = ${q(join(dir, 'containerd', 'opt'))}

[plugins."io.containerd.grpc.v1.cri"]
  # Built and imported by dev/node/images.ts: nothing is pulled.
  sandbox_image = ${q(PAUSE_IMAGE)}
  # Root here may not lower OOM scores: without this every pod fails with runc's
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = ${q(HOST.runc)}
        # The kubelet's cgroup driver is cgroupfs too.
        SystemdCgroup = false
        Root = ${q(join(dir, 'runc'))}

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = ${q(HOST.cniBinDir)}
    conf_dir = ${q(join(dir, 'cni', 'net.d'))}
    max_conf_num = 1
`;
}

function cniConfig(dir: string): string {
  return `${JSON.stringify(
    {
      cniVersion: '1.0.0',
      name: 'ksp',
      plugins: [
        {
          // Pods on one bridge, nothing routed or masqueraded: enough for pod-to-pod and for port-forward (which
          // enters the pod's network namespace). containerd adds the loopback interface itself (the loopback
          // plugin from the same directory).
          type: 'bridge',
          bridge: BRIDGE,
          isGateway: false,
          isDefaultGateway: false,
          ipMasq: false,
          hairpinMode: false,
          ipam: { type: 'host-local', ranges: [[{ subnet: POD_CIDR }]], dataDir: join(dir, 'cni', 'ipam') },
        },
      ],
    },
    null,
    2,
  )}\n`;
}

function kubeletConfig(dir: string, socket: string, caFile: string, healthzPort: number): string {
  return `${JSON.stringify(
    {
      apiVersion: 'kubelet.config.k8s.io/v1beta1',
      kind: 'KubeletConfiguration',
      address: NODE_NAME,
      port: KUBELET_PORT,
      readOnlyPort: 0,
      healthzBindAddress: '127.0.0.1',
      healthzPort,
      // Callers (kube-apiserver with its client certificate, the agent with a service account token) are
      // authenticated by certificate or TokenReview and authorized by SubjectAccessReview. Denials are cached for
      // a second only (default 30 s), so a test may grant access right before calling.
      authentication: {
        anonymous: { enabled: false },
        webhook: { enabled: true, cacheTTL: '10s' },
        x509: { clientCAFile: caFile },
      },
      authorization: { mode: 'Webhook', webhook: { cacheAuthorizedTTL: '10s', cacheUnauthorizedTTL: '1s' } },
      containerRuntimeEndpoint: `unix://${socket}`,
      cgroupDriver: 'cgroupfs',
      staticPodPath: join(dir, 'manifests'),
      fileCheckFrequency: '5s',
      // ConfigMap and Secret volumes follow edits within seconds (default a minute).
      syncFrequency: '10s',
      // No KUBE-FIREWALL and friends in the host's iptables.
      makeIPTablesUtilChains: false,
      failSwapOn: false,
      // Logs, plugins and the pods' files under the node's directory, not /var/log/pods or /usr/libexec.
      podLogsDirectory: join(dir, 'pod-logs'),
      volumePluginDir: join(dir, 'volume-plugins'),
      // Nothing can be pulled again: never collect images, and evict only when the machine is truly full.
      imageGCHighThresholdPercent: 100,
      imageGCLowThresholdPercent: 99,
      evictionHard: {
        'memory.available': '100Mi',
        'nodefs.available': '1%',
        'imagefs.available': '1%',
        'nodefs.inodesFree': '1%',
      },
      serializeImagePulls: false,
      clusterDomain: 'cluster.local',
      resolvConf: '/etc/resolv.conf',
      rotateCertificates: false,
      serverTLSBootstrap: false,
    },
    null,
    2,
  )}\n`;
}

interface Running {
  readonly api: Omit<Node, 'close'>;
  teardown(): Promise<void>;
  productImported: boolean;
}

let shared: { running: Promise<Running>; users: number } | undefined;
/** The teardown of this process's last node, which a new one waits for (it holds the lock until done). */
let lastTeardown: Promise<unknown> = Promise.resolve();

/**
 * Starts the node (or joins the one this process already runs) and waits until it is Ready and the `default`
 * service account exists. Throws NodeUnavailableError when this machine cannot run it (not root, packages
 * missing and not installable) and PeerUnavailableError without Go: tests use dev/skip.ts's nodeSkip() first.
 */
export async function startNode(options: NodeOptions = {}): Promise<Node> {
  if (shared === undefined) {
    const running = bringUp(options);
    shared = { running, users: 0 };
    running.catch(() => {
      shared = undefined;
    });
  }
  const entry = shared;
  entry.users += 1;
  let running: Running;
  try {
    running = await entry.running;
    if (options.productImage !== undefined && options.productImage !== false && !running.productImported) {
      const build = typeof options.productImage === 'object' ? options.productImage.build : true;
      await running.api.importImage(await productArchive({ build, log: options.logger }));
      running.productImported = true;
    }
  } catch (err) {
    entry.users -= 1;
    throw err;
  }
  let closing: Promise<void> | undefined;
  return {
    ...running.api,
    close: () => {
      closing ??= (async () => {
        entry.users -= 1;
        if (entry.users > 0) return;
        if (shared === entry) shared = undefined;
        const done = running.teardown();
        lastTeardown = done.catch(() => {});
        await done;
      })();
      return closing;
    },
  };
}

async function bringUp(options: NodeOptions): Promise<Running> {
  const logger = options.logger;
  const log = (line: string): void => logger?.(`[node] ${line}`);
  const timings: Record<string, number> = {};
  let mark = Date.now();
  const phase = (name: string): void => {
    const now = Date.now();
    timings[name] = now - mark;
    mark = now;
  };

  const problem = hostProblem();
  if (problem !== undefined) throw new NodeUnavailableError(problem);
  await ensureHostPackages(log);
  const binaries = {
    kubelet: binary('kubelet'),
    controllerManager: binary('kube-controller-manager'),
    scheduler: binary('kube-scheduler'),
  };
  // Every binary and image before anything starts: a failed (or a first, slow) build happens here.
  binary('etcd');
  binary('kube-apiserver');
  const archives = [pauseArchive(), busyboxArchive()];
  phase('peers and images');

  await lastTeardown;
  const writeLock = await acquireLock(options.lockTimeoutMs ?? 20 * 60_000, log);
  phase('lock');
  if (!(await portFree(KUBELET_PORT))) {
    rmSync(lockPath(), { force: true });
    throw new NodeUnavailableError(`port ${KUBELET_PORT} on 127.0.0.1 (the kubelet's) is taken`);
  }

  const dir = mkdtempSync(join(tmpdir(), 'ksp-node-'));
  const startedAt = Date.now();
  const existedBefore = new Set(HOST_PATHS.filter((p) => existsSync(p)));
  const netnsBefore = netnsNames();
  const removeOnClose: string[] = [];
  const state = (): NodeState => ({
    dir,
    startedAt,
    createdHostPaths: HOST_PATHS.filter((p) => !existedBefore.has(p)),
    netnsBefore,
    bridge: BRIDGE,
    removeOnClose,
  });
  writeLock(state());

  const sub = (...parts: string[]): string => {
    const path = join(dir, ...parts);
    mkdirSync(path, { recursive: true });
    return path;
  };
  const socket = join(sub('containerd'), 'containerd.sock');
  const staticPodDir = sub('manifests');
  const file = (name: string, content: string, mode = 0o600): string => {
    const path = join(dir, name);
    writeFileSync(path, content, { mode });
    return path;
  };

  const children: Child[] = [];
  let cp: ControlPlane | undefined;
  const cri = new CriClient(socket);
  let tornDown: Promise<void> | undefined;
  const teardown = (): Promise<void> => {
    tornDown ??= (async () => {
      const started = Date.now();
      const byName = (name: string): Child | undefined => children.find((c) => c.name === name);
      // The kubelet first, or it would start again what is being removed.
      await byName('kubelet')?.stop(10_000);
      if (byName('containerd')?.running === true) {
        try {
          const failed = await cri.removeAllPods();
          for (const f of failed) log(`could not remove pod ${f}`);
        } catch (err) {
          log(`could not list pods: ${(err as Error).message}`);
        }
      }
      cri.close();
      await byName('containerd')?.stop(10_000);
      for (const name of ['kube-controller-manager', 'kube-scheduler']) await byName(name)?.stop();
      await cp?.close();
      const problems = await sweep(state(), log);
      for (const p of problems) log(`cleanup: ${p}`);
      // What the sweep should have removed, looked for afresh.
      for (const left of leftovers(state())) if (!problems.some((p) => p.includes(left))) problems.push(left);
      rmSync(lockPath(), { force: true });
      log(`stopped and cleaned up in ${Date.now() - started} ms`);
      if (problems.length > 0) throw new Error(`the test node left: ${problems.join('; ')}`);
    })();
    return tornDown;
  };

  const start = (name: string, bin: string, args: readonly string[]): Child => {
    const child = new Child(name, bin, args, dir, logger);
    children.push(child);
    track(child);
    return child;
  };

  try {
    const [healthzPort = 0, kcmPort = 0, schedulerPort = 0] = await freePorts(3);
    // containerd, with the images imported, while etcd and kube-apiserver start.
    file('containerd.toml', containerdConfig(dir, socket), 0o644);
    writeFileSync(join(sub('cni', 'net.d'), '10-ksp.conflist'), cniConfig(dir), { mode: 0o644 });
    const runtime = (async () => {
      const containerd = start('containerd', HOST.containerd, ['--config', join(dir, 'containerd.toml')]);
      await waitFor('containerd', [containerd], 30_000, async () => {
        const v = await cri.version();
        return v.runtime_name === 'containerd' ? true : JSON.stringify(v);
      });
      const began = Date.now();
      for (const archive of archives) await importArchive(socket, archive);
      timings['image import'] = Date.now() - began;
    })();
    const controlPlane = startControlPlane({
      dir: join(dir, 'controlplane'),
      logger,
      node: { name: NODE_NAME },
      readyTimeoutMs: options.readyTimeoutMs ?? 180_000,
    });
    const [cpResult, runtimeResult] = await Promise.allSettled([controlPlane, runtime]);
    if (cpResult.status === 'fulfilled') cp = cpResult.value;
    if (cpResult.status === 'rejected') throw cpResult.reason;
    if (runtimeResult.status === 'rejected') throw runtimeResult.reason;
    if (cp === undefined) throw new Error('unreachable');
    phase('control plane and containerd');

    const issueKubeconfig = async (name: string, user: string, groups: string[]): Promise<string> => {
      if (cp === undefined) throw new Error('unreachable');
      const cert = await cp.issue({ commonName: user, organizations: groups, usage: 'client' });
      return file(`${name}.kubeconfig`, kubeconfigWithCertificate(cp.url, cp.caPem, user, cert));
    };
    const kcmKubeconfig = await issueKubeconfig(
      'kube-controller-manager',
      'system:kube-controller-manager',
      [],
    );
    const schedulerKubeconfig = await issueKubeconfig('kube-scheduler', 'system:kube-scheduler', []);
    const kubeletKubeconfig = await issueKubeconfig('kubelet', `system:node:${NODE_NAME}`, ['system:nodes']);
    // The kubelet's serving certificate, signed by the cluster CA (what kube-root-ca.crt holds, so the agent's
    // attestor can check it with the CA pods are given), naming 127.0.0.1. The kubelet uses kubelet.crt and
    // kubelet.key in --cert-dir when they exist.
    const certDir = sub('kubelet-pki');
    const serving = await cp.issue({
      commonName: NODE_NAME,
      usage: 'server',
      ipAddresses: ['127.0.0.1'],
      dnsNames: ['localhost'],
    });
    writeFileSync(join(certDir, 'kubelet.crt'), serving.certPem, { mode: 0o644 });
    writeFileSync(join(certDir, 'kubelet.key'), serving.keyPem, { mode: 0o600 });

    start('kube-controller-manager', binaries.controllerManager, [
      `--kubeconfig=${kcmKubeconfig}`,
      '--bind-address=127.0.0.1',
      `--secure-port=${kcmPort}`,
      `--cert-dir=${sub('kube-controller-manager-certs')}`,
      '--leader-elect=false',
      // Each controller with its own service account and role, as kubeadm runs it.
      '--use-service-account-credentials=true',
      `--service-account-private-key-file=${cp.files.serviceAccountKey}`,
      // Published as the ConfigMap kube-root-ca.crt in every namespace.
      `--root-ca-file=${cp.files.ca}`,
      `--cluster-signing-cert-file=${cp.files.ca}`,
      `--cluster-signing-key-file=${cp.files.caKey}`,
      // Else it creates /usr/libexec/kubernetes/kubelet-plugins/volume/exec.
      `--flex-volume-plugin-dir=${sub('flexvolume')}`,
      '--profiling=false',
    ]);
    start('kube-scheduler', binaries.scheduler, [
      `--kubeconfig=${schedulerKubeconfig}`,
      '--bind-address=127.0.0.1',
      `--secure-port=${schedulerPort}`,
      `--cert-dir=${sub('kube-scheduler-certs')}`,
      '--leader-elect=false',
      '--profiling=false',
    ]);
    const kubeletConfigFile = file(
      'kubelet-config.json',
      kubeletConfig(dir, socket, cp.files.ca, healthzPort),
      0o644,
    );
    start('kubelet', binaries.kubelet, [
      `--config=${kubeletConfigFile}`,
      `--kubeconfig=${kubeletKubeconfig}`,
      // Not --node-ip=127.0.0.1, which the kubelet refuses: with this its node address is 127.0.0.1 too.
      `--hostname-override=${NODE_NAME}`,
      `--cert-dir=${certDir}`,
      `--root-dir=${sub('kubelet')}`,
    ]);

    const readyTimeoutMs = options.readyTimeoutMs ?? 180_000;
    const token = cp.adminToken;
    const caPem = cp.caPem;
    const url = cp.url;
    await waitFor('kubelet /healthz', children, readyTimeoutMs, async () => {
      const res = await get(`http://127.0.0.1:${healthzPort}/healthz`);
      return res.status === 200 ? true : `${res.status} ${res.body}`;
    });
    phase('kubelet healthy');
    await waitFor(`node ${NODE_NAME} Ready`, children, readyTimeoutMs, async () => {
      const res = await get(`${url}/api/v1/nodes/${NODE_NAME}`, { token, caPem });
      if (res.status !== 200) return `${res.status}`;
      const node = JSON.parse(res.body) as {
        status?: { conditions?: { type: string; status: string; message?: string }[] };
      };
      const ready = node.status?.conditions?.find((c) => c.type === 'Ready');
      return ready?.status === 'True' ? true : `Ready=${ready?.status}: ${ready?.message ?? ''}`;
    });
    phase('node Ready');
    for (const [what, path] of [
      ['the default service account', '/api/v1/namespaces/default/serviceaccounts/default'],
      ['kube-root-ca.crt', '/api/v1/namespaces/default/configmaps/kube-root-ca.crt'],
    ] as const) {
      await waitFor(what, children, readyTimeoutMs, async () => {
        const res = await get(`${url}${path}`, { token, caPem });
        return res.status === 200 ? true : `${res.status}`;
      });
    }
    for (const [name, port] of [
      ['kube-controller-manager', kcmPort],
      ['kube-scheduler', schedulerPort],
    ] as const) {
      await waitFor(`${name} /healthz`, children, readyTimeoutMs, async () => {
        const res = await get(`https://127.0.0.1:${port}/healthz`, { insecure: true });
        return res.status === 200 ? true : `${res.status} ${res.body}`;
      });
    }
    phase('controllers ready');

    const kubeconfig = cp.kubeconfig('admin');
    const kubectlCache = join(dir, 'kubectl-cache');
    const controlPlaneHandle = cp;
    const api: Omit<Node, 'close'> = {
      kubeconfig,
      apiserverUrl: url,
      caPem,
      nodeName: NODE_NAME,
      staticPodDir,
      dir,
      containerdSocket: socket,
      controlPlane: controlPlaneHandle,
      cri,
      timings,
      kubectl: (args, opts = {}) =>
        kubectl([`--kubeconfig=${kubeconfig}`, `--cache-dir=${kubectlCache}`, ...args], opts),
      importImage: (archive) => importArchive(socket, archive),
      removeOnClose: (path) => {
        removeOnClose.push(path);
        writeLock(state());
      },
    };
    return { api, teardown, productImported: false };
  } catch (err) {
    await teardown().catch((e: unknown) => log(`cleanup after the failed start: ${(e as Error).message}`));
    const reason = err instanceof Error ? err.message : String(err);
    const logs = children.map((c) => c.logFile).join(', ');
    throw new Error(`the test node failed to start (${reason}); logs were in ${logs || dir}`, { cause: err });
  }
}

/** kubectl with stdin, never blocking this process; rejects with stderr on failure. */
function kubectl(
  args: readonly string[],
  options: { readonly input?: string; readonly timeoutMs?: number },
): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('kubectl', args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 120_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve({ stdout, stderr });
      else
        reject(
          Object.assign(
            new Error(`kubectl ${args.slice(2).join(' ')} failed (${signal ?? code}): ${stderr.trim()}`),
            {
              stdout,
              stderr,
              code,
            },
          ),
        );
    });
    child.stdin.end(options.input ?? '');
  });
}

/** Cleans up after a node whose process died, if any (the lock file says); returns what it could not remove. */
export async function cleanStaleNode(log: (line: string) => void = () => {}): Promise<string[]> {
  const content = readLock(lockPath());
  if (content === undefined) return [];
  if (holderAlive(content)) throw new Error(`the node of process ${content.pid} is running`);
  return sweepStale(lockPath(), log);
}

if (import.meta.main) {
  const command = process.argv[2];
  const say = (line: string): void => void process.stderr.write(`${line}\n`);
  if (command === 'clean') {
    const problems = await cleanStaleNode(say);
    say(problems.length === 0 ? 'nothing left behind' : problems.join('\n'));
    process.exit(problems.length === 0 ? 0 : 1);
  } else if (command === 'up') {
    const started = Date.now();
    const node = await startNode({
      logger: (line) => {
        if (line.startsWith('[node] ')) say(line);
      },
      productImage: process.argv.includes('--product-image'),
    });
    process.stdout.write(
      `node ${node.nodeName} Ready in ${((Date.now() - started) / 1000).toFixed(1)} s; kube-apiserver at ${node.apiserverUrl}\n` +
        `  export KUBECONFIG=${node.kubeconfig}\n` +
        `  kubectl run -it --rm sh --image=${BUSYBOX_IMAGE} --image-pull-policy=Never --restart=Never -- sh\n` +
        `  static pods: ${node.staticPodDir}\n` +
        `  containerd:  ctr --address ${node.containerdSocket} -n k8s.io containers ls\n` +
        `  logs:        ${node.dir}/*.log, ${node.dir}/controlplane/*.log\n` +
        'Ctrl-C stops it and cleans up.\n',
    );
    const stop = (): void => {
      say('stopping ...');
      node.close().then(
        () => process.exit(0),
        (err: unknown) => {
          say((err as Error).message);
          process.exit(1);
        },
      );
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  } else {
    say('usage: node dev/node.ts up [--product-image] | clean');
    process.exit(2);
  }
}
