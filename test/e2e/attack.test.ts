/**
 * End to end: attacks on the request target, against a real kube-apiserver and etcd (dev/controlplane.ts).
 * What the policy judges must be exactly what kube-apiserver executes, on every way through the proxy: HTTP/1.1,
 * HTTP/1.1 with `Upgrade` (WebSocket and SPDY/3.1) and HTTP/2. A target that could be read two ways (`\`, dot
 * segments raw or percent-encoded, `#`, control bytes, a host of its own) is refused with 400 before any policy
 * decision and before any upstream connection; nothing reaches kube-apiserver for it, and nothing reaches a
 * listener the client names. Every attack has a control beside it that passes on the same way, so a test that
 * could not see success cannot pass by accident.
 *
 * HTTP/1.1 requests are written raw over TLS (Node's clients normalise targets); HTTP/2 puts the bytes in `:path`.
 * Skips like the other real-peer suites (dev/skip.ts).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import type http2 from 'node:http2';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { stringify } from 'yaml';
import { type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { type ControlPlane, proxyRbac, startControlPlane } from '../../dev/controlplane.ts';
import { e2eSkip } from '../../dev/skip.ts';
import { createLogger } from '../../src/observability/logger.ts';
import type { AuditEvent } from '../../src/proxy/audit.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import { memoryAudit, type ProxyFiles, proxyConfigYaml, writeProxyFiles } from '../helpers/proxy-fixture.ts';
import {
  ConnectionWitness,
  connectHttp2,
  http1Request,
  http2Request,
  rawHttp1,
  type SvidClient,
} from '../helpers/raw-http.ts';

const run = promisify(execFile);
/** Limited to namespace `allowed`: pods, configmaps, pods/exec, and non-resource /openapi/*. */
const LIMITED = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
/** No limits (the README's argocd-controller shape): RBAC alone decides. */
const UNLIMITED = 'spiffe://hub.example.org/ns/flux-system/sa/kustomize-controller';
const BAD_REQUEST = 'ERR_POLICY_BAD_REQUEST';

const skip = await e2eSkip();

/** The Secret's value, fresh per run: neither it nor its base64 may ever come back. */
const SECRET_VALUE = `crown-jewels-${randomBytes(12).toString('hex')}`;
const SECRET_B64 = Buffer.from(SECRET_VALUE).toString('base64');

const POLICY = `rules:
  - name: limited
    match:
      id: ${LIMITED}
    identity:
      user: limited
    limits:
      namespaces: [allowed]
      resources: [pods, configmaps, pods/exec]
      nonResourcePaths: ["/openapi/*"]
  - name: unlimited
    match:
      id: ${UNLIMITED}
    identity:
      user: unlimited
`;

/** Both mapped users are cluster-admin in RBAC: the proxy's limits are the only thing between `limited` and `denied`. */
const OBJECTS = [
  ...proxyRbac(),
  { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'allowed' } },
  { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'denied' } },
  {
    apiVersion: 'v1',
    kind: 'Secret',
    metadata: { name: 'topsecret', namespace: 'denied' },
    stringData: { token: SECRET_VALUE },
  },
  {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name: 'p1', namespace: 'allowed' },
    spec: { containers: [{ name: 'c', image: 'registry.invalid/c:1' }] },
  },
  {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name: 'p2', namespace: 'denied' },
    spec: { containers: [{ name: 'c', image: 'registry.invalid/c:1' }] },
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRoleBinding',
    metadata: { name: 'e2e-attack-cluster-admin' },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'cluster-admin' },
    subjects: [
      { apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: 'limited' },
      { apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: 'unlimited' },
    ],
  },
];

/** The ways a request can take through the proxy. */
type Way = 'HTTP/1.1' | 'HTTP/1.1 Upgrade: websocket' | 'HTTP/1.1 Upgrade: SPDY/3.1' | 'HTTP/2';
const WAYS: readonly Way[] = [
  'HTTP/1.1',
  'HTTP/1.1 Upgrade: websocket',
  'HTTP/1.1 Upgrade: SPDY/3.1',
  'HTTP/2',
];

