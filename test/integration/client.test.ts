/**
 * The client mode (`kube-svid-proxy client`) in front of a real spoke proxy, both on the Workload API of the real
 * bundled agent, with short SVIDs so that both rotate during the test. The spoke's upstream is a RECORDING
 * STAND-IN for kube-apiserver (HTTP/2 over TLS): it answers with what it received.
 */
import assert from 'node:assert/strict';
import { statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { makeDevPki } from '../../certs-dev/devpki.ts';
import { type RunningClient, startClient } from '../../src/client/client.ts';
import { parseClientConfig } from '../../src/client/config.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import { entryFor, startTestAgent, type TestAgent, TRUST_DOMAIN } from '../helpers/agent.ts';
import { type Http2StandIn, listenHttp2StandIn, memoryAudit, until } from '../helpers/proxy-fixture.ts';

const uid = process.getuid?.() ?? 0;
const CONTROLLER = `spiffe://${TRUST_DOMAIN}/ns/flux-system/sa/kustomize-controller`;
const PROXY = `spiffe://${TRUST_DOMAIN}/kube-svid-proxy`;

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

function get(url: string, path: string, headers: http.OutgoingHttpHeaders = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request(`${url}${path}`, { headers, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        body += d;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Sends bytes exactly as given (a request target Node's client would not send) and reads the whole answer. */
function raw(port: number, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(text));
    let got = '';
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      got += d;
    });
    socket.on('end', () => resolve(got));
    socket.on('error', reject);
  });
}

