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
import { generateKeyPairSync, type X509Certificate } from 'node:crypto';
import type { EventEmitter } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { WorkloadAgent } from '../../../src/agent/agent.ts';
import { LocalCa } from '../../../src/agent/ca.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import { isSpiffeError } from '../../../src/spiffe/errors.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import { mintJwtSvid, verifyJwtSvid } from '../../../src/spiffe/jwtsvid.ts';
import { verifyX509Svid } from '../../../src/spiffe/x509svid.ts';
import {
  JwtSource,
  parseJwtBundlesResponse,
  parseX509SvidResponse,
  resolveEndpoint,
  WorkloadApiError,
  WorkloadClient,
  type X509Context,
  X509Source,
} from '../../../src/workload/client.ts';
import { WorkloadError, WorkloadErrorCode } from '../../../src/workload/errors.ts';
import {
  ENDPOINT_SOCKET_ENV,
  type JwtBundlesResponse,
  parseEndpointAddress,
  type X509SvidResponse,
} from '../../../src/workload/proto.ts';
import { entryFor, startTestAgent, TRUST_DOMAIN, waitFor } from '../../helpers/agent.ts';
import {
  derBundle,
  endStream,
  jwtBundlesResponse,
  startStandIn,
  svidResponse,
} from '../../helpers/workload-standin.ts';

const uid = process.getuid?.() ?? 0;
const td = TrustDomain.parse(TRUST_DOMAIN);
const execFileAsync = promisify(execFile);

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

/** Subscribes to any event of a source, for `waitFor`. */
function on<T>(source: object, event: string) {
  const emitter = source as EventEmitter;
  return (listener: (value: T) => void) => {
    emitter.on(event, listener);
    return () => emitter.off(event, listener);
  };
}

/** Asserts a WorkloadError with `code`, and returns it for more checks. */
function workloadError(err: unknown, code: WorkloadErrorCode): WorkloadError {
  assert.ok(err instanceof WorkloadError, `expected a WorkloadError, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  return err;
}

/** Runs `fn`, asserts it throws a WorkloadError with `code`, and returns it. */
function throwsWorkload(fn: () => unknown, code: WorkloadErrorCode): WorkloadError {
  try {
    fn();
  } catch (err) {
    return workloadError(err, code);
  }
  assert.fail(`expected ${code}, nothing was thrown`);
}

const ecJwk = (curve = 'P-256') =>
  generateKeyPairSync('ec', { namedCurve: curve }).publicKey.export({ format: 'jwk' });
const rsaJwk = () => generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ format: 'jwk' });
const okpJwk = () => generateKeyPairSync('ed25519').publicKey.export({ format: 'jwk' });
const HOUR = 3600_000;

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

  it('refuses an expired SVID with ERR_WORKLOAD_SVID_REFUSED, naming its SPIFFE ID and the rule broken', async () => {
    const message = await svidResponse(ca, 'short-lived', { ttlSeconds: 60 });
    const err = throwsWorkload(
      () => parseX509SvidResponse(message, new Date(Date.now() + HOUR)),
      WorkloadErrorCode.SvidRefused,
    );
    assert.match(
      err.message,
      new RegExp(`^X\\.509-SVID spiffe://${TRUST_DOMAIN}/short-lived refused: ERR_X509_EXPIRED: `),
    );
    assert.equal(err.spiffeId, `spiffe://${TRUST_DOMAIN}/short-lived`);
    assert.ok(isSpiffeError(err.cause, 'ERR_X509_EXPIRED'));
  });

  it('refuses an SVID that does not chain to the bundle of its trust domain sent with it', async () => {
    const other = await LocalCa.create({ trustDomain: td });
    try {
      const forged = await svidResponse(other, 'forged', { bundle: derBundle(ca) });
      const err = throwsWorkload(() => parseX509SvidResponse(forged), WorkloadErrorCode.SvidRefused);
      assert.match(err.message, /X\.509-SVID spiffe:\/\/example\.org\/forged refused: ERR_X509_UNTRUSTED/);
    } finally {
      other.close();
    }
  });

  it('refuses an SVID whose signature was tampered with', async () => {
    const tampered = await svidResponse(ca, 'tampered', {
      // The last byte lies in the signature value: the DER stays well-formed, the signature does not verify.
      tamper: (der) => Buffer.concat([der.subarray(0, -1), Buffer.from([(der.at(-1) as number) ^ 0x01])]),
    });
    const err = throwsWorkload(() => parseX509SvidResponse(tampered), WorkloadErrorCode.SvidRefused);
    assert.match(err.message, /spiffe:\/\/example\.org\/tampered refused: ERR_X509_UNTRUSTED/);
  });

  it('reads a bundle as the DER it must be: DER followed by a PEM block is refused, never read as that block', async () => {
    const other = await LocalCa.create({ trustDomain: td });
    try {
      const smuggled = Buffer.concat([
        derBundle(ca),
        Buffer.from(other.bundle.x509Authorities[0]?.toString() ?? ''),
      ]);
      const message = await svidResponse(ca, 'smuggled', { bundle: smuggled });
      const err = throwsWorkload(() => parseX509SvidResponse(message), WorkloadErrorCode.ResponseRefused);
      assert.match(
        err.message,
        /the X\.509 bundle of "example\.org" is malformed: .*no DER SEQUENCE at byte/,
      );
    } finally {
      other.close();
    }
  });
});

