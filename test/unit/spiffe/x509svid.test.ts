// Must stay first: @peculiar/x509 (used by the dev PKI and the cert helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { before, describe, it, mock } from 'node:test';
import {
  type BadName,
  bundleJson,
  type DevIdentity,
  type DevPki,
  makeDevPki,
} from '../../../certs-dev/devpki.ts';
import {
  type CertOptions,
  DAY,
  generateKeys,
  HOUR,
  importIssuer,
  KeyUsage,
  MINUTE,
  makeCa,
  makeLeaf,
  nameConstraints,
  opaqueExtension,
  type TestIssuer,
  type TestLeaf,
} from '../../../dev/certs.ts';
import {
  AuthzErrorCode,
  authorizeAny,
  authorizeId,
  authorizeMemberOf,
  authorizeOneOf,
  BundleSet,
  IdErrorCode,
  parseCertificates,
  parsePrivateKey,
  parseX509Svid,
  SpiffeBundle,
  SpiffeError,
  type SpiffeErrorCode,
  SpiffeId,
  TrustDomain,
  type VerifiedX509Svid,
  verifyX509Svid,
  X509Bundle,
  type X509BundleSource,
  X509ErrorCode,
} from '../../../src/spiffe/index.ts';

/** Every validity period of the dev PKI is relative to this instant (whole seconds, UTCTime-representable). */
const NOW = new Date('2040-01-01T00:00:00Z');
const at = (offsetMs: number): Date => new Date(NOW.getTime() + offsetMs);
const SECOND = 1000;
const UNKNOWN_OID = '1.3.6.1.4.1.99999.1';

function assertCode(fn: () => unknown, code: SpiffeErrorCode): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SpiffeError, `expected a SpiffeError, got ${String(e)}`);
    assert.equal(e.code, code, `expected ${code}, got ${e.code}: ${e.message}`);
    return true;
  });
}

/** Runs `fn`, which must throw a SpiffeError, and returns that error. */
function catchSpiffe(fn: () => unknown): SpiffeError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof SpiffeError, `expected a SpiffeError, got ${String(e)}`);
    return e;
  }
  assert.fail('expected a SpiffeError, nothing was thrown');
}

function required<T>(value: T | undefined, what: string): T {
  assert.ok(value !== undefined, `${what} is missing`);
  return value;
}

function pemOf(certs: readonly X509Certificate[]): string {
  return certs.map((c) => c.toString()).join('');
}

function derOf(certs: readonly X509Certificate[]): Buffer {
  return Buffer.concat(certs.map((c) => c.raw));
}

/** The base64 body of a PEM block (armor and whitespace removed). */
function pemBody(pem: string): string {
  return pem.replace(/-----(BEGIN|END) [A-Z ]+-----/g, '').replace(/\s+/g, '');
}

function assertNoKeyMaterial(error: SpiffeError, keyPem: string): void {
  const body = pemBody(keyPem);
  const texts = [error.message, error.cause instanceof Error ? error.cause.message : ''];
  for (const text of texts) {
    assert.ok(!text.includes(body), 'error message contains the whole key body');
    for (const chunk of body.match(/.{16}/g) ?? []) {
      assert.ok(!text.includes(chunk), `error message contains key material (${chunk})`);
    }
  }
}

const BAD_CODES: Readonly<Record<BadName, SpiffeErrorCode>> = {
  leafIsCa: X509ErrorCode.LeafCa,
  twoUriSans: X509ErrorCode.MultipleUriSans,
  noUriSan: X509ErrorCode.NoUriSan,
  leafKeyCertSign: X509ErrorCode.LeafKeyCertSign,
  leafCrlSign: X509ErrorCode.LeafCrlSign,
  noDigitalSignature: X509ErrorCode.LeafNoDigitalSignature,
  expired: X509ErrorCode.Expired,
  notYetValid: X509ErrorCode.NotYetValid,
  wrongScheme: IdErrorCode.WrongScheme,
  rootPath: X509ErrorCode.LeafRootPath,
  forgedTrustDomain: X509ErrorCode.WrongTrustDomain,
};

/** The bad identities whose defect is a leaf rule, which `parseX509Svid` checks too. */
const LEAF_RULE_BAD: readonly BadName[] = [
  'leafIsCa',
  'twoUriSans',
  'noUriSan',
  'leafKeyCertSign',
  'leafCrlSign',
  'noDigitalSignature',
  'wrongScheme',
  'rootPath',
];

/** The bad identities that are well-formed SVIDs and fail only on time or trust, which parsing does not check. */
const TRUST_OR_TIME_BAD: readonly BadName[] = ['expired', 'notYetValid', 'forgedTrustDomain'];

const BAD_NAMES = Object.keys(BAD_CODES) as BadName[];

let pki: DevPki;
let hubTd: TrustDomain;
let spokeTd: TrustDomain;
let hubRoot: X509Certificate;
let spokeRoot: X509Certificate;
let spokeIntermediate: X509Certificate;
let hubBundle: SpiffeBundle;
let spokeBundle: SpiffeBundle;
/** Both trust domains, each with its root only (X509-SVID §6.1). */
let bundles: BundleSet;
/** The dev hub root as an issuer of custom certificates. */
let hubIssuer: TestIssuer;
/** The dev spoke intermediate as an issuer of custom certificates. */
let spokeIssuer: TestIssuer;

