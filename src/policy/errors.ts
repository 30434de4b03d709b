/**
 * Refusals of the policy layer. A policy file that cannot be read or is invalid is a `PolicyError` (code
 * `ERR_POLICY`) listing every problem with its line and column; a request URL that cannot be understood the way
 * kube-apiserver would understand it is a `RequestInfoError` (code `ERR_POLICY_BAD_REQUEST`).
 */
import { formatProblems, type YamlProblem } from '../config/yaml.ts';
import { KspError, SpiffeError } from '../spiffe/errors.ts';

export const PolicyErrorCode = {
  /** The policy file cannot be read, parsed or validated. */
  Policy: 'ERR_POLICY',
  /** A request target kube-apiserver would refuse or could read differently (bad escapes, dot segments…). */
  BadRequest: 'ERR_POLICY_BAD_REQUEST',
} as const;
export type PolicyErrorCode = (typeof PolicyErrorCode)[keyof typeof PolicyErrorCode];

/** Why a decision refused a request (403); the decision carries the code, nothing is thrown. */
export const PolicyDenyCode = {
  /** No rule matches the SPIFFE ID (deny by default). */
  NoRule: 'ERR_POLICY_NO_RULE',
  /** A rule matched, but its request limits do not allow this request. */
  RequestLimit: 'ERR_POLICY_REQUEST_LIMIT',
  /**
   * A rule matched, but the identity it maps to cannot be made for this ID (a trust-domain rule's template
   * names a `{segment:N}` the ID lacks): deny rather than impersonate a partial or empty user.
   */
  Identity: 'ERR_POLICY_IDENTITY',
  /**
   * The client sent Impersonate-* headers of its own (nested impersonation), and its rule does not allow that
   * identity: no `impersonate` key, a user or group it does not list, a uid or extra (never allowed), or headers
   * kube-apiserver would not accept as one identity.
   */
  NestedImpersonation: 'ERR_POLICY_NESTED_IMPERSONATION',
} as const;
export type PolicyDenyCode = (typeof PolicyDenyCode)[keyof typeof PolicyDenyCode];

/**
 * A policy file refused as a whole. The message lists every problem, one a line, as `<file>:<line>:<col>:
 * <what>` (or, when the file could not be read, says why); `problems` holds the same for programs.
 */
export class PolicyError extends KspError {
  declare readonly code: typeof PolicyErrorCode.Policy;
  readonly file: string;
  /** Empty when the file could not be read at all. */
  readonly problems: readonly YamlProblem[];

  constructor(file: string, problems: readonly YamlProblem[], message?: string, options?: ErrorOptions) {
    super(PolicyErrorCode.Policy, message ?? formatProblems(file, problems), options);
    this.name = 'PolicyError';
    this.file = file;
    this.problems = problems;
  }
}

/** A request target that cannot be turned into a RequestInfo; the proxy answers 400. */
export class RequestInfoError extends KspError {
  declare readonly code: typeof PolicyErrorCode.BadRequest;

  constructor(message: string) {
    super(PolicyErrorCode.BadRequest, message);
    this.name = 'RequestInfoError';
  }
}

export function isPolicyError(err: unknown): err is PolicyError {
  return err instanceof PolicyError;
}

/** A SPIFFE ID or trust domain parse failure for a policy problem, with its stable code. */
export function spiffeMessage(err: unknown): string {
  if (err instanceof SpiffeError) return `${err.message} (${err.code})`;
  return err instanceof Error ? err.message : String(err);
}
