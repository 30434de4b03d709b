import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import {
  IdErrorCode,
  MAX_ID_BYTES,
  SpiffeError,
  type SpiffeErrorCode,
  SpiffeId,
  TrustDomain,
  validatePath,
} from '../../../src/spiffe/index.ts';

function assertCode(fn: () => unknown, code: SpiffeErrorCode): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SpiffeError, `expected SpiffeError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    return true;
  });
}

describe('SpiffeId.parse', () => {
  it('accepts IDs that follow every rule and keeps them unchanged', () => {
    for (const text of [
      'spiffe://example.org',
      'spiffe://example.org/workload',
      'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller',
      'spiffe://a_b-c.d0/UPPER/lower/0.9/x..y/.hidden/..dots',
      'spiffe://192.168.0.1/ip-looking-trust-domain',
    ]) {
      const id = SpiffeId.parse(text);
      assert.equal(id.toString(), text);
      assert.equal(JSON.stringify(id), JSON.stringify(text));
    }
  });

  it('splits trust domain, path and segments', () => {
    const id = SpiffeId.parse('spiffe://example.org/ns/default/sa/web');
    assert.equal(id.trustDomain.name, 'example.org');
    assert.equal(id.path, '/ns/default/sa/web');
    assert.deepEqual(id.segments, ['ns', 'default', 'sa', 'web']);
    assert.equal(id.isRoot, false);
    assert.equal(SpiffeId.parse('spiffe://example.org').isRoot, true);
    assert.deepEqual(SpiffeId.parse('spiffe://example.org').segments, []);
  });

  const rejections: [string, string, SpiffeErrorCode][] = [
    ['empty', '', IdErrorCode.Empty],
    ['too long', `spiffe://example.org/${'a'.repeat(MAX_ID_BYTES)}`, IdErrorCode.TooLong],
    ['wrong scheme', 'https://example.org/workload', IdErrorCode.WrongScheme],
    ['uppercase scheme', 'SPIFFE://example.org/workload', IdErrorCode.WrongScheme],
    ['no scheme', 'example.org/workload', IdErrorCode.WrongScheme],
    ['missing trust domain', 'spiffe:///workload', IdErrorCode.MissingTrustDomain],
    ['bare scheme', 'spiffe://', IdErrorCode.MissingTrustDomain],
    ['uppercase trust domain', 'spiffe://Example.org/workload', IdErrorCode.TrustDomainUppercase],
    ['bad trust domain char', 'spiffe://exa+mple.org/workload', IdErrorCode.TrustDomainChar],
    ['ipv6 trust domain', 'spiffe://[::1]/workload', IdErrorCode.TrustDomainChar],
    ['trust domain too long', `spiffe://${'a'.repeat(256)}/workload`, IdErrorCode.TrustDomainTooLong],
    ['port', 'spiffe://example.org:443/workload', IdErrorCode.Port],
    ['userinfo', 'spiffe://user@example.org/workload', IdErrorCode.Userinfo],
    ['query', 'spiffe://example.org/workload?x=1', IdErrorCode.Query],
    ['query after trust domain', 'spiffe://example.org?x=1', IdErrorCode.Query],
    ['fragment', 'spiffe://example.org/workload#frag', IdErrorCode.Fragment],
    ['fragment after trust domain', 'spiffe://example.org#frag', IdErrorCode.Fragment],
    ['percent-encoded path', 'spiffe://example.org/work%20load', IdErrorCode.PercentEncoded],
    ['percent-encoded trust domain', 'spiffe://exa%6Dple.org/workload', IdErrorCode.PercentEncoded],
    ['empty segment', 'spiffe://example.org/ns//sa', IdErrorCode.EmptySegment],
    ['dot segment', 'spiffe://example.org/ns/./sa', IdErrorCode.DotSegment],
    ['dot-dot segment', 'spiffe://example.org/ns/../sa', IdErrorCode.DotSegment],
    ['final dot segment', 'spiffe://example.org/ns/..', IdErrorCode.DotSegment],
    ['trailing slash', 'spiffe://example.org/workload/', IdErrorCode.TrailingSlash],
    ['root with trailing slash', 'spiffe://example.org/', IdErrorCode.TrailingSlash],
    ['bad path char', 'spiffe://example.org/work*load', IdErrorCode.PathSegmentChar],
    ['non-ASCII path', 'spiffe://example.org/wörk', IdErrorCode.PathSegmentChar],
  ];
  for (const [what, input, code] of rejections) {
    it(`rejects ${what} with ${code}`, () => assertCode(() => SpiffeId.parse(input), code));
  }

  it('accepts an ID of exactly 2048 bytes and a trust domain of exactly 255 bytes', () => {
    const prefix = 'spiffe://example.org/';
    assert.equal(
      SpiffeId.parse(prefix + 'a'.repeat(MAX_ID_BYTES - prefix.length)).toString().length,
      MAX_ID_BYTES,
    );
    assert.equal(TrustDomain.parse('a'.repeat(255)).name.length, 255);
  });

  it('gives every rule its own code', () => {
    const codes = rejections.map(([, , code]) => code);
    assert.deepEqual(
      new Set(codes),
      new Set(Object.values(IdErrorCode).filter((c) => c !== IdErrorCode.PathNoLeadingSlash)),
    );
  });

  it('quotes at most a bounded prefix of hostile input in messages', () => {
    const input = `spiffe://example.org/${'x'.repeat(3000)}`;
    assert.throws(
      () => SpiffeId.parse(input),
      (e: unknown) => e instanceof SpiffeError && e.message.length < 300,
    );
  });
});