before(async () => {
  pki = await makeDevPki({ now: NOW });
  hubTd = TrustDomain.parse(pki.hub.name);
  spokeTd = TrustDomain.parse(pki.spoke.name);
  hubRoot = new X509Certificate(pki.hub.rootPem);
  spokeRoot = new X509Certificate(pki.spoke.rootPem);
  const intermediatePem = required(pki.spoke.intermediatePem, 'spoke intermediate');
  spokeIntermediate = new X509Certificate(intermediatePem);
  hubBundle = new SpiffeBundle(hubTd, { x509Authorities: [hubRoot] });
  spokeBundle = new SpiffeBundle(spokeTd, { x509Authorities: [spokeRoot] });
  bundles = new BundleSet([hubBundle, spokeBundle]);
  hubIssuer = await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem);
  spokeIssuer = await importIssuer(
    intermediatePem,
    required(pki.spoke.intermediateKeyPem, 'spoke intermediate key'),
  );
});

function chainOf(identity: DevIdentity): X509Certificate[] {
  return parseCertificates(identity.chainPem);
}

function verifyDev(identity: DevIdentity, source: X509BundleSource = bundles, now = NOW): VerifiedX509Svid {
  return verifyX509Svid(chainOf(identity), source, now);
}

/** Validity that comfortably contains NOW, for custom certificates. */
const VALID = (): Pick<CertOptions, 'notBefore' | 'notAfter'> => ({
  notBefore: at(-HOUR),
  notAfter: at(DAY),
});

/** A hub workload leaf issued by `issuer`. */
function hubLeaf(issuer: TestIssuer, extra: Partial<CertOptions> = {}): Promise<TestLeaf> {
  return makeLeaf({
    subject: 'O=test, CN=workload',
    uris: ['spiffe://hub.example.org/ns/test/sa/workload'],
    ...VALID(),
    ...extra,
    issuer,
  });
}

/** A hub intermediate issued by the dev hub root. */
function hubIntermediate(extra: Partial<CertOptions> = {}): Promise<TestIssuer> {
  return makeCa({ subject: 'O=test, CN=hub intermediate', ...VALID(), ...extra, issuer: hubIssuer });
}

describe('verifyX509Svid with the dev PKI', () => {
  const goodNames = ['proxyServer', 'clientArgocd', 'clientFlux', 'clientSpoke'] as const;

  for (const name of goodNames) {
    it(`verifies the good SVID ${name} against both trust domains' roots and yields its SPIFFE ID`, () => {
      const identity = pki.good[name];
      const chain = chainOf(identity);
      const result = verifyX509Svid(chain, bundles, NOW);
      assert.equal(result.id.toString(), identity.spiffeId);
      assert.ok(result.verifiedChain[0]?.raw.equals(required(chain[0], 'leaf').raw));
    });

    it(`ends the verified chain of ${name} with the root of its own trust domain`, () => {
      const identity = pki.good[name];
      const result = verifyDev(identity);
      const ownRoot = result.id.trustDomain.equals(hubTd) ? hubRoot : spokeRoot;
      const otherRoot = result.id.trustDomain.equals(hubTd) ? spokeRoot : hubRoot;
      const last = required(result.verifiedChain.at(-1), 'verified chain anchor');
      assert.ok(last.raw.equals(ownRoot.raw), 'verified chain does not end with its own root');
      assert.ok(!result.verifiedChain.some((c) => c.raw.equals(otherRoot.raw)));
    });
  }

  it('returns leaf, intermediate and root for a spoke SVID, and leaf and root for a hub SVID', () => {
    const spoke = verifyDev(pki.good.clientSpoke).verifiedChain.map((c) => c.fingerprint256);
    assert.deepEqual(spoke, [
      required(chainOf(pki.good.clientSpoke)[0], 'leaf').fingerprint256,
      spokeIntermediate.fingerprint256,
      spokeRoot.fingerprint256,
    ]);
    const hub = verifyDev(pki.good.clientArgocd).verifiedChain.map((c) => c.fingerprint256);
    assert.deepEqual(hub, [
      required(chainOf(pki.good.clientArgocd)[0], 'leaf').fingerprint256,
      hubRoot.fingerprint256,
    ]);
  });

  it('verifies against bundles parsed from the dev SPIFFE bundle JSON', () => {
    const parsed = new BundleSet([
      SpiffeBundle.parse(hubTd, bundleJson(pki.hub)),
      SpiffeBundle.parse(spokeTd, bundleJson(pki.spoke)),
    ]);
    assert.equal(verifyDev(pki.good.clientSpoke, parsed).id.toString(), pki.good.clientSpoke.spiffeId);
    assert.equal(verifyDev(pki.good.clientFlux, parsed).id.toString(), pki.good.clientFlux.spiffeId);
  });

  it('verifies against the X509Bundle of the leaf trust domain alone', () => {
    assert.equal(
      verifyDev(pki.good.clientArgocd, hubBundle.x509Bundle).id.toString(),
      pki.good.clientArgocd.spiffeId,
    );
  });

  it('rejects a spoke leaf presented without its intermediate with ERR_X509_UNTRUSTED', () => {
    const [leaf] = chainOf(pki.good.clientSpoke);
    assertCode(() => verifyX509Svid([required(leaf, 'leaf')], bundles, NOW), X509ErrorCode.Untrusted);
  });

  it('rejects a leaf that no authority signed with ERR_X509_UNTRUSTED', async () => {
    const rogueRoot = await makeCa({ subject: 'CN=hub.example.org root, O=kube-svid-proxy dev', ...VALID() });
    const leaf = await hubLeaf(rogueRoot);
    assertCode(() => verifyX509Svid([leaf.node], bundles, NOW), X509ErrorCode.Untrusted);
    assertCode(() => verifyX509Svid([leaf.node, rogueRoot.node], bundles, NOW), X509ErrorCode.Untrusted);
  });

  it('rejects an empty chain with ERR_X509_EMPTY_CHAIN', () => {
    assertCode(() => verifyX509Svid([], bundles, NOW), X509ErrorCode.EmptyChain);
  });

  it('uses the current time when no `now` is given', () => {
    // The dev PKI is minted for 2040; today it is not valid yet.
    assertCode(() => verifyX509Svid(chainOf(pki.good.clientArgocd), bundles), X509ErrorCode.NotYetValid);
  });

  for (const name of BAD_NAMES) {
    it(`rejects the bad SVID ${name} with ${BAD_CODES[name]}`, () => {
      assertCode(() => verifyDev(pki.bad[name]), BAD_CODES[name]);
    });
  }

  it('gives every bad SVID a distinct code', () => {
    const codes = BAD_NAMES.map((name) => catchSpiffe(() => verifyDev(pki.bad[name])).code);
    assert.equal(codes.length, 11);
    assert.equal(new Set(codes).size, codes.length, `codes repeat: ${codes.join(', ')}`);
    assert.equal(new Set(Object.values(BAD_CODES)).size, BAD_NAMES.length);
  });
});

