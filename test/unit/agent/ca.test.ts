// Must stay first: @peculiar/x509 (used by the dev PKI, the cert helpers and the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { webcrypto, type X509Certificate } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import { DAY, HOUR, importIssuer, makeCa } from '../../../dev/certs.ts';
import {
  BACKDATE_SECONDS,
  type CaSlot,
  LocalCa,
  type LocalCaOptions,
  loadUpstreamAuthority,
  type SignedX509Svid,
  type UpstreamFiles,
} from '../../../src/agent/ca.ts';
import { AgentErrorCode, isAgentError } from '../../../src/agent/errors.ts';
import { generateKeyPair, type KeyType, x509 } from '../../../src/agent/keys.ts';
import type { SpiffeBundle } from '../../../src/spiffe/bundle.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import { mintJwtSvid, verifyJwtSvid } from '../../../src/spiffe/jwtsvid.ts';
import { verifyX509Svid } from '../../../src/spiffe/x509svid.ts';

/** A whole second, so that certificate times (second resolution) equal the computed ones exactly. */
const T0 = Date.UTC(2030, 0, 1, 12, 0, 0);
const SECOND = 1000;
const td = TrustDomain.parse('example.org');

/** A mutable clock to inject as `now`. */
interface Clock {
  ms: number;
  readonly now: () => Date;
}

function clockAt(ms: number): Clock {
  const clock: Clock = { ms, now: () => new Date(clock.ms) };
  return clock;
}

async function signFor(
  ca: LocalCa,
  path: string,
  options: { ttlSeconds?: number; dnsNames?: readonly string[]; keyType?: KeyType } = {},
): Promise<SignedX509Svid> {
  const keys = await generateKeyPair(options.keyType ?? 'ec-p256');
  return ca.signX509Svid({
    id: SpiffeId.fromPath(ca.trustDomain, path),
    publicKey: keys.publicKey,
    ttlSeconds: options.ttlSeconds ?? 30,
    ...(options.dnsNames === undefined ? {} : { dnsNames: options.dnsNames }),
  });
}

function peculiar(cert: X509Certificate): x509.X509Certificate {
  return new x509.X509Certificate(cert.raw);
}

function fingerprints(certs: readonly X509Certificate[]): string[] {
  return certs.map((c) => c.fingerprint256);
}

function kids(bundle: SpiffeBundle): string[] {
  return [...bundle.jwtAuthorities.keys()].sort();
}

function isSelfSigned(cert: X509Certificate): boolean {
  return cert.checkIssued(cert) && cert.verify(cert.publicKey);
}

function issuedBy(child: X509Certificate, parent: X509Certificate): boolean {
  return child.checkIssued(parent) && child.verify(parent.publicKey);
}

/** The trust anchor that `verifyX509Svid` ended the path at. */
function anchorOf(svid: SignedX509Svid, bundle: SpiffeBundle, at: number): X509Certificate {
  const verified = verifyX509Svid(svid.certificates, bundle, new Date(at));
  return verified.verifiedChain.at(-1) as X509Certificate;
}

