/**
 * WorkloadApiServer with a STAND-IN backend: a tiny WorkloadApiBackend whose attestation, state and change
 * announcements the tests drive directly, and a fake procfs (`procRoot`) for the PID-reuse guard. The real
 * agent behind the same server is covered end to end by test/integration/agent.test.ts.
 *
 * The callers are this very process (SO_PEERCRED gives our own pid), so the fake procfs holds
 * `<root>/<process.pid>/stat`, and the tests rewrite or delete it to play a caller that exited or whose pid was
 * reused during attestation.
 */
// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { webcrypto } from 'node:crypto';
import { once } from 'node:events';
import { chmod, lstat, mkdir, mkdtemp, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, afterEach, before, beforeEach, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { LocalCa } from '../../../src/agent/ca.ts';
import { AgentErrorCode } from '../../../src/agent/errors.ts';
import { generateKeyPair } from '../../../src/agent/keys.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import type { JwtSvid } from '../../../src/spiffe/jwtsvid.ts';
import { WorkloadClient } from '../../../src/workload/client.ts';
import type { PeerCredentials } from '../../../src/workload/peercred.ts';
import {
  type JwtBundlesResponse,
  WorkloadApiClient,
  type X509BundlesResponse,
  type X509SvidResponse,
} from '../../../src/workload/proto.ts';
import {
  prepareSocketPath,
  type ServedX509Svid,
  type WorkloadApiBackend,
  WorkloadApiServer,
  type WorkloadState,
} from '../../../src/workload/server.ts';

const td = TrustDomain.parse('example.org');
const federatedTd = TrustDomain.parse('other.org');
const START_TIME = 4242n;

/** A /proc/<pid>/stat line: pid, (comm), state, 18 filler fields, starttime (field 22), then a few more. */
function statLine(pid: number, startTime: bigint): string {
  const filler = Array.from({ length: 18 }, (_, i) => String(i + 1));
  return `${pid} (node) S ${filler.join(' ')} ${startTime} 123456 789 18446744073709551615 0 0\n`;
}

async function mintSvid(ca: LocalCa, path: string): Promise<ServedX509Svid> {
  const keys = await generateKeyPair('ec-p256');
  const id = SpiffeId.fromPath(ca.trustDomain, `/${path}`);
  const signed = await ca.signX509Svid({ id, publicKey: keys.publicKey, ttlSeconds: 3600 });
  return {
    id,
    chainDer: Buffer.concat(signed.certificates.map((c) => c.raw)),
    keyDer: Buffer.from(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)),
    notAfter: signed.notAfter,
  };
}

/** The stand-in agent: every caller gets `current`; tests hook attestation and announce changes. */
class StandInBackend implements WorkloadApiBackend {
  current: WorkloadState;
  onAttest: ((caller: PeerCredentials) => Promise<void>) | undefined;
  stateCalls = 0;
  readonly #listeners = new Set<() => void>();

  constructor(state: WorkloadState) {
    this.current = state;
  }

  async attest(caller: PeerCredentials): Promise<ReadonlySet<string>> {
    await this.onAttest?.(caller);
    return new Set(['standin:caller']);
  }

  async state(): Promise<WorkloadState> {
    this.stateCalls++;
    return this.current;
  }

