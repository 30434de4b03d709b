/**
 * The Workload API client: address parsing, response decoding, and the sources (X509Source, JwtSource)
 * against the REAL agent (WorkloadAgent: local CA, unix attestor, real socket). Where the agent cannot
 * produce a situation (a server that answers InvalidArgument or Unavailable), a STAND-IN grpc-js server bound on
 * a Unix socket plays the Workload API. Waits are "eventually" waits with generous timeouts, never timings.
 */
// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { webcrypto, type X509Certificate } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { WorkloadAgent } from '../../../src/agent/agent.ts';
import { LocalCa } from '../../../src/agent/ca.ts';
import { generateKeyPair } from '../../../src/agent/keys.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import { verifyJwtSvid } from '../../../src/spiffe/jwtsvid.ts';
import { verifyX509Svid } from '../../../src/spiffe/x509svid.ts';
import {
  JwtSource,
  parseX509SvidResponse,
  resolveEndpoint,
  WorkloadApiError,
  type X509Context,
  X509Source,
} from '../../../src/workload/client.ts';
import {
  ENDPOINT_SOCKET_ENV,
  parseEndpointAddress,
  workloadApiService,
  type X509SvidResponse,
} from '../../../src/workload/proto.ts';
import { entryFor, startTestAgent, TRUST_DOMAIN, waitFor } from '../../helpers/agent.ts';

const uid = process.getuid?.() ?? 0;
const td = TrustDomain.parse(TRUST_DOMAIN);
const execFileAsync = promisify(execFile);

/** A valid X509SVIDResponse (as the server side of proto-loader takes it) for `spiffe://example.org/<path>`. */
async function svidResponse(ca: LocalCa, path: string): Promise<X509SvidResponse> {
  const keys = await generateKeyPair('ec-p256');
  const id = SpiffeId.fromPath(ca.trustDomain, `/${path}`);
  const signed = await ca.signX509Svid({ id, publicKey: keys.publicKey, ttlSeconds: 3600 });
  return {
    svids: [
      {
        spiffe_id: id.toString(),
        x509_svid: Buffer.concat(signed.certificates.map((c) => c.raw)),
        x509_svid_key: Buffer.from(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)),
        bundle: Buffer.concat(ca.bundle.x509Authorities.map((c) => c.raw)),
        hint: '',
      },
    ],
    crl: [],
    federated_bundles: {},
  };
}

