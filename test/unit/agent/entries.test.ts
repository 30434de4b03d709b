import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { stringify } from 'yaml';
import {
  EntriesError,
  type EntriesWatcher,
  type EntryProblem,
  EntrySet,
  loadEntriesFile,
  makeEntry,
  parseEntries,
  type RegistrationEntry,
  watchEntries,
} from '../../../src/agent/entries.ts';
import { AgentError, AgentErrorCode, isAgentError } from '../../../src/agent/errors.ts';
import { parseSelector } from '../../../src/agent/selectors.ts';
import { IdErrorCode } from '../../../src/spiffe/errors.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';

const spoke = TrustDomain.parse('spoke.example.org');
const FILE = 'entries.yaml';

function parse(text: string): EntrySet {
  return parseEntries(text, { file: FILE, trustDomain: spoke });
}

/** The problems of an invalid file, as `line:column: message`. */
function problemsOf(text: string): string[] {
  try {
    parse(text);
  } catch (err) {
    assert.ok(err instanceof EntriesError, `expected EntriesError, got ${String(err)}`);
    return err.problems.map((p) => `${p.line}:${p.column}: ${p.message}`);
  }
  assert.fail('expected the file to be refused');
}

/** Asserts exactly one problem, at `line:column`, whose message contains every one of `parts`. */
function assertProblem(text: string, at: string, ...parts: string[]): void {
  const problems = problemsOf(text);
  assert.equal(problems.length, 1, problems.join('\n'));
  const [problem] = problems as [string];
  assert.ok(problem.startsWith(`${at}: `), `expected a problem at ${at}, got ${problem}`);
  for (const part of parts) assert.ok(problem.includes(part), `expected "${part}" in: ${problem}`);
}

/** An entries file with one entry whose lines are `lines` (indented under `- `). */
function oneEntry(...lines: string[]): string {
  return `entries:\n${lines.map((l, i) => (i === 0 ? `  - ${l}` : `    ${l}`)).join('\n')}\n`;
}

const FULL = `# Registration entries for the spoke agent.
entries:
  - spiffeId: spiffe://spoke.example.org/kube-svid-proxy   # the proxy itself
    selectors: [ "unix:uid:0" ]
    x509SvidTtl: 1h
    jwtSvidTtl: 5m
    dnsNames: [ localhost, "*.svc.cluster.local" ]
    federatesWith: [ hub.example.org, spiffe://alpha.example.org ]
    hint: internal

  - spiffeId: spiffe://spoke.example.org/ns/argocd/sa/argocd-server
    selectors:
      - k8s:sa:argocd-server
      - k8s:ns:argocd
    x509SvidTtl: 90
`;

describe('parseEntries: a valid file', () => {
  it('reads every field of every entry, in file order', () => {
    const set = parse(FULL);
    assert.equal(set.entries.length, 2);
    const [proxy, argo] = set.entries as [RegistrationEntry, RegistrationEntry];

    assert.equal(proxy.spiffeId.toString(), 'spiffe://spoke.example.org/kube-svid-proxy');
    assert.deepEqual(proxy.selectors, [{ type: 'unix', value: 'uid:0' }]);
    assert.equal(proxy.x509SvidTtlSeconds, 3600);
    assert.equal(proxy.jwtSvidTtlSeconds, 300);
    assert.deepEqual(proxy.dnsNames, ['localhost', '*.svc.cluster.local']);
    assert.deepEqual(
      proxy.federatesWith.map((td) => td.name),
      ['alpha.example.org', 'hub.example.org'],
    );
    assert.equal(proxy.hint, 'internal');
    assert.equal(proxy.line, 3);
    assert.match(proxy.key, /^[0-9a-f]{16}$/);

    assert.equal(argo.spiffeId.toString(), 'spiffe://spoke.example.org/ns/argocd/sa/argocd-server');
    assert.deepEqual(argo.selectors, [
      { type: 'k8s', value: 'ns:argocd' },
      { type: 'k8s', value: 'sa:argocd-server' },
    ]);
    assert.equal(argo.x509SvidTtlSeconds, 90, 'a bare number is seconds');
    assert.equal(argo.jwtSvidTtlSeconds, undefined);
    assert.deepEqual(argo.dnsNames, []);
    assert.deepEqual(argo.federatesWith, []);
    assert.equal(argo.hint, undefined);
    assert.equal('hint' in argo, false, 'absent optional fields are absent, not undefined');
    assert.equal(argo.line, 11);
    assert.notEqual(argo.key, proxy.key);
  });

  it('accepts an empty list: no identities', () => {
    assert.deepEqual(parse('entries: []\n').entries, []);
    assert.deepEqual(parse('entries: []\n').match(new Set(['unix:uid:0'])), []);
  });

  it('follows YAML anchors and aliases', () => {
    const set = parse(`entries:
  - spiffeId: spiffe://spoke.example.org/a
    selectors: &root [ "unix:uid:0" ]
  - spiffeId: spiffe://spoke.example.org/b
    selectors: *root
`);
    assert.deepEqual(
      set.entries.map((e) => e.selectors),
      [[{ type: 'unix', value: 'uid:0' }], [{ type: 'unix', value: 'uid:0' }]],
    );
  });

  it('accepts the DNS names a certificate can carry', () => {
    const set = parse(
      oneEntry(
        'spiffeId: spiffe://spoke.example.org/w',
        'selectors: [ "unix:uid:0" ]',
        `dnsNames: [ localhost, a-b.c, "*.example.org", 0.0.0.x, "${'a'.repeat(63)}.org" ]`,
      ),
    );
    assert.equal(set.entries[0]?.dnsNames.length, 5);
  });

  it('accepts durations with fractions of a second when they total at least 1s', () => {
    const set = parse(
      oneEntry(
        'spiffeId: spiffe://spoke.example.org/w',
        'selectors: [ "unix:uid:0" ]',
        'x509SvidTtl: 1500ms',
        'jwtSvidTtl: 1h30m',
      ),
    );
    assert.equal(set.entries[0]?.x509SvidTtlSeconds, 1.5);
    assert.equal(set.entries[0]?.jwtSvidTtlSeconds, 5400);
  });
});