describe('parseJwtBundlesResponse', () => {
  const tdId = `spiffe://${TRUST_DOMAIN}`;
  let ca: LocalCa;
  before(async () => {
    ca = await LocalCa.create({ trustDomain: td });
  });
  after(() => ca?.close());

  it('ignores exactly the keys it cannot use (unknown kty, use other than jwt-svid) and reports each', () => {
    const ignored: string[] = [];
    const set = parseJwtBundlesResponse(
      jwtBundlesResponse(tdId, [
        { kid: 'ec', ...ecJwk() },
        { kid: 'okp', ...okpJwk() },
        { kid: 'x509', use: 'x509-svid', ...ecJwk(), x5c: [derBundle(ca).toString('base64')] },
        { kid: 'rsa', use: 'jwt-svid', ...rsaJwk() },
        { kid: 'future', kty: 'PQC', pub: 'AAAA' },
        { kid: 'k1', ...ecJwk('secp256k1') },
      ]),
      { onIgnoredKey: (trustDomain, index, why) => ignored.push(`${trustDomain.name} ${index}: ${why}`) },
    );
    assert.deepEqual([...(set.getJwtBundle(td)?.authorities.keys() ?? [])], ['ec', 'rsa']);
    assert.equal(set.getX509Bundle(td)?.authorities.length, 0, 'an x509-svid key never becomes an authority');
    assert.equal(ignored.length, 4, ignored.join('\n'));
    assert.match(ignored[0] ?? '', /^example\.org 1: key type "OKP" cannot verify a JWT-SVID$/);
    assert.match(ignored[1] ?? '', /^example\.org 2: "use" is "x509-svid", not "jwt-svid"$/);
    assert.match(ignored[2] ?? '', /^example\.org 4: key type "PQC" cannot verify a JWT-SVID$/);
    assert.match(ignored[3] ?? '', /^example\.org 5: curve "secp256k1" cannot verify a JWT-SVID/);
  });

  const malformed: [string, object[], string][] = [
    [
      'an EC key with broken coordinates',
      [{ kid: 'k', kty: 'EC', crv: 'P-256', x: 'AA', y: 'AA' }],
      'ERR_BUNDLE_JWT_KEY',
    ],
    ['a usable key without kid', [ecJwk()], 'ERR_BUNDLE_KID_MISSING'],
    [
      'two keys with one kid',
      [
        { kid: 'k', ...ecJwk() },
        { kid: 'k', ...ecJwk() },
      ],
      'ERR_BUNDLE_KID_DUPLICATE',
    ],
  ];
  for (const [what, keys, cause] of malformed) {
    it(`still refuses the whole response for ${what} (${cause})`, () => {
      const err = throwsWorkload(
        () => parseJwtBundlesResponse(jwtBundlesResponse(tdId, keys)),
        WorkloadErrorCode.ResponseRefused,
      );
      assert.ok(isSpiffeError(err.cause), String(err.cause));
      assert.equal(err.cause.code, cause);
      assert.match(err.message, /^JWTBundlesResponse: the JWT bundle of "example\.org" is malformed: /);
    });
  }
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

  it('stops handing out the SVID when the agent withdraws it (entry removed), and recovers when it returns', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'withdrawn')}`);
    const source = await X509Source.create({ address: t.address, initialBackoffMs: 20, maxBackoffMs: 200 });
    const errors: WorkloadApiError[] = [];
    source.on('error', (err) => errors.push(err));
    try {
      const id = `spiffe://${TRUST_DOMAIN}/withdrawn`;
      assert.equal(source.svid().id.toString(), id);
      const withdrawn = waitFor(on<WorkloadError>(source, 'withdrawn'), () => true, 'the withdrawal');
      t.writeEntries(`entries:\n${entryFor(uid + 1, 'someone-else')}`);
      const event = workloadError(await withdrawn, WorkloadErrorCode.SvidWithdrawn);
      assert.match(
        event.message,
        new RegExp(`^the Workload API withdrew ${id} at \\d{4}-.*\\(PERMISSION_DENIED: `),
      );
      assert.equal(event.spiffeId, id);
      assert.equal(source.withdrawn, event);
      const thrown = throwsWorkload(() => source.svid(), WorkloadErrorCode.SvidWithdrawn);
      assert.equal(thrown.message, event.message);
      await until(
        () => errors.some((e) => e.code === grpc.status.PERMISSION_DENIED),
        'the PERMISSION_DENIED error',
      );

      const back = waitFor(updates(source), () => true, 'SVIDs issued again');
      t.writeEntries(`entries:\n${entryFor(uid, 'withdrawn')}`);
      await back;
      assert.equal(source.withdrawn, undefined);
      assert.equal(source.svid().id.toString(), id);
    } finally {
      source.close();
      await t.close();
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
    const server = await startStandIn(socketPath, {
      FetchX509SVID: (call) => {
        calls++;
        endStream(call, grpc.status.INVALID_ARGUMENT);
      },
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
      await server.stop();
    }
  });

  it('stops following for good when an open stream ends with INVALID_ARGUMENT', async () => {
    const socketPath = join(dir, 'invalid-later.sock');
    const message = await svidResponse(ca, 'standin');
    let calls = 0;
    const server = await startStandIn(socketPath, {
      FetchX509SVID: (call) => {
        calls++;
        endStream(call, grpc.status.INVALID_ARGUMENT, calls === 1 ? message : undefined);
      },
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
      await server.stop();
    }
  });

  it('retries a stream that ends with UNAVAILABLE', async () => {
    const socketPath = join(dir, 'unavailable.sock');
    const message = await svidResponse(ca, 'flaky');
    let calls = 0;
    const server = await startStandIn(socketPath, {
      FetchX509SVID: (call) => {
        calls++;
        endStream(call, grpc.status.UNAVAILABLE, message);
      },
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
      await server.stop();
    }
  });
});

