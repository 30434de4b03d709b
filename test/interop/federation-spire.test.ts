/**
 * Federation with a real SPIRE server (v1.13.3, built by dev/peers/peers.ts), both ways:
 *   - SPIRE fetches our agent's bundle endpoint, under https_spiffe and under https_web;
 *   - our agent fetches SPIRE's endpoint (https_spiffe, endpoint ID spiffe://hub.test/spire/server);
 *   - a SPIRE-minted hub SVID is accepted by our proxy through the bundle our agent fetched, and an SVID of our
 *     agent is verified by go-spiffe with the bundle SPIRE learned from us;
 *   - a key rotation on either side reaches the other with a fetch, restarting nothing.
 * The proxy's upstream is a STAND-IN for kube-apiserver (HTTP/2 over TLS). Without Go this suite skips, saying
 * why; with KSP_REQUIRE_PEERS=1 (CI) a missing peer fails the run instead.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http2 from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { makeDevPki } from '../../certs-dev/devpki.ts';
import { peer } from '../../dev/peers/peers.ts';
import { type SpireServer, startSpireServer } from '../../dev/spire-server.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import { SpiffeBundle } from '../../src/spiffe/bundle.ts';
import { SpiffeId, TrustDomain } from '../../src/spiffe/id.ts';
import { X509Source } from '../../src/workload/client.ts';
import { startTestAgent, type TestAgent } from '../helpers/agent.ts';
import { makeWebPki, webServerCert, writeWebFiles } from '../helpers/federation.ts';
import {
  type Http2StandIn,
  listenHttp2StandIn,
  memoryAudit,
  pollFor,
  requestStatus,
} from '../helpers/proxy-fixture.ts';

const spire = peer('spire-server');
const probe = peer('gospiffe-probe');
const skip = 'skip' in spire ? spire.skip : 'skip' in probe ? probe.skip : false;
const spireBinary = 'path' in spire ? spire.path : '';
const probeBinary = 'path' in probe ? probe.path : '';
const run = promisify(execFile);

const uid = process.getuid?.() ?? 0;
const HUB = TrustDomain.parse('hub.test');
const SPOKE = TrustDomain.parse('spoke.test');
const WEB = TrustDomain.parse('spokeweb.test');
const ARGOCD = 'spiffe://hub.test/ns/argocd/sa/argocd-application-controller';
const OUR_ENDPOINT_ID = SpiffeId.fromPath(SPOKE, '/kube-svid-proxy/bundle-endpoint');

/** The X.509 authorities of a SPIFFE bundle document, as sorted SHA-256 fingerprints. */
function fingerprints(td: TrustDomain, json: string | undefined): string[] {
  assert.ok(json !== undefined, `no bundle of ${td.name}`);
  return SpiffeBundle.parse(td, json)
    .x509Authorities.map((c) => c.fingerprint256)
    .sort();
}

