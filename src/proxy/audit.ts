import { type DestinationStream, pino } from 'pino';
import type { KubeIdentity, RequestInfo } from '../policy/types.ts';
import { statusReason } from './status.ts';

/** What the policy made of a request: allowed, refused by it, refused before it (bad target), or no valid SVID. */
export type AuditDecision = 'allow' | 'deny' | 'unauthenticated' | 'bad-request';

/** The proxy's own facts, as `Event.annotations` (string values, as Kubernetes has them). */
export interface AuditAnnotations {
  /** The client's SPIFFE ID (also `user.username`). */
  'kube-svid-proxy/spiffe-id'?: string;
  'kube-svid-proxy/decision': AuditDecision;
  /** The policy rule that matched. */
  'kube-svid-proxy/rule'?: string;
  /** The decoded path the policy judged. */
  'kube-svid-proxy/path'?: string;
  /** The stable code of a refusal or failure (ERR_POLICY_*, ERR_PROXY_LIMIT, ERR_UPSTREAM…). */
  'kube-svid-proxy/code'?: string;
  /** Why the policy refused. */
  'kube-svid-proxy/reason'?: string;
  /** The configuration key of the limit that refused the request. */
  'kube-svid-proxy/limit'?: string;
  /** The client's `Upgrade` (SPDY/3.1, websocket) for exec, attach, port-forward. */
  'kube-svid-proxy/upgrade'?: string;
  /** For nested impersonation: the rule's own identity, which kube-apiserver's SubjectAccessReview vouched for. */
  'kube-svid-proxy/mapped-user'?: string;
}

/** `audit.k8s.io/v1` `UserInfo`. */
export interface AuditUserInfo {
  readonly username: string;
  readonly uid?: string;
  readonly groups?: readonly string[];
  readonly extra?: Readonly<Record<string, readonly string[]>>;
}

/** `audit.k8s.io/v1` `ObjectReference`: empty fields left out, as kube-apiserver does. */
export interface AuditObjectRef {
  readonly resource?: string;
  readonly namespace?: string;
  readonly name?: string;
  readonly apiGroup?: string;
  readonly apiVersion?: string;
  readonly subresource?: string;
}

/**
 * One request, as a Kubernetes `audit.k8s.io/v1` `Event` at level Metadata and stage ResponseComplete: the same
 * shape kube-apiserver's own audit log has, with the same `auditID` (sent upstream as `Audit-ID`), so the two
 * logs join on it. `user` is who authenticated to the proxy (the SPIFFE ID), `impersonatedUser` whom
 * kube-apiserver was asked to act as.
 */
export interface AuditEvent {
  readonly kind: 'Event';
  readonly apiVersion: 'audit.k8s.io/v1';
  readonly level: 'Metadata';
  readonly auditID: string;
  readonly stage: 'ResponseComplete';
  /** The request target as received. */
  readonly requestURI: string;
  readonly verb: string;
  readonly user: AuditUserInfo;
  readonly impersonatedUser?: AuditUserInfo;
  readonly sourceIPs?: readonly string[];
  readonly userAgent?: string;
  readonly objectRef?: AuditObjectRef;
  readonly responseStatus: {
    readonly code: number;
    readonly status?: 'Failure';
    readonly reason?: string;
    readonly message?: string;
  };
  /** RFC 3339 with microseconds, UTC. */
  readonly requestReceivedTimestamp: string;
  readonly stageTimestamp: string;
  readonly annotations: AuditAnnotations;
}

/** Where audit Events go: one JSON object per line. */
export interface AuditSink {
  write(event: AuditEvent): void;
  /** Flushes and releases the destination. */
  close(): void;
}

/**
 * The `audit.file` sink: JSON Lines appended to a file, or on stdout for "-", apart from the operational log
 * (stderr). Writes are synchronous, so a line is out before the next request's.
 */
export function fileAuditSink(file: string): AuditSink {
  const destination =
    file === '-'
      ? pino.destination({ fd: 1, sync: true })
      : pino.destination({ dest: file, sync: true, append: true, mkdir: false });
  return streamAuditSink(destination, () => {
    if (file !== '-') destination.end();
  });
}

/** Audit Events as JSON lines to any stream (tests, benchmarks). */
export function streamAuditSink(stream: DestinationStream, close: () => void = () => {}): AuditSink {
  return {
    write: (event) => {
      stream.write(`${JSON.stringify(event)}\n`);
    },
    close,
  };
}

/** RFC 3339 in UTC with microseconds (as kube-apiserver writes its audit timestamps), from epoch milliseconds. */
export function rfc3339Micro(epochMs: number): string {
  const whole = Math.floor(epochMs);
  const micros = Math.floor((epochMs - whole) * 1000);
  return new Date(whole).toISOString().replace(/Z$/, `${String(micros).padStart(3, '0')}Z`);
}