describe('verifyX509Svid and cross-trust-domain forgery', () => {
  it('rejects the forged spoke SVID with ERR_X509_WRONG_TRUST_DOMAIN when the set knows the hub bundle', () => {
    assertCode(() => verifyDev(pki.bad.forgedTrustDomain), X509ErrorCode.WrongTrustDomain);
  });

  it('names both trust domains in the wrong-trust-domain message', () => {
    const { message } = catchSpiffe(() => verifyDev(pki.bad.forgedTrustDomain));
    assert.match(message, /spoke\.example\.org/);
    assert.match(message, /hub\.example\.org/);
  });

  it('rejects the forged SVID with ERR_X509_UNTRUSTED against the spoke X509Bundle alone (no listing)', () => {
    assertCode(() => verifyDev(pki.bad.forgedTrustDomain, spokeBundle.x509Bundle), X509ErrorCode.Untrusted);
  });

  it('rejects the forged SVID with ERR_X509_UNTRUSTED against a set holding only the spoke bundle', () => {
    assertCode(
      () => verifyDev(pki.bad.forgedTrustDomain, new BundleSet([spokeBundle])),
      X509ErrorCode.Untrusted,
    );
  });

  it('never accepts the forged SVID even when its chain carries the hub root itself', () => {
    const [leaf] = chainOf(pki.bad.forgedTrustDomain);
    const forged = [required(leaf, 'leaf'), hubRoot];
    assertCode(() => verifyX509Svid(forged, bundles, NOW), X509ErrorCode.WrongTrustDomain);
    assertCode(() => verifyX509Svid(forged, spokeBundle.x509Bundle, NOW), X509ErrorCode.Untrusted);
    assertCode(
      () => verifyX509Svid([...forged, spokeIntermediate, spokeRoot], bundles, NOW),
      X509ErrorCode.WrongTrustDomain,
    );
  });

  it('never accepts a spoke ID signed by a hub intermediate, whatever the chain carries', async () => {
    const intermediate = await hubIntermediate({ uris: ['spiffe://hub.example.org'] });
    const leaf = await makeLeaf({
      subject: 'O=test, CN=forged',
      uris: ['spiffe://spoke.example.org/ns/ops/sa/debugger'],
      ...VALID(),
      issuer: intermediate,
    });
    const chain = [leaf.node, intermediate.node, hubRoot, spokeIntermediate];
    assertCode(() => verifyX509Svid(chain, bundles, NOW), X509ErrorCode.WrongTrustDomain);
    assertCode(() => verifyX509Svid(chain, spokeBundle, NOW), X509ErrorCode.Untrusted);
  });

  it('rejects a good spoke SVID with ERR_X509_NO_BUNDLE when only the hub X509Bundle is given', () => {
    assertCode(() => verifyDev(pki.good.clientSpoke, hubBundle.x509Bundle), X509ErrorCode.NoBundle);
  });
});

describe('verifyX509Svid without a bundle for the leaf trust domain', () => {
  it("rejects with ERR_X509_NO_BUNDLE when the set lacks the leaf's trust domain", () => {
    assertCode(() => verifyDev(pki.good.clientSpoke, bundles.without(spokeTd)), X509ErrorCode.NoBundle);
  });

  it("rejects with ERR_X509_NO_BUNDLE when the leaf's trust domain has an empty bundle", () => {
    const emptySpoke = bundles.with(new SpiffeBundle(spokeTd));
    assertCode(() => verifyDev(pki.good.clientSpoke, emptySpoke), X509ErrorCode.NoBundle);
    assertCode(() => verifyDev(pki.good.clientSpoke, new X509Bundle(spokeTd, [])), X509ErrorCode.NoBundle);
  });

  it('rejects with ERR_X509_NO_BUNDLE against an empty set', () => {
    assertCode(() => verifyDev(pki.good.clientArgocd, new BundleSet()), X509ErrorCode.NoBundle);
  });

  it('verifies once the missing bundle is added back', () => {
    const restored = bundles.without(spokeTd).with(spokeBundle);
    assert.equal(verifyDev(pki.good.clientSpoke, restored).id.toString(), pki.good.clientSpoke.spiffeId);
  });
});

