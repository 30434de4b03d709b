import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { stringify } from 'yaml';
import { quote } from '../../../src/config/yaml.ts';
import {
  MATCH_KINDS,
  type MatchKind,
  Policy,
  type PolicyRule,
  type Resolution,
  type Rule,
} from '../../../src/policy/model.ts';
import { parsePolicy } from '../../../src/policy/parse.ts';
import { patternMatches } from '../../../src/policy/pattern.ts';
import { PatternIndex } from '../../../src/policy/pattern-index.ts';
import {
  expandTemplate,
  type IdentityTemplates,
  parseTemplate,
  pathSegment,
  type Template,
} from '../../../src/policy/template.ts';
import type { KubeIdentity } from '../../../src/policy/types.ts';
import { SpiffeId } from '../../../src/spiffe/id.ts';

// The indexed lookup (exact IDs and trust domains by map, patterns in a segment trie) and the compiled identity
// templates against the code they replaced: the linear matcher and the identity builder of the policy before the
// index, kept here as the reference. Runs are seeded, so that a failure reproduces.
const SEED = 14;

/** The matcher before the index: exact IDs, then every pattern in file order, then trust domains. */
function linearRuleFor(rules: readonly PolicyRule[], id: SpiffeId): PolicyRule | undefined {
  if (id.isRoot) return undefined;
  const text = id.toString();
  const domain = id.trustDomain.name;
  const exact = rules.find((r) => r.kind === 'id' && r.match === text);
  if (exact !== undefined) return exact;
  const segments = id.segments;
  for (const rule of rules) {
    if (rule.kind === 'pattern' && rule.trustDomain === domain && patternMatches(rule.segments, segments)) {
      return rule;
    }
  }
  return rules.find((r) => r.kind === 'trustDomain' && r.trustDomain === domain);
}

const SERVICE_ACCOUNT_PREFIX = 'system:serviceaccount:';
class MissingSegment extends Error {}

/** The identity builder before templates were compiled, as it was. */
function referenceIdentity(rule: PolicyRule, id: SpiffeId): KubeIdentity | string {
  const unique = (values: string[]): string[] => [...new Set(values)];
  const expand = (template: Template, what: string): string => {
    const value = expandTemplate(template, id);
    if (typeof value !== 'string') {
      throw new MissingSegment(
        `rule ${quote(rule.name)} maps ${what} with {segment:${value.missing}}, but ${id.toString()} has ` +
          `${id.segments.length} path segment${id.segments.length === 1 ? '' : 's'}`,
      );
    }
    return value;
  };
  try {
    const user = expand(rule.identity.user, 'the user');
    if (user === '') return `rule ${quote(rule.name)} maps ${id.toString()} to an empty user`;
    if (user.startsWith(SERVICE_ACCOUNT_PREFIX)) {
      return `rule ${quote(rule.name)} maps ${id.toString()} to ${quote(user)}, a service account: the proxy never impersonates service accounts`;
    }
    const groups = unique(rule.identity.groups.map((g) => expand(g, 'a group')));
    const uid = rule.identity.uid === undefined ? undefined : expand(rule.identity.uid, 'the uid');
    const extra: Record<string, readonly string[]> = {};
    for (const [key, templates] of Object.entries(rule.identity.extra)) {
      extra[key] = Object.freeze(unique(templates.map((t) => expand(t, `extra ${quote(key)}`))));
    }
    return Object.freeze({
      user,
      groups: Object.freeze(groups),
      ...(uid !== undefined && { uid }),
      extra: Object.freeze(extra),
    });
  } catch (err) {
    if (err instanceof MissingSegment) return err.message;
    throw err;
  }
}

function referenceResolve(rules: readonly PolicyRule[], id: SpiffeId): Resolution | undefined {
  const rule = linearRuleFor(rules, id);
  if (rule === undefined) return undefined;
  const identity = referenceIdentity(rule, id);
  return typeof identity === 'string' ? { rule, problem: identity } : { rule, identity };
}

