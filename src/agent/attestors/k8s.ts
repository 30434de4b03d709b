/**
 * The `k8s` workload attestor, modelled on SPIRE's: find the caller's pod UID and container ID in its cgroup
 * paths (or, failing that, in the roots of its cgroup mounts), then ask the local kubelet (`GET /pods`) what
 * that pod and container are, and turn the answer into `k8s:` selectors.
 *
 * A process outside any container gets no selectors (the attestor does not apply). A container the kubelet
 * does not list yet (it has just started) is asked for again, every `pollIntervalMs`, `maxPollAttempts` times.
 *
 * The kubelet is called with the service account token, read afresh for every request so rotation works;
 * the token never appears in a message or a selector.
 */

import { readFile } from 'node:fs/promises';
import { request } from 'node:https';
import { setTimeout as sleep } from 'node:timers/promises';
import { checkServerIdentity, type PeerCertificate } from 'node:tls';
import { AgentError, AgentErrorCode } from '../errors.ts';
import { formatSelector, type Selector } from '../selectors.ts';
import { DEFAULT_PROC_ROOT, readCgroup, readMountinfo } from './proc.ts';
import type { Caller, WorkloadAttestor } from './types.ts';

export const DEFAULT_KUBELET_URL = 'https://127.0.0.1:10250';
export const DEFAULT_TOKEN_PATH = '/var/run/secrets/kubernetes.io/serviceaccount/token';
export const DEFAULT_KUBELET_CA_PATH = '/var/run/secrets/kubernetes.io/serviceaccount/ca.crt';
export const DEFAULT_MAX_POLL_ATTEMPTS = 60;
export const DEFAULT_POLL_INTERVAL_MS = 500;
export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
export const DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024;

export interface K8sAttestorOptions {
  /** procfs root; default `/proc`. */
  readonly procRoot?: string;
  /**
   * This node's name. The kubelet's serving certificate must name it (or the host of `kubeletUrl`), so the
   * agent can talk to the kubelet over 127.0.0.1 and still check it is this node's kubelet.
   */
  readonly nodeName: string;
  /** Base URL of the kubelet's secure port; default `https://127.0.0.1:10250`. */
  readonly kubeletUrl?: string;
  /** Bearer token file, read on every request; default the pod's service account token. */
  readonly tokenPath?: string;
  /** PEM of the CA(s) that sign the kubelet's serving certificate. Takes precedence over `caPath`. */
  readonly kubeletCa?: string;
  /** File with the kubelet CA PEM, read on every request; default the service account `ca.crt`. */
  readonly caPath?: string;
  /** Do not verify the kubelet's certificate at all. Default false. */
  readonly skipKubeletVerification?: boolean;
  /** How many times to ask the kubelet for a pod or container it does not list yet; default 60. */
  readonly maxPollAttempts?: number;
  /** Wait between those attempts; default 500 ms. */
  readonly pollIntervalMs?: number;
  /** Reuse a pod list for this long; default 0 (ask every time). */
  readonly cacheTtlMs?: number;
  /** Give up on one kubelet request after this long; default 10 s. */
  readonly requestTimeoutMs?: number;
  /** Refuse a pod list larger than this; default 64 MiB. */
  readonly maxResponseBytes?: number;
}

/** Where the caller runs, as its cgroups tell: the container, and the pod when the path names it. */
export interface ContainerLocation {
  readonly containerId: string;
  /** Absent when the path does not carry the pod UID (cri-o without it, or the agent's own pod). */
  readonly podUid?: string;
}

// ---------------------------------------------------------------------------------------------------------
// Finding the pod UID and container ID in cgroup paths.
//
// Facts (from SPIRE's container locator): the container ID is a 64-hex-digit token, usually in the last path
// segment, possibly with a runtime prefix (`cri-containerd-`, `crio-`, `docker-`) and a `.scope` suffix, or
// after a colon (`...slice:cri-containerd:<id>`). The pod UID is `pod<uuid>` in an earlier segment (or the
// same one), its dashes written as underscores by the systemd cgroup driver. Paths may start with `/..`
// when read from inside a cgroup namespace.
// ---------------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------------
// The kubelet's pod list, narrowed from JSON to the fields used here.
// ---------------------------------------------------------------------------------------------------------