/** A stand-in Workload API on a Unix socket; only FetchX509SVID is implemented, by `handler`. */
async function startStandIn(
  socketPath: string,
  handler: (call: grpc.ServerWritableStream<unknown, X509SvidResponse>) => void,
): Promise<grpc.Server> {
  const server = new grpc.Server();
  server.addService(workloadApiService, { FetchX509SVID: handler });
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix:${socketPath}`, grpc.ServerCredentials.createInsecure(), (err) =>
      err ? reject(err) : resolve(),
    ),
  );
  return server;
}

function stopStandIn(server: grpc.Server): Promise<void> {
  return new Promise((resolve) => server.tryShutdown(() => resolve()));
}

/** Ends a stand-in stream with `code`, after `message` (if any) has gone out. */
function fail(
  call: grpc.ServerWritableStream<unknown, X509SvidResponse>,
  code: grpc.status,
  message?: X509SvidResponse,
): void {
  const end = (): void => {
    call.emit('error', { code, details: `stand-in says ${grpc.status[code]}` });
  };
  if (message === undefined) end();
  else call.write(message, end);
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it holds ("eventually"), with a generous timeout. */
async function until(check: () => boolean, what: string, timeoutMs = 4000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

function updates(source: X509Source) {
  return (listener: (ctx: X509Context) => void) => {
    source.on('update', listener);
    return () => source.off('update', listener);
  };
}

const leafOf = (ctx: X509Context): X509Certificate => ctx.svids[0]?.certificates[0] as X509Certificate;
const caOf = (ctx: X509Context): string =>
  ctx.bundles.getX509Bundle(td)?.authorities[0]?.fingerprint256 ?? 'none';

const isCode =
  (code: grpc.status) =>
  (err: unknown): boolean => {
    assert.ok(err instanceof WorkloadApiError, String(err));
    assert.equal(err.code, code, err.message);
    assert.equal(err.codeName, grpc.status[code]);
    return true;
  };

describe('Workload API address', () => {
  it('accepts unix:///path, unix:/path and a bare absolute path', () => {
    assert.equal(parseEndpointAddress('unix:///a/b'), '/a/b');
    assert.equal(parseEndpointAddress('unix:/a/b'), '/a/b');
    assert.equal(parseEndpointAddress('/a/b'), '/a/b');
    assert.equal(parseEndpointAddress('unix:///run/my%20agent.sock'), '/run/my agent.sock');
    assert.equal(resolveEndpoint('unix:///a/b'), '/a/b');
  });

  it('refuses tcp, a host, a query, relative and empty addresses with a clear RangeError', () => {
    for (const [address, message] of [
      ['tcp://127.0.0.1:1', /scheme "tcp"; only unix:\/\/\/path is supported/],
      ['unix://host/a', /must be unix:\/\/\/absolute\/path, with no host or query/],
      ['unix:///a?x', /must be unix:\/\/\/absolute\/path, with no host or query/],
      ['unix:a/b', /must be unix:\/\/\/absolute\/path/],
      ['a/b', /is not a URI/],
      ['', /is not a URI/],
    ] as const) {
      assert.throws(
        () => parseEndpointAddress(address),
        (err: Error) => {
          assert.ok(err instanceof RangeError, `${address}: ${err}`);
          assert.match(err.message, message, address);
          return true;
        },
      );
    }
    assert.throws(() => resolveEndpoint(''), { name: 'RangeError', message: /no Workload API address/ });
  });

  it('falls back to SPIFFE_ENDPOINT_SOCKET when no address is given', () => {
    const saved = process.env[ENDPOINT_SOCKET_ENV];
    try {
      process.env[ENDPOINT_SOCKET_ENV] = 'unix:///run/from-env.sock';
      assert.equal(resolveEndpoint(undefined), '/run/from-env.sock');
      assert.equal(resolveEndpoint('unix:///run/explicit.sock'), '/run/explicit.sock');
      process.env[ENDPOINT_SOCKET_ENV] = 'tcp://127.0.0.1:8081';
      assert.throws(() => resolveEndpoint(undefined), RangeError);
      delete process.env[ENDPOINT_SOCKET_ENV];
      assert.throws(() => resolveEndpoint(undefined), {
        name: 'RangeError',
        message: new RegExp(`no Workload API address.*${ENDPOINT_SOCKET_ENV}`),
      });
    } finally {
      if (saved === undefined) delete process.env[ENDPOINT_SOCKET_ENV];
      else process.env[ENDPOINT_SOCKET_ENV] = saved;
    }
  });
});

describe('parseX509SvidResponse', () => {
  let ca: LocalCa;
  before(async () => {
    ca = await LocalCa.create({ trustDomain: td });
  });
  after(() => ca?.close());

  it('decodes a well-formed message', async () => {
    const ctx = parseX509SvidResponse(await svidResponse(ca, 'ok'));
    assert.equal(ctx.svids[0]?.id.toString(), `spiffe://${TRUST_DOMAIN}/ok`);
    verifyX509Svid(ctx.svids[0]?.certificates ?? [], ctx.bundles);
  });

  it('refuses a spiffe_id that does not match the certificate', async () => {
    const message = await svidResponse(ca, 'real');
    const [svid] = message.svids;
    assert.ok(svid);
    const lying = { ...message, svids: [{ ...svid, spiffe_id: `spiffe://${TRUST_DOMAIN}/claimed` }] };
    assert.throws(() => parseX509SvidResponse(lying), /does not match the certificate/);
  });

  it('refuses a message with no SVID', () => {
    assert.throws(
      () => parseX509SvidResponse({ svids: [], crl: [], federated_bundles: {} }),
      /carried no SVID/,
    );
  });
});