/** Asserts the policy resolves the ID exactly as the reference does: same rule object, same identity. */
function assertSameAsReference(policy: Policy, id: SpiffeId): Resolution | undefined {
  const expected = referenceResolve(policy.rules, id);
  assert.equal(policy.ruleFor(id), expected?.rule, `${id.toString()}: rule`);
  const actual = policy.resolve(id);
  assert.deepEqual(actual, expected, `${id.toString()}: resolution`);
  if (actual !== undefined && 'identity' in actual) {
    assert.ok(Object.isFrozen(actual.identity) && Object.isFrozen(actual.identity.groups));
    assert.ok(Object.isFrozen(actual.identity.extra));
    for (const values of Object.values(actual.identity.extra)) assert.ok(Object.isFrozen(values));
  }
  return expected;
}

function template(source: string): Template {
  const parsed = parseTemplate(source);
  if ('problems' in parsed) throw new Error(`bad template ${source}`);
  return parsed.template;
}

// ---------------------------------------------------------------------------------------------------------------
// Random rule sets built directly (as the Policy constructor takes them): patterns with and without wildcards,
// `*` anywhere, a final `**`, repeated matches, identities that cannot be made for some IDs.

const DOMAINS = ['a.org', 'b.org', 'c.org'];
const SEGMENTS = ['ns', 'sa', 'x', 'y'];

const genTemplate = fc.constantFrom(
  'u',
  '{id}',
  '{path}',
  'td:{trustDomain}',
  's:{segment:0}',
  's:{segment:1}',
  '{segment:2}',
  'lit{{x}}',
  'system:serviceaccount:{segment:0}',
);

const genIdentity: fc.Arbitrary<IdentityTemplates> = fc
  .record({
    user: genTemplate,
    groups: fc.array(fc.constantFrom('g', 'h', 's:{segment:0}', 'ns:{segment:1}', '{segment:3}'), {
      maxLength: 4,
    }),
    uid: fc.option(genTemplate, { nil: undefined }),
    extra: fc.dictionary(
      fc.constantFrom('k', 'spiffe.io/id', 'z'),
      fc.array(fc.constantFrom('v', '{id}', '{segment:1}', 'w'), { minLength: 1, maxLength: 3 }),
      { maxKeys: 2 },
    ),
  })
  .map(({ user, groups, uid, extra }) => ({
    user: template(user),
    groups: groups.map(template),
    ...(uid !== undefined && { uid: template(uid) }),
    extra: Object.fromEntries(Object.entries(extra).map(([k, v]) => [k, v.map(template)])),
  }));

const genMatch = fc.oneof(
  fc
    .record({
      td: fc.constantFrom(...DOMAINS),
      segments: fc.array(fc.constantFrom(...SEGMENTS), { minLength: 1, maxLength: 4 }),
    })
    .map(({ td, segments }) => ({
      kind: 'id' as MatchKind,
      match: `spiffe://${td}/${segments.join('/')}`,
      trustDomain: td,
      segments,
    })),
  fc
    .record({
      td: fc.constantFrom(...DOMAINS),
      segments: fc.array(fc.constantFrom(...SEGMENTS, '*', '*'), { minLength: 0, maxLength: 4 }),
      rest: fc.boolean(),
    })
    .filter(({ segments, rest }) => segments.length > 0 || rest)
    .map(({ td, segments, rest }) => {
      const all = rest ? [...segments, '**'] : segments;
      return {
        kind: 'pattern' as MatchKind,
        match: `spiffe://${td}/${all.join('/')}`,
        trustDomain: td,
        segments: all,
      };
    }),
  fc.constantFrom(...DOMAINS).map((td) => ({
    kind: 'trustDomain' as MatchKind,
    match: td,
    trustDomain: td,
    segments: [] as string[],
  })),
);

const genRules: fc.Arbitrary<Rule[]> = fc
  .array(fc.record({ match: genMatch, identity: genIdentity }), { maxLength: 12 })
  .map((specs) =>
    specs.map(({ match, identity }, i) =>
      Object.freeze({
        name: `r${i}`,
        line: i + 2,
        ...match,
        segments: Object.freeze([...match.segments]),
        identity,
      }),
    ),
  );

