// The audit sink never blocks the event loop and never grows without bound: a destination that stops reading
// (a FIFO nobody reads, as a stuck log shipper would be) fills `audit.bufferBytes`, and then the proxy refuses
// requests it could not audit (`audit.overflow: refuse`, the default) or drops and counts Events
// (`audit.overflow: drop`). Once the destination reads again, everything buffered arrives, in order.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, constants, openSync, readSync } from 'node:fs';
import http2 from 'node:http2';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { type AuditEvent, fileAuditSink } from '../../src/proxy/audit.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningService, startProxyWorkers } from '../../src/proxy/proxy.ts';
import {
  clientTls,
  type Http2StandIn,
  listenHttp2StandIn,
  type ProxyFiles,
  proxyConfigYaml,
  requestStatus,
  until,
  writeProxyFiles,
} from '../helpers/proxy-fixture.ts';

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const BUFFER = 64 * 1024;

/** A FIFO with its reading end open (non-blocking) and not read until `drain()`. */
function stuckReader(path: string): { drain(): string; close(): void } {
  execFileSync('mkfifo', ['-m', '600', path]);
  const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  const chunk = Buffer.alloc(64 * 1024);
  return {
    drain: () => {
      let text = '';
      for (;;) {
        try {
          const n = readSync(fd, chunk);
          if (n === 0) return text;
          text += chunk.toString('utf8', 0, n);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return text;
          throw err;
        }
      }
    },
    close: () => closeSync(fd),
  };
}

function event(n: number): AuditEvent {
  return {
    kind: 'Event',
    apiVersion: 'audit.k8s.io/v1',
    level: 'Metadata',
    auditID: `id-${n}`,
    stage: 'ResponseComplete',
    requestURI: `/api/v1/namespaces/default/configmaps/c${n}`,
    verb: 'get',
    user: { username: ARGOCD },
    responseStatus: { code: 200 },
    requestReceivedTimestamp: '2026-12-01T00:00:00.000000Z',
    stageTimestamp: '2026-12-01T00:00:00.000100Z',
    annotations: { 'kube-svid-proxy/decision': 'allow', 'kube-svid-proxy/path': 'x'.repeat(500) },
  };
}

describe('audit sink: bounded, never blocking', () => {
  let files: ProxyFiles;
  before(async () => {
    files = writeProxyFiles('ksp-audit-sink-', await makeDevPki(), { policy: 'rules: []\n' });
  });
  after(() => files?.remove());

  it('overflow refuse: reports full once the buffer is, drops nothing it accepted, and delivers it in order', async () => {
    const fifo = join(files.dir, 'refuse.fifo');
    const reader = stuckReader(fifo);
    const sink = fileAuditSink(fifo, { bufferBytes: BUFFER, overflow: 'refuse' });
    let written = 0;
    // The pipe holds 64 KiB, the buffer as much again: the sink must say "full" well before 1,000 Events.
    while (sink.full?.() !== true && written < 1000) {
      sink.write(event(written++));
      await new Promise((resolve) => setImmediate(resolve));
    }
    assert.equal(sink.full?.(), true, 'the sink reports full');
    assert.ok(written < 1000);
    assert.ok((sink.stats?.().bufferedBytes ?? 0) <= BUFFER);
    assert.equal(sink.stats?.().dropped, 0);

    let text = '';
    await until('the sink to empty', () => {
      text += reader.drain();
      return sink.full?.() === false && sink.stats?.().bufferedBytes === 0;
    });
    text += reader.drain();
    const ids = text
      .trim()
      .split('\n')
      .map((line) => (JSON.parse(line) as AuditEvent).auditID);
    assert.deepEqual(
      ids,
      Array.from({ length: written }, (_, i) => `id-${i}`),
    );
    await sink.close();
    reader.close();
  });

  it('overflow drop: never reports full, and counts the Events that did not fit', async () => {
    const fifo = join(files.dir, 'drop.fifo');
    const reader = stuckReader(fifo);
    const sink = fileAuditSink(fifo, { bufferBytes: BUFFER, overflow: 'drop' });
    for (let i = 0; i < 400; i++) {
      sink.write(event(i));
      if (i % 10 === 0) await new Promise((resolve) => setImmediate(resolve));
    }
    assert.equal(sink.full?.(), false);
    const { dropped, bufferedBytes } = sink.stats?.() ?? { dropped: 0, bufferedBytes: 0 };
    assert.ok(dropped > 0, 'some Events were dropped');
    assert.ok(bufferedBytes <= BUFFER);
    let text = '';
    await until('the sink to empty', () => {
      text += reader.drain();
      return sink.stats?.().bufferedBytes === 0;
    });
    text += reader.drain();
    assert.equal(
      text.trim().split('\n').length + dropped,
      400,
      'every Event was written or counted as dropped',
    );
    await sink.close();
    reader.close();
  });

  it('refuses at start an audit.file that cannot be opened, naming it', () => {
    assert.throws(() => fileAuditSink(join(files.dir, 'no-such-dir', 'audit.jsonl')), /ENOENT.*no-such-dir/);
  });
});

