/**
 * Federation end to end over loopback TLS: the real BundleEndpointServer serving a real LocalCa's bundle, the real
 * BundleFetcher fetching it, in both profiles, through a CA rotation, a dark endpoint, impostors, and a restart from
 * the FederationStore. Time is an injected clock; every fetch is a refreshNow().
 */
// Must stay first: @peculiar/x509 (used by the CA and the cert helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LocalCa } from '../../src/agent/ca.ts';
import { StateDir } from '../../src/config/statedir.ts';
import {
  BundleEndpointServer,
  BundleFetcher,
  type EndpointIdentity,
  FederationErrorCode,
  FederationStore,
  type Relationship,
  type StoredBundle,
} from '../../src/federation/index.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import type { SpiffeBundle } from '../../src/spiffe/bundle.ts';
import { isSpiffeError, X509ErrorCode } from '../../src/spiffe/errors.ts';
import { SpiffeId, TrustDomain } from '../../src/spiffe/id.ts';
import { verifyX509Svid } from '../../src/spiffe/x509svid.ts';
import {
  type Clock,
  clock,
  makeWebPki,
  svidFrom,
  webServerCert,
  writeWebFiles,
} from '../helpers/federation.ts';

const td = TrustDomain.parse('a.test');
const endpointId = SpiffeId.parse('spiffe://a.test/spire/bundle-endpoint');

async function serve(
  identity: EndpointIdentity,
  bundle: () => SpiffeBundle,
  options: { refreshHintSeconds?: number } = {},
): Promise<BundleEndpointServer> {
  return BundleEndpointServer.start({
    host: '127.0.0.1',
    port: 0,
    path: '/bundle.json',
    tls: { profile: 'https_spiffe', identity },
    bundle,
    logger: silentLogger(),
    ...options,
  });
}

const urlOf = (server: BundleEndpointServer): string =>
  `https://127.0.0.1:${server.address.port}/bundle.json`;

const spiffeRelationship = (server: BundleEndpointServer): Relationship => ({
  trustDomain: td,
  url: urlOf(server),
  fetch: { profile: 'https_spiffe', endpointSpiffeId: endpointId },
});

function bootstrap(bundle: SpiffeBundle, at: Date): StoredBundle {
  return { bundle, source: 'bootstrap', fetchedAt: at };
}