describe('parseEntries: problems, each at its line and column', () => {
  const valid = ['spiffeId: spiffe://spoke.example.org/w', 'selectors: [ "unix:uid:0" ]'] as const;

  it('refuses a YAML syntax error at its position', () => {
    assertProblem(
      'entries:\n  - spiffeId: "spiffe://spoke.example.org/w\n',
      '3:1',
      'YAML syntax',
      'Missing closing',
    );
    assertProblem('entries:\n\t- x\n', '2:1', 'YAML syntax', 'Tabs');
    assertProblem('entries: @x\n', '1:10', 'YAML syntax', 'reserved character @');
    assertProblem('entries: [ a, b\n', '2:1', 'YAML syntax');
  });

  it('refuses an alias without an anchor', () => {
    assertProblem('entries: *nope\n', '1:10', 'alias *nope refers to no anchor');
  });

  it('refuses a key written twice (a YAML error)', () => {
    assertProblem('entries: []\nentries: []\n', '2:1', 'YAML syntax', 'unique');
  });

  it('refuses more than one YAML document', () => {
    assertProblem('entries: []\n---\nentries: []\n', '2:1', 'more than one YAML document');
  });

  it('refuses a top level that is not a map', () => {
    assertProblem('- spiffeId: spiffe://spoke.example.org/w\n', '1:1', 'must be a map', 'got a list');
    assertProblem('\n\n  just text\n', '3:3', 'must be a map', 'got a string "just text"');
    assertProblem('', '1:1', 'must be a map', 'got nothing');
    assertProblem('# only a comment\n', '1:1', 'must be a map');
  });

  it('refuses a file without "entries", pointing at its map', () => {
    assertProblem('# c\n\n{}\n', '3:1', 'missing required key "entries"', 'entries: []');
  });

  it('refuses "entries" that is not a list, pointing at the value', () => {
    assertProblem('entries: 5\n', '1:10', '"entries" must be a list', 'got a number (5)');
    assertProblem('entries:\n', '1:9', '"entries" must be a list', 'got null');
    assertProblem('entries:\n  spiffeId: x\n', '2:3', '"entries" must be a list', 'got a map');
  });

  it('refuses unknown keys at the top level, naming the key and the allowed ones', () => {
    assertProblem('entries: []\n  \nentrys: []\n', '3:1', 'unknown key "entrys"', '(allowed: entries)');
  });

  it('refuses unknown keys in an entry, naming the key and the allowed ones', () => {
    assertProblem(
      oneEntry(...valid, 'ttl: 1h'),
      '4:5',
      'unknown key "ttl" in entry 1',
      '(allowed: spiffeId, selectors, x509SvidTtl, jwtSvidTtl, dnsNames, federatesWith, hint)',
    );
  });

  it('refuses non-string keys', () => {
    assertProblem(oneEntry(...valid, '7: x'), '4:5', 'keys must be strings', 'got a number (7)');
  });

  it('refuses an entry that is not a map', () => {
    assertProblem(
      'entries:\n  - spiffe://spoke.example.org/w\n',
      '2:5',
      'entry 1 must be a map',
      'got a string',
    );
    assertProblem('entries: [ [] ]\n', '1:12', 'entry 1 must be a map', 'got a list');
  });

  it('refuses an entry without spiffeId or selectors, pointing at the entry', () => {
    assertProblem(oneEntry(valid[1]), '2:5', 'entry 1 is missing required key "spiffeId"');
    assertProblem(oneEntry(valid[0]), '2:5', 'entry 1 is missing required key "selectors"');
  });

  it('refuses values of the wrong type, pointing at the value', () => {
    assertProblem(
      oneEntry('spiffeId: 42', valid[1]),
      '2:15',
      'spiffeId must be a string',
      'got a number (42)',
    );
    assertProblem(oneEntry('spiffeId:', valid[1]), '2:14', 'spiffeId must be a string', 'got null');
    assertProblem(
      oneEntry(valid[0], 'selectors: unix:uid:0'),
      '3:16',
      'selectors must be a list',
      'got a string',
    );
    assertProblem(
      oneEntry(valid[0], 'selectors: [ true ]'),
      '3:18',
      'a selector must be a string',
      'boolean',
    );
    assertProblem(oneEntry(...valid, 'dnsNames: { a: b }'), '4:15', 'dnsNames must be a list', 'got a map');
    assertProblem(oneEntry(...valid, 'federatesWith: x.org'), '4:20', 'federatesWith must be a list');
    assertProblem(oneEntry(...valid, 'hint: 123'), '4:11', 'hint must be a string', 'got a number (123)');
    assertProblem(
      oneEntry(...valid, 'x509SvidTtl: true'),
      '4:18',
      'x509SvidTtl must be a duration',
      'boolean',
    );
    assertProblem(
      oneEntry(...valid, 'jwtSvidTtl: [ 5m ]'),
      '4:17',
      'jwtSvidTtl must be a duration',
      'a list',
    );
  });

  it('refuses a malformed SPIFFE ID, naming the rule by its code', () => {
    for (const [id, code] of [
      ['spiffe://spoke.example.org/a//b', IdErrorCode.EmptySegment],
      ['https://spoke.example.org/a', IdErrorCode.WrongScheme],
      ['spiffe://Spoke.example.org/a', IdErrorCode.TrustDomainUppercase],
      ['spiffe://spoke.example.org/a?x=1', IdErrorCode.Query],
    ] as const) {
      assertProblem(oneEntry(`spiffeId: "${id}"`, valid[1]), '2:15', 'spiffeId', `(${code})`);
    }
  });

  it("refuses a SPIFFE ID outside the agent's trust domain", () => {
    assertProblem(
      oneEntry('spiffeId: spiffe://hub.example.org/w', valid[1]),
      '2:15',
      'outside the agent\'s trust domain "spoke.example.org"',
    );
  });

  it("refuses the trust domain's own ID, which names no workload", () => {
    assertProblem(oneEntry('spiffeId: spiffe://spoke.example.org', valid[1]), '2:15', 'has no path');
  });

  it('refuses an empty selector list', () => {
    assertProblem(oneEntry(valid[0], 'selectors: []'), '3:16', 'selectors must not be empty');
  });

  it('refuses a bad selector with the message of parseSelector', () => {
    for (const bad of ['uid0', 'docker:image:x', 'unix:']) {
      let expected = '';
      try {
        parseSelector(bad);
      } catch (err) {
        expected = (err as Error).message;
      }
      assert.notEqual(expected, '');
      assertProblem(oneEntry(valid[0], `selectors: [ "unix:uid:0", "${bad}" ]`), '3:32', expected);
    }
  });

  it('refuses the same selector twice in one entry', () => {
    assertProblem(
      oneEntry(valid[0], 'selectors: [ "unix:uid:0", unix:uid:0 ]'),
      '3:32',
      'duplicate selector',
    );
  });

  it('refuses bad durations and durations under 1s', () => {
    assertProblem(oneEntry(...valid, 'x509SvidTtl: 1 hour'), '4:18', 'x509SvidTtl', 'not valid');
    assertProblem(oneEntry(...valid, 'x509SvidTtl: 999ms'), '4:18', 'shorter than the minimum of 1s');
    assertProblem(oneEntry(...valid, 'jwtSvidTtl: 0'), '4:17', 'jwtSvidTtl', 'minimum of 1s');
    assertProblem(oneEntry(...valid, 'jwtSvidTtl: -5'), '4:17', 'jwtSvidTtl', 'non-negative');
    assertProblem(oneEntry(...valid, 'jwtSvidTtl: .inf'), '4:17', 'jwtSvidTtl');
  });

  it('refuses bad DNS names, pointing at the name', () => {
    for (const [name, why] of [
      ['Example.org', 'invalid label "Example"'],
      ['under_score.org', 'invalid label'],
      ['-lead.org', 'invalid label'],
      ['trail-.org', 'invalid label'],
      ['a..b', 'empty label'],
      ['example.org.', 'empty label'],
      ['a.*.org', 'wildcard only as its whole first label'],
      ['*x.org', 'wildcard only'],
      ['*', 'bare wildcard'],
      ['', 'is empty'],
      [`${'a'.repeat(64)}.org`, 'invalid label'],
      [Array.from({ length: 64 }, () => 'abc').join('.'), 'longer than 253 characters'],
    ] as const) {
      assertProblem(oneEntry(...valid, `dnsNames: [ localhost, "${name}" ]`), '4:28', 'DNS name', why);
    }
    assertProblem(oneEntry(...valid, 'dnsNames: [ localhost, localhost ]'), '4:28', 'duplicate DNS name');
  });

  it('refuses a bad trust domain in federatesWith, and the agent’s own', () => {
    assertProblem(
      oneEntry(...valid, 'federatesWith: [ "Hub.example.org" ]'),
      '4:22',
      'federatesWith',
      `(${IdErrorCode.TrustDomainUppercase})`,
    );
    assertProblem(
      oneEntry(...valid, 'federatesWith: [ "hub.example.org:443" ]'),
      '4:22',
      `(${IdErrorCode.Port})`,
    );
    assertProblem(
      oneEntry(...valid, 'federatesWith: [ hub.example.org, spoke.example.org ]'),
      '4:39',
      "must not name the agent's own trust domain",
    );
    assertProblem(
      oneEntry(...valid, 'federatesWith: [ hub.example.org, spiffe://hub.example.org ]'),
      '4:39',
      'duplicate trust domain',
    );
  });

  it('refuses an empty hint and one over 1024 bytes', () => {
    assertProblem(oneEntry(...valid, 'hint: ""'), '4:11', 'hint must not be empty');
    assertProblem(oneEntry(...valid, `hint: ${'h'.repeat(1025)}`), '4:11', 'hint is longer than 1024 bytes');
    // 342 characters, 1026 bytes: the limit is in bytes.
    assertProblem(oneEntry(...valid, `hint: ${'€'.repeat(342)}`), '4:11', 'longer than 1024 bytes');
    assert.equal(parse(oneEntry(...valid, `hint: ${'h'.repeat(1024)}`)).entries[0]?.hint?.length, 1024);
  });

  it('refuses two entries with the same SPIFFE ID and selector set, pointing at the second', () => {
    const text = `entries:
  - spiffeId: spiffe://spoke.example.org/w
    selectors: [ "unix:uid:0", "k8s:ns:a" ]
  - spiffeId: spiffe://spoke.example.org/w
    selectors: [ "unix:uid:0" ]
  - hint: other
    spiffeId: spiffe://spoke.example.org/w
    selectors: [ "k8s:ns:a", "unix:uid:0" ]
`;
    assertProblem(text, '6:5', 'duplicate entry', 'line 2');
  });

  it('reports every problem of a file at once, in file order', () => {
    const text = `entries:
  - spiffeId: spiffe://hub.example.org/x
    selectors: []
    colour: blue
  - spiffeId: spiffe://spoke.example.org/y
    selectors: [ "unix:uid:0", "bogus" ]
    x509SvidTtl: soon
    dnsNames: [ "Bad" ]
    hint: ""
  - 7
extra: true
`;
    assert.deepEqual(problemsOf(text), [
      '2:15: spiffeId "spiffe://hub.example.org/x" is outside the agent\'s trust domain "spoke.example.org"',
      '3:16: selectors must not be empty: an entry needs at least one selector',
      '4:5: unknown key "colour" in entry 1 (allowed: spiffeId, selectors, x509SvidTtl, jwtSvidTtl, dnsNames, ' +
        'federatesWith, hint)',
      '6:32: selector "bogus" is not of the form type:value',
      '7:18: x509SvidTtl: duration "soon" is not valid at "soon" (write e.g. 1h, 5m, 30s, 1h30m)',
      '8:17: DNS name "Bad" has an invalid label "Bad" (labels are 1–63 of [a-z0-9-], not starting or ending with "-")',
      '9:11: hint must not be empty (omit it instead)',
      '10:5: entry 3 must be a map with spiffeId and selectors, got a number (7)',
      '11:1: unknown key "extra" in the top level (allowed: entries)',
    ]);
  });

  it('throws one AgentError (ERR_AGENT_ENTRIES) whose message has a file:line:col line per problem', () => {
    const text = 'entries:\n  - spiffeId: x\n    selectors: [ nope ]\n';
    assert.throws(
      () => parseEntries(text, { file: '/etc/agent/entries.yaml', trustDomain: spoke }),
      (err: unknown) => {
        assert.ok(err instanceof AgentError);
        assert.ok(isAgentError(err, AgentErrorCode.Entries));
        assert.ok(err instanceof EntriesError);
        assert.equal(err.file, '/etc/agent/entries.yaml');
        const lines = err.message.split('\n');
        assert.equal(lines.length, 2);
        assert.equal(lines.length, err.problems.length);
        lines.forEach((line, i) => {
          const p = err.problems[i] as EntryProblem;
          assert.equal(line, `/etc/agent/entries.yaml:${p.line}:${p.column}: ${p.message}`);
        });
        assert.match(
          lines[0] as string,
          /^\/etc\/agent\/entries\.yaml:2:15: spiffeId: .*\(ERR_ID_WRONG_SCHEME\)$/,
        );
        assert.match(lines[1] as string, /^\/etc\/agent\/entries\.yaml:3:18: selector "nope"/);
        return true;
      },
    );
  });
});

