/**
 * The RBAC the proxy's own service account needs: `impersonate` on exactly the users, groups, uids and user
 * extras the policy can map SPIFFE IDs to. Where a rule's template makes a value depend on the ID's path (a
 * pattern's wildcard segments, or any segment of a trust-domain rule), the set is unbounded and that resource is
 * granted without `resourceNames`; the output says so, and which rule is the cause. The policy never maps an ID
 * to a service account.
 *
 * Rules with `impersonate` (nested impersonation) add what the proxy needs to forward the nested identity
 * itself: `impersonate` on the listed users and groups (and the groups kube-apiserver implies, which a client
 * may send explicitly), on the listed service accounts (a Role per namespace, since RBAC names service accounts
 * within their namespace), on the `spiffe.io/id` user extra recording the client's SPIFFE ID, and `create` on
 * `subjectaccessreviews` to check each nested impersonation as the client's mapped identity first.
 */
import { Document, type YAMLMap } from 'yaml';
import { compareStrings } from '../config/compare.ts';
import { SpiffeId } from '../spiffe/id.ts';
import type { Policy, PolicyRule } from './model.ts';
import { impliedGroups, NESTED_SPIFFE_ID_EXTRA, serviceAccountGroups } from './nested.ts';
import { expandTemplate, type Template } from './template.ts';

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
  /** The value is the client's SPIFFE ID the proxy records on a nested impersonation the rule allows. */
  readonly nested?: true;
}

/** `impersonate` on service accounts of one namespace, for nested impersonation: a Role and RoleBinding. */
export interface ServiceAccountGrant {
  readonly namespace: string;
  /** Sorted; absent when some rule allows every service account of the namespace (`<namespace>/*`). */
  readonly resourceNames?: readonly string[];
  /** The rules that allow them, in file order. */
  readonly rules: readonly string[];
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

const ID_TEMPLATE: Template = { source: '{id}', parts: [{ kind: 'id' }] };

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
    else {
      a.unbounded.push({
        rule: rule.name,
        line: rule.line,
        template: template.source,
        why: value.why,
        ...(template === ID_TEMPLATE && { nested: true as const }),
      });
    }
  };
  const text = (value: string): Template => ({ source: value, parts: [{ kind: 'text', text: value }] });
  for (const rule of policy.rules) {
    add('users', rule, rule.identity.user);
    for (const g of rule.identity.groups) add('groups', rule, g);
    if (rule.identity.uid !== undefined) add('uids', rule, rule.identity.uid);
    for (const [key, values] of Object.entries(rule.identity.extra)) {
      for (const v of values) add(`userextras/${key}`, rule, v);
    }
    const nested = rule.impersonate;
    if (nested === undefined) continue;
    // The groups a client may send with its nested user, implied ones included: the proxy forwards them all.
    const groups = new Set(nested.groups);
    for (const user of nested.users ?? []) for (const g of impliedGroups(user)) groups.add(g);
    for (const entry of nested.serviceAccounts ?? []) {
      for (const g of serviceAccountGroups(entry.slice(0, entry.indexOf('/')))) groups.add(g);
    }
    for (const user of nested.users ?? []) add('users', rule, text(user));
    for (const g of groups) add('groups', rule, text(g));
    add(`userextras/${NESTED_SPIFFE_ID_EXTRA}`, rule, ID_TEMPLATE);
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
  return grant.unbounded.map((c) => {
    const what = c.nested
      ? `allows nested impersonation, which records the client's SPIFFE ID (${JSON.stringify(c.template)}) in extra ${NESTED_SPIFFE_ID_EXTRA}`
      : `maps ${JSON.stringify(c.template)}`;
    return `${grant.resource} is granted without resourceNames (any value): rule "${c.rule}" (line ${c.line}) ${what}, and ${c.why}`;
  });
}

/** The service accounts nested impersonation may name, one grant per namespace, sorted by namespace. */
export function serviceAccountGrants(policy: Policy): ServiceAccountGrant[] {
  const acc = new Map<string, { names: Set<string>; all: boolean; rules: string[] }>();
  for (const rule of policy.rules) {
    for (const entry of rule.impersonate?.serviceAccounts ?? []) {
      const slash = entry.indexOf('/');
      const namespace = entry.slice(0, slash);
      const name = entry.slice(slash + 1);
      let a = acc.get(namespace);
      if (a === undefined) {
        a = { names: new Set(), all: false, rules: [] };
        acc.set(namespace, a);
      }
      if (name === '*') a.all = true;
      else a.names.add(name);
      if (!a.rules.includes(rule.name)) a.rules.push(rule.name);
    }
  }
  return [...acc.entries()]
    .sort(([a], [b]) => compareStrings(a, b))
    .map(([namespace, a]) => ({
      namespace,
      ...(!a.all && { resourceNames: [...a.names].sort(compareStrings) }),
      rules: a.rules,
    }));
}

