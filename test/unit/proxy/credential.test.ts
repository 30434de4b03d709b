/**
 * The proxy's upstream credential: explicit files, in-cluster (service account directory and environment
 * overridden), and kubeconfig files in the shapes kubectl, kind and kubeadm write. Real files in a temporary
 * directory; token rotations are awaited ("eventually"), and a refused rewrite is checked after several polls.
 */
// Must stay first: @peculiar/x509 (used by the dev PKI) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { stringify } from 'yaml';
import { type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import { loadUpstreamCredential, type UpstreamCredential } from '../../../src/proxy/credential.ts';
import { isProxyError } from '../../../src/proxy/errors.ts';

const b64 = (text: string): string => Buffer.from(text).toString('base64');

/** Waits until `check` holds (an "eventually" wait: fs.watch, then the poll). */
async function eventually(check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Asserts an ERR_PROXY_CONFIG whose message matches every pattern. */
async function refused(load: Promise<UpstreamCredential>, ...patterns: RegExp[]): Promise<void> {
  await assert.rejects(load, (err: unknown) => {
    assert.ok(isProxyError(err, 'ERR_PROXY_CONFIG'), `expected ERR_PROXY_CONFIG, got ${String(err)}`);
    for (const p of patterns) assert.match((err as Error).message, p);
    return true;
  });
}

describe('loadUpstreamCredential', () => {
  let dir: string;
  let pki: DevPki;
  let n = 0;
  const open: UpstreamCredential[] = [];
  const file = (name: string, content: string): string => {
    const path = join(dir, name);
    mkdirSync(join(path, '..'), { recursive: true });
    writeFileSync(path, content);
    return path;
  };
  /** A kubeconfig with one context `main` (current) → cluster `c` and user `u`, and an unused context. */
  const kubeconfig = (cluster: Record<string, unknown>, user: Record<string, unknown>, extra = {}): string =>
    file(
      `kube/config-${++n}`,
      stringify({
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [{ name: 'c', cluster }],
        users: [{ name: 'u', user }],
        contexts: [
          { name: 'main', context: { cluster: 'c', user: 'u', namespace: 'default' } },
          { name: 'other', context: { cluster: 'c', user: 'u' } },
        ],
        'current-context': 'main',
        ...extra,
      }),
    );
  const load = async (...args: Parameters<typeof loadUpstreamCredential>): Promise<UpstreamCredential> => {
    const c = await loadUpstreamCredential(...args);
    open.push(c);
    return c;
  };
  const fromKubeconfig = (path: string, context?: string): Promise<UpstreamCredential> =>
    load({ kind: 'kubeconfig', file: path, ...(context ? { context } : {}) }, { pollIntervalMs: 50 });

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-upstream-'));
    pki = await makeDevPki();
  });
  after(() => {
    for (const c of open) c.close();
    rmSync(dir, { recursive: true, force: true });
  });

  describe('kubeconfig', () => {
    it('reads server, inline CA data and an inline token from the current context', async () => {
      const c = await fromKubeconfig(
        kubeconfig(
          { server: 'https://127.0.0.1:6443', 'certificate-authority-data': b64(pki.spoke.rootPem) },
          { token: 'static-token' },
        ),
      );
      assert.equal(c.url.href, 'https://127.0.0.1:6443/');
      assert.equal(c.ca, pki.spoke.rootPem);
      assert.equal(c.authorization(), 'Bearer static-token');
      assert.equal(c.clientCert, undefined);
      assert.equal(c.clientKey, undefined);
    });

    it('reads a CA file and client certificate files relative to the kubeconfig', async () => {
      file('kube/pki/ca.crt', pki.spoke.rootPem);
      file('kube/pki/client.crt', pki.good.clientArgocd.chainPem);
      file('kube/pki/client.key', pki.good.clientArgocd.keyPem);
      const c = await fromKubeconfig(
        kubeconfig(
          { server: 'https://kube.example:6443', 'certificate-authority': 'pki/ca.crt' },
          { 'client-certificate': 'pki/client.crt', 'client-key': 'pki/client.key' },
        ),
      );
      assert.equal(c.ca, pki.spoke.rootPem);
      assert.equal(c.clientCert, pki.good.clientArgocd.chainPem);
      assert.equal(c.clientKey, pki.good.clientArgocd.keyPem);
      assert.equal(c.authorization(), undefined);
    });

    it('reads client certificate and key data (kind, kubeadm)', async () => {
      const c = await fromKubeconfig(
        kubeconfig(
          { server: 'https://kube.example:6443', 'certificate-authority-data': b64(pki.spoke.rootPem) },
          {
            'client-certificate-data': b64(pki.good.clientFlux.chainPem),
            'client-key-data': b64(pki.good.clientFlux.keyPem),
          },
        ),
      );
      assert.equal(c.clientCert, pki.good.clientFlux.chainPem);
      assert.equal(c.clientKey, pki.good.clientFlux.keyPem);
    });

    it('follows a tokenFile: a rotation is picked up, an empty rewrite keeps the last good token', async () => {
      const token = file('kube/tokens/sa', 'first\n');
      const c = await fromKubeconfig(
        kubeconfig(
          { server: 'https://kube.example:6443' },
          { tokenFile: 'tokens/sa', token: 'ignored-as-client-go-does' },
        ),
      );
      assert.equal(c.authorization(), 'Bearer first');
      writeFileSync(token, 'second\n');
      await eventually(() => c.authorization() === 'Bearer second', 'the rotated token');
      writeFileSync(token, '');
      await sleep(400);
      assert.equal(c.authorization(), 'Bearer second');
      writeFileSync(token, 'third');
      await eventually(() => c.authorization() === 'Bearer third', 'the next token');
      c.close();
      c.close();
    });

    it('uses the named context instead of current-context', async () => {
      const path = file(
        'kube/two-clusters',
        stringify({
          clusters: [
            { name: 'a', cluster: { server: 'https://a.example:6443' } },
            { name: 'b', cluster: { server: 'https://b.example:6443' } },
          ],
          users: [
            { name: 'ua', user: { token: 'ta' } },
            { name: 'ub', user: { token: 'tb' } },
          ],
          contexts: [
            { name: 'ctx-a', context: { cluster: 'a', user: 'ua' } },
            { name: 'ctx-b', context: { cluster: 'b', user: 'ub' } },
          ],
          'current-context': 'ctx-a',
        }),
      );
      const a = await fromKubeconfig(path);
      const b = await fromKubeconfig(path, 'ctx-b');
      assert.equal(a.url.host, 'a.example:6443');
      assert.equal(a.authorization(), 'Bearer ta');
      assert.equal(b.url.host, 'b.example:6443');
      assert.equal(b.authorization(), 'Bearer tb');
    });

    it('refuses a missing context, cluster or user, and a missing current-context, naming what exists', async () => {
      const path = kubeconfig({ server: 'https://kube.example:6443' }, { token: 't' });
      await refused(
        fromKubeconfig(path, 'nope'),
        /upstream\.kubeconfig .*config-\d+/,
        /no context named "nope" in contexts \(defined: main, other\)/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://x:1' }, {}, { 'current-context': '' })),
        /current-context is not set; set it or give upstream.context/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://x:1' }, {}, { clusters: [] })),
        /no cluster named "c" in clusters \(none defined\)/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://x:1' }, {}, { users: [{ name: 'v', user: {} }] })),
        /no user named "u" in users \(defined: v\)/,
      );
    });

    it('refuses exec and auth-provider users, naming them', async () => {
      await refused(
        fromKubeconfig(
          kubeconfig(
            { server: 'https://kube.example:6443' },
            { exec: { apiVersion: 'client.authentication.k8s.io/v1', command: 'aws' } },
          ),
        ),
        /users\["u"\]\.user\.exec: exec credential plugins are not supported/,
      );
      await refused(
        fromKubeconfig(
          kubeconfig({ server: 'https://kube.example:6443' }, { 'auth-provider': { name: 'oidc' } }),
        ),
        /users\["u"\]\.user\.auth-provider: auth-provider plugins are not supported/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://kube.example:6443' }, { as: 'admin' })),
        /user\.as: impersonation in the kubeconfig is not supported/,
      );
    });

    it('refuses insecure-skip-tls-verify, and other cluster settings it cannot honour', async () => {
      await refused(
        fromKubeconfig(
          kubeconfig(
            { server: 'https://kube.example:6443', 'insecure-skip-tls-verify': true },
            { token: 't' },
          ),
        ),
        /clusters\["c"\]\.cluster\.insecure-skip-tls-verify: insecure-skip-tls-verify is refused/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://kube.example:6443', 'proxy-url': 'http://p:3128' }, {})),
        /proxy-url is not supported/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://rancher.example/k8s/clusters/c-1' }, {})),
        /has a path/,
      );
      await refused(fromKubeconfig(kubeconfig({}, {})), /clusters\["c"\]\.cluster\.server is not set/);
      // false is as good as absent.
      const ok = await fromKubeconfig(
        kubeconfig({ server: 'https://kube.example:6443', 'insecure-skip-tls-verify': false }, {}),
      );
      assert.equal(ok.url.hostname, 'kube.example');
    });

    it('refuses unreadable files, bad data and a key that is not the certificate’s', async () => {
      await refused(
        fromKubeconfig(join(dir, 'nope', 'config')),
        /upstream\.kubeconfig .*nope\/config: ENOENT/,
      );
      await refused(fromKubeconfig(file('kube/broken', 'clusters: [\n')), /not YAML/);
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://x:1', 'certificate-authority': 'missing/ca.crt' }, {})),
        /clusters\["c"\]\.cluster\.certificate-authority .*missing\/ca\.crt: ENOENT/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://x:1', 'certificate-authority-data': '%%%' }, {})),
        /certificate-authority-data is not base64/,
      );
      await refused(
        fromKubeconfig(
          kubeconfig(
            { server: 'https://x:1' },
            {
              'client-certificate-data': b64(pki.good.clientArgocd.chainPem),
              'client-key-data': b64(pki.good.clientFlux.keyPem),
            },
          ),
        ),
        /client-key-data does not belong to the certificate of .*client-certificate-data/,
      );
      await refused(
        fromKubeconfig(
          kubeconfig(
            { server: 'https://x:1' },
            { 'client-certificate-data': b64(pki.good.clientArgocd.chainPem) },
          ),
        ),
        /client-certificate and client-key go together/,
      );
      await refused(
        fromKubeconfig(
          kubeconfig(
            { server: 'https://x:1' },
            { 'client-key': 'k', 'client-key-data': b64(pki.good.clientArgocd.keyPem) },
          ),
        ),
        /client-key and client-key-data are both set/,
      );
      await refused(
        fromKubeconfig(kubeconfig({ server: 'https://x:1' }, { tokenFile: 'no/such/token' })),
        /users\["u"\]\.user\.tokenFile .*no\/such\/token: ENOENT/,
      );
    });
  });

  describe('inCluster', () => {
    const serviceAccount = (token: string): string => {
      const sa = mkdtempSync(join(dir, 'sa-'));
      writeFileSync(join(sa, 'token'), token);
      writeFileSync(join(sa, 'ca.crt'), pki.spoke.rootPem);
      return sa;
    };

    it('reads the service account token and CA, and the apiserver from the environment', async () => {
      const sa = serviceAccount('sa-token-1');
      const c = await load(
        { kind: 'inCluster' },
        {
          serviceAccountDir: sa,
          env: { KUBERNETES_SERVICE_HOST: '10.96.0.1', KUBERNETES_SERVICE_PORT: '443' },
          pollIntervalMs: 50,
        },
      );
      assert.equal(c.url.href, 'https://10.96.0.1/');
      assert.equal(c.ca, pki.spoke.rootPem);
      assert.equal(c.authorization(), 'Bearer sa-token-1');
      writeFileSync(join(sa, 'token'), 'sa-token-2');
      await eventually(() => c.authorization() === 'Bearer sa-token-2', 'the rotated service account token');
    });

    it('brackets an IPv6 service host', async () => {
      const c = await load(
        { kind: 'inCluster' },
        {
          serviceAccountDir: serviceAccount('t'),
          env: { KUBERNETES_SERVICE_HOST: 'fd00:10:96::1', KUBERNETES_SERVICE_PORT: '6443' },
        },
      );
      assert.equal(c.url.host, '[fd00:10:96::1]:6443');
    });

    it('refuses outside a pod, and a missing token or CA, naming the file', async () => {
      await refused(
        load({ kind: 'inCluster' }, { serviceAccountDir: serviceAccount('t'), env: {} }),
        /upstream\.inCluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set/,
      );
      const env = { KUBERNETES_SERVICE_HOST: '10.96.0.1', KUBERNETES_SERVICE_PORT: '443' };
      const noToken = serviceAccount('t');
      rmSync(join(noToken, 'token'));
      await refused(
        load({ kind: 'inCluster' }, { serviceAccountDir: noToken, env }),
        new RegExp(`upstream\\.inCluster: token ${noToken}/token: ENOENT`),
      );
      const empty = serviceAccount('  \n');
      await refused(load({ kind: 'inCluster' }, { serviceAccountDir: empty, env }), /token .*is empty/);
      const noCa = serviceAccount('t');
      rmSync(join(noCa, 'ca.crt'));
      await refused(
        load({ kind: 'inCluster' }, { serviceAccountDir: noCa, env }),
        new RegExp(`upstream\\.inCluster: CA ${noCa}/ca\\.crt: ENOENT`),
      );
    });
  });

  describe('explicit files', () => {
    it('reads url, CA, client certificate and a followed token file', async () => {
      const token = file('explicit/token', 'one');
      const c = await load(
        {
          url: new URL('https://127.0.0.1:6443'),
          caFile: file('explicit/ca.crt', pki.spoke.rootPem),
          tokenFile: token,
          clientCertFile: file('explicit/client.crt', pki.good.clientSpoke.chainPem),
          clientKeyFile: file('explicit/client.key', pki.good.clientSpoke.keyPem),
        },
        { pollIntervalMs: 50 },
      );
      assert.equal(c.url.href, 'https://127.0.0.1:6443/');
      assert.equal(c.ca, pki.spoke.rootPem);
      assert.equal(c.clientCert, pki.good.clientSpoke.chainPem);
      assert.equal(c.authorization(), 'Bearer one');
      writeFileSync(token, 'two');
      await eventually(() => c.authorization() === 'Bearer two', 'the rotated token');
    });

    it('works with no credential at all (tests), and refuses unreadable files naming their key', async () => {
      const bare = await load({ kind: 'explicit', url: new URL('http://127.0.0.1:8080') });
      assert.equal(bare.authorization(), undefined);
      assert.equal(bare.ca, undefined);
      const url = new URL('https://127.0.0.1:6443');
      await refused(load({ url, tokenFile: join(dir, 'none') }), /^upstream\.tokenFile .*none: ENOENT/);
      await refused(load({ url, caFile: join(dir, 'none') }), /^upstream\.caFile .*none: ENOENT/);
      await refused(load({ url, caFile: file('explicit/not-a-ca', 'hello') }), /no PEM CERTIFICATE block/);
      await refused(load({ url, tokenFile: file('explicit/empty', '\n') }), /upstream\.tokenFile .*is empty/);
    });
  });
});
