import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { PolicyError } from '../../../src/policy/errors.ts';
import { describedNested, explain, formatExplanation } from '../../../src/policy/explain.ts';
import type { Policy } from '../../../src/policy/model.ts';
import {
  type ImpersonationAllowance,
  impliedGroups,
  nestedDecision,
  nestedImpersonationChecks,
  parseImpersonationHeaders,
  parseServiceAccountUser,
} from '../../../src/policy/nested.ts';
import { parsePolicy } from '../../../src/policy/parse.ts';
import { requestInfo } from '../../../src/policy/request.ts';
import { type NestedImpersonationRequest, PolicyDenyCode } from '../../../src/policy/types.ts';
import { SpiffeId } from '../../../src/spiffe/id.ts';

const FILE = 'policy.yaml';

function parse(text: string): Policy {
  return parsePolicy(text, { file: FILE });
}

/** The problems of an invalid policy, as `line:column: message`. */
function problemsOf(text: string): string[] {
  try {
    parse(text);
  } catch (err) {
    assert.ok(err instanceof PolicyError, `expected PolicyError, got ${String(err)}`);
    return err.problems.map((p) => `${p.line}:${p.column}: ${p.message}`);
  }
  assert.fail('expected the policy to be refused');
}

/** A policy with one rule whose `impersonate` map is `lines` (each indented under `impersonate:`). */
function withImpersonate(...lines: string[]): string {
  return [
    'rules:',
    '  - name: argocd',
    '    match: {id: "spiffe://hub.example.org/ns/argocd/sa/controller"}',
    '    identity: {user: argocd}',
    '    impersonate:',
    ...lines.map((l) => `      ${l}`),
    '',
  ].join('\n');
}

const ARGOCD = SpiffeId.parse('spiffe://hub.example.org/ns/argocd/sa/controller');
const FLUX = SpiffeId.parse('spiffe://hub.example.org/ns/flux-system/sa/kustomize-controller');

const POLICY = `rules:
  - name: argocd
    match: {id: "spiffe://hub.example.org/ns/argocd/sa/controller"}
    identity: {user: "spiffe:{path}", groups: [gitops]}
    limits: {verbs: [get, list, watch, create, update, patch, delete]}
    impersonate:
      serviceAccounts: ["team-a/*", "team-b/deployer"]
      users: [ci-bot]
      groups: [team-a, system:authenticated]
  - name: flux
    match: {pattern: "spiffe://hub.example.org/ns/flux-system/sa/*"}
    identity: {user: "flux:{segment:3}"}
  - name: spoke
    match: {trustDomain: spoke.example.org}
    identity: {user: "spoke:{segment:9}"}
    impersonate: {users: [alice]}
`;

const sa = (ns: string, name: string): string => `system:serviceaccount:${ns}:${name}`;
const req = (user: string, ...groups: string[]): NestedImpersonationRequest => ({ user, groups });

