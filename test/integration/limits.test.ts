/**
 * What one client can hold, against an HTTPS STAND-IN for kube-apiserver (HTTP/2 with kube-apiserver's stream
 * limit of 100 per connection; watches it holds open until the test ends): a client with many watches cannot
 * starve another client's GET, per-identity and upstream-pool limits answer fast with a Status naming the limit,
 * unauthenticated and idle connections are closed, and TCP probes are counted apart from failed clients.
 */
import assert from 'node:assert/strict';
import http2 from 'node:http2';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { type DevIdentity, type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
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
const FLUX = 'spiffe://hub.example.org/ns/flux-system/sa/kustomize-controller';

describe('limits: what one client can hold', () => {
  let pki: DevPki;
  let files: ProxyFiles;
  let upstream: Http2StandIn;
  let proxy: RunningProxy;
  const held: http2.Http2ServerResponse[] = [];
  const logs: string[] = [];
  const sessions: http2.ClientHttp2Session[] = [];

  before(async () => {
    pki = await makeDevPki();
    const rule = (name: string, id: string): string =>
      `  - name: ${name}\n    match:\n      id: ${id}\n    identity:\n      user: ${name}\n`;
    files = writeProxyFiles('ksp-limits-', pki, {
      policy: `rules:\n${rule('argocd', ARGOCD)}${rule('flux', FLUX)}`,
      token: 'proxy-token\n',
      upstreamCa: pki.spoke.rootPem,
    });
    upstream = await listenHttp2StandIn(
      pki,
      // kube-apiserver's answer to a client's streams: 100 at a time per connection.
      { settings: { maxConcurrentStreams: 100 } },
      (req, res) => {
        res.writeHead(200, { 'content-type': 'application/json' });
        if (req.url?.includes('watch=true')) {
          // A watch: headers now, events never (until the test ends).
          res.write('{"type":"ADDED"}\n');
          held.push(res);
          return;
        }
        res.end('{"kind":"PodList","items":[]}');
      },
    );
    proxy = await startProxy(
      parseProxyConfig(
        proxyConfigYaml(files, {
          upstreamUrl: `https://127.0.0.1:${upstream.port}`,
          extra: `limits:
  maxStreamsPerConnection: 300
  maxLongRunningPerIdentity: 150
  maxUpstreamSessions: 1
  maxLongRunningUpstreamSessions: 2
timeouts:
  idle: 1s
  unauthenticated: 1s
`,
        }),
        files.configFile,
      ),
      {
        logger: createLogger({ level: 'info', stream: { write: (line: string) => void logs.push(line) } }),
        audit: memoryAudit().sink,
        defaultMetrics: false,
        probeIntervalMs: 60_000,
      },
    );
  });

  after(async () => {
    for (const s of sessions) s.destroy();
    for (const res of held) res.stream.destroy();
    upstream?.destroySessions();
    await proxy?.close();
    await upstream?.close();
    files?.remove();
  });

  function connect(who?: DevIdentity): http2.ClientHttp2Session {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, clientTls(pki, who));
    session.on('error', () => {});
    sessions.push(session);
    return session;
  }

  async function metrics(): Promise<string> {
    return proxy.metrics.metrics();
  }

  it('a client holding many watches cannot delay another client’s GET, and its overflow is refused with 429', async () => {
    const argocd = connect(pki.good.clientArgocd);
    const watches = await Promise.all(
      Array.from({ length: 150 }, (_, i) =>
        requestStatus(argocd, `/api/v1/namespaces/ns${i}/configmaps?watch=true`),
      ),
    );
    assert.ok(
      watches.every((w) => w.status === 200),
      'all 150 watches up to limits.maxLongRunningPerIdentity are open',
    );
    assert.equal(proxy.server.inFlight(ARGOCD).longRunning, 150);

    const over = await requestStatus(argocd, '/api/v1/namespaces/over/configmaps?watch=true');
    assert.equal(over.status, 429);
    assert.match(over.body, /"reason":"TooManyRequests"/);
    assert.match(over.body, /limits\.maxLongRunningPerIdentity/);

    // Another client's ordinary GET is answered while those watches are held: it never waits on their streams.
    const flux = connect(pki.good.clientFlux);
    const get = await requestStatus(flux, '/api/v1/namespaces/default/pods');
    assert.equal(get.status, 200);
    assert.match(get.body, /PodList/);

    // The long-running pool holds 2 sessions × 100 streams: Flux's watches fill what Argo CD left, then 503.
    const fluxWatches = await Promise.all(
      Array.from({ length: 51 }, (_, i) =>
        requestStatus(flux, `/api/v1/namespaces/f${i}/secrets?watch=true`),
      ),
    );
    const refused = fluxWatches.filter((w) => w.status === 503);
    assert.equal(fluxWatches.filter((w) => w.status === 200).length, 50);
    assert.equal(refused.length, 1);
    assert.match(refused[0]?.body ?? '', /limits\.maxLongRunningUpstreamSessions/);

    // Even with every long-running stream upstream taken, ordinary requests still pass, the watch holder's too.
    assert.equal((await requestStatus(argocd, '/api/v1/namespaces/default/pods')).status, 200);

    const text = await metrics();
    assert.match(text, /ksp_limit_refusals_total\{limit="limits.maxLongRunningPerIdentity"\} 1/);
    assert.match(text, /ksp_limit_refusals_total\{limit="limits.maxLongRunningUpstreamSessions"\} 1/);
    assert.match(text, /ksp_upstream_sessions\{pool="long_running"\} 2/);
    assert.match(text, /ksp_requests_in_flight\{kind="long_running"\} 200/);

    // Closing the watches gives the slots back.
    argocd.destroy();
    await until('the watches to be released', () => proxy.server.inFlight(ARGOCD).longRunning === 0);
  });

  it('answers an unauthenticated client once with 401, then closes its connection (GOAWAY)', async () => {
    const anonymous = connect();
    const goaway = new Promise<void>((resolve) => anonymous.once('goaway', () => resolve()));
    const closed = new Promise<void>((resolve) => anonymous.once('close', () => resolve()));
    const first = await requestStatus(anonymous, '/api/v1/namespaces/default/pods');
    assert.equal(first.status, 401);
    assert.match(first.body, /SPIFFE authentication failed/);
    await goaway;
    await closed;
    const text = await metrics();
    assert.match(text, /ksp_connections_closed_by_proxy_total\{reason="unauthenticated"\} [1-9]/);
  });

  it('writes a bounded number of log lines however fast unauthenticated clients come (rapid reset)', async () => {
    const before = logs.length;
    // 50 connections without a certificate, each opening 20 streams and resetting them at once.
    await Promise.all(
      Array.from({ length: 50 }, async () => {
        const anonymous = connect();
        const closed = new Promise<void>((resolve) => anonymous.once('close', () => resolve()));
        for (let i = 0; i < 20; i++) {
          const s = anonymous.request({ ':path': `/api/v1/namespaces/n${i}/pods` });
          s.on('error', () => {});
          s.close(http2.constants.NGHTTP2_CANCEL);
        }
        await closed;
      }),
    );
    const lines = logs.slice(before);
    // One "client authentication refused" and at most one 401 line per interval, not one per connection or stream.
    assert.ok(lines.length <= 4, `${lines.length} log lines:\n${lines.join('')}`);
    assert.match(
      await metrics(),
      /ksp_authentication_failures_total\{code="ERR_TLS_NO_CLIENT_CERT"\} ([5-9]\d|\d{3,})/,
    );
  });

  it('closes an unauthenticated connection that sends nothing, after timeouts.unauthenticated', async () => {
    const socket = tls.connect({
      host: '127.0.0.1',
      port: proxy.port,
      ...clientTls(pki),
      ALPNProtocols: ['h2'],
    });
    socket.on('error', () => {});
    socket.resume();
    await new Promise<void>((resolve) => socket.once('secureConnect', () => resolve()));
    await new Promise<void>((resolve) => socket.once('close', () => resolve()));
  });

  it('closes an authenticated connection with no request in flight after timeouts.idle', async () => {
    const session = connect(pki.good.clientArgocd);
    assert.equal((await requestStatus(session, '/api/v1/namespaces/default/pods')).status, 200);
    await new Promise<void>((resolve) => session.once('close', () => resolve()));
    assert.match(await metrics(), /ksp_connections_closed_by_proxy_total\{reason="idle"\} [1-9]/);
  });

  it('keeps a connection with an open watch past timeouts.idle', async () => {
    const session = connect(pki.good.clientFlux);
    let closed = false;
    session.once('close', () => {
      closed = true;
    });
    assert.equal((await requestStatus(session, '/api/v1/namespaces/idle/pods?watch=true')).status, 200);
    // Longer than timeouts.idle (1 s): the open watch keeps the connection.
    await new Promise((r) => setTimeout(r, 2500));
    assert.equal(closed, false, 'a connection with a stream in flight is not idle');
    session.destroy();
  });

  it('counts a TCP connection that never sends a ClientHello apart from authentication failures', async () => {
    const before = await metrics();
    const probe = net.connect(proxy.port, '127.0.0.1');
    await new Promise<void>((resolve) => probe.once('connect', () => resolve()));
    probe.end();
    await until('the probe to be counted', async () =>
      /ksp_handshakes_total\{result="no_client_hello"\} [1-9]/.test(await metrics()),
    );
    const after = await metrics();
    const resets = (t: string): string | undefined =>
      /ksp_authentication_failures_total\{code="ECONNRESET"\} (\d+)/.exec(t)?.[1];
    assert.equal(resets(after), resets(before), 'not an authentication failure');
  });
});