describe('verifyX509Svid validity periods', () => {
  it('verifies a good SVID exactly at its notBefore and exactly at its notAfter', () => {
    const [leaf] = chainOf(pki.good.clientArgocd);
    const { validFromDate, validToDate } = required(leaf, 'leaf');
    assert.equal(
      verifyDev(pki.good.clientArgocd, bundles, validFromDate).id.toString(),
      pki.good.clientArgocd.spiffeId,
    );
    assert.equal(
      verifyDev(pki.good.clientArgocd, bundles, validToDate).id.toString(),
      pki.good.clientArgocd.spiffeId,
    );
  });

  it('rejects a good SVID verified after its notAfter with ERR_X509_EXPIRED', () => {
    assertCode(() => verifyDev(pki.good.clientArgocd, bundles, at(HOUR + SECOND)), X509ErrorCode.Expired);
    assertCode(() => verifyDev(pki.good.clientSpoke, bundles, at(2 * HOUR)), X509ErrorCode.Expired);
  });

  it('rejects a good SVID verified before its notBefore with ERR_X509_NOT_YET_VALID', () => {
    assertCode(
      () => verifyDev(pki.good.clientArgocd, bundles, at(-5 * MINUTE - SECOND)),
      X509ErrorCode.NotYetValid,
    );
    assertCode(() => verifyDev(pki.good.clientSpoke, bundles, at(-10 * MINUTE)), X509ErrorCode.NotYetValid);
  });

  it('accepts the expired and not-yet-valid dev SVIDs at a time inside their validity periods', () => {
    // expired: now-2h … now-1h; the hub root starts at now-1h, so now-1h is the one shared instant.
    assert.equal(verifyDev(pki.bad.expired, bundles, at(-HOUR)).id.toString(), pki.bad.expired.spiffeId);
    assert.equal(
      verifyDev(pki.bad.notYetValid, bundles, at(90 * MINUTE)).id.toString(),
      pki.bad.notYetValid.spiffeId,
    );
  });

  it('rejects a still-valid leaf whose intermediate has expired with ERR_X509_EXPIRED', async () => {
    // The spoke intermediate lasts 30 days; this leaf lasts 60.
    const leaf = await makeLeaf({
      subject: 'O=test, CN=long-lived',
      uris: ['spiffe://spoke.example.org/ns/test/sa/long-lived'],
      notBefore: at(-5 * MINUTE),
      notAfter: at(60 * DAY),
      issuer: spokeIssuer,
    });
    const chain = [leaf.node, spokeIntermediate];
    assert.equal(
      verifyX509Svid(chain, bundles, at(29 * DAY)).id.toString(),
      'spiffe://spoke.example.org/ns/test/sa/long-lived',
    );
    assertCode(() => verifyX509Svid(chain, bundles, at(31 * DAY)), X509ErrorCode.Expired);
  });

  it('rejects a valid leaf whose intermediate is not yet valid with ERR_X509_NOT_YET_VALID', async () => {
    // The spoke intermediate starts at now-1h; this leaf at now-2h.
    const leaf = await makeLeaf({
      subject: 'O=test, CN=early',
      uris: ['spiffe://spoke.example.org/ns/test/sa/early'],
      notBefore: at(-2 * HOUR),
      notAfter: at(HOUR),
      issuer: spokeIssuer,
    });
    assertCode(
      () => verifyX509Svid([leaf.node, spokeIntermediate], bundles, at(-90 * MINUTE)),
      X509ErrorCode.NotYetValid,
    );
  });

  it('rejects a still-valid leaf whose root has expired with ERR_X509_EXPIRED', async () => {
    // The hub root lasts 365 days; this leaf lasts 400.
    const leaf = await hubLeaf(hubIssuer, { notBefore: at(-5 * MINUTE), notAfter: at(400 * DAY) });
    assert.ok(verifyX509Svid([leaf.node], bundles, at(364 * DAY)));
    assertCode(() => verifyX509Svid([leaf.node], bundles, at(366 * DAY)), X509ErrorCode.Expired);
  });

  it('refuses to verify at an invalid Date (RangeError) instead of skipping every validity check', () => {
    assert.throws(() => verifyDev(pki.bad.expired, bundles, new Date(Number.NaN)), RangeError);
  });
});

describe('verifyX509Svid signing-certificate rules (custom chains)', () => {
  it('verifies a hub leaf through a well-formed custom intermediate carrying the bare trust domain ID', async () => {
    const intermediate = await hubIntermediate({ uris: ['spiffe://hub.example.org'] });
    const leaf = await hubLeaf(intermediate);
    const result = verifyX509Svid([leaf.node, intermediate.node], bundles, NOW);
    assert.equal(result.id.toString(), 'spiffe://hub.example.org/ns/test/sa/workload');
    assert.equal(result.verifiedChain.length, 3);
  });

  it('rejects an intermediate with cA=false with ERR_X509_SIGNING_NOT_CA', async () => {
    const intermediate = await hubIntermediate({ ca: false });
    const leaf = await hubLeaf(intermediate);
    assertCode(
      () => verifyX509Svid([leaf.node, intermediate.node], bundles, NOW),
      X509ErrorCode.SigningNotCa,
    );
  });

  it('rejects an intermediate whose key usage lacks keyCertSign (OpenSSL refuses it as issuer: ERR_X509_UNTRUSTED)', async () => {
    // OpenSSL's X509_check_issued (behind X509Certificate.checkIssued) already refuses an issuer whose key
    // usage lacks keyCertSign, so no path is built and the signing-certificate rule is never reached.
    const intermediate = await hubIntermediate({ keyUsage: KeyUsage.cRLSign });
    const leaf = await hubLeaf(intermediate);
    assertCode(() => verifyX509Svid([leaf.node, intermediate.node], bundles, NOW), X509ErrorCode.Untrusted);
  });

  it('rejects an intermediate carrying a SPIFFE ID with a path with ERR_X509_SIGNING_ID_HAS_PATH', async () => {
    const intermediate = await hubIntermediate({ uris: ['spiffe://hub.example.org/ca'] });
    const leaf = await hubLeaf(intermediate);
    assertCode(
      () => verifyX509Svid([leaf.node, intermediate.node], bundles, NOW),
      X509ErrorCode.SigningIdHasPath,
    );
  });

  it('rejects an intermediate without a key usage extension (X509-SVID §4.3)', async () => {
    const intermediate = await hubIntermediate({ keyUsage: null });
    const leaf = await hubLeaf(intermediate);
    assertCode(
      () => verifyX509Svid([leaf.node, intermediate.node], bundles, NOW),
      X509ErrorCode.SigningNoKeyCertSign,
    );
  });
});

