import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { runCli } from '../../helpers/cli.ts';

const _main = join(import.meta.dirname, '..', '..', '..', 'src', 'cli', 'main.ts');

interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

const run = (...args: string[]): Promise<RunResult> => runCli(args);

const POLICY = `rules:
  - name: argocd-controller
    match:
      id: spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller
    identity:
      user: "spiffe:{trustDomain}:{path}"
      groups: ["gitops"]
      uid: "{id}"
    limits:
      verbs: [get, list, watch]
      resources: ["pods", "apps/deployments"]
      namespaces: [argocd]
      nonResourcePaths: ["/healthz"]
  - name: hub-workloads
    match:
      pattern: spiffe://hub.example.org/ns/*/sa/**
    identity:
      user: "hub:{segment:1}:{segment:3}"
  - name: spoke
    match:
      trustDomain: spoke.example.org
    identity:
      user: spoke
`;

const BROKEN = `rules:
  - name: Bad
    match: {id: "spiffe://hub.example.org/x"}
    identity: {user: "{nope}"}
  - name: b
    match: {pattern: "spiffe://hub.example.org/**/x"}
    identity: {user: u}
`;

const NESTED = `rules:
  - name: argocd-controller
    match:
      id: spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller
    identity:
      user: argocd-controller
    impersonate:
      serviceAccounts: ["team-a/*", "team-b/deployer"]
      groups: [team-a]
  - name: flux
    match:
      pattern: spiffe://hub.example.org/ns/flux-system/sa/*
    identity:
      user: "flux:{segment:3}"
`;

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';