describe('EntrySet.match', () => {
  const set = parse(`entries:
  - spiffeId: spiffe://spoke.example.org/z-first
    selectors: [ "unix:uid:0", "k8s:ns:a" ]
  - spiffeId: spiffe://spoke.example.org/a-second
    selectors: [ "unix:uid:0" ]
    hint: internal
  - spiffeId: spiffe://spoke.example.org/m-third
    selectors: [ "k8s:ns:a" ]
    hint: internal
  - spiffeId: spiffe://spoke.example.org/z-first
    selectors: [ "k8s:ns:a" ]
  - spiffeId: spiffe://spoke.example.org/z-first
    selectors: [ "unix:uid:0" ]
    hint: external
  - spiffeId: spiffe://spoke.example.org/other
    selectors: [ "unix:uid:1000" ]
`);
  const ids = (selectors: string[]): string[] => set.match(new Set(selectors)).map((e) => e.spiffeId.path);

  it('requires every selector of an entry', () => {
    assert.deepEqual(ids(['unix:uid:0']), ['/a-second', '/z-first']);
    assert.deepEqual(ids(['unix:uid:1000', 'k8s:ns:b']), ['/other']);
    assert.deepEqual(ids(['k8s:ns:b']), []);
    assert.deepEqual(ids([]), []);
  });

  it('returns matches in file order, not sorted, so the first is the default identity', () => {
    const matched = set.match(new Set(['unix:uid:0', 'k8s:ns:a', 'k8s:pod-name:x']));
    assert.deepEqual(
      matched.map((e) => [e.spiffeId.path, e.hint ?? null]),
      [
        ['/z-first', null],
        ['/a-second', 'internal'],
        // '/m-third' repeats the hint "internal"; the 4th entry repeats /z-first with no hint.
        ['/z-first', 'external'],
      ],
    );
    assert.deepEqual(
      matched.map((e) => e.line),
      [2, 4, 12],
    );
  });

  it('keeps the same SPIFFE ID twice when the hints differ, and different IDs without hints', () => {
    const other = parse(`entries:
  - spiffeId: spiffe://spoke.example.org/w
    selectors: [ "unix:uid:0" ]
    hint: a
  - spiffeId: spiffe://spoke.example.org/w
    selectors: [ "unix:gid:0" ]
    hint: b
  - spiffeId: spiffe://spoke.example.org/x
    selectors: [ "unix:uid:0" ]
  - spiffeId: spiffe://spoke.example.org/y
    selectors: [ "unix:gid:0" ]
`);
    assert.deepEqual(
      other.match(new Set(['unix:uid:0', 'unix:gid:0'])).map((e) => `${e.spiffeId.path}#${e.hint ?? ''}`),
      ['/w#a', '/w#b', '/x#', '/y#'],
    );
  });

  it('never matches an entry without selectors', () => {
    const bare = makeEntry({
      spiffeId: SpiffeId.parse('spiffe://spoke.example.org/bare'),
      selectors: [],
      dnsNames: [],
      federatesWith: [],
      line: 1,
    });
    assert.deepEqual(new EntrySet([bare]).match(new Set(['unix:uid:0'])), []);
  });

  it('EntrySet.empty has no entries and matches nothing', () => {
    assert.deepEqual(EntrySet.empty.entries, []);
    assert.deepEqual(EntrySet.empty.match(new Set(['unix:uid:0'])), []);
    assert.deepEqual(EntrySet.empty.federatedTrustDomains(), []);
  });

  it('federatedTrustDomains is the sorted union over all entries', () => {
    const fed = parse(`entries:
  - spiffeId: spiffe://spoke.example.org/a
    selectors: [ "unix:uid:0" ]
    federatesWith: [ zeta.org, hub.example.org ]
  - spiffeId: spiffe://spoke.example.org/b
    selectors: [ "unix:uid:1" ]
    federatesWith: [ hub.example.org, alpha.org ]
`);
    assert.deepEqual(
      fed.federatedTrustDomains().map((td) => td.name),
      ['alpha.org', 'hub.example.org', 'zeta.org'],
    );
  });
});