/** One entry of a pod's container, init container or ephemeral container statuses. */
export interface KubeletContainerStatus {
  readonly name: string;
  readonly containerId: string;
  readonly image: string;
  readonly imageId: string;
}

export interface KubeletOwnerReference {
  readonly kind: string;
  readonly name: string;
  readonly uid: string;
}

/** The fields of a kubelet-listed pod that the selectors use. */
export interface KubeletPod {
  readonly uid: string;
  readonly name: string;
  readonly namespace: string;
  readonly labels: ReadonlyMap<string, string>;
  readonly owners: readonly KubeletOwnerReference[];
  readonly serviceAccountName: string;
  readonly nodeName: string;
  readonly containers: readonly KubeletContainerStatus[];
  readonly initContainers: readonly KubeletContainerStatus[];
  readonly ephemeralContainers: readonly KubeletContainerStatus[];
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function field(value: unknown, key: string): unknown {
  return isRecord(value) ? value[key] : undefined;
}

function str(value: unknown): string {
  return typeof value === 'string' ? value : '';
}

function list(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [];
}

function toContainerStatuses(value: unknown): KubeletContainerStatus[] {
  return list(value).map((status) => ({
    name: str(field(status, 'name')),
    containerId: str(field(status, 'containerID')),
    image: str(field(status, 'image')),
    imageId: str(field(status, 'imageID')),
  }));
}

function toPod(value: unknown): KubeletPod | undefined {
  const metadata = field(value, 'metadata');
  const uid = str(field(metadata, 'uid'));
  if (uid === '') {
    return undefined;
  }
  const labels = new Map<string, string>();
  const rawLabels = field(metadata, 'labels');
  if (isRecord(rawLabels)) {
    for (const [key, label] of Object.entries(rawLabels)) {
      if (typeof label === 'string') {
        labels.set(key, label);
      }
    }
  }
  const spec = field(value, 'spec');
  const status = field(value, 'status');
  return {
    uid,
    name: str(field(metadata, 'name')),
    namespace: str(field(metadata, 'namespace')),
    labels,
    owners: list(field(metadata, 'ownerReferences')).map((owner) => ({
      kind: str(field(owner, 'kind')),
      name: str(field(owner, 'name')),
      uid: str(field(owner, 'uid')),
    })),
    serviceAccountName: str(field(spec, 'serviceAccountName')),
    nodeName: str(field(spec, 'nodeName')),
    containers: toContainerStatuses(field(status, 'containerStatuses')),
    initContainers: toContainerStatuses(field(status, 'initContainerStatuses')),
    ephemeralContainers: toContainerStatuses(field(status, 'ephemeralContainerStatuses')),
  };
}

/** The pods of a kubelet `/pods` answer (a v1 PodList). */
export function parsePodList(text: string): KubeletPod[] {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new AgentError(
      AgentErrorCode.Kubelet,
      `kubelet pod list is not JSON: ${err instanceof Error ? err.message : String(err)}`,
      { cause: err },
    );
  }
  const items = field(json, 'items');
  if (!Array.isArray(items)) {
    throw new AgentError(AgentErrorCode.Kubelet, 'kubelet pod list has no "items" array');
  }
  return items.flatMap((item) => {
    const pod = toPod(item);
    return pod === undefined ? [] : [pod];
  });
}

/** `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → `<id>`. */
function runtimeContainerId(containerId: string): string {
  const scheme = containerId.indexOf('://');
  return scheme < 0 ? containerId : containerId.slice(scheme + 3);
}

