import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { PolicyError, PolicyErrorCode } from '../../../src/policy/errors.ts';
import { describedRequest, explain, formatExplanation } from '../../../src/policy/explain.ts';
import type { Policy } from '../../../src/policy/model.ts';
import { loadPolicyFile, parsePolicy } from '../../../src/policy/parse.ts';
import { requestInfo } from '../../../src/policy/request.ts';
import { parseTemplate } from '../../../src/policy/template.ts';
import { PolicyDenyCode } from '../../../src/policy/types.ts';
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
    assert.equal(err.code, PolicyErrorCode.Policy);
    return err.problems.map((p) => `${p.line}:${p.column}: ${p.message}`);
  }
  assert.fail('expected the policy to be refused');
}

/** Asserts exactly one problem, at `line:column`, whose message contains every one of `parts`. */
function assertProblem(text: string, at: string, ...parts: string[]): void {
  const problems = problemsOf(text);
  assert.equal(problems.length, 1, problems.join('\n'));
  const [problem] = problems as [string];
  assert.ok(problem.startsWith(`${at}: `), `expected a problem at ${at}, got ${problem}`);
  for (const part of parts) assert.ok(problem.includes(part), `expected "${part}" in: ${problem}`);
}

/** A policy with one rule whose lines follow `rules:` (indented under `- `). */
function oneRule(...lines: string[]): string {
  return `rules:\n${lines.map((l, i) => (i === 0 ? `  - ${l}` : `    ${l}`)).join('\n')}\n`;
}

const id = (text: string): SpiffeId => SpiffeId.parse(text);
const get = (target: string) => requestInfo('GET', target);

const FULL = `# policy.yaml
rules:
  - name: argocd-controller
    match:
      id: spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller
    identity:
      user: "spiffe:{trustDomain}:{path}"
      groups: ["gitops", "spiffe:{trustDomain}"]
      uid: "{id}"
      extra:
        spiffe.io/id: ["{id}"]
    limits:
      verbs: [get, list, watch]
      resources: ["pods", "apps/deployments", "pods/log"]
      namespaces: [default, argocd]
      nonResourcePaths: ["/healthz", "/version", "/openapi/*"]
  - name: hub-workloads
    match:
      pattern: spiffe://hub.example.org/ns/*/sa/**
    identity:
      user: "hub:{segment:1}:{segment:3}"
      groups: ["hub"]
  - name: spoke
    match:
      trustDomain: spoke.example.org
    identity:
      user: "spoke:{path}"
  - name: spoke-admin
    match:
      id: spiffe://spoke.example.org/admin
    identity:
      user: admin
`;

