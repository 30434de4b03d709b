/**
 * The harness dev/spire-server.ts against a real SPIRE server (v1.13.3, built by dev/peers/peers.ts): the bundle
 * endpoint in both profiles, X.509 and JWT authority rotation, minting, federated bundles set by hand, and
 * federation between two real servers (https_spiffe, bootstrapped with `bundle set`; https_web, trusting a test
 * Web-PKI root through SSL_CERT_FILE). Without Go this suite skips, saying why; with KSP_REQUIRE_PEERS=1 (CI) a
 * missing peer fails the run instead.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { DetailedPeerCertificate, TLSSocket } from 'node:tls';
import { bundleJson, makeDevPki } from '../../certs-dev/devpki.ts';
import { peer } from '../../dev/peers/peers.ts';
import { SpireCliError, type SpireServer, startSpireServer } from '../../dev/spire-server.ts';
import { BundleSet, SpiffeBundle } from '../../src/spiffe/bundle.ts';
import { TrustDomain } from '../../src/spiffe/id.ts';
import { verifyJwtSvid } from '../../src/spiffe/jwtsvid.ts';
import { parseCertificates, verifyX509Svid } from '../../src/spiffe/x509svid.ts';
import { makeWebPki, webServerCert, writeWebFiles } from '../helpers/federation.ts';

// Resolved at load time so that a missing Go becomes a visible skip of the whole suite.
const spire = peer('spire-server');
const skip = 'skip' in spire ? spire.skip : false;
const binary = 'path' in spire ? spire.path : '';

const HUB = 'hub.test';
const SPOKE = 'spoke.test';
const WEB = 'web.test';

interface JwkJson {
  use?: string;
  kid?: string;
  x5c?: string[];
}
interface BundleDoc {
  keys: JwkJson[];
  spiffe_sequence?: number;
  spiffe_refresh_hint?: number;
}

interface Served {
  readonly doc: BundleDoc;
  readonly body: string;
  /** The chain the endpoint presented, leaf first. */
  readonly chain: X509Certificate[];
}

/**
 * GETs a bundle endpoint, trusting only `caPem` and accepting only a server certificate that names `expectId`
 * (a URI SAN) or, when `expectId` is undefined, the loopback IP (Web PKI).
 */
function getBundle(url: string, caPem: string, expectId?: string): Promise<Served> {
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      {
        agent: false,
        ca: caPem,
        ...(expectId === undefined
          ? {}
          : {
              checkServerIdentity: (_host: string, cert: { subjectaltname?: string }) =>
                (cert.subjectaltname ?? '').split(', ').includes(`URI:${expectId}`)
                  ? undefined
                  : new Error(`bundle endpoint presented ${cert.subjectaltname}, not ${expectId}`),
            }),
      },
      (res) => {
        const chain: X509Certificate[] = [];
        let cert: DetailedPeerCertificate | undefined = (res.socket as TLSSocket).getPeerCertificate(true);
        while (cert?.raw !== undefined) {
          chain.push(new X509Certificate(cert.raw));
          if (cert.issuerCertificate === undefined || cert.issuerCertificate === cert) break;
          cert = cert.issuerCertificate;
        }
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const body = Buffer.concat(chunks).toString('utf8');
          if (res.statusCode !== 200) {
            reject(new Error(`GET ${url}: ${res.statusCode} ${body}`));
            return;
          }
          resolve({ doc: JSON.parse(body) as BundleDoc, body, chain });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end();
  });
}

function parseBundle(trustDomain: string, json: string): SpiffeBundle {
  return SpiffeBundle.parse(TrustDomain.parse(trustDomain), json);
}

const x509Keys = (doc: BundleDoc): string[] =>
  doc.keys.filter((k) => k.use === 'x509-svid').map((k) => k.x5c?.[0] ?? '');
const jwtKids = (doc: BundleDoc): string[] =>
  doc.keys.filter((k) => k.use === 'jwt-svid').map((k) => k.kid ?? '');

/** Polls until `check` returns a value (SPIRE's bundle endpoint caches its bundle for a second). */
async function waitFor<T>(what: string, check: () => Promise<T | undefined>, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await sleep(200);
  }
}

/** Fingerprints of a bundle's X.509 authorities, sorted, for comparing bundles. */
function roots(bundle: SpiffeBundle): string[] {
  return bundle.x509Authorities.map((c) => c.fingerprint256).sort();
}