describe('X509Source against the real agent', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-wl-client-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('reconnects after the agent restarts on the same socket, keeping the last good SVID meanwhile', async () => {
    const socketPath = join(dir, 'restart', 'agent.sock');
    const entriesFile = join(dir, 'restart-entries.yaml');
    await writeFile(entriesFile, `entries:\n${entryFor(uid, 'restarting')}`);
    const start = (): Promise<WorkloadAgent> =>
      WorkloadAgent.start({ trustDomain: td, socketPath, entriesFile, logger: silentLogger() });
    let agent = await start();
    const source = await X509Source.create({
      address: `unix://${socketPath}`,
      initialBackoffMs: 20,
      maxBackoffMs: 200,
    });
    const errors: WorkloadApiError[] = [];
    source.on('error', (err) => errors.push(err));
    try {
      const first = source.context;
      const firstSerial = leafOf(first).serialNumber;
      assert.equal(source.connects, 1);

      await agent.close();
      await until(() => errors.length > 0 && source.connects >= 2, 'the lost stream and a retry');
      assert.ok(errors.every((e) => e.code !== grpc.status.INVALID_ARGUMENT));
      assert.equal(source.svid().certificates[0]?.serialNumber, firstSerial, 'the last good SVID is kept');
      assert.equal(source.context, first);

      agent = await start();
      const next = await waitFor(
        updates(source),
        (ctx) => caOf(ctx) !== caOf(first),
        'an SVID from the new agent',
        10_000,
      );
      assert.equal(next.svids[0]?.id.toString(), `spiffe://${TRUST_DOMAIN}/restarting`);
      assert.notEqual(leafOf(next).serialNumber, firstSerial);
      assert.equal(caOf(next), agent.ca.active.certificate.fingerprint256);
      assert.ok(leafOf(next).checkIssued(agent.ca.active.certificate), 'signed by the new CA');
      verifyX509Svid(next.svids[0]?.certificates ?? [], next.bundles);
      assert.ok(source.connects >= 2, `connects: ${source.connects}`);
      assert.equal(source.context, next);
    } finally {
      source.close();
      await agent.close();
    }
  });

  it('rejects create() with DEADLINE_EXCEEDED when nothing listens, after startTimeoutMs', async () => {
    await assert.rejects(
      X509Source.create({
        address: `unix://${join(dir, 'nobody', 'agent.sock')}`,
        startTimeoutMs: 300,
        initialBackoffMs: 20,
      }),
      (err: unknown) => {
        isCode(grpc.status.DEADLINE_EXCEEDED)(err);
        assert.match((err as Error).message, /no FetchX509SVID update within 300 ms/);
        return true;
      },
    );
  });

  it('leaves no open handle after such a failed create(): the process exits by itself', async () => {
    const clientUrl = new URL('../../../src/workload/client.ts', import.meta.url).href;
    const address = `unix://${join(dir, 'nobody-child', 'agent.sock')}`;
    const script = [
      `import { X509Source } from ${JSON.stringify(clientUrl)};`,
      'try {',
      `  await X509Source.create({ address: ${JSON.stringify(address)}, startTimeoutMs: 300, initialBackoffMs: 20 });`,
      "  console.log('created');",
      '} catch (err) {',
      '  console.log(err.codeName);',
      '}',
    ].join('\n');
    // Asynchronously, and with a kill deadline: a leaked handle would keep the child alive.
    const { stdout } = await execFileAsync(process.execPath, ['--input-type=module', '-e', script], {
      timeout: 15_000,
    });
    assert.equal(stdout.trim(), 'DEADLINE_EXCEEDED');
  });
});