describe('parsePolicy', () => {
  it('reads a full policy: rules in file order, counts and trust domains', () => {
    const policy = parse(FULL);
    assert.deepEqual(
      policy.rules.map((r) => [r.name, r.kind, r.line]),
      [
        ['argocd-controller', 'id', 3],
        ['hub-workloads', 'pattern', 17],
        ['spoke', 'trustDomain', 23],
        ['spoke-admin', 'id', 28],
      ],
    );
    assert.deepEqual(policy.counts(), { id: 2, pattern: 1, trustDomain: 1 });
    assert.deepEqual(policy.trustDomains, ['hub.example.org', 'spoke.example.org']);
    assert.equal(policy.file, FILE);
    assert.deepEqual(policy.rules[0]?.limits, {
      verbs: ['get', 'list', 'watch'],
      resources: ['pods', 'apps/deployments', 'pods/log'],
      namespaces: ['default', 'argocd'],
      nonResourcePaths: ['/healthz', '/version', '/openapi/*'],
    });
  });

  it('accepts an empty rule list (deny everything)', () => {
    const policy = parse('rules: []\n');
    assert.equal(policy.rules.length, 0);
    assert.deepEqual(policy.trustDomains, []);
    const d = policy.decide(id('spiffe://a.org/x'), get('/healthz'));
    assert.equal(d.allowed, false);
  });

  it('accepts anchors and aliases', () => {
    const policy = parse(`rules:
  - name: a
    match: {id: "spiffe://a.org/x"}
    identity: &ident {user: "{path}", groups: [g]}
  - name: b
    match: {id: "spiffe://a.org/y"}
    identity: *ident
`);
    assert.equal(policy.match(id('spiffe://a.org/y'))?.identity.user, 'y');
  });

  it('accepts "trustDomain" given as a root SPIFFE ID', () => {
    const policy = parse(oneRule('name: a', 'match: {trustDomain: "spiffe://a.org"}', 'identity: {user: u}'));
    assert.equal(policy.rules[0]?.match, 'a.org');
  });

  describe('refuses, with line and column', () => {
    it('YAML syntax errors', () => {
      assertProblem('rules: [\n', '2:1', 'YAML syntax');
    });

    it('a file that is not a map, and a missing "rules"', () => {
      assertProblem('- a\n', '1:1', 'must be a map with a "rules" list');
      assert.deepEqual(problemsOf('other: 1\n'), [
        '1:1: unknown key "other" in the top level (allowed: rules)',
        '1:1: missing required key "rules" (write "rules: []" to deny everything)',
      ]);
      assert.deepEqual(
        problemsOf('# nothing\n{}\n').map((p) => p.slice(0, 4)),
        ['2:1:'],
      );
      assertProblem('{}\n', '1:1', 'missing required key "rules"');
      assertProblem('', '1:1', 'must be a map');
    });

    it('"rules" that is not a list, and rules that are not maps', () => {
      assertProblem('rules: 3\n', '1:8', '"rules" must be a list');
      assertProblem('rules:\n  - 3\n', '2:5', 'rule 1 must be a map');
    });

    it('unknown keys at every level', () => {
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', 'colour: red'),
        '5:5',
        'unknown key "colour" in rule "a"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x", ids: 1}', 'identity: {user: u}'),
        '3:37',
        'unknown key "ids"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, group: g}'),
        '4:25',
        'unknown key "group"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', 'limits: {verb: [get]}'),
        '5:14',
        'unknown key "verb" in limits',
      );
    });

    it('missing name, match or identity', () => {
      assertProblem(
        oneRule('match: {id: "spiffe://a.org/x"}', 'identity: {user: u}'),
        '2:5',
        'missing required key "name"',
      );
      assertProblem(oneRule('name: a', 'identity: {user: u}'), '2:5', 'missing required key "match"');
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}'),
        '2:5',
        'missing required key "identity"',
      );
    });

    it('wrong types', () => {
      assertProblem(
        oneRule('name: 3', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}'),
        '2:11',
        'name must be a string',
      );
      assertProblem(oneRule('name: a', 'match: [x]', 'identity: {user: u}'), '3:12', 'match must be a map');
      assertProblem(
        oneRule('name: a', 'match: {id: 3}', 'identity: {user: u}'),
        '3:17',
        'match.id must be a string',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: u'),
        '4:15',
        'identity must be a map',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, groups: g}'),
        '4:33',
        'identity.groups must be a list',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: [u]}'),
        '4:22',
        'identity.user must be a string',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, extra: [x]}'),
        '4:32',
        'identity.extra must be a map',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, extra: {k: v}}'),
        '4:36',
        'must be a list',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', 'limits: [get]'),
        '5:13',
        'limits must be a map',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', 'limits: {verbs: get}'),
        '5:21',
        'limits.verbs must be a list',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', 'limits: {verbs: [1]}'),
        '5:22',
        'an entry of limits.verbs must be a string',
      );
    });

    it('empty, invalid and duplicate rule names', () => {
      assertProblem(
        oneRule('name: ""', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}'),
        '2:11',
        'name must not be empty',
      );
      assertProblem(
        oneRule('name: Argo_CD', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}'),
        '2:11',
        'may contain only [a-z0-9-]',
      );
      assertProblem(
        oneRule('name: -a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}'),
        '2:11',
        'may contain only [a-z0-9-]',
      );
      assertProblem(
        oneRule(`name: ${'a'.repeat(64)}`, 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}'),
        '2:11',
        'longer than 63',
      );
      assertProblem(
        `rules:
  - name: a
    match: {id: "spiffe://a.org/x"}
    identity: {user: u}
  - name: a
    match: {id: "spiffe://a.org/y"}
    identity: {user: u}
`,
        '5:11',
        'duplicate rule name "a": the rule at line 2 has it',
      );
    });

    it('a match with none or several of id, pattern and trustDomain', () => {
      assertProblem(
        oneRule('name: a', 'match: {}', 'identity: {user: u}'),
        '3:12',
        'exactly one of id, pattern or trustDomain',
      );
      assertProblem(
        oneRule('name: a', 'match:', '  id: spiffe://a.org/x', '  trustDomain: a.org', 'identity: {user: u}'),
        '5:7',
        'match has "id" and "trustDomain"',
      );
    });

    it('malformed SPIFFE IDs, with their ERR_ID_* code', () => {
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://A.org/x"}', 'identity: {user: u}'),
        '3:17',
        'ERR_ID_TRUST_DOMAIN_UPPERCASE',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "https://a.org/x"}', 'identity: {user: u}'),
        '3:17',
        'ERR_ID_WRONG_SCHEME',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x/"}', 'identity: {user: u}'),
        '3:17',
        'ERR_ID_TRAILING_SLASH',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org"}', 'identity: {user: u}'),
        '3:17',
        'has no path',
      );
      assertProblem(
        oneRule('name: a', 'match: {trustDomain: "a.org:443"}', 'identity: {user: u}'),
        '3:26',
        'ERR_ID_PORT',
      );
      assertProblem(
        oneRule('name: a', 'match: {trustDomain: "spiffe://a.org/x"}', 'identity: {user: u}'),
        '3:26',
        'not an ID with a path',
      );
    });

    it('malformed patterns, pointing at the segment at fault', () => {
      const rule = (pattern: string) =>
        oneRule('name: a', `match: {pattern: "${pattern}"}`, 'identity: {user: u}');
      // The pattern's text starts at column 23 (after the opening quote at 22).
      assertProblem(rule('spiffe://a.org/**/x'), '3:38', '"**" may only be the last segment');
      assertProblem(rule('spiffe://a.org/ns//x'), '3:41', 'empty segment');
      assertProblem(rule('spiffe://a.org/ns/*/'), '3:43', 'empty segment');
      assertProblem(rule('spiffe://a.org/ns/sa-*'), '3:41', '"sa-*" is not supported');
      assertProblem(rule('spiffe://a.org/ns/**x'), '3:41', 'must be whole segments');
      assertProblem(rule('spiffe://*.org/ns/*'), '3:32', 'trust domain of a pattern is literal');
      assertProblem(rule('spiffe://A.org/ns/*'), '3:32', 'ERR_ID_TRUST_DOMAIN_UPPERCASE');
      assertProblem(rule('spiffe://a.org'), '3:37', 'at least one path segment');
      assertProblem(rule('spiffe://a.org/ns/x'), '3:23', 'write it as "id:"');
      assertProblem(rule('spiffe://a.org/ns/../*'), '3:41', '"." or ".."');
      assertProblem(rule('spiffe://a.org/n%41/*'), '3:38', 'may contain only [a-zA-Z0-9._-]');
      assertProblem(rule('http://a.org/*'), '3:23', 'must start with "spiffe://"');
    });

    it('empty user templates and templates HTTP would alter', () => {
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: ""}'),
        '4:22',
        'identity.user: must not be empty',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: " u"}'),
        '4:23',
        'white space',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: "u\\tv"}'),
        '4:22',
        'printable ASCII',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: "ü"}'),
        '4:23',
        'printable ASCII',
      );
    });

    it('unknown placeholders and stray braces, pointing inside the string', () => {
      // The value starts at column 22; with quotes its text starts at 23.
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: "u:{trustdomain}"}'),
        '4:25',
        'unknown placeholder "{trustdomain}"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity:', '  user: u-{nope}'),
        '5:15',
        'unknown placeholder "{nope}"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', "identity: {user: 'x{segment}'}"),
        '4:24',
        '{segment:0}',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: "x{segment:01}"}'),
        '4:24',
        'whole number',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: "ab{id"}'),
        '4:25',
        'unclosed "{"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: "ab}c"}'),
        '4:25',
        'lone "}"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, groups: [a, "{x}"]}'),
        '4:38',
        'identity.groups entry: unknown placeholder',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, uid: "{y}"}'),
        '4:31',
        'identity.uid: unknown placeholder',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, extra: {k: ["{z}"]}}'),
        '4:38',
        'identity.extra "k" entry: unknown placeholder',
      );
    });

    it("{segment:N} that cannot exist for the rule's match", () => {
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/ns/x"}', 'identity: {user: "{segment:2}"}'),
        '4:23',
        'the ID "spiffe://a.org/ns/x" has 2 segments',
      );
      assertProblem(
        oneRule('name: a', 'match: {pattern: "spiffe://a.org/ns/*"}', 'identity: {user: "{segment:2}"}'),
        '4:23',
        'exactly 2 segments',
      );
      assertProblem(
        oneRule(
          'name: a',
          'match: {pattern: "spiffe://a.org/ns/*/sa/**"}',
          'identity: {user: "{segment:4}"}',
        ),
        '4:23',
        'guarantees only 4 segments',
      );
      // The first ** segment exists: allowed.
      parse(
        oneRule(
          'name: a',
          'match: {pattern: "spiffe://a.org/ns/*/sa/**"}',
          'identity: {user: "{segment:3}"}',
        ),
      );
      // Any segment for a trust-domain rule.
      parse(oneRule('name: a', 'match: {trustDomain: a.org}', 'identity: {user: "{segment:7}"}'));
    });

    it('bad extra keys, empty extra values and duplicate groups', () => {
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, extra: {Key: [v]}}'),
        '4:33',
        'identity.extra key "Key"',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, extra: {"a b": [v]}}'),
        '4:33',
        'lower-case [a-z0-9./-]',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, extra: {k: []}}'),
        '4:36',
        'at least one value',
      );
      assertProblem(
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u, groups: [g, g]}'),
        '4:37',
        'duplicate entry "g"',
      );
    });

    it('users naming a service account', () => {
      assertProblem(
        oneRule(
          'name: a',
          'match: {id: "spiffe://a.org/x"}',
          'identity: {user: "system:serviceaccount:ns:sa"}',
        ),
        '4:22',
        'never service accounts',
      );
    });

    it('two rules with the same exact ID (pointing at the second), pattern or trust domain', () => {
      assertProblem(
        `rules:
  - name: first
    match: {id: "spiffe://a.org/x"}
    identity: {user: u}
  - name: second
    match:
      id: spiffe://a.org/x
    identity: {user: u}
`,
        '7:11',
        'rule "second" matches the same ID as rule "first" at line 2',
      );
      assertProblem(
        `rules:
  - name: a
    match: {pattern: "spiffe://a.org/*"}
    identity: {user: u}
  - name: b
    match: {pattern: "spiffe://a.org/*"}
    identity: {user: u}
`,
        '6:22',
        'the same pattern as rule "a" at line 2',
      );
      assertProblem(
        `rules:
  - name: a
    match: {trustDomain: a.org}
    identity: {user: u}
  - name: b
    match: {trustDomain: "spiffe://a.org"}
    identity: {user: u}
`,
        '6:26',
        'the same trust domain as rule "a" at line 2',
      );
    });

    it('unknown verbs, bad resources, namespaces and paths, empty and duplicate limits', () => {
      const rule = (limits: string) =>
        oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', `limits: ${limits}`);
      assertProblem(rule('{verbs: [get, escalate]}'), '5:27', 'limits.verbs entry "escalate": unknown verb');
      assertProblem(rule('{verbs: [GET]}'), '5:22', 'unknown verb');
      assertProblem(rule('{verbs: []}'), '5:21', 'limits.verbs must not be empty');
      assertProblem(rule('{verbs: [get, get]}'), '5:27', 'duplicate entry "get"');
      assertProblem(rule('{resources: [Pods]}'), '5:26', 'limits.resources entry "Pods"');
      assertProblem(rule('{resources: ["a/b/c/d"]}'), '5:26', 'too many "/"');
      assertProblem(rule('{resources: ["pods/log/x"]}'), '5:26', '"pods" is not an API group');
      assertProblem(rule('{resources: ["Apps.io/x"]}'), '5:26', 'not a DNS subdomain');
      assertProblem(rule('{resources: ["apps/"]}'), '5:26', 'the resource ""');
      assertProblem(rule('{resources: []}'), '5:25', 'limits.resources must not be empty');
      assertProblem(rule('{namespaces: [Default]}'), '5:27', 'not a namespace name');
      assertProblem(rule(`{namespaces: [${'a'.repeat(64)}]}`), '5:27', 'not a namespace name');
      assertProblem(rule('{nonResourcePaths: [healthz]}'), '5:33', 'must start with "/"');
      assertProblem(rule('{nonResourcePaths: ["/a*b"]}'), '5:33', 'only as its last character');
      assertProblem(rule('{nonResourcePaths: ["/a?b"]}'), '5:33', 'no query');
      parse(rule('{nonResourcePaths: []}'));
    });

    it('every problem of a file at once, in file order', () => {
      const problems = problemsOf(`rules:
  - name: Bad
    match: {id: "spiffe://a.org/x"}
    identity: {user: "{nope}"}
  - name: b
    match: {pattern: "spiffe://a.org/**/x"}
    identity: {user: u}
    limits: {verbs: [frob]}
`);
      assert.deepEqual(
        problems.map((p) => p.split(': ')[0]),
        ['2:11', '4:23', '6:38', '8:22'],
      );
    });
  });
});

