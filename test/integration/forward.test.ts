/**
 * Forwarding, against an HTTPS STAND-IN for kube-apiserver (HTTP/2 and HTTP/1.1 with upgrades, recording what
 * reaches it): the multiplexed HTTP/2 upstream, streaming without buffering, large bodies, the upgrade path with
 * 101 and non-101 answers, header smuggling over HTTP/1.1 and HTTP/2, and the proxy's own 503 and 504.
 * The e2e suite repeats the essentials against the real kube-apiserver.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import http, { type IncomingHttpHeaders } from 'node:http';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { Upstream, UpstreamError } from '../../src/proxy/forward.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import {
  clientTls,
  type Http2StandIn,
  listenHttp2StandIn,
  memoryAudit,
  type ProxyFiles,
  proxyConfigYaml,
  writeProxyFiles,
} from '../helpers/proxy-fixture.ts';

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';

interface Seen {
  httpVersion: string;
  method: string | undefined;
  url: string | undefined;
  headers: IncomingHttpHeaders;
  rawHeaders: string[];
  bodySha?: string;
  bodyLength?: number;
}

describe('forwarding to kube-apiserver', () => {
  let pki: DevPki;
  let files: ProxyFiles;
  let upstream: Http2StandIn;
  let proxy: RunningProxy;
  let seen: Seen[] = [];
  let releaseSecondEvent: () => void = () => {};
  const reviews: { user: string; resourceAttributes: { name: string } }[] = [];
  const audit = memoryAudit();

  before(async () => {
    pki = await makeDevPki();
    files = writeProxyFiles('ksp-forward-', pki, {
      policy: `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: argocd\n      groups: [gitops]\n`,
      token: 'proxy-token\n',
      upstreamCa: pki.spoke.rootPem,
    });
    // The stand-in serves with the spoke SVID (IP SAN 127.0.0.1), so the proxy trusts it through the spoke root.
    upstream = await listenHttp2StandIn(pki, { allowHTTP1: true }, (req, res) => {
      const record: Seen = {
        httpVersion: req.httpVersion,
        method: req.method,
        url: req.url,
        headers: req.headers,
        rawHeaders: req.rawHeaders,
      };
      seen.push(record);
      if (req.url === '/apis/authorization.k8s.io/v1/subjectaccessreviews') {
        let text = '';
        req.setEncoding('utf8');
        req.on('data', (d: string) => {
          text += d;
        });
        req.on('end', () => {
          const review = JSON.parse(text) as { spec: { user: string; resourceAttributes: { name: string } } };
          reviews.push(review.spec);
          // The stand-in's RBAC: the mapped user may impersonate the service account "deployer" only.
          const allowed = review.spec.user === 'argocd' && review.spec.resourceAttributes.name === 'deployer';
          res.writeHead(201, { 'content-type': 'application/json' });
          res.end(
            JSON.stringify({
              ...review,
              status: { allowed, ...(allowed ? {} : { reason: 'no RBAC rule' }) },
            }),
          );
        });
        return;
      }
      if (req.url?.endsWith('/early')) {
        // Answers before reading the upload (as kube-apiserver does for a body over its limit).
        res.writeHead(413, { 'content-type': 'application/json' });
        res.end('{"kind":"Status","code":413}');
        return;
      }
      if (req.url?.includes('watch=true')) {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write('{"type":"ADDED"}\n');
        releaseSecondEvent = () => res.end('{"type":"MODIFIED"}\n');
        return;
      }
      const hash = createHash('sha256');
      let length = 0;
      req.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        length += chunk.length;
      });
      req.on('end', () => {
        record.bodySha = hash.digest('hex');
        record.bodyLength = length;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{"kind":"Status","status":"Success"}');
      });
    });
    upstream.server.on('upgrade', (req, socket) => {
      seen.push({
        httpVersion: req.httpVersion,
        method: req.method,
        url: req.url,
        headers: req.headers,
        rawHeaders: req.rawHeaders,
      });
      if (req.url?.includes('/pods/nohost/')) {
        const body = '{"kind":"Status","code":400,"message":"pod nohost does not have a host assigned"}';
        socket.end(
          `HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
        );
        return;
      }
      socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n');
      socket.on('data', (d: Buffer) => socket.write(Buffer.concat([Buffer.from('echo:'), d])));
    });
    proxy = await startProxy(
      parseProxyConfig(
        proxyConfigYaml(files, { upstreamUrl: `https://127.0.0.1:${upstream.port}` }),
        files.configFile,
      ),
      { logger: silentLogger(), audit: audit.sink, defaultMetrics: false, probeIntervalMs: 60_000 },
    );
  });

  after(async () => {
    await proxy?.close();
    await upstream?.close();
    files?.remove();
  });

  const client = () => clientTls(pki, pki.good.clientArgocd);

  /** A raw HTTP/1.1 exchange over TLS: full control over header names, order, duplicates and Connection. */
  function rawHttp1(request: string, onData?: (all: string, socket: tls.TLSSocket) => void): Promise<string> {
    return new Promise((resolve, reject) => {
      const socket = tls.connect({
        host: '127.0.0.1',
        port: proxy.port,
        ALPNProtocols: ['http/1.1'],
        ...client(),
      });
      let all = '';
      socket.setEncoding('utf8');
      socket.on('secureConnect', () => socket.write(request));
      socket.on('data', (d: string) => {
        all += d;
        onData?.(all, socket);
      });
      socket.on('end', () => resolve(all));
      socket.on('close', () => resolve(all));
      socket.on('error', reject);
    });
  }

  it('forwards over a multiplexed HTTP/2 session to the upstream', async () => {
    seen = [];
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    try {
      const statuses = await Promise.all(
        [1, 2, 3].map(
          (n) =>
            new Promise<number>((resolve, reject) => {
              const s = session.request({ ':path': `/api/v1/namespaces/default/pods/p${n}` });
              s.on('response', (h) => resolve(Number(h[':status'])));
              s.on('error', reject);
              s.resume();
              s.end();
            }),
        ),
      );
      assert.deepEqual(statuses, [200, 200, 200]);
      assert.deepEqual(
        seen.map((r) => r.httpVersion),
        ['2.0', '2.0', '2.0'],
      );
      assert.equal(seen[0]?.headers.authorization, 'Bearer proxy-token');
      assert.equal(seen[0]?.headers['impersonate-user'], 'argocd');
    } finally {
      session.close();
    }
  });

  it('moves to a new upstream session after GOAWAY, without failing a request', async () => {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    const get = (): Promise<number> =>
      new Promise((resolve, reject) => {
        const s = session.request({ ':path': '/api/v1/namespaces/default/pods/goaway' });
        s.on('response', (h) => resolve(Number(h[':status'])));
        s.on('error', reject);
        s.resume();
        s.end();
      });
    try {
      assert.equal(await get(), 200);
      const before = upstream.sessions.length;
      // kube-apiserver sends GOAWAY when it shuts down or rebalances (--goaway-chance).
      for (const s of upstream.sessions) if (!s.closed) s.goaway();
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(await get(), 200);
      assert.equal(upstream.sessions.length, before + 1, 'a new session was opened');
    } finally {
      session.close();
    }
  });

  it('streams a watch without buffering: the first event arrives before the second is sent', async () => {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    try {
      const stream = session.request({ ':path': '/api/v1/namespaces/default/pods?watch=true' });
      stream.setEncoding('utf8');
      let received = '';
      const first = new Promise<string>((resolve) => {
        stream.on('data', (d: string) => {
          received += d;
          if (received.includes('ADDED')) resolve(received);
        });
      });
      stream.end();
      assert.equal(await first, '{"type":"ADDED"}\n', 'only the first event, while the second is held back');
      const done = new Promise<void>((resolve) => stream.on('end', resolve));
      releaseSecondEvent();
      await done;
      assert.equal(received, '{"type":"ADDED"}\n{"type":"MODIFIED"}\n');
    } finally {
      session.close();
    }
  });

  it('audits a watch the client abandons mid-stream (a killed `logs -f`), with the status it was answered', async () => {
    const path = '/api/v1/namespaces/default/pods?watch=true&abandoned=1';
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    try {
      const stream = session.request({ ':path': path });
      stream.setEncoding('utf8');
      await new Promise<void>((resolve) => stream.on('data', () => resolve()));
      stream.close(http2.constants.NGHTTP2_CANCEL);
    } finally {
      session.close();
    }
    let event = audit.events.find((e) => e.requestURI === path);
    for (let i = 0; i < 100 && event === undefined; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      event = audit.events.find((e) => e.requestURI === path);
    }
    assert.ok(event, 'the abandoned watch has its audit event');
    assert.equal(event.responseStatus.code, 200);
    releaseSecondEvent();
  });

  it('passes a 3 MiB request body through intact', async () => {
    seen = [];
    const body = randomBytes(3 * 1024 * 1024);
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    try {
      const status = await new Promise<number>((resolve, reject) => {
        const s = session.request({
          ':method': 'POST',
          ':path': '/api/v1/namespaces/default/configmaps',
          'content-type': 'application/json',
        });
        s.on('response', (h) => resolve(Number(h[':status'])));
        s.on('error', reject);
        s.resume();
        s.end(body);
      });
      // The proxy's policy limits nothing here; RBAC would decide upstream.
      assert.equal(status, 200);
      assert.equal(seen[0]?.bodyLength, body.length);
      assert.equal(seen[0]?.bodySha, createHash('sha256').update(body).digest('hex'));
    } finally {
      session.close();
    }
  });

  it('ends an HTTP/2 upload the upstream answered early, so the client does not hang', async () => {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    try {
      const outcome = await new Promise<{ status: number; closed: boolean }>((resolve, reject) => {
        const s = session.request({
          ':method': 'POST',
          ':path': '/api/v1/namespaces/default/configmaps/early',
        });
        let status = 0;
        s.on('response', (h) => {
          status = Number(h[':status']);
        });
        s.on('error', reject);
        s.resume();
        // Half an upload, and the request half left open: only the proxy can end this stream now.
        s.write(Buffer.alloc(64 * 1024));
        s.on('close', () => resolve({ status, closed: true }));
      });
      assert.deepEqual(outcome, { status: 413, closed: true });
    } finally {
      session.close();
    }
  });

  it('joins an upgrade on 101 (exec over WebSocket) with the mapped identity upstream', async () => {
    seen = [];
    const answer = await rawHttp1(
      'GET /api/v1/namespaces/default/pods/web/exec?command=sh HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n' +
        'Upgrade: websocket\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\nAuthorization: Bearer stolen\r\n\r\n',
      (all, socket) => {
        if (all.includes('\r\n\r\n') && !all.includes('echo:')) socket.write('ping');
        if (all.includes('echo:ping')) socket.end();
      },
    );
    assert.match(answer, /^HTTP\/1.1 101 /);
    assert.match(answer, /echo:ping/);
    assert.equal(seen[0]?.headers.upgrade, 'websocket');
    assert.equal(seen[0]?.headers['impersonate-user'], 'argocd');
    assert.equal(seen[0]?.headers.authorization, 'Bearer proxy-token');
    assert.equal(seen[0]?.headers['sec-websocket-protocol'], 'v5.channel.k8s.io');
  });

  it('relays a non-101 answer to an upgrade unchanged and closes, so kubectl can fall back', async () => {
    const answer = await rawHttp1(
      'POST /api/v1/namespaces/default/pods/nohost/exec?command=sh HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n' +
        'Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n' +
        // A second request pipelined behind: it must never reach the upstream through a raw tunnel.
        'GET /api/v1/secrets HTTP/1.1\r\nHost: x\r\nImpersonate-User: system:admin\r\n\r\n',
    );
    assert.match(answer, /^HTTP\/1.1 400 Bad Request\r\n/);
    assert.match(answer, /Connection: close/i);
    assert.match(answer, /pod nohost does not have a host assigned/);
    assert.equal((answer.match(/HTTP\/1.1 /g) ?? []).length, 1, 'one answer, then the connection closed');
    assert.ok(
      !seen.some((r) => r.url === '/api/v1/secrets'),
      'the pipelined request never reached the upstream',
    );
  });

  it('never lets a client-supplied identity or credential through, over HTTP/1.1 or HTTP/2', async () => {
    seen = [];
    // HTTP/1.1: names listed in Connection (CVE-2021-31999's trick), mixed case, duplicates.
    const h1 = await rawHttp1(
      'GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\n' +
        'Connection: close, Impersonate-User, Impersonate-Group, Authorization\r\n' +
        'AUTHORIZATION: Bearer stolen-1\r\nauthorization: Bearer stolen-2\r\n' +
        'X-Remote-User: admin\r\nx-remote-group: system:masters\r\nX-Forwarded-For: 10.9.9.9\r\n' +
        // Client addresses for kube-apiserver's audit, and an underscore twin of an identity header.
        'Forwarded: for=10.9.9.9\r\nX-Real-Ip: 10.9.9.9\r\nX_Remote_User: admin\r\n\r\n',
    );
    assert.match(h1, /^HTTP\/1.1 200 /);
    // HTTP/2: mixed-case names arrive lower-cased; duplicates as lists.
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    try {
      await new Promise<void>((resolve, reject) => {
        const s = session.request({
          ':path': '/api/v1/namespaces/default/pods',
          authorization: 'Bearer stolen-3',
          'x-remote-user': ['a', 'b'],
          'x-forwarded-host': 'evil',
          'proxy-authorization': 'Basic x',
          forwarded: 'for=10.9.9.9',
          'x-real-ip': '10.9.9.9',
          impersonate_user: 'system:admin',
        });
        s.on('response', () => resolve());
        s.on('error', reject);
        s.resume();
        s.end();
      });
    } finally {
      session.close();
    }
    assert.equal(seen.length, 2);
    for (const r of seen) {
      const names = r.rawHeaders.filter((_, i) => i % 2 === 0).map((n) => n.toLowerCase());
      assert.equal(names.filter((n) => n === 'authorization').length, 1, 'exactly one Authorization: ours');
      assert.equal(r.headers.authorization, 'Bearer proxy-token');
      assert.equal(
        r.headers['impersonate-user'],
        'argocd',
        'ours, despite the client naming it in Connection',
      );
      assert.deepEqual(
        r.rawHeaders.filter((_, i, all) => all[i - 1]?.toLowerCase() === 'impersonate-group'),
        ['gitops'],
      );
      assert.ok(!names.some((n) => n.startsWith('x-remote-')));
      assert.ok(!names.includes('proxy-authorization'));
      assert.ok(!names.includes('x-forwarded-host'));
      assert.ok(!names.includes('forwarded'));
      assert.ok(!names.includes('x-real-ip'));
      assert.ok(!names.some((n) => n.includes('_')), 'no header name with "_" is forwarded');
      assert.equal(r.headers['x-forwarded-for'], '127.0.0.1');
    }
    // And any client Impersonate-* header, in any case and protocol, is refused outright.
    for (const name of [
      'Impersonate-User',
      'impersonate-group',
      'IMPERSONATE-UID',
      'Impersonate-Extra-Scopes',
    ]) {
      const refused = await rawHttp1(
        `GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n${name}: system:admin\r\n\r\n`,
      );
      assert.match(refused, /^HTTP\/1.1 403 /, name);
    }
    assert.equal(seen.length, 2, 'no refused request reached the upstream');
  });
  it('forwards a nested impersonation only when the rule lists it and the SubjectAccessReview allows it', async () => {
    files.write(
      'policy.yaml',
      `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: argocd\n      groups: [gitops]\n` +
        '    impersonate:\n      serviceAccounts: ["apps/*"]\n',
    );
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, client());
    const get = (as: string): Promise<{ status: number; body: string }> =>
      new Promise((resolve, reject) => {
        const s = session.request({ ':path': '/api/v1/namespaces/apps/secrets', 'impersonate-user': as });
        let status = 0;
        let body = '';
        s.on('response', (h) => {
          status = Number(h[':status']);
        });
        s.setEncoding('utf8');
        s.on('data', (d: string) => {
          body += d;
        });
        s.on('end', () => resolve({ status, body }));
        s.on('error', reject);
        s.end();
      });
    try {
      // The policy reload is asynchronous: wait until the nested identity is admitted.
      let allowed = await get('system:serviceaccount:apps:deployer');
      for (let i = 0; i < 50 && allowed.status === 403; i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        allowed = await get('system:serviceaccount:apps:deployer');
      }
      assert.equal(allowed.status, 200, allowed.body);
      const forwarded = seen.filter((r) => r.url === '/api/v1/namespaces/apps/secrets').at(-1);
      assert.equal(forwarded?.headers['impersonate-user'], 'system:serviceaccount:apps:deployer');
      assert.equal(forwarded?.headers['impersonate-group'], undefined, 'the mapped groups are not forwarded');
      assert.equal(forwarded?.headers['impersonate-extra-spiffe.io%2fid'], ARGOCD);
      assert.ok(reviews.some((r) => r.user === 'argocd' && r.resourceAttributes.name === 'deployer'));

      const sarDenied = await get('system:serviceaccount:apps:intruder');
      assert.equal(sarDenied.status, 403);
      assert.match(
        sarDenied.body,
        /argocd may not impersonate serviceaccounts apps\/intruder.*ERR_POLICY_NESTED_IMPERSONATION/,
      );
      const policyDenied = await get('system:serviceaccount:kube-system:default');
      assert.equal(policyDenied.status, 403);
      assert.match(policyDenied.body, /ERR_POLICY_NESTED_IMPERSONATION/);
      assert.ok(
        !reviews.some((r) => r.resourceAttributes.name === 'default'),
        'no review for what the policy refuses',
      );
    } finally {
      session.close();
    }
  });
});

