/**
 * Finding the caller's container (and pod) from its cgroups, as SPIRE's container locator does: the cgroup
 * paths of /proc/<pid>/cgroup, or failing that the roots of its cgroup mounts in /proc/<pid>/mountinfo.
 */
import { AgentError, AgentErrorCode } from '../errors.ts';
import { readCgroup, readMountinfo } from './proc.ts';

/** Where the caller runs, as its cgroups tell: the container, and the pod when the path names it. */
export interface ContainerLocation {
  readonly containerId: string;
  /** Absent when the path does not carry the pod UID (cri-o without it, or the agent's own pod). */
  readonly podUid?: string;
}

// Facts (from SPIRE's container locator): the container ID is a 64-hex-digit token, usually in the last path
// segment, possibly with a runtime prefix (`cri-containerd-`, `crio-`, `docker-`) and a `.scope` suffix, or
// after a colon (`...slice:cri-containerd:<id>`). The pod UID is `pod<uuid>` in an earlier segment (or the
// same one), its dashes written as underscores by the systemd cgroup driver. Paths may start with `/..`
// when read from inside a cgroup namespace.

const CONTAINER_ID = /\b([0-9a-fA-F]{64})\b/;
const POD_UID =
  /\bpod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})\b/;

/** The cgroup paths of /proc/<pid>/cgroup (`hierarchy:controllers:path`; the path may itself hold colons). */
export function parseCgroupPaths(text: string): string[] {
  const paths: string[] = [];
  for (const line of text.split('\n')) {
    const first = line.indexOf(':');
    const second = first < 0 ? -1 : line.indexOf(':', first + 1);
    if (second < 0) {
      continue;
    }
    paths.push(line.slice(second + 1));
  }
  return paths;
}

function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(Number.parseInt(octal, 8)));
}

/**
 * The roots of the cgroup and cgroup2 mounts in /proc/<pid>/mountinfo. With a private cgroup namespace
 * /proc/<pid>/cgroup only says `0::/`, but the root of the container's cgroup mount still shows where it is.
 */
export function parseMountinfoCgroupRoots(text: string): string[] {
  const roots: string[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
    const separator = fields.indexOf('-', 6);
    const root = fields[3];
    const fsType = separator < 0 ? undefined : fields[separator + 1];
    if (root === undefined || (fsType !== 'cgroup' && fsType !== 'cgroup2')) {
      continue;
    }
    roots.push(unescapeMountField(root));
  }
  return roots;
}

/** Pod UID and container ID in one cgroup path, walking its segments from the end. */
export function locateInCgroupPath(path: string): ContainerLocation | undefined {
  const segments = path.split('/');
  let index = segments.length - 1;
  let containerId: string | undefined;
  let before = '';
  for (; index >= 0; index--) {
    const segment = segments[index] ?? '';
    const match = CONTAINER_ID.exec(segment);
    if (match?.[1] !== undefined) {
      containerId = match[1];
      before = segment.slice(0, match.index);
      break;
    }
  }
  if (containerId === undefined) {
    return undefined;
  }
  // The pod UID is in what precedes the container ID: the rest of its segment, then earlier segments.
  const candidates = [before, ...segments.slice(0, index).reverse()];
  for (const candidate of candidates) {
    const pod = POD_UID.exec(candidate);
    if (pod?.[1] !== undefined) {
      return { containerId, podUid: pod[1].replaceAll('_', '-') };
    }
  }
  return { containerId };
}

/**
 * One answer from several cgroup paths. Paths naming a pod outrank paths that do not (kind on Docker shows
 * the Docker container of the node itself on the unified line); the rest must agree, or there is no answer.
 */
export function locateContainer(paths: readonly string[]): ContainerLocation | undefined {
  const found = paths.flatMap((path) => {
    const location = locateInCgroupPath(path);
    return location === undefined ? [] : [location];
  });
  const withPod = found.filter((location) => location.podUid !== undefined);
  const chosen = withPod.length > 0 ? withPod : found;
  const first = chosen[0];
  if (first === undefined) {
    return undefined;
  }
  for (const other of chosen) {
    if (other.containerId !== first.containerId) {
      throw new AgentError(
        AgentErrorCode.Attestation,
        `cgroups name more than one container (${first.containerId}, ${other.containerId})`,
      );
    }
    if (other.podUid !== first.podUid) {
      throw new AgentError(
        AgentErrorCode.Attestation,
        `cgroups name more than one pod (${first.podUid ?? 'none'}, ${other.podUid ?? 'none'})`,
      );
    }
  }
  return first;
}

/** Where process `pid` runs: from its cgroup paths, else from the roots of its cgroup mounts; undefined outside a container. */
export async function locateProcess(pid: number, procRoot: string): Promise<ContainerLocation | undefined> {
  const fromCgroup = locateContainer(parseCgroupPaths(await readCgroup(pid, procRoot)));
  if (fromCgroup !== undefined) {
    return fromCgroup;
  }
  return locateContainer(parseMountinfoCgroupRoots(await readMountinfo(pid, procRoot)));
}