describe('X509Source: what the agent sends is checked, and withdrawals are obeyed (stand-in server)', () => {
  let dir: string;
  let ca: LocalCa;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-wl-checks-'));
    ca = await LocalCa.create({ trustDomain: td });
  });
  after(async () => {
    ca?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('refuses a bad SVID pushed on the open stream: keeps the last good one and the stream, applies the next good one', async () => {
    const other = await LocalCa.create({ trustDomain: td });
    let stream: grpc.ServerWritableStream<unknown, X509SvidResponse> | undefined;
    let calls = 0;
    const standIn = await startStandIn(join(dir, 'refuse.sock'), {
      FetchX509SVID: (call) => {
        calls++;
        stream = call;
        void svidResponse(ca, 'good-1').then((m) => call.write(m));
      },
    });
    const source = await X509Source.create({ address: standIn.address, initialBackoffMs: 10 });
    try {
      assert.equal(source.svid().id.toString(), `spiffe://${TRUST_DOMAIN}/good-1`);
      const refused = waitFor(on<WorkloadError>(source, 'refused'), () => true, 'the refusal');
      stream?.write(await svidResponse(other, 'forged', { bundle: derBundle(ca) }));
      const err = workloadError(await refused, WorkloadErrorCode.SvidRefused);
      assert.match(err.message, /spiffe:\/\/example\.org\/forged refused: ERR_X509_UNTRUSTED/);
      assert.equal(source.svid().id.toString(), `spiffe://${TRUST_DOMAIN}/good-1`, 'the last good SVID');

      const next = waitFor(updates(source), () => true, 'the next good SVID');
      stream?.write(await svidResponse(ca, 'good-2'));
      await next;
      assert.equal(source.svid().id.toString(), `spiffe://${TRUST_DOMAIN}/good-2`);
      assert.equal(source.connects, 1, 'the refusal did not cost the stream');
      assert.equal(calls, 1);
    } finally {
      source.close();
      other.close();
      await standIn.stop();
    }
  });

  it('create() that only gets refused responses fails after startTimeoutMs, naming the refusal', async () => {
    const other = await LocalCa.create({ trustDomain: td });
    const forged = await svidResponse(other, 'forged', { bundle: derBundle(ca) });
    const standIn = await startStandIn(join(dir, 'only-refused.sock'), {
      FetchX509SVID: (call) => call.write(forged),
    });
    try {
      // Closed should it ever resolve, so a failure here cannot leave the stream holding the process open.
      const created = X509Source.create({ address: standIn.address, startTimeoutMs: 500 }).then((source) => {
        source.close();
        return source;
      });
      await assert.rejects(created, (err: unknown) => {
        isCode(grpc.status.DEADLINE_EXCEEDED)(err);
        assert.match(
          (err as Error).message,
          /last error: ERR_WORKLOAD_SVID_REFUSED: X\.509-SVID spiffe:\/\/example\.org\/forged refused: ERR_X509_UNTRUSTED/,
        );
        workloadError((err as Error).cause, WorkloadErrorCode.SvidRefused);
        return true;
      });
    } finally {
      other.close();
      await standIn.stop();
    }
  });

  it('withdraws the SVIDs on PermissionDenied: svid() throws ERR_WORKLOAD_SVID_WITHDRAWN until SVIDs come again', async () => {
    const first = await svidResponse(ca, 'first');
    let issue = false;
    let calls = 0;
    const standIn = await startStandIn(join(dir, 'withdraw.sock'), {
      FetchX509SVID: (call) => {
        calls++;
        if (calls === 1) endStream(call, grpc.status.PERMISSION_DENIED, first);
        else if (!issue) endStream(call, grpc.status.PERMISSION_DENIED);
        else void svidResponse(ca, 'again').then((m) => call.write(m));
      },
    });
    const source = await X509Source.create({
      address: standIn.address,
      initialBackoffMs: 10,
      maxBackoffMs: 40,
    });
    const order: string[] = [];
    source.on('withdrawn', () => order.push('withdrawn'));
    source.on('error', (e) => order.push(`error ${e.codeName}`));
    try {
      await until(() => source.withdrawn !== undefined, 'the withdrawal');
      const err = throwsWorkload(() => source.svid(), WorkloadErrorCode.SvidWithdrawn);
      assert.match(
        err.message,
        /^the Workload API withdrew spiffe:\/\/example\.org\/first at .*PERMISSION_DENIED/,
      );
      assert.match(err.message, /no X\.509-SVID to present until the agent issues one again$/);
      throwsWorkload(() => source.svid('any-hint'), WorkloadErrorCode.SvidWithdrawn);
      assert.deepEqual(order.slice(0, 2), ['withdrawn', 'error PERMISSION_DENIED']);
      assert.equal(
        source.context.svids[0]?.id.toString(),
        `spiffe://${TRUST_DOMAIN}/first`,
        'kept for display',
      );
      await until(() => calls >= 3, 'retries, denied again');
      assert.equal(order.filter((o) => o === 'withdrawn').length, 1, 'withdrawn once, not at every retry');

      issue = true;
      await waitFor(updates(source), () => true, 'SVIDs issued again', 10_000);
      assert.equal(source.withdrawn, undefined);
      assert.equal(source.svid().id.toString(), `spiffe://${TRUST_DOMAIN}/again`);
    } finally {
      source.close();
      await standIn.stop();
    }
  });
});

