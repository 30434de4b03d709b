/**
 * What the proxy's main process and its workers say to each other over the cluster IPC channel (a socket pair
 * between parent and child, never a file): the main process owns the identity, the policy, the upstream
 * credential, the audit log and the admin port, and hands every change to every worker as one message; the
 * workers serve the data port and hand back audit lines, metrics and usage.
 *
 * The SVID's private key and the upstream token travel in these messages, as they would between two threads of
 * one process: the channel is private to the two processes, which run as the same user.
 */
import type { IdentityHealth } from './source.ts';

/** Everything a worker needs that does not change while it runs. */
export interface WorkerInit {
  readonly type: 'init';
  readonly index: number;
  readonly trustDomain: string;
  readonly listen: { readonly host: string; readonly port: number };
  readonly logLevel: string;
  /** proxy.yaml's limits with `maxConnections` already divided between the workers. */
  readonly limits: Record<string, number>;
  readonly timeouts: Record<string, number>;
  readonly identity: IdentityMessage;
  readonly policy: PolicyMessage;
  readonly upstream: UpstreamMessage;
  /** 48 bytes, base64: the same in every worker, so a session resumes whichever worker takes the connection. */
  readonly ticketKeys: string;
}

export interface IdentityMessage {
  readonly type: 'identity';
  /** Leaf first, PEM; absent while the source has no SVID to serve with (then `withdrawn` says why). */
  readonly svid?: { readonly chain: string; readonly key: string; readonly hint?: string };
  readonly withdrawn?: string;
  /** Trust domain name and its bundle as SPIFFE bundle JSON. */
  readonly bundles: readonly (readonly [string, string])[];
  /** Trust domain name and when its bundle last changed (ISO 8601). */
  readonly changedAt: readonly (readonly [string, string])[];
  readonly health: IdentityHealth;
}

export interface PolicyMessage {
  readonly type: 'policy';
  readonly file: string;
  readonly text: string;
  readonly generation: number;
}

export interface UpstreamMessage {
  readonly type: 'upstream';
  readonly url: string;
  readonly ca?: string;
  readonly clientCert?: string;
  readonly clientKey?: string;
  readonly authorization?: string;
  readonly responseHeadersMs: number;
  readonly longRunningHeadersMs: number;
  readonly maxSessions: number;
  readonly maxLongRunningSessions: number;
}

export type ToWorker =
  | WorkerInit
  | IdentityMessage
  | PolicyMessage
  | UpstreamMessage
  | { readonly type: 'ticketKeys'; readonly keys: string }
  | { readonly type: 'auditFull'; readonly full: boolean }
  | IntermediatesMessage
  | { readonly type: 'metrics'; readonly id: number }
  | { readonly type: 'usage'; readonly id: number }
  | { readonly type: 'drain'; readonly deadlineMs: number };

export interface WorkerUsage {
  readonly connections: number;
  readonly inFlight: { readonly ordinary: number; readonly longRunning: number };
  readonly upstream: Record<
    'ordinary' | 'longRunning',
    { sessions: number; streams: number; capacity: number; max: number }
  >;
}

export type FromWorker =
  | { readonly type: 'listening'; readonly port: number }
  | { readonly type: 'failed'; readonly message: string }
  /** Audit Events, one JSON line each, gathered by the worker. */
  | { readonly type: 'audit'; readonly lines: string; readonly events: number }
  | { readonly type: 'metrics'; readonly id: number; readonly json: unknown }
  | { readonly type: 'usage'; readonly id: number; readonly usage: WorkerUsage }
  | IntermediatesMessage
  | { readonly type: 'drained' };

/** A client's intermediates (PEM) for its leaf, seen in an authenticated full handshake by one worker. */
export interface IntermediatesMessage {
  readonly type: 'intermediates';
  readonly leaf: string;
  readonly chain: string;
}
