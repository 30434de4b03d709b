/**
 * Leaving the machine as the test node found it. A node changes the host in ways that outlive its processes:
 * containerd's shims (daemons by design) and the containers under them, mounts (the kubelet's root directory,
 * pod volumes, container root file systems, network namespaces under /run/netns), the `kubepods` cgroups, the
 * CNI bridge, shim sockets in /run/containerd/s, and directories the kubelet and CNI create at fixed paths
 * (/var/lib/kubelet/device-plugins, /var/log/containers, /var/lib/cni). dev/node.ts stops what it can the
 * kubelet's way first (CRI StopPodSandbox and RemovePodSandbox); `sweep` then removes whatever is left, and is
 * also what a later start runs after a node whose process died (its state is in the node's lock file).
 *
 * Never touched: iptables (the kubelet is told not to write rules), anything that does not name the node's
 * directory, and host paths that existed before the node started (beyond the kubelet's device-plugins).
 */
import { execFile } from 'node:child_process';
import {
  existsSync,
  lstatSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmdirSync,
  rmSync,
  statSync,
  unlinkSync,
} from 'node:fs';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** Host paths the node's processes may create; the ones that did not exist before are removed on teardown. */
export const HOST_PATHS = [
  '/var/lib/kubelet',
  '/var/log/containers',
  '/var/log/pods',
  '/var/lib/cni',
  '/run/netns',
  '/run/containerd',
  '/etc/cni',
  '/opt/cni',
  '/opt/containerd',
  '/usr/libexec/kubernetes',
] as const;

/** Everything a sweep needs to know about a node, kept in its lock file so a later process can clean up. */
export interface NodeState {
  /** The node's working directory: configuration, sockets, the kubelet's root, containerd's root and state. */
  readonly dir: string;
  /** Milliseconds since the epoch. */
  readonly startedAt: number;
  /** HOST_PATHS that did not exist when it started. */
  readonly createdHostPaths: readonly string[];
  /** Network namespaces in /run/netns when it started. */
  readonly netnsBefore: readonly string[];
  /** The CNI bridge. */
  readonly bridge: string;
  /** More paths to remove (recursively), e.g. hostPath directories tests' pods created. */
  readonly removeOnClose: readonly string[];
}

/** Executables of the node: a process of one of these whose command line names the node's directory is its. */
const NODE_EXECUTABLES = new Set([
  'kubelet',
  'containerd',
  'containerd-shim-runc-v2',
  'containerd-shim',
  'ctr',
  'kube-apiserver',
  'kube-controller-manager',
  'kube-scheduler',
  'etcd',
]);

function pids(): number[] {
  return readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .map(Number)
    .filter((pid) => pid !== process.pid);
}

function cmdline(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
  } catch {
    return [];
  }
}

/** Start time of a process (clock ticks since boot), to tell it from a later process with the same pid. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces and parentheses): state is field 3, starttime 22.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** The node's processes still running: its binaries whose command line names its directory. */
export function nodeProcesses(dir: string): { pid: number; name: string }[] {
  const found: { pid: number; name: string }[] = [];
  for (const pid of pids()) {
    const args = cmdline(pid);
    const name = basename(args[0] ?? '');
    if (NODE_EXECUTABLES.has(name) && args.some((arg) => arg.includes(dir))) found.push({ pid, name });
  }
  return found;
}

function kill(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // Gone already.
  }
}

/** Mount points of the cgroup hierarchies (v1 controllers and the v2 unified one). */
function cgroupRoots(): string[] {
  return mounts()
    .filter((m) => m.fstype === 'cgroup' || m.fstype === 'cgroup2')
    .map((m) => m.mountPoint);
}

/** Directories of a cgroup tree, deepest first. */
function cgroupTree(dir: string): string[] {
  const below: string[] = [];
  let entries: string[];
  try {
    entries = readdirSync(dir, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name);
  } catch {
    return [];
  }
  for (const name of entries) below.push(...cgroupTree(join(dir, name)));
  return [...below, dir];
}

/** Processes in the kubelet's `kubepods` cgroups: the pods' containers. */
function podProcesses(): number[] {
  const found = new Set<number>();
  for (const root of cgroupRoots()) {
    for (const dir of cgroupTree(join(root, 'kubepods'))) {
      try {
        for (const line of readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n'))
          if (/^\d+$/.test(line)) found.add(Number(line));
      } catch {
        // Removed meanwhile.
      }
    }
  }
  return [...found];
}

/** Removes the `kubepods` cgroups (empty by then); returns those that would not go. */
function removePodCgroups(): string[] {
  const left: string[] = [];
  for (const root of cgroupRoots()) {
    for (const dir of cgroupTree(join(root, 'kubepods'))) {
      try {
        rmdirSync(dir);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') left.push(dir);
      }
    }
  }
  return left;
}

interface Mount {
  readonly mountPoint: string;
  readonly fstype: string;
}

/** /proc/self/mountinfo: mount point (field 5, octal escapes undone) and file system type (after " - "). */
export function mounts(): Mount[] {
  const decode = (s: string): string =>
    s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(Number.parseInt(oct, 8)));
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const fields = line.split(' ');
      const dash = fields.indexOf('-');
      return { mountPoint: decode(fields[4] ?? ''), fstype: fields[dash + 1] ?? '' };
    });
}

export function mountsUnder(dir: string): string[] {
  return mounts()
    .map((m) => m.mountPoint)
    .filter((mp) => mp === dir || mp.startsWith(`${dir}/`));
}

