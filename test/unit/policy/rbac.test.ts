import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { parsePolicy } from '../../../src/policy/parse.ts';
import { impersonationGrants, rbacManifests, serviceAccountGrants } from '../../../src/policy/rbac.ts';

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

  it('without impersonate keys: no Roles, no SubjectAccessReviews, no service accounts', () => {
    const m = rbacManifests(parse(EXACT));
    assert.deepEqual(m.serviceAccountGrants, []);
    assert.equal(m.subjectAccessReviews, false);
    assert.equal(documents(m.yaml).length, 2);
    assert.doesNotMatch(m.yaml, /subjectaccessreviews|kind: Role|serviceaccounts/);
    assert.match(
      m.yaml,
      /^# the policy can map SPIFFE IDs to\. No service account impersonation is granted\./m,
    );
  });

  it('grants what nested impersonation needs: service accounts per namespace, users, groups, the SPIFFE ID extra and SubjectAccessReviews', () => {
    const policy = parse(`${EXACT}    impersonate:
      serviceAccounts: ["team-b/deployer", "team-a/*", "team-b/builder"]
      users: [alice]
      groups: [team-a]
  - name: flux
    match: {pattern: "spiffe://hub.example.org/ns/flux-system/sa/*"}
    identity: {user: flux}
    impersonate:
      serviceAccounts: ["team-b/flux", "flux-system/*"]
`);
    const m = rbacManifests(policy, { namespace: 'proxy', name: 'front' });
    assert.equal(m.subjectAccessReviews, true);
    assert.deepEqual(m.serviceAccountGrants, [
      { namespace: 'flux-system', rules: ['flux'] },
      { namespace: 'team-a', rules: ['ci'] },
      { namespace: 'team-b', resourceNames: ['builder', 'deployer', 'flux'], rules: ['ci', 'flux'] },
    ]);
    const docs = documents(m.yaml);
    assert.deepEqual(
      docs.map((d) => [d.kind, (d.metadata as { namespace?: string }).namespace]),
      [
        ['ClusterRole', undefined],
        ['ClusterRoleBinding', undefined],
        ['Role', 'flux-system'],
        ['RoleBinding', 'flux-system'],
        ['Role', 'team-a'],
        ['RoleBinding', 'team-a'],
        ['Role', 'team-b'],
        ['RoleBinding', 'team-b'],
      ],
    );
    const id = 'spiffe://hub.example.org/ns/argocd/sa/controller';
    assert.deepEqual(docs[0]?.rules as Rule[], [
      {
        apiGroups: [''],
        resources: ['users'],
        verbs: ['impersonate'],
        resourceNames: ['alice', 'ci', 'flux', 'spiffe:hub.example.org:ns/argocd/sa/controller'],
      },
      {
        apiGroups: [''],
        resources: ['groups'],
        verbs: ['impersonate'],
        // The implied groups too: a client may send them explicitly, and the proxy forwards them.
        resourceNames: [
          'gitops',
          'ns:argocd',
          'spiffe:hub.example.org',
          'system:authenticated',
          'system:serviceaccounts',
          'system:serviceaccounts:flux-system',
          'system:serviceaccounts:team-a',
          'system:serviceaccounts:team-b',
          'team-a',
        ],
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
      },
      { apiGroups: ['authorization.k8s.io'], resources: ['subjectaccessreviews'], verbs: ['create'] },
    ]);
    // The pattern rule's clients are unbounded: the SPIFFE ID extra is granted for any value, with a warning.
    assert.deepEqual(m.warnings, [
      'userextras/spiffe.io/id is granted without resourceNames (any value): rule "flux" (line 19) allows nested impersonation, which records the client\'s SPIFFE ID ("{id}") in extra spiffe.io/id, and {id} depends on the ID (pattern spiffe://hub.example.org/ns/flux-system/sa/*)',
    ]);
    assert.match(m.yaml, /^ {2}# WARNING: userextras\/spiffe\.io\/id is granted without resourceNames/m);
    assert.match(
      m.yaml,
      /^ {2}# Nested impersonation \(rules "ci", "flux"\): before forwarding it, the proxy$/m,
    );
    assert.deepEqual(docs[4], {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'Role',
      metadata: {
        name: 'front-impersonate',
        namespace: 'team-a',
        labels: { 'app.kubernetes.io/name': 'kube-svid-proxy' },
      },
      rules: [{ apiGroups: [''], resources: ['serviceaccounts'], verbs: ['impersonate'] }],
    });
    assert.deepEqual((docs[6]?.rules as Rule[] | undefined)?.[0]?.resourceNames, [
      'builder',
      'deployer',
      'flux',
    ]);
    assert.deepEqual(docs[7], {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'RoleBinding',
      metadata: {
        name: 'front-impersonate',
        namespace: 'team-b',
        labels: { 'app.kubernetes.io/name': 'kube-svid-proxy' },
      },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'front-impersonate' },
      subjects: [{ kind: 'ServiceAccount', name: 'front', namespace: 'proxy' }],
    });
    assert.match(
      m.yaml,
      /^# Nested impersonation of service accounts in namespace team-a \(rule "ci"\): every service account of the namespace \("team-a\/\*"\)\.$/m,
    );
    assert.match(
      m.yaml,
      /^# Nested impersonation of service accounts in namespace team-b \(rules "ci", "flux"\)\.$/m,
    );
  });

  it('records the SPIFFE ID extra by name for exact-ID rules, and users alone imply only system:authenticated', () => {
    const policy = parse(`rules:
  - name: argocd
    match: {id: "spiffe://hub.example.org/ns/argocd/sa/controller"}
    identity: {user: argocd}
    impersonate: {users: [alice, system:anonymous]}
`);
    const grants = impersonationGrants(policy);
    assert.deepEqual(
      grants.map((g) => [g.resource, g.resourceNames]),
      [
        ['users', ['alice', 'argocd', 'system:anonymous']],
        ['groups', ['system:authenticated']],
        ['userextras/spiffe.io/id', ['spiffe://hub.example.org/ns/argocd/sa/controller']],
      ],
    );
    assert.deepEqual(serviceAccountGrants(policy), []);
    const m = rbacManifests(policy);
    assert.deepEqual(m.warnings, []);
    assert.equal(documents(m.yaml).length, 2);
    assert.match(
      m.yaml,
      /^# the policy can map SPIFFE IDs to, and the nested identities its "impersonate" keys allow$/m,
    );
  });

  it('grants nothing for a policy without rules', () => {
    const [role] = documents(rbacManifests(parse('rules: []\n')).yaml);
    assert.deepEqual(role?.rules, []);
  });
});