describe('a real spire-server v1.13.3 through dev/spire-server.ts', { skip }, () => {
  let base: string;
  let hub: SpireServer;
  let hubUrl: string;

  before(async () => {
    // Short: the admin socket lives in here and sun_path holds 108 bytes.
    base = mkdtempSync('/tmp/ksp-ss-');
    const dir = join(base, 'hub');
    mkdirSync(dir);
    hub = await startSpireServer({
      binary,
      trustDomain: HUB,
      dir,
      caTtl: '2h',
      x509SvidTtl: '10m',
      bundleEndpoint: { profile: 'https_spiffe', refreshHint: '1m' },
    });
    hubUrl = hub.bundleEndpointUrl ?? '';
  });

  after(async () => {
    await hub?.stop();
    if (base) rmSync(base, { recursive: true, force: true });
  });

  it('serves its bundle over https_spiffe as spiffe://<td>/spire/server, chained to a root of its own bundle', async () => {
    assert.match(hubUrl, /^https:\/\/127\.0\.0\.1:\d+$/);
    const pem = await hub.bundleShow('pem');
    const served = await getBundle(hubUrl, pem, `spiffe://${HUB}/spire/server`);
    // Node accepted the chain against `pem` alone; our own verifier agrees, against the SPIFFE form.
    const bundle = parseBundle(HUB, await hub.bundleShow());
    assert.equal(verifyX509Svid(served.chain, bundle).id.toString(), `spiffe://${HUB}/spire/server`);
    assert.equal(hub.serverSpiffeId, `spiffe://${HUB}/spire/server`);
    assert.deepEqual(
      roots(bundle),
      parseCertificates(pem)
        .map((c) => c.fingerprint256)
        .sort(),
    );

    assert.equal(x509Keys(served.doc).length, 1);
    assert.equal(jwtKids(served.doc).length, 1);
    assert.equal(typeof served.doc.spiffe_sequence, 'number');
    assert.equal(served.doc.spiffe_refresh_hint, 60);
    assert.deepEqual(roots(parseBundle(HUB, served.body)), roots(bundle));
  });

  it('rotating the X.509 authority adds a root to the served bundle and raises spiffe_sequence; mints chain to the new root', async () => {
    const pem = await hub.bundleShow('pem');
    const before = await getBundle(hubUrl, pem, hub.serverSpiffeId);
    const previous = (await hub.x509Authorities()).active?.authorityId;
    const activated = await hub.rotateX509Authority();
    const state = await hub.x509Authorities();
    assert.equal(state.active?.authorityId, activated);
    assert.equal(state.old?.authorityId, previous);
    assert.notEqual(activated, previous);

    // The old root still vouches for the endpoint's certificate, so the old trust is enough to fetch.
    const after = await waitFor('the rotated bundle at the endpoint', async () => {
      const served = await getBundle(hubUrl, pem, hub.serverSpiffeId);
      return x509Keys(served.doc).length > x509Keys(before.doc).length ? served : undefined;
    });
    assert.equal(x509Keys(after.doc).length, x509Keys(before.doc).length + 1);
    assert.ok((after.doc.spiffe_sequence ?? 0) > (before.doc.spiffe_sequence ?? 0));
    for (const key of x509Keys(before.doc)) assert.ok(x509Keys(after.doc).includes(key));

    const minted = await hub.mintX509(`spiffe://${HUB}/workload`, '5m');
    const bundle = parseBundle(HUB, await hub.bundleShow());
    const verified = verifyX509Svid(parseCertificates(minted.certPem), bundle);
    assert.equal(verified.id.toString(), `spiffe://${HUB}/workload`);
    const anchor = verified.verifiedChain.at(-1);
    assert.ok(anchor !== undefined);
    // Signed by the activated authority: a root that was not in the bundle before the rotation.
    const oldRoots = x509Keys(before.doc).map(
      (b64) => new X509Certificate(Buffer.from(b64, 'base64')).fingerprint256,
    );
    assert.ok(!oldRoots.includes(anchor.fingerprint256));
    assert.deepEqual(
      parseCertificates(minted.bundlePem)
        .map((c) => c.fingerprint256)
        .sort(),
      roots(bundle),
    );
    assert.ok(minted.keyPem.includes('PRIVATE KEY'));
  });

  it('rotating the JWT authority publishes the new key, and minted JWT-SVIDs carry its kid', async () => {
    const before = JSON.parse(await hub.bundleShow()) as BundleDoc;
    const kid = await hub.rotateJwtAuthority();
    assert.equal((await hub.jwtAuthorities()).active?.authorityId, kid);
    const afterDoc = JSON.parse(await hub.bundleShow()) as BundleDoc;
    assert.deepEqual(jwtKids(afterDoc).sort(), [...jwtKids(before), kid].sort());
    assert.ok((afterDoc.spiffe_sequence ?? 0) > (before.spiffe_sequence ?? 0));

    const token = await hub.mintJwt(`spiffe://${HUB}/workload`, ['spoke-apiserver'], '5m');
    const header = JSON.parse(Buffer.from(token.split('.')[0] ?? '', 'base64url').toString('utf8')) as {
      kid?: string;
    };
    assert.equal(header.kid, kid);
    const verified = await verifyJwtSvid(
      token,
      new BundleSet([parseBundle(HUB, await hub.bundleShow())]),
      'spoke-apiserver',
    );
    assert.equal(verified.id.toString(), `spiffe://${HUB}/workload`);
  });

  it('bundleSet stores a federated bundle that federatedBundle reads back; an unknown trust domain has none', async () => {
    const pki = await makeDevPki();
    await hub.bundleSet(pki.hub.name, bundleJson(pki.hub, { sequence: 7 }));
    const json = await hub.federatedBundle(pki.hub.name);
    assert.ok(json !== undefined);
    const stored = parseBundle(pki.hub.name, json);
    assert.deepEqual(roots(stored), [new X509Certificate(pki.hub.rootPem).fingerprint256]);
    assert.equal(stored.sequence, 7n);
    const pem = await hub.federatedBundle(pki.hub.name, 'pem');
    assert.deepEqual(
      parseCertificates(pem ?? '').map((c) => c.fingerprint256),
      [new X509Certificate(pki.hub.rootPem).fingerprint256],
    );
    assert.equal(await hub.federatedBundle('nowhere.test'), undefined);

    await hub.bundleDelete(pki.hub.name);
    assert.equal(await hub.federatedBundle(pki.hub.name), undefined);
  });

  describe('federation between two real servers', () => {
    let spoke: SpireServer;
    let web: SpireServer;
    let webRootPem: string;

    before(async () => {
      const webPki = await makeWebPki('spire web root');
      webRootPem = webPki.caPem;
      const files = { certFile: join(base, 'web.crt'), keyFile: join(base, 'web.key') };
      await writeWebFiles(files, await webServerCert(webPki));
      const caFile = join(base, 'web-root.pem');
      writeFileSync(caFile, webRootPem);

      mkdirSync(join(base, 'web'));
      web = await startSpireServer({
        binary,
        trustDomain: WEB,
        dir: join(base, 'web'),
        bundleEndpoint: { profile: 'https_web', ...files },
      });
      mkdirSync(join(base, 'spoke'));
      spoke = await startSpireServer({
        binary,
        trustDomain: SPOKE,
        dir: join(base, 'spoke'),
        // From the configuration file: hub over https_spiffe. web.test is added at run time below.
        federatesWith: [
          { trustDomain: HUB, url: hubUrl, profile: 'https_spiffe', endpointSpiffeId: hub.serverSpiffeId },
        ],
        // Go's crypto/x509 reads SSL_CERT_FILE: the https_web fetcher trusts the test root and nothing else.
        extraEnv: { SSL_CERT_FILE: caFile },
      });
    });

    after(async () => {
      await spoke?.stop();
      await web?.stop();
    });

    it('https_spiffe authenticates the endpoint with the bundle SPIRE already holds for its trust domain', async () => {
      // No local copy of hub.test's bundle yet: SPIRE cannot authenticate the endpoint, so it does not fetch.
      await assert.rejects(spoke.refreshFederation(HUB), (err: unknown) => {
        assert.ok(err instanceof SpireCliError);
        assert.match(err.stderr, /local copy of bundle not found/);
        return true;
      });

      // A bootstrap bundle of the wrong roots: the TLS handshake fails, nothing is stored.
      const pki = await makeDevPki();
      const wrong = bundleJson({ ...pki.hub, name: HUB });
      await spoke.bundleSet(HUB, wrong);
      await assert.rejects(spoke.refreshFederation(HUB), (err: unknown) => {
        assert.ok(err instanceof SpireCliError);
        assert.match(err.stderr, /certificate signed by unknown authority/);
        return true;
      });
      assert.deepEqual(roots(parseBundle(HUB, (await spoke.federatedBundle(HUB)) ?? '')), [
        new X509Certificate(pki.hub.rootPem).fingerprint256,
      ]);

      // The right bootstrap (what `bundle show` prints on the hub): the fetch succeeds and replaces it.
      await spoke.bundleSet(HUB, await hub.bundleShow());
      await spoke.refreshFederation(HUB);
      const fetched = parseBundle(HUB, (await spoke.federatedBundle(HUB)) ?? '');
      const current = parseBundle(HUB, await hub.bundleShow());
      assert.deepEqual(roots(fetched), roots(current));
      assert.deepEqual([...fetched.jwtAuthorities.keys()].sort(), [...current.jwtAuthorities.keys()].sort());
    });

    it('https_web (a relationship created at run time) trusts the Web-PKI root given through SSL_CERT_FILE', async () => {
      const webUrl = web.bundleEndpointUrl ?? '';
      // Node sees the same endpoint as a Web-PKI server for 127.0.0.1.
      const served = await getBundle(webUrl, webRootPem);
      assert.deepEqual(roots(parseBundle(WEB, served.body)), roots(parseBundle(WEB, await web.bundleShow())));

      await spoke.createFederation({ trustDomain: WEB, url: webUrl, profile: 'https_web' });
      await spoke.refreshFederation(WEB);
      const fetched = await waitFor('web.test bundle on the spoke', () => spoke.federatedBundle(WEB));
      assert.deepEqual(roots(parseBundle(WEB, fetched)), roots(parseBundle(WEB, await web.bundleShow())));

      // The hub has no SSL_CERT_FILE: the same relationship fails there (unknown authority).
      await hub.createFederation({ trustDomain: WEB, url: webUrl, profile: 'https_web' });
      await assert.rejects(hub.refreshFederation(WEB), /certificate signed by unknown authority/);
      assert.equal(await hub.federatedBundle(WEB), undefined);
    });
  });
});
