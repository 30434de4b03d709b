import type { SpiffeId } from '../spiffe/id.ts';

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
} as const;
export type PolicyDenyCode = (typeof PolicyDenyCode)[keyof typeof PolicyDenyCode];

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
}