describe('kube-svid-proxy policy', () => {
  let dir: string;
  let good: string;
  let broken: string;
  let nested: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-cli-policy-'));
    good = join(dir, 'policy.yaml');
    broken = join(dir, 'broken.yaml');
    nested = join(dir, 'nested.yaml');
    writeFileSync(good, POLICY);
    writeFileSync(broken, BROKEN);
    writeFileSync(nested, NESTED);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('check: prints a one-line summary and exits 0 for a valid policy', async () => {
    const r = await run('policy', 'check', good);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(
      r.stdout,
      'OK: 3 rules (1 exact, 1 pattern, 1 trust domain); trust domains: hub.example.org, spoke.example.org\n',
    );
    assert.equal(r.stderr, '');
  });

  it('check: prints every problem as file:line:col on stderr and exits 1 for an invalid or unreadable policy', async () => {
    const [invalid, missing] = await Promise.all([
      run('policy', 'check', broken),
      run('policy', 'check', join(dir, 'missing.yaml')),
    ]);
    assert.equal(invalid.status, 1);
    assert.equal(invalid.stdout, '');
    const lines = invalid.stderr.trimEnd().split('\n');
    assert.deepEqual(
      lines.map((l) => l.slice(0, l.indexOf(': '))),
      [`${broken}:2:11`, `${broken}:4:23`, `${broken}:6:48`],
    );
    assert.match(lines[1] ?? '', /identity\.user: unknown placeholder "\{nope\}"/);
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /missing\.yaml: cannot read the policy file: ENOENT/);
  });

  it('explain: shows the rule, the identity and an allowed request, exit 0', async () => {
    const r = await run(
      'policy',
      'explain',
      good,
      '--id',
      ARGOCD,
      '--verb',
      'list',
      '--resource',
      'apps/deployments',
      '--namespace',
      'argocd',
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(
      r.stdout,
      [
        `id:       ${ARGOCD}`,
        `rule:     argocd-controller (exact ID ${ARGOCD}, ${good}:2)`,
        'limits:   verbs [get, list, watch]; resources [pods, apps/deployments]; namespaces [argocd]; nonResourcePaths [/healthz]',
        'user:     spiffe:hub.example.org:ns/argocd/sa/argocd-application-controller',
        'groups:   gitops',
        `uid:      ${ARGOCD}`,
        'request:  list apps/deployments in namespace "argocd"',
        'decision: ALLOWED',
        '',
      ].join('\n'),
    );
  });

  it('explain: exit 1 when the limits refuse the request or no rule matches; --json for programs', async () => {
    const [limited, none, json, path] = await Promise.all([
      run(
        'policy',
        'explain',
        good,
        '--id',
        ARGOCD,
        '--verb',
        'delete',
        '--resource',
        'pods',
        '--namespace',
        'argocd',
      ),
      run('policy', 'explain', good, '--id', 'spiffe://elsewhere.org/x'),
      run('policy', 'explain', good, '--id', ARGOCD, '--path', '/metrics', '--json'),
      run('policy', 'explain', good, '--id', 'spiffe://hub.example.org/ns/a/sa/b/c', '--path', '/metrics'),
    ]);
    assert.equal(limited.status, 1);
    assert.match(
      limited.stdout,
      /^decision: DENIED ERR_POLICY_REQUEST_LIMIT: rule "argocd-controller": verb "delete" is not in limits\.verbs \[get, list, watch\]$/m,
    );
    assert.equal(none.status, 1);
    assert.match(
      none.stdout,
      /^rule: {5}none: no rule matches spiffe:\/\/elsewhere\.org\/x \(no rule names trust domain "elsewhere\.org"\)/m,
    );
    assert.match(none.stdout, /^decision: DENIED ERR_POLICY_NO_RULE$/m);
    assert.equal(json.status, 1);
    const parsed = JSON.parse(json.stdout) as {
      allowed: boolean;
      code: string;
      rule: { name: string };
      decision: { reason: string };
    };
    assert.equal(parsed.allowed, false);
    assert.equal(parsed.code, 'ERR_POLICY_REQUEST_LIMIT');
    assert.equal(parsed.rule.name, 'argocd-controller');
    assert.match(parsed.decision.reason, /non-resource path "\/metrics" is not in limits\.nonResourcePaths/);
    assert.equal(path.status, 0, 'no limits: RBAC alone decides');
    assert.match(path.stdout, /^user: {5}hub:a:b$/m);
  });

  it('explain: usage errors (exit 2) for a bad ID or request description', async () => {
    const results = await Promise.all([
      run('policy', 'explain', good),
      run('policy', 'explain', good, '--id', 'spiffe://Hub.example.org/x'),
      run('policy', 'explain', good, '--id', ARGOCD, '--resource', 'pods', '--path', '/x'),
      run('policy', 'explain', good, '--id', ARGOCD, '--bogus'),
      run('policy', 'explain', '--id', ARGOCD),
    ]);
    for (const r of results) assert.equal(r.status, 2, r.stderr);
    assert.match(
      results[1]?.stderr ?? '',
      /--id: trust domain must be lowercase.*\(ERR_ID_TRUST_DOMAIN_UPPERCASE\)/,
    );
  });

  it('explain: --impersonate-user and --impersonate-group show the nested impersonation decision', async () => {
    const [allowed, denied, noImpersonate, json] = await Promise.all([
      run(
        'policy',
        'explain',
        nested,
        '--id',
        ARGOCD,
        '--verb',
        'create',
        '--resource',
        'apps/deployments',
        '--namespace',
        'team-a',
        '--impersonate-user',
        'system:serviceaccount:team-a:deployer',
        '--impersonate-group',
        'team-a',
      ),
      run(
        'policy',
        'explain',
        nested,
        '--id',
        ARGOCD,
        '--impersonate-user',
        'system:serviceaccount:team-b:admin',
      ),
      run(
        'policy',
        'explain',
        nested,
        '--id',
        'spiffe://hub.example.org/ns/flux-system/sa/kustomize-controller',
        '--impersonate-user',
        'system:serviceaccount:team-a:deployer',
      ),
      run(
        'policy',
        'explain',
        nested,
        '--id',
        ARGOCD,
        '--impersonate-user',
        'system:serviceaccount:team-a:deployer',
        '--impersonate-group',
        'system:masters',
        '--json',
      ),
    ]);
    assert.equal(allowed.status, 0, allowed.stderr);
    assert.equal(
      allowed.stdout,
      [
        `id:       ${ARGOCD}`,
        `rule:     argocd-controller (exact ID ${ARGOCD}, ${nested}:2)`,
        'limits:   none (the cluster RBAC alone decides)',
        'nesting:  serviceAccounts [team-a/*, team-b/deployer]; groups [team-a]',
        'user:     argocd-controller',
        'groups:   (none)',
        'request:  create apps/deployments in namespace "team-a"',
        'as:       system:serviceaccount:team-a:deployer (service account team-a/deployer)',
        'as-group: team-a',
        'nested:   ALLOWED by the policy (the proxy then asks kube-apiserver, with a SubjectAccessReview, whether user argocd-controller may impersonate it)',
        'decision: ALLOWED',
        '',
      ].join('\n'),
    );
    assert.equal(denied.status, 1);
    assert.match(
      denied.stdout,
      /^nested: {3}DENIED ERR_POLICY_NESTED_IMPERSONATION: rule "argocd-controller": service account "team-b\/admin" is not in impersonate\.serviceAccounts \[team-a\/\*, team-b\/deployer\]$/m,
    );
    assert.match(denied.stdout, /^decision: DENIED ERR_POLICY_NESTED_IMPERSONATION$/m);
    assert.equal(noImpersonate.status, 1);
    assert.match(
      noImpersonate.stdout,
      /^nesting: {2}none \(Impersonate-\* headers from its clients are refused\)$/m,
    );
    assert.match(noImpersonate.stdout, /rule "flux" does not allow nested impersonation/);
    assert.equal(json.status, 1);
    const parsed = JSON.parse(json.stdout) as {
      allowed: boolean;
      code: string;
      nested: {
        requested: { user: string; groups: string[] };
        decision: { allowed: boolean; reason: string };
      };
    };
    assert.equal(parsed.allowed, false);
    assert.equal(parsed.code, 'ERR_POLICY_NESTED_IMPERSONATION');
    assert.deepEqual(parsed.nested.requested, {
      user: 'system:serviceaccount:team-a:deployer',
      groups: ['system:masters'],
    });
    assert.match(parsed.nested.decision.reason, /group "system:masters" is not allowed/);
  });

  it('explain: usage errors (exit 2) for a bad nested impersonation', async () => {
    const [groupOnly, twoUsers] = await Promise.all([
      run('policy', 'explain', nested, '--id', ARGOCD, '--impersonate-group', 'team-a'),
      run('policy', 'explain', nested, '--id', ARGOCD, '--impersonate-user', 'a,b'),
    ]);
    assert.equal(groupOnly.status, 2);
    assert.match(groupOnly.stderr, /--impersonate-group needs --impersonate-user/);
    assert.equal(twoUsers.status, 2);
    assert.match(twoUsers.stderr, /--impersonate-user given 2 times/);
  });

  it('rbac: adds Roles per namespace and SubjectAccessReviews for nested impersonation', async () => {
    const r = await run('policy', 'rbac', nested);
    assert.equal(r.status, 0, r.stderr);
    const docs = parseAllDocuments(r.stdout);
    assert.ok(Array.isArray(docs));
    const objects = docs.map(
      (d) =>
        d.toJS() as { kind: string; metadata: { namespace?: string }; rules?: { resources: string[] }[] },
    );
    assert.deepEqual(
      objects.map((o) => `${o.kind} ${o.metadata.namespace ?? ''}`.trim()),
      [
        'ClusterRole',
        'ClusterRoleBinding',
        'Role team-a',
        'RoleBinding team-a',
        'Role team-b',
        'RoleBinding team-b',
      ],
    );
    assert.deepEqual(
      objects[0]?.rules?.map((rule) => rule.resources[0]),
      ['users', 'groups', 'userextras/spiffe.io/id', 'subjectaccessreviews'],
    );
    assert.equal(r.stderr.split('\n').filter((l) => l.startsWith('warning: ')).length, 1, r.stderr);
    assert.match(r.stderr, /^warning: users is granted without resourceNames \(any value\): rule "flux"/m);
  });

  it('rbac: prints the ClusterRole and binding, warning about unbounded values on stderr', async () => {
    const [r, custom, bad] = await Promise.all([
      run('policy', 'rbac', good),
      run('policy', 'rbac', good, '--service-account', 'proxy/front'),
      run('policy', 'rbac', good, '--service-account', 'front'),
    ]);
    assert.equal(r.status, 0, r.stderr);
    const docs = parseAllDocuments(r.stdout);
    assert.ok(Array.isArray(docs));
    const [role, binding] = docs.map(
      (d) => d.toJS() as { kind: string; rules?: unknown[]; subjects?: unknown[] },
    );
    assert.equal(role?.kind, 'ClusterRole');
    assert.equal(binding?.kind, 'ClusterRoleBinding');
    assert.deepEqual(binding?.subjects, [
      { kind: 'ServiceAccount', name: 'kube-svid-proxy', namespace: 'kube-system' },
    ]);
    assert.deepEqual(role?.rules?.[1], {
      apiGroups: [''],
      resources: ['groups'],
      verbs: ['impersonate'],
      resourceNames: ['gitops'],
    });
    assert.match(r.stdout, /# WARNING: users is granted without resourceNames .*rule "hub-workloads"/);
    assert.match(
      r.stderr,
      /^warning: users is granted without resourceNames \(any value\): rule "hub-workloads" \(line 14\)/m,
    );
    assert.equal(custom.status, 0);
    assert.match(custom.stdout, /name: front\n {4}namespace: proxy/);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--service-account expects NAMESPACE\/NAME/);
  });

  it('answers unknown subcommands with a usage error and lists the commands in help', async () => {
    const [unknown, none, help] = await Promise.all([
      run('policy', 'lint', good),
      run('policy'),
      run('help'),
    ]);
    assert.equal(unknown.status, 2);
    assert.match(unknown.stderr, /unknown policy subcommand "lint"/);
    assert.equal(none.status, 2);
    assert.match(help.stdout, /^ {2}policy check FILE$/m);
    assert.match(help.stdout, /^ {2}policy explain FILE --id SPIFFE_ID/m);
    assert.match(help.stdout, /\[--impersonate-user USER \[--impersonate-group GROUP\]\.\.\.\]/);
    assert.match(help.stdout, /^ {2}policy rbac FILE \[--service-account NAMESPACE\/NAME\]$/m);
    assert.doesNotMatch(help.stdout, /^ {2}policy {8}policy check/m);
  });
});