describe('federation with a real SPIRE server, both ways', { skip }, () => {
  let dir: string;
  let hub: SpireServer;
  let spoke: TestAgent;
  let web: TestAgent;
  let upstream: Http2StandIn;
  let proxy: RunningProxy;
  let spokeView: X509Source;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-spire-fed-'));
    // A private Web PKI for our https_web endpoint; SPIRE (Go) trusts its root through SSL_CERT_FILE.
    const webPki = await makeWebPki('spokeweb test root');
    const webFiles = { certFile: join(dir, 'web.crt'), keyFile: join(dir, 'web.key') };
    await writeWebFiles(webFiles, await webServerCert(webPki));
    writeFileSync(join(dir, 'web-root.pem'), webPki.caPem);

    hub = await startSpireServer({
      binary: spireBinary,
      trustDomain: HUB.name,
      dir: join(dir, 'spire'),
      bundleEndpoint: { profile: 'https_spiffe', refreshHint: '1m' },
      extraEnv: { SSL_CERT_FILE: join(dir, 'web-root.pem') },
      logLevel: 'INFO',
    });
    const hubBootstrap = join(dir, 'hub-bootstrap.json');
    writeFileSync(hubBootstrap, await hub.bundleShow('spiffe'));

    // Our spoke agent: serves its bundle endpoint (https_spiffe) and fetches SPIRE's.
    spoke = await startTestAgent(
      `entries:\n  - spiffeId: spiffe://spoke.test/kube-svid-proxy\n    selectors: ["unix:uid:${uid}"]\n` +
        '    hint: proxy\n    dnsNames: [localhost]\n    federatesWith: [hub.test]\n',
      {
        trustDomain: SPOKE,
        stateDir: join(dir, 'spoke-state'),
        svid: { x509TtlSeconds: 2, rotationJitter: 0 },
        federation: {
          bundleEndpoint: {
            listen: { host: '127.0.0.1', port: 0 },
            path: '/',
            refreshHintSeconds: 60,
            tls: { profile: 'https_spiffe', spiffeId: OUR_ENDPOINT_ID },
          },
          relationships: [
            {
              trustDomain: HUB,
              url: hub.bundleEndpointUrl as string,
              profile: 'https_spiffe',
              endpointSpiffeId: SpiffeId.parse(hub.serverSpiffeId),
              bootstrapBundle: hubBootstrap,
            },
          ],
        },
      },
    );
    // A second agent of ours serves its bundle under https_web.
    web = await startTestAgent(
      `entries:\n  - spiffeId: spiffe://spokeweb.test/w\n    selectors: ["unix:uid:${uid}"]\n`,
      {
        trustDomain: WEB,
        stateDir: join(dir, 'web-state'),
        federation: {
          bundleEndpoint: {
            listen: { host: '127.0.0.1', port: 0 },
            path: '/bundle',
            refreshHintSeconds: 60,
            tls: { profile: 'https_web', ...webFiles },
          },
          relationships: [],
        },
      },
    );

    // The proxy beside the spoke's apiserver, its identity and bundles from the spoke agent.
    const pki = await makeDevPki();
    upstream = await listenHttp2StandIn(pki, {}, (req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ user: req.headers['impersonate-user'] }));
    });
    writeFileSync(join(dir, 'upstream-ca.pem'), pki.spoke.rootPem);
    writeFileSync(
      join(dir, 'policy.yaml'),
      `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: argocd\n`,
    );
    proxy = await startProxy(
      parseProxyConfig(
        `trustDomain: ${SPOKE.name}
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
policyFile: policy.yaml
identity:
  workloadApi:
    socket: ${spoke.address}
    hint: proxy
upstream:
  url: https://127.0.0.1:${upstream.port}
  caFile: upstream-ca.pem
readiness:
  minSvidRemaining: 1s
`,
        join(dir, 'proxy.yaml'),
      ),
      { logger: silentLogger(), audit: memoryAudit().sink, defaultMetrics: false, probeIntervalMs: 60_000 },
    );
    spokeView = await X509Source.create({ address: spoke.address });
  });

  after(async () => {
    spokeView?.close();
    await proxy?.close();
    await spoke?.close();
    await web?.close();
    await hub?.stop();
    await upstream?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const ourEndpoint = (agent: TestAgent, path = '/'): string =>
    `https://127.0.0.1:${agent.agent.federation?.endpointAddress?.port}${path}`;

  /** One request to the proxy with a SPIRE-minted SVID: status and body. */
  async function asSpireWorkload(svid: {
    certPem: string;
    keyPem: string;
  }): Promise<{ status: number; body: string }> {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, {
      servername: 'localhost',
      cert: svid.certPem,
      key: svid.keyPem,
      ca: spokeView.bundles.getX509Bundle(SPOKE)?.authorities.map((c) => c.toString()),
    });
    session.on('error', () => {});
    try {
      return await requestStatus(session, '/version');
    } finally {
      session.close();
    }
  }

  /** go-spiffe's verdict on our proxy's current SVID, given the SPIFFE bundle SPIRE holds for our trust domain. */
  async function goSpiffeVerifies(): Promise<{ event: string; id?: string; error?: string }> {
    const bundle = await hub.federatedBundle(SPOKE.name, 'spiffe');
    assert.ok(bundle !== undefined, 'SPIRE holds a bundle of spoke.test');
    writeFileSync(join(dir, 'spire-view-of-spoke.json'), bundle);
    const svid = spokeView.svid('proxy');
    writeFileSync(join(dir, 'spoke-svid.pem'), svid.certificates.map((c) => c.toString()).join(''));
    const args = [
      'verify',
      '-svid',
      join(dir, 'spoke-svid.pem'),
      '-bundle',
      join(dir, 'spire-view-of-spoke.json'),
    ];
    args.push('-trust-domain', SPOKE.name);
    try {
      const { stdout } = await run(probeBinary, args);
      return JSON.parse(stdout.trim().split('\n').at(-1) as string);
    } catch (err) {
      const out = (err as { stdout?: string }).stdout ?? '';
      return JSON.parse(out.trim().split('\n').at(-1) || '{"event":"fatal"}');
    }
  }

  it('SPIRE fetches our bundle endpoint under https_spiffe, bootstrapped with our bundle', async () => {
    await hub.createFederation({
      trustDomain: SPOKE.name,
      url: ourEndpoint(spoke),
      profile: 'https_spiffe',
      endpointSpiffeId: OUR_ENDPOINT_ID.toString(),
      bundle: spoke.agent.ca.bundle.marshal(),
      bundleFormat: 'spiffe',
    });
    await hub.refreshFederation(SPOKE.name);
    assert.deepEqual(
      fingerprints(SPOKE, await hub.federatedBundle(SPOKE.name, 'spiffe')),
      fingerprints(SPOKE, spoke.agent.ca.bundle.marshal()),
    );
  });

  it('SPIRE fetches our bundle endpoint under https_web, trusting only Web PKI', async () => {
    await hub.createFederation({
      trustDomain: WEB.name,
      url: ourEndpoint(web, '/bundle'),
      profile: 'https_web',
    });
    await hub.refreshFederation(WEB.name);
    assert.deepEqual(
      fingerprints(WEB, await hub.federatedBundle(WEB.name, 'spiffe')),
      fingerprints(WEB, web.agent.ca.bundle.marshal()),
    );
  });

  it("our agent fetches SPIRE's https_spiffe endpoint and our proxy accepts a SPIRE-minted hub SVID", async () => {
    const [status] = (await spoke.agent.federation?.refreshNow()) ?? [];
    assert.equal(status?.lastError, undefined, status?.lastError?.message);
    assert.equal(status?.source, 'endpoint');
    assert.deepEqual(
      spokeView.bundles
        .getX509Bundle(HUB)
        ?.authorities.map((c) => c.fingerprint256)
        .sort(),
      fingerprints(HUB, await hub.bundleShow('spiffe')),
    );
    const r = await asSpireWorkload(await hub.mintX509(ARGOCD, '10m'));
    assert.equal(r.status, 200, r.body);
    assert.deepEqual(JSON.parse(r.body), { user: 'argocd' });
  });

  it("go-spiffe verifies our agent's SVID with the bundle SPIRE learned from us", async () => {
    const verdict = await goSpiffeVerifies();
    assert.equal(verdict.event, 'verified', verdict.error);
    assert.equal(verdict.id, 'spiffe://spoke.test/kube-svid-proxy');
  });

  it('a rotation in SPIRE reaches our proxy with one fetch, and a SPIRE SVID of the new authority is accepted', async () => {
    await hub.rotateX509Authority();
    const minted = await hub.mintX509(ARGOCD, '10m');
    // The new authority is not known on our side until our agent fetches SPIRE's endpoint.
    const before = await asSpireWorkload(minted);
    assert.equal(before.status, 401, before.body);
    // SPIRE caches its served bundle for a second: fetch until the new root arrives.
    const wanted = fingerprints(HUB, await hub.bundleShow('spiffe'));
    await pollFor(
      async () => {
        await spoke.agent.federation?.refreshNow();
        return spokeView.bundles
          .getX509Bundle(HUB)
          ?.authorities.map((c) => c.fingerprint256)
          .sort();
      },
      (seen) => JSON.stringify(seen) === JSON.stringify(wanted),
    );
    const after = await pollFor(
      () => asSpireWorkload(minted),
      (v) => v.status === 200,
    );
    assert.equal(after.status, 200, after.body);
  });

  it('a rotation in our agent reaches SPIRE with one fetch, and go-spiffe verifies the SVID of our new CA', async () => {
    await spoke.agent.ca.prepare();
    await hub.refreshFederation(SPOKE.name);
    assert.deepEqual(
      fingerprints(SPOKE, await hub.federatedBundle(SPOKE.name, 'spiffe')),
      fingerprints(SPOKE, spoke.agent.ca.bundle.marshal()),
      'SPIRE holds our next CA before it signs anything',
    );
    const firstIssuer = spokeView.svid('proxy').certificates[0]?.issuer;
    await spoke.agent.ca.activate();
    await pollFor(
      async () => spokeView.svid('proxy').certificates[0]?.issuer,
      (issuer) => issuer !== firstIssuer,
    );
    assert.notEqual(spokeView.svid('proxy').certificates[0]?.issuer, firstIssuer, 'our new CA signs');
    const verdict = await goSpiffeVerifies();
    assert.equal(verdict.event, 'verified', verdict.error);
  });
});
