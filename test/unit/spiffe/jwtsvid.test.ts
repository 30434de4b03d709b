import assert from 'node:assert/strict';
import { constants, createHmac, generateKeyPairSync, type KeyObject, sign } from 'node:crypto';
import { describe, it } from 'node:test';
import { decodeProtectedHeader } from 'jose';
import {
  BundleSet,
  JwtBundle,
  JwtErrorCode,
  type JwtSvidAlgorithm,
  MAX_JWT_LEEWAY_SECONDS,
  mintJwtSvid,
  parseJwtSvidInsecure,
  SpiffeBundle,
  SpiffeError,
  type SpiffeErrorCode,
  SpiffeId,
  TrustDomain,
  verifyJwtSvid,
} from '../../../src/spiffe/index.ts';

// ---------------------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------------------

const TD = TrustDomain.parse('example.org');
const ID = SpiffeId.parse('spiffe://example.org/ns/default/sa/web');
/** A fixed clock far from the real one: every verification passes `now`, so nothing depends on timing. */
const NOW = new Date('2031-03-04T05:06:07Z');
const NOW_S = Math.floor(NOW.getTime() / 1000);
const at = (secondsFromNow: number): Date => new Date((NOW_S + secondsFromNow) * 1000);

const p256 = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const p384 = generateKeyPairSync('ec', { namedCurve: 'P-384' });
const p521 = generateKeyPairSync('ec', { namedCurve: 'P-521' });
const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ed25519 = generateKeyPairSync('ed25519');

const KID = 'k1';
/** The JWT bundle of example.org: the P-256 key under `k1`. */
const BUNDLE = new JwtBundle(TD, [{ kid: KID, publicKey: p256.publicKey }]);

function hasCode(code: SpiffeErrorCode): (e: unknown) => boolean {
  return (e) => e instanceof SpiffeError && e.code === code;
}

async function rejectsWith(p: Promise<unknown>, code: SpiffeErrorCode): Promise<void> {
  await assert.rejects(p, hasCode(code));
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function b64url(value: unknown): string {
  return Buffer.from(JSON.stringify(value), 'utf8').toString('base64url');
}

/** JWS signature bytes for `alg` over `input`, computed with node:crypto (ECDSA in JOSE r||s form). */
function signature(alg: string, input: string, key: KeyObject | Buffer): Buffer {
  const data = Buffer.from(input, 'ascii');
  if (Buffer.isBuffer(key)) {
    assert.equal(alg, 'HS256');
    return createHmac('sha256', key).update(data).digest();
  }
  const hash = `sha${alg.slice(2)}`;
  switch (alg.slice(0, 2)) {
    case 'ES':
      return sign(hash, data, { key, dsaEncoding: 'ieee-p1363' });
    case 'RS':
      return sign(hash, data, key);
    case 'PS':
      return sign(hash, data, {
        key,
        padding: constants.RSA_PKCS1_PSS_PADDING,
        saltLength: Number(alg.slice(2)) / 8,
      });
    default:
      assert.equal(alg, 'EdDSA');
      return sign(null, data, key);
  }
}

const BASE_HEADER: Readonly<Record<string, unknown>> = { alg: 'ES256', kid: KID, typ: 'JWT' };

function basePayload(): Record<string, unknown> {
  return { sub: ID.toString(), aud: ['a'], exp: NOW_S + 300, iat: NOW_S };
}

function omit(obj: Readonly<Record<string, unknown>>, key: string): Record<string, unknown> {
  const copy = { ...obj };
  delete copy[key];
  return copy;
}

interface CraftOptions {
  readonly header?: Readonly<Record<string, unknown>>;
  readonly payload?: unknown;
  /** Signing key; defaults to the P-256 key whose public half is `k1` in `BUNDLE`. */
  readonly key?: KeyObject | Buffer;
  /** Algorithm used to compute the signature; defaults to the header's `alg`. */
  readonly signAs?: string;
}

/** A compact JWS built by hand, so that hostile headers and claims are exactly what the test says. */
function craft(options: CraftOptions = {}): string {
  const header = options.header ?? BASE_HEADER;
  const input = `${b64url(header)}.${b64url(options.payload ?? basePayload())}`;
  const alg = options.signAs ?? header.alg;
  assert.equal(typeof alg, 'string');
  return `${input}.${signature(String(alg), input, options.key ?? p256.privateKey).toString('base64url')}`;
}

function segments(token: string): [string, string, string] {
  const [h, p, s, ...rest] = token.split('.');
  assert.ok(h !== undefined && p !== undefined && s !== undefined && rest.length === 0);
  return [h, p, s];
}

function decodeSegment(segment: string): unknown {
  return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(Buffer.from(segment, 'base64url')));
}