/** The time now in epoch milliseconds, with the sub-millisecond part of the monotonic clock. */
export function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

/** `objectRef` for a resource request, empty fields left out; undefined for a non-resource one. */
export function objectRef(info: RequestInfo): AuditObjectRef | undefined {
  if (!info.isResourceRequest) return undefined;
  const ref: Record<string, string> = {};
  for (const key of ['resource', 'subresource', 'namespace', 'name', 'apiGroup', 'apiVersion'] as const) {
    if (info[key] !== '') ref[key] = info[key];
  }
  return ref;
}

/** A Kubernetes identity as `UserInfo`, empty fields left out. */
export function userInfo(identity: KubeIdentity): AuditUserInfo {
  return {
    username: identity.user,
    ...(identity.uid ? { uid: identity.uid } : {}),
    ...(identity.groups.length > 0 ? { groups: identity.groups } : {}),
    ...(Object.keys(identity.extra).length > 0 ? { extra: identity.extra } : {}),
  };
}

/** What the request path learnt of a request so far, for its audit Event. */
export interface AuditDraft {
  readonly auditID: string;
  /** performance.now() at the start, for the duration metric. */
  readonly started: number;
  /** Epoch milliseconds at the start. */
  readonly received: number;
  readonly requestURI: string;
  /** The lower-case method until the target is read, then the RequestInfo verb. */
  verb: string;
  readonly peer: string | undefined;
  readonly userAgent?: string;
  spiffeId?: string;
  info?: RequestInfo;
  rule?: string;
  /** The identity kube-apiserver is asked to act as. */
  impersonated?: KubeIdentity;
  /** Nested impersonation: the rule's own identity. */
  mappedUser?: string;
}

/** How a request ended, for the proxy's annotations. */
export interface AuditOutcome {
  readonly decision: AuditDecision;
  readonly rule?: string;
  readonly code?: string;
  readonly reason?: string;
  readonly limit?: string;
  readonly upgrade?: string;
}

/** The outcome of a request the policy allowed. */
export function allowed(entry: AuditDraft, upgrade?: string): AuditOutcome {
  return { decision: 'allow', ...(entry.rule ? { rule: entry.rule } : {}), ...(upgrade ? { upgrade } : {}) };
}

/** The `audit.k8s.io/v1` Event of a finished request; `message` for an answer the proxy wrote itself. */
export function auditEvent(
  entry: AuditDraft,
  code: number,
  outcome: AuditOutcome,
  message?: string,
): AuditEvent {
  const { info } = entry;
  const ref = info && objectRef(info);
  const rule = outcome.rule ?? entry.rule;
  const annotations: AuditEvent['annotations'] = {
    ...(entry.spiffeId ? { 'kube-svid-proxy/spiffe-id': entry.spiffeId } : {}),
    'kube-svid-proxy/decision': outcome.decision,
    ...(rule ? { 'kube-svid-proxy/rule': rule } : {}),
    ...(info ? { 'kube-svid-proxy/path': info.path } : {}),
    ...(outcome.code ? { 'kube-svid-proxy/code': outcome.code } : {}),
    ...(outcome.reason ? { 'kube-svid-proxy/reason': outcome.reason } : {}),
    ...(outcome.limit ? { 'kube-svid-proxy/limit': outcome.limit } : {}),
    ...(outcome.upgrade ? { 'kube-svid-proxy/upgrade': outcome.upgrade } : {}),
    ...(entry.mappedUser && outcome.decision === 'allow'
      ? { 'kube-svid-proxy/mapped-user': entry.mappedUser }
      : {}),
  };
  return {
    kind: 'Event',
    apiVersion: 'audit.k8s.io/v1',
    level: 'Metadata',
    auditID: entry.auditID,
    stage: 'ResponseComplete',
    requestURI: entry.requestURI,
    verb: entry.verb,
    user: { username: entry.spiffeId ?? 'system:anonymous' },
    ...(entry.impersonated && outcome.decision === 'allow'
      ? { impersonatedUser: userInfo(entry.impersonated) }
      : {}),
    ...(entry.peer !== undefined ? { sourceIPs: [entry.peer] } : {}),
    ...(entry.userAgent !== undefined ? { userAgent: entry.userAgent } : {}),
    ...(ref ? { objectRef: ref } : {}),
    responseStatus:
      message === undefined ? { code } : { code, status: 'Failure', reason: statusReason(code), message },
    requestReceivedTimestamp: rfc3339Micro(entry.received),
    stageTimestamp: rfc3339Micro(nowMs()),
    annotations,
  };
}
