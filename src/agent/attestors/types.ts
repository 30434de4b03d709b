import type { Selector } from '../selectors.ts';

/** The calling process, as the kernel reported it for the Workload API connection (SO_PEERCRED). */
export interface Caller {
  readonly pid: number;
  readonly uid: number;
  readonly gid: number;
}

/**
 * A workload attestor turns a caller into selectors. It reads only what the kernel and the orchestrator say
 * about the process; the workload takes no part. An attestor that cannot decide throws an `AgentError`.
 * An attestor that does not apply to this caller (a k8s attestor asked about a host process) returns [].
 */
export interface WorkloadAttestor {
  readonly name: string;
  attest(caller: Caller, signal?: AbortSignal): Promise<Selector[]>;
}
