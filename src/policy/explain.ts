/**
 * `policy explain`: which rule a SPIFFE ID matches (or why none does), the Kubernetes identity it maps to, and,
 * for a described request, whether the rule's limits allow it; for a described nested impersonation, whether
 * the rule's `impersonate` allows it. The same decision path as the proxy's.
 */
import type { SpiffeId } from '../spiffe/id.ts';
import { parseRequestResource, type RequestLimits } from './limits.ts';
import type { MatchKind, Policy } from './model.ts';
import {
  type ImpersonationAllowance,
  nestedDecision,
  parseImpersonationHeaders,
  parseServiceAccountUser,
} from './nested.ts';
import { describeRequest, requestInfo } from './request.ts';
import {
  type Decision,
  type KubeIdentity,
  type NestedDecision,
  type NestedImpersonationRequest,
  PolicyDenyCode,
  type RequestInfo,
} from './types.ts';

export interface RequestDescription {
  readonly verb?: string | undefined;
  /** `group/resource[/subresource]` as in `limits.resources`. */
  readonly resource?: string | undefined;
  readonly namespace?: string | undefined;
  /** A non-resource path such as `/healthz`. */
  readonly path?: string | undefined;
}

/**
 * A RequestInfo from a description (flags of `policy explain`): a resource request when `resource` is given,
 * a non-resource one when `path` is; undefined when neither (nor verb or namespace) is. A string is what is
 * wrong with the description.
 */
export function describedRequest(d: RequestDescription): RequestInfo | undefined | string {
  if (d.resource === undefined && d.path === undefined) {
    if (d.verb !== undefined || d.namespace !== undefined) {
      return '--verb and --namespace describe a request: give --resource (or --path for a non-resource request)';
    }
    return undefined;
  }
  if (d.resource !== undefined && d.path !== undefined) {
    return 'give either --resource (a resource request) or --path (a non-resource request), not both';
  }
  const verb = d.verb ?? 'get';
  if (!/^[a-z]+$/.test(verb))
    return `--verb ${JSON.stringify(verb)} must be a lower-case word such as get or list`;
  if (d.path !== undefined) {
    if (d.namespace !== undefined)
      return '--namespace describes a resource request; it does not go with --path';
    if (!d.path.startsWith('/')) return `--path ${JSON.stringify(d.path)} must start with "/"`;
    let info: RequestInfo;
    try {
      info = requestInfo('GET', d.path);
    } catch (err) {
      return `--path: ${err instanceof Error ? err.message : String(err)}`;
    }
    if (info.isResourceRequest) {
      return `--path ${JSON.stringify(d.path)} is an API resource path: describe it with --resource (and --namespace)`;
    }
    return {
      isResourceRequest: false,
      verb,
      path: info.path,
      apiGroup: '',
      apiVersion: '',
      resource: '',
      subresource: '',
      namespace: '',
      name: '',
    };
  }
  const parsed = parseRequestResource(d.resource ?? '');
  if (typeof parsed === 'string') return `--resource ${parsed}`;
  const namespace = d.namespace ?? '';
  if (namespace !== '' && !/^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$/.test(namespace)) {
    return `--namespace ${JSON.stringify(namespace)} is not a namespace name`;
  }
  // Illustrative only: limits never look at the version.
  const version = 'v1';
  const base = parsed.apiGroup === '' ? `/api/${version}` : `/apis/${parsed.apiGroup}/${version}`;
  const path = `${base}${namespace === '' ? '' : `/namespaces/${namespace}`}/${parsed.resource}`;
  return {
    isResourceRequest: true,
    verb,
    path,
    apiGroup: parsed.apiGroup,
    apiVersion: version,
    resource: parsed.resource,
    subresource: parsed.subresource,
    namespace,
    name: '',
  };
}

/** A nested impersonation as `policy explain` flags describe it (`--impersonate-user`, `--impersonate-group`). */
export interface NestedDescription {
  readonly impersonateUser?: string | undefined;
  readonly impersonateGroups?: readonly string[] | undefined;
}

