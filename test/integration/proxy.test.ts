/**
 * The proxy's front door end to end: real TLS (HTTP/2 and HTTP/1.1) clients presenting the dev PKI's SVIDs,
 * the real policy file and its watcher, and a RECORDING UPSTREAM STAND-IN (an HTTP/2 TLS server that records what
 * reaches it) in place of kube-apiserver, which the e2e suite of the proxy's part 2 provides for real.
 */
import assert from 'node:assert/strict';
import { renameSync, writeFileSync } from 'node:fs';
import type { IncomingHttpHeaders } from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { bundleJson, type DevIdentity, type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { importIssuer, makeLeaf } from '../../dev/certs.ts';
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
  writeProxyFiles,
} from '../helpers/proxy-fixture.ts';

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const FLUX = 'spiffe://hub.example.org/ns/flux-system/sa/kustomize-controller';

function policyYaml(extraRules = ''): string {
  return `rules:
  - name: argocd-controller
    match:
      id: ${ARGOCD}
    identity:
      user: argocd-controller
      groups: [gitops, "spiffe:{trustDomain}"]
      uid: "{id}"
      extra:
        spiffe.io/id: ["{id}"]
    limits:
      verbs: [get, list, watch]
      namespaces: [default]
${extraRules}`;
}

interface Recorded {
  method: string | undefined;
  url: string | undefined;
  headers: IncomingHttpHeaders;
  rawHeaders: string[];
}