describe('verifyX509Svid path length', () => {
  async function twoIntermediates(pathLength: number) {
    const a = await hubIntermediate({ subject: 'O=test, CN=intermediate A', pathLength });
    const b = await makeCa({ subject: 'O=test, CN=intermediate B', ...VALID(), issuer: a });
    const leaf = await hubLeaf(b);
    return { a, b, leaf };
  }

  it('rejects root → A (pathLen 0) → B → leaf with ERR_X509_PATH_LENGTH', async () => {
    const { a, b, leaf } = await twoIntermediates(0);
    assertCode(() => verifyX509Svid([leaf.node, b.node, a.node], bundles, NOW), X509ErrorCode.PathLength);
  });

  it('verifies root → A (pathLen 1) → B → leaf', async () => {
    const { a, b, leaf } = await twoIntermediates(1);
    const result = verifyX509Svid([leaf.node, b.node, a.node], bundles, NOW);
    assert.deepEqual(
      result.verifiedChain.map((c) => c.fingerprint256),
      [leaf.node, b.node, a.node, hubRoot].map((c) => c.fingerprint256),
    );
  });

  it('verifies root → A (pathLen 0) → leaf', async () => {
    const a = await hubIntermediate({ pathLength: 0 });
    const leaf = await hubLeaf(a);
    assert.ok(verifyX509Svid([leaf.node, a.node], bundles, NOW));
  });
});

describe('verifyX509Svid name constraints', () => {
  async function constrained(constraints: Parameters<typeof nameConstraints>[0]) {
    const intermediate = await hubIntermediate({ extensions: [nameConstraints(constraints)] });
    const leaf = await hubLeaf(intermediate);
    return () => verifyX509Svid([leaf.node, intermediate.node], bundles, NOW);
  }

  it('verifies a hub leaf under an intermediate permitting the URI host hub.example.org', async () => {
    const verify = await constrained({ permitted: [{ uri: 'hub.example.org' }] });
    assert.equal(verify().id.toString(), 'spiffe://hub.example.org/ns/test/sa/workload');
  });

  it('verifies a hub leaf under an intermediate permitting the URI domain .example.org', async () => {
    const verify = await constrained({ permitted: [{ uri: '.example.org' }] });
    assert.ok(verify());
  });

  it('rejects a hub leaf under an intermediate permitting only other.example.org with ERR_X509_NAME_CONSTRAINTS', async () => {
    const verify = await constrained({ permitted: [{ uri: 'other.example.org' }] });
    assertCode(verify, X509ErrorCode.NameConstraints);
  });

  it('rejects a hub leaf under an intermediate excluding hub.example.org with ERR_X509_NAME_CONSTRAINTS', async () => {
    const verify = await constrained({ excluded: [{ uri: 'hub.example.org' }] });
    assertCode(verify, X509ErrorCode.NameConstraints);
  });

  it('rejects a hub leaf under an intermediate excluding the domain .example.org', async () => {
    const verify = await constrained({ excluded: [{ uri: '.example.org' }] });
    assertCode(verify, X509ErrorCode.NameConstraints);
  });

  it('fails closed on an unsupported directoryName constraint with ERR_X509_NAME_CONSTRAINTS', async () => {
    const verify = await constrained({ permitted: [{ dn: 'O=test' }] });
    assertCode(verify, X509ErrorCode.NameConstraints);
  });

  it('does not apply a DNS-only constraint to the URI SAN', async () => {
    const verify = await constrained({ permitted: [{ dns: 'other.example.org' }] });
    assert.ok(verify());
  });
});

describe('verifyX509Svid critical extensions', () => {
  it('rejects a leaf with an unknown critical extension with ERR_X509_UNHANDLED_CRITICAL_EXTENSION', async () => {
    const leaf = await hubLeaf(hubIssuer, { extensions: [opaqueExtension(UNKNOWN_OID, true)] });
    assertCode(() => verifyX509Svid([leaf.node], bundles, NOW), X509ErrorCode.UnhandledCriticalExtension);
  });

  it('accepts a leaf with the same extension marked non-critical', async () => {
    const leaf = await hubLeaf(hubIssuer, { extensions: [opaqueExtension(UNKNOWN_OID, false)] });
    assert.ok(verifyX509Svid([leaf.node], bundles, NOW));
  });

  it('rejects an intermediate with an unknown critical extension', async () => {
    const intermediate = await hubIntermediate({ extensions: [opaqueExtension(UNKNOWN_OID, true)] });
    const leaf = await hubLeaf(intermediate);
    assertCode(
      () => verifyX509Svid([leaf.node, intermediate.node], bundles, NOW),
      X509ErrorCode.UnhandledCriticalExtension,
    );
  });
});

