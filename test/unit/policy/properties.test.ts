import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { stringify } from 'yaml';
import { PolicyError, RequestInfoError } from '../../../src/policy/errors.ts';
import { parsePolicy } from '../../../src/policy/parse.ts';
import { requestInfo } from '../../../src/policy/request.ts';
import { PolicyDenyCode } from '../../../src/policy/types.ts';
import { SpiffeId } from '../../../src/spiffe/id.ts';

const FILE = 'policy.yaml';

/** Runs parsePolicy; only a PolicyError may escape (checked), success is fine too. */
function parseOrPolicyError(text: string): void {
  try {
    parsePolicy(text, { file: FILE });
  } catch (err) {
    assert.ok(err instanceof PolicyError, `threw ${String(err)}`);
    assert.equal(err.code, 'ERR_POLICY');
    for (const p of err.problems) {
      assert.ok(Number.isInteger(p.line) && p.line >= 1 && Number.isInteger(p.column) && p.column >= 1);
    }
  }
}

const KEYS = [
  'rules',
  'name',
  'match',
  'id',
  'pattern',
  'trustDomain',
  'identity',
  'user',
  'groups',
  'uid',
  'extra',
  'limits',
  'verbs',
  'resources',
  'namespaces',
  'nonResourcePaths',
  'impersonate',
  'serviceAccounts',
  'users',
];

const TEXTS = [
  'spiffe://a.org/x',
  'spiffe://a.org/ns/*/sa/**',
  'spiffe://a.org/**/x',
  'a.org',
  '{id}',
  '{segment:3}',
  '{nope}',
  '{{',
  '}',
  'get',
  'pods/log',
  'apps/*',
  '/healthz',
  '*',
  '',
  'x',
  'apps/*',
  'apps/deployer',
  'system:serviceaccount:apps:x',
];

/** JSON-ish values whose map keys are mostly the policy's own keys, to reach deep into the parser. */
const policyish = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: 'small' },
    fc.constantFrom(...TEXTS),
    fc.string(),
    fc.integer(),
    fc.boolean(),
    fc.constant(null),
    fc.array(tie('value'), { maxLength: 4 }),
    fc.dictionary(fc.oneof(fc.constantFrom(...KEYS), fc.string({ maxLength: 6 })), tie('value'), {
      maxKeys: 5,
    }),
  ),
})).value;

describe('parsePolicy never throws anything but PolicyError', () => {
  it('on arbitrary strings', () => {
    fc.assert(fc.property(fc.string({ maxLength: 300 }), parseOrPolicyError), { numRuns: 400 });
  });

  it('on arbitrary YAML-looking text', () => {
    const token = fc.constantFrom(
      'rules:',
      '\n',
      '  - ',
      '    ',
      'name: a',
      'match: ',
      'id: ',
      '{',
      '}',
      '[',
      ']',
      ',',
      '&a ',
      '*a',
      '"',
      "'",
      '---',
      '#',
      ': ',
      '? ',
      '!!binary ',
      ...TEXTS,
    );
    fc.assert(
      fc.property(fc.array(token, { maxLength: 40 }), (tokens) => parseOrPolicyError(tokens.join(''))),
      { numRuns: 400 },
    );
  });

  it('on arbitrary JSON values dumped to YAML', () => {
    fc.assert(
      fc.property(fc.jsonValue({ maxDepth: 4 }), (value) => parseOrPolicyError(stringify(value))),
      {
        numRuns: 300,
      },
    );
  });

  it('on policy-shaped values dumped to YAML', () => {
    fc.assert(
      fc.property(fc.array(policyish, { maxLength: 4 }), (rules) => parseOrPolicyError(stringify({ rules }))),
      { numRuns: 400 },
    );
  });
});