for (const workers of [1, 2]) {
  describe(`proxy with a stuck audit destination (audit.overflow: refuse), workers: ${workers}`, () => {
    let pki: DevPki;
    let files: ProxyFiles;
    let upstream: Http2StandIn;
    let proxy: RunningService;
    let reader: ReturnType<typeof stuckReader>;
    let session: http2.ClientHttp2Session;
    const logs: string[] = [];

    before(async () => {
      pki = await makeDevPki();
      files = writeProxyFiles('ksp-audit-proxy-', pki, {
        policy: `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: argocd\n`,
        token: 'proxy-token\n',
        upstreamCa: pki.spoke.rootPem,
      });
      upstream = await listenHttp2StandIn(pki, {}, (_req, res) => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{"kind":"ConfigMap"}');
      });
      const fifo = join(files.dir, 'audit.fifo');
      reader = stuckReader(fifo);
      proxy = await startProxyWorkers(
        parseProxyConfig(
          proxyConfigYaml(files, {
            upstreamUrl: `https://127.0.0.1:${upstream.port}`,
            extra: `workers: ${workers}\naudit: { file: ${fifo}, bufferBytes: ${BUFFER} }\n`,
          }),
          files.configFile,
        ),
        {
          logger: createLogger({ level: 'info', stream: { write: (line: string) => void logs.push(line) } }),
          defaultMetrics: false,
          probeIntervalMs: 60_000,
        },
      );
      session = http2.connect(`https://127.0.0.1:${proxy.port}`, clientTls(pki, pki.good.clientArgocd));
      session.on('error', () => {});
    });

    after(async () => {
      session?.destroy();
      reader?.drain();
      await proxy?.close();
      await upstream?.close();
      reader?.close();
      files?.remove();
    });

    it('answers 503 naming audit.bufferBytes once the destination stops reading, and serves again once it reads', async () => {
      let served = 0;
      let refused: { status: number; body: string } | undefined;
      for (let i = 0; i < 2000 && refused === undefined; i++) {
        const answer = await requestStatus(session, `/api/v1/namespaces/default/configmaps/c${i}`);
        if (answer.status === 200) served++;
        else refused = answer;
      }
      assert.ok(refused, 'a request was refused once the buffer filled');
      assert.equal(refused.status, 503);
      assert.match(refused.body, /audit log is not keeping up.*audit\.bufferBytes/);
      assert.ok(served > 0);
      const metrics = await (await fetch(`http://127.0.0.1:${proxy.admin.address.port}/metrics`)).text();
      assert.match(metrics, /ksp_limit_refusals_total\{limit="audit\.bufferBytes"\} [1-9]/);
      assert.match(metrics, /ksp_audit_buffered_bytes [1-9]/);
      assert.match(metrics, /ksp_audit_events_dropped_total 0/);
      // With workers the refusal is logged by the worker, on its own stderr.
      if (workers === 1) assert.ok(logs.some((l) => l.includes('audit.bufferBytes full')));

      let text = '';
      await until('a request served again', async () => {
        text += reader.drain();
        return (await requestStatus(session, '/api/v1/namespaces/default/configmaps/after')).status === 200;
      });
      await until('its Event', () => {
        text += reader.drain();
        return text.includes('configmaps/after');
      });
      // Every request served before the refusal was audited: none was lost to the full buffer.
      const events = text
        .trim()
        .split('\n')
        .map((line) => JSON.parse(line) as AuditEvent);
      assert.ok(events.filter((e) => e.responseStatus.code === 200).length >= served);
    });
  });
}