/** Replaces the payload with a modified copy, keeping the original header and signature. */
function rewritePayload(token: string, mutate: (payload: Record<string, unknown>) => void): string {
  const [h, p, s] = segments(token);
  const payload = decodeSegment(p);
  assert.ok(isRecord(payload));
  mutate(payload);
  return `${h}.${b64url(payload)}.${s}`;
}

/**
 * Changes exactly one character of the payload segment such that the payload still decodes to a JSON object
 * with the same `sub`: only the signature can then tell that the token was tampered with.
 */
function flipOnePayloadChar(token: string): string {
  const [h, p, s] = segments(token);
  const original = decodeSegment(p);
  assert.ok(isRecord(original));
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  // Skip the last block: its final character may carry unused bits.
  for (let i = 0; i < p.length - 4; i++) {
    for (const c of alphabet) {
      if (c === p[i]) continue;
      const candidate = p.slice(0, i) + c + p.slice(i + 1);
      let decoded: unknown;
      try {
        decoded = decodeSegment(candidate);
      } catch {
        continue;
      }
      if (
        isRecord(decoded) &&
        decoded.sub === original.sub &&
        JSON.stringify(decoded) !== JSON.stringify(original)
      )
        return `${h}.${candidate}.${s}`;
    }
  }
  assert.fail('no single-character change keeps the payload decodable');
}

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

