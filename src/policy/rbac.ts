/**
 * The RBAC the proxy's own service account needs: `impersonate` on exactly the users, groups, uids and user
 * extras the policy can map SPIFFE IDs to. Where a rule's template makes a value depend on the ID's path (a
 * pattern's wildcard segments, or any segment of a trust-domain rule), the set is unbounded and that resource is
 * granted without `resourceNames`; the output says so, and which rule is the cause. Service accounts are never
 * impersonated (the policy maps to users), so nothing grants `serviceaccounts`.
 */
import { Document, type YAMLMap } from 'yaml';
import { SpiffeId } from '../spiffe/id.ts';
import { expandTemplate, type Policy, type PolicyRule, type Template } from './policy.ts';

export interface ServiceAccountRef {
  readonly namespace: string;
  readonly name: string;
}

export const DEFAULT_SERVICE_ACCOUNT: ServiceAccountRef = {
  namespace: 'kube-system',
  name: 'kube-svid-proxy',
};

/** Why a rule makes one impersonation resource unbounded. */
export interface UnboundedCause {
  readonly rule: string;
  readonly line: number;
  /** The template as written. */
  readonly template: string;
  readonly why: string;
}

/** One RBAC rule of the ClusterRole: `impersonate` on one resource. */
export interface ImpersonationGrant {
  /** `''` for users and groups, `authentication.k8s.io` for uids and user extras. */
  readonly apiGroup: string;
  /** `users`, `groups`, `uids` or `userextras/<key>`. */
  readonly resource: string;
  /** Sorted; absent when some rule makes the set unbounded. */
  readonly resourceNames?: readonly string[];
  /** Empty when bounded. */
  readonly unbounded: readonly UnboundedCause[];
}

/** The value a template always gives for a rule, or why it depends on the ID. */
function fixedValue(rule: PolicyRule, template: Template): string | { why: string } {
  if (rule.kind === 'id') {
    const value = expandTemplate(template, SpiffeId.parse(rule.match));
    // parsePolicy checked every {segment:N} against the ID.
    return typeof value === 'string' ? value : { why: `the ID lacks {segment:${value.missing}}` };
  }
  let out = '';
  for (const part of template.parts) {
    switch (part.kind) {
      case 'text':
        out += part.text;
        break;
      case 'trustDomain':
        out += rule.trustDomain;
        break;
      case 'id':
        return { why: `{id} depends on the ID (${describeMatch(rule)})` };
      case 'path':
        return { why: `{path} depends on the ID's path (${describeMatch(rule)})` };
      case 'segment': {
        const literal = rule.kind === 'pattern' ? rule.segments[part.index] : undefined;
        if (literal === undefined || literal === '*' || literal === '**') {
          return {
            why: `{segment:${part.index}} depends on the ID (${describeMatch(rule)}${
              rule.kind === 'pattern' ? `, whose segment ${part.index} is "${literal ?? ''}"` : ''
            })`,
          };
        }
        out += literal;
        break;
      }
    }
  }
  return out;
}

function describeMatch(rule: PolicyRule): string {
  return rule.kind === 'pattern' ? `pattern ${rule.match}` : `any ID of trust domain ${rule.trustDomain}`;
}

function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** What the proxy must be allowed to impersonate, per resource, in a fixed order (users, groups, uids, extras). */
export function impersonationGrants(policy: Policy): ImpersonationGrant[] {
  interface Acc {
    names: Set<string>;
    unbounded: UnboundedCause[];
  }
  const acc = new Map<string, Acc>();
  const add = (resource: string, rule: PolicyRule, template: Template): void => {
    let a = acc.get(resource);
    if (a === undefined) {
      a = { names: new Set(), unbounded: [] };
      acc.set(resource, a);
    }
    const value = fixedValue(rule, template);
    if (typeof value === 'string') a.names.add(value);
    else a.unbounded.push({ rule: rule.name, line: rule.line, template: template.source, why: value.why });
  };
  for (const rule of policy.rules) {
    add('users', rule, rule.identity.user);
    for (const g of rule.identity.groups) add('groups', rule, g);
    if (rule.identity.uid !== undefined) add('uids', rule, rule.identity.uid);
    for (const [key, values] of Object.entries(rule.identity.extra)) {
      for (const v of values) add(`userextras/${key}`, rule, v);
    }
  }
  const order = (resource: string): string =>
    resource === 'users' ? '0' : resource === 'groups' ? '1' : resource === 'uids' ? '2' : `3${resource}`;
  return [...acc.entries()]
    .sort(([a], [b]) => compareStrings(order(a), order(b)))
    .map(([resource, a]) => ({
      apiGroup: resource === 'users' || resource === 'groups' ? '' : 'authentication.k8s.io',
      resource,
      ...(a.unbounded.length === 0 && { resourceNames: [...a.names].sort(compareStrings) }),
      unbounded: a.unbounded,
    }));
}

/** The warning for an unbounded grant, one line per cause. */
export function unboundedWarnings(grant: ImpersonationGrant): string[] {
  return grant.unbounded.map(
    (c) =>
      `${grant.resource} is granted without resourceNames (any value): rule "${c.rule}" (line ${c.line}) maps ${JSON.stringify(c.template)}, and ${c.why}`,
  );
}

export interface RbacManifests {
  /** Two YAML documents: a ClusterRole and its ClusterRoleBinding. */
  readonly yaml: string;
  /** One line per cause of an unbounded grant (also written into the YAML as comments). */
  readonly warnings: readonly string[];
  readonly grants: readonly ImpersonationGrant[];
}

/** The ClusterRole and ClusterRoleBinding letting `serviceAccount` impersonate what the policy can produce. */
export function rbacManifests(
  policy: Policy,
  serviceAccount: ServiceAccountRef = DEFAULT_SERVICE_ACCOUNT,
): RbacManifests {
  const grants = impersonationGrants(policy);
  const roleName = `${serviceAccount.name}-impersonate`;
  const labels = { 'app.kubernetes.io/name': 'kube-svid-proxy' };
  const role = new Document({
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRole',
    metadata: { name: roleName, labels },
    rules: grants.map((g) => ({
      apiGroups: [g.apiGroup],
      resources: [g.resource],
      verbs: ['impersonate'],
      ...(g.resourceNames !== undefined && { resourceNames: [...g.resourceNames] }),
    })),
  });
  role.commentBefore =
    ` Generated by "kube-svid-proxy policy rbac" from ${policy.file}.\n` +
    ` Lets ${serviceAccount.namespace}/${serviceAccount.name} impersonate exactly the users, groups, uids and user extras\n` +
    ' the policy can map SPIFFE IDs to. No service account impersonation is granted. Regenerate after editing the policy.';
  const warnings: string[] = [];
  for (const [i, grant] of grants.entries()) {
    const lines = unboundedWarnings(grant);
    if (lines.length === 0) continue;
    warnings.push(...lines);
    const node = role.getIn(['rules', i], true) as YAMLMap | undefined;
    if (node !== undefined) node.commentBefore = lines.map((l) => ` WARNING: ${l}`).join('\n');
  }
  const binding = new Document({
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRoleBinding',
    metadata: { name: roleName, labels },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: roleName },
    subjects: [{ kind: 'ServiceAccount', name: serviceAccount.name, namespace: serviceAccount.namespace }],
  });
  const yaml = `${role.toString({ lineWidth: 0 })}---\n${binding.toString({ lineWidth: 0 })}`;
  return { yaml, warnings, grants };
}
