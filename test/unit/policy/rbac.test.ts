import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { parsePolicy } from '../../../src/policy/policy.ts';
import { impersonationGrants, rbacManifests } from '../../../src/policy/rbac.ts';

const parse = (text: string) => parsePolicy(text, { file: 'policy.yaml' });

const EXACT = `rules:
  - name: argocd
    match: {id: "spiffe://hub.example.org/ns/argocd/sa/controller"}
    identity:
      user: "spiffe:{trustDomain}:{path}"
      groups: ["gitops", "spiffe:{trustDomain}", "ns:{segment:1}"]
      uid: "{id}"
      extra:
        spiffe.io/id: ["{id}"]
  - name: ci
    match: {id: "spiffe://hub.example.org/ci"}
    identity:
      user: ci
      groups: [gitops]
`;

interface Rule {
  apiGroups: string[];
  resources: string[];
  verbs: string[];
  resourceNames?: string[];
}

function documents(yaml: string): Record<string, unknown>[] {
  const docs = parseAllDocuments(yaml);
  assert.ok(Array.isArray(docs));
  for (const d of docs) assert.deepEqual(d.errors, []);
  return docs.map((d) => d.toJS() as Record<string, unknown>);
}

describe('rbacManifests', () => {
  it('grants impersonation of exactly the finite users, groups, uids and extras of exact-ID rules', () => {
    const { yaml, warnings } = rbacManifests(parse(EXACT));
    assert.deepEqual(warnings, []);
    const [role, binding] = documents(yaml);
    assert.equal(role?.kind, 'ClusterRole');
    assert.deepEqual(role?.metadata, {
      name: 'kube-svid-proxy-impersonate',
      labels: { 'app.kubernetes.io/name': 'kube-svid-proxy' },
    });
    const id = 'spiffe://hub.example.org/ns/argocd/sa/controller';
    assert.deepEqual(role?.rules as Rule[], [
      {
        apiGroups: [''],
        resources: ['users'],
        verbs: ['impersonate'],
        resourceNames: ['ci', 'spiffe:hub.example.org:ns/argocd/sa/controller'],
      },
      {
        apiGroups: [''],
        resources: ['groups'],
        verbs: ['impersonate'],
        resourceNames: ['gitops', 'ns:argocd', 'spiffe:hub.example.org'],
      },
      {
        apiGroups: ['authentication.k8s.io'],
        resources: ['uids'],
        verbs: ['impersonate'],
        resourceNames: [id],
      },
      {
        apiGroups: ['authentication.k8s.io'],
        resources: ['userextras/spiffe.io/id'],
        verbs: ['impersonate'],
        resourceNames: [id],
      },
    ]);
    assert.equal(binding?.kind, 'ClusterRoleBinding');
    assert.deepEqual(binding?.roleRef, {
      apiGroup: 'rbac.authorization.k8s.io',
      kind: 'ClusterRole',
      name: 'kube-svid-proxy-impersonate',
    });
    assert.deepEqual(binding?.subjects, [
      { kind: 'ServiceAccount', name: 'kube-svid-proxy', namespace: 'kube-system' },
    ]);
    assert.doesNotMatch(yaml, /serviceaccounts/);
    assert.doesNotMatch(yaml, /WARNING/);
  });

  it('binds the service account given', () => {
    const { yaml } = rbacManifests(parse(EXACT), { namespace: 'proxy', name: 'front' });
    const [role, binding] = documents(yaml);
    assert.deepEqual(role?.metadata, {
      name: 'front-impersonate',
      labels: { 'app.kubernetes.io/name': 'kube-svid-proxy' },
    });
    assert.deepEqual(binding?.subjects, [{ kind: 'ServiceAccount', name: 'front', namespace: 'proxy' }]);
  });

  it('leaves out resourceNames where a pattern makes values unbounded, and says which rule, in YAML and warnings', () => {
    const policy = parse(`${EXACT}  - name: hub-workloads
    match: {pattern: "spiffe://hub.example.org/ns/*/sa/**"}
    identity:
      user: "hub:{segment:1}"
      groups: ["ns:{segment:0}", "hub"]
`);
    const { yaml, warnings } = rbacManifests(policy);
    assert.equal(warnings.length, 1);
    assert.match(
      warnings[0] ?? '',
      /^users is granted without resourceNames \(any value\): rule "hub-workloads" \(line 15\) maps "hub:\{segment:1\}"/,
    );
    assert.match(yaml, /^ {2}# WARNING: users is granted without resourceNames .*rule "hub-workloads"/m);
    const rules = documents(yaml)[0]?.rules as Rule[];
    assert.equal(rules[0]?.resources[0], 'users');
    assert.equal(rules[0]?.resourceNames, undefined);
    // {segment:0} is the literal "ns" in this pattern: still finite.
    assert.deepEqual(rules[1]?.resourceNames, [
      'gitops',
      'hub',
      'ns:argocd',
      'ns:ns',
      'spiffe:hub.example.org',
    ]);
  });

  it('treats {id}, {path} and segments of trust-domain rules as unbounded, {trustDomain} and text as finite', () => {
    const grants = impersonationGrants(
      parse(`rules:
  - name: spoke
    match: {trustDomain: spoke.example.org}
    identity:
      user: "spoke:{trustDomain}"
      groups: ["{segment:0}"]
      uid: "{id}"
      extra: {path: ["{path}"], domain: ["{trustDomain}"]}
`),
    );
    assert.deepEqual(
      grants.map((g) => [g.resource, g.resourceNames, g.unbounded.map((u) => u.rule)]),
      [
        ['users', ['spoke:spoke.example.org'], []],
        ['groups', undefined, ['spoke']],
        ['uids', undefined, ['spoke']],
        ['userextras/domain', ['spoke.example.org'], []],
        ['userextras/path', undefined, ['spoke']],
      ],
    );
    assert.match(grants[1]?.unbounded[0]?.why ?? '', /any ID of trust domain spoke\.example\.org/);
  });

  it('grants nothing for a policy without rules', () => {
    const [role] = documents(rbacManifests(parse('rules: []\n')).yaml);
    assert.deepEqual(role?.rules, []);
  });
});