describe('readiness.minSvidRemaining', () => {
  it('warns at start when it is not shorter than the SVID lifetime, and /readyz says why it is not ready', async () => {
    const pki = await makeDevPki();
    const files = writeProxyFiles('ksp-minsvid-', pki, { policy: 'rules: []\n', hubBundle: false });
    const logs: string[] = [];
    const proxy = await startProxy(
      parseProxyConfig(
        proxyConfigYaml(files, {
          upstreamUrl: 'https://127.0.0.1:1',
          extra: 'readiness: { minSvidRemaining: 100000h }\n',
        }),
        files.configFile,
      ),
      {
        logger: createLogger({ level: 'warn', stream: { write: (line: string) => void logs.push(line) } }),
        audit: memoryAudit().sink,
        defaultMetrics: false,
        probeIntervalMs: 60_000,
      },
    );
    try {
      assert.ok(
        logs.some((l) => l.includes('readiness.minSvidRemaining is not shorter than the SVID lifetime')),
        logs.join(''),
      );
      const res = await fetch(`http://127.0.0.1:${proxy.admin.address.port}/readyz`);
      assert.equal(res.status, 503);
      const report = (await res.json()) as { checks: { name: string; ok: boolean; detail: string }[] };
      const svid = report.checks.find((c) => c.name === 'svid');
      assert.equal(svid?.ok, false);
      assert.match(svid?.detail ?? '', /needs more than 360000000s/);
    } finally {
      await proxy.close();
      files.remove();
    }
  });
});
