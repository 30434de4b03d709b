import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect, createServer, type Server } from 'node:net';
import { Writable } from 'node:stream';
import { afterEach, describe, it } from 'node:test';
import { pino } from 'pino';
import { type AdminServer, createAdminServer, type ReadinessReport } from '../../../src/admin/server.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import { ProxyMetrics } from '../../../src/observability/metrics.ts';

const servers: AdminServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

const READY: ReadinessReport = {
  ready: true,
  checks: [
    { name: 'svid', ok: true, detail: 'valid for another 41m' },
    { name: 'policy', ok: true, detail: 'generation 3' },
  ],
};

async function start(
  overrides: Partial<Parameters<typeof createAdminServer>[0]> = {},
  metrics: ProxyMetrics = new ProxyMetrics({ defaultMetrics: false }),
): Promise<{ server: AdminServer; url: (path: string) => string; metrics: ProxyMetrics }> {
  const server = await createAdminServer({
    metrics,
    readiness: () => READY,
    logger: silentLogger(),
    port: 0,
    ...overrides,
  });
  servers.push(server);
  return { server, metrics, url: (path) => `http://127.0.0.1:${server.address.port}${path}` };
}

/** Resolves true if something accepts TCP connections on 127.0.0.1:port. */
async function accepts(port: number): Promise<boolean> {
  const socket = connect({ host: '127.0.0.1', port });
  try {
    await once(socket, 'connect');
    return true;
  } catch {
    return false;
  } finally {
    socket.destroy();
  }
}