describe('TrustDomain', () => {
  it('parses a bare name or the trust domain of a full ID', () => {
    assert.equal(TrustDomain.parse('example.org').name, 'example.org');
    assert.equal(TrustDomain.parse('spiffe://example.org/ns/x').name, 'example.org');
    assert.equal(TrustDomain.parse('example.org').idString, 'spiffe://example.org');
    assert.equal(TrustDomain.parse('example.org').id.toString(), 'spiffe://example.org');
  });

  it('refuses names that break the trust domain rules', () => {
    assertCode(() => TrustDomain.parse(''), IdErrorCode.MissingTrustDomain);
    assertCode(() => TrustDomain.parse('Example.org'), IdErrorCode.TrustDomainUppercase);
    assertCode(() => TrustDomain.parse('example.org:8443'), IdErrorCode.Port);
    assertCode(() => TrustDomain.parse('me@example.org'), IdErrorCode.Userinfo);
    assertCode(() => TrustDomain.parse('example.org/path'), IdErrorCode.TrustDomainChar);
    assertCode(() => TrustDomain.parse('a'.repeat(256)), IdErrorCode.TrustDomainTooLong);
  });

  it('compares by name', () => {
    const a = TrustDomain.parse('a.example');
    assert.ok(a.equals(TrustDomain.parse('a.example')));
    assert.ok(!a.equals(TrustDomain.parse('b.example')));
    assert.equal(a.compare(TrustDomain.parse('b.example')), -1);
    assert.equal(a.compare(TrustDomain.parse('a.example')), 0);
  });
});

describe('SpiffeId membership and construction', () => {
  const td = TrustDomain.parse('example.org');

  it('knows which trust domain it belongs to', () => {
    const id = SpiffeId.parse('spiffe://example.org/web');
    assert.ok(id.isMemberOf(td));
    assert.ok(!id.isMemberOf(TrustDomain.parse('example.com')));
    assert.ok(!SpiffeId.parse('spiffe://example.org.evil/web').isMemberOf(td));
  });

  it('builds IDs from segments and paths, validating them', () => {
    assert.equal(SpiffeId.fromSegments(td, 'ns', 'default').toString(), 'spiffe://example.org/ns/default');
    assert.equal(SpiffeId.fromPath(td, '/a/b').toString(), 'spiffe://example.org/a/b');
    assert.equal(SpiffeId.fromPath(td, '').toString(), 'spiffe://example.org');
    assertCode(() => SpiffeId.fromSegments(td, 'a/b'), IdErrorCode.PathSegmentChar);
    assertCode(() => SpiffeId.fromSegments(td, '..'), IdErrorCode.DotSegment);
    assertCode(() => SpiffeId.fromSegments(td, ''), IdErrorCode.EmptySegment);
    assertCode(() => SpiffeId.fromPath(td, 'no-slash'), IdErrorCode.PathNoLeadingSlash);
    assertCode(() => validatePath('/a/'), IdErrorCode.TrailingSlash);
    validatePath('/a/b');
  });

  it('compares and orders by text', () => {
    const a = SpiffeId.parse('spiffe://example.org/a');
    const b = SpiffeId.parse('spiffe://example.org/b');
    assert.ok(a.equals(SpiffeId.parse('spiffe://example.org/a')));
    assert.ok(!a.equals(b));
    assert.deepEqual(
      [b, a].sort((x, y) => x.compare(y)),
      [a, b],
    );
  });
});