describe('the proxy’s own upstream errors', () => {
  it('refuses an upstream that is not https://', () => {
    assert.throws(
      () => new Upstream({ url: new URL('http://127.0.0.1:8080'), authorization: () => undefined }),
      /must be https:\/\//,
    );
  });

  it('answers 503 when kube-apiserver is unreachable, and 504 when it does not answer in time, on every path', async () => {
    const standInPki = await makeDevPki();
    // Accepts, over HTTP/2 and HTTP/1.1, and never answers.
    const silent = await listenHttp2StandIn(standInPki, { allowHTTP1: true }, () => {});
    const ca = standInPki.spoke.rootPem;
    const closed = http.createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const closedPort = (closed.address() as AddressInfo).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    const identity = { user: 'u', groups: [], extra: {} };
    const through = async (upstream: Upstream): Promise<number> => {
      const front = http.createServer((req, res) => {
        upstream.forward(req, res, identity, '127.0.0.1').catch((err: unknown) => {
          res.statusCode = err instanceof UpstreamError ? err.status : 500;
          res.end();
        });
      });
      await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
      try {
        const res = await fetch(`http://127.0.0.1:${(front.address() as AddressInfo).port}/api/v1/pods`);
        return res.status;
      } finally {
        front.closeAllConnections();
        await new Promise<void>((resolve) => front.close(() => resolve()));
        upstream.close();
      }
    };
    try {
      assert.equal(
        await through(
          new Upstream({
            url: new URL(`https://127.0.0.1:${silent.port}`),
            ca,
            authorization: () => undefined,
            responseHeadersTimeoutMs: 200,
          }),
        ),
        504,
      );
      // Over HTTP/2 a refused connect arrives as a cancelled stream: still 503.
      assert.equal(
        await through(
          new Upstream({ url: new URL(`https://127.0.0.1:${closedPort}`), authorization: () => undefined }),
        ),
        503,
      );
      // The upgrade path: 503 when nobody is there, 504 when nobody answers before the 101.
      const upgradeThrough = async (upstream: Upstream): Promise<number | undefined> => {
        const front = http.createServer();
        front.on('upgrade', (req, socket, head) => {
          upstream.upgrade(req, socket, head, identity, '127.0.0.1').catch((err: unknown) => {
            socket.end(
              `HTTP/1.1 ${err instanceof UpstreamError ? err.status : 500} X\r\nContent-Length: 0\r\n\r\n`,
            );
          });
        });
        await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
        try {
          return await new Promise<number | undefined>((resolve, reject) => {
            const req = http.request({
              host: '127.0.0.1',
              port: (front.address() as AddressInfo).port,
              path: '/api/v1/namespaces/default/pods/p/exec',
              headers: { connection: 'Upgrade', upgrade: 'websocket' },
            });
            req.on('response', (res) => {
              res.resume();
              resolve(res.statusCode);
            });
            req.on('upgrade', () => resolve(101));
            req.on('error', reject);
            req.end();
          });
        } finally {
          front.closeAllConnections();
          await new Promise<void>((resolve) => front.close(() => resolve()));
          upstream.close();
        }
      };
      assert.equal(
        await upgradeThrough(
          new Upstream({ url: new URL(`https://127.0.0.1:${closedPort}`), authorization: () => undefined }),
        ),
        503,
      );
      assert.equal(
        await upgradeThrough(
          new Upstream({
            url: new URL(`https://127.0.0.1:${silent.port}`),
            ca,
            authorization: () => undefined,
            longRunningHeadersTimeoutMs: 200,
          }),
        ),
        504,
      );
    } finally {
      await silent.close();
    }
  });
});