describe('templates', () => {
  it('expands {id}, {trustDomain}, {path}, {segment:N} and literal braces', () => {
    const policy = parse(
      oneRule(
        'name: a',
        'match: {pattern: "spiffe://hub.example.org/ns/*/sa/**"}',
        'identity:',
        '  user: "{{{segment:1}}}:{segment:3}"',
        '  groups: ["{trustDomain}", "p={path}", "hub.example.org"]',
        '  uid: "{id}"',
        '  extra: {example.org/ns: ["{segment:1}", "argocd"]}',
      ),
    );
    const m = policy.match(id('spiffe://hub.example.org/ns/argocd/sa/ctrl/x'));
    assert.deepEqual(m, {
      rule: 'a',
      identity: {
        user: '{argocd}:ctrl',
        groups: ['hub.example.org', 'p=ns/argocd/sa/ctrl/x'],
        uid: 'spiffe://hub.example.org/ns/argocd/sa/ctrl/x',
        extra: { 'example.org/ns': ['argocd'] },
      },
    });
  });

  it('parses templates into parts, merging text', () => {
    const t = parseTemplate('a{{b}}{id}c');
    assert.ok('template' in t);
    assert.deepEqual(t.template.parts, [
      { kind: 'text', text: 'a{b}' },
      { kind: 'id' },
      { kind: 'text', text: 'c' },
    ]);
  });

  it('denies (never an empty or partial user) when a trust-domain rule needs a segment the ID lacks', () => {
    const policy = parse(
      oneRule('name: td', 'match: {trustDomain: a.org}', 'identity: {user: "u:{segment:2}"}'),
    );
    const short = id('spiffe://a.org/x');
    const d = policy.decide(short, get('/healthz'));
    assert.deepEqual(d, {
      allowed: false,
      rule: 'td',
      code: PolicyDenyCode.Identity,
      reason: 'rule "td" maps the user with {segment:2}, but spiffe://a.org/x has 1 path segment',
    });
    assert.equal(policy.match(short), undefined);
    assert.equal(policy.match(id('spiffe://a.org/x/y/z'))?.identity.user, 'u:z');
  });

  it('denies a user that turns out to be a service account', () => {
    const policy = parse(
      oneRule('name: td', 'match: {trustDomain: a.org}', 'identity: {user: "system:{segment:0}:a:b"}'),
    );
    const d = policy.decide(id('spiffe://a.org/serviceaccount'), get('/api'));
    assert.equal(d.allowed, false);
    assert.ok(!d.allowed && d.code === PolicyDenyCode.Identity && d.reason.includes('service account'));
    assert.equal(policy.decide(id('spiffe://a.org/other'), get('/api')).allowed, true);
  });
});