describe('impersonate in the policy file', () => {
  it('parses serviceAccounts, users and groups onto the rule', () => {
    const policy = parse(POLICY);
    assert.deepEqual(policy.rules[0]?.impersonate, {
      serviceAccounts: ['team-a/*', 'team-b/deployer'],
      users: ['ci-bot'],
      groups: ['team-a', 'system:authenticated'],
    });
    assert.equal(policy.rules[1]?.impersonate, undefined);
    assert.deepEqual(policy.rules[2]?.impersonate, { users: ['alice'] });
    assert.ok(Object.isFrozen(policy.rules[0]?.impersonate));
    assert.ok(Object.isFrozen(policy.rules[0]?.impersonate?.serviceAccounts));
  });

  it('reports every problem with its line and column', () => {
    const problems = problemsOf(
      withImpersonate(
        'serviceAccounts:',
        '  - "apps/deployer"',
        '  - "apps"',
        '  - "*/deployer"',
        '  - "system:serviceaccount:apps:builder"',
        '  - "Apps/x"',
        '  - "apps/dep*"',
        '  - "apps/Bad_Name"',
        '  - "apps/deployer"',
        'users: ["alice", "system:serviceaccount:apps:x", "*", "a,b", " bob", "alice"]',
        'groups: []',
        'uids: [x]',
      ),
    );
    assert.deepEqual(problems, [
      '8:11: impersonate.serviceAccounts entry "apps": must be "<namespace>/<name>" or "<namespace>/*"',
      '9:11: impersonate.serviceAccounts entry "*/deployer": the namespace must be literal (RBAC grants service account impersonation per namespace): list each namespace, as "<namespace>/*" for all of its service accounts',
      '10:11: impersonate.serviceAccounts entry "system:serviceaccount:apps:builder": write a service account as "<namespace>/<name>" (here "apps/builder"), not as its user name',
      '11:11: impersonate.serviceAccounts entry "Apps/x": the namespace "Apps" is not a namespace name (a DNS label: 1-63 of lower-case [a-z0-9-], not starting or ending with "-")',
      '12:11: impersonate.serviceAccounts entry "apps/dep*": "*" must be the whole name ("apps/*" allows every service account)',
      '13:11: impersonate.serviceAccounts entry "apps/Bad_Name": the name "Bad_Name" is not a service account name (a DNS subdomain: lower-case [a-z0-9-.], at most 253 characters)',
      '14:11: duplicate entry "apps/deployer" in impersonate.serviceAccounts',
      '15:24: impersonate.users entry "system:serviceaccount:apps:x": names a service account: list it under impersonate.serviceAccounts as "apps/x"',
      '15:56: impersonate.users entry "*": "*" is not a wildcard here: list each user by its exact name',
      '15:61: impersonate.users entry "a,b": must not contain "," (repeated headers are joined with ",", so the name could not be told apart)',
      '15:68: impersonate.users entry " bob": must not start or end with white space (HTTP strips it from header values)',
      '15:76: duplicate entry "alice" in impersonate.users',
      '16:15: impersonate.groups must not be empty (omit it to allow no groups)',
      '17:7: unknown key "uids" in impersonate (allowed: serviceAccounts, users, groups)',
    ]);
  });

  it('refuses an empty impersonate, groups alone, a non-map, an empty list and an entry a wildcard covers', () => {
    assert.deepEqual(problemsOf(withImpersonate('{}')), [
      '6:7: rule "argocd": impersonate needs serviceAccounts or users (kube-apiserver requires a user to impersonate; groups alone allow nothing)',
    ]);
    assert.deepEqual(problemsOf(withImpersonate('groups: [team-a]')), [
      '6:7: rule "argocd": impersonate needs serviceAccounts or users (kube-apiserver requires a user to impersonate; groups alone allow nothing)',
    ]);
    assert.deepEqual(problemsOf(withImpersonate('serviceAccounts: []')), [
      '6:24: impersonate.serviceAccounts must not be empty (omit it to allow no serviceAccounts)',
    ]);
    assert.deepEqual(problemsOf(withImpersonate('serviceAccounts: ["apps/x", "apps/*"]')), [
      '6:25: impersonate.serviceAccounts entry "apps/x" is already allowed by "apps/*"',
    ]);
    assert.deepEqual(problemsOf(withImpersonate('users: alice')), [
      '6:14: impersonate.users must be a list, got a string "alice"',
    ]);
    assert.deepEqual(
      problemsOf(
        'rules:\n  - name: a\n    match: {id: "spiffe://x.org/a"}\n    identity: {user: a}\n    impersonate: yes\n',
      ),
      ['5:18: rule "a": impersonate must be a map, got a string "yes"'],
    );
  });
});

