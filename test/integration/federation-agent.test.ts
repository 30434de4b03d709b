/**
 * Federation between two real agents in one process, over loopback TLS: the hub agent serves its bundle endpoint
 * (https_spiffe, then https_web), the spoke agent fetches it, persists it in its state directory, and delivers
 * it to the workloads whose entries federate with the hub; /readyz and /metrics report each relationship.
 */
// Must stay first: @peculiar/x509 (dev certificate helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { generateKeys, HOUR, makeCa, makeLeaf } from '../../dev/certs.ts';
import { LocalCa } from '../../src/agent/ca.ts';
import type { RelationshipSettings } from '../../src/agent/config-federation.ts';
import { x509 } from '../../src/agent/keys.ts';
import { StateDir } from '../../src/config/statedir.ts';
import { FederationStore } from '../../src/federation/store.ts';
import type { SpiffeBundle } from '../../src/spiffe/bundle.ts';
import { SpiffeId, TrustDomain } from '../../src/spiffe/id.ts';
import { WorkloadClient } from '../../src/workload/client.ts';
import { startTestAgent, type TestAgent, waitFor } from '../helpers/agent.ts';
import { runCli } from '../helpers/cli.ts';

const uid = process.getuid?.() ?? 0;
const HUB = TrustDomain.parse('hub.test');
const ENDPOINT_ID = SpiffeId.fromPath(HUB, '/kube-svid-proxy/bundle-endpoint');

const dirs: string[] = [];
const agents: TestAgent[] = [];
after(async () => {
  for (const a of agents) await a.close().catch(() => undefined);
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'ksp-fed-'));
  dirs.push(d);
  return d;
}

const hubEntries = `entries:\n  - spiffeId: spiffe://hub.test/argocd\n    selectors: ["unix:uid:${uid}"]\n`;
const spokeEntries = `entries:\n  - spiffeId: spiffe://example.org/proxy\n    selectors: ["unix:uid:${uid}"]\n    federatesWith: [hub.test]\n`;

async function startHub(options: Parameters<typeof startTestAgent>[1] = {}): Promise<TestAgent> {
  const hub = await startTestAgent(hubEntries, {
    trustDomain: HUB,
    stateDir: join(tempDir(), 'state'),
    federation: {
      bundleEndpoint: {
        listen: { host: '127.0.0.1', port: 0 },
        path: '/',
        refreshHintSeconds: 60,
        tls: { profile: 'https_spiffe', spiffeId: ENDPOINT_ID },
      },
      relationships: [],
    },
    ...options,
  });
  agents.push(hub);
  return hub;
}

function endpointUrl(agent: TestAgent): string {
  const address = agent.agent.federation?.endpointAddress;
  assert.ok(address, 'the hub serves a bundle endpoint');
  return `https://127.0.0.1:${address.port}/`;
}

async function startSpoke(relationship: RelationshipSettings, stateDir: string): Promise<TestAgent> {
  const spoke = await startTestAgent(spokeEntries, {
    stateDir,
    federation: { relationships: [relationship] },
    admin: { host: '127.0.0.1', port: 0 },
  });
  agents.push(spoke);
  return spoke;
}

async function hubBundleSeenBy(spoke: TestAgent): Promise<SpiffeBundle | undefined> {
  const client = new WorkloadClient({ address: spoke.address });
  try {
    const x509 = await client.fetchX509Bundles();
    const jwt = await client.fetchJwtBundles();
    const x = x509.getX509Bundle(HUB);
    const j = jwt.getJwtBundle(HUB);
    assert.equal(x === undefined, j === undefined, 'X.509 and JWT bundles of the hub arrive together');
    return x509.bundles().find((b) => b.trustDomain.equals(HUB));
  } finally {
    client.close();
  }
}

async function admin(agent: TestAgent, path: string): Promise<{ status: number; text: string }> {
  const address = agent.agent.adminAddress;
  assert.ok(address);
  const res = await fetch(`http://127.0.0.1:${address.port}${path}`);
  return { status: res.status, text: await res.text() };
}