describe('RegistrationEntry.key', () => {
  const base = [
    'spiffeId: spiffe://spoke.example.org/w',
    'selectors: [ "unix:uid:0", "k8s:ns:a" ]',
    'x509SvidTtl: 1h',
    'jwtSvidTtl: 5m',
    'dnsNames: [ a.example.org, b.example.org ]',
    'federatesWith: [ hub.example.org, alpha.org ]',
    'hint: internal',
  ];
  const keyOf = (text: string): string => (parse(text).entries[0] as RegistrationEntry).key;
  const baseKey = keyOf(oneEntry(...base));

  it('is stable: same content, other lines, other order of keys, selectors and trust domains', () => {
    assert.equal(keyOf(oneEntry(...base)), baseKey);
    const moved = `# a comment\n\n${oneEntry(...[...base].reverse())}`;
    assert.equal(keyOf(moved), baseKey);
    assert.notEqual(parse(moved).entries[0]?.line, parse(oneEntry(...base)).entries[0]?.line);
    const reordered = base.map((l) =>
      l.startsWith('selectors')
        ? 'selectors: [ "k8s:ns:a", unix:uid:0 ]'
        : l.startsWith('federatesWith')
          ? 'federatesWith: [ spiffe://alpha.org, hub.example.org ]'
          : l,
    );
    assert.equal(keyOf(oneEntry(...reordered)), baseKey);
    assert.equal(keyOf(oneEntry(...base.map((l) => l.replace('1h', '60m')))), baseKey, 'same seconds');
  });

  it('changes when any field changes', () => {
    const edits: [string, string][] = [
      ['spiffeId', 'spiffeId: spiffe://spoke.example.org/v'],
      ['selectors', 'selectors: [ "unix:uid:0", "k8s:ns:b" ]'],
      ['selectors', 'selectors: [ "unix:uid:0" ]'],
      ['x509SvidTtl', 'x509SvidTtl: 2h'],
      ['x509SvidTtl', null as unknown as string],
      ['jwtSvidTtl', 'jwtSvidTtl: 6m'],
      ['jwtSvidTtl', null as unknown as string],
      ['dnsNames', 'dnsNames: [ b.example.org, a.example.org ]'],
      ['dnsNames', 'dnsNames: [ a.example.org ]'],
      ['federatesWith', 'federatesWith: [ hub.example.org ]'],
      ['hint', 'hint: external'],
      ['hint', null as unknown as string],
    ];
    const keys = new Set([baseKey]);
    for (const [field, replacement] of edits) {
      const lines = base.flatMap((l) =>
        l.startsWith(`${field}:`) ? (replacement === null ? [] : [replacement]) : [l],
      );
      const key = keyOf(oneEntry(...lines));
      assert.ok(!keys.has(key), `editing ${field} to ${replacement} must give a new key`);
      keys.add(key);
    }
  });

  it('does not confuse a 60s TTL on one field with the other', () => {
    const a = oneEntry(base[0] as string, base[1] as string, 'x509SvidTtl: 60');
    const b = oneEntry(base[0] as string, base[1] as string, 'jwtSvidTtl: 60');
    assert.notEqual(keyOf(a), keyOf(b));
  });
});