/** Unmounts everything under `dir`, deepest first (lazily when busy); returns what is still mounted. */
async function unmountUnder(dir: string): Promise<string[]> {
  for (let pass = 0; pass < 5; pass++) {
    const left = [...new Set(mountsUnder(dir))].sort((a, b) => b.length - a.length);
    if (left.length === 0) return [];
    for (const mountPoint of left) {
      try {
        await run('umount', [mountPoint]);
      } catch {
        await run('umount', ['--lazy', mountPoint]).catch(() => {});
      }
    }
  }
  return mountsUnder(dir);
}

export function netnsNames(): string[] {
  try {
    return readdirSync('/run/netns');
  } catch {
    return [];
  }
}

/** Bound UNIX socket paths (/proc/net/unix), to tell a live shim socket from a stale one. */
function boundSockets(): Set<string> {
  const bound = new Set<string>();
  try {
    for (const line of readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1)) {
      const path = line.trim().split(/\s+/)[7];
      if (path?.startsWith('/')) bound.add(path);
    }
  } catch {
    // No /proc/net/unix: leave the sockets.
  }
  return bound;
}

async function deleteLink(name: string): Promise<boolean> {
  if (!existsSync(`/sys/class/net/${name}`)) return false;
  await run('ip', ['link', 'delete', name]);
  return true;
}

/**
 * Removes what is left of a node whose processes have stopped (or are to be killed): see the file comment.
 * Returns what it could not remove; the node's directory is removed only when nothing is mounted under it.
 */
export async function sweep(state: NodeState, log: (line: string) => void = () => {}): Promise<string[]> {
  const problems: string[] = [];
  // 1. Processes: the node's binaries (shims included), then whatever still runs in the pods' cgroups.
  for (let round = 0; round < 20; round++) {
    const left = [...nodeProcesses(state.dir).map((p) => p.pid), ...podProcesses()];
    if (left.length === 0) break;
    if (round === 0) log(`killing ${left.length} process(es) left by the node`);
    for (const pid of left) kill(pid);
    await sleep(250);
    if (round === 19) problems.push(`processes still running: ${left.join(', ')}`);
  }
  // 2. Mounts: network namespaces the node's pods had, then everything under its directory.
  for (const name of netnsNames()) {
    if (state.netnsBefore.includes(name) || !name.startsWith('cni-')) continue;
    const path = join('/run/netns', name);
    await unmountUnder(path);
    try {
      unlinkSync(path);
    } catch (err) {
      problems.push(`${path}: ${(err as Error).message}`);
    }
  }
  const mounted = await unmountUnder(state.dir);
  if (mounted.length > 0) problems.push(`still mounted: ${mounted.join(', ')}`);
  // 3. Cgroups, the bridge, shim sockets.
  const cgroups = removePodCgroups();
  if (cgroups.length > 0) problems.push(`cgroups left: ${cgroups.join(', ')}`);
  try {
    if (await deleteLink(state.bridge)) log(`deleted the bridge ${state.bridge}`);
  } catch (err) {
    problems.push(`bridge ${state.bridge}: ${(err as Error).message}`);
  }
  const bound = boundSockets();
  try {
    for (const name of readdirSync('/run/containerd/s')) {
      const path = join('/run/containerd/s', name);
      const st = lstatSync(path);
      if (st.isSocket() && !bound.has(path) && st.mtimeMs >= state.startedAt - 1_000) unlinkSync(path);
    }
  } catch {
    // No shim socket directory.
  }
  // 4. Fixed host paths: what the node created, the kubelet's device-plugins, the log symlinks into its pods.
  rmSync('/var/lib/kubelet/device-plugins', { recursive: true, force: true });
  try {
    for (const name of readdirSync('/var/log/containers')) {
      const path = join('/var/log/containers', name);
      if (lstatSync(path).isSymbolicLink() && readlinkSync(path).startsWith(state.dir)) unlinkSync(path);
    }
  } catch {
    // None.
  }
  for (const path of [...state.removeOnClose, ...state.createdHostPaths]) {
    const left = await unmountUnder(path);
    if (left.length > 0) {
      problems.push(`${path} not removed, still mounted: ${left.join(', ')}`);
      continue;
    }
    rmSync(path, { recursive: true, force: true });
  }
  // 5. The node's directory, unless something is still mounted there (rm would reach into the mount).
  if (mounted.length === 0) rmSync(state.dir, { recursive: true, force: true });
  else problems.push(`${state.dir} kept`);
  return problems;
}

/** What `sweep` would find: for tests that check a teardown left nothing behind. */
export function leftovers(state: NodeState): string[] {
  const found: string[] = [];
  for (const p of nodeProcesses(state.dir)) found.push(`process ${p.pid} (${p.name})`);
  for (const pid of podProcesses()) found.push(`process ${pid} in kubepods`);
  for (const mp of mountsUnder(state.dir)) found.push(`mount ${mp}`);
  for (const name of netnsNames())
    if (!state.netnsBefore.includes(name) && name.startsWith('cni-')) found.push(`netns ${name}`);
  for (const root of cgroupRoots())
    if (existsSync(join(root, 'kubepods'))) found.push(`cgroup ${root}/kubepods`);
  if (existsSync(`/sys/class/net/${state.bridge}`)) found.push(`link ${state.bridge}`);
  if (existsSync('/var/lib/kubelet/device-plugins')) found.push('/var/lib/kubelet/device-plugins');
  for (const path of [...state.createdHostPaths, ...state.removeOnClose])
    if (existsSync(path)) found.push(path);
  if (existsSync(state.dir)) found.push(state.dir);
  try {
    const bound = boundSockets();
    for (const name of readdirSync('/run/containerd/s')) {
      const path = join('/run/containerd/s', name);
      if (!bound.has(path) && statSync(path).mtimeMs >= state.startedAt - 1_000) found.push(`socket ${path}`);
    }
  } catch {
    // No shim socket directory.
  }
  return found;
}