  subscribe(listener: () => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  announce(): void {
    for (const listener of [...this.#listeners]) listener();
  }

  async mintJwtSvids(): Promise<JwtSvid[]> {
    return [];
  }

  async validateJwtSvid(): Promise<JwtSvid> {
    throw new Error('the stand-in validates nothing');
  }
}

type RawClient = grpc.Client & Record<string, (...args: unknown[]) => unknown>;
type StreamMethod = 'FetchX509SVID' | 'FetchX509Bundles' | 'FetchJWTBundles';

function rawClient(socketPath: string): RawClient {
  // A private subchannel pool: every client is a new connection, attested (and start-time read) afresh.
  return new WorkloadApiClient(`unix://${socketPath}`, grpc.credentials.createInsecure(), {
    'grpc.use_local_subchannel_pool': 1,
  }) as unknown as RawClient;
}

const securityHeader = (): grpc.Metadata => WorkloadClient.metadata();

interface Outcome<T> {
  readonly code: grpc.status;
  readonly details: string;
  readonly message?: T;
}

/** The first message of a stream (decoded by proto-loader), or the status that ended it. */
function first<T>(socketPath: string, method: StreamMethod): Promise<Outcome<T>> {
  const client = rawClient(socketPath);
  const call = (client[method] as (req: unknown, md: grpc.Metadata) => grpc.ClientReadableStream<T>).call(
    client,
    {},
    securityHeader(),
  );
  return new Promise((resolve) => {
    let done = false;
    const finish = (outcome: Outcome<T>): void => {
      if (done) return;
      done = true;
      call.cancel();
      client.close();
      resolve(outcome);
    };
    call.on('data', (message: T) => finish({ code: grpc.status.OK, details: '', message }));
    call.on('error', (err: grpc.ServiceError) => finish({ code: err.code, details: err.details }));
    call.on('end', () => finish({ code: grpc.status.UNKNOWN, details: 'stream ended without a message' }));
  });
}

/** Polls `check` until it holds ("eventually"), with a generous timeout. */
async function until(check: () => boolean, what: string, timeoutMs = 4000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Leaves the socket file of a killed listener behind: a socket nobody listens on. */
async function makeStaleSocket(socketPath: string): Promise<void> {
  const script = `require('node:net').createServer().listen(${JSON.stringify(socketPath)}, () => process.stdout.write('ready'))`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  await once(child.stdout, 'data');
  const exited = once(child, 'exit');
  child.kill('SIGKILL');
  await exited;
}

const isConfigError = (err: unknown): boolean => (err as { code?: unknown }).code === AgentErrorCode.Config;

describe('WorkloadApiServer with a stand-in backend', () => {
  let dir: string;
  let procRoot: string;
  let statPath: string;
  let ca: LocalCa;
  let federatedCa: LocalCa;
  let baseState: WorkloadState;
  let backend: StandInBackend;
  let server: WorkloadApiServer;
  let socketPath: string;

  const newServer = (path: string, extra: { socketMode?: number } = {}): WorkloadApiServer =>
    new WorkloadApiServer({ socketPath: path, backend, logger: silentLogger(), procRoot, ...extra });

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-wl-server-'));
    procRoot = join(dir, 'proc');
    statPath = join(procRoot, String(process.pid), 'stat');
    await mkdir(join(procRoot, String(process.pid)), { recursive: true });
    ca = await LocalCa.create({ trustDomain: td });
    federatedCa = await LocalCa.create({ trustDomain: federatedTd });
    baseState = {
      svids: [await mintSvid(ca, 'workload')],
      bundle: ca.bundle,
      federatedBundles: [federatedCa.bundle],
    };
    backend = new StandInBackend(baseState);
    socketPath = join(dir, 'main', 'agent.sock');
    server = newServer(socketPath);
    await server.listen();
  });

  beforeEach(async () => {
    await writeFile(statPath, statLine(process.pid, START_TIME));
    backend.onAttest = undefined;
    backend.current = baseState;
  });

  after(async () => {
    await server?.close();
    ca?.close();
    federatedCa?.close();
    await rm(dir, { recursive: true, force: true });
  });

  describe('PID-reuse guard (fake procfs)', () => {
    it('answers when the start time is unchanged after attestation', async () => {
      const r = await first<X509SvidResponse>(socketPath, 'FetchX509SVID');
      assert.equal(r.code, grpc.status.OK, r.details);
      assert.equal(r.message?.svids[0]?.spiffe_id, 'spiffe://example.org/workload');
    });

    it('refuses with PermissionDenied when the start time changed during attestation (pid reused)', async () => {
      backend.onAttest = async (caller) => {
        assert.equal(caller.pid, process.pid);
        await writeFile(statPath, statLine(process.pid, START_TIME + 1n));
      };
      const r = await first(socketPath, 'FetchX509SVID');
      assert.equal(r.code, grpc.status.PERMISSION_DENIED);
      assert.match(r.details, /exited or its PID was reused/);
    });

    it('refuses with PermissionDenied when the process is gone after attestation', async () => {
      backend.onAttest = async () => {
        await unlink(statPath);
      };
      const r = await first(socketPath, 'FetchX509Bundles');
      assert.equal(r.code, grpc.status.PERMISSION_DENIED);
      assert.match(r.details, /exited or its PID was reused/);
    });
  });

  it('refuses with PermissionDenied when attestation throws', async () => {
    backend.onAttest = async () => {
      throw new Error('no such workload');
    };
    const r = await first(socketPath, 'FetchX509SVID');
    assert.equal(r.code, grpc.status.PERMISSION_DENIED);
    assert.match(r.details, /workload attestation failed: no such workload/);
  });

  it('refuses with PermissionDenied "no identity issued" on every stream when the state has no SVID', async () => {
    backend.current = { ...baseState, svids: [] };
    for (const method of ['FetchX509SVID', 'FetchX509Bundles', 'FetchJWTBundles'] as const) {
      const r = await first(socketPath, method);
      assert.equal(r.code, grpc.status.PERMISSION_DENIED, `${method}: ${r.details}`);
      assert.match(r.details, /no identity issued/, method);
    }
  });

  it('pushes an announced change on an open FetchX509SVID stream, and nothing for an identical state', async () => {
    const client = rawClient(socketPath);
    const call = (
      client.FetchX509SVID as (req: unknown, md: grpc.Metadata) => grpc.ClientReadableStream<X509SvidResponse>
    ).call(client, {}, securityHeader());
    const received: X509SvidResponse[] = [];
    call.on('data', (m: X509SvidResponse) => received.push(m));
    call.on('error', () => {});
    const sent = (): number => server.stats.messages.FetchX509SVID ?? 0;
    const sentBefore = sent();
    try {
      await until(() => received.length === 1, 'the first message');
      assert.equal(sent() - sentBefore, 1);

      // A new state object holding the very same SVID and bundle objects: nothing to push.
      const calls = backend.stateCalls;
      backend.current = { ...baseState };
      backend.announce();
      await until(() => backend.stateCalls > calls, 'the server to read the announced state');
      await new Promise((resolve) => setImmediate(resolve));
      assert.equal(sent() - sentBefore, 1, 'an identical state sends nothing');

      const rotated = await mintSvid(ca, 'workload');
      backend.current = { ...baseState, svids: [rotated] };
      backend.announce();
      await until(() => received.length === 2, 'the pushed change');
      assert.equal(sent() - sentBefore, 2);
      assert.deepEqual(received[1]?.svids[0]?.x509_svid, rotated.chainDer);
      assert.notDeepEqual(received[0]?.svids[0]?.x509_svid, received[1]?.svids[0]?.x509_svid);
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(received.length, 2);
    } finally {
      call.cancel();
      client.close();
    }
  });

  describe('bundles on the wire', () => {
    const ownKey = 'spiffe://example.org';
    const federatedKey = 'spiffe://other.org';

    it('keys every bundle map by spiffe://<trust-domain>', async () => {
      const svid = await first<X509SvidResponse>(socketPath, 'FetchX509SVID');
      assert.equal(svid.code, grpc.status.OK, svid.details);
      assert.deepEqual(Object.keys(svid.message?.federated_bundles ?? {}), [federatedKey]);
      assert.deepEqual(svid.message?.svids[0]?.bundle, ca.bundle.x509Authorities[0]?.raw);

      const x509 = await first<X509BundlesResponse>(socketPath, 'FetchX509Bundles');
      assert.equal(x509.code, grpc.status.OK, x509.details);
      assert.deepEqual(Object.keys(x509.message?.bundles ?? {}).sort(), [ownKey, federatedKey]);
      assert.deepEqual(x509.message?.bundles[federatedKey], federatedCa.bundle.x509Authorities[0]?.raw);

      const jwt = await first<JwtBundlesResponse>(socketPath, 'FetchJWTBundles');
      assert.equal(jwt.code, grpc.status.OK, jwt.details);
      assert.deepEqual(Object.keys(jwt.message?.bundles ?? {}).sort(), [ownKey, federatedKey]);
    });

    it('sends each JWT bundle as a JWK Set whose keys all have a kid and no use or x5c', async () => {
      const jwt = await first<JwtBundlesResponse>(socketPath, 'FetchJWTBundles');
      assert.equal(jwt.code, grpc.status.OK, jwt.details);
      for (const [key, authority] of [
        [ownKey, ca],
        [federatedKey, federatedCa],
      ] as const) {
        const raw = jwt.message?.bundles[key];
        assert.ok(raw, key);
        const set = JSON.parse(Buffer.from(raw).toString('utf8')) as { keys: Record<string, unknown>[] };
        assert.ok(Array.isArray(set.keys) && set.keys.length > 0, key);
        for (const jwk of set.keys) {
          assert.equal(typeof jwk.kid, 'string', key);
          assert.ok(!('use' in jwk), `${key}: no use`);
          assert.ok(!('x5c' in jwk), `${key}: no x5c`);
          assert.ok(!('d' in jwk), `${key}: no private part`);
        }
        assert.deepEqual(
          set.keys.map((k) => k.kid),
          [...authority.bundle.jwtAuthorities.keys()],
        );
      }
    });
  });

  describe('socket safety', () => {
    let extra: WorkloadApiServer | undefined;
    afterEach(async () => {
      await extra?.close();
      extra = undefined;
    });

    it('creates the missing directory; the socket is 0777 by default; close() removes it', async () => {
      const path = join(dir, 'new', 'deeper', 'agent.sock');
      extra = newServer(path);
      await extra.listen();
      assert.ok((await stat(join(dir, 'new', 'deeper'))).isDirectory());
      const info = await lstat(path);
      assert.ok(info.isSocket());
      assert.equal(info.mode & 0o777, 0o777);
      await extra.close();
      await assert.rejects(lstat(path), { code: 'ENOENT' });
    });

    it('honours socketMode', async () => {
      const path = join(dir, 'mode', 'agent.sock');
      extra = newServer(path, { socketMode: 0o660 });
      await extra.listen();
      assert.equal((await lstat(path)).mode & 0o777, 0o660);
    });

    it('refuses a world-writable directory without the sticky bit, and accepts it with one', async () => {
      const open = join(dir, 'world-writable');
      await mkdir(open);
      await chmod(open, 0o777);
      await assert.rejects(prepareSocketPath(join(open, 'agent.sock')), (err: Error) => {
        assert.ok(isConfigError(err), String(err));
        assert.match(err.message, /writable by every user/);
        return true;
      });
      await chmod(open, 0o1777);
      await prepareSocketPath(join(open, 'agent.sock'));
    });

    it('refuses an existing regular file at the path and leaves it intact', async () => {
      const path = join(dir, 'file', 'agent.sock');
      await mkdir(join(dir, 'file'));
      await writeFile(path, 'precious');
      extra = newServer(path);
      await assert.rejects(extra.listen(), (err: Error) => {
        assert.ok(isConfigError(err), String(err));
        assert.match(err.message, /not a socket/);
        return true;
      });
      await extra.close();
      assert.equal(await readFile(path, 'utf8'), 'precious');
    });

    it('refuses a path another server listens on, and closing the refused server leaves that socket alone', async () => {
      extra = newServer(socketPath);
      await assert.rejects(extra.listen(), (err: Error) => {
        assert.ok(isConfigError(err), String(err));
        assert.match(err.message, /another server is listening/);
        return true;
      });
      await extra.close();
      assert.ok((await lstat(socketPath)).isSocket());
      const r = await first(socketPath, 'FetchX509SVID');
      assert.equal(r.code, grpc.status.OK, r.details);
    });

    it('replaces a stale socket nobody listens on', async () => {
      const path = join(dir, 'stale', 'agent.sock');
      await mkdir(join(dir, 'stale'));
      await makeStaleSocket(path);
      assert.ok((await lstat(path)).isSocket(), 'the killed listener left its socket behind');
      extra = newServer(path);
      await extra.listen();
      const r = await first(path, 'FetchX509SVID');
      assert.equal(r.code, grpc.status.OK, r.details);
    });
  });
});
