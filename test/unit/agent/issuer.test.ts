// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { createPrivateKey, type X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { LocalCa } from '../../../src/agent/ca.ts';
import { makeEntry, type RegistrationEntry } from '../../../src/agent/entries.ts';
import { type IssuedX509Svid, SvidIssuer, type SvidIssuerOptions } from '../../../src/agent/issuer.ts';
import { parseSelector } from '../../../src/agent/selectors.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import { verifyJwtSvid } from '../../../src/spiffe/jwtsvid.ts';
import { verifyX509Svid } from '../../../src/spiffe/x509svid.ts';

/** A whole second, so that certificate times (second resolution) equal the computed ones exactly. */
const T0 = Date.UTC(2030, 0, 1, 12, 0, 0);
const SECOND = 1000;
const td = TrustDomain.parse('example.org');

function entry(
  path: string,
  fields: Partial<Omit<RegistrationEntry, 'key' | 'spiffeId'>> = {},
): RegistrationEntry {
  return makeEntry({
    spiffeId: SpiffeId.fromPath(td, path),
    selectors: [parseSelector('unix:uid:1000')],
    dnsNames: [],
    federatesWith: [],
    line: 1,
    ...fields,
  });
}

function leafOf(issued: IssuedX509Svid): X509Certificate {
  return issued.svid.certificates[0] as X509Certificate;
}