describe('verifyX509Svid path building', () => {
  it('verifies intermediates presented out of order', async () => {
    const a = await hubIntermediate({ subject: 'O=test, CN=intermediate A', pathLength: 1 });
    const b = await makeCa({ subject: 'O=test, CN=intermediate B', ...VALID(), issuer: a });
    const leaf = await hubLeaf(b);
    const result = verifyX509Svid([leaf.node, a.node, b.node], bundles, NOW);
    assert.deepEqual(
      result.verifiedChain.map((c) => c.fingerprint256),
      [leaf.node, b.node, a.node, hubRoot].map((c) => c.fingerprint256),
    );
  });

  it('verifies a chain that also carries its root and unrelated certificates', () => {
    const [leaf, intermediate] = chainOf(pki.good.clientSpoke);
    const chain = [required(leaf, 'leaf'), hubRoot, spokeRoot, required(intermediate, 'intermediate')];
    const result = verifyX509Svid(chain, bundles, NOW);
    assert.equal(result.id.toString(), pki.good.clientSpoke.spiffeId);
    assert.equal(result.verifiedChain.length, 3);
  });

  it('finds the good path when a decoy intermediate with the same name but another key comes first', async () => {
    const decoy = await hubIntermediate({ subject: 'O=test, CN=shared name' });
    const real = await hubIntermediate({ subject: 'O=test, CN=shared name' });
    const leaf = await hubLeaf(real);
    const result = verifyX509Svid([leaf.node, decoy.node, real.node], bundles, NOW);
    assert.equal(required(result.verifiedChain[1], 'intermediate').fingerprint256, real.node.fingerprint256);
  });

  it('keeps path building polynomial over mutually-issuing rogue CAs', async () => {
    // Six self-signed CAs sharing one name and key: each "issues" every other one.
    const keys = await generateKeys();
    const rogues: TestIssuer[] = [];
    for (let i = 0; i < 6; i++) rogues.push(await makeCa({ subject: 'CN=rogue', ...VALID(), keys }));
    const leaf = await hubLeaf(required(rogues[0], 'rogue'));
    const verify = mock.method(X509Certificate.prototype, 'verify');
    try {
      assertCode(
        () => verifyX509Svid([leaf.node, ...rogues.map((r) => r.node)], bundles, NOW),
        X509ErrorCode.Untrusted,
      );
      // 7 certificates, 8 possible issuers each: a memoizing path builder needs at most 56 signature checks.
      assert.ok(verify.mock.callCount() <= 100, `${verify.mock.callCount()} signature verifications`);
    } finally {
      verify.mock.restore();
    }
  });
});

describe('parseCertificates', () => {
  it('parses a PEM with several CERTIFICATE blocks, in order', () => {
    const certs = parseCertificates(pki.good.clientSpoke.chainPem + pki.spoke.rootPem);
    assert.equal(certs.length, 3);
    assert.equal(required(certs[1], 'intermediate').fingerprint256, spokeIntermediate.fingerprint256);
    assert.equal(required(certs[2], 'root').fingerprint256, spokeRoot.fingerprint256);
  });

  it('parses PEM given as bytes', () => {
    assert.equal(parseCertificates(Buffer.from(pki.good.clientSpoke.chainPem)).length, 2);
  });

  it('parses a single DER certificate', () => {
    const certs = parseCertificates(hubRoot.raw);
    assert.equal(certs.length, 1);
    assert.ok(required(certs[0], 'root').raw.equals(hubRoot.raw));
  });

  it('parses concatenated DER certificates, in order', () => {
    const chain = chainOf(pki.good.proxyServer);
    const certs = parseCertificates(derOf([...chain, spokeRoot]));
    assert.deepEqual(
      certs.map((c) => c.fingerprint256),
      [...chain, spokeRoot].map((c) => c.fingerprint256),
    );
  });

  it('rejects garbage with ERR_X509_PARSE', () => {
    assertCode(() => parseCertificates('not a certificate'), X509ErrorCode.Parse);
    assertCode(() => parseCertificates(new Uint8Array([1, 2, 3, 4])), X509ErrorCode.Parse);
    assertCode(() => parseCertificates(new Uint8Array(0)), X509ErrorCode.Parse);
    assertCode(() => parseCertificates(Buffer.from([0x30, 0x03, 0x02, 0x01, 0x01])), X509ErrorCode.Parse);
  });

  it('rejects a truncated DER certificate with ERR_X509_PARSE', () => {
    assertCode(() => parseCertificates(hubRoot.raw.subarray(0, hubRoot.raw.length - 1)), X509ErrorCode.Parse);
  });

  it('rejects a PEM holding a PRIVATE KEY block instead of a certificate with ERR_X509_PARSE', () => {
    assertCode(() => parseCertificates(pki.good.clientArgocd.keyPem), X509ErrorCode.Parse);
    assertCode(() => parseCertificates(pki.hub.rootPem + pki.hub.rootKeyPem), X509ErrorCode.Parse);
  });

  it('does not echo the key when refusing a PRIVATE KEY block', () => {
    const error = catchSpiffe(() => parseCertificates(pki.good.clientArgocd.keyPem));
    assertNoKeyMaterial(error, pki.good.clientArgocd.keyPem);
  });
});