describe('client mode: local HTTP to a spoke proxy over SPIFFE mTLS', () => {
  let agent: TestAgent;
  let upstream: Http2StandIn;
  let proxy: RunningProxy;
  let client: RunningClient;
  const audit = memoryAudit();
  /** What the stand-in received: method, path, impersonated user. */
  const seen: { method: string; path: string; user: string | undefined }[] = [];
  /** Watch responses the stand-in holds open, written to on demand. */
  const watches: http2.Http2ServerResponse[] = [];

  before(async () => {
    agent = await startTestAgent(
      `entries:\n${entryFor(uid, 'kube-svid-proxy', '    hint: proxy\n    dnsNames: [localhost]\n    x509SvidTtl: 4s\n')}` +
        entryFor(uid, 'ns/flux-system/sa/kustomize-controller', '    hint: client\n    x509SvidTtl: 4s\n'),
      { svid: { rotationJitter: 0 } },
    );
    const pki = await makeDevPki();
    upstream = await listenHttp2StandIn(pki, {}, (req, res) => {
      const user = req.headers['impersonate-user'] as string | undefined;
      seen.push({ method: req.method, path: req.url, user });
      if (req.url.includes('watch=true')) {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write(`${JSON.stringify({ type: 'ADDED', n: 0 })}\n`);
        watches.push(res);
        return;
      }
      let body = '';
      req.setEncoding('utf8');
      req.on('data', (d: string) => {
        body += d;
      });
      req.on('end', () => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(
          JSON.stringify({
            user,
            path: req.url,
            method: req.method,
            body,
            extra: req.headers['impersonate-extra-spiffe.io%2fid'],
          }),
        );
      });
    });
    writeFileSync(join(agent.dir, 'upstream-ca.pem'), pki.spoke.rootPem);
    writeFileSync(
      join(agent.dir, 'policy.yaml'),
      `rules:\n  - name: flux\n    match:\n      id: ${CONTROLLER}\n    identity:\n      user: flux\n      extra:\n        spiffe.io/id: ["{id}"]\n`,
    );
    proxy = await startProxy(
      parseProxyConfig(
        `trustDomain: ${TRUST_DOMAIN}
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
policyFile: policy.yaml
identity: { workloadApi: { socket: ${agent.address}, hint: proxy } }
upstream: { url: "https://127.0.0.1:${upstream.port}", caFile: upstream-ca.pem }
readiness: { minSvidRemaining: 1s }
`,
        join(agent.dir, 'proxy.yaml'),
      ),
      { logger: silentLogger(), audit: audit.sink, defaultMetrics: false, probeIntervalMs: 60_000 },
    );
    client = await startClient(
      parseClientConfig(
        `workloadApi: { socket: ${agent.address}, hint: client }
admin: { listen: 127.0.0.1:0 }
timeouts: { requestHeaders: 1s, idle: 2s }
spokes:
  - name: spoke-a
    listen: 127.0.0.1:0
    server: https://localhost:${proxy.port}
    serverId: ${PROXY}
  - name: wrong-id
    listen: 127.0.0.1:0
    server: https://localhost:${proxy.port}
    serverId: spiffe://${TRUST_DOMAIN}/somebody-else
  - name: wrong-domain
    listen: 127.0.0.1:0
    server: https://localhost:${proxy.port}
    trustDomain: other.example.org
  - name: on-a-socket
    listen: unix://${join(agent.dir, 'client-spoke.sock')}
    server: https://localhost:${proxy.port}
    trustDomain: ${TRUST_DOMAIN}
`,
        join(agent.dir, 'client.yaml'),
      ),
      { logger: silentLogger(), defaultMetrics: false },
    );
  });

  after(async () => {
    for (const w of watches) w.end();
    await client?.close();
    await proxy?.close();
    await upstream?.close();
    await agent?.close();
  });

  const url = (name: string): string => {
    const listener = client.listeners.find((l) => l.spoke.config.name === name);
    assert.ok(listener?.url);
    return listener.url;
  };

  it('forwards an HTTP/1.1 request with the request target exactly as received, as the mapped identity', async () => {
    const path = '/api/v1/namespaces/apps/configmaps?labelSelector=app%3Dweb&limit=500';
    const answer = await get(url('spoke-a'), path);
    assert.equal(answer.status, 200);
    const body = JSON.parse(answer.body) as { user: string; path: string; extra: string };
    assert.equal(body.user, 'flux');
    assert.equal(body.path, path);
    assert.equal(body.extra, CONTROLLER);
  });

  it("forwards a request body (an apply PATCH) and the caller's own Impersonate-* headers for the spoke to judge", async () => {
    const answer = await new Promise<Answer>((resolve, reject) => {
      const req = http.request(
        `${url('spoke-a')}/api/v1/namespaces/apps/configmaps/x?fieldManager=kustomize-controller`,
        { method: 'PATCH', headers: { 'content-type': 'application/apply-patch+yaml' }, agent: false },
        (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (d: string) => {
            body += d;
          });
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
        },
      );
      req.on('error', reject);
      req.end('kind: ConfigMap\n');
    });
    assert.equal(answer.status, 200);
    assert.deepEqual(JSON.parse(answer.body).body, 'kind: ConfigMap\n');
    // The spoke refuses nested impersonation its policy does not allow: the header reached it unchanged.
    const nested = await get(url('spoke-a'), '/api', { 'impersonate-user': 'system:admin' });
    assert.equal(nested.status, 403);
  });

  it('speaks h2c with prior knowledge too', async () => {
    const session = http2.connect(url('spoke-a'));
    try {
      const answer = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        const stream = session.request({ ':path': '/apis?h2c=1' });
        let body = '';
        let status = 0;
        stream.setEncoding('utf8');
        stream.on('response', (h) => {
          status = Number(h[':status']);
        });
        stream.on('data', (d: string) => {
          body += d;
        });
        stream.on('end', () => resolve({ status, body }));
        stream.on('error', reject);
      });
      assert.equal(answer.status, 200);
      assert.equal(JSON.parse(answer.body).path, '/apis?h2c=1');
    } finally {
      session.close();
    }
  });

  it('keeps a watch open across SVID rotations while new requests use the new SVID', async () => {
    const events: string[] = [];
    const req = http.request(`${url('spoke-a')}/api/v1/configmaps?watch=true`, { agent: false });
    const response = await new Promise<http.IncomingMessage>((resolve, reject) => {
      req.on('response', resolve);
      req.on('error', reject);
      req.end();
    });
    assert.equal(response.statusCode, 200);
    response.setEncoding('utf8');
    response.on('data', (d: string) => events.push(d));
    const before = client.rotations;
    const watch = watches.at(-1);
    assert.ok(watch);
    // Two rotations of the client's SVID (4 s, rotated at half-life) while the watch stays open.
    await until('two client SVID rotations', () => client.rotations >= before + 2, 30_000);
    watch.write(`${JSON.stringify({ type: 'MODIFIED', n: 1 })}\n`);
    await until('the event after the rotations', () => events.join('').includes('"n":1'));
    assert.equal(response.destroyed, false);
    // A new request after the rotations: a new session with the new SVID, still the same identity.
    const answer = await get(url('spoke-a'), '/version');
    assert.equal(answer.status, 200);
    assert.equal(JSON.parse(answer.body).user, 'flux');
    req.destroy();
  });

  it('refuses a server whose SPIFFE ID is not the configured serverId, before sending the request', async () => {
    const before = seen.length;
    const answer = await get(url('wrong-id'), '/api/v1/secrets');
    assert.equal(answer.status, 502);
    assert.equal(answer.headers['x-kube-svid-proxy-error'], 'ERR_CLIENT_SERVER_REFUSED');
    const status = JSON.parse(answer.body) as { kind: string; message: string };
    assert.equal(status.kind, 'Status');
    assert.match(status.message, new RegExp(`is ${PROXY}, not the configured serverId`));
    assert.equal(seen.length, before);
  });

  it('refuses a server outside the configured trust domain', async () => {
    const answer = await get(url('wrong-domain'), '/api');
    assert.equal(answer.status, 502);
    assert.match(answer.body, /outside the configured trustDomain other\.example\.org/);
  });

  it('refuses a request target that is not origin-form, without forwarding it', async () => {
    const before = seen.length;
    const port = Number(new URL(url('spoke-a')).port);
    const text = await raw(
      port,
      'GET http://evil.example/api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
    );
    assert.match(text, /^HTTP\/1\.1 400 /);
    assert.match(text, /ERR_CLIENT_BAD_REQUEST/);
    assert.equal(seen.length, before);
  });

  it("tunnels an upgrade: the spoke proxy answers it (here: refused by the stand-in's upstream)", async () => {
    const port = Number(new URL(url('spoke-a')).port);
    const text = await raw(
      port,
      'POST /api/v1/namespaces/apps/pods/web/exec?command=sh HTTP/1.1\r\nHost: x\r\n' +
        'Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n',
    );
    // The stand-in speaks HTTP/2 only, so the spoke proxy cannot upgrade it: the answer is the spoke's, not ours.
    assert.match(text, /^HTTP\/1\.1 \d{3} /);
    assert.doesNotMatch(text, /ERR_CLIENT_/);
    const audited = audit.events.find((e) => e.requestURI.includes('/pods/web/exec'));
    assert.ok(audited, 'the spoke proxy saw the upgrade request');
    assert.equal(audited.user.username, CONTROLLER);
    assert.equal(audited.impersonatedUser?.username, 'flux');
  });

  it('listens on a Unix socket of mode 0600 as well', async () => {
    const path = join(agent.dir, 'client-spoke.sock');
    assert.equal(statSync(path).mode & 0o777, 0o600);
    const answer = await new Promise<Answer>((resolve, reject) => {
      const req = http.request({ socketPath: path, path: '/api?via=socket', agent: false }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => {
          body += d;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      });
      req.on('error', reject);
      req.end();
    });
    assert.equal(answer.status, 200);
    assert.equal(JSON.parse(answer.body).path, '/api?via=socket');
  });

  it('closes a connection that sends half a request head (timeouts.requestHeaders), not one with a quiet h2c watch (timeouts.idle)', async () => {
    const port = Number(new URL(url('spoke-a')).port);
    // Half a request head, then nothing: the connection goes (the socket ends) with no answer forwarded.
    const before = seen.length;
    const half = await raw(port, 'GET /api HTTP/1.1\r\nHost: x\r\n');
    assert.equal(half, '');
    assert.equal(seen.length, before);
    // An h2c watch with nothing on the wire for longer than timeouts.idle is in flight, so not idle.
    const session = http2.connect(url('spoke-a'));
    try {
      const stream = session.request({ ':path': '/api/v1/pods?watch=true&h2c=1' });
      let got = '';
      stream.setEncoding('utf8');
      stream.on('data', (d: string) => {
        got += d;
      });
      await until('the h2c watch to open', () => got.includes('"n":0'));
      await new Promise((r) => setTimeout(r, 3000));
      const watch = watches.at(-1);
      assert.ok(watch);
      watch.write(`${JSON.stringify({ type: 'MODIFIED', n: 2 })}\n`);
      await until('the event after a quiet spell', () => got.includes('"n":2'));
      assert.equal(stream.destroyed, false);
    } finally {
      session.destroy();
    }
  });

  it('counts what it did in its metrics and is ready with an SVID', async () => {
    const port = client.admin.address.port;
    const metrics = await get(`http://127.0.0.1:${port}`, '/metrics');
    assert.match(metrics.body, /ksp_client_requests_total\{spoke="spoke-a",code="200"\} \d+/);
    assert.match(metrics.body, /ksp_client_upstream_connects_total\{spoke="wrong-id",result="refused"\} \d+/);
    assert.match(metrics.body, /ksp_client_svid_rotations_total [1-9]/);
    const ready = await get(`http://127.0.0.1:${port}`, '/readyz');
    assert.equal(ready.status, 200);
    assert.match(ready.body, /ns\/flux-system\/sa\/kustomize-controller/);
  });
});