describe('LocalCa.create', () => {
  it('publishes a first bundle (sequence 1) with one self-signed X.509 CA and one JWT key', async () => {
    const ca = await LocalCa.create({ trustDomain: td, now: clockAt(T0).now });
    const { bundle, active } = ca;

    assert.equal(bundle.sequence, 1n);
    assert.ok(bundle.trustDomain.equals(td));
    assert.equal(active.generation, 1);
    assert.equal(ca.next, undefined);

    assert.equal(bundle.x509Authorities.length, 1);
    const root = bundle.x509Authorities[0] as X509Certificate;
    assert.equal(root.fingerprint256, active.certificate.fingerprint256);
    assert.ok(isSelfSigned(root));
    assert.equal(root.ca, true);
    const usages = peculiar(root).getExtension(x509.KeyUsagesExtension)?.usages ?? 0;
    assert.ok(usages & x509.KeyUsageFlags.keyCertSign, 'keyCertSign');
    assert.equal(root.subjectAltName, 'URI:spiffe://example.org');
    assert.deepEqual(active.intermediates, []);

    assert.equal(bundle.jwtAuthorities.size, 1);
    assert.ok(active.jwtAuthority.kid.length > 0);
    assert.deepEqual(kids(bundle), [active.jwtAuthority.kid]);
    assert.equal(ca.jwtSigner().signer.kid, active.jwtAuthority.kid);
  });

  it('backdates the CA and gives it caTtlSeconds of life', async () => {
    const ca = await LocalCa.create({ trustDomain: td, now: clockAt(T0).now, caTtlSeconds: 600 });
    assert.equal(ca.active.notBefore.getTime(), T0 - BACKDATE_SECONDS * SECOND);
    assert.equal(ca.active.notAfter.getTime(), T0 + 600 * SECOND);
    assert.equal(new Date(ca.active.certificate.validTo).getTime(), T0 + 600 * SECOND);
    assert.equal(ca.jwtSigner().notAfter.getTime(), T0 + 600 * SECOND);
  });

  for (const caTtlSeconds of [5, 0, -1, Number.NaN]) {
    it(`refuses caTtlSeconds ${caTtlSeconds} (under 6 s) with a RangeError`, async () => {
      await assert.rejects(LocalCa.create({ trustDomain: td, caTtlSeconds }), RangeError);
    });
  }

  it('accepts exactly 6 s', async () => {
    const ca = await LocalCa.create({ trustDomain: td, caTtlSeconds: 6, now: clockAt(T0).now });
    assert.equal(ca.caTtlSeconds, 6);
  });
});