function findContainer(pod: KubeletPod, containerId: string): KubeletContainerStatus | undefined {
  const id = containerId.toLowerCase();
  for (const status of [...pod.containers, ...pod.initContainers, ...pod.ephemeralContainers]) {
    if (status.containerId !== '' && runtimeContainerId(status.containerId).toLowerCase() === id) {
      return status;
    }
  }
  return undefined;
}

function imageIdentifiers(statuses: readonly KubeletContainerStatus[]): string[] {
  // Both the image as written in the pod spec and the resolved image ID (with the digest), as SPIRE does.
  return statuses.flatMap((status) => [status.image, status.imageId]).filter((image) => image !== '');
}

/** The `k8s:` selector values for a pod and the caller's container in it. */
export function podSelectorValues(pod: KubeletPod, container: KubeletContainerStatus): string[] {
  const values = [
    `pod-uid:${pod.uid}`,
    `pod-image-count:${pod.containers.length}`,
    `pod-init-image-count:${pod.initContainers.length}`,
  ];
  const optional: ReadonlyArray<readonly [string, string]> = [
    ['ns', pod.namespace],
    ['sa', pod.serviceAccountName],
    ['pod-name', pod.name],
    ['node-name', pod.nodeName],
    ['container-name', container.name],
  ];
  for (const [key, value] of optional) {
    if (value !== '') {
      values.push(`${key}:${value}`);
    }
  }
  for (const [key, value] of pod.labels) {
    values.push(`pod-label:${key}:${value}`);
  }
  for (const owner of pod.owners) {
    values.push(`pod-owner:${owner.kind}:${owner.name}`, `pod-owner-uid:${owner.kind}:${owner.uid}`);
  }
  for (const image of imageIdentifiers([container])) {
    values.push(`container-image:${image}`);
  }
  for (const image of imageIdentifiers(pod.containers)) {
    values.push(`pod-image:${image}`);
  }
  for (const image of imageIdentifiers(pod.initContainers)) {
    values.push(`pod-init-image:${image}`);
  }
  return values;
}

// ---------------------------------------------------------------------------------------------------------
// The attestor.
// ---------------------------------------------------------------------------------------------------------

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function positiveInteger(name: string, value: number, allowZero: boolean): number {
  if (!Number.isSafeInteger(value) || value < (allowZero ? 0 : 1)) {
    throw new AgentError(
      AgentErrorCode.Config,
      `k8s attestor: ${name} must be a ${allowZero ? 'non-negative' : 'positive'} integer, got ${String(value)}`,
    );
  }
  return value;
}

interface PodListCache {
  readonly pods: readonly KubeletPod[];
  readonly expiresAt: number;
}

export class K8sAttestor implements WorkloadAttestor {
  readonly name = 'k8s';
  readonly #procRoot: string;
  readonly #nodeName: string;
  readonly #podsUrl: URL;
  readonly #tokenPath: string;
  readonly #kubeletCa: string | undefined;
  readonly #caPath: string;
  readonly #skipVerification: boolean;
  readonly #maxPollAttempts: number;
  readonly #pollIntervalMs: number;
  readonly #cacheTtlMs: number;
  readonly #requestTimeoutMs: number;
  readonly #maxResponseBytes: number;
  #cache: PodListCache | undefined;