describe('federation between two agents (https_spiffe)', () => {
  it('fetches, delivers, survives a dark endpoint and a restart, and follows a key rotation', async () => {
    const hub = await startHub({ ca: { ttlSeconds: 12 }, svid: { x509TtlSeconds: 2 } });
    const stateDir = join(tempDir(), 'spoke-state');
    const bootstrap = join(tempDir(), 'hub-bootstrap.json');
    writeFileSync(bootstrap, hub.agent.ca.bundle.marshal());
    const relationship: RelationshipSettings = {
      trustDomain: HUB,
      url: endpointUrl(hub),
      profile: 'https_spiffe',
      endpointSpiffeId: ENDPOINT_ID,
      bootstrapBundle: bootstrap,
    };
    let spoke = await startSpoke(relationship, stateDir);
    const [status] = (await spoke.agent.federation?.refreshNow()) ?? [];
    assert.equal(status?.lastError, undefined, status?.lastError?.message);
    assert.equal(status?.source, 'endpoint');

    // Delivered: the spoke's workload (federatesWith hub.test) gets the hub's X.509 and JWT authorities.
    const delivered = await hubBundleSeenBy(spoke);
    assert.deepEqual(
      delivered?.x509Authorities.map((c) => c.fingerprint256),
      hub.agent.ca.bundle.x509Authorities.map((c) => c.fingerprint256),
    );

    // The hub rotates its CA (the next one is published at half-life): the spoke follows without a restart.
    const before = hub.agent.ca.bundle.x509Authorities.length;
    await waitFor<number>(
      (listener) => {
        const on = () => listener(hub.agent.ca.bundle.x509Authorities.length);
        hub.agent.ca.on('bundle', on);
        return () => hub.agent.ca.off('bundle', on);
      },
      (n) => n > before,
      'the hub to publish its next CA',
    );
    await spoke.agent.federation?.refreshNow();
    const rotated = await hubBundleSeenBy(spoke);
    assert.equal(rotated?.x509Authorities.length, hub.agent.ca.bundle.x509Authorities.length);
    assert.equal(spoke.agent.federation?.list()[0]?.status?.bundle?.sequence, hub.agent.ca.bundle.sequence);

    // Ready, with the relationship's age in /readyz and in the metrics.
    let readyz = await admin(spoke, '/readyz');
    assert.equal(readyz.status, 200, readyz.text);
    assert.match(readyz.text, /federation:hub\.test/);
    assert.match(readyz.text, /bundle from endpoint/);
    let metrics = await admin(spoke, '/metrics');
    assert.match(metrics.text, /ksp_federation_bundle_age_seconds\{trust_domain="hub\.test"\} \d/);
    assert.match(
      metrics.text,
      /ksp_federation_fetches_total\{trust_domain="hub\.test",result="updated"\} [1-9]/,
    );

    // The hub goes dark: the spoke keeps the last bundle and says so.
    const held = hub.agent.ca.bundle;
    await hub.close();
    const [dark] = (await spoke.agent.federation?.refreshNow()) ?? [];
    assert.ok(dark?.lastError, 'the failed fetch is reported');
    assert.equal(dark?.consecutiveFailures, 1);
    assert.equal(dark?.bundle?.sequence, held.sequence, 'the last good bundle is kept');
    assert.deepEqual(
      dark?.bundle?.x509Authorities.map((c) => c.fingerprint256),
      held.x509Authorities.map((c) => c.fingerprint256),
    );
    assert.deepEqual(
      (await hubBundleSeenBy(spoke))?.x509Authorities.map((c) => c.fingerprint256),
      held.x509Authorities.map((c) => c.fingerprint256),
    );
    readyz = await admin(spoke, '/readyz');
    assert.equal(readyz.status, 200, 'a dark endpoint does not make the agent unready');
    assert.match(readyz.text, /1 failure\(s\) since, last ERR_FEDERATION_/);
    metrics = await admin(spoke, '/metrics');
    assert.match(
      metrics.text,
      /ksp_federation_fetch_errors_total\{trust_domain="hub\.test",code="ERR_FEDERATION_[A-Z_]+"\} 1/,
    );

    // The spoke restarts while the hub is still dark: the fetched bundle comes back from the state directory.
    await spoke.close();
    // What an operator sees with the agent stopped: the held bundle and the endpoint's last error.
    const listed = await runCli(['bundle', 'list', '--state-dir', stateDir]);
    assert.equal(listed.status, 0, listed.stderr);
    assert.match(
      listed.stdout,
      /^hub\.test\n {2}bundle: {7}2 X\.509 and 2 JWT authorities, sequence \d+\n {2}source: {7}endpoint \(https:/m,
    );
    assert.match(listed.stdout, /last error: {3}ERR_FEDERATION_FETCH at .* \(1 failure\(s\) in a row\)/);
    spoke = await startSpoke(relationship, stateDir);
    assert.equal(spoke.agent.federation?.list()[0]?.status?.source, 'endpoint');
    assert.deepEqual(
      (await hubBundleSeenBy(spoke))?.x509Authorities.map((c) => c.fingerprint256),
      held.x509Authorities.map((c) => c.fingerprint256),
      'restored, not the bootstrap bundle',
    );

    // The relationship is removed from the configuration: the bundle fetched for it is no longer trusted.
    await spoke.close();
    const without = await startTestAgent(spokeEntries, { stateDir, federation: { relationships: [] } });
    agents.push(without);
    assert.equal(await hubBundleSeenBy(without), undefined);
  });

  it('refuses an endpoint whose SVID has another SPIFFE ID, keeping the bootstrap bundle', async () => {
    const hub = await startHub();
    const bootstrap = join(tempDir(), 'hub-bootstrap.json');
    writeFileSync(bootstrap, hub.agent.ca.bundle.marshal());
    const spoke = await startSpoke(
      {
        trustDomain: HUB,
        url: endpointUrl(hub),
        profile: 'https_spiffe',
        endpointSpiffeId: SpiffeId.fromPath(HUB, '/spire/server'),
        bootstrapBundle: bootstrap,
      },
      join(tempDir(), 'state'),
    );
    const [status] = (await spoke.agent.federation?.refreshNow()) ?? [];
    assert.match(status?.lastError?.code ?? '', /^ERR_FEDERATION_/);
    assert.match(status?.lastError?.message ?? '', /spiffe:\/\/hub\.test\/spire\/server/);
    assert.equal(status?.source, 'bootstrap');
  });
});

describe('first contact and repair with bundle set', () => {
  it('an https_spiffe relationship without a usable bundle is repaired by a set bundle and SIGHUP', async () => {
    const hub = await startHub();
    const stateDir = join(tempDir(), 'spoke-state');
    // A stale bootstrap bundle: some other CA of the hub's trust domain, so the endpoint cannot be authenticated.
    const stale = await LocalCa.create({ trustDomain: HUB });
    const bootstrap = join(tempDir(), 'stale.json');
    writeFileSync(bootstrap, stale.bundle.marshal());
    stale.close();
    const spoke = await startSpoke(
      {
        trustDomain: HUB,
        url: endpointUrl(hub),
        profile: 'https_spiffe',
        endpointSpiffeId: ENDPOINT_ID,
        bootstrapBundle: bootstrap,
      },
      stateDir,
    );
    const [refused] = (await spoke.agent.federation?.refreshNow()) ?? [];
    assert.equal(refused?.lastError?.code, 'ERR_FEDERATION_UNTRUSTED');

    // What `kube-svid-proxy bundle set` does, then SIGHUP.
    const store = await FederationStore.open(await StateDir.open(stateDir));
    await store.save(HUB, { bundle: hub.agent.ca.bundle, source: 'set', fetchedAt: new Date() });
    await spoke.agent.reload();
    const [status] = spoke.agent.federation?.list().map((t) => t.status) ?? [];
    assert.equal(status?.consecutiveFailures, 0, status?.lastError?.message);
    assert.equal(status?.source, 'endpoint', 'fetched from the endpoint, authenticated by the set bundle');
    assert.deepEqual(
      (await hubBundleSeenBy(spoke))?.x509Authorities.map((c) => c.fingerprint256),
      hub.agent.ca.bundle.x509Authorities.map((c) => c.fingerprint256),
    );
  });
});

describe('federation between two agents (https_web)', () => {
  it('serves the bundle with a Web-PKI certificate, and the spoke fetches it trusting only that CA', async () => {
    const dir = tempDir();
    const now = Date.now();
    const root = await makeCa({
      subject: 'CN=test web root',
      notBefore: new Date(now - HOUR),
      notAfter: new Date(now + 24 * HOUR),
    });
    const leaf = await makeLeaf({
      subject: 'CN=localhost',
      issuer: root,
      notBefore: new Date(now - HOUR),
      notAfter: new Date(now + 24 * HOUR),
      keys: await generateKeys(),
      extensions: [
        new x509.SubjectAlternativeNameExtension([
          { type: 'dns', value: 'localhost' },
          { type: 'ip', value: '127.0.0.1' },
        ]),
      ],
    });
    writeFileSync(join(dir, 'tls.crt'), leaf.node.toString());
    writeFileSync(join(dir, 'tls.key'), leaf.keyPem);
    writeFileSync(join(dir, 'root.pem'), root.node.toString());
    const hub = await startHub({
      federation: {
        bundleEndpoint: {
          listen: { host: '127.0.0.1', port: 0 },
          path: '/bundle',
          refreshHintSeconds: 60,
          tls: { profile: 'https_web', certFile: join(dir, 'tls.crt'), keyFile: join(dir, 'tls.key') },
        },
        relationships: [],
      },
    });
    const spoke = await startSpoke(
      {
        trustDomain: HUB,
        url: `https://localhost:${hub.agent.federation?.endpointAddress?.port}/bundle`,
        profile: 'https_web',
        caFile: join(dir, 'root.pem'),
      },
      join(tempDir(), 'state'),
    );
    const [status] = (await spoke.agent.federation?.refreshNow()) ?? [];
    assert.equal(status?.lastError, undefined, status?.lastError?.message);
    assert.deepEqual(
      (await hubBundleSeenBy(spoke))?.x509Authorities.map((c) => c.fingerprint256),
      hub.agent.ca.bundle.x509Authorities.map((c) => c.fingerprint256),
    );
    assert.equal(status?.bundle?.sequence, hub.agent.ca.bundle.sequence);
  });
});