describe('parseImpersonationHeaders', () => {
  it('answers undefined when the client sent no impersonation header', () => {
    assert.equal(parseImpersonationHeaders({}), undefined);
    assert.equal(
      parseImpersonationHeaders({ accept: 'application/json', 'impersonate-user': undefined }),
      undefined,
    );
  });

  it('reads one user and any groups, names in any case, lines as arrays or joined with ", "', () => {
    assert.deepEqual(parseImpersonationHeaders({ 'Impersonate-User': sa('apps', 'deployer') }), {
      user: sa('apps', 'deployer'),
      groups: [],
    });
    const expected = { user: 'alice', groups: ['team-a', 'team-b', 'system:authenticated'] };
    assert.deepEqual(
      parseImpersonationHeaders({
        'IMPERSONATE-USER': 'alice',
        'impersonate-group': ['team-a', 'team-b'],
        'Impersonate-Group': 'system:authenticated',
      }),
      expected,
    );
    // Node.js joins repeated header lines in req.headers.
    assert.deepEqual(
      parseImpersonationHeaders({
        'impersonate-user': 'alice',
        'impersonate-group': 'team-a, team-b,system:authenticated',
      }),
      expected,
    );
    // Duplicate groups are sent once.
    assert.deepEqual(
      parseImpersonationHeaders({ 'impersonate-user': 'alice', 'impersonate-group': ['a', 'b', 'a'] }),
      { user: 'alice', groups: ['a', 'b'] },
    );
  });

  it('refuses uids, extras, unknown Impersonate-* headers, several users, groups without a user, empty values', () => {
    const refused = (headers: Record<string, string | string[]>): string => {
      const r = parseImpersonationHeaders(headers);
      assert.ok(r !== undefined && 'refused' in r, `expected a refusal for ${JSON.stringify(headers)}`);
      return r.refused;
    };
    assert.equal(
      refused({ 'impersonate-user': 'alice', 'Impersonate-Uid': '42' }),
      'Impersonate-Uid is not allowed in nested impersonation',
    );
    assert.equal(
      refused({ 'impersonate-user': 'alice', 'impersonate-extra-scopes': 'view' }),
      'Impersonate-Extra-scopes is not allowed in nested impersonation (no user extras)',
    );
    assert.match(
      refused({ 'impersonate-user': 'alice', 'impersonate-groups': 'x' }),
      /unknown impersonation header/,
    );
    assert.match(
      refused({ 'impersonate-user': ['alice', 'bob'] }),
      /^Impersonate-User given 2 times \("alice", "bob"\); nested impersonation takes exactly one user$/,
    );
    assert.match(refused({ 'impersonate-user': 'alice, bob' }), /Impersonate-User given 2 times/);
    assert.match(refused({ 'Impersonate-User': 'alice', 'impersonate-user': 'alice' }), /given 2 times/);
    assert.equal(
      refused({ 'impersonate-group': 'team-a' }),
      'Impersonate-Group without Impersonate-User (kube-apiserver requires a user)',
    );
    assert.equal(refused({ 'impersonate-user': '' }), 'Impersonate-User has an empty value');
    assert.equal(
      refused({ 'impersonate-user': 'a', 'impersonate-group': 'x,,y' }),
      'Impersonate-Group has an empty value',
    );
    assert.match(refused({ 'impersonate-user': 'ali\u00e9' }), /is not printable ASCII/);
    // An Impersonate-Uid alone is refused too, even without a user.
    assert.match(refused({ 'impersonate-uid': '1' }), /Impersonate-Uid/);
  });
});

