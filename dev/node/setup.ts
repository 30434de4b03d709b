/**
 * What the test node (dev/node.ts) needs from the host, and the project's own setup for it: Debian's containerd,
 * runc, CNI plugins and a static busybox, installed with apt-get when missing (as root), so that `.ci/run`
 * (`npm ci`, `npm test`) works on a fresh Debian machine without a step of its own.
 *
 *   node dev/node/setup.ts          install what is missing (root), or say what is
 *
 * Everything else the node runs is built from Go modules (dev/peers/peers.ts) or by us (dev/node/images.ts).
 */
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { peersRequired } from '../peers/peers.ts';

const run = promisify(execFile);

/** Debian packages the node needs, and why. */
export const HOST_PACKAGES = {
  /** The container runtime (CRI plugin built in) and its `ctr` client, which imports our image archives. */
  containerd: ['/usr/bin/containerd', '/usr/bin/ctr'],
  /** The OCI runtime containerd's runc shim runs. */
  runc: ['/usr/sbin/runc'],
  /** `bridge`, `host-local` and `loopback` for the pod network. */
  'containernetworking-plugins': ['/usr/lib/cni/bridge', '/usr/lib/cni/host-local', '/usr/lib/cni/loopback'],
  /** The only program of the image ksp.local/busybox. */
  'busybox-static': ['/bin/busybox'],
} as const satisfies Record<string, readonly string[]>;

export type HostPackage = keyof typeof HOST_PACKAGES;

/** Where the node finds them (Debian's paths). */
export const HOST = {
  containerd: '/usr/bin/containerd',
  ctr: '/usr/bin/ctr',
  runc: '/usr/sbin/runc',
  cniBinDir: '/usr/lib/cni',
  busybox: '/bin/busybox',
} as const;

/** The node cannot run here (not root, not Linux, a package missing and not installable, …). */
export class NodeUnavailableError extends Error {
  override name = 'NodeUnavailableError';
}

/** Packages whose files are missing (checked by file, so a package installed another way counts). */
export function missingPackages(): HostPackage[] {
  return (Object.keys(HOST_PACKAGES) as HostPackage[]).filter((name) =>
    HOST_PACKAGES[name].some((file) => !existsSync(file)),
  );
}

function isRoot(): boolean {
  return process.getuid?.() === 0;
}

function isDebian(): boolean {
  try {
    return /^(ID|ID_LIKE)=.*\bdebian\b/m.test(readFileSync('/etc/os-release', 'utf8'));
  } catch {
    return false;
  }
}

interface ExecFailure {
  readonly stdout?: string;
  readonly stderr?: string;
  readonly message: string;
}

async function aptGet(args: readonly string[], log: (line: string) => void): Promise<void> {
  log(`apt-get ${args.join(' ')}`);
  await run('apt-get', [...args], {
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    maxBuffer: 64 * 1024 * 1024,
  });
}

/** apt-get's ways of saying its package lists are missing or stale. */
const STALE_LISTS = /Unable to locate package|has no installation candidate|404\s+Not Found|Failed to fetch/;

/**
 * Installs the missing packages (root on Debian: `apt-get install -y --no-install-recommends`, and
 * `apt-get update` first only when that fails for missing or stale package lists). Throws NodeUnavailableError
 * when they are missing and cannot be installed here, saying why.
 */
export async function ensureHostPackages(log: (line: string) => void = () => {}): Promise<void> {
  const missing = missingPackages();
  if (missing.length === 0) return;
  const what = `the test node needs Debian's ${missing.join(', ')}`;
  if (!isRoot())
    throw new NodeUnavailableError(
      `${what}; as root: apt-get install -y --no-install-recommends ${missing.join(' ')}`,
    );
  if (!isDebian() || !existsSync('/usr/bin/apt-get'))
    throw new NodeUnavailableError(`${what}, and this is not a Debian system with apt-get`);
  const install = ['install', '-y', '--no-install-recommends', ...missing];
  try {
    await aptGet(install, log);
  } catch (err) {
    const failure = err as ExecFailure;
    const output = `${failure.stdout ?? ''}\n${failure.stderr ?? ''}`;
    if (!STALE_LISTS.test(output)) throw installFailed(what, failure);
    try {
      await aptGet(['update'], log);
      await aptGet(install, log);
    } catch (again) {
      throw installFailed(what, again as ExecFailure);
    }
  }
  const still = missingPackages();
  if (still.length > 0)
    throw new NodeUnavailableError(
      `apt-get installed ${missing.join(', ')} but ${still.join(', ')} is incomplete`,
    );
}

function installFailed(what: string, failure: ExecFailure): NodeUnavailableError {
  const tail = (failure.stderr ?? failure.message).trim().split('\n').slice(-5).join('\n  ');
  return new NodeUnavailableError(`${what} and apt-get failed:\n  ${tail}`);
}

/**
 * Why the node cannot run on this machine, apart from packages: it needs root (containerd, runc, mounts,
 * cgroups), Linux with cgroups mounted, and the kubelet's port 10250 free (the agent's k8s attestor calls the
 * kubelet there). Undefined when it can.
 */
export function hostProblem(): string | undefined {
  if (process.platform !== 'linux') return `the test node needs Linux (this is ${process.platform})`;
  if (!isRoot()) return 'the test node runs containerd, runc and the kubelet, which need root';
  if (!existsSync('/sys/fs/cgroup')) return 'the test node needs cgroups mounted at /sys/fs/cgroup';
  return undefined;
}

/**
 * For tests (through dev/skip.ts): the host set up for the node (installing what is missing), or why not.
 * Under KSP_REQUIRE_PEERS=1 (CI) every reason is a failure instead.
 */
export async function prepareHost(log?: (line: string) => void): Promise<string | false> {
  const problem = hostProblem();
  try {
    if (problem !== undefined) throw new NodeUnavailableError(problem);
    await ensureHostPackages(log);
    return false;
  } catch (err) {
    if (err instanceof NodeUnavailableError && !peersRequired())
      return `${err.message}; set KSP_REQUIRE_PEERS=1 to make this a failure`;
    throw err;
  }
}

if (import.meta.main) {
  const missing = missingPackages();
  if (missing.length === 0) {
    process.stdout.write(`host packages present: ${Object.keys(HOST_PACKAGES).join(', ')}\n`);
  } else {
    await ensureHostPackages((line) => process.stderr.write(`${line}\n`));
    process.stdout.write(`installed: ${missing.join(', ')}\n`);
  }
  const problem = hostProblem();
  if (problem !== undefined) process.stdout.write(`but: ${problem}\n`);
}