// --- property tests ---------------------------------------------------------------------------------------

const tdChars = 'abcdefghijklmnopqrstuvwxyz0123456789.-_'.split('');
const segChars = [...tdChars, ...'ABCDEFGHIJKLMNOPQRSTUVWXYZ'.split('')];
const trustDomainArb = fc.string({ unit: fc.constantFrom(...tdChars), minLength: 1, maxLength: 40 });
const segmentArb = fc
  .string({ unit: fc.constantFrom(...segChars), minLength: 1, maxLength: 12 })
  .filter((s) => s !== '.' && s !== '..');
const idArb = fc
  .tuple(trustDomainArb, fc.array(segmentArb, { maxLength: 6 }))
  .map(([td, segs]) => ({ td, segs, text: `spiffe://${td}${segs.map((s) => `/${s}`).join('')}` }));

describe('SpiffeId properties', () => {
  it('parse and format round-trip for every valid ID', () => {
    fc.assert(
      fc.property(idArb, ({ td, segs, text }) => {
        const id = SpiffeId.parse(text);
        assert.equal(id.toString(), text);
        assert.equal(id.trustDomain.name, td);
        assert.deepEqual(id.segments, segs);
        assert.ok(SpiffeId.parse(id.toString()).equals(id));
        assert.ok(SpiffeId.fromSegments(TrustDomain.parse(td), ...segs).equals(id));
      }),
    );
  });

  // Each mutation breaks exactly one rule; the parser must name that rule.
  const mutations: [string, (text: string) => string, SpiffeErrorCode[]][] = [
    ['query', (t) => `${t}?q=1`, [IdErrorCode.Query]],
    ['fragment', (t) => `${t}#f`, [IdErrorCode.Fragment]],
    ['trailing slash', (t) => `${t}/`, [IdErrorCode.TrailingSlash]],
    ['empty segment', (t) => `${t}//x`, [IdErrorCode.EmptySegment]],
    ['dot segment', (t) => `${t}/./x`, [IdErrorCode.DotSegment]],
    ['dot-dot segment', (t) => `${t}/..`, [IdErrorCode.DotSegment]],
    ['percent-encoding', (t) => `${t}/a%2Fb`, [IdErrorCode.PercentEncoded]],
    ['port', (t) => t.replace(/^(spiffe:\/\/[^/]+)/, '$1:8443'), [IdErrorCode.Port]],
    ['userinfo', (t) => t.replace('spiffe://', 'spiffe://user@'), [IdErrorCode.Userinfo]],
    ['wrong scheme', (t) => t.replace('spiffe://', 'spiffy://'), [IdErrorCode.WrongScheme]],
    [
      'uppercase trust domain',
      (t) => t.replace('spiffe://', 'spiffe://X'),
      [IdErrorCode.TrustDomainUppercase],
    ],
    ['bad trust domain char', (t) => t.replace('spiffe://', 'spiffe://~'), [IdErrorCode.TrustDomainChar]],
    ['bad path char', (t) => `${t}/a b`, [IdErrorCode.PathSegmentChar]],
  ];

  it('rejects generated invalid IDs with the code of the rule they break', () => {
    fc.assert(
      fc.property(idArb, fc.constantFrom(...mutations), ({ text }, [, mutate, codes]) => {
        const bad = mutate(text);
        assert.throws(
          () => SpiffeId.parse(bad),
          (e: unknown) => e instanceof SpiffeError && codes.includes(e.code),
          `${bad} should fail with ${codes.join('|')}`,
        );
      }),
    );
  });

  it('never throws anything but a SpiffeError, and whatever it accepts is canonical', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string(),
          fc.string({ unit: 'grapheme' }).map((s) => `spiffe://${s}`),
        ),
        (text) => {
          let id: SpiffeId;
          try {
            id = SpiffeId.parse(text);
          } catch (e) {
            assert.ok(e instanceof SpiffeError, `unexpected ${String(e)}`);
            return;
          }
          assert.equal(id.toString(), text);
        },
      ),
      { numRuns: 2000 },
    );
  });
});