describe('parseX509Svid', () => {
  it('parses a PEM chain and a PKCS#8 PEM key', () => {
    const spoke = parseX509Svid(pki.good.clientSpoke.chainPem, pki.good.clientSpoke.keyPem);
    assert.equal(spoke.id.toString(), pki.good.clientSpoke.spiffeId);
    assert.equal(spoke.certificates.length, 2);
    assert.equal(spoke.privateKey.type, 'private');
    assert.equal(spoke.hint, undefined);
    const hub = parseX509Svid(pki.good.clientArgocd.chainPem, pki.good.clientArgocd.keyPem);
    assert.equal(hub.id.toString(), pki.good.clientArgocd.spiffeId);
    assert.equal(hub.certificates.length, 1);
  });

  it('parses a concatenated DER chain and a DER PKCS#8 key', () => {
    const identity = pki.good.proxyServer;
    const der = derOf(chainOf(identity));
    const key = createPrivateKey(identity.keyPem).export({ format: 'der', type: 'pkcs8' });
    const svid = parseX509Svid(der, key);
    assert.equal(svid.id.toString(), identity.spiffeId);
    assert.equal(svid.certificates.length, 2);
    assert.ok(required(svid.certificates[0], 'leaf').checkPrivateKey(svid.privateKey));
  });

  it('parses a PEM key given as bytes', () => {
    const identity = pki.good.clientFlux;
    assert.equal(
      parseX509Svid(identity.chainPem, Buffer.from(identity.keyPem)).id.toString(),
      identity.spiffeId,
    );
  });

  it('keeps the Workload API hint', () => {
    const svid = parseX509Svid(pki.good.clientFlux.chainPem, pki.good.clientFlux.keyPem, 'internal');
    assert.equal(svid.hint, 'internal');
  });

  it('yields an SVID whose chain verifies', () => {
    const svid = parseX509Svid(pki.good.clientSpoke.chainPem, pki.good.clientSpoke.keyPem);
    assert.ok(verifyX509Svid(svid.certificates, bundles, NOW).id.equals(svid.id));
  });

  it('rejects the key of another SVID with ERR_X509_KEY_MISMATCH', () => {
    assertCode(
      () => parseX509Svid(pki.good.clientArgocd.chainPem, pki.good.clientFlux.keyPem),
      X509ErrorCode.KeyMismatch,
    );
  });

  it('rejects a SEC1 "EC PRIVATE KEY" PEM with ERR_X509_KEY_PARSE', () => {
    const sec1 = createPrivateKey(pki.good.clientArgocd.keyPem).export({ format: 'pem', type: 'sec1' });
    assert.match(sec1.toString(), /BEGIN EC PRIVATE KEY/);
    assertCode(() => parseX509Svid(pki.good.clientArgocd.chainPem, sec1), X509ErrorCode.KeyParse);
  });

  it('rejects an encrypted PKCS#8 key (PEM or DER) with ERR_X509_KEY_PARSE', () => {
    const key = createPrivateKey(pki.good.clientArgocd.keyPem);
    const pem = key.export({ format: 'pem', type: 'pkcs8', cipher: 'aes-256-cbc', passphrase: 'x' });
    const der = key.export({ format: 'der', type: 'pkcs8', cipher: 'aes-256-cbc', passphrase: 'x' });
    assertCode(() => parseX509Svid(pki.good.clientArgocd.chainPem, pem), X509ErrorCode.KeyParse);
    assertCode(() => parseX509Svid(pki.good.clientArgocd.chainPem, der), X509ErrorCode.KeyParse);
  });

  it('rejects a corrupted PKCS#8 key with ERR_X509_KEY_PARSE', () => {
    const body = pemBody(pki.good.clientArgocd.keyPem);
    const corrupted = `-----BEGIN PRIVATE KEY-----\n${body.slice(0, 40)}\n-----END PRIVATE KEY-----\n`;
    assertCode(() => parsePrivateKey(corrupted), X509ErrorCode.KeyParse);
    assertCode(() => parsePrivateKey(new Uint8Array([0x30, 0x03, 0x02, 0x01, 0x00])), X509ErrorCode.KeyParse);
  });

  it("never puts the key's base64 body in a key error message", () => {
    const identity = pki.good.clientArgocd;
    const key = createPrivateKey(identity.keyPem);
    const sec1 = key.export({ format: 'pem', type: 'sec1' }).toString();
    const encrypted = key
      .export({ format: 'pem', type: 'pkcs8', cipher: 'aes-256-cbc', passphrase: 'x' })
      .toString();
    const body = pemBody(identity.keyPem);
    const corrupted = `-----BEGIN PRIVATE KEY-----\n${body.slice(0, body.length - 8)}\n-----END PRIVATE KEY-----\n`;
    const cases: [string, string][] = [
      [pki.good.clientFlux.keyPem, pki.good.clientFlux.keyPem],
      [sec1, sec1],
      [encrypted, encrypted],
      [corrupted, corrupted],
    ];
    for (const [keyInput, keyPem] of cases) {
      const error = catchSpiffe(() => parseX509Svid(identity.chainPem, keyInput));
      assert.ok(
        error.code === X509ErrorCode.KeyParse || error.code === X509ErrorCode.KeyMismatch,
        error.code,
      );
      assertNoKeyMaterial(error, keyPem);
    }
  });

  for (const name of LEAF_RULE_BAD) {
    it(`rejects the bad leaf ${name} with ${BAD_CODES[name]}, as verification does`, () => {
      const identity = pki.bad[name];
      assertCode(() => parseX509Svid(identity.chainPem, identity.keyPem), BAD_CODES[name]);
    });
  }

  for (const name of TRUST_OR_TIME_BAD) {
    it(`parses the bad SVID ${name}: time and trust are for verifyX509Svid to check`, () => {
      const identity = pki.bad[name];
      assert.equal(parseX509Svid(identity.chainPem, identity.keyPem).id.toString(), identity.spiffeId);
    });
  }

  it('checks the leaf rules before the key: a bad leaf with a foreign key still names the leaf rule', () => {
    assertCode(
      () => parseX509Svid(pki.bad.leafIsCa.chainPem, pki.good.clientFlux.keyPem),
      X509ErrorCode.LeafCa,
    );
  });

  it('rejects an intermediate with cA=false with ERR_X509_SIGNING_NOT_CA', async () => {
    const intermediate = await hubIntermediate({ ca: false });
    const leaf = await hubLeaf(intermediate);
    assertCode(
      () => parseX509Svid(pemOf([leaf.node, intermediate.node]), leaf.keyPem),
      X509ErrorCode.SigningNotCa,
    );
  });

  it('rejects an intermediate whose key usage lacks keyCertSign with ERR_X509_SIGNING_NO_KEY_CERT_SIGN', async () => {
    const intermediate = await hubIntermediate({ keyUsage: KeyUsage.cRLSign });
    const leaf = await hubLeaf(intermediate);
    assertCode(
      () => parseX509Svid(pemOf([leaf.node, intermediate.node]), leaf.keyPem),
      X509ErrorCode.SigningNoKeyCertSign,
    );
  });

  it('rejects an intermediate carrying a SPIFFE ID with a path with ERR_X509_SIGNING_ID_HAS_PATH', async () => {
    const intermediate = await hubIntermediate({ uris: ['spiffe://hub.example.org/ca'] });
    const leaf = await hubLeaf(intermediate);
    assertCode(
      () => parseX509Svid(pemOf([leaf.node, intermediate.node]), leaf.keyPem),
      X509ErrorCode.SigningIdHasPath,
    );
  });

  it('rejects a chain that is not certificates with ERR_X509_PARSE', () => {
    assertCode(() => parseX509Svid('garbage', pki.good.clientFlux.keyPem), X509ErrorCode.Parse);
    assertCode(
      () => parseX509Svid(pki.good.clientFlux.keyPem, pki.good.clientFlux.keyPem),
      X509ErrorCode.Parse,
    );
  });
});