describe('requestInfo never throws anything but RequestInfoError', () => {
  it('on arbitrary methods and targets', () => {
    const piece = fc.constantFrom(
      '/',
      'api',
      'apis',
      'v1',
      'apps',
      'namespaces',
      'watch',
      'proxy',
      'pods',
      '%2F',
      '%',
      '?',
      '&',
      'watch=',
      '..',
      'x',
    );
    fc.assert(
      fc.property(
        fc.constantFrom('GET', 'POST', 'DELETE', 'PATCH', 'PUT', 'HEAD', 'OPTIONS', 'get', ''),
        fc.oneof(
          fc.string(),
          fc.array(piece, { maxLength: 12 }).map((p) => p.join('')),
        ),
        (method, target) => {
          try {
            const info = requestInfo(method, target);
            assert.equal(typeof info.verb, 'string');
            if (info.isResourceRequest) assert.notEqual(info.resource, '');
          } catch (err) {
            assert.ok(err instanceof RequestInfoError, `threw ${String(err)}`);
          }
        },
      ),
      { numRuns: 500 },
    );
  });
});

// ---------------------------------------------------------------------------------------------------------
// Random valid policies against an independent brute-force matcher

const DOMAINS = ['a.org', 'b.org', 'c.org'];
const SEGMENTS = ['ns', 'sa', 'x', 'y'];

type Kind = 'id' | 'pattern' | 'trustDomain';
interface GenRule {
  kind: Kind;
  td: string;
  segments: string[];
  user: string;
  groups: string[];
  limits?: Record<string, string[]>;
}

const templateFor = (kind: Kind, count: number): fc.Arbitrary<string> => {
  const maxIndex = kind === 'trustDomain' ? 5 : count - 1;
  return fc.oneof(
    fc.constantFrom('u', '{id}', '{path}', 'td:{trustDomain}', 'lit{{x}}'),
    fc.integer({ min: 0, max: maxIndex }).map((n) => `s:{segment:${n}}`),
  );
};

const genRule: fc.Arbitrary<GenRule> = fc
  .record({
    kind: fc.constantFrom<Kind>('id', 'pattern', 'trustDomain'),
    td: fc.constantFrom(...DOMAINS),
    literal: fc.array(fc.constantFrom(...SEGMENTS), { minLength: 1, maxLength: 4 }),
    wild: fc.array(fc.constantFrom(...SEGMENTS, '*', '*'), { minLength: 1, maxLength: 4 }),
    rest: fc.boolean(),
  })
  .chain(({ kind, td, literal, wild, rest }) => {
    let segments: string[] = [];
    if (kind === 'id') segments = literal;
    if (kind === 'pattern') {
      segments = rest ? [...wild, '**'] : wild;
      if (!segments.includes('*') && !segments.includes('**')) segments = [...segments.slice(0, -1), '*'];
    }
    return fc.record({
      kind: fc.constant(kind),
      td: fc.constant(td),
      segments: fc.constant(segments),
      user: templateFor(kind, segments.length),
      groups: fc.uniqueArray(templateFor(kind, segments.length), { maxLength: 2 }),
      limits: fc.option(
        fc.record(
          {
            verbs: fc.subarray(['get', 'list', 'watch', 'create', 'delete', '*'], { minLength: 1 }),
            resources: fc.subarray(['pods', 'pods/log', 'apps/deployments', 'apps/*', '*/status', '*'], {
              minLength: 1,
            }),
            namespaces: fc.subarray(['default', 'kube-system', '*'], { minLength: 1 }),
            nonResourcePaths: fc.subarray(['/healthz', '/openapi/*', '*'], { minLength: 0 }),
          },
          { requiredKeys: [] },
        ),
        { nil: undefined },
      ),
    });
  });

function matchKey(r: GenRule): string {
  return `${r.kind} ${r.td} ${r.segments.join('/')}`;
}

function toYaml(rules: GenRule[]): string {
  return stringify({
    rules: rules.map((r, i) => ({
      name: `r${i}`,
      match:
        r.kind === 'id'
          ? { id: `spiffe://${r.td}/${r.segments.join('/')}` }
          : r.kind === 'pattern'
            ? { pattern: `spiffe://${r.td}/${r.segments.join('/')}` }
            : { trustDomain: r.td },
      identity: { user: r.user, ...(r.groups.length > 0 && { groups: r.groups }) },
      ...(r.limits !== undefined && { limits: r.limits }),
    })),
  });
}