describe('X509Source against a stand-in server', () => {
  let dir: string;
  let ca: LocalCa;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-wl-standin-'));
    ca = await LocalCa.create({ trustDomain: td });
  });
  after(async () => {
    ca?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('rejects create() at once with INVALID_ARGUMENT, and never calls again', async () => {
    const socketPath = join(dir, 'invalid.sock');
    let calls = 0;
    const server = await startStandIn(socketPath, (call) => {
      calls++;
      fail(call, grpc.status.INVALID_ARGUMENT);
    });
    try {
      // The start timeout is far longer than the test: only the fatal error can end create() in time.
      await assert.rejects(
        X509Source.create({ address: `unix://${socketPath}`, startTimeoutMs: 60_000, initialBackoffMs: 10 }),
        isCode(grpc.status.INVALID_ARGUMENT),
      );
      await sleep(200);
      assert.equal(calls, 1);
    } finally {
      await stopStandIn(server);
    }
  });

  it('stops following for good when an open stream ends with INVALID_ARGUMENT', async () => {
    const socketPath = join(dir, 'invalid-later.sock');
    const message = await svidResponse(ca, 'standin');
    let calls = 0;
    const server = await startStandIn(socketPath, (call) => {
      calls++;
      fail(call, grpc.status.INVALID_ARGUMENT, calls === 1 ? message : undefined);
    });
    const source = await X509Source.create({
      address: `unix://${socketPath}`,
      startTimeoutMs: 60_000,
      initialBackoffMs: 10,
      maxBackoffMs: 40,
    });
    try {
      const errors: WorkloadApiError[] = [];
      source.on('error', (err) => errors.push(err));
      await until(() => errors.length === 1, 'the InvalidArgument');
      isCode(grpc.status.INVALID_ARGUMENT)(errors[0]);
      // Many backoff periods (10-40 ms): a follower that retried would have called again by now.
      await sleep(300);
      assert.equal(calls, 1);
      assert.equal(source.connects, 1);
      assert.equal(errors.length, 1);
      assert.equal(source.svid().id.toString(), `spiffe://${TRUST_DOMAIN}/standin`, 'the last good SVID');
    } finally {
      source.close();
      await stopStandIn(server);
    }
  });

  it('retries a stream that ends with UNAVAILABLE', async () => {
    const socketPath = join(dir, 'unavailable.sock');
    const message = await svidResponse(ca, 'flaky');
    let calls = 0;
    const server = await startStandIn(socketPath, (call) => {
      calls++;
      fail(call, grpc.status.UNAVAILABLE, message);
    });
    const source = await X509Source.create({
      address: `unix://${socketPath}`,
      startTimeoutMs: 10_000,
      initialBackoffMs: 10,
      maxBackoffMs: 40,
    });
    const errors: WorkloadApiError[] = [];
    source.on('error', (err) => errors.push(err));
    try {
      await until(() => calls >= 3, 'three calls');
      await until(() => source.connects >= 3, 'three streams');
      assert.ok(errors.length >= 2 && errors.every((e) => e.code === grpc.status.UNAVAILABLE));
    } finally {
      source.close();
      await stopStandIn(server);
    }
  });
});

describe('JwtSource against the real agent', () => {
  it('fetches a JWT-SVID for the audience and verifies it locally with the streamed JWT bundle', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'jwt-client')}`);
    const source = await JwtSource.create({ address: t.address });
    try {
      const svid = await source.fetchJwtSvid('my-audience');
      assert.equal(svid.id.toString(), `spiffe://${TRUST_DOMAIN}/jwt-client`);
      assert.deepEqual(svid.audience, ['my-audience']);

      const bundle = source.getJwtBundle(td);
      assert.ok(bundle, 'the JWT bundle of our trust domain');
      assert.deepEqual([...bundle.authorities.keys()], [...t.agent.ca.bundle.jwtAuthorities.keys()]);

      const verified = await verifyJwtSvid(svid.token, source.bundles, 'my-audience');
      assert.equal(verified.id.toString(), `spiffe://${TRUST_DOMAIN}/jwt-client`);
      await assert.rejects(verifyJwtSvid(svid.token, source.bundles, 'another-audience'), /audience/i);
    } finally {
      source.close();
      await t.close();
    }
  });
});
