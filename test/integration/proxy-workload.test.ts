/**
 * The proxy with its identity from the Workload API of the real bundled agent: its serving SVID rotates, new
 * handshakes get the new certificate, and connections opened before keep working. The upstream is a RECORDING
 * STAND-IN for kube-apiserver (HTTP/2 over TLS, serving the dev PKI's spoke certificate).
 */
import assert from 'node:assert/strict';
import type { X509Certificate } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import http2 from 'node:http2';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { makeDevPki } from '../../certs-dev/devpki.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import { X509Source } from '../../src/workload/client.ts';
import { entryFor, startTestAgent, type TestAgent, TRUST_DOMAIN } from '../helpers/agent.ts';
import { type Http2StandIn, listenHttp2StandIn, memoryAudit } from '../helpers/proxy-fixture.ts';

const uid = process.getuid?.() ?? 0;
const CLIENT = `spiffe://${TRUST_DOMAIN}/client`;

describe('the proxy on the Workload API', () => {
  let agent: TestAgent;
  let upstream: Http2StandIn;
  let proxy: RunningProxy;
  let client: X509Source;

  before(async () => {
    agent = await startTestAgent(
      `entries:\n${entryFor(uid, 'kube-svid-proxy', '    hint: proxy\n    dnsNames: [localhost]\n    x509SvidTtl: 4s\n')}` +
        entryFor(uid, 'client', '    hint: client\n'),
      { svid: { rotationJitter: 0 } },
    );
    const pki = await makeDevPki();
    upstream = await listenHttp2StandIn(pki, {}, (req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ user: req.headers['impersonate-user'] }));
    });
    writeFileSync(join(agent.dir, 'upstream-ca.pem'), pki.spoke.rootPem);
    const policyFile = join(agent.dir, 'policy.yaml');
    writeFileSync(
      policyFile,
      `rules:\n  - name: client\n    match:\n      id: ${CLIENT}\n    identity:\n      user: workload-client\n`,
    );
    const config = parseProxyConfig(
      `trustDomain: ${TRUST_DOMAIN}
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
policyFile: policy.yaml
identity:
  workloadApi:
    socket: ${agent.address}
    hint: proxy
upstream:
  url: https://127.0.0.1:${upstream.port}
  caFile: upstream-ca.pem
readiness:
  minSvidRemaining: 1s
`,
      join(agent.dir, 'proxy.yaml'),
    );
    proxy = await startProxy(config, {
      logger: silentLogger(),
      audit: memoryAudit().sink,
      defaultMetrics: false,
      probeIntervalMs: 60_000,
    });
    client = await X509Source.create({ address: agent.address });
  });

  after(async () => {
    client?.close();
    await proxy?.close();
    await upstream?.close();
    await agent?.close();
  });

  const clientTls = () => {
    const svid = client.svid('client');
    return {
      servername: 'localhost',
      cert: svid.certificates.map((c) => c.toString()).join(''),
      key: svid.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
      ca: client.bundles.allX509Authorities().map((c) => c.toString()),
    };
  };

  /** The serial of the certificate a fresh handshake gets. */
  function servingSerial(): Promise<string> {
    return new Promise((resolve, reject) => {
      const socket = tls.connect({ host: '127.0.0.1', port: proxy.port, ...clientTls() }, () => {
        const serial = socket.getPeerX509Certificate()?.serialNumber ?? '';
        socket.destroy();
        resolve(serial);
      });
      socket.on('error', reject);
    });
  }

  function get(session: http2.ClientHttp2Session): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const stream = session.request({ ':path': '/version' });
      let status = 0;
      let body = '';
      stream.on('response', (h) => {
        status = Number(h[':status']);
      });
      stream.setEncoding('utf8');
      stream.on('data', (c: string) => {
        body += c;
      });
      stream.on('end', () => resolve({ status, body }));
      stream.on('error', reject);
      stream.end();
    });
  }

  it('serves the SVID the agent issued for its hint, and authenticates an agent-issued client', async () => {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, clientTls());
    try {
      const r = await get(session);
      assert.equal(r.status, 200, r.body);
      assert.deepEqual(JSON.parse(r.body), { user: 'workload-client' });
      const serving = (session.socket as tls.TLSSocket).getPeerX509Certificate() as X509Certificate;
      assert.match(serving.subjectAltName ?? '', new RegExp(`URI:spiffe://${TRUST_DOMAIN}/kube-svid-proxy`));
    } finally {
      session.close();
    }
  });

  it('swaps its certificate on rotation for new handshakes while open connections keep working', async () => {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, clientTls());
    try {
      assert.equal((await get(session)).status, 200);
      const first = await servingSerial();
      let next = first;
      for (let i = 0; i < 100 && next === first; i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        next = await servingSerial();
      }
      assert.notEqual(next, first, 'a new handshake gets the rotated SVID');
      assert.equal((await get(session)).status, 200, 'the connection opened before still works');
      assert.equal(session.closed || session.destroyed, false);
    } finally {
      session.close();
    }
  });

  it('is ready on the admin port with an SVID, a live Workload API, a policy, a reachable upstream and room', async () => {
    const res = await fetch(`http://127.0.0.1:${proxy.admin.address.port}/readyz`);
    const report = (await res.json()) as { ready: boolean; checks: { name: string; ok: boolean }[] };
    assert.equal(res.status, 200, JSON.stringify(report));
    assert.deepEqual(
      report.checks.map((c) => [c.name, c.ok]),
      [
        ['svid', true],
        ['identitySource', true],
        ['policy', true],
        ['upstream', true],
        ['capacity', true],
        ['shutdown', true],
      ],
    );
  });

  it('goes unready and closes new connections when the agent withdraws its SVID, and recovers when it returns', async () => {
    const readyz = async (): Promise<{
      status: number;
      checks: { name: string; ok: boolean; detail: string }[];
    }> => {
      const res = await fetch(`http://127.0.0.1:${proxy.admin.address.port}/readyz`);
      return {
        status: res.status,
        ...((await res.json()) as { checks: { name: string; ok: boolean; detail: string }[] }),
      };
    };
    const until = async (what: string, check: () => Promise<boolean>): Promise<void> => {
      for (let i = 0; i < 200; i++) {
        if (await check()) return;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      throw new Error(`timed out waiting for ${what}`);
    };
    const entries = `entries:\n${entryFor(uid, 'kube-svid-proxy', '    hint: proxy\n    dnsNames: [localhost]\n    x509SvidTtl: 4s\n')}${entryFor(uid, 'client', '    hint: client\n')}`;
    const tlsOptions = clientTls();
    /** A fresh connection's fate: answered (status) or closed without an answer (0). */
    const fresh = async (): Promise<number> => {
      const session = http2.connect(`https://127.0.0.1:${proxy.port}`, tlsOptions);
      session.on('error', () => {});
      try {
        return await new Promise<number>((resolve) => {
          const stream = session.request({ ':path': '/version' });
          stream.on('response', (h) => resolve(Number(h[':status'])));
          stream.on('error', () => resolve(0));
          stream.on('close', () => resolve(0));
          stream.resume();
          stream.end();
        });
      } finally {
        session.destroy();
      }
    };
    assert.equal(await fresh(), 200, 'the control: a fresh connection is served');
    try {
      // No entry matches this uid any more: the agent answers PermissionDenied on the proxy's stream.
      agent.writeEntries(`entries:\n${entryFor(uid + 1, 'someone-else')}`);
      await until('/readyz to fail', async () => (await readyz()).status === 503);
      const check = (await readyz()).checks.find((c) => c.name === 'identitySource');
      assert.equal(check?.ok, false);
      assert.match(check?.detail ?? '', /withdr/i);
      assert.equal(await fresh(), 0, 'a new connection is closed without being served');
      assert.match(
        await proxy.metrics.metrics(),
        /ksp_connections_closed_by_proxy_total\{reason="no_svid"\} [1-9]/,
        'closed by the proxy for want of an SVID',
      );
    } finally {
      agent.writeEntries(entries);
    }
    await until('/readyz to pass again', async () => (await readyz()).status === 200);
    assert.equal(await fresh(), 200, 'served again once the agent issues an SVID');
  });
});