describe('federation over https_spiffe', () => {
  let time: Clock;
  let ca: LocalCa;
  let dir: string;
  before(async () => {
    time = clock();
    ca = await LocalCa.create({ trustDomain: td, caTtlSeconds: 600, now: time.now });
    dir = await mkdtemp(join(tmpdir(), 'ksp-federation-it-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('fetches the bundle through a full CA rotation, authenticating each time with the latest bundle, and survives a restart from the store', async () => {
    const store = await FederationStore.open(await StateDir.open(join(dir, 'rotation')));
    const original = ca.bundle;
    const server = await serve(await svidFrom(ca, endpointId.path), () => ca.bundle, {
      refreshHintSeconds: 60,
    });
    try {
      const fetcher = new BundleFetcher({
        relationship: spiffeRelationship(server),
        initial: bootstrap(original, time.now()),
        store,
        logger: silentLogger(),
        now: time.now,
      });
      const seen: SpiffeBundle[] = [];
      fetcher.on('bundle', (b) => seen.push(b));

      let status = await fetcher.refreshNow();
      assert.equal(status.lastError, undefined);
      assert.equal(status.source, 'endpoint');
      assert.equal(fetcher.bundle?.sequence, original.sequence);
      assert.equal(fetcher.bundle?.refreshHint, 60);
      assert.equal(((status.nextAttempt?.getTime() ?? 0) - time.ms) / 1000, 60);

      // Half-way: the next CA is published (sequence + 1), not yet signing.
      time.advance(301);
      await ca.tick();
      status = await fetcher.refreshNow();
      assert.equal(status.lastError, undefined);
      assert.equal(fetcher.bundle?.sequence, ca.bundle.sequence);
      assert.equal(fetcher.bundle?.x509Authorities.length, 2);

      // Five sixths: the next CA signs; the endpoint rotates to an SVID from it.
      time.advance(200);
      await ca.tick();
      assert.equal(ca.active.generation, 2);
      server.setIdentity(await svidFrom(ca, endpointId.path));
      assert.equal((await fetcher.refreshNow()).lastError, undefined);

      // The first CA expires and leaves the bundle (as the third is published): the bootstrap bundle would no
      // longer authenticate the endpoint, the fetched one does.
      time.advance(120);
      await ca.tick();
      const first = original.x509Authorities[0]?.fingerprint256;
      assert.ok(!ca.bundle.x509Authorities.some((c) => c.fingerprint256 === first));
      status = await fetcher.refreshNow();
      assert.equal(status.lastError, undefined);
      assert.ok(fetcher.bundle?.equals(ca.bundle) === false); // the refresh hint differs; the authorities do not
      assert.deepEqual(
        fetcher.bundle?.x509Authorities.map((c) => c.fingerprint256),
        ca.bundle.x509Authorities.map((c) => c.fingerprint256),
      );
      assert.deepEqual(
        seen.map((b) => b.sequence),
        [1n, 2n, 3n, 4n],
      );

      // Persisted: a restarted fetcher from the store authenticates the endpoint; one from the old bootstrap cannot.
      const stored = await store.load(td);
      assert.ok(stored !== undefined);
      assert.equal(stored.source, 'endpoint');
      assert.equal(stored.url, urlOf(server));
      assert.ok(stored.bundle.equals(fetcher.bundle as SpiffeBundle));
      const restarted = new BundleFetcher({
        relationship: spiffeRelationship(server),
        initial: stored,
        logger: silentLogger(),
        now: time.now,
      });
      assert.deepEqual(restarted.status.lastSuccess, stored.fetchedAt);
      assert.equal(restarted.status.source, 'endpoint');
      const again = await restarted.refreshNow();
      assert.equal(again.lastError, undefined);
      assert.ok(restarted.bundle?.equals(stored.bundle));

      const stale = new BundleFetcher({
        relationship: spiffeRelationship(server),
        initial: bootstrap(original, time.now()),
        logger: silentLogger(),
        now: time.now,
      });
      const refused = await stale.refreshNow();
      assert.equal(refused.lastError?.code, FederationErrorCode.Untrusted);
      assert.equal(refused.lastSuccess, undefined);
      assert.equal(stale.bundle, original);
    } finally {
      await server.close();
    }
  });

  it('refuses an endpoint presenting an SVID for another SPIFFE ID', async () => {
    const impostor = await serve(await svidFrom(ca, '/some/workload'), () => ca.bundle);
    try {
      const fetcher = new BundleFetcher({
        relationship: spiffeRelationship(impostor),
        initial: bootstrap(ca.bundle, time.now()),
        logger: silentLogger(),
        now: time.now,
      });
      const status = await fetcher.refreshNow();
      assert.equal(status.lastError?.code, FederationErrorCode.Untrusted);
      assert.match(status.lastError?.message ?? '', /spiffe:\/\/a\.test\/some\/workload, not the configured/);
      assert.equal(fetcher.bundle, ca.bundle);
      assert.equal(status.consecutiveFailures, 1);
    } finally {
      await impostor.close();
    }
  });

  it('refuses an endpoint whose SVID has the right ID but chains to another CA', async () => {
    const rogue = await LocalCa.create({ trustDomain: td, now: time.now });
    const impostor = await serve(await svidFrom(rogue, endpointId.path), () => rogue.bundle);
    try {
      const fetcher = new BundleFetcher({
        relationship: spiffeRelationship(impostor),
        initial: bootstrap(ca.bundle, time.now()),
        logger: silentLogger(),
        now: time.now,
      });
      const status = await fetcher.refreshNow();
      assert.equal(status.lastError?.code, FederationErrorCode.Untrusted);
      assert.match(status.lastError?.message ?? '', new RegExp(X509ErrorCode.Untrusted));
      assert.equal(fetcher.bundle, ca.bundle);
    } finally {
      await impostor.close();
    }
  });

  it('keeps the last bundle while the endpoint is dark: failures count, lastSuccess stays', async () => {
    const server = await serve(await svidFrom(ca, endpointId.path), () => ca.bundle);
    const fetcher = new BundleFetcher({
      relationship: spiffeRelationship(server),
      initial: bootstrap(ca.bundle, time.now()),
      logger: silentLogger(),
      now: time.now,
    });
    const good = await fetcher.refreshNow();
    assert.equal(good.lastError, undefined);
    const held = fetcher.bundle;
    await server.close();
    for (let i = 1; i <= 3; i++) {
      time.advance(10);
      const status = await fetcher.refreshNow();
      assert.equal(status.lastError?.code, FederationErrorCode.Fetch);
      assert.equal(status.consecutiveFailures, i);
      assert.deepEqual(status.lastSuccess, good.lastSuccess);
      assert.equal(fetcher.bundle, held);
    }
  });

  it('refuses a bundle whose sequence went backwards (an older bundle served again)', async () => {
    const local = await LocalCa.create({ trustDomain: td, caTtlSeconds: 600, now: time.now });
    const older = local.bundle;
    time.advance(301);
    await local.tick();
    let served = local.bundle;
    const server = await serve(await svidFrom(local, endpointId.path), () => served);
    try {
      const fetcher = new BundleFetcher({
        relationship: spiffeRelationship(server),
        initial: bootstrap(older, time.now()),
        logger: silentLogger(),
        now: time.now,
      });
      assert.equal((await fetcher.refreshNow()).lastError, undefined);
      const held = fetcher.bundle;
      served = older;
      const status = await fetcher.refreshNow();
      assert.equal(status.lastError?.code, FederationErrorCode.Bundle);
      assert.match(status.lastError?.message ?? '', /sequence went backwards/);
      assert.equal(fetcher.bundle, held);
    } finally {
      await server.close();
    }
  });
});

describe('federation over https_web', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-federation-web-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it("fetches through a Web-PKI endpoint and binds the bundle to the relationship's trust domain only", async () => {
    const pki = await makeWebPki();
    const files = { certFile: join(dir, 'endpoint.crt'), keyFile: join(dir, 'endpoint.key') };
    await writeWebFiles(files, await webServerCert(pki));
    const caFile = join(dir, 'ca.pem');
    await writeFile(caFile, pki.caPem);
    const ca = await LocalCa.create({ trustDomain: td });
    const server = await BundleEndpointServer.start({
      host: '127.0.0.1',
      port: 0,
      tls: { profile: 'https_web', ...files },
      bundle: () => ca.bundle,
      logger: silentLogger(),
    });
    try {
      const store = await FederationStore.open(await StateDir.open(join(dir, 'state')));
      // The operator configured this endpoint as b.test's: what it serves becomes b.test's bundle and nothing else.
      const b = TrustDomain.parse('b.test');
      const fetcher = new BundleFetcher({
        relationship: {
          trustDomain: b,
          url: `https://127.0.0.1:${server.address.port}/`,
          fetch: { profile: 'https_web', caFile },
        },
        store,
        logger: silentLogger(),
      });
      const status = await fetcher.refreshNow();
      assert.equal(status.lastError, undefined);
      const bundle = fetcher.bundle as SpiffeBundle;
      assert.equal(bundle.trustDomain.name, 'b.test');
      assert.equal(bundle.refreshHint, 300);
      assert.equal(bundle.sequence, ca.bundle.sequence);
      // An a.test SVID finds no a.test bundle in it: the bundle never vouches for the domain that really made it.
      const svid = await svidFrom(ca, '/workload');
      assert.throws(
        () => verifyX509Svid(svid.certificates, bundle),
        (err: unknown) => isSpiffeError(err, X509ErrorCode.NoBundle),
      );
      // Stored as b.test's, and only there.
      assert.equal((await store.load(b))?.bundle.trustDomain.name, 'b.test');
      assert.equal(await store.load(td), undefined);
    } finally {
      await server.close();
    }
  });
});