describe('parseEntries: never throws anything but AgentError', () => {
  function check(text: string): void {
    try {
      parse(text);
    } catch (err) {
      assert.ok(err instanceof EntriesError, `threw ${String(err)}`);
      assert.equal(err.code, AgentErrorCode.Entries);
      assert.ok(err.problems.length > 0);
      for (const p of err.problems) {
        assert.ok(Number.isInteger(p.line) && p.line >= 1, `line ${p.line}`);
        assert.ok(Number.isInteger(p.column) && p.column >= 1, `column ${p.column}`);
        assert.notEqual(p.message, '');
      }
    }
  }

  it('on arbitrary strings', () => {
    fc.assert(fc.property(fc.string({ unit: 'binary', maxLength: 200 }), check), { numRuns: 300 });
  });

  it('on strings made of YAML punctuation', () => {
    const yamlish = fc.string({
      unit: fc.constantFrom(
        ...':-[]{}&*!|>?#,"\' \t\n\nabce01'.split(''),
        'entries',
        'spiffeId',
        'selectors',
      ),
      maxLength: 120,
    });
    fc.assert(fc.property(yamlish, check), { numRuns: 500 });
  });

  it('on arbitrary JSON-ish values dumped to YAML, alone and under "entries"', () => {
    const value = fc.jsonValue({ maxDepth: 4 });
    const entry = fc.record(
      {
        spiffeId: fc.oneof(
          value,
          fc.constantFrom('spiffe://spoke.example.org/w', 'spiffe://spoke.example.org'),
        ),
        selectors: fc.oneof(
          value,
          fc.array(fc.constantFrom('unix:uid:0', 'k8s:ns:a', 'x:y', ''), { maxLength: 3 }),
        ),
        x509SvidTtl: fc.oneof(value, fc.constantFrom('1h', '0s', '500ms', 'x')),
        jwtSvidTtl: value,
        dnsNames: fc.oneof(value, fc.array(fc.domain(), { maxLength: 3 })),
        federatesWith: fc.oneof(value, fc.array(fc.domain(), { maxLength: 3 })),
        hint: value,
        extra: value,
      },
      { requiredKeys: [] },
    );
    fc.assert(
      fc.property(
        fc.oneof(value, fc.record({ entries: fc.oneof(value, fc.array(entry, { maxLength: 4 })) })),
        (v) => check(stringify(v)),
      ),
      { numRuns: 500 },
    );
  });
});

