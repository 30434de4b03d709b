/**
 * The credential writer against a STAND-IN for kube-apiserver (an HTTPS server keeping Secrets in memory, with
 * resourceVersion checks as kube-apiserver does), for what a real one will not do on cue: a concurrent edit
 * between the writer's read and its write (409), a missing Secret, a Secret it must refuse to fill. The SVIDs come
 * from the real bundled agent. test/e2e/gitops.test.ts runs the writer against a real kube-apiserver and real Flux.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { makeDevPki } from '../../certs-dev/devpki.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { parseWriterConfig } from '../../src/writer/config.ts';
import { type RunningWriter, startWriter } from '../../src/writer/writer.ts';
import { entryFor, startTestAgent, type TestAgent, TRUST_DOMAIN } from '../helpers/agent.ts';
import { until } from '../helpers/proxy-fixture.ts';

const uid = process.getuid?.() ?? 0;
const b64 = (text: string): string => Buffer.from(text).toString('base64');
const unb64 = (text: string | undefined): string => Buffer.from(text ?? '', 'base64').toString();

interface Stored {
  metadata: { name: string; namespace: string; resourceVersion: string; labels?: Record<string, string> };
  data?: Record<string, string>;
}

describe('credential writer: concurrent edits, missing and unfillable Secrets (kube-apiserver STAND-IN)', () => {
  let agent: TestAgent;
  let server: https.Server;
  let writer: RunningWriter;
  let version = 1;
  const secrets = new Map<string, Stored>();
  const puts: string[] = [];
  /** Runs once before the next PUT is judged: someone else's write sneaking in. */
  let beforeNextPut: (() => void) | undefined;

  const store = (
    namespace: string,
    name: string,
    data: Record<string, string>,
    labels?: Record<string, string>,
  ): void => {
    secrets.set(`${namespace}/${name}`, {
      metadata: { name, namespace, resourceVersion: String(version++), ...(labels ? { labels } : {}) },
      data,
    });
  };

  before(async () => {
    agent = await startTestAgent(`entries:\n${entryFor(uid, 'ns/kube-svid-proxy/sa/credential-writer')}`);
    const pki = await makeDevPki();
    server = https.createServer(
      { cert: pki.good.proxyServer.chainPem, key: pki.good.proxyServer.keyPem },
      (req, res) => {
        const m = /^\/api\/v1\/namespaces\/([^/]+)\/secrets\/([^/?]+)/.exec(req.url ?? '');
        const key = m ? `${m[1]}/${m[2]}` : '';
        const answer = (status: number, body: unknown): void => {
          res.writeHead(status, { 'content-type': 'application/json' });
          res.end(JSON.stringify(body));
        };
        let body = '';
        req.setEncoding('utf8');
        req.on('data', (d: string) => {
          body += d;
        });
        req.on('end', () => {
          if (req.headers.authorization !== 'Bearer writer-token')
            return answer(401, { message: 'Unauthorized' });
          const current = secrets.get(key);
          if (current === undefined)
            return answer(404, { kind: 'Status', message: `secrets "${m?.[2]}" not found` });
          if (req.method === 'GET') return answer(200, current);
          if (req.method !== 'PUT') return answer(405, { message: 'method' });
          puts.push(key);
          beforeNextPut?.();
          beforeNextPut = undefined;
          const sent = JSON.parse(body) as Stored;
          const now = secrets.get(key) as Stored;
          if (sent.metadata.resourceVersion !== now.metadata.resourceVersion) {
            return answer(409, {
              kind: 'Status',
              message:
                'Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again',
            });
          }
          const next = { ...sent, metadata: { ...sent.metadata, resourceVersion: String(version++) } };
          secrets.set(key, next);
          answer(200, next);
        });
      },
    );
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    writeFileSync(join(agent.dir, 'ca.pem'), pki.spoke.rootPem);
    writeFileSync(join(agent.dir, 'token'), 'writer-token\n');
    store('flux-system', 'raced', { unrelated: b64('keep me') });
    store(
      'argocd',
      'token-cluster',
      { server: b64('https://spoke:8443'), config: b64('{"bearerToken":"long-lived"}') },
      { 'argocd.argoproj.io/secret-type': 'cluster' },
    );
    // The first PUT of `raced` meets a concurrent edit: a new key and a label, and a new resourceVersion.
    beforeNextPut = () => {
      const now = secrets.get('flux-system/raced') as Stored;
      secrets.set('flux-system/raced', {
        metadata: { ...now.metadata, labels: { team: 'platform' }, resourceVersion: String(version++) },
        data: { ...now.data, theirs: b64('added meanwhile') },
      });
    };
    writer = await startWriter(
      parseWriterConfig(
        `workloadApi: { socket: ${agent.address} }
admin: { listen: 127.0.0.1:0 }
kubernetes: { url: "https://127.0.0.1:${(server.address() as AddressInfo).port}", caFile: ca.pem, tokenFile: token }
secrets:
  - { kind: flux, namespace: flux-system, name: raced, server: "https://spoke.example.org:8443", trustDomain: ${TRUST_DOMAIN} }
  - { kind: flux, namespace: flux-system, name: missing, server: "https://spoke.example.org:8443", trustDomain: ${TRUST_DOMAIN} }
  - { kind: argocd, namespace: argocd, name: token-cluster, trustDomain: ${TRUST_DOMAIN} }
`,
        join(agent.dir, 'writer.yaml'),
      ),
      { logger: silentLogger(), defaultMetrics: false, initialBackoffMs: 60_000 },
    );
    await until('every Secret synced once', () => writer.status().every((s) => s.rounds > 0));
  });

  after(async () => {
    await writer?.close();
    await new Promise<void>((resolve) => server?.close(() => resolve()));
    await agent?.close();
  });

  const status = (secret: string) => writer.status().find((s) => s.secret === secret);

  it('reads again after a 409 and writes on top of the concurrent edit, losing neither', () => {
    assert.deepEqual(
      puts.filter((p) => p === 'flux-system/raced'),
      ['flux-system/raced', 'flux-system/raced'],
    );
    const raced = secrets.get('flux-system/raced') as Stored;
    assert.equal(unb64(raced.data?.theirs), 'added meanwhile');
    assert.equal(unb64(raced.data?.unrelated), 'keep me');
    assert.deepEqual(raced.metadata.labels, { team: 'platform' });
    assert.match(unb64(raced.data?.value), /client-certificate-data: /);
    assert.equal(status('flux-system/raced')?.lastError, undefined);
  });

  it('never creates a Secret: a missing one is an error naming it, retried, and the writer is not ready', async () => {
    assert.match(
      status('flux-system/missing')?.lastError ?? '',
      /^ERR_WRITER_SECRET: Secret flux-system\/missing does not exist/,
    );
    assert.equal(puts.includes('flux-system/missing'), false);
    const ready = await fetch(`http://127.0.0.1:${writer.admin.address.port}/readyz`);
    assert.equal(ready.status, 503);
    const body = (await ready.json()) as { checks: { name: string; ok: boolean }[] };
    assert.deepEqual(
      body.checks.map((c) => [c.name, c.ok]),
      [
        ['svid', true],
        ['secret flux-system/raced', true],
        ['secret flux-system/missing', false],
        ['secret argocd/token-cluster', false],
      ],
    );
  });

  it('refuses to fill an Argo CD Secret whose config carries another credential, and leaves it untouched', async () => {
    assert.match(status('argocd/token-cluster')?.lastError ?? '', /ERR_WRITER_SECRET: .*bearerToken is set/);
    assert.equal(unb64(secrets.get('argocd/token-cluster')?.data?.config), '{"bearerToken":"long-lived"}');
    const metrics = await (await fetch(`http://127.0.0.1:${writer.admin.address.port}/metrics`)).text();
    assert.match(
      metrics,
      /ksp_writer_errors_total\{secret="argocd\/token-cluster",code="ERR_WRITER_SECRET"\} 1/,
    );
    assert.match(metrics, /ksp_writer_syncs_total\{secret="flux-system\/raced",result="written"\} 1/);
  });
});
