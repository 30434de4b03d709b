/**
 * Hub and spoke, end to end in one process: the hub's agent serves its bundle endpoint (https_spiffe); the spoke's
 * agent fetches it and delivers it on the Workload API to the proxy's entry (federatesWith the hub); the proxy
 * then accepts the hub's workload SVIDs, but only while its policy names the hub's trust domain. A CA rotation in
 * the hub reaches the proxy through a fetch, without a restart of anything. The upstream is a STAND-IN for
 * kube-apiserver (HTTP/2 over TLS, recording the impersonated user).
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import http2 from 'node:http2';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { makeDevPki } from '../../certs-dev/devpki.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import { SpiffeId, TrustDomain } from '../../src/spiffe/id.ts';
import { X509Source } from '../../src/workload/client.ts';
import { startTestAgent, type TestAgent, TRUST_DOMAIN } from '../helpers/agent.ts';
import {
  type Http2StandIn,
  listenHttp2StandIn,
  memoryAudit,
  pollFor,
  requestStatus,
} from '../helpers/proxy-fixture.ts';

const uid = process.getuid?.() ?? 0;
const HUB = TrustDomain.parse('hub.test');
const ENDPOINT_ID = SpiffeId.fromPath(HUB, '/kube-svid-proxy/bundle-endpoint');
const ARGOCD = 'spiffe://hub.test/argocd';

const policy = (withHub: boolean): string =>
  `rules:\n` +
  (withHub ? `  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: argocd\n` : '') +
  `  - name: ops\n    match:\n      id: spiffe://${TRUST_DOMAIN}/ops\n    identity:\n      user: ops\n`;

describe('hub and spoke: the proxy accepts the hub through the federated bundle', () => {
  let hub: TestAgent;
  let spoke: TestAgent;
  let upstream: Http2StandIn;
  let proxy: RunningProxy;
  let hubClient: X509Source;
  let spokeView: X509Source;
  let policyFile: string;

  before(async () => {
    hub = await startTestAgent(
      // Only the client's SVID is short-lived: the bundle endpoint's own SVID must stay signed by the CA the
      // spoke already knows, or an activation the spoke has not fetched yet would leave it unable to
      // authenticate the endpoint (what the rotation schedule's propagation delay prevents in production).
      `entries:\n  - spiffeId: ${ARGOCD}\n    selectors: ["unix:uid:${uid}"]\n    hint: argocd\n    x509SvidTtl: 2s\n`,
      {
        trustDomain: HUB,
        svid: { rotationJitter: 0 },
        federation: {
          bundleEndpoint: {
            listen: { host: '127.0.0.1', port: 0 },
            path: '/',
            refreshHintSeconds: 60,
            tls: { profile: 'https_spiffe', spiffeId: ENDPOINT_ID },
          },
          relationships: [],
        },
      },
    );
    const bootstrap = join(hub.dir, 'hub-bootstrap.json');
    writeFileSync(bootstrap, hub.agent.ca.bundle.marshal());
    spoke = await startTestAgent(
      `entries:\n  - spiffeId: spiffe://${TRUST_DOMAIN}/kube-svid-proxy\n    selectors: ["unix:uid:${uid}"]\n` +
        '    hint: proxy\n    dnsNames: [localhost]\n    federatesWith: [hub.test]\n',
      {
        stateDir: join(hub.dir, 'spoke-state'),
        federation: {
          relationships: [
            {
              trustDomain: HUB,
              url: `https://127.0.0.1:${hub.agent.federation?.endpointAddress?.port}/`,
              profile: 'https_spiffe',
              endpointSpiffeId: ENDPOINT_ID,
              bootstrapBundle: bootstrap,
            },
          ],
        },
      },
    );
    await spoke.agent.federation?.refreshNow();

    const pki = await makeDevPki();
    upstream = await listenHttp2StandIn(pki, {}, (req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ user: req.headers['impersonate-user'] }));
    });
    writeFileSync(join(spoke.dir, 'upstream-ca.pem'), pki.spoke.rootPem);
    policyFile = join(spoke.dir, 'policy.yaml');
    writeFileSync(policyFile, policy(true));
    const config = parseProxyConfig(
      `trustDomain: ${TRUST_DOMAIN}
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
      join(spoke.dir, 'proxy.yaml'),
    );
    proxy = await startProxy(config, {
      logger: silentLogger(),
      audit: memoryAudit().sink,
      defaultMetrics: false,
      probeIntervalMs: 60_000,
    });
    hubClient = await X509Source.create({ address: hub.address });
    spokeView = await X509Source.create({ address: spoke.address });
  });

  after(async () => {
    hubClient?.close();
    spokeView?.close();
    await proxy?.close();
    await upstream?.close();
    await spoke?.close();
    await hub?.close();
  });

  /** One request from the hub's Argo CD with its current SVID: the status and body. */
  async function asArgocd(): Promise<{ status: number; body: string }> {
    const svid = hubClient.svid('argocd');
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, {
      servername: 'localhost',
      cert: svid.certificates.map((c) => c.toString()).join(''),
      key: svid.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
      // The client trusts the spoke's bundle (in production: delivered to it by federation the other way).
      ca: spokeView.bundles
        .getX509Bundle(TrustDomain.parse(TRUST_DOMAIN))
        ?.authorities.map((c) => c.toString()),
    });
    session.on('error', () => {});
    try {
      return await requestStatus(session, '/version');
    } finally {
      session.close();
    }
  }

  it("accepts the hub's SVID through the bundle the spoke fetched, and impersonates its user", async () => {
    const r = await asArgocd();
    assert.equal(r.status, 200, r.body);
    assert.deepEqual(JSON.parse(r.body), { user: 'argocd' });
  });

  it('refuses the same SVID once the policy no longer names the hub, though the bundle is still delivered', async () => {
    writeFileSync(policyFile, policy(false));
    const refused = await pollFor(asArgocd, (r) => r.status !== 200);
    assert.equal(refused.status, 401, refused.body);
    assert.ok(spokeView.bundles.getX509Bundle(HUB), 'the hub bundle still reaches the proxy');
    writeFileSync(policyFile, policy(true));
    assert.equal((await pollFor(asArgocd, (r) => r.status === 200)).status, 200);
  });

  it("follows the hub's CA rotation through a fetch, without restarting the proxy or the agents", async () => {
    const firstCa = hubClient.svid('argocd').certificates[0]?.issuer;
    // The hub rotates at once, without waiting for peers to fetch the announcement (the schedule would wait).
    await hub.agent.ca.prepare();
    await hub.agent.ca.activate();
    const rotated = await pollFor(
      async () => hubClient.svid('argocd').certificates[0]?.issuer,
      (issuer) => issuer !== firstCa,
    );
    assert.notEqual(rotated, firstCa, "the hub's new CA signs the client's SVID");
    // The spoke has not fetched since: the proxy does not know the new CA yet.
    const before = await asArgocd();
    assert.equal(before.status, 401, before.body);
    assert.match(before.body, /ERR_X509_UNTRUSTED/);
    // One fetch of the hub's endpoint (what the poll does at the refresh hint) brings it to the proxy.
    const [status] = (await spoke.agent.federation?.refreshNow()) ?? [];
    assert.equal(status?.bundle?.sequence, hub.agent.ca.bundle.sequence);
    const after = await pollFor(asArgocd, (v) => v.status === 200);
    assert.equal(after.status, 200, after.body);
    assert.deepEqual(JSON.parse(after.body), { user: 'argocd' });
  });
});
