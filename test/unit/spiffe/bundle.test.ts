import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject, type X509Certificate } from 'node:crypto';
import { before, describe, it } from 'node:test';
import fc from 'fast-check';
import { bundleJson, type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import {
  BundleErrorCode,
  BundleSet,
  JwtBundle,
  parseCertificates,
  SpiffeBundle,
  SpiffeError,
  type SpiffeErrorCode,
  TrustDomain,
  X509Bundle,
} from '../../../src/spiffe/index.ts';

const hub = TrustDomain.parse('hub.example.org');
const spoke = TrustDomain.parse('spoke.example.org');

function assertCode(fn: () => unknown, code: SpiffeErrorCode): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SpiffeError, `expected SpiffeError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    return true;
  });
}

const ecKey = (): KeyObject => generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey;
const rsaKey = (): KeyObject => generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey;

let pki: DevPki;
let hubRoot: X509Certificate;
let spokeRoot: X509Certificate;
before(async () => {
  pki = await makeDevPki();
  hubRoot = parseCertificates(pki.hub.rootPem)[0] as X509Certificate;
  spokeRoot = parseCertificates(pki.spoke.rootPem)[0] as X509Certificate;
});

describe('SpiffeBundle JSON codec', () => {
  it('reads the bundle the dev PKI publishes', () => {
    const bundle = SpiffeBundle.parse(hub, bundleJson(pki.hub, { sequence: 7, refreshHint: 300 }));
    assert.equal(bundle.x509Authorities.length, 1);
    assert.ok(bundle.x509Bundle.hasAuthority(hubRoot));
    assert.equal(bundle.sequence, 7n);
    assert.equal(bundle.refreshHint, 300);
    assert.equal(bundle.jwtAuthorities.size, 0);
  });

  it('round-trips X.509 and JWT authorities, sequence and refresh hint byte for byte', () => {
    const original = new SpiffeBundle(hub, {
      x509Authorities: [hubRoot],
      jwtAuthorities: [
        { kid: 'ec-1', publicKey: ecKey() },
        { kid: 'rsa-1', publicKey: rsaKey() },
      ],
      sequence: 2n ** 63n - 1n,
      refreshHint: 60,
    });
    const json = original.marshal();
    const again = SpiffeBundle.parse(hub, json);
    assert.equal(again.marshal(), json);
    assert.ok(again.equals(original));
    assert.equal(again.sequence, 2n ** 63n - 1n, 'the sequence keeps all 64 bits');
    const doc = JSON.parse(json) as { keys: Record<string, unknown>[] };
    assert.deepEqual(
      doc.keys.map((k) => [k.use, k.kid, k.kty]),
      [
        ['x509-svid', undefined, 'EC'],
        ['jwt-svid', 'ec-1', 'EC'],
        ['jwt-svid', 'rsa-1', 'RSA'],
      ],
    );
    assert.equal(
      (doc.keys[0]?.x5c as string[] | undefined)?.length,
      1,
      'an x509-svid entry carries exactly one certificate',
    );
  });

  it('omits sequence and refresh hint when unset', () => {
    const json = new SpiffeBundle(hub, { x509Authorities: [hubRoot] }).marshal();
    assert.ok(!json.includes('spiffe_sequence'));
    assert.ok(!json.includes('spiffe_refresh_hint'));
  });

  it('ignores keys of unknown use or kty, and x509-svid keys without x5c, and says why', () => {
    const jwk = ecKey().export({ format: 'jwk' });
    const json = JSON.stringify({
      keys: [
        { use: 'x509-svid', kty: 'EC', x5c: [hubRoot.raw.toString('base64')] },
        { use: 'sig', kty: 'EC', kid: 'a', ...jwk },
        { kty: 'EC', kid: 'b', ...jwk },
        { use: 'jwt-svid', kty: 'oct', kid: 'c', k: 'c2VjcmV0' },
        { use: 'jwt-svid', kty: 'OKP', kid: 'd', crv: 'Ed25519', x: 'AAAA' },
        { use: 'x509-svid', kty: 'EC' },
        { use: 'x509-svid', kty: 'EC', x5c: [] },
        { use: 'wit-svid', kty: 'EC', kid: 'e', ...jwk },
      ],
    });
    const ignored: number[] = [];
    const bundle = SpiffeBundle.parse(hub, json, { onIgnoredKey: (i) => ignored.push(i) });
    assert.equal(bundle.x509Authorities.length, 1);
    assert.equal(bundle.jwtAuthorities.size, 0);
    assert.deepEqual(ignored, [1, 2, 3, 4, 5, 6, 7]);
  });

  it('uses only the first certificate of an x5c holding several', () => {
    const json = JSON.stringify({
      keys: [
        {
          use: 'x509-svid',
          kty: 'EC',
          x5c: [hubRoot.raw.toString('base64'), spokeRoot.raw.toString('base64')],
        },
      ],
    });
    const reasons: string[] = [];
    const bundle = SpiffeBundle.parse(hub, json, { onIgnoredKey: (_, why) => reasons.push(why) });
    assert.equal(bundle.x509Authorities.length, 1);
    assert.ok(bundle.x509Bundle.hasAuthority(hubRoot));
    assert.ok(!bundle.x509Bundle.hasAuthority(spokeRoot));
    assert.match(reasons[0] ?? '', /all but the first/);
  });

  it('treats an empty key list as a bundle that trusts nothing', () => {
    const bundle = SpiffeBundle.parse(hub, '{"keys":[]}');
    assert.equal(bundle.x509Authorities.length, 0);
    assert.equal(bundle.jwtAuthorities.size, 0);
  });

  const jwk = () => ecKey().export({ format: 'jwk' });
  const malformed: [string, () => string, SpiffeErrorCode][] = [
    ['text that is not JSON', () => '{"keys": [', BundleErrorCode.Json],
    ['a JSON array', () => '[]', BundleErrorCode.Json],
    ['no keys member', () => '{"spiffe_sequence": 1}', BundleErrorCode.KeysMissing],
    ['keys that is not an array', () => '{"keys": {}}', BundleErrorCode.KeysMissing],
    ['a key that is not an object', () => '{"keys": [1]}', BundleErrorCode.Json],
    ['a negative sequence', () => '{"keys": [], "spiffe_sequence": -1}', BundleErrorCode.Sequence],
    ['a fractional sequence', () => '{"keys": [], "spiffe_sequence": 1.5}', BundleErrorCode.Sequence],
    ['a string sequence', () => '{"keys": [], "spiffe_sequence": "1"}', BundleErrorCode.Sequence],
    ['a negative refresh hint', () => '{"keys": [], "spiffe_refresh_hint": -5}', BundleErrorCode.RefreshHint],
    [
      'a fractional refresh hint',
      () => '{"keys": [], "spiffe_refresh_hint": 0.5}',
      BundleErrorCode.RefreshHint,
    ],
    [
      'an x5c that is not base64 DER',
      () => JSON.stringify({ keys: [{ use: 'x509-svid', kty: 'EC', x5c: ['bm90IGEgY2VydA=='] }] }),
      BundleErrorCode.Certificate,
    ],
    [
      'an x5c that is not an array of strings',
      () => JSON.stringify({ keys: [{ use: 'x509-svid', kty: 'EC', x5c: 'abc' }] }),
      BundleErrorCode.Certificate,
    ],
    [
      'a jwt-svid key without kid',
      () => JSON.stringify({ keys: [{ use: 'jwt-svid', ...jwk() }] }),
      BundleErrorCode.KidMissing,
    ],
    [
      'two jwt-svid keys with one kid',
      () =>
        JSON.stringify({
          keys: [
            { use: 'jwt-svid', kid: 'k', ...jwk() },
            { use: 'jwt-svid', kid: 'k', ...jwk() },
          ],
        }),
      BundleErrorCode.KidDuplicate,
    ],
    [
      'a jwt-svid key with broken parameters',
      () =>
        JSON.stringify({ keys: [{ use: 'jwt-svid', kid: 'k', kty: 'EC', crv: 'P-256', x: 'AA', y: 'AA' }] }),
      BundleErrorCode.JwtKey,
    ],
    [
      'a jwt-svid key that carries its private half',
      () =>
        JSON.stringify({
          keys: [
            {
              use: 'jwt-svid',
              kid: 'k',
              ...generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' }),
            },
          ],
        }),
      BundleErrorCode.JwtKey,
    ],
  ];
  for (const [what, make, code] of malformed) {
    it(`rejects ${what} with ${code}`, () => assertCode(() => SpiffeBundle.parse(hub, make()), code));
  }

  it('never echoes private key material in its error', () => {
    const priv = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
    const json = JSON.stringify({ keys: [{ use: 'jwt-svid', kid: 'k', ...priv }] });
    assert.throws(
      () => SpiffeBundle.parse(hub, json),
      (e: unknown) => e instanceof SpiffeError && !e.message.includes(priv.d as string),
    );
  });

  it('never throws anything but a SpiffeError on arbitrary JSON', () => {
    fc.assert(
      fc.property(fc.oneof(fc.json(), fc.string()), (text) => {
        try {
          SpiffeBundle.parse(hub, text);
        } catch (e) {
          assert.ok(e instanceof SpiffeError, `unexpected ${String(e)}`);
        }
      }),
      { numRuns: 500 },
    );
  });
});

describe('X509Bundle and JwtBundle', () => {
  it('reads PEM with several certificates and removes duplicates', () => {
    const bundle = X509Bundle.parse(hub, pki.hub.rootPem + pki.spoke.rootPem + pki.hub.rootPem);
    assert.equal(bundle.authorities.length, 2);
    assert.equal(X509Bundle.parse(hub, bundle.toPem()).authorities.length, 2);
  });

  it('refuses a PEM file that holds something other than certificates', () => {
    assertCode(
      () => X509Bundle.parse(hub, pki.hub.rootPem + pki.hub.rootKeyPem),
      BundleErrorCode.Certificate,
    );
    assertCode(() => X509Bundle.parse(hub, 'no pem here'), BundleErrorCode.Certificate);
  });

  it('answers only for its own trust domain', () => {
    const x = new X509Bundle(hub, [hubRoot]);
    assert.equal(x.getX509Bundle(hub), x);
    assert.equal(x.getX509Bundle(spoke), undefined);
    const j = new JwtBundle(hub, [{ kid: 'a', publicKey: ecKey() }]);
    assert.equal(j.getJwtBundle(hub), j);
    assert.equal(j.getJwtBundle(spoke), undefined);
    assert.ok(j.findAuthority('a'));
    assert.equal(j.findAuthority('b'), undefined);
  });

  it('refuses a private key as a JWT authority', () => {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    assertCode(() => new JwtBundle(hub, [{ kid: 'a', publicKey: privateKey }]), BundleErrorCode.JwtKey);
  });
});

describe('JwtBundle.parse: a standard JWK Set, as the Workload API delivers JWT bundles', () => {
  const jwkOf = (key: KeyObject) => key.export({ format: 'jwk' });
  const okp = () => jwkOf(generateKeyPairSync('ed25519').publicKey);
  const k1 = () => jwkOf(generateKeyPairSync('ec', { namedCurve: 'secp256k1' }).publicKey);

  it('reads keys without "use" and with "use": "jwt-svid"; ignores, and reports, every key it cannot use', () => {
    const reasons: string[] = [];
    const bundle = JwtBundle.parse(
      hub,
      JSON.stringify({
        keys: [
          { kid: 'plain', ...jwkOf(ecKey()) },
          { kid: 'svid', use: 'jwt-svid', ...jwkOf(rsaKey()) },
          { kid: 'x509', use: 'x509-svid', ...jwkOf(ecKey()), x5c: [hubRoot.raw.toString('base64')] },
          { kid: 'sig', use: 'sig', ...jwkOf(ecKey()) },
          { kid: 'okp', ...okp() },
          { kid: 'k1', ...k1() },
          { kid: 'none' },
          { kid: 'future', kty: 'ML-DSA', pub: 'AAAA' },
        ],
      }),
      { onIgnoredKey: (i, why) => reasons.push(`${i}: ${why}`) },
    );
    assert.deepEqual([...bundle.authorities.keys()], ['plain', 'svid']);
    assert.deepEqual(reasons, [
      '2: "use" is "x509-svid", not "jwt-svid"',
      '3: "use" is "sig", not "jwt-svid"',
      '4: key type "OKP" cannot verify a JWT-SVID',
      '5: curve "secp256k1" cannot verify a JWT-SVID (ES256, ES384 and ES512 use P-256, P-384, P-521)',
      '6: missing "kty"',
      '7: key type "ML-DSA" cannot verify a JWT-SVID',
    ]);
  });

  it('agrees with SpiffeBundle.parse on jwt-svid keys: the same authorities, the same keys ignored', () => {
    const keys = [
      { kid: 'a', ...jwkOf(ecKey()) },
      { kid: 'b', ...okp() },
      { kid: 'c', ...k1() },
      { kid: 'd', ...jwkOf(rsaKey()) },
      { kid: 'e', kty: 'oct', k: 'c2VjcmV0' },
    ];
    const viaWorkloadApi: number[] = [];
    const viaBundle: number[] = [];
    const standard = JwtBundle.parse(hub, JSON.stringify({ keys }), {
      onIgnoredKey: (i) => viaWorkloadApi.push(i),
    });
    const spiffe = SpiffeBundle.parse(
      hub,
      JSON.stringify({ keys: keys.map((k) => ({ use: 'jwt-svid', ...k })) }),
      {
        onIgnoredKey: (i) => viaBundle.push(i),
      },
    );
    assert.deepEqual([...standard.authorities.keys()], [...spiffe.jwtAuthorities.keys()]);
    assert.deepEqual(viaWorkloadApi, viaBundle);
    assert.deepEqual(viaWorkloadApi, [1, 2, 4]);
  });

  const malformed: [string, () => string, SpiffeErrorCode][] = [
    ['text that is not JSON', () => '{"keys": [', BundleErrorCode.Json],
    ['no keys member', () => '{}', BundleErrorCode.KeysMissing],
    ['a key that is not an object', () => '{"keys": ["k"]}', BundleErrorCode.Json],
    [
      'a usable key without kid',
      () => JSON.stringify({ keys: [jwkOf(ecKey())] }),
      BundleErrorCode.KidMissing,
    ],
    [
      'a usable key with broken parameters',
      () => JSON.stringify({ keys: [{ kid: 'k', kty: 'EC', crv: 'P-256', x: 'AA', y: 'AA' }] }),
      BundleErrorCode.JwtKey,
    ],
    [
      'a key that carries its private half',
      () =>
        JSON.stringify({
          keys: [
            {
              kid: 'k',
              ...generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' }),
            },
          ],
        }),
      BundleErrorCode.JwtKey,
    ],
  ];
  for (const [what, make, code] of malformed) {
    it(`rejects ${what} with ${code}`, () => assertCode(() => JwtBundle.parse(hub, make()), code));
  }
});

describe('BundleSet', () => {
  it('keys bundles by trust domain and never merges two of them', () => {
    const set = new BundleSet([
      new SpiffeBundle(hub, { x509Authorities: [hubRoot] }),
      new SpiffeBundle(spoke, { x509Authorities: [spokeRoot] }),
    ]);
    assert.equal(set.size, 2);
    assert.ok(set.getX509Bundle(hub)?.hasAuthority(hubRoot));
    assert.ok(!set.getX509Bundle(hub)?.hasAuthority(spokeRoot));
    assert.deepEqual(
      set.trustDomains().map((t) => t.name),
      ['hub.example.org', 'spoke.example.org'],
    );
    assert.equal(set.allX509Authorities().length, 2);
    assertCode(
      () => new BundleSet([new SpiffeBundle(hub), new SpiffeBundle(hub, { x509Authorities: [spokeRoot] })]),
      BundleErrorCode.DuplicateTrustDomain,
    );
  });

  it('is immutable: with and without return new sets', () => {
    const empty = new BundleSet();
    const one = empty.with(new SpiffeBundle(hub, { x509Authorities: [hubRoot] }));
    const replaced = one.with(new SpiffeBundle(hub, { x509Authorities: [spokeRoot] }));
    assert.equal(empty.size, 0);
    assert.ok(one.getX509Bundle(hub)?.hasAuthority(hubRoot));
    assert.ok(replaced.getX509Bundle(hub)?.hasAuthority(spokeRoot));
    assert.ok(!replaced.getX509Bundle(hub)?.hasAuthority(hubRoot));
    assert.equal(replaced.without(hub).size, 0);
    assert.equal(replaced.size, 1);
  });
});