// ---------------------------------------------------------------------------------------------------------

function entriesYaml(...paths: string[]): string {
  return `entries:\n${paths
    .map((p, i) => `  - spiffeId: spiffe://spoke.example.org/${p}\n    selectors: [ "unix:uid:${i}" ]\n`)
    .join('')}`;
}

/** Writes `text` to `file` by renaming a finished file over it, as editors and kubelet do. */
async function writeAtomically(file: string, text: string): Promise<void> {
  const temporary = `${file}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  await writeFile(temporary, text);
  await rename(temporary, file);
}

type WatchEvent = { kind: 'change'; set: EntrySet; previous: EntrySet } | { kind: 'error'; err: AgentError };

/** The callbacks of a watcher as a queue: `next()` resolves with the next call, or rejects after `ms`. */
class Events {
  readonly #queue: WatchEvent[] = [];
  readonly #waiters: ((e: WatchEvent) => void)[] = [];

  readonly onChange = (set: EntrySet, previous: EntrySet): void =>
    this.#push({ kind: 'change', set, previous });
  readonly onError = (err: AgentError): void => this.#push({ kind: 'error', err });

  #push(event: WatchEvent): void {
    const waiter = this.#waiters.shift();
    if (waiter) waiter(event);
    else this.#queue.push(event);
  }

  next(ms = 15_000): Promise<WatchEvent> {
    const queued = this.#queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolvePromise, reject) => {
      const timer = setTimeout(() => {
        const i = this.#waiters.indexOf(waiter);
        if (i >= 0) this.#waiters.splice(i, 1);
        reject(new Error(`no watcher event within ${ms} ms`));
      }, ms);
      const waiter = (e: WatchEvent): void => {
        clearTimeout(timer);
        resolvePromise(e);
      };
      this.#waiters.push(waiter);
    });
  }

  async nextChange(): Promise<{ set: EntrySet; previous: EntrySet }> {
    const e = await this.next();
    assert.equal(e.kind, 'change', e.kind === 'error' ? e.err.message : '');
    return e as { set: EntrySet; previous: EntrySet };
  }

  async nextError(): Promise<AgentError> {
    const e = await this.next();
    assert.equal(e.kind, 'error', 'expected onError, got onChange');
    return (e as { err: AgentError }).err;
  }
}