describe('nestedDecision', () => {
  const allowance: ImpersonationAllowance = {
    serviceAccounts: ['team-a/*', 'team-b/deployer'],
    users: ['ci-bot', 'system:anonymous'],
    groups: ['team-a'],
  };
  const rule = { name: 'argocd', impersonate: allowance };

  const cases: [string, NestedImpersonationRequest, true | RegExp][] = [
    ['any service account of a "<ns>/*" namespace', req(sa('team-a', 'anything')), true],
    ['a listed service account', req(sa('team-b', 'deployer')), true],
    ['a listed user', req('ci-bot'), true],
    [
      'listed and implied groups',
      req(
        sa('team-b', 'deployer'),
        'team-a',
        'system:serviceaccounts',
        'system:serviceaccounts:team-b',
        'system:authenticated',
      ),
      true,
    ],
    ['system:authenticated for a user', req('ci-bot', 'system:authenticated'), true],
    [
      'another service account of a listed namespace',
      req(sa('team-b', 'admin')),
      /^rule "argocd": service account "team-b\/admin" is not in impersonate\.serviceAccounts \[team-a\/\*, team-b\/deployer\]$/,
    ],
    ['a service account elsewhere', req(sa('kube-system', 'deployer')), /"kube-system\/deployer" is not in/],
    [
      'an unlisted user',
      req('alice'),
      /^rule "argocd": user "alice" is not in impersonate\.users \[ci-bot, system:anonymous\]$/,
    ],
    [
      'a malformed service account user',
      req('system:serviceaccount:team-a'),
      /is not a service account user name/,
    ],
    [
      'a service account user with a bad namespace',
      req('system:serviceaccount:Team-A:x'),
      /is not a service account user name/,
    ],
    [
      'an unlisted group',
      req('ci-bot', 'team-a', 'system:masters'),
      /group "system:masters" is not allowed \(impersonate\.groups \[team-a\]; implied for this user: \[system:authenticated\]\)/,
    ],
    [
      "another namespace's service account group",
      req(sa('team-a', 'x'), 'system:serviceaccounts:team-b'),
      /implied for this user: \[system:serviceaccounts, system:serviceaccounts:team-a, system:authenticated\]/,
    ],
    [
      'system:authenticated for system:anonymous',
      req('system:anonymous', 'system:authenticated'),
      /implied for this user: \[\]/,
    ],
    ['several unlisted groups', req('ci-bot', 'x', 'y'), /groups \[x, y\] are not allowed/],
  ];
  for (const [what, requested, expected] of cases) {
    it(`${expected === true ? 'allows' : 'refuses'} ${what}`, () => {
      const d = nestedDecision(rule, requested);
      if (expected === true) {
        assert.ok(d.allowed, d.allowed ? '' : d.reason);
        assert.equal(d.impersonated.user, requested.user);
        assert.deepEqual(d.impersonated.groups, requested.groups);
      } else {
        assert.ok(!d.allowed);
        assert.equal(d.code, PolicyDenyCode.NestedImpersonation);
        assert.match(d.reason, expected);
      }
    });
  }

  it('names the service account of a service account user, and nothing for a user', () => {
    const d = nestedDecision(rule, req(sa('team-a', 'builder.v2')));
    assert.ok(d.allowed);
    assert.deepEqual(d.impersonated.serviceAccount, { namespace: 'team-a', name: 'builder.v2' });
    const u = nestedDecision(rule, req('ci-bot'));
    assert.ok(u.allowed);
    assert.equal('serviceAccount' in u.impersonated, false);
  });

  it('refuses everything for a rule without impersonate, and says which list is missing', () => {
    const none = nestedDecision({ name: 'flux' }, req(sa('team-a', 'x')));
    assert.ok(!none.allowed);
    assert.equal(
      none.reason,
      'rule "flux" does not allow nested impersonation (it has no "impersonate" key)',
    );
    const usersOnly = nestedDecision({ name: 'u', impersonate: { users: ['a'] } }, req(sa('x', 'y')));
    assert.ok(!usersOnly.allowed);
    assert.match(
      usersOnly.reason,
      /service account "x\/y" is not allowed \(the rule has no impersonate\.serviceAccounts\)/,
    );
    const saOnly = nestedDecision({ name: 's', impersonate: { serviceAccounts: ['x/*'] } }, req('a'));
    assert.ok(!saOnly.allowed);
    assert.match(saOnly.reason, /user "a" is not allowed \(the rule has no impersonate\.users\)/);
    const noGroups = nestedDecision(
      { name: 's', impersonate: { serviceAccounts: ['x/*'] } },
      req(sa('x', 'y'), 'g'),
    );
    assert.ok(!noGroups.allowed);
    assert.match(noGroups.reason, /group "g" is not allowed \(the rule has no impersonate\.groups;/);
  });

  it('reads service account user names as kube-apiserver does', () => {
    assert.deepEqual(parseServiceAccountUser(sa('ns', 'name')), { namespace: 'ns', name: 'name' });
    assert.equal(parseServiceAccountUser('system:serviceaccount:ns:a:b'), undefined);
    assert.equal(parseServiceAccountUser('system:serviceaccount::a'), undefined);
    assert.equal(parseServiceAccountUser('system:serviceaccounts:ns'), undefined);
    assert.equal(parseServiceAccountUser('alice'), undefined);
    assert.deepEqual(impliedGroups(sa('ns', 'x')), [
      'system:serviceaccounts',
      'system:serviceaccounts:ns',
      'system:authenticated',
    ]);
    assert.deepEqual(impliedGroups('alice'), ['system:authenticated']);
    assert.deepEqual(impliedGroups('system:anonymous'), []);
  });
});

describe('Policy.decideNested', () => {
  const policy = parse(POLICY);
  const pods = requestInfo('GET', '/api/v1/namespaces/team-a/pods');

  it('allows when the request and the nested identity are allowed, with both identities', () => {
    const d = policy.decideNested(ARGOCD, pods, req(sa('team-a', 'deployer')));
    assert.deepEqual(d, {
      allowed: true,
      rule: 'argocd',
      identity: { user: 'spiffe:ns/argocd/sa/controller', groups: ['gitops'], extra: {} },
      nested: {
        user: sa('team-a', 'deployer'),
        groups: [],
        serviceAccount: { namespace: 'team-a', name: 'deployer' },
      },
    });
  });

  it("answers the request's own refusal first, then the nested one", () => {
    const deletecollection = requestInfo('DELETE', '/api/v1/namespaces/team-a/pods');
    const limited = policy.decideNested(ARGOCD, deletecollection, req('nobody'));
    assert.ok(!limited.allowed);
    assert.equal(limited.code, PolicyDenyCode.RequestLimit);
    const nested = policy.decideNested(ARGOCD, pods, req('nobody'));
    assert.deepEqual(nested, {
      allowed: false,
      rule: 'argocd',
      code: PolicyDenyCode.NestedImpersonation,
      reason: 'rule "argocd": user "nobody" is not in impersonate.users [ci-bot]',
    });
    const noImpersonate = policy.decideNested(FLUX, pods, req(sa('team-a', 'x')));
    assert.ok(!noImpersonate.allowed);
    assert.equal(noImpersonate.rule, 'flux');
    assert.equal(noImpersonate.code, PolicyDenyCode.NestedImpersonation);
    const noRule = policy.decideNested(SpiffeId.parse('spiffe://else.org/x'), pods, req('ci-bot'));
    assert.ok(!noRule.allowed);
    assert.equal(noRule.code, PolicyDenyCode.NoRule);
    const noIdentity = policy.decideNested(
      SpiffeId.parse('spiffe://spoke.example.org/a'),
      pods,
      req('alice'),
    );
    assert.ok(!noIdentity.allowed);
    assert.equal(noIdentity.code, PolicyDenyCode.Identity);
    // decide() is unchanged by the impersonate key.
    assert.ok(policy.decide(FLUX, pods).allowed);
  });

  it("lists what the SubjectAccessReview must check, as kube-apiserver's impersonation filter would", () => {
    const d = policy.decideNested(ARGOCD, pods, req(sa('team-a', 'deployer'), 'team-a'));
    assert.ok(d.allowed);
    assert.deepEqual(nestedImpersonationChecks(d.nested), [
      { verb: 'impersonate', group: '', resource: 'serviceaccounts', namespace: 'team-a', name: 'deployer' },
      { verb: 'impersonate', group: '', resource: 'groups', name: 'team-a' },
    ]);
    const u = policy.decideNested(ARGOCD, pods, req('ci-bot'));
    assert.ok(u.allowed);
    assert.deepEqual(nestedImpersonationChecks(u.nested), [
      { verb: 'impersonate', group: '', resource: 'users', name: 'ci-bot' },
    ]);
  });
});

describe('explain with a nested impersonation', () => {
  const policy = parse(POLICY);

  it('shows what the rule allows, the nested identity and the decision', () => {
    const pods = requestInfo('GET', '/api/v1/namespaces/team-a/pods');
    const e = explain(policy, ARGOCD, pods, req(sa('team-a', 'deployer'), 'team-a'));
    assert.equal(e.allowed, true);
    assert.equal(
      formatExplanation(e, FILE),
      [
        'id:       spiffe://hub.example.org/ns/argocd/sa/controller',
        'rule:     argocd (exact ID spiffe://hub.example.org/ns/argocd/sa/controller, policy.yaml:2)',
        'limits:   verbs [get, list, watch, create, update, patch, delete]; no non-resource requests',
        'nesting:  serviceAccounts [team-a/*, team-b/deployer]; users [ci-bot]; groups [team-a, system:authenticated]',
        'user:     spiffe:ns/argocd/sa/controller',
        'groups:   gitops',
        'request:  list pods in namespace "team-a"',
        'as:       system:serviceaccount:team-a:deployer (service account team-a/deployer)',
        'as-group: team-a',
        'nested:   ALLOWED by the policy (the proxy then asks kube-apiserver, with a SubjectAccessReview, whether user spiffe:ns/argocd/sa/controller may impersonate it)',
        'decision: ALLOWED',
        '',
      ].join('\n'),
    );
  });

  it('is denied when the nested identity is, with or without a described request', () => {
    const withoutRequest = explain(policy, FLUX, undefined, req(sa('team-a', 'deployer')));
    assert.equal(withoutRequest.allowed, false);
    assert.equal(withoutRequest.code, PolicyDenyCode.NestedImpersonation);
    const text = formatExplanation(withoutRequest, FILE);
    assert.match(text, /^nesting: {2}none \(Impersonate-\* headers from its clients are refused\)$/m);
    assert.match(
      text,
      /^nested: {3}DENIED ERR_POLICY_NESTED_IMPERSONATION: rule "flux" does not allow nested impersonation/m,
    );
    assert.match(text, /^decision: DENIED ERR_POLICY_NESTED_IMPERSONATION$/m);
    const withRequest = explain(policy, ARGOCD, requestInfo('GET', '/healthz'), req('ci-bot'));
    assert.equal(withRequest.code, PolicyDenyCode.RequestLimit, "the request's own refusal comes first");
    assert.match(formatExplanation(withRequest, FILE), /^nested: {3}ALLOWED by the policy/m);
    const noRule = explain(policy, SpiffeId.parse('spiffe://else.org/x'), undefined, req('ci-bot'));
    assert.equal(noRule.code, PolicyDenyCode.NoRule);
    assert.match(formatExplanation(noRule, FILE), /^nested: {3}not considered/m);
  });

  it('leaves the output of rules without impersonate unchanged when no nested identity is described', () => {
    assert.doesNotMatch(formatExplanation(explain(policy, FLUX), FILE), /nesting|nested|as:/);
    assert.match(formatExplanation(explain(policy, ARGOCD), FILE), /^nesting: {2}serviceAccounts/m);
  });

  it('reads --impersonate-user and --impersonate-group as the proxy reads the headers', () => {
    assert.equal(describedNested({}), undefined);
    assert.deepEqual(describedNested({ impersonateUser: 'alice', impersonateGroups: ['a', 'b'] }), {
      user: 'alice',
      groups: ['a', 'b'],
    });
    assert.equal(
      describedNested({ impersonateGroups: ['a'] }),
      '--impersonate-group needs --impersonate-user (kube-apiserver requires a user)',
    );
    assert.match(String(describedNested({ impersonateUser: '' })), /--impersonate-user has an empty value/);
  });
});

describe('nested impersonation properties', () => {
  const NAMES = ['alice', 'bob', 'ci-bot', 'team-a', 'team-b', 'system:authenticated', 'system:masters', 'x'];
  const NAMESPACES = ['apps', 'team-a', 'kube-system'];
  const name = fc.constantFrom(...NAMES);
  const serviceAccountEntry = fc.tuple(
    fc.constantFrom(...NAMESPACES),
    fc.constantFrom('*', 'deployer', 'builder'),
  );
  const allowance = fc.record(
    {
      serviceAccounts: fc.uniqueArray(
        serviceAccountEntry.map(([ns, n]) => `${ns}/${n}`),
        { minLength: 1, maxLength: 4 },
      ),
      users: fc.uniqueArray(name, { minLength: 1, maxLength: 4 }),
      groups: fc.uniqueArray(name, { minLength: 1, maxLength: 4 }),
    },
    { requiredKeys: [] },
  );
  const user = fc.oneof(
    name,
    fc
      .tuple(fc.constantFrom(...NAMESPACES), fc.constantFrom('deployer', 'builder', 'other'))
      .map(([ns, n]) => sa(ns, n)),
    fc.string({ maxLength: 12 }),
  );
  const requested = fc.record({
    user,
    groups: fc.uniqueArray(
      fc.oneof(name, fc.constantFrom('system:serviceaccounts', 'system:serviceaccounts:apps')),
      {
        maxLength: 4,
      },
    ),
  });

  it('never allows without an impersonate key', () => {
    fc.assert(
      fc.property(requested, (r) => {
        assert.equal(nestedDecision({ name: 'r' }, r).allowed, false);
      }),
    );
  });

  it('allows only listed users or service accounts and listed or implied groups, and forwards exactly what was asked', () => {
    fc.assert(
      fc.property(allowance, requested, (a, r) => {
        const d = nestedDecision({ name: 'r', impersonate: a }, r);
        const account = parseServiceAccountUser(r.user);
        const userListed =
          account === undefined
            ? (a.users ?? []).includes(r.user)
            : (a.serviceAccounts ?? []).some(
                (e) => e === `${account.namespace}/${account.name}` || e === `${account.namespace}/*`,
              );
        const implied = impliedGroups(r.user);
        const groupsListed = r.groups.every((g) => (a.groups ?? []).includes(g) || implied.includes(g));
        assert.equal(d.allowed, userListed && groupsListed);
        if (d.allowed) {
          assert.equal(d.impersonated.user, r.user);
          assert.deepEqual(d.impersonated.groups, r.groups);
        } else {
          assert.equal(d.code, PolicyDenyCode.NestedImpersonation);
        }
      }),
    );
  });

  it('never allows a group that is neither listed nor implied', () => {
    fc.assert(
      fc.property(allowance, requested, fc.string({ minLength: 1, maxLength: 8 }), (a, r, extra) => {
        fc.pre(!(a.groups ?? []).includes(extra) && !impliedGroups(r.user).includes(extra));
        const d = nestedDecision(
          { name: 'r', impersonate: a },
          { user: r.user, groups: [...r.groups, extra] },
        );
        assert.equal(d.allowed, false);
      }),
    );
  });

  it('reads any headers without throwing, and what it reads is free of commas and empty names', () => {
    const headerName = fc.constantFrom(
      'impersonate-user',
      'Impersonate-User',
      'impersonate-group',
      'IMPERSONATE-GROUP',
      'impersonate-uid',
      'impersonate-extra-x',
      'impersonate-',
      'accept',
    );
    const value = fc.oneof(
      fc.string({ maxLength: 10 }),
      fc.array(fc.string({ maxLength: 10 }), { maxLength: 3 }),
    );
    fc.assert(
      fc.property(fc.dictionary(headerName, value, { maxKeys: 5 }), (headers) => {
        const r = parseImpersonationHeaders(headers);
        if (r === undefined || 'refused' in r) return;
        for (const n of [r.user, ...r.groups]) {
          assert.ok(n !== '' && !n.includes(',') && n.trim() === n);
        }
        assert.equal(new Set(r.groups).size, r.groups.length);
      }),
    );
  });
});