describe('JwtSource: unusable bundle keys (stand-in server)', () => {
  let dir: string;
  const tdId = `spiffe://${TRUST_DOMAIN}`;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-wl-jwks-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('applies a JWT bundle holding a key of unknown kty without it, reports it, and keeps the stream', async () => {
    let stream: grpc.ServerWritableStream<unknown, JwtBundlesResponse> | undefined;
    let calls = 0;
    const good = { kid: 'good', ...ecJwk() };
    const standIn = await startStandIn(join(dir, 'jwks.sock'), {
      FetchJWTBundles: (call) => {
        calls++;
        stream = call;
        call.write(jwtBundlesResponse(tdId, [good, { kid: 'future', kty: 'ML-DSA', pub: 'AAAA' }]));
      },
    });
    const source = await JwtSource.create({ address: standIn.address, startTimeoutMs: 10_000 });
    try {
      assert.deepEqual([...(source.getJwtBundle(td)?.authorities.keys() ?? [])], ['good']);
      assert.equal(source.warnings.length, 1);
      const first = workloadError(source.warnings[0], WorkloadErrorCode.KeyIgnored);
      assert.equal(
        first.message,
        'JWT bundle of "example.org": keys[1] ignored: key type "ML-DSA" cannot verify a JWT-SVID',
      );

      const warned = waitFor(on<WorkloadError>(source, 'warning'), () => true, 'the warning');
      const updated = waitFor(on<unknown>(source, 'update'), () => true, 'the update');
      stream?.write(
        jwtBundlesResponse(tdId, [
          good,
          { kid: 'x509', use: 'x509-svid', ...ecJwk() },
          { kid: 'next', ...ecJwk() },
        ]),
      );
      const warning = workloadError(await warned, WorkloadErrorCode.KeyIgnored);
      assert.match(warning.message, /keys\[1\] ignored: "use" is "x509-svid", not "jwt-svid"$/);
      await updated;
      assert.deepEqual([...(source.getJwtBundle(td)?.authorities.keys() ?? [])], ['good', 'next']);

      const refused = waitFor(on<WorkloadError>(source, 'refused'), () => true, 'the refusal');
      stream?.write(jwtBundlesResponse(tdId, [{ kid: 'broken', kty: 'EC', crv: 'P-256', x: 'AA', y: 'AA' }]));
      workloadError(await refused, WorkloadErrorCode.ResponseRefused);
      assert.deepEqual(
        [...(source.getJwtBundle(td)?.authorities.keys() ?? [])],
        ['good', 'next'],
        'last good kept',
      );
      assert.equal(source.connects, 1, 'no reconnect loop');
      assert.equal(calls, 1);
    } finally {
      source.close();
      await standIn.stop();
    }
  });
});