describe('LocalCa rotation (60 s CA, injected clock)', () => {
  interface Rotating {
    ca: LocalCa;
    clock: Clock;
    first: CaSlot;
    bundles: SpiffeBundle[];
    activated: CaSlot[];
    /** When the first CA's successor is published, and when it takes over. */
    prepareAt: number;
    activateAt: number;
  }

  async function rotating(options: Partial<LocalCaOptions> = {}): Promise<Rotating> {
    const clock = clockAt(T0);
    const ca = await LocalCa.create({ trustDomain: td, caTtlSeconds: 60, now: clock.now, ...options });
    const first = ca.active;
    const start = first.issuedAt.getTime();
    const life = first.notAfter.getTime() - start;
    const bundles: SpiffeBundle[] = [];
    const activated: CaSlot[] = [];
    ca.on('bundle', (b) => bundles.push(b));
    ca.on('activated', (s) => activated.push(s));
    return {
      ca,
      clock,
      first,
      bundles,
      activated,
      // Whole milliseconds: the clock cannot show a fraction of one.
      prepareAt: Math.ceil(start + life / 2),
      activateAt: Math.ceil(start + (life * 5) / 6),
    };
  }

  async function tickAt(r: Rotating, ms: number): Promise<void> {
    r.clock.ms = ms;
    await r.ca.tick();
  }

  it('after a late wake-up, announces the next CA first and lets it sign only after a propagation window', async () => {
    const r = await rotating();
    // The host slept through both half-life and five sixths: 55 of 60 s have passed.
    const late = r.first.issuedAt.getTime() + 55 * SECOND;
    await tickAt(r, late);
    const next = r.ca.next as CaSlot;
    assert.equal(next.generation, 2, 'announced');
    assert.equal(r.ca.active, r.first, 'but not signing in the same tick');
    // The window is half of what the old CA has left (5 s → 2.5 s), since a third of a life no longer fits.
    await tickAt(r, late + 2500 - 1);
    assert.equal(r.ca.active, r.first);
    await tickAt(r, late + 2500);
    assert.equal(r.ca.active.generation, 2);
    assert.deepEqual(
      r.activated.map((slot) => slot.generation),
      [2],
    );
  });

  it('changes nothing before half the CA life', async () => {
    const r = await rotating();
    const before = r.ca.bundle;
    await tickAt(r, T0);
    await tickAt(r, r.prepareAt - 1);
    assert.equal(r.ca.bundle, before);
    assert.equal(r.ca.bundle.sequence, 1n);
    assert.equal(r.ca.next, undefined);
    assert.equal(r.ca.active, r.first);
    assert.deepEqual(r.bundles, []);
    assert.deepEqual(r.activated, []);
  });

  it('at half-life publishes the next CA but keeps signing with the first', async () => {
    const r = await rotating();
    await tickAt(r, r.prepareAt);

    const next = r.ca.next;
    assert.ok(next !== undefined);
    assert.equal(next.generation, 2);
    const bundle = r.ca.bundle;
    assert.equal(bundle.sequence, 2n);
    assert.deepEqual(fingerprints(bundle.x509Authorities), [
      r.first.certificate.fingerprint256,
      next.certificate.fingerprint256,
    ]);
    assert.deepEqual(kids(bundle), [r.first.jwtAuthority.kid, next.jwtAuthority.kid].sort());
    assert.deepEqual(r.bundles, [bundle]);
    assert.deepEqual(r.activated, []);

    assert.equal(r.ca.active, r.first);
    assert.equal(r.ca.jwtSigner().signer.kid, r.first.jwtAuthority.kid);
    const svid = await signFor(r.ca, '/after-prepare');
    assert.equal(svid.generation, 1);
    assert.equal(anchorOf(svid, bundle, r.clock.ms).fingerprint256, r.first.certificate.fingerprint256);

    // A second tick at the same instant prepares nothing more.
    await tickAt(r, r.prepareAt);
    assert.equal(r.ca.bundle, bundle);
    assert.equal(r.ca.next, next);
  });

  it('at five sixths activates the next CA, and new SVIDs chain to it', async () => {
    const r = await rotating();
    await tickAt(r, r.prepareAt);
    const next = r.ca.next as CaSlot;
    await tickAt(r, r.activateAt - 1);
    assert.equal(r.ca.active, r.first);
    assert.deepEqual(r.activated, []);

    await tickAt(r, r.activateAt);
    assert.deepEqual(r.activated, [next]);
    assert.equal(r.ca.active, next);
    assert.equal(r.ca.next, undefined);
    assert.equal(r.ca.jwtSigner().signer.kid, next.jwtAuthority.kid);
    // The retired CA stays published: the bundle still holds both, under a new sequence.
    const bundle = r.ca.bundle;
    assert.equal(bundle.sequence, 3n);
    assert.deepEqual(fingerprints(bundle.x509Authorities), [
      r.first.certificate.fingerprint256,
      next.certificate.fingerprint256,
    ]);
    assert.equal(bundle.jwtAuthorities.size, 2);

    const svid = await signFor(r.ca, '/after-activate');
    assert.equal(svid.generation, 2);
    assert.equal(anchorOf(svid, bundle, r.clock.ms).fingerprint256, next.certificate.fingerprint256);
  });

  it('keeps SVIDs signed by the retired CA verifiable against the current bundle', async () => {
    const r = await rotating();
    await tickAt(r, r.prepareAt);
    r.clock.ms = r.activateAt - 1;
    const old = await signFor(r.ca, '/old', { ttlSeconds: 3600 });
    assert.equal(old.generation, 1);
    // Never outlives the CA that signed it.
    assert.equal(old.notAfter.getTime(), r.first.notAfter.getTime());

    await tickAt(r, r.activateAt);
    assert.equal(r.ca.active.generation, 2);
    const verified = verifyX509Svid(old.certificates, r.ca.bundle, new Date(r.clock.ms));
    assert.equal(verified.id.toString(), 'spiffe://example.org/old');
    assert.equal(
      (verified.verifiedChain.at(-1) as X509Certificate).fingerprint256,
      r.first.certificate.fingerprint256,
    );
    // Still fine a moment before the retired CA expires.
    r.clock.ms = r.first.notAfter.getTime() - SECOND;
    await r.ca.tick();
    assert.doesNotThrow(() => verifyX509Svid(old.certificates, r.ca.bundle, new Date(r.clock.ms)));
  });

  it('prunes the retired CA and its JWT key once it expires', async () => {
    const r = await rotating();
    await tickAt(r, r.prepareAt);
    await tickAt(r, r.activateAt);
    const second = r.ca.active;
    // Just before the first CA expires it is still published, beside the second.
    await tickAt(r, r.first.notAfter.getTime() - 1);
    const beforePrune = r.ca.bundle;
    assert.equal(beforePrune.x509Authorities.length, 2);
    assert.equal(beforePrune.jwtAuthorities.size, 2);
    // The second CA was minted at the first's half-life, so its own half-life falls on the first's expiry:
    // that one tick prunes the first CA and announces a third, in a single republish.
    await tickAt(r, r.first.notAfter.getTime());
    const third = r.ca.next as CaSlot;
    assert.equal(third.generation, 3);
    const after = r.ca.bundle;
    assert.equal(after.sequence, (beforePrune.sequence as bigint) + 1n);
    assert.deepEqual(fingerprints(after.x509Authorities), [
      second.certificate.fingerprint256,
      third.certificate.fingerprint256,
    ]);
    assert.deepEqual(kids(after), [second.jwtAuthority.kid, third.jwtAuthority.kid].sort());
    assert.equal(after.jwtAuthorities.has(r.first.jwtAuthority.kid), false);
    assert.equal(r.bundles.at(-1), after);
  });

  it('does nothing on tick once closed', async () => {
    const r = await rotating();
    r.ca.close();
    await tickAt(r, r.activateAt);
    assert.equal(r.ca.active, r.first);
    assert.equal(r.ca.next, undefined);
    assert.deepEqual(r.bundles, []);
  });
});