/** Does the rule accept the ID? Written independently of the policy code: regular expressions. */
function bruteMatches(r: GenRule, id: string): boolean {
  const prefix = `spiffe://${r.td}/`;
  if (r.kind === 'trustDomain') return id.startsWith(prefix) && id.length > prefix.length;
  if (r.kind === 'id') return id === prefix + r.segments.join('/');
  const source = r.segments.map((s) => (s === '**' ? '[^/]+(?:/[^/]+)*' : s === '*' ? '[^/]+' : s)).join('/');
  return new RegExp(`^spiffe://${r.td.replaceAll('.', '\\.')}/${source}$`).test(id);
}

/** The rule the policy must use: exact IDs, then patterns, then trust domains; file order within each. */
function bruteRule(rules: GenRule[], id: string): number | undefined {
  for (const kind of ['id', 'pattern', 'trustDomain'] as const) {
    const i = rules.findIndex((r) => r.kind === kind && bruteMatches(r, id));
    if (i >= 0) return i;
  }
  return undefined;
}

const genId = fc
  .record({
    td: fc.constantFrom(...DOMAINS, 'd.org'),
    segments: fc.array(fc.constantFrom(...SEGMENTS, 'z'), { minLength: 0, maxLength: 6 }),
  })
  .map(({ td, segments }) => `spiffe://${td}${segments.map((s) => `/${s}`).join('')}`);

const genRequest = fc
  .record({
    method: fc.constantFrom('GET', 'POST', 'DELETE', 'PUT', 'PATCH', 'HEAD'),
    path: fc.constantFrom(
      '/api/v1/namespaces/default/pods',
      '/api/v1/namespaces/default/pods/p/log',
      '/api/v1/namespaces/kube-system/pods/p',
      '/api/v1/nodes/n/status',
      '/api/v1/watch/pods',
      '/apis/apps/v1/namespaces/default/deployments/d/scale',
      '/apis/apps/v1/deployments',
      '/apis/batch/v1/namespaces/default/jobs',
      '/healthz',
      '/openapi/v3',
      '/version',
      '/apis',
    ),
    query: fc.constantFrom('', '?watch=1', '?watch=false'),
  })
  .map(({ method, path, query }) => requestInfo(method, path + query));

describe('decide on random policies', () => {
  it('never allows an ID no rule accepts, uses the first rule by precedence, and never allows an empty user', () => {
    const seen = { noRule: 0, allowed: 0, limited: 0, identity: 0 };
    fc.assert(
      fc.property(
        fc.uniqueArray(genRule, { selector: matchKey, maxLength: 6 }),
        fc.array(genId, { minLength: 1, maxLength: 5 }),
        genRequest,
        (rules, ids, request) => {
          const policy = parsePolicy(toYaml(rules), { file: FILE });
          assert.deepEqual(policy.trustDomains, [...new Set(rules.map((r) => r.td))].sort());
          for (const text of ids) {
            const id = SpiffeId.parse(text);
            const expected = bruteRule(rules, text);
            const decision = policy.decide(id, request);
            if (expected === undefined) {
              assert.equal(decision.allowed, false, `${text} allowed without a matching rule`);
              assert.ok(!decision.allowed && decision.code === PolicyDenyCode.NoRule);
              assert.equal(policy.match(id), undefined);
              seen.noRule++;
              continue;
            }
            assert.equal(decision.rule, `r${expected}`, `${text}: wrong rule`);
            if (decision.allowed) {
              seen.allowed++;
              assert.ok(decision.identity.user.length > 0, 'empty user');
              const limits = rules[expected]?.limits;
              if (limits?.verbs !== undefined && request.isResourceRequest) {
                assert.ok(limits.verbs.includes('*') || limits.verbs.includes(request.verb));
              }
              if (limits !== undefined && !request.isResourceRequest)
                assert.ok(limits.nonResourcePaths !== undefined);
              if (limits?.namespaces !== undefined && request.isResourceRequest)
                assert.notEqual(request.namespace, '');
            } else {
              assert.ok(decision.code !== PolicyDenyCode.NoRule);
              if (decision.code === PolicyDenyCode.RequestLimit) seen.limited++;
              else seen.identity++;
            }
          }
        },
      ),
      { numRuns: 300 },
    );
    // The property is not vacuous: every outcome occurs.
    for (const [outcome, count] of Object.entries(seen)) assert.ok(count > 10, `${outcome}: ${count}`);
  });
});