/**
 * The nested impersonation a description asks for, read as the proxy reads a client's Impersonate-User and
 * Impersonate-Group headers; undefined when none; a string is what is wrong with the description.
 */
export function describedNested(d: NestedDescription): NestedImpersonationRequest | undefined | string {
  const groups = d.impersonateGroups ?? [];
  if (d.impersonateUser === undefined) {
    return groups.length === 0
      ? undefined
      : '--impersonate-group needs --impersonate-user (kube-apiserver requires a user)';
  }
  const parsed = parseImpersonationHeaders({
    'impersonate-user': d.impersonateUser,
    'impersonate-group': groups,
  });
  if (parsed === undefined) return undefined;
  if ('refused' in parsed) {
    return parsed.refused
      .replaceAll('Impersonate-User', '--impersonate-user')
      .replaceAll('Impersonate-Group', '--impersonate-group');
  }
  return parsed;
}

export interface Explanation {
  readonly id: string;
  /** The rule the ID matched, if any. */
  readonly rule?: {
    readonly name: string;
    readonly kind: MatchKind;
    readonly line: number;
    readonly match: string;
    readonly limits?: RequestLimits;
    readonly impersonate?: ImpersonationAllowance;
  };
  /** Why no rule matched, when none did. */
  readonly noRule?: string;
  readonly identity?: KubeIdentity;
  /** Why the matched rule cannot make an identity for this ID. */
  readonly identityProblem?: string;
  readonly request?: RequestInfo & { readonly description: string };
  /**
   * Present when a request was described: `decide`'s, or with a nested impersonation `decideNested`'s (then an
   * allowed decision also holds `nested`, the identity to forward).
   */
  readonly decision?: Decision;
  /**
   * Present when a nested impersonation was described; `decision` is absent when no rule could map the ID (the
   * nested identity is then not considered).
   */
  readonly nested?: { readonly requested: NestedImpersonationRequest; readonly decision?: NestedDecision };
  /**
   * The request is allowed (or, with no request described, the ID maps to an identity), and so is the nested
   * impersonation when one was described.
   */
  readonly allowed: boolean;
  /** Why not, when not allowed. */
  readonly code?: PolicyDenyCode;
}

export function explain(
  policy: Policy,
  id: SpiffeId,
  request?: RequestInfo,
  nested?: NestedImpersonationRequest,
): Explanation {
  const resolution = policy.resolve(id);
  const decision =
    request === undefined
      ? undefined
      : nested === undefined
        ? policy.decide(id, request)
        : policy.decideNested(id, request, nested);
  const base = {
    id: id.toString(),
    ...(request !== undefined && { request: { ...request, description: describeRequest(request) } }),
    ...(decision !== undefined && { decision }),
  };
  if (resolution === undefined) {
    return {
      ...base,
      ...(nested !== undefined && { nested: { requested: nested } }),
      noRule: policy.noRuleReason(id),
      allowed: false,
      code: PolicyDenyCode.NoRule,
    };
  }
  const { rule } = resolution;
  const ruleInfo = {
    name: rule.name,
    kind: rule.kind,
    line: rule.line,
    match: rule.match,
    ...(rule.limits !== undefined && { limits: rule.limits }),
    ...(rule.impersonate !== undefined && { impersonate: rule.impersonate }),
  };
  if (!('identity' in resolution)) {
    return {
      ...base,
      ...(nested !== undefined && { nested: { requested: nested } }),
      rule: ruleInfo,
      identityProblem: resolution.problem,
      allowed: false,
      code: PolicyDenyCode.Identity,
    };
  }
  const nestedOutcome = nested === undefined ? undefined : nestedDecision(rule, nested);
  const code =
    decision !== undefined && !decision.allowed
      ? decision.code
      : nestedOutcome !== undefined && !nestedOutcome.allowed
        ? nestedOutcome.code
        : undefined;
  return {
    ...base,
    ...(nested !== undefined && { nested: { requested: nested, decision: nestedOutcome } }),
    rule: ruleInfo,
    identity: resolution.identity,
    allowed: code === undefined,
    ...(code !== undefined && { code }),
  };
}

