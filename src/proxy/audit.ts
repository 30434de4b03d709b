import { openSync } from 'node:fs';
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
  /** Events already serialised, one JSON line each (from the proxy's workers); default: parsed and written. */
  writeLines?(lines: string, events: number): void;
  /**
   * True while the sink cannot take another Event and `audit.overflow` is `refuse`: the request path answers 503
   * instead of acting unaudited. Absent on sinks that never fill (tests).
   */
  full?(): boolean;
  /** Events buffered and not yet written, events dropped, and bytes buffered (metrics). */
  stats?(): AuditStats;
  /** Writes out what is buffered (bounded by `timeoutMs`), then releases the destination. */
  close(): void | Promise<void>;
}

export interface AuditStats {
  readonly bufferedBytes: number;
  readonly dropped: number;
  readonly writeErrors: number;
}

/** What happens to an Event that does not fit in the buffer: the request is refused (503), or the Event dropped. */
export type AuditOverflow = 'refuse' | 'drop';
export const AUDIT_OVERFLOWS: readonly AuditOverflow[] = ['refuse', 'drop'];

export interface AuditBufferOptions {
  /** Most bytes of Events held while the destination is slow (`audit.bufferBytes`, default 8 MiB). */
  readonly bufferBytes: number;
  /** `audit.overflow` (default `refuse`). */
  readonly overflow: AuditOverflow;
  /** A write to the destination failed (logged by the caller at a limited rate). */
  readonly onError?: (err: Error) => void;
  /** `full()` changed (the proxy's workers are told). */
  readonly onFullChange?: (full: boolean) => void;
}

export const DEFAULT_AUDIT_BUFFER: AuditBufferOptions = { bufferBytes: 8 * 1024 * 1024, overflow: 'refuse' };

/** Under `overflow: refuse`, new requests are refused this close to `bufferBytes` (a quarter of it at most). */
const AUDIT_RESERVE_BYTES = 16 * 1024;

/** Longest an Event waits before its batch is written, and the batch size that is written at once. */
const AUDIT_BATCH_MS = 10;
const AUDIT_BATCH_BYTES = 64 * 1024;

/** How long `close()` waits for buffered Events to reach the destination. */
const CLOSE_FLUSH_MS = 5000;

/**
 * The `audit.file` sink: JSON Lines appended to a file, or on stdout for "-", apart from the operational log
 * (stderr). Writes never block the event loop: lines are gathered for at most 10 ms (or 64 KiB) and handed, in
 * order, to a background writer (SonicBoom, as pino uses), which also batches whatever accumulates while a write is
 * in flight. The buffer
 * is bounded by `bufferBytes`; a line that does not fit is dropped and counted (`overflow: drop`), or — the
 * default, `overflow: refuse` — never produced, because `full()` makes the proxy refuse requests it could not
 * audit until the destination catches up (from 16 KiB short of the bound, so the requests already admitted
 * still find room for their Events). A destination that fails to write counts as full, so under `refuse`
 * nothing is served unaudited. The file is opened at once, so a path that cannot be written is an error at start.
 */
export function fileAuditSink(file: string, options: AuditBufferOptions = DEFAULT_AUDIT_BUFFER): AuditSink {
  const fd = file === '-' ? 1 : openSync(file, 'a', 0o600);
  const destination = pino.destination({ fd, sync: false, minLength: 0 });
  let buffered = 0;
  let dropped = 0;
  let writeErrors = 0;
  let failed = false;
  destination.on('write', (n: number) => {
    buffered = Math.max(0, buffered - n);
    failed = false;
    noticeFull();
  });
  destination.on('error', (err: Error) => {
    writeErrors++;
    failed = true;
    options.onError?.(err);
    noticeFull();
  });
  // Room kept for the Events of requests already admitted when the sink starts refusing new ones.
  const reserve = Math.min(AUDIT_RESERVE_BYTES, Math.floor(options.bufferBytes / 4));
  const full = (): boolean => failed || buffered > options.bufferBytes - reserve;
  let wasFull = false;
  const noticeFull = (): void => {
    if (options.overflow !== 'refuse' || options.onFullChange === undefined) return;
    const now = full();
    if (now === wasFull) return;
    wasFull = now;
    options.onFullChange(now);
  };
  let batch = '';
  let timer: NodeJS.Timeout | undefined;
  const flush = (): void => {
    clearTimeout(timer);
    timer = undefined;
    if (batch === '') return;
    const text = batch;
    batch = '';
    destination.write(text);
  };
  let closing: Promise<void> | undefined;
  const append = (line: string, events: number): void => {
    const bytes = Buffer.byteLength(line);
    if (failed || buffered + bytes > options.bufferBytes) {
      // Under `refuse` the request path checked full() first; this is the rare line that still overflows
      // (a large Event, or one finishing while the buffer filled): dropped and counted either way.
      dropped += events;
      return;
    }
    buffered += bytes;
    batch += line;
    noticeFull();
    // Lines are gathered for AUDIT_BATCH_MS (or AUDIT_BATCH_BYTES) and handed over in one write: one system
    // call per batch, not per request.
    if (batch.length >= AUDIT_BATCH_BYTES) flush();
    else if (timer === undefined) {
      timer = setTimeout(flush, AUDIT_BATCH_MS);
      timer.unref();
    }
  };
  return {
    write: (event) => append(`${JSON.stringify(event)}\n`, 1),
    writeLines: append,
    full: options.overflow === 'refuse' ? full : () => false,
    stats: () => ({ bufferedBytes: buffered, dropped, writeErrors }),
    close: () => {
      closing ??= new Promise<void>((resolve) => {
        flush();
        const deadline = setTimeout(resolve, CLOSE_FLUSH_MS);
        deadline.unref();
        const done = (): void => {
          clearTimeout(deadline);
          resolve();
        };
        if (fd === 1) {
          // stdout stays open for the operational log's neighbours: wait until the buffer is out.
          const check = (): void => {
            if (buffered > 0 && !failed) return;
            destination.off('write', check);
            done();
          };
          destination.on('write', check);
          check();
        } else {
          destination.once('close', done);
          destination.once('error', done);
          destination.end();
        }
      });
      return closing;
    },
  };
}

/** Audit Events as JSON lines to any stream (tests, benchmarks); synchronous, unbounded. */
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
  const iso = new Date(whole).toISOString();
  return `${iso.slice(0, -1)}${micros < 10 ? '00' : micros < 100 ? '0' : ''}${micros}Z`;
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