describe('the proxy front door', () => {
  let files: ProxyFiles;
  let pki: DevPki;
  let upstream: Http2StandIn;
  const audit = memoryAudit();
  let recorded: Recorded[] = [];
  let proxy: RunningProxy;
  const logs: string[] = [];
  let policyFile: string;

  const logged = (code: string): boolean => logs.some((line) => line.includes(code));

  before(async () => {
    pki = await makeDevPki();
    files = writeProxyFiles('ksp-proxy-', pki, {
      token: 'proxy-service-account-token\n',
      upstreamCa: pki.spoke.rootPem,
    });
    policyFile = files.write('policy.yaml', policyYaml());
    upstream = await listenHttp2StandIn(pki, {}, (req, res) => {
      recorded.push({ method: req.method, url: req.url, headers: req.headers, rawHeaders: req.rawHeaders });
      req.resume();
      req.on('end', () => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{"kind":"PodList","items":[]}');
      });
    });
    const config = parseProxyConfig(
      proxyConfigYaml(files, { upstreamUrl: `https://127.0.0.1:${upstream.port}` }),
      files.configFile,
    );
    const logger = createLogger({
      level: 'debug',
      stream: { write: (line: string) => void logs.push(line) },
    });
    proxy = await startProxy(config, {
      logger,
      audit: audit.sink,
      watchPollMs: 300,
      defaultMetrics: false,
      probeIntervalMs: 60_000,
    });
  });

  after(async () => {
    await proxy?.close();
    await upstream?.close();
    files?.remove();
  });

  /** One HTTP/1.1 request through `agent` (which caches TLS sessions), and whether its session was resumed. */
  function httpsGet(
    agent: https.Agent,
    who: { chainPem: string; keyPem: string },
  ): Promise<{ status: number; body: string; reused: boolean }> {
    return new Promise((resolve, reject) => {
      const req = https.request(
        {
          host: '127.0.0.1',
          port: proxy.port,
          path: '/api/v1/namespaces/default/pods',
          agent,
          ...clientTls(pki, who),
        },
        (res) => {
          const reused = (res.socket as import('node:tls').TLSSocket).isSessionReused();
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => {
            body += c;
          });
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body, reused }));
        },
      );
      req.on('error', reject);
      req.end();
    });
  }

  function h2(who: DevIdentity | { chainPem: string; keyPem: string } | undefined): http2.ClientHttp2Session {
    const session = http2.connect(`https://127.0.0.1:${proxy.port}`, clientTls(pki, who));
    session.on('error', () => {});
    return session;
  }

  function get(
    session: http2.ClientHttp2Session,
    path: string,
    headers: http2.OutgoingHttpHeaders = {},
  ): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const stream = session.request({ ':path': path, ':method': 'GET', ...headers });
      let status = 0;
      let body = '';
      stream.on('response', (h) => {
        status = Number(h[':status']);
      });
      stream.setEncoding('utf8');
      stream.on('data', (chunk: string) => {
        body += chunk;
      });
      stream.on('end', () => resolve({ status, body }));
      stream.on('error', reject);
      stream.end();
    });
  }

  it('forwards an allowed ID to the upstream with the mapped identity, its own credential, and nothing of the client’s', async () => {
    recorded = [];
    const session = h2(pki.good.clientArgocd);
    try {
      const r = await get(session, '/api/v1/namespaces/default/pods', {
        authorization: 'Bearer stolen-token',
        'x-remote-user': 'admin',
        'X-Forwarded-For': '10.0.0.1',
        'Audit-ID': 'client-chosen-audit-id',
      });
      assert.equal(r.status, 200, r.body);
      assert.equal(recorded.length, 1);
      const h = recorded[0]?.headers ?? {};
      assert.equal(h.authorization, 'Bearer proxy-service-account-token');
      assert.equal(h['impersonate-user'], 'argocd-controller');
      const groups = (recorded[0]?.rawHeaders ?? []).filter(
        (_, i, all) => all[i - 1]?.toLowerCase() === 'impersonate-group',
      );
      assert.deepEqual(groups, ['gitops', 'spiffe:hub.example.org']);
      assert.equal(h['impersonate-uid'], ARGOCD);
      assert.equal(h['impersonate-extra-spiffe.io%2fid'], ARGOCD);
      assert.equal(h['x-remote-user'], undefined);
      assert.equal(h['x-forwarded-for'], '127.0.0.1');
      const event = audit.events.find(
        (e) => e.user.username === ARGOCD && e.responseStatus.code === 200 && e.requestURI.includes('/pods'),
      );
      assert.ok(event, JSON.stringify(audit.events));
      // kube-apiserver keeps our audit ID for its own audit lines; the client's is replaced.
      assert.match(event.auditID, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      assert.equal(h['audit-id'], event.auditID);
      assert.equal(event.kind, 'Event');
      assert.equal(event.apiVersion, 'audit.k8s.io/v1');
      assert.equal(event.stage, 'ResponseComplete');
      assert.equal(event.verb, 'list');
      assert.deepEqual(event.objectRef, { resource: 'pods', namespace: 'default', apiVersion: 'v1' });
      assert.equal(event.impersonatedUser?.username, 'argocd-controller');
      assert.deepEqual(event.impersonatedUser?.groups, ['gitops', 'spiffe:hub.example.org']);
      assert.deepEqual(event.sourceIPs, ['127.0.0.1']);
      assert.equal(event.annotations['kube-svid-proxy/decision'], 'allow');
      assert.equal(event.annotations['kube-svid-proxy/rule'], 'argocd-controller');
      assert.equal(event.annotations['kube-svid-proxy/spiffe-id'], ARGOCD);
      assert.equal(event.annotations['kube-svid-proxy/path'], '/api/v1/namespaces/default/pods');
    } finally {
      session.close();
    }
  });

  it('answers 403 with a Kubernetes Status to an ID no rule names, and to a request beyond the rule’s limits', async () => {
    recorded = [];
    const flux = h2(pki.good.clientFlux);
    const argo = h2(pki.good.clientArgocd);
    try {
      const denied = await get(flux, '/api/v1/namespaces/default/pods');
      assert.equal(denied.status, 403);
      const status = JSON.parse(denied.body) as {
        kind: string;
        code: number;
        reason: string;
        message: string;
      };
      assert.equal(status.kind, 'Status');
      assert.equal(status.code, 403);
      assert.equal(status.reason, 'Forbidden');
      assert.match(status.message, /ERR_POLICY_NO_RULE/);
      assert.match(status.message, new RegExp(FLUX));
      const limited = await get(argo, '/api/v1/namespaces/kube-system/secrets');
      assert.equal(limited.status, 403);
      assert.match(limited.body, /ERR_POLICY_REQUEST_LIMIT/);
      assert.equal(recorded.length, 0, 'nothing denied reaches the upstream');
    } finally {
      flux.close();
      argo.close();
    }
  });

  it('refuses every malformed SVID of the dev PKI with its code, in the answer and in the log', async () => {
    const expected: Record<string, string> = {
      leafIsCa: 'ERR_X509_LEAF_CA',
      twoUriSans: 'ERR_X509_MULTIPLE_URI_SANS',
      noUriSan: 'ERR_X509_NO_URI_SAN',
      leafKeyCertSign: 'ERR_X509_LEAF_KEY_CERT_SIGN',
      leafCrlSign: 'ERR_X509_LEAF_CRL_SIGN',
      noDigitalSignature: 'ERR_X509_LEAF_NO_DIGITAL_SIGNATURE',
      expired: 'ERR_X509_EXPIRED',
      notYetValid: 'ERR_X509_NOT_YET_VALID',
      wrongScheme: 'ERR_ID_WRONG_SCHEME',
      rootPath: 'ERR_X509_LEAF_ROOT_PATH',
      forgedTrustDomain: 'ERR_X509_WRONG_TRUST_DOMAIN',
    };
    recorded = [];
    for (const [name, code] of Object.entries(expected)) {
      const session = h2(pki.bad[name as keyof DevPki['bad']]);
      try {
        const r = await get(session, '/api/v1/namespaces/default/pods');
        assert.equal(r.status, 401, `${name}: ${r.body}`);
        assert.match(r.body, new RegExp(code), name);
        assert.ok(logged(code), `${code} is in the log`);
      } finally {
        session.close();
      }
    }
    assert.equal(recorded.length, 0);
  });

  it('refuses a client without a certificate', async () => {
    const session = h2(undefined);
    try {
      const r = await get(session, '/version');
      assert.equal(r.status, 401);
      assert.match(r.body, /ERR_TLS_NO_CLIENT_CERT/);
    } finally {
      session.close();
    }
  });

  it('refuses client-sent Impersonate-* headers in any case', async () => {
    recorded = [];
    const session = h2(pki.good.clientArgocd);
    try {
      for (const name of ['impersonate-user', 'Impersonate-Group', 'IMPERSONATE-EXTRA-scopes']) {
        const r = await get(session, '/api/v1/namespaces/default/pods', { [name]: 'system:admin' });
        assert.equal(r.status, 403, name);
      }
      assert.equal(recorded.length, 0);
    } finally {
      session.close();
    }
  });

  it('applies a policy edit to an already-open HTTP/2 connection at its next request', async () => {
    const session = h2(pki.good.clientFlux);
    try {
      assert.equal((await get(session, '/api/v1/namespaces/default/pods')).status, 403);
      replaceFile(
        policyFile,
        policyYaml(`  - name: flux
    match:
      pattern: spiffe://hub.example.org/ns/*/sa/kustomize-controller
    identity:
      user: "flux:{segment:1}"
`),
      );
      let status = 403;
      for (let i = 0; i < 100 && status === 403; i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        status = (await get(session, '/api/v1/namespaces/default/pods')).status;
      }
      assert.equal(status, 200, 'the same connection is allowed after the edit');
      assert.equal(recorded.at(-1)?.headers['impersonate-user'], 'flux:flux-system');
      assert.equal(session.closed || session.destroyed, false, 'no reconnect');

      // And back: the rule is removed, and the same connection is refused again.
      replaceFile(policyFile, policyYaml());
      for (let i = 0; i < 100 && status === 200; i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        status = (await get(session, '/api/v1/namespaces/default/pods')).status;
      }
      assert.equal(status, 403);
    } finally {
      session.close();
    }
  });

  it('keeps the last good policy on a broken edit, and reports it with file, line and column in log and metric', async () => {
    const session = h2(pki.good.clientArgocd);
    try {
      assert.equal((await get(session, '/api/v1/namespaces/default/pods')).status, 200);
      replaceFile(policyFile, `${policyYaml()}  - name: broken\n    match:\n      id: not-a-spiffe-id\n`);
      for (let i = 0; i < 100 && !logged('policy file rejected'); i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      const line = logs.find((l) => l.includes('policy file rejected')) ?? '';
      assert.match(
        line,
        /policy\.yaml:16:11: match\.id: .*ERR_ID_WRONG_SCHEME/,
        'file:line:column of the bad ID',
      );
      assert.equal(
        (await get(session, '/api/v1/namespaces/default/pods')).status,
        200,
        'the last good policy applies',
      );
      const metrics = await (await fetch(`http://127.0.0.1:${proxy.admin.address.port}/metrics`)).text();
      assert.match(metrics, /ksp_policy_reload_errors_total [1-9]/);
      assert.match(metrics, /ksp_policy_last_reload_success 0/);
      // Reverting to the content in force ends the failure: the alert on last_reload_success clears.
      replaceFile(policyFile, policyYaml());
      for (let i = 0; i < 100 && !logged('policy file valid again'); i++) {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      const cleared = await (await fetch(`http://127.0.0.1:${proxy.admin.address.port}/metrics`)).text();
      assert.match(cleared, /ksp_policy_last_reload_success 1/);
      assert.match(cleared, /ksp_policy_generation [1-9]/);
    } finally {
      session.close();
    }
  });

  it('re-checks a resumed TLS session: a client SVID that expired since is refused', async () => {
    // A hub SVID valid for 3 more seconds; hub leaves chain straight to the root, so the session's leaf suffices.
    const hub = await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem);
    const now = Date.now();
    const leaf = await makeLeaf({
      subject: 'CN=short-lived',
      issuer: hub,
      notBefore: new Date(now - 60_000),
      notAfter: new Date(now + 3000),
      uris: [ARGOCD],
    });
    const agent = new https.Agent({ keepAlive: false, maxCachedSessions: 10 });
    const request = () => httpsGet(agent, { chainPem: leaf.node.toString(), keyPem: leaf.keyPem });
    const first = await request();
    assert.equal(first.status, 200, first.body);
    assert.equal(first.reused, false);
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, now + 3500 - Date.now())));
    const second = await request();
    assert.equal(second.reused, true, 'the TLS session was resumed (OpenSSL verified nothing)');
    assert.equal(second.status, 401, second.body);
    assert.match(second.body, /ERR_X509_EXPIRED/);
    agent.destroy();
  });

  it('lets no session resume under the old trust once a bundle has lost an authority', async () => {
    const agent = new https.Agent({ keepAlive: false, maxCachedSessions: 10 });
    const argocd = pki.good.clientArgocd;
    const request = () => httpsGet(agent, argocd);
    assert.equal((await request()).status, 200);
    const resumed = await request();
    assert.deepEqual(
      [resumed.status, resumed.reused],
      [200, true],
      'sessions resume while the trust is unchanged',
    );
    // The hub's bundle is replaced by another PKI's: the root that signed the client is gone.
    const other = await makeDevPki();
    files.write('hub.json', bundleJson(other.hub));
    for (let i = 0; i < 100 && !logged('session ticket keys replaced'); i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.ok(logged('session ticket keys replaced'));
    const after = await request();
    assert.equal(after.reused, false, 'the ticket issued under the old trust no longer resumes');
    assert.equal(after.status, 401, after.body);
    assert.match(after.body, /ERR_X509_UNTRUSTED|ERR_X509_WRONG_TRUST_DOMAIN/);
    agent.destroy();
  });

  it('installs the new trust as soon as a policy edit drops a trust domain, not at the next request', async () => {
    const count = (text: string): number => logs.filter((l) => l.includes(text)).length;
    const reloads = count('policy reloaded');
    const replaced = count('session ticket keys replaced');
    // Only a spoke rule left: hub.example.org is no longer a trust domain the proxy accepts.
    replaceFile(
      policyFile,
      `rules:\n  - name: debugger\n    match:\n      id: spiffe://spoke.example.org/ns/ops/sa/debugger\n    identity:\n      user: debugger\n`,
    );
    for (let i = 0; i < 100 && count('policy reloaded') === reloads; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.ok(count('policy reloaded') > reloads);
    // No request or handshake happened since: the reload itself swapped the context and voided the tickets.
    assert.equal(count('session ticket keys replaced'), replaced + 1);
    replaceFile(policyFile, policyYaml());
    for (let i = 0; i < 100 && count('policy reloaded') === reloads + 1; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  });

  it('refuses TLS 1.2 renegotiation', async () => {
    const socket = tls.connect({
      host: '127.0.0.1',
      port: proxy.port,
      maxVersion: 'TLSv1.2',
      ALPNProtocols: ['http/1.1'],
      ...clientTls(pki, pki.good.clientArgocd),
    });
    socket.on('error', () => {});
    await new Promise<void>((resolve) => socket.once('secureConnect', () => resolve()));
    assert.equal(socket.getProtocol(), 'TLSv1.2');
    const outcome = await new Promise<string>((resolve) => {
      const asked = socket.renegotiate({ rejectUnauthorized: false }, (err) =>
        resolve(err ? 'refused' : 'renegotiated'),
      );
      if (!asked) resolve('refused');
      socket.once('close', () => resolve('refused'));
    });
    assert.equal(outcome, 'refused');
    socket.destroy();
  });

  it('serves /healthz, /readyz and /metrics on the admin port', async () => {
    const fetchAdmin = async (path: string) => {
      const res = await fetch(`http://127.0.0.1:${proxy.admin.address.port}${path}`);
      return { status: res.status, body: await res.text() };
    };
    assert.equal((await fetchAdmin('/healthz')).status, 200);
    const ready = await fetchAdmin('/readyz');
    assert.equal(ready.status, 200, ready.body);
    const metrics = (await fetchAdmin('/metrics')).body;
    assert.match(metrics, /ksp_authentication_failures_total\{code="ERR_X509_WRONG_TRUST_DOMAIN"\} [1-9]/);
    assert.match(metrics, /ksp_decisions_total\{rule="argocd-controller",decision="allow",code=""\} [1-9]/);
    assert.match(metrics, /ksp_svid_expiry_seconds \d+/);
    assert.match(metrics, /ksp_bundle_age_seconds\{trust_domain="hub.example.org"\}/);
  });
});

/**
 * Replaces a file whole, as a ConfigMap update or an editor's save does (write aside, then rename): the watcher
 * never reads it half-written, which would be a different broken edit from the one a test means.
 */
function replaceFile(file: string, text: string): void {
  writeFileSync(`${file}.tmp`, text);
  renameSync(`${file}.tmp`, file);
}
