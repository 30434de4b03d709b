// `workers: 2`: two worker processes (node:cluster) serve the data port, the main process holds the identity,
// the policy, the upstream credential and the audit log. What the tests show: every connection is served whichever
// worker takes it; a policy edit reaches every worker; a TLS session made with one worker resumes on the other;
// `/metrics` on the one admin port adds up both workers; shutdown drains both. Upstream: an HTTP/2 STAND-IN for
// kube-apiserver (test/helpers/proxy-fixture.ts) that records the identity it is asked to act as.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import http2 from 'node:http2';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningService, startProxyWorkers } from '../../src/proxy/proxy.ts';
import {
  clientTls,
  type Http2StandIn,
  listenHttp2StandIn,
  memoryAudit,
  type ProxyFiles,
  proxyConfigYaml,
  requestStatus,
  until,
  writeProxyFiles,
} from '../helpers/proxy-fixture.ts';

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const rule = (user: string): string =>
  `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: ${user}\n`;

describe('workers: 2 processes serving the data port', () => {
  let pki: DevPki;
  let files: ProxyFiles;
  let upstream: Http2StandIn;
  let proxy: RunningService;
  const audit = memoryAudit();
  const users: string[] = [];
  const tokens: string[] = [];
  const sessions: http2.ClientHttp2Session[] = [];

  before(async () => {
    pki = await makeDevPki();
    files = writeProxyFiles('ksp-workers-', pki, {
      policy: rule('argocd'),
      token: 'proxy-token\n',
      upstreamCa: pki.spoke.rootPem,
    });
    upstream = await listenHttp2StandIn(pki, {}, (req, res) => {
      users.push(String(req.headers['impersonate-user']));
      tokens.push(String(req.headers.authorization));
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"kind":"ConfigMap"}');
    });
    proxy = await startProxyWorkers(
      parseProxyConfig(
        proxyConfigYaml(files, { upstreamUrl: `https://127.0.0.1:${upstream.port}`, extra: 'workers: 2\n' }),
        files.configFile,
      ),
      {
        logger: createLogger({ level: 'warn' }),
        audit: audit.sink,
        defaultMetrics: false,
        probeIntervalMs: 60_000,
        watchPollMs: 200,
      },
    );
  });

  after(async () => {
    for (const s of sessions) s.destroy();
    upstream?.destroySessions();
    await proxy?.close();
    await upstream?.close();
    files?.remove();
  });

  function connect(): Promise<http2.ClientHttp2Session> {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, clientTls(pki, pki.good.clientArgocd));
    session.on('error', () => {});
    sessions.push(session);
    return new Promise((resolve) => session.once('connect', () => resolve(session)));
  }

  it('serves every connection, audits every request in the main process, and sums both workers in /metrics', async () => {
    // The kernel spreads connections over the workers' sockets by address: 16 reach both (all on one: 2 in 65,536).
    const opened = await Promise.all(Array.from({ length: 16 }, () => connect()));
    for (const session of opened) {
      assert.equal((await requestStatus(session, '/api/v1/namespaces/default/configmaps/a')).status, 200);
    }
    await until('the audit Events', () => audit.events.length >= 16);
    assert.deepEqual(new Set(audit.events.map((e) => e.impersonatedUser?.username)), new Set(['argocd']));
    const res = await fetch(`http://127.0.0.1:${proxy.admin.address.port}/metrics`);
    const text = await res.text();
    assert.match(text, /ksp_requests_total\{code="200"\} 16\b/);
    assert.match(text, /ksp_open_connections 16\b/);
    assert.match(text, /ksp_policy_generation 1\b/);
    const ready = (await (await fetch(`http://127.0.0.1:${proxy.admin.address.port}/readyz`)).json()) as {
      checks: { name: string; ok: boolean; detail: string }[];
    };
    const workers = ready.checks.find((c) => c.name === 'workers');
    assert.equal(workers?.ok, true);
    const spread = /2\/2 workers listening on the data port \(connections per worker: (\d+), (\d+)\)/.exec(
      workers?.detail ?? '',
    );
    assert.ok(spread, workers?.detail);
    assert.equal(Number(spread[1]) + Number(spread[2]), 16);
    assert.ok(Number(spread[1]) > 0 && Number(spread[2]) > 0, `both workers serve: ${workers?.detail}`);
  });

  it('hands a policy edit to every worker: each open connection maps the next request with the new rule', async () => {
    const opened = await Promise.all(Array.from({ length: 16 }, () => connect()));
    writeFileSync(join(files.dir, 'policy.yaml'), rule('argocd-edited'));
    await until('the edit in the main process', async () => {
      const text = await (await fetch(`http://127.0.0.1:${proxy.admin.address.port}/metrics`)).text();
      return /ksp_policy_generation 2\b/.test(text);
    });
    users.length = 0;
    for (const session of opened) {
      assert.equal((await requestStatus(session, '/api/v1/namespaces/default/configmaps/b')).status, 200);
    }
    assert.equal(users.length, 16);
    assert.deepEqual(new Set(users), new Set(['argocd-edited']));
  });

  it('resumes a TLS session on whichever worker takes the next connection (shared ticket keys)', async () => {
    const options = {
      port: proxy.port,
      host: '127.0.0.1',
      ...clientTls(pki, pki.good.clientArgocd),
      ALPNProtocols: ['h2'],
    };
    const first = tls.connect(options);
    const session = await new Promise<Buffer>((resolve, reject) => {
      first.once('session', resolve);
      first.once('error', reject);
    });
    first.destroy();
    const reused: boolean[] = [];
    // The kernel spreads connections by address: sixteen reach both workers (all on one: 2 in 65,536).
    for (let i = 0; i < 16; i++) {
      const socket = tls.connect({ ...options, session });
      await new Promise<void>((resolve, reject) => {
        socket.once('secureConnect', resolve);
        socket.once('error', reject);
      });
      reused.push(socket.isSessionReused());
      socket.destroy();
    }
    assert.deepEqual(new Set(reused), new Set([true]));
  });

  it('authenticates a resumed session on another worker for a client whose SVID has an intermediate', async () => {
    const spokeClient = pki.good.clientSpoke;
    const options = { ...clientTls(pki, spokeClient) };
    const first = http2.connect(`https://127.0.0.1:${proxy.port}`, options);
    first.on('error', () => {});
    const ticket = await new Promise<Buffer>((resolve) => first.socket.once('session', resolve));
    // No rule names this client: 403 means it was authenticated (a 401 would mean its chain was not known).
    assert.equal((await requestStatus(first, '/api/v1/namespaces/default/configmaps/d')).status, 403);
    first.destroy();
    const statuses: number[] = [];
    for (let i = 0; i < 16; i++) {
      const session = http2.connect(`https://127.0.0.1:${proxy.port}`, { ...options, session: ticket });
      session.on('error', () => {});
      sessions.push(session);
      await new Promise((resolve) => session.once('connect', resolve));
      assert.equal((session.socket as tls.TLSSocket).isSessionReused(), true);
      statuses.push((await requestStatus(session, '/api/v1/namespaces/default/configmaps/d')).status);
    }
    assert.deepEqual(new Set(statuses), new Set([403]));
  });

  it('hands a re-read upstream token (SIGHUP) to every worker', async () => {
    const opened = await Promise.all([connect(), connect()]);
    writeFileSync(join(files.dir, files.tokenFile as string), 'rotated-token\n');
    await proxy.reload();
    await until('the workers to have the new token', async () => {
      tokens.length = 0;
      for (const session of opened) await requestStatus(session, '/api/v1/namespaces/default/configmaps/c');
      return tokens.every((t) => t === 'Bearer rotated-token');
    });
  });

  it('drains both workers on shutdown: the port closes and every worker exits', async () => {
    await proxy.shutdown();
    const refused = await new Promise<string>((resolve) => {
      const socket = tls.connect({
        port: proxy.port,
        host: '127.0.0.1',
        ...clientTls(pki, pki.good.clientArgocd),
      });
      socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
      socket.once('secureConnect', () => {
        socket.destroy();
        resolve('connected');
      });
    });
    assert.equal(refused, 'ECONNREFUSED');
  });
});