const UPGRADE_HEADERS: Record<Way, [string, string][]> = {
  'HTTP/1.1': [['Connection', 'close']],
  'HTTP/1.1 Upgrade: websocket': [
    ['Connection', 'Upgrade'],
    ['Upgrade', 'websocket'],
    ['Sec-WebSocket-Version', '13'],
    ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='],
    ['Sec-WebSocket-Protocol', 'v5.channel.k8s.io'],
  ],
  'HTTP/1.1 Upgrade: SPDY/3.1': [
    ['Connection', 'Upgrade'],
    ['Upgrade', 'SPDY/3.1'],
    ['X-Stream-Protocol-Version', 'v4.channel.k8s.io'],
  ],
  'HTTP/2': [],
};

interface Answer {
  readonly status: number;
  readonly body: string;
  /** Refused below HTTP: an HTTP/2 stream reset, or a connection closed without an answer. */
  readonly reset?: string;
}

type Who = 'limited' | 'unlimited';

/** How a target is refused: by the proxy's own 400, or (`parser`) possibly earlier by Node's HTTP parser. */
type Refusal = 'proxy' | 'parser';

/** A leak check: the response must not contain any of these. */
const SECRET_DATA = [SECRET_VALUE, SECRET_B64, '"kind":"Secret"'];
const CLUSTER_ROLE_BINDINGS = ['ClusterRoleBindingList', 'e2e-attack-cluster-admin'];
const EXEC_ADMITTED = ['does not have a host assigned'];