const genId = fc
  .record({
    td: fc.constantFrom(...DOMAINS, 'd.org'),
    segments: fc.array(fc.constantFrom(...SEGMENTS, 'z'), { minLength: 0, maxLength: 6 }),
  })
  .map(({ td, segments }) => SpiffeId.parse(`spiffe://${td}${segments.map((s) => `/${s}`).join('')}`));

/** IDs a rule's match accepts, or nearly: its exact ID, a pattern with its wildcards filled in, and one longer. */
function idsOf(rule: Rule): SpiffeId[] {
  const fill = rule.segments.flatMap((s, i) =>
    s === '**' ? ['y', 'x'].slice(0, 1 + (i % 2)) : s === '*' ? ['x'] : [s],
  );
  const path = rule.kind === 'trustDomain' ? ['ns', 'x'] : fill;
  return [path, [...path, 'sa']].map((p) => SpiffeId.parse(`spiffe://${rule.trustDomain}/${p.join('/')}`));
}

describe('the indexed policy against the linear matcher', () => {
  it('picks the same rule and the same identity for random rule sets and IDs', () => {
    const seen: Record<MatchKind | 'none' | 'problem', number> = {
      id: 0,
      pattern: 0,
      trustDomain: 0,
      none: 0,
      problem: 0,
    };
    let cases = 0;
    fc.assert(
      fc.property(genRules, fc.array(genId, { minLength: 1, maxLength: 12 }), (rules, ids) => {
        const policy = new Policy('policy.yaml', rules);
        for (const id of [...ids, ...rules.flatMap(idsOf)]) {
          const expected = assertSameAsReference(policy, id);
          cases++;
          if (expected === undefined) seen.none++;
          else {
            seen[expected.rule.kind]++;
            if ('problem' in expected) seen.problem++;
          }
        }
      }),
      { seed: SEED, numRuns: 1500 },
    );
    assert.ok(cases > 5000, `only ${cases} cases`);
    // Not vacuous: every outcome occurs often.
    for (const [outcome, count] of Object.entries(seen)) assert.ok(count > 200, `${outcome}: ${count}`);
  });

  it('picks the same rule for random policies read from YAML', () => {
    const rule = fc.tuple(genMatch, fc.constantFrom('u', '{path}', 's:{segment:0}')).filter(([m]) => {
      // parsePolicy refuses a pattern without a wildcard.
      return m.kind !== 'pattern' || m.segments.some((s) => s === '*' || s === '**');
    });
    fc.assert(
      fc.property(
        fc.uniqueArray(rule, { selector: ([m]) => `${m.kind} ${m.match}`, maxLength: 10 }),
        fc.array(genId, { minLength: 1, maxLength: 10 }),
        (specs, ids) => {
          const yaml = stringify({
            rules: specs.map(([m, user], i) => ({
              name: `r${i}`,
              match: { [m.kind]: m.match },
              identity: { user },
            })),
          });
          const policy = parsePolicy(yaml, { file: 'policy.yaml' });
          for (const id of ids) assertSameAsReference(policy, id);
        },
      ),
      { seed: SEED, numRuns: 500 },
    );
  });

  it('picks the same rule in a fleet-sized policy, where the walk skips subtrees that cannot win', () => {
    // A seeded PRNG (mulberry32) over a few thousand rules sharing long prefixes.
    let state = SEED;
    const random = (n: number): number => {
      state = (state + 0x6d2b79f5) >>> 0;
      let t = state;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
    };
    const pick = <T>(items: readonly T[]): T => items[random(items.length)] as T;
    const clusters = Array.from({ length: 40 }, (_, i) => `c${i}`);
    const words = ['ns', 'sa', 'agent', 'team', 'app', 'kube-system', 'default'];
    const identity = { user: template('u'), groups: [], extra: {} };
    const rules: Rule[] = [];
    const keys = new Set<string>();
    while (rules.length < 3000) {
      const kind = pick<MatchKind>(['id', 'pattern', 'pattern', 'trustDomain']);
      const td = pick(['hub.org', 'spoke.org', `${pick(clusters)}.org`]);
      const length = 1 + random(5);
      const segments = Array.from({ length }, (_, i) =>
        i === 1 ? pick(clusters) : kind === 'pattern' && random(3) === 0 ? '*' : pick(words),
      );
      if (kind === 'pattern' && random(3) === 0) segments.push('**');
      const match = kind === 'trustDomain' ? td : `spiffe://${td}/${segments.join('/')}`;
      if (keys.has(`${kind} ${match}`)) continue;
      keys.add(`${kind} ${match}`);
      rules.push({
        name: `r${rules.length}`,
        line: rules.length + 2,
        kind,
        match,
        trustDomain: td,
        segments: kind === 'trustDomain' ? [] : segments,
        identity,
      });
    }
    const policy = new Policy('fleet.yaml', rules);
    const seen = new Set<string>();
    for (let n = 0; n < 6000; n++) {
      const td = pick(['hub.org', 'spoke.org', `${pick(clusters)}.org`, 'other.org']);
      const segments = Array.from({ length: random(7) }, (_, i) => (i === 1 ? pick(clusters) : pick(words)));
      const id = SpiffeId.parse(`spiffe://${td}${segments.map((s) => `/${s}`).join('')}`);
      assert.equal(policy.ruleFor(id), linearRuleFor(rules, id), id.toString());
      seen.add(policy.ruleFor(id)?.kind ?? 'none');
    }
    assert.deepEqual([...seen].sort(), [...MATCH_KINDS, 'none'].sort());
  });
});