describe('JWT-SVID', () => {
  describe('fixtures', () => {
    it('a hand-crafted token with nothing wrong verifies (so every hostile variant below differs by one rule)', async () => {
      const svid = await verifyJwtSvid(craft(), BUNDLE, 'a', { now: NOW });
      assert.ok(svid.id.equals(ID));
      assert.deepEqual(svid.audience, ['a']);
    });
  });

  describe('round trip (mint → verify)', () => {
    const cases: readonly { alg: JwtSvidAlgorithm; privateKey: KeyObject; publicKey: KeyObject }[] = [
      { alg: 'RS256', ...rsa },
      { alg: 'RS384', ...rsa },
      { alg: 'RS512', ...rsa },
      { alg: 'PS256', ...rsa },
      { alg: 'PS384', ...rsa },
      { alg: 'PS512', ...rsa },
      { alg: 'ES256', ...p256 },
      { alg: 'ES384', ...p384 },
      { alg: 'ES512', ...p521 },
    ];
    for (const { alg, privateKey, publicKey } of cases) {
      it(`mints and verifies a ${alg} JWT-SVID with matching id, audience and expiry`, async () => {
        const kid = `kid-${alg}`;
        const minted = await mintJwtSvid({
          id: ID,
          audience: ['aud-1', 'aud-2'],
          signer: { kid, privateKey, alg },
          ttlSeconds: 120,
          now: NOW,
        });
        assert.deepEqual(decodeProtectedHeader(minted.token), { alg, kid, typ: 'JWT' });
        const bundle = new JwtBundle(TD, [{ kid, publicKey }]);
        const svid = await verifyJwtSvid(minted.token, bundle, 'aud-2', { now: at(10) });
        assert.equal(svid.token, minted.token);
        assert.ok(svid.id.equals(ID));
        assert.equal(svid.id.toString(), ID.toString());
        assert.deepEqual(svid.audience, ['aud-1', 'aud-2']);
        assert.deepEqual(minted.audience, ['aud-1', 'aud-2']);
        assert.equal(svid.expiry.getTime(), at(120).getTime());
        assert.equal(minted.expiry.getTime(), at(120).getTime());
        assert.equal(svid.issuedAt?.getTime(), NOW.getTime());
      });
    }

    const defaults: readonly { name: string; privateKey: KeyObject; publicKey: KeyObject; alg: string }[] = [
      { name: 'P-256', ...p256, alg: 'ES256' },
      { name: 'P-384', ...p384, alg: 'ES384' },
      { name: 'P-521', ...p521, alg: 'ES512' },
      { name: 'RSA', ...rsa, alg: 'RS256' },
    ];
    for (const { name, privateKey, publicKey, alg } of defaults) {
      it(`defaults to ${alg} for a ${name} key and the result verifies`, async () => {
        const minted = await mintJwtSvid({
          id: ID,
          audience: 'a',
          signer: { kid: 'd', privateKey },
          now: NOW,
        });
        assert.equal(decodeProtectedHeader(minted.token).alg, alg);
        const svid = await verifyJwtSvid(minted.token, new JwtBundle(TD, [{ kid: 'd', publicKey }]), 'a', {
          now: NOW,
        });
        assert.ok(svid.id.equals(ID));
        assert.equal(svid.expiry.getTime(), at(300).getTime(), 'default ttl is 300 s');
      });
    }

    it('carries extra claims through mint and verify', async () => {
      const minted = await mintJwtSvid({
        id: ID,
        audience: 'a',
        signer: { kid: KID, privateKey: p256.privateKey },
        claims: { team: 'blue' },
        now: NOW,
      });
      const svid = await verifyJwtSvid(minted.token, BUNDLE, 'a', { now: NOW });
      assert.equal(svid.claims.team, 'blue');
    });
  });

  describe('algorithms', () => {
    it('refuses an unsigned alg "none" token with ERR_JWT_ALGORITHM', async () => {
      const token = `${b64url({ alg: 'none', kid: KID, typ: 'JWT' })}.${b64url(basePayload())}.`;
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Algorithm);
    });

    it('refuses an HS256 token keyed with the public key bytes (key confusion) with ERR_JWT_ALGORITHM', async () => {
      const publicPem = Buffer.from(p256.publicKey.export({ type: 'spki', format: 'pem' }));
      const token = craft({ header: { ...BASE_HEADER, alg: 'HS256' }, key: publicPem });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Algorithm);
      const rsaPem = Buffer.from(rsa.publicKey.export({ type: 'spki', format: 'pem' }));
      const rsaBundle = new JwtBundle(TD, [{ kid: 'r', publicKey: rsa.publicKey }]);
      const rsaToken = craft({ header: { alg: 'HS256', kid: 'r', typ: 'JWT' }, key: rsaPem });
      await rejectsWith(verifyJwtSvid(rsaToken, rsaBundle, 'a', { now: NOW }), JwtErrorCode.Algorithm);
    });

    it('refuses an EdDSA token even when the bundle holds the matching Ed25519 key, with ERR_JWT_ALGORITHM', async () => {
      const bundle = new JwtBundle(TD, [{ kid: 'ed', publicKey: ed25519.publicKey }]);
      const token = craft({ header: { alg: 'EdDSA', kid: 'ed', typ: 'JWT' }, key: ed25519.privateKey });
      await rejectsWith(verifyJwtSvid(token, bundle, 'a', { now: NOW }), JwtErrorCode.Algorithm);
    });

    it('accepts an RS256 token signed by the RSA key in the bundle (control for the mismatch cases)', async () => {
      const bundle = new JwtBundle(TD, [{ kid: 'r', publicKey: rsa.publicKey }]);
      const token = craft({ header: { alg: 'RS256', kid: 'r', typ: 'JWT' }, key: rsa.privateKey });
      const svid = await verifyJwtSvid(token, bundle, 'a', { now: NOW });
      assert.ok(svid.id.equals(ID));
    });

    it('refuses an ES256 header when the bundle key for its kid is RSA, with ERR_JWT_ALGORITHM', async () => {
      const bundle = new JwtBundle(TD, [{ kid: KID, publicKey: rsa.publicKey }]);
      await rejectsWith(verifyJwtSvid(craft(), bundle, 'a', { now: NOW }), JwtErrorCode.Algorithm);
    });

    it('never accepts a token whose header alg does not fit the bundle key (ES↔RS, PS↔EC, curve mismatch)', async () => {
      const rsaBundle = new JwtBundle(TD, [{ kid: KID, publicKey: rsa.publicKey }]);
      const ecBundle = new JwtBundle(TD, [{ kid: KID, publicKey: p256.publicKey }]);
      const cases: readonly [string, JwtBundle][] = [
        [craft(), rsaBundle],
        [craft({ header: { ...BASE_HEADER, alg: 'RS256' }, key: rsa.privateKey }), ecBundle],
        [craft({ header: { ...BASE_HEADER, alg: 'PS256' }, key: rsa.privateKey }), ecBundle],
        [craft({ header: { ...BASE_HEADER, alg: 'ES384' }, key: p384.privateKey }), ecBundle],
      ];
      for (const [token, bundle] of cases) {
        await assert.rejects(verifyJwtSvid(token, bundle, 'a', { now: NOW }), SpiffeError);
      }
    });
  });

  describe('kid', () => {
    it('refuses a token without kid with ERR_JWT_KID_MISSING', async () => {
      const token = craft({ header: omit(BASE_HEADER, 'kid') });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.KidMissing);
    });

    it('refuses an empty or non-string kid with ERR_JWT_KID_MISSING', async () => {
      for (const kid of ['', 7]) {
        const token = craft({ header: { ...BASE_HEADER, kid } });
        await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.KidMissing);
      }
    });

    it('refuses a kid unknown to the bundle with ERR_JWT_KEY_NOT_FOUND', async () => {
      const token = craft({ header: { ...BASE_HEADER, kid: 'k2' } });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.KeyNotFound);
    });
  });

  describe('typ', () => {
    for (const typ of ['JWT', 'JOSE']) {
      it(`accepts typ "${typ}"`, async () => {
        const token = craft({ header: { ...BASE_HEADER, typ } });
        const svid = await verifyJwtSvid(token, BUNDLE, 'a', { now: NOW });
        assert.ok(svid.id.equals(ID));
      });
    }

    it('accepts a token without typ', async () => {
      const token = craft({ header: omit(BASE_HEADER, 'typ') });
      const svid = await verifyJwtSvid(token, BUNDLE, 'a', { now: NOW });
      assert.ok(svid.id.equals(ID));
    });

    it('refuses typ "at+jwt" with ERR_JWT_TYPE', async () => {
      const token = craft({ header: { ...BASE_HEADER, typ: 'at+jwt' } });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Type);
    });
  });

  describe('JOSE header members', () => {
    const extras: Readonly<Record<string, unknown>> = {
      jku: 'https://attacker.example/jwks.json',
      jwk: p256.publicKey.export({ format: 'jwk' }),
      x5u: 'https://attacker.example/cert.pem',
      crit: ['exp'],
    };
    for (const [member, value] of Object.entries(extras)) {
      it(`refuses a header carrying "${member}" with ERR_JWT_HEADER`, async () => {
        const token = craft({ header: { ...BASE_HEADER, [member]: value } });
        await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Header);
      });
    }
  });

  describe('sub', () => {
    it('refuses a token without sub with ERR_JWT_SUBJECT', async () => {
      const token = craft({ payload: omit(basePayload(), 'sub') });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Subject);
    });

    for (const sub of ['https://x', 'spiffe://UPPER/x', 42]) {
      it(`refuses sub ${JSON.stringify(sub)} (not a SPIFFE ID) with ERR_JWT_SUBJECT`, async () => {
        const token = craft({ payload: { ...basePayload(), sub } });
        await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Subject);
      });
    }
  });

  describe('aud', () => {
    const mintAb = () =>
      mintJwtSvid({
        id: ID,
        audience: ['a', 'b'],
        signer: { kid: KID, privateKey: p256.privateKey },
        now: NOW,
      });

    it('verifies a token for [a, b] when expecting "b"', async () => {
      const { token } = await mintAb();
      const svid = await verifyJwtSvid(token, BUNDLE, 'b', { now: NOW });
      assert.deepEqual(svid.audience, ['a', 'b']);
    });

    it('verifies a token for [a, b] when expecting any of [x, a]', async () => {
      const { token } = await mintAb();
      const svid = await verifyJwtSvid(token, BUNDLE, ['x', 'a'], { now: NOW });
      assert.deepEqual(svid.audience, ['a', 'b']);
    });

    it('accepts aud given as a single string and reports it as a one-element list', async () => {
      const token = craft({ payload: { ...basePayload(), aud: 'a' } });
      const svid = await verifyJwtSvid(token, BUNDLE, 'a', { now: NOW });
      assert.deepEqual(svid.audience, ['a']);
    });

    it('refuses a token for [a, b] when expecting "c" with ERR_JWT_AUDIENCE', async () => {
      const { token } = await mintAb();
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'c', { now: NOW }), JwtErrorCode.Audience);
    });

    it('refuses a token without aud with ERR_JWT_AUDIENCE', async () => {
      const token = craft({ payload: omit(basePayload(), 'aud') });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Audience);
    });

    it('refuses a numeric aud with ERR_JWT_AUDIENCE', async () => {
      for (const aud of [5, [5], { a: true }]) {
        const token = craft({ payload: { ...basePayload(), aud } });
        await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Audience);
      }
    });

    it('refuses an aud array that mixes strings and non-strings with ERR_JWT_AUDIENCE', async () => {
      const token = craft({ payload: { ...basePayload(), aud: ['a', 5] } });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Audience);
    });

    it('refuses to verify against an empty expected audience ([] or "") with ERR_JWT_AUDIENCE', async () => {
      const token = craft();
      await rejectsWith(verifyJwtSvid(token, BUNDLE, [], { now: NOW }), JwtErrorCode.Audience);
      await rejectsWith(verifyJwtSvid(token, BUNDLE, '', { now: NOW }), JwtErrorCode.Audience);
      await rejectsWith(verifyJwtSvid(token, BUNDLE, ['a', ''], { now: NOW }), JwtErrorCode.Audience);
    });
  });

  describe('exp, nbf and leeway', () => {
    const mint60 = () =>
      mintJwtSvid({
        id: ID,
        audience: 'a',
        signer: { kid: KID, privateKey: p256.privateKey },
        ttlSeconds: 60,
        now: NOW,
      });

    it('refuses a token without exp with ERR_JWT_EXP_MISSING', async () => {
      const token = craft({ payload: omit(basePayload(), 'exp') });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.ExpMissing);
    });

    it('refuses a non-numeric exp with ERR_JWT_EXP_MISSING', async () => {
      const token = craft({ payload: { ...basePayload(), exp: String(NOW_S + 300) } });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.ExpMissing);
    });

    it('accepts a token before its exp', async () => {
      const { token } = await mint60();
      const svid = await verifyJwtSvid(token, BUNDLE, 'a', { now: at(59) });
      assert.equal(svid.expiry.getTime(), at(60).getTime());
    });

    it('refuses a token expired beyond the default 30 s leeway with ERR_JWT_EXPIRED', async () => {
      const { token } = await mint60();
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: at(60 + 31) }), JwtErrorCode.Expired);
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: at(60 + 3600) }), JwtErrorCode.Expired);
    });

    it('accepts a token expired by less than the default 30 s leeway', async () => {
      const { token } = await mint60();
      const svid = await verifyJwtSvid(token, BUNDLE, 'a', { now: at(60 + 10) });
      assert.ok(svid.id.equals(ID));
      await verifyJwtSvid(token, BUNDLE, 'a', { now: at(60 + 29) });
    });

    it('refuses that same slightly expired token with leewaySeconds: 0 (ERR_JWT_EXPIRED)', async () => {
      const { token } = await mint60();
      await rejectsWith(
        verifyJwtSvid(token, BUNDLE, 'a', { now: at(60 + 10), leewaySeconds: 0 }),
        JwtErrorCode.Expired,
      );
      await rejectsWith(
        verifyJwtSvid(token, BUNDLE, 'a', { now: at(60), leewaySeconds: 0 }),
        JwtErrorCode.Expired,
      );
    });

    it(`accepts leewaySeconds up to ${MAX_JWT_LEEWAY_SECONDS}`, async () => {
      const { token } = await mint60();
      await verifyJwtSvid(token, BUNDLE, 'a', { now: at(60 + 299), leewaySeconds: MAX_JWT_LEEWAY_SECONDS });
    });

    it('throws RangeError for leewaySeconds above 300, negative, or not a number', async () => {
      const { token } = await mint60();
      for (const leewaySeconds of [MAX_JWT_LEEWAY_SECONDS + 1, -1, Number.NaN, Number.POSITIVE_INFINITY]) {
        await assert.rejects(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW, leewaySeconds }), RangeError);
      }
    });

    it('refuses nbf in the future beyond the leeway with ERR_JWT_NOT_YET_VALID', async () => {
      const token = craft({ payload: { ...basePayload(), nbf: NOW_S + 120 } });
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.NotYetValid);
    });

    it('accepts nbf in the future within the leeway, and nbf in the past', async () => {
      for (const nbf of [NOW_S + 10, NOW_S - 10]) {
        const token = craft({ payload: { ...basePayload(), nbf } });
        const svid = await verifyJwtSvid(token, BUNDLE, 'a', { now: NOW });
        assert.ok(svid.id.equals(ID));
      }
    });
  });

  describe('bundle of the token’s own trust domain', () => {
    const hubTd = TrustDomain.parse('hub.example.org');
    const spokeTd = TrustDomain.parse('spoke.example.org');
    const hubKey = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const spokeKey = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const hubId = SpiffeId.parse('spiffe://hub.example.org/ns/a/sa/b');
    const spokeId = SpiffeId.parse('spiffe://spoke.example.org/ns/a/sa/b');
    const bundles = new BundleSet([
      new SpiffeBundle(hubTd, {
        jwtAuthorities: [
          { kid: 'hub-1', publicKey: hubKey.publicKey },
          { kid: 'shared', publicKey: hubKey.publicKey },
        ],
      }),
      new SpiffeBundle(spokeTd, {
        jwtAuthorities: [
          { kid: 'spoke-1', publicKey: spokeKey.publicKey },
          { kid: 'shared', publicKey: spokeKey.publicKey },
        ],
      }),
    ]);
    const mint = (id: SpiffeId, kid: string, privateKey: KeyObject) =>
      mintJwtSvid({ id, audience: 'a', signer: { kid, privateKey }, now: NOW });

    it('verifies each trust domain’s tokens with its own keys', async () => {
      for (const [id, kid, key] of [
        [hubId, 'hub-1', hubKey.privateKey],
        [hubId, 'shared', hubKey.privateKey],
        [spokeId, 'spoke-1', spokeKey.privateKey],
        [spokeId, 'shared', spokeKey.privateKey],
      ] as const) {
        const { token } = await mint(id, kid, key);
        const svid = await verifyJwtSvid(token, bundles, 'a', { now: NOW });
        assert.ok(svid.id.equals(id));
      }
    });

    it('refuses a spoke token signed with a hub-only kid with ERR_JWT_KEY_NOT_FOUND', async () => {
      const { token } = await mint(spokeId, 'hub-1', hubKey.privateKey);
      await rejectsWith(verifyJwtSvid(token, bundles, 'a', { now: NOW }), JwtErrorCode.KeyNotFound);
    });

    it('refuses a spoke token signed by the hub under a kid both bundles use with ERR_JWT_SIGNATURE', async () => {
      const { token } = await mint(spokeId, 'shared', hubKey.privateKey);
      await rejectsWith(verifyJwtSvid(token, bundles, 'a', { now: NOW }), JwtErrorCode.Signature);
    });

    it('refuses a token whose sub trust domain has no bundle with ERR_JWT_NO_BUNDLE', async () => {
      const other = SpiffeId.parse('spiffe://other.example.org/w');
      const { token } = await mint(other, 'hub-1', hubKey.privateKey);
      await rejectsWith(verifyJwtSvid(token, bundles, 'a', { now: NOW }), JwtErrorCode.NoBundle);
    });

    it('refuses with ERR_JWT_NO_BUNDLE when a single JwtBundle is of another trust domain', async () => {
      const { token } = await mint(spokeId, KID, p256.privateKey);
      await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.NoBundle);
    });
  });

  describe('integrity and shape', () => {
    it('refuses a token with one character of the payload changed with ERR_JWT_SIGNATURE', async () => {
      const tampered = flipOnePayloadChar(craft());
      assert.ok(parseJwtSvidInsecure(tampered).id.equals(ID), 'tampered token is otherwise well-formed');
      await rejectsWith(verifyJwtSvid(tampered, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Signature);
    });

    it('refuses a token whose payload was rewritten after signing (exp extended) with ERR_JWT_SIGNATURE', async () => {
      const tampered = rewritePayload(craft(), (p) => {
        p.exp = NOW_S + 86_400;
      });
      await rejectsWith(verifyJwtSvid(tampered, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Signature);
    });

    it('refuses a token whose signature belongs to another token with ERR_JWT_SIGNATURE', async () => {
      const [h, p] = segments(craft());
      const [, , otherSig] = segments(craft({ payload: { ...basePayload(), aud: ['z'] } }));
      await rejectsWith(
        verifyJwtSvid(`${h}.${p}.${otherSig}`, BUNDLE, 'a', { now: NOW }),
        JwtErrorCode.Signature,
      );
    });

    it('refuses tokens of 2 or 5 segments and the empty string with ERR_JWT_MALFORMED', async () => {
      const [h, p, s] = segments(craft());
      for (const token of [`${h}.${p}`, `${h}.${p}.${s}.${s}.${s}`, '']) {
        await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Malformed);
      }
    });

    it('refuses three segments that are not base64url JSON with ERR_JWT_MALFORMED', async () => {
      const [h, , s] = segments(craft());
      for (const token of ['a.b.c', `${h}.!!!.${s}`, `${h}.${b64url([1, 2])}.${s}`]) {
        await rejectsWith(verifyJwtSvid(token, BUNDLE, 'a', { now: NOW }), JwtErrorCode.Malformed);
      }
    });
  });

  describe('bundles parsed from SPIFFE bundle JSON', () => {
    it('verifies tokens with "use": "jwt-svid" keys (no dependence on jose JWK sets, which want "sig")', async () => {
      const json = JSON.stringify({
        keys: [
          { use: 'jwt-svid', kid: 'ec', ...p384.publicKey.export({ format: 'jwk' }) },
          { use: 'jwt-svid', kid: 'rsa', ...rsa.publicKey.export({ format: 'jwk' }) },
        ],
        spiffe_sequence: 1,
      });
      const bundle = SpiffeBundle.parse(TD, json);
      assert.deepEqual([...bundle.jwtAuthorities.keys()], ['ec', 'rsa']);
      const ecToken = await mintJwtSvid({
        id: ID,
        audience: 'a',
        signer: { kid: 'ec', privateKey: p384.privateKey },
        now: NOW,
      });
      const rsaToken = await mintJwtSvid({
        id: ID,
        audience: 'a',
        signer: { kid: 'rsa', privateKey: rsa.privateKey, alg: 'PS384' },
        now: NOW,
      });
      for (const source of [bundle, new BundleSet([bundle])]) {
        for (const { token } of [ecToken, rsaToken]) {
          const svid = await verifyJwtSvid(token, source, 'a', { now: NOW });
          assert.ok(svid.id.equals(ID));
        }
      }
    });
  });

  describe('mint refusals', () => {
    const signer = { kid: KID, privateKey: p256.privateKey };

    it('refuses an Ed25519 key with ERR_JWT_MINT', async () => {
      await rejectsWith(
        mintJwtSvid({ id: ID, audience: 'a', signer: { kid: 'ed', privateKey: ed25519.privateKey } }),
        JwtErrorCode.Mint,
      );
    });

    it('refuses an empty kid with ERR_JWT_MINT', async () => {
      await rejectsWith(
        mintJwtSvid({ id: ID, audience: 'a', signer: { kid: '', privateKey: p256.privateKey } }),
        JwtErrorCode.Mint,
      );
    });

    it('refuses ttlSeconds 0, negative or fractional with ERR_JWT_MINT', async () => {
      for (const ttlSeconds of [0, -1, 1.5]) {
        await rejectsWith(mintJwtSvid({ id: ID, audience: 'a', signer, ttlSeconds }), JwtErrorCode.Mint);
      }
    });

    for (const claim of ['sub', 'aud', 'exp', 'iat']) {
      it(`refuses extra claims that override "${claim}" with ERR_JWT_MINT`, async () => {
        await rejectsWith(
          mintJwtSvid({ id: ID, audience: 'a', signer, claims: { [claim]: 'x' } }),
          JwtErrorCode.Mint,
        );
      });
    }

    it('refuses a signer alg that does not fit the key with ERR_JWT_MINT', async () => {
      await rejectsWith(
        mintJwtSvid({
          id: ID,
          audience: 'a',
          signer: { kid: KID, privateKey: rsa.privateKey, alg: 'ES256' },
        }),
        JwtErrorCode.Mint,
      );
    });

    it('refuses an empty audience with ERR_JWT_AUDIENCE', async () => {
      for (const audience of ['', [], ['a', '']]) {
        await rejectsWith(mintJwtSvid({ id: ID, audience, signer }), JwtErrorCode.Audience);
      }
    });
  });

  describe('parseJwtSvidInsecure', () => {
    it('returns id, audience and expiry of a good token without any bundle', async () => {
      const minted = await mintJwtSvid({
        id: ID,
        audience: ['a', 'b'],
        signer: { kid: KID, privateKey: p256.privateKey },
        ttlSeconds: 90,
        now: NOW,
      });
      const svid = parseJwtSvidInsecure(minted.token);
      assert.ok(svid.id.equals(ID));
      assert.deepEqual(svid.audience, ['a', 'b']);
      assert.equal(svid.expiry.getTime(), at(90).getTime());
      assert.equal(svid.issuedAt?.getTime(), NOW.getTime());
    });

    it('still refuses alg "none" with ERR_JWT_ALGORITHM', () => {
      const token = `${b64url({ alg: 'none', kid: KID, typ: 'JWT' })}.${b64url(basePayload())}.`;
      assert.throws(() => parseJwtSvidInsecure(token), hasCode(JwtErrorCode.Algorithm));
    });

    it('still applies the other header and subject rules', () => {
      assert.throws(
        () => parseJwtSvidInsecure(craft({ header: { ...BASE_HEADER, jku: 'https://x' } })),
        hasCode(JwtErrorCode.Header),
      );
      assert.throws(
        () => parseJwtSvidInsecure(craft({ header: omit(BASE_HEADER, 'kid') })),
        hasCode(JwtErrorCode.KidMissing),
      );
      assert.throws(
        () => parseJwtSvidInsecure(craft({ header: { ...BASE_HEADER, typ: 'at+jwt' } })),
        hasCode(JwtErrorCode.Type),
      );
      assert.throws(
        () => parseJwtSvidInsecure(craft({ payload: { ...basePayload(), sub: 'https://x' } })),
        hasCode(JwtErrorCode.Subject),
      );
      assert.throws(() => parseJwtSvidInsecure('a.b'), hasCode(JwtErrorCode.Malformed));
    });
  });
});