  constructor(options: K8sAttestorOptions) {
    if (options.nodeName === '') {
      throw new AgentError(AgentErrorCode.Config, 'k8s attestor: nodeName is required');
    }
    const base = options.kubeletUrl ?? DEFAULT_KUBELET_URL;
    let url: URL;
    try {
      // Appended, not resolved, so a base with a path (an API server node proxy) keeps it.
      url = new URL(`${base.replace(/\/+$/, '')}/pods`);
    } catch (err) {
      throw new AgentError(AgentErrorCode.Config, `k8s attestor: kubeletUrl "${base}" is not a URL`, {
        cause: err,
      });
    }
    if (url.protocol !== 'https:') {
      throw new AgentError(AgentErrorCode.Config, `k8s attestor: kubeletUrl "${base}" is not https`);
    }
    if (url.username !== '' || url.password !== '') {
      throw new AgentError(AgentErrorCode.Config, 'k8s attestor: kubeletUrl must not carry credentials');
    }
    this.#procRoot = options.procRoot ?? DEFAULT_PROC_ROOT;
    this.#nodeName = options.nodeName;
    this.#podsUrl = url;
    this.#tokenPath = options.tokenPath ?? DEFAULT_TOKEN_PATH;
    this.#kubeletCa = options.kubeletCa;
    this.#caPath = options.caPath ?? DEFAULT_KUBELET_CA_PATH;
    this.#skipVerification = options.skipKubeletVerification ?? false;
    this.#maxPollAttempts = positiveInteger(
      'maxPollAttempts',
      options.maxPollAttempts ?? DEFAULT_MAX_POLL_ATTEMPTS,
      false,
    );
    this.#pollIntervalMs = positiveInteger(
      'pollIntervalMs',
      options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS,
      true,
    );
    this.#cacheTtlMs = positiveInteger('cacheTtlMs', options.cacheTtlMs ?? 0, true);
    this.#requestTimeoutMs = positiveInteger(
      'requestTimeoutMs',
      options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
      false,
    );
    this.#maxResponseBytes = positiveInteger(
      'maxResponseBytes',
      options.maxResponseBytes ?? DEFAULT_MAX_RESPONSE_BYTES,
      false,
    );
  }

  async attest(caller: Caller, signal?: AbortSignal): Promise<Selector[]> {
    this.#throwIfAborted(signal);
    const location = await this.#locate(caller.pid);
    if (location === undefined) {
      return []; // Not in a container: this attestor does not apply.
    }
    const what =
      location.podUid === undefined
        ? `container ${location.containerId}`
        : `container ${location.containerId} of pod ${location.podUid}`;

    for (let attempt = 1; ; attempt++) {
      const pods = await this.#podList(signal);
      const values = this.#match(pods, location);
      if (values !== undefined) {
        const unique = [...new Set(values)].map((value): Selector => ({ type: 'k8s', value }));
        return unique.sort((a, b) => compare(formatSelector(a), formatSelector(b)));
      }
      // The container may have started after this list was taken: do not answer the next attempt from cache.
      this.#cache = undefined;
      if (attempt >= this.#maxPollAttempts) {
        throw new AgentError(
          AgentErrorCode.Kubelet,
          `kubelet does not list ${what} (process ${caller.pid}) after ${attempt} attempt(s)`,
        );
      }
      try {
        await sleep(this.#pollIntervalMs, undefined, { signal });
      } catch (err) {
        throw new AgentError(AgentErrorCode.Kubelet, `gave up looking for ${what}: aborted`, { cause: err });
      }
    }
  }

  #throwIfAborted(signal: AbortSignal | undefined): void {
    if (signal?.aborted === true) {
      throw new AgentError(AgentErrorCode.Kubelet, 'k8s attestation aborted', { cause: signal.reason });
    }
  }

  async #locate(pid: number): Promise<ContainerLocation | undefined> {
    const fromCgroup = locateContainer(parseCgroupPaths(await readCgroup(pid, this.#procRoot)));
    if (fromCgroup !== undefined) {
      return fromCgroup;
    }
    return locateContainer(parseMountinfoCgroupRoots(await readMountinfo(pid, this.#procRoot)));
  }

  /** The selector values for the caller, or undefined when the kubelet does not list it (yet). */
  #match(pods: readonly KubeletPod[], location: ContainerLocation): string[] | undefined {
    let result: string[] | undefined;
    for (const pod of pods) {
      if (location.podUid !== undefined && pod.uid !== location.podUid) {
        continue;
      }
      const container = findContainer(pod, location.containerId);
      if (container === undefined) {
        continue;
      }
      if (result !== undefined) {
        throw new AgentError(
          AgentErrorCode.Kubelet,
          `kubelet lists container ${location.containerId} in more than one pod`,
        );
      }
      result = podSelectorValues(pod, container);
    }
    return result;
  }

  async #podList(signal: AbortSignal | undefined): Promise<readonly KubeletPod[]> {
    const now = Date.now();
    if (this.#cache !== undefined && now < this.#cache.expiresAt) {
      return this.#cache.pods;
    }
    const pods = parsePodList(await this.#fetchPods(signal));
    if (this.#cacheTtlMs > 0) {
      this.#cache = { pods, expiresAt: Date.now() + this.#cacheTtlMs };
    }
    return pods;
  }

  async #readToken(): Promise<string> {
    try {
      return (await readFile(this.#tokenPath, 'utf8')).trim();
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Kubelet,
        `cannot read the kubelet token file ${this.#tokenPath}: ${describe(err)}`,
        { cause: err },
      );
    }
  }

  async #readCa(): Promise<string | undefined> {
    if (this.#skipVerification) {
      return undefined;
    }
    if (this.#kubeletCa !== undefined) {
      return this.#kubeletCa;
    }
    try {
      return await readFile(this.#caPath, 'utf8');
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Kubelet,
        `cannot read the kubelet CA file ${this.#caPath}: ${describe(err)}`,
        { cause: err },
      );
    }
  }

  /**
   * The kubelet's certificate must name this node (kubelet serving certificates carry the node name) or the
   * host the agent dialled. Chain verification against the CA happens before this is called.
   */
  #checkIdentity = (host: string, cert: PeerCertificate): Error | undefined => {
    const asNode = checkServerIdentity(this.#nodeName, cert);
    if (asNode === undefined || checkServerIdentity(host, cert) === undefined) {
      return undefined;
    }
    return asNode;
  };

  async #fetchPods(signal: AbortSignal | undefined): Promise<string> {
    this.#throwIfAborted(signal);
    const [token, ca] = await Promise.all([this.#readToken(), this.#readCa()]);
    const origin = this.#podsUrl.origin;
    const redact = (text: string): string => (token === '' ? text : text.replaceAll(token, '[REDACTED]'));
    const failure = (message: string, cause?: unknown): AgentError =>
      new AgentError(AgentErrorCode.Kubelet, redact(`kubelet at ${origin}: ${message}`), { cause });

    const headers: Record<string, string> = { Accept: 'application/json' };
    if (token !== '') {
      headers.Authorization = `Bearer ${token}`;
    }
    const maxBytes = this.#maxResponseBytes;

    return new Promise<string>((resolve, reject) => {
      const req = request(this.#podsUrl, {
        method: 'GET',
        headers,
        agent: false,
        timeout: this.#requestTimeoutMs,
        signal,
        ca,
        rejectUnauthorized: !this.#skipVerification,
        checkServerIdentity: this.#checkIdentity,
      });
      req.on('timeout', () => {
        req.destroy(new Error(`no answer within ${this.#requestTimeoutMs} ms`));
      });
      req.on('error', (err) => {
        if (signal?.aborted === true) {
          reject(failure('request aborted', signal.reason));
        } else {
          reject(failure(`request failed: ${describe(err)}`, err));
        }
      });
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > maxBytes) {
            reject(failure(`pod list is larger than ${maxBytes} bytes`));
            req.destroy();
            return;
          }
          chunks.push(chunk);
        });
        res.on('error', (err) => {
          reject(failure(`reading the pod list failed: ${describe(err)}`, err));
        });
        res.on('end', () => {
          const body = Buffer.concat(chunks).toString('utf8');
          if (res.statusCode !== 200) {
            const excerpt = body.trim().slice(0, 200);
            reject(
              failure(
                `GET /pods answered ${res.statusCode ?? '?'} ${res.statusMessage ?? ''}`.trimEnd() +
                  (excerpt === '' ? '' : `: ${excerpt}`),
              ),
            );
            return;
          }
          resolve(body);
        });
      });
      req.end();
    });
  }
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