describe('LocalCa.signX509Svid', () => {
  let ca: LocalCa;
  before(async () => {
    ca = await LocalCa.create({ trustDomain: td, now: clockAt(T0).now });
  });

  it('issues a leaf with the URI SAN then the DNS names, not a CA, for TLS client and server', async () => {
    const svid = await signFor(ca, '/web', { dnsNames: ['web.example.org', 'localhost'], ttlSeconds: 600 });
    assert.equal(svid.certificates.length, 1);
    const leaf = svid.certificates[0] as X509Certificate;
    const cert = peculiar(leaf);
    assert.deepEqual(cert.getExtension(x509.SubjectAlternativeNameExtension)?.names.toJSON(), [
      { type: 'url', value: 'spiffe://example.org/web' },
      { type: 'dns', value: 'web.example.org' },
      { type: 'dns', value: 'localhost' },
    ]);
    assert.equal(leaf.ca, false);
    assert.equal(cert.getExtension(x509.BasicConstraintsExtension)?.ca, false);
    assert.equal(cert.getExtension(x509.KeyUsagesExtension)?.usages, x509.KeyUsageFlags.digitalSignature);
    assert.deepEqual(
      [...(cert.getExtension(x509.ExtendedKeyUsageExtension)?.usages ?? [])],
      [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth],
    );
    assert.ok(issuedBy(leaf, ca.active.certificate));
    assert.equal(svid.generation, 1);
  });

  it('carries exactly one SAN, the URI, when no DNS names are given', async () => {
    const svid = await signFor(ca, '/ns/app/sa/api');
    const cert = peculiar(svid.certificates[0] as X509Certificate);
    assert.deepEqual(cert.getExtension(x509.SubjectAlternativeNameExtension)?.names.toJSON(), [
      { type: 'url', value: 'spiffe://example.org/ns/app/sa/api' },
    ]);
  });

  it('adds keyEncipherment for an RSA leaf key', async () => {
    const svid = await signFor(ca, '/rsa', { keyType: 'rsa-2048' });
    const cert = peculiar(svid.certificates[0] as X509Certificate);
    assert.equal(
      cert.getExtension(x509.KeyUsagesExtension)?.usages,
      x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment,
    );
    assert.doesNotThrow(() => verifyX509Svid(svid.certificates, ca.bundle, new Date(T0)));
  });

  it('is valid from now (backdated) until now + ttl', async () => {
    const svid = await signFor(ca, '/ttl', { ttlSeconds: 600 });
    const leaf = svid.certificates[0] as X509Certificate;
    assert.equal(svid.notBefore.getTime(), T0 - BACKDATE_SECONDS * SECOND);
    assert.equal(svid.notAfter.getTime(), T0 + 600 * SECOND);
    assert.equal(new Date(leaf.validFrom).getTime(), svid.notBefore.getTime());
    assert.equal(new Date(leaf.validTo).getTime(), svid.notAfter.getTime());
  });

  it('never outlives the CA: notAfter is capped at the CA notAfter', async () => {
    const svid = await signFor(ca, '/long', { ttlSeconds: 10 * 24 * 3600 });
    assert.equal(svid.notAfter.getTime(), ca.active.notAfter.getTime());
    assert.equal(
      new Date((svid.certificates[0] as X509Certificate).validTo).getTime(),
      svid.notAfter.getTime(),
    );
  });

  it('verifies with verifyX509Svid against the CA bundle', async () => {
    const svid = await signFor(ca, '/verified', { dnsNames: ['a.example.org'] });
    const verified = verifyX509Svid(svid.certificates, ca.bundle, new Date(T0));
    assert.equal(verified.id.toString(), 'spiffe://example.org/verified');
    assert.deepEqual(fingerprints(verified.verifiedChain), [
      (svid.certificates[0] as X509Certificate).fingerprint256,
      ca.active.certificate.fingerprint256,
    ]);
  });

  it('gives every leaf a distinct serial', async () => {
    const [a, b] = await Promise.all([signFor(ca, '/a'), signFor(ca, '/a')]);
    assert.notEqual(a.certificates[0]?.serialNumber, b.certificates[0]?.serialNumber);
  });
});

