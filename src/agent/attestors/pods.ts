/**
 * The kubelet's pod list, narrowed from JSON to the fields used here; finding the caller's container in it;
 * and the `k8s:` selector values (named as SPIRE's k8s workload attestor names them).
 */
import { AgentError, AgentErrorCode } from '../errors.ts';
import type { ContainerLocation } from './containerid.ts';

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

/** The selector values for the caller, or undefined when the kubelet does not list it (yet). */
export function matchPods(pods: readonly KubeletPod[], location: ContainerLocation): string[] | undefined {
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