describe('decide', () => {
  const policy = parse(FULL);
  const argocd = id('spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller');

  it('uses exact-ID rules before patterns and patterns before trust-domain rules', () => {
    assert.equal(policy.match(argocd)?.rule, 'argocd-controller');
    assert.equal(policy.match(id('spiffe://hub.example.org/ns/x/sa/y'))?.rule, 'hub-workloads');
    assert.equal(policy.match(id('spiffe://spoke.example.org/admin'))?.rule, 'spoke-admin');
    assert.equal(policy.match(id('spiffe://spoke.example.org/other'))?.rule, 'spoke');
  });

  it('uses the first pattern in file order', () => {
    const p = parse(`rules:
  - name: narrow
    match: {pattern: "spiffe://a.org/ns/*/sa/x"}
    identity: {user: narrow}
  - name: wide
    match: {pattern: "spiffe://a.org/ns/**"}
    identity: {user: wide}
`);
    assert.equal(p.match(id('spiffe://a.org/ns/q/sa/x'))?.rule, 'narrow');
    assert.equal(p.match(id('spiffe://a.org/ns/q/sa/y'))?.rule, 'wide');
    assert.equal(p.match(id('spiffe://a.org/ns'))?.rule, undefined, '** needs at least one segment');
  });

  it('matches * to exactly one segment and ** to one or more trailing segments', () => {
    const p = parse(oneRule('name: a', 'match: {pattern: "spiffe://a.org/ns/*/sa"}', 'identity: {user: u}'));
    assert.equal(p.match(id('spiffe://a.org/ns/x/sa'))?.rule, 'a');
    assert.equal(p.match(id('spiffe://a.org/ns/x/y/sa')), undefined);
    assert.equal(p.match(id('spiffe://a.org/ns/x/sa/z')), undefined);
    assert.equal(p.match(id('spiffe://b.org/ns/x/sa')), undefined);
  });

  it('denies by default when no rule matches, saying so', () => {
    const d = policy.decide(id('spiffe://elsewhere.org/x'), get('/healthz'));
    assert.deepEqual(d, {
      allowed: false,
      code: PolicyDenyCode.NoRule,
      reason:
        'no rule matches spiffe://elsewhere.org/x (no rule names trust domain "elsewhere.org"); deny by default',
    });
    assert.equal(policy.decide(id('spiffe://hub.example.org/other'), get('/healthz')).allowed, false);
    assert.equal(
      policy.decide(id('spiffe://spoke.example.org'), get('/healthz')).allowed,
      false,
      'root IDs match no rule',
    );
  });

  it('allows what every present limit allows, with the expanded identity', () => {
    const d = policy.decide(argocd, get('/api/v1/namespaces/argocd/pods?watch=1'));
    assert.ok(d.allowed);
    assert.equal(d.rule, 'argocd-controller');
    assert.equal(d.identity.user, 'spiffe:hub.example.org:ns/argocd/sa/argocd-application-controller');
    assert.deepEqual(d.identity.groups, ['gitops', 'spiffe:hub.example.org']);
    assert.equal(d.identity.uid, argocd.toString());
    assert.deepEqual(d.identity.extra, { 'spiffe.io/id': [argocd.toString()] });
    assert.ok(policy.decide(argocd, get('/api/v1/namespaces/default/pods/x/log')).allowed);
    assert.ok(policy.decide(argocd, get('/apis/apps/v1/namespaces/default/deployments')).allowed);
    assert.ok(policy.decide(argocd, get('/openapi/v3/apis')).allowed);
    assert.ok(policy.decide(argocd, requestInfo('HEAD', '/healthz')).allowed, 'HEAD counts as get');
  });

  it('refuses through the matched rule without falling through to later rules', () => {
    const refusals: [string, string, string][] = [
      [
        'DELETE',
        '/api/v1/namespaces/default/pods/x',
        'verb "delete" is not in limits.verbs [get, list, watch]',
      ],
      ['GET', '/api/v1/namespaces/default/secrets', 'resource "secrets" is not in limits.resources'],
      ['GET', '/api/v1/namespaces/default/pods/x/exec', 'resource "pods/exec" is not in limits.resources'],
      ['GET', '/apis/apps/v1/namespaces/default/deployments/x/scale', 'resource "apps/deployments/scale"'],
      ['GET', '/apis/extensions/v1beta1/namespaces/default/deployments', 'resource "extensions/deployments"'],
      ['GET', '/api/v1/namespaces/kube-system/pods', 'namespace "kube-system" is not in limits.namespaces'],
      ['GET', '/api/v1/pods', 'cluster-scoped request refused'],
      ['GET', '/metrics', 'non-resource path "/metrics" is not in limits.nonResourcePaths'],
      ['POST', '/healthz', 'method "POST" (verb "create" for a non-resource request)'],
      ['OPTIONS', '/healthz', 'method "OPTIONS" (no verb for a non-resource request)'],
    ];
    for (const [method, target, reason] of refusals) {
      const d = policy.decide(argocd, requestInfo(method, target));
      assert.equal(d.allowed, false, `${method} ${target}`);
      assert.ok(!d.allowed && d.code === PolicyDenyCode.RequestLimit && d.rule === 'argocd-controller');
      assert.ok(!d.allowed && d.reason.includes(reason), `${method} ${target}: ${!d.allowed && d.reason}`);
    }
  });

  it('refuses non-resource requests when a rule has limits but no nonResourcePaths', () => {
    const p = parse(
      oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', 'limits: {verbs: ["*"]}'),
    );
    const d = p.decide(id('spiffe://a.org/x'), get('/healthz'));
    assert.ok(!d.allowed && d.reason.includes('no limits.nonResourcePaths'));
    assert.ok(p.decide(id('spiffe://a.org/x'), requestInfo('DELETE', '/api/v1/nodes/n')).allowed);
    const empty = parse(
      oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}', 'limits: {}'),
    );
    assert.equal(empty.decide(id('spiffe://a.org/x'), get('/healthz')).allowed, false);
    assert.ok(empty.decide(id('spiffe://a.org/x'), get('/api/v1/secrets')).allowed);
  });

  it('leaves everything to RBAC when a rule has no limits', () => {
    const p = parse(oneRule('name: a', 'match: {id: "spiffe://a.org/x"}', 'identity: {user: u}'));
    for (const [m, t] of [
      ['DELETE', '/api/v1/namespaces/kube-system/secrets'],
      ['POST', '/logs'],
      ['GET', '/api/v1/proxy/nodes/n/x'],
    ]) {
      assert.ok(p.decide(id('spiffe://a.org/x'), requestInfo(m as string, t as string)).allowed);
    }
  });

  it('reads resource wildcards: "*", group/*, */sub, res/*, group/res/sub', () => {
    const at = (resources: string, target: string, method = 'GET') =>
      parse(
        oneRule(
          'name: a',
          'match: {id: "spiffe://a.org/x"}',
          'identity: {user: u}',
          `limits: {resources: ${resources}}`,
        ),
      ).decide(id('spiffe://a.org/x'), requestInfo(method, target)).allowed;
    assert.equal(at('["*"]', '/apis/x.io/v1/things/a/status'), true);
    assert.equal(at('["apps/*"]', '/apis/apps/v1/deployments/a/scale'), true);
    assert.equal(at('["apps/*"]', '/apis/batch/v1/jobs'), false);
    assert.equal(at('["apps/*"]', '/api/v1/pods'), false);
    assert.equal(at('["*/status"]', '/api/v1/nodes/n/status'), true);
    assert.equal(at('["*/status"]', '/api/v1/nodes/n'), false);
    assert.equal(at('["pods/*"]', '/api/v1/namespaces/d/pods/p/exec'), true);
    assert.equal(at('["pods/*"]', '/api/v1/namespaces/d/pods/p'), false);
    assert.equal(at('["pods"]', '/api/v1/namespaces/d/pods/p/exec', 'POST'), false);
    assert.equal(at('["example.com/widgets/status"]', '/apis/example.com/v1/widgets/w/status'), true);
    assert.equal(at('["example.com/widgets"]', '/apis/example.com/v1/widgets/w/status'), false);
    assert.equal(at('["batch/jobs"]', '/apis/batch/v1/namespaces/d/jobs'), true);
    assert.equal(at('["apps/*/scale"]', '/apis/apps/v1/namespaces/d/statefulsets/s/scale'), true);
    assert.equal(at('["apps/*/scale"]', '/apis/apps/v1/namespaces/d/statefulsets/s'), false);
  });

  it('reads namespace "*" as any namespace, never cluster scope', () => {
    const p = parse(
      oneRule(
        'name: a',
        'match: {id: "spiffe://a.org/x"}',
        'identity: {user: u}',
        'limits: {namespaces: ["*"]}',
      ),
    );
    assert.ok(p.decide(id('spiffe://a.org/x'), get('/api/v1/namespaces/any/pods')).allowed);
    assert.equal(p.decide(id('spiffe://a.org/x'), get('/api/v1/nodes')).allowed, false);
  });

  it('matches non-resource paths exactly or, with a trailing *, by prefix', () => {
    const p = parse(
      oneRule(
        'name: a',
        'match: {id: "spiffe://a.org/x"}',
        'identity: {user: u}',
        'limits: {nonResourcePaths: ["/healthz", "/openapi/*"]}',
      ),
    );
    const ok = (path: string) => p.decide(id('spiffe://a.org/x'), get(path)).allowed;
    assert.equal(ok('/healthz'), true);
    assert.equal(ok('/healthz/etcd'), false);
    assert.equal(ok('/openapi/v2'), true);
    assert.equal(ok('/openapi'), false);
  });
});