describe('precedence, as documented', () => {
  const policy = parsePolicy(
    `rules:
  - {name: wide, match: {pattern: "spiffe://a.org/**"}, identity: {user: wide}}
  - {name: ns, match: {pattern: "spiffe://a.org/ns/*/sa/*"}, identity: {user: ns}}
  - {name: domain, match: {trustDomain: a.org}, identity: {user: domain}}
  - {name: exact, match: {id: "spiffe://a.org/ns/x/sa/y"}, identity: {user: exact}}
  - {name: other, match: {pattern: "spiffe://b.org/ns/*"}, identity: {user: other}}
  - {name: other-domain, match: {trustDomain: b.org}, identity: {user: other-domain}}
`,
    { file: 'policy.yaml' },
  );
  const rule = (id: string): string | undefined => policy.ruleFor(SpiffeId.parse(id))?.name;

  it('uses an exact-ID rule before any pattern, even one earlier in the file', () => {
    assert.equal(rule('spiffe://a.org/ns/x/sa/y'), 'exact');
  });

  it('uses the first pattern in file order, even when a later one is narrower', () => {
    assert.equal(rule('spiffe://a.org/ns/z/sa/y'), 'wide');
  });

  it('uses a pattern before the trust-domain rule, and the trust-domain rule when no pattern matches', () => {
    assert.equal(rule('spiffe://b.org/ns/x'), 'other');
    assert.equal(rule('spiffe://b.org/ns/x/y'), 'other-domain');
    assert.equal(rule('spiffe://b.org/x'), 'other-domain');
  });

  it('matches no rule for an ID without a path, or of a trust domain no rule names', () => {
    assert.equal(rule('spiffe://a.org'), undefined);
    assert.equal(rule('spiffe://c.org/ns/x'), undefined);
  });
});