describe('WorkloadClient.fetchJwtSvids checks what it gets (stand-in server)', () => {
  let dir: string;
  let ca: LocalCa;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-wl-jwt-'));
    ca = await LocalCa.create({ trustDomain: td });
  });
  after(async () => {
    ca?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('refuses a JWT-SVID for another SPIFFE ID or audience, an expired one, and garbage', async () => {
    const id = SpiffeId.parse(`spiffe://${TRUST_DOMAIN}/jwt`);
    const mint = async (options: { audience?: string[]; now?: Date; ttlSeconds?: number } = {}) =>
      (
        await mintJwtSvid({
          id,
          audience: options.audience ?? ['a'],
          signer: ca.jwtSigner().signer,
          ...(options.now ? { now: options.now } : {}),
          ...(options.ttlSeconds ? { ttlSeconds: options.ttlSeconds } : {}),
        })
      ).token;
    let reply = { spiffe_id: id.toString(), svid: await mint(), hint: '' };
    const standIn = await startStandIn(join(dir, 'jwt.sock'), {
      FetchJWTSVID: (_call, callback) => callback(null, { svids: [reply] }),
    });
    const client = new WorkloadClient({ address: standIn.address });
    try {
      const [ok] = await client.fetchJwtSvids('a');
      assert.equal(ok?.id.toString(), id.toString());

      const cases: [string, typeof reply, RegExp][] = [
        [
          'another SPIFFE ID',
          { ...reply, spiffe_id: `spiffe://${TRUST_DOMAIN}/claimed` },
          /^JWT-SVID spiffe:\/\/example\.org\/claimed refused: spiffe_id .* does not match the token's sub spiffe:\/\/example\.org\/jwt$/,
        ],
        [
          'another audience',
          { ...reply, svid: await mint({ audience: ['b'] }) },
          /refused: its aud lacks "a"$/,
        ],
        [
          'an expired token',
          { ...reply, svid: await mint({ now: new Date(Date.now() - HOUR), ttlSeconds: 60 }) },
          /refused: it expired at \d{4}-/,
        ],
        ['garbage', { ...reply, svid: 'not.a.jwt' }, /refused: ERR_JWT_MALFORMED: /],
      ];
      for (const [what, bad, message] of cases) {
        reply = bad;
        await assert.rejects(client.fetchJwtSvids('a'), (err: unknown) => {
          const e = workloadError(err, WorkloadErrorCode.JwtSvidRefused);
          assert.match(e.message, message, what);
          return true;
        });
      }
    } finally {
      client.close();
      await standIn.stop();
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