describe('explain', () => {
  const policy = parse(FULL);

  it('describes the rule, the identity, the limits and the decision', () => {
    const request = describedRequest({ verb: 'delete', resource: 'pods', namespace: 'default' });
    assert.ok(request !== undefined && typeof request !== 'string');
    const e = explain(
      policy,
      id('spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller'),
      request,
    );
    assert.equal(e.allowed, false);
    assert.equal(e.code, PolicyDenyCode.RequestLimit);
    const text = formatExplanation(e, FILE);
    assert.match(
      text,
      /^rule: {5}argocd-controller \(exact ID spiffe:\/\/hub\.example\.org\/ns\/argocd\/sa\/argocd-application-controller, policy\.yaml:3\)$/m,
    );
    assert.match(text, /^user: {5}spiffe:hub\.example\.org:ns\/argocd\/sa\/argocd-application-controller$/m);
    assert.match(text, /^limits: {3}verbs \[get, list, watch\]; resources/m);
    assert.match(
      text,
      /^decision: DENIED ERR_POLICY_REQUEST_LIMIT: rule "argocd-controller": verb "delete"/m,
    );
  });

  it('says why no rule matches', () => {
    const e = explain(policy, id('spiffe://x.org/y'));
    assert.equal(e.allowed, false);
    assert.match(
      formatExplanation(e, FILE),
      /^rule: {5}none: no rule matches spiffe:\/\/x\.org\/y \(no rule names trust domain "x\.org"\)/m,
    );
  });

  it('turns flag descriptions into requests, or says what is wrong', () => {
    assert.equal(describedRequest({}), undefined);
    assert.match(String(describedRequest({ verb: 'get' })), /give --resource/);
    assert.match(String(describedRequest({ resource: 'pods', path: '/x' })), /not both/);
    assert.match(String(describedRequest({ resource: 'pods/*' })), /without "\*"/);
    assert.match(String(describedRequest({ path: 'x' })), /must start with "\/"/);
    assert.match(String(describedRequest({ path: '/api/v1/pods' })), /describe it with --resource/);
    assert.match(
      String(describedRequest({ path: '/a/../b' })),
      /--path: request path has a "\." or "\.\." segment/,
    );
    assert.match(String(describedRequest({ resource: 'pods', namespace: 'A' })), /not a namespace name/);
    const r = describedRequest({ resource: 'apps/deployments/scale', namespace: 'd', verb: 'patch' });
    assert.ok(r !== undefined && typeof r !== 'string');
    assert.deepEqual(
      [r.isResourceRequest, r.verb, r.apiGroup, r.resource, r.subresource, r.namespace],
      [true, 'patch', 'apps', 'deployments', 'scale', 'd'],
    );
    const core = describedRequest({ resource: 'pods/log' });
    assert.ok(core !== undefined && typeof core !== 'string');
    assert.deepEqual([core.apiGroup, core.resource, core.subresource, core.verb], ['', 'pods', 'log', 'get']);
  });
});

describe('loadPolicyFile', () => {
  it('reads a file, and refuses an unreadable one with ERR_POLICY', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ksp-policy-'));
    try {
      const file = join(dir, 'policy.yaml');
      await writeFile(file, FULL);
      assert.equal((await loadPolicyFile(file)).rules.length, 4);
      await assert.rejects(loadPolicyFile(join(dir, 'missing.yaml')), (err: unknown) => {
        assert.ok(err instanceof PolicyError);
        assert.equal(err.code, 'ERR_POLICY');
        assert.match(err.message, /missing\.yaml: cannot read the policy file: ENOENT/);
        return true;
      });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