describe('PatternIndex', () => {
  const index = (
    ...patterns: string[]
  ): PatternIndex<{ trustDomain: string; segments: string[]; p: string }> =>
    new PatternIndex(
      patterns.map((p) => {
        const [td, ...segments] = p.split('/');
        return { trustDomain: td as string, segments, p };
      }),
    );
  const first = (i: ReturnType<typeof index>, id: string): string | undefined => {
    const parsed = SpiffeId.parse(id);
    return i.first(parsed.trustDomain.name, parsed.path)?.p;
  };

  it('answers the first pattern in file order, not the most specific one', () => {
    const i = index('a.org/ns/*/sa/*', 'a.org/ns/x/sa/y', 'a.org/**');
    assert.equal(first(i, 'spiffe://a.org/ns/x/sa/y'), 'a.org/ns/*/sa/*');
    assert.equal(first(i, 'spiffe://a.org/ns/x'), 'a.org/**');
    const j = index('a.org/ns/x/sa/y', 'a.org/ns/*/sa/*', 'a.org/**');
    assert.equal(first(j, 'spiffe://a.org/ns/x/sa/y'), 'a.org/ns/x/sa/y');
    assert.equal(first(j, 'spiffe://a.org/ns/z/sa/y'), 'a.org/ns/*/sa/*');
    const k = index('a.org/**', 'a.org/ns/*/sa/*');
    assert.equal(first(k, 'spiffe://a.org/ns/x/sa/y'), 'a.org/**');
  });

  it('makes "**" take one segment or more, never none', () => {
    const i = index('a.org/ns/**', 'a.org/ns');
    assert.equal(first(i, 'spiffe://a.org/ns'), 'a.org/ns');
    assert.equal(first(i, 'spiffe://a.org/ns/x'), 'a.org/ns/**');
    assert.equal(first(i, 'spiffe://a.org/ns/x/y/z'), 'a.org/ns/**');
    assert.equal(first(index('a.org/**'), 'spiffe://a.org/x'), 'a.org/**');
  });

  it('makes "*" take exactly one segment', () => {
    const i = index('a.org/ns/*', 'a.org/*/*/sa');
    assert.equal(first(i, 'spiffe://a.org/ns'), undefined);
    assert.equal(first(i, 'spiffe://a.org/ns/x'), 'a.org/ns/*');
    assert.equal(first(i, 'spiffe://a.org/ns/x/y'), undefined);
    assert.equal(first(i, 'spiffe://a.org/q/x/sa'), 'a.org/*/*/sa');
  });

  it('keeps trust domains apart and the first of repeated patterns', () => {
    const i = index('a.org/x/*', 'b.org/x/*', 'b.org/**');
    assert.equal(first(i, 'spiffe://b.org/x/y'), 'b.org/x/*');
    assert.equal(first(i, 'spiffe://a.org/y/y'), undefined);
    assert.equal(first(i, 'spiffe://c.org/x/y'), undefined);
    const repeated = new PatternIndex([
      { trustDomain: 'a.org', segments: ['x', '*'], n: 1 },
      { trustDomain: 'a.org', segments: ['x', '*'], n: 2 },
    ]);
    assert.equal(repeated.first('a.org', '/x/y')?.n, 1);
  });

  it('compares literal segments whole, whether few or many share a node', () => {
    const many = Array.from({ length: 20 }, (_, n) => `a.org/ns/team-${n}/*`);
    const i = index('a.org/ns/team/*', 'a.org/ns/team-1x/*', ...many);
    assert.equal(first(i, 'spiffe://a.org/ns/team-1/y'), 'a.org/ns/team-1/*');
    assert.equal(first(i, 'spiffe://a.org/ns/team-19/y'), 'a.org/ns/team-19/*');
    assert.equal(first(i, 'spiffe://a.org/ns/team-20/y'), undefined);
    assert.equal(first(i, 'spiffe://a.org/ns/team/y'), 'a.org/ns/team/*');
    assert.equal(first(i, 'spiffe://a.org/ns/tea/y'), undefined);
    const few = index('a.org/ab/*', 'a.org/abc/*');
    assert.equal(first(few, 'spiffe://a.org/abc/x'), 'a.org/abc/*');
    assert.equal(first(few, 'spiffe://a.org/a/x'), undefined);
  });
});

describe('pathSegment', () => {
  it('gives what splitting the path gives', () => {
    fc.assert(
      fc.property(
        fc
          .array(fc.constantFrom('a', 'bc', 'def', ''), { maxLength: 6 })
          .map((s) => (s.length === 0 ? '' : `/${s.join('/')}`)),
        fc.nat(8),
        (path, index) => {
          const split = path.length === 0 ? [] : path.slice(1).split('/');
          assert.equal(pathSegment(path, index), split[index]);
        },
      ),
      { seed: SEED, numRuns: 2000 },
    );
  });
});
