import type { SpiffeId } from '../spiffe/id.ts';
import { PolicyDenyCode } from './errors.ts';

/** The Kubernetes identity a SPIFFE ID is mapped to, sent upstream as Impersonate-* headers. */
export interface KubeIdentity {
  /** Never empty. */
  readonly user: string;
  readonly groups: readonly string[];
  readonly uid?: string;
  /** Impersonate-Extra-<key>: values. Keys are lower-case. */
  readonly extra: Readonly<Record<string, readonly string[]>>;
}

/**
 * What a request asks for, in the terms of kube-apiserver's RequestInfo: a resource request
 * (`/api/v1/namespaces/ns/pods/name/log`) or a non-resource one (`/healthz`, `/version`).
 */
export interface RequestInfo {
  readonly isResourceRequest: boolean;
  /** get, list, watch, create, update, patch, delete, deletecollection; for non-resource requests the lower-case HTTP method. */
  readonly verb: string;
  /** The URL path, without query. */
  readonly path: string;
  /** '' for the core group. */
  readonly apiGroup: string;
  readonly apiVersion: string;
  readonly resource: string;
  readonly subresource: string;
  readonly namespace: string;
  readonly name: string;
}

export type Decision =
  | {
      readonly allowed: true;
      readonly rule: string;
      readonly identity: KubeIdentity;
    }
  | {
      readonly allowed: false;
      /**
       * The rule that matched the ID but whose request limits refused the request (or whose identity could not be
       * made for it); absent when no rule matched.
       */
      readonly rule?: string;
      readonly code: PolicyDenyCode;
      /** For people: which limit refused it, or that no rule names this ID. */
      readonly reason: string;
    };

export { PolicyDenyCode };

/** A decision that refused: what `decide` and `decideNested` answer when the request may not go through. */
export type Denial = Extract<Decision, { readonly allowed: false }>;

/**
 * The identity a client asked to act as with its own `Impersonate-User` and `Impersonate-Group` headers (nested
 * impersonation), as read by `parseImpersonationHeaders`.
 */
export interface NestedImpersonationRequest {
  /** Never empty. */
  readonly user: string;
  /** In the order sent, without duplicates; may be empty. */
  readonly groups: readonly string[];
}

/** A nested identity the policy allows: what the proxy forwards once the SubjectAccessReview agrees. */
export interface NestedIdentity {
  /** Forwarded as `Impersonate-User`. */
  readonly user: string;
  /**
   * Forwarded as `Impersonate-Group`, exactly as requested: kube-apiserver adds `system:authenticated` (and, for
   * a service account without groups, `system:serviceaccounts` and `system:serviceaccounts:<ns>`) itself.
   */
  readonly groups: readonly string[];
  /** Set when `user` is `system:serviceaccount:<namespace>:<name>`. */
  readonly serviceAccount?: { readonly namespace: string; readonly name: string };
}

/** Whether a rule allows a nested identity. */
export type NestedDecision =
  | { readonly allowed: true; readonly impersonated: NestedIdentity }
  | {
      readonly allowed: false;
      readonly code: typeof PolicyDenyCode.NestedImpersonation;
      readonly reason: string;
    };

/**
 * The decision for a request that carries a nested impersonation: the request's own decision (as `decide`
 * gives it) first, then the nested identity. Allowed only when both are; a refusal has the shape of `decide`'s
 * (code `ERR_POLICY_NESTED_IMPERSONATION` when the nested identity is what is refused).
 */
export type NestedPolicyDecision =
  | {
      readonly allowed: true;
      readonly rule: string;
      /** The identity the client's SPIFFE ID maps to: the one the SubjectAccessReview asks about. */
      readonly identity: KubeIdentity;
      /** The identity to forward once the SubjectAccessReview allows `identity` to impersonate it. */
      readonly nested: NestedIdentity;
    }
  | Denial;

/** A compiled policy: immutable, swapped whole on reload. */
export interface CompiledPolicy {
  /** The file it came from. */
  readonly file: string;
  /** Names of the trust domains the rules name, besides our own: the federated ones the proxy accepts. */
  readonly trustDomains: readonly string[];
  /** The first rule (by precedence) whose match accepts the ID, with the identity it maps to. */
  match(id: SpiffeId): { rule: string; identity: KubeIdentity } | undefined;
  /** The full decision for one request. */
  decide(id: SpiffeId, request: RequestInfo): Decision;
  /**
   * The full decision for one request that carries a nested impersonation (`parseImpersonationHeaders` read
   * it): `decide`'s, and then whether the matched rule's `impersonate` allows `requested`.
   */
  decideNested(
    id: SpiffeId,
    request: RequestInfo,
    requested: NestedImpersonationRequest,
  ): NestedPolicyDecision;
}