describe('authorizers', () => {
  let argocd: VerifiedX509Svid;
  let flux: VerifiedX509Svid;
  let spoke: VerifiedX509Svid;

  before(() => {
    argocd = verifyDev(pki.good.clientArgocd);
    flux = verifyDev(pki.good.clientFlux);
    spoke = verifyDev(pki.good.clientSpoke);
  });

  it('authorizeAny allows every authenticated SPIFFE ID', () => {
    const authorize = authorizeAny();
    for (const peer of [argocd, flux, spoke]) authorize(peer.id, peer.verifiedChain);
  });

  it('authorizeId allows exactly its ID', () => {
    authorizeId(SpiffeId.parse(required(pki.good.clientArgocd.spiffeId, 'id')))(
      argocd.id,
      argocd.verifiedChain,
    );
  });

  it('authorizeId refuses any other ID with ERR_AUTHZ_UNAUTHORIZED', () => {
    const authorize = authorizeId(argocd.id);
    assertCode(() => authorize(flux.id, flux.verifiedChain), AuthzErrorCode.Unauthorized);
    assertCode(() => authorize(spoke.id, spoke.verifiedChain), AuthzErrorCode.Unauthorized);
    const sameTdOtherPath = SpiffeId.parse(`${argocd.id.toString()}-other`);
    assertCode(() => authorize(sameTdOtherPath, argocd.verifiedChain), AuthzErrorCode.Unauthorized);
    const sameIdOtherTd = SpiffeId.fromPath(spokeTd, argocd.id.path);
    assertCode(() => authorize(sameIdOtherTd, argocd.verifiedChain), AuthzErrorCode.Unauthorized);
  });

  it('authorizeOneOf allows each listed ID', () => {
    const authorize = authorizeOneOf(argocd.id, spoke.id);
    authorize(argocd.id, argocd.verifiedChain);
    authorize(spoke.id, spoke.verifiedChain);
  });

  it('authorizeOneOf refuses an unlisted ID with ERR_AUTHZ_UNAUTHORIZED', () => {
    assertCode(
      () => authorizeOneOf(argocd.id, spoke.id)(flux.id, flux.verifiedChain),
      AuthzErrorCode.Unauthorized,
    );
  });

  it('authorizeOneOf with no IDs refuses everyone', () => {
    const authorize = authorizeOneOf();
    for (const peer of [argocd, flux, spoke]) {
      assertCode(() => authorize(peer.id, peer.verifiedChain), AuthzErrorCode.Unauthorized);
    }
  });

  it('authorizeMemberOf allows every ID of its trust domain', () => {
    const authorize = authorizeMemberOf(hubTd);
    authorize(argocd.id, argocd.verifiedChain);
    authorize(flux.id, flux.verifiedChain);
    authorizeMemberOf(spokeTd)(spoke.id, spoke.verifiedChain);
  });

  it('authorizeMemberOf refuses an ID of another trust domain with ERR_AUTHZ_UNAUTHORIZED', () => {
    assertCode(() => authorizeMemberOf(hubTd)(spoke.id, spoke.verifiedChain), AuthzErrorCode.Unauthorized);
    assertCode(
      () => authorizeMemberOf(spokeTd)(argocd.id, argocd.verifiedChain),
      AuthzErrorCode.Unauthorized,
    );
  });

  it('authorizeMemberOf does not confuse a trust domain with a longer name sharing its prefix', () => {
    const lookalike = SpiffeId.parse('spiffe://hub.example.org.evil/ns/argocd/sa/x');
    assertCode(() => authorizeMemberOf(hubTd)(lookalike, argocd.verifiedChain), AuthzErrorCode.Unauthorized);
  });
});