describe('attacks on the request target, against a real kube-apiserver', { skip, timeout: 600_000 }, () => {
  let cp: ControlPlane;
  let pki: DevPki;
  let files: ProxyFiles;
  let proxy: RunningProxy;
  /** The attacker's host: a plain TCP listener that must never see a connection. */
  let attacker: ConnectionWitness;
  const logs: string[] = [];
  const audit = memoryAudit();
  const sessions = new Map<Who, http2.ClientHttp2Session>();

  before(async () => {
    cp = await startControlPlane();
    pki = await makeDevPki();
    attacker = await ConnectionWitness.listen();
    files = writeProxyFiles('ksp-e2e-attack-', pki, {
      policy: POLICY,
      token: `${cp.proxyToken}\n`,
      upstreamCa: cp.caPem,
    });
    const objects = files.write('objects.yaml', OBJECTS.map((o) => stringify(o)).join('---\n'));
    await run('kubectl', [`--kubeconfig=${cp.kubeconfig('admin')}`, 'apply', '-f', objects]);
    const logger = createLogger({ level: 'info', stream: { write: (line: string) => void logs.push(line) } });
    proxy = await startProxy(
      parseProxyConfig(proxyConfigYaml(files, { upstreamUrl: cp.url }), files.configFile),
      { logger, audit: audit.sink, defaultMetrics: false, probeIntervalMs: 60_000 },
    );
    // RBAC reaches the authorizer through an informer: wait until both mapped users can read p1.
    for (const who of ['limited', 'unlimited'] as const) {
      let last: Answer | undefined;
      for (let i = 0; i < 100; i++) {
        last = await send(who, 'HTTP/1.1', 'GET', '/api/v1/namespaces/allowed/pods/p1');
        if (last.status === 200) break;
        await sleep(200);
      }
      assert.equal(last?.status, 200, `${who} cannot read p1 through the proxy: ${last?.body}`);
    }
  });

  after(async () => {
    for (const session of sessions.values()) session.close();
    await proxy?.close();
    await attacker?.close();
    await cp?.close();
    files?.remove();
  });

  function client(who: Who): SvidClient {
    const svid = who === 'limited' ? pki.good.clientArgocd : pki.good.clientFlux;
    return { port: proxy.port, ca: pki.spoke.rootPem, cert: svid.chainPem, key: svid.keyPem };
  }

  function session(who: Who): http2.ClientHttp2Session {
    let s = sessions.get(who);
    if (s === undefined || s.closed || s.destroyed) {
      s = connectHttp2(client(who));
      sessions.set(who, s);
    }
    return s;
  }

  /** One request, byte for byte. `host` replaces the Host header (`:authority` over HTTP/2). */
  async function send(
    who: Who,
    way: Way,
    method: string,
    target: string,
    options: { host?: string } = {},
  ): Promise<Answer> {
    if (way === 'HTTP/2') {
      return http2Request(session(who), {
        ':method': method,
        ':path': target,
        ...(options.host === undefined ? {} : { ':authority': options.host }),
      });
    }
    const answer = await rawHttp1(
      client(who),
      http1Request(method, target, [['Host', options.host ?? 'localhost'], ...UPGRADE_HEADERS[way]]),
    );
    return answer.status === 0 ? { ...answer, reset: 'closed without an answer' } : answer;
  }

  /** The audit lines written since `from` (a forwarded request's line is written as its answer ends). */
  function auditSince(from: number): AuditEvent[] {
    return audit.events.slice(from);
  }

  /**
   * Sends the attack and asserts it was refused with 400 and forwarded nowhere: not to kube-apiserver (no
   * `allow` audit line, no leaked data) and not to the attacker's listener. `parser`: the target is one Node's
   * HTTP/1.1 parser or the HTTP/2 layer may refuse before the proxy sees it (a bare 400, or a stream reset).
   */
  async function assertRefused(
    who: Who,
    way: Way,
    method: string,
    target: string,
    leaks: readonly string[],
    refusal: Refusal = 'proxy',
    options: { host?: string } = {},
  ): Promise<void> {
    const from = audit.events.length;
    const connectionsBefore = attacker.connections;
    const answer = await send(who, way, method, target, options);
    const shown = `${method} ${JSON.stringify(target)} over ${way}`;
    for (const leak of leaks) {
      assert.ok(
        !answer.body.includes(leak),
        `${shown} leaked ${JSON.stringify(leak)}: ${answer.body.slice(0, 400)}`,
      );
    }
    assert.equal(
      await attacker.settle(connectionsBefore),
      connectionsBefore,
      `${shown} made the proxy connect to the attacker's listener`,
    );
    const forwarded = auditSince(from).filter(
      (entry) => entry.annotations['kube-svid-proxy/decision'] === 'allow',
    );
    assert.deepEqual(
      forwarded,
      [],
      `${shown} was forwarded upstream, which answered ${answer.status}: ${answer.body.slice(0, 200)}`,
    );
    if (
      refusal === 'parser' &&
      (answer.reset !== undefined || (answer.status === 400 && answer.body === ''))
    ) {
      return;
    }
    assert.equal(
      answer.status,
      400,
      `${shown}: expected the proxy's 400, got ${answer.status}: ${answer.body}`,
    );
    const status = JSON.parse(answer.body) as { kind?: string; code?: number; message?: string };
    assert.equal(status.kind, 'Status', answer.body);
    assert.equal(status.code, 400, answer.body);
    assert.ok(
      status.message?.includes(BAD_REQUEST),
      `${shown}: the 400's message must name ${BAD_REQUEST}; it says ${JSON.stringify(status.message)}`,
    );
  }

  describe('controls: what succeeds on each way, so the attacks below can be seen to fail', () => {
    for (const way of WAYS) {
      it(`the limited client reads pod p1 in its namespace over ${way}`, async () => {
        const answer = await send('limited', way, 'GET', '/api/v1/namespaces/allowed/pods/p1');
        assert.equal(answer.status, 200, answer.body);
        assert.match(answer.body, /"name":"p1"/);
      });

      it(`the limited client is refused the Secret in namespace denied when it asks plainly, over ${way}`, async () => {
        const answer = await send('limited', way, 'GET', '/api/v1/namespaces/denied/secrets/topsecret');
        assert.equal(answer.status, 403, answer.body);
        assert.match(answer.body, /ERR_POLICY_REQUEST_LIMIT/);
        for (const leak of SECRET_DATA) assert.ok(!answer.body.includes(leak));
      });

      it(`the limited client reads /openapi/v2 over ${way}`, async () => {
        const answer = await send('limited', way, 'GET', '/openapi/v2');
        assert.equal(answer.status, 200, answer.body.slice(0, 400));
        assert.match(answer.body, /"swagger"/);
      });

      it(`the unlimited client reads pod p1, and the attacker's listener sees nothing, over ${way}`, async () => {
        const before = attacker.connections;
        const answer = await send('unlimited', way, 'GET', '/api/v1/namespaces/allowed/pods/p1');
        assert.equal(answer.status, 200, answer.body);
        assert.match(answer.body, /"name":"p1"/);
        assert.equal(await attacker.settle(before), before);
      });
    }

    it('the limited client’s exec on p1 goes through the upgrade path, and kube-apiserver answers it', async () => {
      const from = audit.events.length;
      const spdy = await send(
        'limited',
        'HTTP/1.1 Upgrade: SPDY/3.1',
        'POST',
        '/api/v1/namespaces/allowed/pods/p1/exec?command=id&stdout=true',
      );
      assert.match(
        spdy.body,
        /pod p1 does not have a host assigned/,
        `kube-apiserver's own answer: ${spdy.body}`,
      );
      assert.doesNotMatch(spdy.body, /kube-svid-proxy/);
      const websocket = await send(
        'limited',
        'HTTP/1.1 Upgrade: websocket',
        'GET',
        '/api/v1/namespaces/allowed/pods/p1/exec?command=id&stdout=true',
      );
      assert.match(websocket.body, /pod p1 does not have a host assigned/, websocket.body);
      assert.ok(
        auditSince(from).filter(
          (e) =>
            e.annotations['kube-svid-proxy/decision'] === 'allow' &&
            e.annotations['kube-svid-proxy/upgrade'] !== undefined,
        ).length >= 2,
        'both went through the upgrade path and were forwarded',
      );
    });

    it('the limited client is refused exec on p2 in namespace denied when it asks plainly', async () => {
      const answer = await send(
        'limited',
        'HTTP/1.1 Upgrade: SPDY/3.1',
        'POST',
        '/api/v1/namespaces/denied/pods/p2/exec?command=id&stdout=true',
      );
      assert.equal(answer.status, 403, answer.body);
      assert.match(answer.body, /ERR_POLICY_REQUEST_LIMIT/);
    });
  });

  describe('backslashes read as slashes: the judged path is not the executed one', () => {
    const cases: { method: string; target: string; leaks: readonly string[] }[] = [
      {
        method: 'GET',
        target: '/openapi/v2\\..\\..\\api\\v1\\namespaces\\denied\\secrets\\topsecret',
        leaks: SECRET_DATA,
      },
      {
        method: 'GET',
        target:
          '/api/v1/namespaces/allowed/pods/x\\..\\..\\..\\..\\..\\..\\apis\\rbac.authorization.k8s.io\\v1\\clusterrolebindings',
        leaks: CLUSTER_ROLE_BINDINGS,
      },
      {
        method: 'POST',
        target:
          '/api/v1/namespaces/allowed/pods/p1\\..\\..\\..\\denied\\pods\\p2/exec?command=id&stdout=true',
        leaks: EXEC_ADMITTED,
      },
    ];
    for (const { method, target, leaks } of cases) {
      for (const way of WAYS) {
        it(`refuses ${method} ${target} over ${way} with 400`, () =>
          assertRefused('limited', way, method, target, leaks));
      }
    }
  });

  describe('a target that names another host: the proxy’s credential never leaves for it', () => {
    // `{port}` is the attacker's listener, known once it runs.
    const shapes: { target: string; refusal: Refusal }[] = [
      { target: '/\\127.0.0.1:{port}/stolen', refusal: 'proxy' },
      { target: '/\\\\127.0.0.1:{port}/x', refusal: 'proxy' },
      { target: '/%5C127.0.0.1:{port}/x', refusal: 'proxy' },
      { target: '/%5c127.0.0.1:{port}/x', refusal: 'proxy' },
      // Node's HTTP/1.1 parser refuses a target that starts with neither "/" nor a scheme; HTTP/2 resets it.
      { target: '\\127.0.0.1:{port}/x', refusal: 'parser' },
      // Absolute form: HTTP/1.1 lets it through to the proxy; HTTP/2's `:path` may not hold it (a reset).
      { target: 'https://127.0.0.1:{port}/x', refusal: 'parser' },
      { target: '//127.0.0.1:{port}/x', refusal: 'proxy' },
      { target: '/..\\127.0.0.1:{port}', refusal: 'proxy' },
    ];
    for (const { target, refusal } of shapes) {
      for (const way of WAYS) {
        it(`refuses GET ${target} over ${way} with 400, and the listener sees nothing`, () =>
          assertRefused(
            'unlimited',
            way,
            'GET',
            target.replace('{port}', String(attacker.port)),
            [],
            refusal,
          ));
      }
    }
  });

  describe('more readings that could differ', () => {
    const refused: {
      what: string;
      method: string;
      target: string;
      leaks: readonly string[];
      refusal?: Refusal;
    }[] = [
      {
        what: 'encoded dot segments',
        method: 'GET',
        target: '/api/v1/namespaces/allowed/pods/x/%2e%2e/%2e%2e/denied/secrets',
        leaks: SECRET_DATA,
      },
      {
        what: 'encoded dot segments, upper case',
        method: 'GET',
        target: '/api/v1/namespaces/allowed/pods/x/%2E%2E/%2E%2E/denied/secrets/topsecret',
        leaks: SECRET_DATA,
      },
      {
        what: 'an encoded slash around dots',
        method: 'GET',
        target: '/api/v1/namespaces/allowed%2F..%2Fdenied/secrets/topsecret',
        leaks: SECRET_DATA,
      },
      {
        what: 'encoded backslashes',
        method: 'GET',
        target: '/openapi/v2%5c..%5c..%5capi%5cv1%5cnamespaces%5cdenied%5csecrets%5ctopsecret',
        leaks: SECRET_DATA,
      },
      {
        what: 'raw dot segments behind ";"',
        method: 'GET',
        target: '/api/v1/namespaces/allowed/pods/p1;/../../../denied/secrets/topsecret',
        leaks: SECRET_DATA,
      },
      {
        what: 'a fragment',
        method: 'GET',
        target: '/api/v1/namespaces/allowed/pods/p1#fragment',
        leaks: [],
      },
      {
        what: 'a fragment hiding backslashed dot segments',
        method: 'GET',
        target: '/api/v1/namespaces/allowed/pods/x#\\..\\..\\..\\denied\\secrets\\topsecret',
        leaks: SECRET_DATA,
      },
      {
        what: 'a tab',
        method: 'GET',
        target: '/api/v1/namespaces/allowed/pods/p1\t/../../../denied/secrets/topsecret',
        leaks: SECRET_DATA,
        refusal: 'parser',
      },
      {
        what: 'a DEL byte',
        method: 'GET',
        target: '/api/v1/namespaces/allowed/pods/p1\x7f',
        leaks: [],
        refusal: 'parser',
      },
    ];
    for (const { what, method, target, leaks, refusal } of refused) {
      for (const way of WAYS) {
        it(`refuses ${what} (${JSON.stringify(target)}) over ${way} with 400`, () =>
          assertRefused('limited', way, method, target, leaks, refusal));
      }
    }

    for (const way of WAYS) {
      it(`a Host naming another host still reaches only the configured kube-apiserver, over ${way}`, async () => {
        const before = attacker.connections;
        const answer = await send('limited', way, 'GET', '/api/v1/namespaces/allowed/pods/p1', {
          host: `127.0.0.1:${attacker.port}`,
        });
        assert.equal(answer.status, 200, answer.body);
        assert.match(answer.body, /"name":"p1"/);
        assert.equal(await attacker.settle(before), before, 'the listener named in Host saw nothing');
      });

      it(`";" is forwarded as it is, and kube-apiserver reads it as part of the name, over ${way}`, async () => {
        // Go gives ";" no meaning in a path: the name is "p1;x=y", which does not exist.
        const answer = await send('limited', way, 'GET', '/api/v1/namespaces/allowed/pods/p1;x=y');
        if (answer.body.includes('kube-svid-proxy')) {
          assert.equal(answer.status, 400, answer.body);
          assert.match(answer.body, new RegExp(BAD_REQUEST));
          return;
        }
        assert.equal(answer.status, 404, answer.body);
        assert.match(answer.body, /pods \\"p1;x=y\\" not found/);
      });

      it(`a double-encoded backslash is judged as kube-apiserver reads it: a literal name, never denied data, over ${way}`, async () => {
        // Go decodes once: the name is the literal "x%5C..%5C…" in namespace allowed. Forwarded byte for byte,
        // kube-apiserver answers for that name (it refuses a name with "%", or finds no such pod); refusing the
        // target outright (the proxy's 400) is consistent too.
        const target =
          '/api/v1/namespaces/allowed/pods/x%255C..%255C..%255C..%255Cdenied%255Csecrets%255Ctopsecret';
        const answer = await send('limited', way, 'GET', target);
        for (const leak of SECRET_DATA) assert.ok(!answer.body.includes(leak), answer.body.slice(0, 400));
        if (answer.body.includes('kube-svid-proxy')) {
          assert.equal(answer.status, 400, answer.body);
          assert.match(answer.body, new RegExp(BAD_REQUEST));
          return;
        }
        assert.ok([400, 404].includes(answer.status), `${answer.status}: ${answer.body}`);
        assert.match(
          answer.body,
          /\\"x%5C\.\.%5C\.\.%5C\.\.%5Cdenied%5Csecrets%5Ctopsecret\\"/,
          'kube-apiserver answers for the literal name',
        );
      });
    }
  });

  describe('starvation: one client’s watches cannot hold up another client’s requests', () => {
    it('answers the limited client’s GET while the unlimited client holds 400 watches on kube-apiserver', async () => {
      // 400 watches over two HTTP/2 connections (limits.maxStreamsPerConnection is 250 by default).
      const watchers = [connectHttp2(client('unlimited')), connectHttp2(client('unlimited'))];
      try {
        const opened = await Promise.all(
          Array.from(
            { length: 400 },
            (_, i) =>
              new Promise<number>((resolve) => {
                const stream = (watchers[i % 2] as http2.ClientHttp2Session).request({
                  ':path': `/api/v1/namespaces/allowed/configmaps?watch=true&labelSelector=n%3D${i}`,
                });
                stream.on('error', () => resolve(0));
                stream.on('response', (headers) => resolve(Number(headers[':status'])));
                stream.resume();
              }),
          ),
        );
        assert.deepEqual(
          [...new Set(opened)],
          [200],
          'every watch is open on kube-apiserver (the control: they really hold streams)',
        );
        assert.equal(proxy.server.inFlight(UNLIMITED).longRunning, 400);
        // Before the separate pools, this waited 70 s behind the watches and failed with 504.
        for (const way of WAYS) {
          const answer = await send('limited', way, 'GET', '/api/v1/namespaces/allowed/pods/p1');
          assert.equal(answer.status, 200, `${way}: ${answer.body.slice(0, 200)}`);
        }
      } finally {
        for (const w of watchers) w.destroy();
      }
      for (let i = 0; i < 100 && proxy.server.inFlight(UNLIMITED).longRunning > 0; i++) await sleep(100);
      assert.equal(
        proxy.server.inFlight(UNLIMITED).longRunning,
        0,
        'closing the watches gives the slots back',
      );
    });
  });
});