const KIND_NAMES: Record<MatchKind, string> = {
  id: 'exact ID',
  pattern: 'pattern',
  trustDomain: 'trust domain',
};

function formatLimits(limits: RequestLimits | undefined): string {
  if (limits === undefined) return 'none (the cluster RBAC alone decides)';
  const parts = (['verbs', 'resources', 'namespaces', 'nonResourcePaths'] as const)
    .filter((key) => limits[key] !== undefined)
    .map((key) => `${key} [${(limits[key] ?? []).join(', ')}]`);
  if (limits.nonResourcePaths === undefined) parts.push('no non-resource requests');
  return parts.join('; ');
}

function formatImpersonate(allowance: ImpersonationAllowance | undefined): string {
  if (allowance === undefined) return 'none (Impersonate-* headers from its clients are refused)';
  return (['serviceAccounts', 'users', 'groups'] as const)
    .filter((key) => allowance[key] !== undefined)
    .map((key) => `${key} [${(allowance[key] ?? []).join(', ')}]`)
    .join('; ');
}

function formatNested(e: Explanation, lines: string[]): void {
  const nested = e.nested;
  if (nested === undefined) return;
  const { requested, decision } = nested;
  const sa = parseServiceAccountUser(requested.user);
  lines.push(
    `as:       ${requested.user}${sa === undefined ? '' : ` (service account ${sa.namespace}/${sa.name})`}`,
  );
  if (requested.groups.length > 0) lines.push(`as-group: ${requested.groups.join(', ')}`);
  if (decision === undefined) lines.push('nested:   not considered (no identity for this ID)');
  else if (decision.allowed) {
    const by = e.identity === undefined ? 'the mapped user' : `user ${e.identity.user}`;
    lines.push(
      `nested:   ALLOWED by the policy (the proxy then asks kube-apiserver, with a SubjectAccessReview, whether ${by} may impersonate it)`,
    );
  } else lines.push(`nested:   DENIED ${decision.code}: ${decision.reason}`);
}

/** The explanation for people, several lines. */
export function formatExplanation(e: Explanation, file: string): string {
  const lines: string[] = [`id:       ${e.id}`];
  if (e.rule === undefined) {
    lines.push(`rule:     none: ${e.noRule ?? 'no rule matches'}`);
  } else {
    lines.push(
      `rule:     ${e.rule.name} (${KIND_NAMES[e.rule.kind]} ${e.rule.match}, ${file}:${e.rule.line})`,
    );
  }
  if (e.rule !== undefined) lines.push(`limits:   ${formatLimits(e.rule.limits)}`);
  if (e.rule !== undefined && (e.rule.impersonate !== undefined || e.nested !== undefined)) {
    lines.push(`nesting:  ${formatImpersonate(e.rule.impersonate)}`);
  }
  if (e.identity !== undefined) {
    lines.push(`user:     ${e.identity.user}`);
    lines.push(`groups:   ${e.identity.groups.length === 0 ? '(none)' : e.identity.groups.join(', ')}`);
    if (e.identity.uid !== undefined) lines.push(`uid:      ${e.identity.uid}`);
    for (const [key, values] of Object.entries(e.identity.extra))
      lines.push(`extra:    ${key}: ${values.join(', ')}`);
  } else if (e.identityProblem !== undefined) {
    lines.push(`identity: none: ${e.identityProblem}`);
  }
  if (e.request !== undefined) lines.push(`request:  ${e.request.description}`);
  formatNested(e, lines);
  if (e.decision !== undefined) {
    lines.push(
      e.decision.allowed ? 'decision: ALLOWED' : `decision: DENIED ${e.decision.code}: ${e.decision.reason}`,
    );
  } else {
    lines.push(
      e.allowed
        ? 'decision: MAPPED (describe a request with --resource or --path to check the limits)'
        : `decision: DENIED ${e.code ?? ''}`.trimEnd(),
    );
  }
  return `${lines.join('\n')}\n`;
}