describe('LocalCa key types', () => {
  const cases: { keyType: KeyType; check: (cert: X509Certificate) => void }[] = [
    {
      keyType: 'ec-p384',
      check: (cert) => assert.equal(cert.publicKey.asymmetricKeyDetails?.namedCurve, 'secp384r1'),
    },
    {
      keyType: 'rsa-2048',
      check: (cert) => assert.equal(cert.publicKey.asymmetricKeyDetails?.modulusLength, 2048),
    },
  ];
  for (const { keyType, check } of cases) {
    it(`a ${keyType} CA signs X.509-SVIDs and JWT-SVIDs that verify against its bundle`, async () => {
      const ca = await LocalCa.create({ trustDomain: td, keyType, now: clockAt(T0).now });
      check(ca.active.certificate);
      const svid = await signFor(ca, `/${keyType}`);
      assert.equal(
        verifyX509Svid(svid.certificates, ca.bundle, new Date(T0)).id.toString(),
        `spiffe://example.org/${keyType}`,
      );
      const { signer } = ca.jwtSigner();
      const id = SpiffeId.fromPath(td, '/jwt');
      const jwt = await mintJwtSvid({ id, audience: 'aud', signer, now: new Date(T0) });
      const verified = await verifyJwtSvid(jwt.token, ca.bundle, 'aud', { now: new Date(T0) });
      assert.ok(verified.id.equals(id));
    });
  }
});