const paths = (set: EntrySet): string[] => set.entries.map((e) => e.spiffeId.path);

describe('loadEntriesFile', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'entries-load-'));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reads and parses a file, naming the file in problems', async () => {
    const file = join(dir, 'ok.yaml');
    await writeFile(file, entriesYaml('a', 'b'));
    assert.deepEqual(paths(await loadEntriesFile(file, { trustDomain: spoke })), ['/a', '/b']);

    const bad = join(dir, 'bad.yaml');
    await writeFile(bad, 'entries: 1\n');
    await assert.rejects(loadEntriesFile(bad, { trustDomain: spoke }), (err: unknown) => {
      assert.ok(err instanceof EntriesError);
      assert.equal(err.message, `${bad}:1:10: "entries" must be a list, got a number (1)`);
      return true;
    });
  });

  it('refuses a missing file with ERR_AGENT_ENTRIES', async () => {
    await assert.rejects(
      loadEntriesFile(join(dir, 'absent.yaml'), { trustDomain: spoke }),
      (err: unknown) => {
        assert.ok(isAgentError(err, AgentErrorCode.Entries));
        assert.match(err.message, /absent\.yaml: cannot read/);
        return true;
      },
    );
  });
});

describe('watchEntries', () => {
  let dir: string;
  const watchers: EntriesWatcher[] = [];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'entries-watch-'));
  });
  after(async () => {
    for (const w of watchers) w.close();
    await rm(dir, { recursive: true, force: true });
  });

  async function start(
    name: string,
    text: string,
    pollIntervalMs?: number,
  ): Promise<{ file: string; w: EntriesWatcher; events: Events }> {
    const sub = await mkdtemp(join(dir, `${name}-`));
    const file = join(sub, 'entries.yaml');
    await writeFile(file, text);
    const events = new Events();
    const w = await watchEntries(file, {
      trustDomain: spoke,
      debounceMs: 20,
      ...(pollIntervalMs !== undefined && { pollIntervalMs }),
      onChange: events.onChange,
      onError: events.onError,
    });
    watchers.push(w);
    return { file, w, events };
  }

  it('refuses to start on an invalid or missing file', async () => {
    const file = join(dir, 'invalid.yaml');
    await writeFile(file, 'entries: [ 1 ]\n');
    await assert.rejects(watchEntries(file, { trustDomain: spoke }), EntriesError);
    await assert.rejects(watchEntries(join(dir, 'missing.yaml'), { trustDomain: spoke }), (err: unknown) =>
      isAgentError(err, AgentErrorCode.Entries),
    );
  });

  it('picks up an edit that adds an entry (by fs.watch, with polling effectively off)', async () => {
    const { file, w, events } = await start('edit', entriesYaml('a'), 3_600_000);
    assert.deepEqual(paths(w.current), ['/a']);
    assert.equal(w.generation, 0);
    const initial = w.current;

    await writeAtomically(file, entriesYaml('a', 'b'));
    const { set, previous } = await events.nextChange();
    assert.deepEqual(paths(set), ['/a', '/b']);
    assert.equal(previous, initial);
    assert.equal(w.current, set);
    assert.equal(w.generation, 1);
    w.close();
  });

  it('ignores a rewrite with the same content', async () => {
    const { file, w, events } = await start('same', entriesYaml('a'));
    await writeAtomically(file, entriesYaml('a'));
    await writeAtomically(file, entriesYaml('a'));
    await writeAtomically(file, entriesYaml('c'));
    const { set } = await events.nextChange();
    assert.deepEqual(paths(set), ['/c']);
    assert.equal(w.generation, 1, 'the identical rewrites changed nothing');
    w.close();
  });

  it('keeps the last good set on a broken edit, reports it with line and column, and recovers on a fix', async () => {
    const { file, w, events } = await start('broken', entriesYaml('a'));
    const good = w.current;

    await writeAtomically(
      file,
      `${entriesYaml('a')}  - spiffeId: spiffe://hub.example.org/b\n    selectors: [ x ]\n`,
    );
    const err = await events.nextError();
    assert.ok(err instanceof EntriesError);
    assert.equal(err.code, AgentErrorCode.Entries);
    assert.deepEqual(
      err.problems.map((p) => [p.line, p.column]),
      [
        [4, 15],
        [5, 18],
      ],
    );
    assert.ok(err.message.startsWith(`${file}:4:15: `), err.message);
    assert.equal(w.current, good, 'the last good set stays');
    assert.equal(w.generation, 0);

    await writeAtomically(file, entriesYaml('a', 'b'));
    const { set, previous } = await events.nextChange();
    assert.equal(previous, good);
    assert.deepEqual(paths(set), ['/a', '/b']);
    assert.equal(w.current, set);
    assert.equal(w.generation, 1);
    w.close();
  });

  it('follows a ConfigMap-style swap of the ..data symlink', async () => {
    const mount = await mkdtemp(join(dir, 'configmap-'));
    await mkdir(join(mount, '..2026_01_01_00_00_00.1'));
    await writeFile(join(mount, '..2026_01_01_00_00_00.1', 'entries.yaml'), entriesYaml('a'));
    await symlink('..2026_01_01_00_00_00.1', join(mount, '..data'));
    await symlink('..data/entries.yaml', join(mount, 'entries.yaml'));

    const events = new Events();
    const w = await watchEntries(join(mount, 'entries.yaml'), {
      trustDomain: spoke,
      debounceMs: 20,
      pollIntervalMs: 3_600_000,
      onChange: events.onChange,
      onError: events.onError,
    });
    watchers.push(w);
    assert.deepEqual(paths(w.current), ['/a']);

    // What kubelet does: write a new timestamped directory, point a new symlink at it, rename it over ..data.
    await mkdir(join(mount, '..2026_01_01_00_01_00.2'));
    await writeFile(join(mount, '..2026_01_01_00_01_00.2', 'entries.yaml'), entriesYaml('a', 'b'));
    await symlink('..2026_01_01_00_01_00.2', join(mount, '..data_tmp'));
    await rename(join(mount, '..data_tmp'), join(mount, '..data'));
    await rm(join(mount, '..2026_01_01_00_00_00.1'), { recursive: true });

    const { set } = await events.nextChange();
    assert.deepEqual(paths(set), ['/a', '/b']);
    assert.equal(w.current, set);
    assert.equal(w.generation, 1);
    w.close();
  });

  it('close() is idempotent and the watcher keeps its last set', async () => {
    const { w } = await start('close', entriesYaml('a'));
    w.close();
    w.close();
    assert.deepEqual(paths(w.current), ['/a']);
  });
});
