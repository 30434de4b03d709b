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

import { setTimeout as sleep } from 'node:timers/promises';
import { compareStrings } from '../../config/compare.ts';
import { AgentError, AgentErrorCode } from '../errors.ts';
import { formatSelector, type Selector } from '../selectors.ts';
import { locateProcess } from './containerid.ts';
import { KubeletClient, kubeletPodsUrl, throwIfAborted } from './kubelet.ts';
import { type KubeletPod, matchPods, parsePodList } from './pods.ts';
import { DEFAULT_PROC_ROOT } from './proc.ts';
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
  readonly #kubelet: KubeletClient;
  readonly #maxPollAttempts: number;
  readonly #pollIntervalMs: number;
  readonly #cacheTtlMs: number;
  #cache: PodListCache | undefined;

  constructor(options: K8sAttestorOptions) {
    if (options.nodeName === '') {
      throw new AgentError(AgentErrorCode.Config, 'k8s attestor: nodeName is required');
    }
    const podsUrl = kubeletPodsUrl(options.kubeletUrl ?? DEFAULT_KUBELET_URL);
    this.#procRoot = options.procRoot ?? DEFAULT_PROC_ROOT;
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
    const requestTimeoutMs = positiveInteger(
      'requestTimeoutMs',
      options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
      false,
    );
    const maxResponseBytes = positiveInteger(
      'maxResponseBytes',
      options.maxResponseBytes ?? DEFAULT_MAX_RESPONSE_BYTES,
      false,
    );
    this.#kubelet = new KubeletClient({
      podsUrl,
      nodeName: options.nodeName,
      tokenPath: options.tokenPath ?? DEFAULT_TOKEN_PATH,
      kubeletCa: options.kubeletCa,
      caPath: options.caPath ?? DEFAULT_KUBELET_CA_PATH,
      skipVerification: options.skipKubeletVerification ?? false,
      requestTimeoutMs,
      maxResponseBytes,
    });
  }

  async attest(caller: Caller, signal?: AbortSignal): Promise<Selector[]> {
    throwIfAborted(signal);
    const location = await locateProcess(caller.pid, this.#procRoot);
    if (location === undefined) {
      return []; // Not in a container: this attestor does not apply.
    }
    const what =
      location.podUid === undefined
        ? `container ${location.containerId}`
        : `container ${location.containerId} of pod ${location.podUid}`;

    for (let attempt = 1; ; attempt++) {
      const pods = await this.#podList(signal);
      const values = matchPods(pods, location);
      if (values !== undefined) {
        const unique = [...new Set(values)].map((value): Selector => ({ type: 'k8s', value }));
        return unique.sort((a, b) => compareStrings(formatSelector(a), formatSelector(b)));
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

  async #podList(signal: AbortSignal | undefined): Promise<readonly KubeletPod[]> {
    const now = Date.now();
    if (this.#cache !== undefined && now < this.#cache.expiresAt) {
      return this.#cache.pods;
    }
    const pods = parsePodList(await this.#kubelet.fetchPods(signal));
    if (this.#cacheTtlMs > 0) {
      this.#cache = { pods, expiresAt: Date.now() + this.#cacheTtlMs };
    }
    return pods;
  }
}