describe('LocalCa with an upstream authority (disk)', () => {
  let pki: DevPki;
  let dir: string;
  const spokeTd = TrustDomain.parse('spoke.example.org');
  const hubTd = TrustDomain.parse('hub.example.org');
  /** Files of an organisation intermediate (no path length limit) under the spoke root. */
  let org: UpstreamFiles;
  let orgCert: X509Certificate;
  let spokeRoot: X509Certificate;

  async function write(name: string, content: string): Promise<string> {
    const file = join(dir, name);
    await writeFile(file, content);
    return file;
  }

  async function keyPem(key: webcrypto.CryptoKey): Promise<string> {
    return x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', key), 'PRIVATE KEY');
  }

  before(async () => {
    pki = await makeDevPki({ now: new Date(T0) });
    dir = await mkdtemp(join(tmpdir(), 'ca-test-'));
    const root = await importIssuer(pki.spoke.rootPem, pki.spoke.rootKeyPem);
    spokeRoot = root.node;
    const intermediate = await makeCa({
      subject: 'CN=spoke organisation CA, O=kube-svid-proxy test',
      issuer: root,
      notBefore: new Date(T0 - HOUR),
      notAfter: new Date(T0 + 30 * DAY),
      uris: ['spiffe://spoke.example.org'],
    });
    orgCert = intermediate.node;
    org = {
      certFile: await write('org.crt.pem', intermediate.cert.toString('pem')),
      keyFile: await write('org.key.pem', await keyPem(intermediate.privateKey)),
      bundleFile: await write('spoke-root.pem', pki.spoke.rootPem),
    };
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('loads the signing CA, its key and the roots from bundleFile', async () => {
    const upstream = await loadUpstreamAuthority(org, new Date(T0));
    assert.deepEqual(fingerprints(upstream.certificates), [orgCert.fingerprint256]);
    assert.deepEqual(fingerprints(upstream.roots), [spokeRoot.fingerprint256]);
    assert.ok(orgCert.checkPrivateKey(upstream.privateKey));
  });

  it('makes each CA slot an intermediate signed by upstream and publishes only the upstream roots', async () => {
    const clock = clockAt(T0);
    const upstream = await loadUpstreamAuthority(org, new Date(T0));
    const ca = await LocalCa.create({ trustDomain: spokeTd, upstream, caTtlSeconds: 60, now: clock.now });
    const first = ca.active;
    assert.ok(issuedBy(first.certificate, orgCert));
    assert.equal(isSelfSigned(first.certificate), false);
    assert.equal(first.certificate.ca, true);
    assert.equal(peculiar(first.certificate).getExtension(x509.BasicConstraintsExtension)?.pathLength, 0);
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [spokeRoot.fingerprint256]);
    assert.deepEqual(kids(ca.bundle), [first.jwtAuthority.kid]);

    const svid = await signFor(ca, '/workload', { ttlSeconds: 3600 });
    assert.deepEqual(fingerprints(svid.certificates.slice(1)), [
      first.certificate.fingerprint256,
      orgCert.fingerprint256,
    ]);
    const verified = verifyX509Svid(svid.certificates, ca.bundle, new Date(T0));
    assert.equal(verified.id.toString(), 'spiffe://spoke.example.org/workload');
    assert.equal(verified.verifiedChain.length, 4);
    assert.equal((verified.verifiedChain.at(-1) as X509Certificate).fingerprint256, spokeRoot.fingerprint256);

    // Rotation: the X.509 authorities (upstream roots) stay put, the JWT keys rotate.
    const start = first.issuedAt.getTime();
    const life = first.notAfter.getTime() - start;
    clock.ms = Math.ceil(start + life / 2);
    await ca.tick();
    const next = ca.next as CaSlot;
    assert.equal(ca.bundle.sequence, 2n);
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [spokeRoot.fingerprint256]);
    assert.deepEqual(kids(ca.bundle), [first.jwtAuthority.kid, next.jwtAuthority.kid].sort());
    assert.ok(issuedBy(next.certificate, orgCert));

    clock.ms = Math.ceil(start + (life * 5) / 6);
    await ca.tick();
    assert.equal(ca.active, next);
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [spokeRoot.fingerprint256]);
    const rotated = await signFor(ca, '/workload');
    assert.equal(rotated.generation, 2);
    assert.equal(rotated.certificates[1]?.fingerprint256, next.certificate.fingerprint256);
    assert.doesNotThrow(() => verifyX509Svid(rotated.certificates, ca.bundle, new Date(clock.ms)));
    // The SVID signed before activation still verifies too.
    assert.doesNotThrow(() => verifyX509Svid(svid.certificates, ca.bundle, new Date(clock.ms)));

    clock.ms = first.notAfter.getTime();
    await ca.tick();
    assert.equal(ca.bundle.jwtAuthorities.has(first.jwtAuthority.kid), false);
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [spokeRoot.fingerprint256]);
  });

  it('setUpstream (a SIGHUP re-read): publishes the new roots at once, signs the next CA with the new upstream, and drops the old roots only when no live CA chains to them', async () => {
    const clock = clockAt(T0);
    const ca = await LocalCa.create({
      trustDomain: spokeTd,
      upstream: await loadUpstreamAuthority(org, new Date(T0)),
      caTtlSeconds: 60,
      now: clock.now,
    });
    const hubFiles = {
      certFile: await write('reload-hub-root.crt.pem', pki.hub.rootPem),
      keyFile: await write('reload-hub-root.key.pem', pki.hub.rootKeyPem),
    };
    const hub = await loadUpstreamAuthority(hubFiles, new Date(T0));
    const hubRoot = hub.certificates[0] as X509Certificate;

    assert.equal(ca.setUpstream(await loadUpstreamAuthority(org, new Date(T0))), false, 'the same files');
    assert.equal(ca.bundle.sequence, 1n);
    const first = ca.active;
    assert.equal(ca.setUpstream(hub), true);
    assert.equal(ca.bundle.sequence, 2n);
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [
      spokeRoot.fingerprint256,
      hubRoot.fingerprint256,
    ]);
    assert.equal(ca.active, first, 'the active CA keeps signing');
    assert.ok(issuedBy((await signFor(ca, '/before')).certificates[1] as X509Certificate, orgCert));

    const start = first.issuedAt.getTime();
    const life = first.notAfter.getTime() - start;
    clock.ms = Math.ceil(start + life / 2);
    await ca.tick();
    assert.ok(
      issuedBy((ca.next as CaSlot).certificate, hubRoot),
      'the next CA is signed by the new upstream',
    );
    clock.ms = Math.ceil(start + (life * 5) / 6);
    await ca.tick();
    const rotated = await signFor(ca, '/after');
    assert.equal(
      (
        verifyX509Svid(rotated.certificates, ca.bundle, new Date(clock.ms)).verifiedChain.at(
          -1,
        ) as X509Certificate
      ).fingerprint256,
      hubRoot.fingerprint256,
    );
    // The retired CA still lives, so its root stays published.
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [
      spokeRoot.fingerprint256,
      hubRoot.fingerprint256,
    ]);
    clock.ms = first.notAfter.getTime();
    await ca.tick();
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [hubRoot.fingerprint256]);
  });

  it('setUpstream refuses a self-signed CA (adding an upstream needs a restart)', async () => {
    const ca = await LocalCa.create({ trustDomain: spokeTd, now: clockAt(T0).now });
    const upstream = await loadUpstreamAuthority(org, new Date(T0));
    assert.throws(
      () => ca.setUpstream(upstream),
      (err: unknown) => isAgentError(err, AgentErrorCode.Ca),
    );
  });

  it('caps the CA slot life at the upstream certificate expiry', async () => {
    const root = await importIssuer(pki.spoke.rootPem, pki.spoke.rootKeyPem);
    const shortLived = await makeCa({
      subject: 'CN=short-lived organisation CA',
      issuer: root,
      notBefore: new Date(T0 - HOUR),
      notAfter: new Date(T0 + 30 * SECOND),
    });
    const files = {
      certFile: await write('short.crt.pem', shortLived.cert.toString('pem')),
      keyFile: await write('short.key.pem', await keyPem(shortLived.privateKey)),
      bundleFile: org.bundleFile as string,
    };
    const upstream = await loadUpstreamAuthority(files, new Date(T0));
    const ca = await LocalCa.create({
      trustDomain: spokeTd,
      upstream,
      caTtlSeconds: 60,
      now: clockAt(T0).now,
    });
    assert.equal(ca.active.notAfter.getTime(), T0 + 30 * SECOND);
    const svid = await signFor(ca, '/capped', { ttlSeconds: 3600 });
    assert.equal(svid.notAfter.getTime(), T0 + 30 * SECOND);
  });

  it('accepts a self-signed root without bundleFile and publishes that root', async () => {
    const files = {
      certFile: await write('hub-root.crt.pem', pki.hub.rootPem),
      keyFile: await write('hub-root.key.pem', pki.hub.rootKeyPem),
    };
    const upstream = await loadUpstreamAuthority(files, new Date(T0));
    const hubRoot = upstream.certificates[0] as X509Certificate;
    assert.deepEqual(fingerprints(upstream.roots), [hubRoot.fingerprint256]);

    const ca = await LocalCa.create({ trustDomain: hubTd, upstream, now: clockAt(T0).now });
    assert.ok(issuedBy(ca.active.certificate, hubRoot));
    assert.deepEqual(fingerprints(ca.bundle.x509Authorities), [hubRoot.fingerprint256]);
    const svid = await signFor(ca, '/hub-workload');
    // The root itself is not presented: peers have it in the bundle.
    assert.deepEqual(fingerprints(svid.certificates.slice(1)), [ca.active.certificate.fingerprint256]);
    const verified = verifyX509Svid(svid.certificates, ca.bundle, new Date(T0));
    assert.equal((verified.verifiedChain.at(-1) as X509Certificate).fingerprint256, hubRoot.fingerprint256);
  });

  describe('refuses an unusable upstream with ERR_AGENT_CA naming the file', () => {
    async function assertRefused(files: UpstreamFiles, file: string, part: string, now = T0): Promise<void> {
      await assert.rejects(loadUpstreamAuthority(files, new Date(now)), (err: unknown) => {
        assert.ok(isAgentError(err, AgentErrorCode.Ca), `expected ERR_AGENT_CA, got ${String(err)}`);
        assert.ok(err.message.includes(file), `expected ${file} in: ${err.message}`);
        assert.ok(err.message.includes(part), `expected "${part}" in: ${err.message}`);
        return true;
      });
    }

    it('a missing certificate file', async () => {
      const certFile = join(dir, 'absent.crt.pem');
      await assertRefused({ ...org, certFile }, certFile, 'cannot read');
    });

    it('a missing key file', async () => {
      const keyFile = join(dir, 'absent.key.pem');
      await assertRefused({ ...org, keyFile }, keyFile, 'cannot read');
    });

    it('a missing bundle file', async () => {
      const bundleFile = join(dir, 'absent-bundle.pem');
      await assertRefused({ ...org, bundleFile }, bundleFile, 'cannot read');
    });

    it('a key that does not match the certificate', async () => {
      const keyFile = await write('wrong.key.pem', pki.hub.rootKeyPem);
      await assertRefused({ ...org, keyFile }, keyFile, 'does not match');
    });

    it('a certificate that is not a CA', async () => {
      const leaf = pki.good.clientSpoke;
      const files = {
        certFile: await write('leaf.crt.pem', leaf.chainPem),
        keyFile: await write('leaf.key.pem', leaf.keyPem),
        bundleFile: org.bundleFile as string,
      };
      await assertRefused(files, files.certFile, 'not a CA');
    });

    it('a chain that does not reach a root of bundleFile', async () => {
      const files = {
        certFile: await write('spoke-int.crt.pem', pki.spoke.intermediatePem as string),
        keyFile: await write('spoke-int.key.pem', pki.spoke.intermediateKeyPem as string),
        bundleFile: await write('hub-bundle.pem', pki.hub.rootPem),
      };
      await assertRefused(files, files.certFile, 'not signed by');
    });

    it('a certificate that is not a root, without bundleFile', async () => {
      const files = {
        certFile: await write('spoke-int2.crt.pem', pki.spoke.intermediatePem as string),
        keyFile: await write('spoke-int2.key.pem', pki.spoke.intermediateKeyPem as string),
      };
      await assertRefused(files, files.certFile, 'bundleFile is required');
    });

    it('a CA whose pathLenConstraint 0 forbids it to sign our CA', async () => {
      // The dev PKI's spoke intermediate has pathLen 0: SVIDs under a CA it signed would never verify.
      const files = {
        certFile: await write('spoke-int3.crt.pem', pki.spoke.intermediatePem as string),
        keyFile: await write('spoke-int3.key.pem', pki.spoke.intermediateKeyPem as string),
        bundleFile: org.bundleFile as string,
      };
      await assertRefused(files, files.certFile, 'pathLenConstraint 0, leaving no room');
    });

    it('an expired CA certificate', async () => {
      await assertRefused(org, org.certFile, 'expired', T0 + 31 * DAY);
    });
  });
});