describe('SvidIssuer with an injected clock', () => {
  const clock = { ms: T0 };
  const now = (): Date => new Date(clock.ms);
  let ca: LocalCa;
  let issuer: SvidIssuer;

  async function setUp(options: Partial<SvidIssuerOptions> = {}, caTtlSeconds = 24 * 3600): Promise<void> {
    issuer.close();
    ca = await LocalCa.create({ trustDomain: td, caTtlSeconds, now });
    issuer = new SvidIssuer({ ca, now, ...options });
  }

  beforeEach(async () => {
    clock.ms = T0;
    ca = await LocalCa.create({ trustDomain: td, now });
    issuer = new SvidIssuer({ ca, now });
  });

  afterEach(() => {
    issuer.close();
    ca.close();
  });

  describe('x509For', () => {
    it('mints on first use and returns the same SVID afterwards', async () => {
      const web = entry('/web');
      assert.equal(issuer.peek(web.key), undefined);
      const first = await issuer.x509For(web);
      const second = await issuer.x509For(web);
      assert.equal(second, first);
      assert.equal(issuer.peek(web.key), first);
    });

    it('shares one mint between concurrent calls', async () => {
      const web = entry('/web');
      const [a, b, c] = await Promise.all([issuer.x509For(web), issuer.x509For(web), issuer.x509For(web)]);
      assert.equal(a, b);
      assert.equal(b, c);
    });

    it('mints an SVID for the entry that verifies against the CA bundle', async () => {
      const web = entry('/web', { dnsNames: ['web.example.org'] });
      const issued = await issuer.x509For(web);
      assert.equal(issued.entryKey, web.key);
      assert.ok(issued.id.equals(web.spiffeId));
      assert.ok(issued.svid.id.equals(web.spiffeId));
      assert.equal(issued.caGeneration, 1);
      assert.equal(issued.notBefore.getTime(), T0 - 10 * SECOND);
      assert.equal(issued.notAfter.getTime(), T0 + 3600 * SECOND);
      const leaf = leafOf(issued);
      assert.equal(leaf.subjectAltName, 'URI:spiffe://example.org/web, DNS:web.example.org');
      assert.deepEqual(issued.chainDer, Buffer.concat(issued.svid.certificates.map((c) => c.raw)));
      const key = createPrivateKey({ key: issued.keyDer, format: 'der', type: 'pkcs8' });
      assert.ok(leaf.checkPrivateKey(key));
      assert.ok(leaf.checkPrivateKey(issued.svid.privateKey));
      const verified = verifyX509Svid(issued.svid.certificates, ca.bundle, now());
      assert.ok(verified.id.equals(web.spiffeId));
    });

    it('mints anew once the cached SVID has expired', async () => {
      const web = entry('/web', { x509SvidTtlSeconds: 60 });
      const first = await issuer.x509For(web);
      clock.ms = first.notAfter.getTime();
      const second = await issuer.x509For(web);
      assert.notEqual(second, first);
      assert.notEqual(leafOf(second).serialNumber, leafOf(first).serialNumber);
      assert.equal(second.notAfter.getTime(), clock.ms + 60 * SECOND);
    });

    it("uses the entry's TTL over the issuer default", async () => {
      await setUp({ x509SvidTtlSeconds: 3600 });
      const short = await issuer.x509For(entry('/short', { x509SvidTtlSeconds: 120 }));
      const usual = await issuer.x509For(entry('/usual'));
      assert.equal(short.notAfter.getTime(), T0 + 120 * SECOND);
      assert.equal(new Date(leafOf(short).validTo).getTime(), T0 + 120 * SECOND);
      assert.equal(usual.notAfter.getTime(), T0 + 3600 * SECOND);
    });

    it('schedules rotation between 40% and 50% of the lifetime with jitter 0.1', async () => {
      const issued = await Promise.all(Array.from({ length: 8 }, (_, i) => issuer.x509For(entry(`/w${i}`))));
      for (const svid of issued) {
        const life = svid.notAfter.getTime() - T0;
        const after = svid.rotateAt.getTime() - T0;
        assert.ok(after > 0.4 * life && after <= 0.5 * life, `rotateAt ${after} ms of a ${life} ms life`);
      }
    });

    it('schedules rotation at exactly half the lifetime with jitter 0', async () => {
      await setUp({ jitter: 0 });
      const svid = await issuer.x509For(entry('/exact', { x509SvidTtlSeconds: 600 }));
      assert.equal(svid.rotateAt.getTime(), T0 + 300 * SECOND);
    });
  });

  describe('retain', () => {
    it('forgets entries that are gone, so their next SVID is minted anew', async () => {
      const kept = entry('/kept');
      const gone = entry('/gone');
      const keptSvid = await issuer.x509For(kept);
      const goneSvid = await issuer.x509For(gone);
      const keptJwt = await issuer.jwtFor(kept, ['aud']);
      const goneJwt = await issuer.jwtFor(gone, ['aud']);

      issuer.retain([kept]);
      assert.equal(issuer.peek(gone.key), undefined);
      assert.equal(issuer.peek(kept.key), keptSvid);
      assert.equal(await issuer.x509For(kept), keptSvid);
      assert.equal(await issuer.jwtFor(kept, ['aud']), keptJwt);

      const again = await issuer.x509For(gone);
      assert.notEqual(again, goneSvid);
      assert.notEqual(leafOf(again).serialNumber, leafOf(goneSvid).serialNumber);
      assert.notEqual((await issuer.jwtFor(gone, ['aud'])).token, goneJwt.token);
    });

    it('treats an edited entry as gone: its key changed', async () => {
      const original = entry('/app');
      const edited = entry('/app', { dnsNames: ['app.example.org'] });
      assert.notEqual(edited.key, original.key);
      await issuer.x509For(original);
      issuer.retain([edited]);
      assert.equal(issuer.peek(original.key), undefined);
      const svid = await issuer.x509For(edited);
      assert.equal(leafOf(svid).subjectAltName, 'URI:spiffe://example.org/app, DNS:app.example.org');
    });
  });

  describe('jwtFor', () => {
    it('mints a token that verifies against the CA bundle, for the entry and the audience', async () => {
      const api = entry('/api');
      const jwt = await issuer.jwtFor(api, ['aud-a', 'aud-b']);
      assert.ok(jwt.id.equals(api.spiffeId));
      assert.deepEqual(jwt.audience, ['aud-a', 'aud-b']);
      assert.equal(jwt.expiry.getTime(), T0 + 300 * SECOND);
      const verified = await verifyJwtSvid(jwt.token, ca.bundle, 'aud-b', { now: now() });
      assert.equal(verified.claims.sub, 'spiffe://example.org/api');
      assert.deepEqual(verified.claims.aud, ['aud-a', 'aud-b']);
      assert.equal(verified.expiry.getTime(), T0 + 300 * SECOND);
    });

    it('never outlives the CA: exp is at most the CA notAfter', async () => {
      await setUp({}, 60);
      const jwt = await issuer.jwtFor(entry('/api'), ['aud']);
      assert.ok(jwt.expiry.getTime() <= ca.active.notAfter.getTime());
      assert.equal(jwt.expiry.getTime(), T0 + 60 * SECOND);
      await verifyJwtSvid(jwt.token, ca.bundle, 'aud', { now: now() });
    });

    it("uses the entry's JWT TTL over the issuer default", async () => {
      await setUp({ jwtSvidTtlSeconds: 600 });
      const short = await issuer.jwtFor(entry('/short', { jwtSvidTtlSeconds: 60 }), ['aud']);
      const usual = await issuer.jwtFor(entry('/usual'), ['aud']);
      assert.equal(short.expiry.getTime(), T0 + 60 * SECOND);
      assert.equal(usual.expiry.getTime(), T0 + 600 * SECOND);
    });

    it('caches the token per audience set, whatever the order', async () => {
      const api = entry('/api');
      const first = await issuer.jwtFor(api, ['aud-a', 'aud-b']);
      const reordered = await issuer.jwtFor(api, ['aud-b', 'aud-a']);
      assert.equal(reordered.token, first.token);
      const other = await issuer.jwtFor(api, ['aud-c']);
      assert.notEqual(other.token, first.token);
      assert.deepEqual(other.audience, ['aud-c']);
    });

    it('mints a new token once half its life has passed', async () => {
      const api = entry('/api');
      const first = await issuer.jwtFor(api, ['aud']);
      clock.ms = T0 + 150 * SECOND - 1;
      assert.equal((await issuer.jwtFor(api, ['aud'])).token, first.token);
      clock.ms = T0 + 150 * SECOND;
      const fresh = await issuer.jwtFor(api, ['aud']);
      assert.notEqual(fresh.token, first.token);
      assert.equal(fresh.expiry.getTime(), T0 + 450 * SECOND);
    });
  });

  describe('hint', () => {
    it('is carried on the X.509-SVID and on the JWT-SVID', async () => {
      const internal = entry('/internal', { hint: 'internal' });
      const x509 = await issuer.x509For(internal);
      assert.equal(x509.hint, 'internal');
      assert.equal(x509.svid.hint, 'internal');
      const jwt = await issuer.jwtFor(internal, ['aud']);
      assert.equal(jwt.hint, 'internal');
    });

    it('is absent when the entry has none', async () => {
      const plain = entry('/plain');
      const x509 = await issuer.x509For(plain);
      assert.equal('hint' in x509, false);
      assert.equal('hint' in x509.svid, false);
      assert.equal('hint' in (await issuer.jwtFor(plain, ['aud'])), false);
    });
  });
});

describe('SvidIssuer rotation timer (real clock)', () => {
  it("replaces the SVID at half-life and emits 'rotated' with the new one", async () => {
    const ca = await LocalCa.create({ trustDomain: td });
    const issuer = new SvidIssuer({ ca, jitter: 0 });
    try {
      // A 1 s SVID rotates after about 0.5 s.
      const web = entry('/web', { x509SvidTtlSeconds: 1 });
      const first = await issuer.x509For(web);
      const [rotated] = (await once(issuer, 'rotated')) as [IssuedX509Svid];
      assert.notEqual(rotated, first);
      assert.equal(rotated.entryKey, web.key);
      assert.notEqual(leafOf(rotated).serialNumber, leafOf(first).serialNumber);
      assert.ok(rotated.notAfter.getTime() > first.notAfter.getTime());
      assert.equal(await issuer.x509For(web), rotated);
      assert.equal(issuer.peek(web.key), rotated);
      assert.doesNotThrow(() => verifyX509Svid(rotated.svid.certificates, ca.bundle));
    } finally {
      issuer.close();
      ca.close();
    }
  });
});