function ruleList(rules: readonly string[]): string {
  return `rule${rules.length === 1 ? '' : 's'} ${rules.map((r) => JSON.stringify(r)).join(', ')}`;
}

export interface RbacManifests {
  /**
   * YAML documents: a ClusterRole and its ClusterRoleBinding, then, for nested impersonation of service
   * accounts, a Role and RoleBinding per namespace.
   */
  readonly yaml: string;
  /** One line per cause of an unbounded grant (also written into the YAML as comments). */
  readonly warnings: readonly string[];
  readonly grants: readonly ImpersonationGrant[];
  /** Empty when no rule allows nested impersonation of service accounts. */
  readonly serviceAccountGrants: readonly ServiceAccountGrant[];
  /** Some rule has `impersonate`: the ClusterRole also grants `create` on `subjectaccessreviews`. */
  readonly subjectAccessReviews: boolean;
}

/**
 * The ClusterRole and ClusterRoleBinding letting `serviceAccount` impersonate what the policy can produce, and
 * for nested impersonation of service accounts a Role and RoleBinding in each namespace concerned.
 */
export function rbacManifests(
  policy: Policy,
  serviceAccount: ServiceAccountRef = DEFAULT_SERVICE_ACCOUNT,
): RbacManifests {
  const grants = impersonationGrants(policy);
  const saGrants = serviceAccountGrants(policy);
  const nestedRules = policy.rules.filter((r) => r.impersonate !== undefined).map((r) => r.name);
  const subjectAccessReviews = nestedRules.length > 0;
  const roleName = `${serviceAccount.name}-impersonate`;
  const labels = { 'app.kubernetes.io/name': 'kube-svid-proxy' };
  const subjects = [
    { kind: 'ServiceAccount', name: serviceAccount.name, namespace: serviceAccount.namespace },
  ];
  const role = new Document({
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRole',
    metadata: { name: roleName, labels },
    rules: [
      ...grants.map((g) => ({
        apiGroups: [g.apiGroup],
        resources: [g.resource],
        verbs: ['impersonate'],
        ...(g.resourceNames !== undefined && { resourceNames: [...g.resourceNames] }),
      })),
      ...(subjectAccessReviews
        ? [{ apiGroups: ['authorization.k8s.io'], resources: ['subjectaccessreviews'], verbs: ['create'] }]
        : []),
    ],
  });
  const scope = subjectAccessReviews
    ? ', and the nested identities its "impersonate" keys allow\n' +
      (saGrants.length === 0 ? '' : ' (service accounts: in the Roles below, one per namespace).') +
      ' Regenerate after editing the policy.'
    : '. No service account impersonation is granted. Regenerate after editing the policy.';
  role.commentBefore =
    ` Generated by "kube-svid-proxy policy rbac" from ${policy.file}.\n` +
    ` Lets ${serviceAccount.namespace}/${serviceAccount.name} impersonate exactly the users, groups, uids and user extras\n` +
    ` the policy can map SPIFFE IDs to${scope}`;
  if (subjectAccessReviews) {
    const node = role.getIn(['rules', grants.length], true) as YAMLMap | undefined;
    if (node !== undefined) {
      node.commentBefore =
        ` Nested impersonation (${ruleList(nestedRules)}): before forwarding it, the proxy\n` +
        " checks with a SubjectAccessReview that the client's mapped identity may impersonate the nested one.";
    }
  }
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
    subjects,
  });
  const docs = [role, binding];
  for (const g of saGrants) {
    const namespaced = new Document({
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'Role',
      metadata: { name: roleName, namespace: g.namespace, labels },
      rules: [
        {
          apiGroups: [''],
          resources: ['serviceaccounts'],
          verbs: ['impersonate'],
          ...(g.resourceNames !== undefined && { resourceNames: [...g.resourceNames] }),
        },
      ],
    });
    namespaced.commentBefore =
      ` Nested impersonation of service accounts in namespace ${g.namespace} (${ruleList(g.rules)})` +
      (g.resourceNames === undefined
        ? `: every service account of the namespace ("${g.namespace}/*").`
        : '.');
    docs.push(
      namespaced,
      new Document({
        apiVersion: 'rbac.authorization.k8s.io/v1',
        kind: 'RoleBinding',
        metadata: { name: roleName, namespace: g.namespace, labels },
        roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: roleName },
        subjects,
      }),
    );
  }
  const yaml = docs.map((d) => d.toString({ lineWidth: 0 })).join('---\n');
  return { yaml, warnings, grants, serviceAccountGrants: saGrants, subjectAccessReviews };
}