describe('admin server', () => {
  it('binds to 127.0.0.1 on a free port by default', async () => {
    const { server } = await start();
    assert.equal(server.address.host, '127.0.0.1');
    assert.ok(server.address.port > 0);
  });

  it('GET /healthz answers 200 {"status":"ok"}', async () => {
    const { url } = await start({
      readiness: () => ({ ready: false, checks: [] }),
    });
    const response = await fetch(url('/healthz'));
    assert.equal(response.status, 200);
    assert.match(response.headers.get('content-type') ?? '', /^application\/json/);
    assert.equal(response.headers.get('cache-control'), 'no-store');
    assert.deepEqual(await response.json(), { status: 'ok' });
  });

  it('GET /readyz answers 200 when ready and 503 when not, with the checks in the body', async () => {
    let report: ReadinessReport = READY;
    const { url } = await start({ readiness: () => report });

    let response = await fetch(url('/readyz'));
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), READY);

    report = {
      ready: false,
      checks: [
        { name: 'svid', ok: false, detail: 'expires in 20s' },
        { name: 'policy', ok: true, detail: 'generation 3' },
        { name: 'upstream', ok: false, detail: 'connect ECONNREFUSED 10.0.0.1:6443' },
      ],
    };
    response = await fetch(url('/readyz'));
    assert.equal(response.status, 503);
    assert.equal(response.headers.get('cache-control'), 'no-store');
    assert.deepEqual(await response.json(), report);

    report = READY;
    assert.equal((await fetch(url('/readyz'))).status, 200, 'ready again');
  });

  it('GET /readyz awaits an async readiness function and only sends the declared fields', async () => {
    const { url } = await start({
      readiness: async () => {
        await new Promise((resolve) => setTimeout(resolve, 5));
        const check = { name: 'svid', ok: true, detail: 'fine', secret: 'not for the wire' };
        return { ready: true, checks: [check], extra: 1 };
      },
    });
    const response = await fetch(url('/readyz'));
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), {
      ready: true,
      checks: [{ name: 'svid', ok: true, detail: 'fine' }],
    });
  });

  it('GET /readyz answers 503 when the readiness function throws', async () => {
    const { url } = await start({
      readiness: () => {
        throw new Error('source not started');
      },
    });
    const response = await fetch(url('/readyz'));
    assert.equal(response.status, 503);
    assert.deepEqual(await response.json(), {
      ready: false,
      checks: [{ name: 'readiness', ok: false, detail: 'source not started' }],
    });
  });

  it('GET /metrics answers the Prometheus text with the registry content type', async () => {
    const { url, metrics } = await start();
    metrics.handshake('refused', 0.001);
    metrics.authFailure('ERR_X509_EXPIRED');
    metrics.decision('ci', false, 'ERR_POLICY_REQUEST_LIMIT');
    metrics.request(403, 0.002);
    metrics.policyLoaded(7);
    const response = await fetch(url('/metrics'));
    assert.equal(response.status, 200);
    assert.equal(response.headers.get('content-type'), metrics.contentType);
    const text = await response.text();
    assert.match(text, /^ksp_handshakes_total\{result="refused"\} 1$/m);
    assert.match(text, /^ksp_authentication_failures_total\{code="ERR_X509_EXPIRED"\} 1$/m);
    assert.match(
      text,
      /^ksp_decisions_total\{rule="ci",decision="deny",code="ERR_POLICY_REQUEST_LIMIT"\} 1$/m,
    );
    assert.match(text, /^ksp_requests_total\{code="403"\} 1$/m);
    assert.match(text, /^ksp_policy_generation 7$/m);
    assert.match(text, /^ksp_policy_last_reload_success 1$/m);
  });

  it('GET /metrics computes the SVID expiry and bundle ages at each scrape', async () => {
    let now = Date.parse('2030-01-01T00:00:00Z');
    const metrics = new ProxyMetrics({ defaultMetrics: false, now: () => now });
    let expiry = new Date(now + 900_000);
    metrics.setSvidExpiry(() => expiry);
    metrics.setBundleAges(() => new Map([['example.org', new Date(Date.parse('2029-12-31T23:59:00Z'))]]));
    const { url } = await start({}, metrics);

    let text = await (await fetch(url('/metrics'))).text();
    assert.match(text, /^ksp_svid_expiry_seconds 900$/m);
    assert.match(text, /^ksp_bundle_age_seconds\{trust_domain="example.org"\} 60$/m);

    now += 60_000;
    expiry = new Date(now + 1_800_000);
    text = await (await fetch(url('/metrics'))).text();
    assert.match(text, /^ksp_svid_expiry_seconds 1800$/m);
    assert.match(text, /^ksp_bundle_age_seconds\{trust_domain="example.org"\} 120$/m);
  });

  it('unknown routes answer 404 JSON', async () => {
    const { url } = await start();
    for (const [method, path] of [
      ['GET', '/'],
      ['GET', '/debug/pprof'],
      ['POST', '/healthz'],
    ] as const) {
      const response = await fetch(url(path), { method });
      assert.equal(response.status, 404, `${method} ${path}`);
      assert.match(response.headers.get('content-type') ?? '', /^application\/json/);
      const body = (await response.json()) as { error: string; message: string };
      assert.equal(body.error, 'Not Found');
      assert.match(body.message, new RegExp(`${method} ${path}`));
    }
  });

  it('logs one debug line per request with the given logger', async () => {
    const lines: Record<string, unknown>[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
        callback();
      },
    });
    const { url } = await start({ logger: pino({ level: 'debug' }, sink) });
    await (await fetch(url('/healthz'))).text();
    await (await fetch(url('/nope'))).text();
    const requests = lines.filter((line) => line.msg === 'admin request');
    assert.deepEqual(
      requests.map((line) => [line.method, line.url, line.statusCode]),
      [
        ['GET', '/healthz', 200],
        ['GET', '/nope', 404],
      ],
    );
    assert.equal(requests[0]?.level, 20);
  });

  it('close() frees the port, even with a keep-alive connection open', async () => {
    const { server, url } = await start();
    const { port } = server.address;
    const response = await fetch(url('/healthz'), { headers: { connection: 'keep-alive' } });
    await response.text();
    await server.close();
    await server.close(); // idempotent
    assert.equal(await accepts(port), false);

    const again = await createAdminServer({
      metrics: new ProxyMetrics({ defaultMetrics: false }),
      readiness: () => READY,
      logger: silentLogger(),
      port,
    });
    servers.push(again);
    assert.equal(again.address.port, port);
    assert.equal((await fetch(url('/healthz'))).status, 200);
  });

  it('rejects when the port is taken', async () => {
    const blocker: Server = createServer();
    blocker.listen(0, '127.0.0.1');
    await once(blocker, 'listening');
    const address = blocker.address();
    assert.ok(address !== null && typeof address === 'object');
    try {
      await assert.rejects(
        createAdminServer({
          metrics: new ProxyMetrics({ defaultMetrics: false }),
          readiness: () => READY,
          logger: silentLogger(),
          port: address.port,
        }),
        { code: 'EADDRINUSE' },
      );
    } finally {
      blocker.close();
    }
  });
});
