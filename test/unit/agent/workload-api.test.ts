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
import {
  chmod,
  chown,
  lchown,
  lstat,
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  rename,
  rm,
  stat,
  symlink,
  unlink,
  writeFile,
} from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, afterEach, before, beforeEach, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { LocalCa } from '../../../src/agent/ca.ts';
import { AgentErrorCode } from '../../../src/agent/errors.ts';
import { generateKeyPair } from '../../../src/agent/keys.ts';
import type { PeerCredentials } from '../../../src/agent/peercred.ts';
import { prepareSocketPath } from '../../../src/agent/socket.ts';
import {
  type ServedX509Svid,
  type WorkloadApiBackend,
  WorkloadApiServer,
  type WorkloadState,
} from '../../../src/agent/workload-api.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import type { JwtSvid } from '../../../src/spiffe/jwtsvid.ts';
import { WorkloadClient } from '../../../src/workload/client.ts';
import {
  type JwtBundlesResponse,
  WorkloadApiClient,
  type X509BundlesResponse,
  type X509SvidResponse,
} from '../../../src/workload/proto.ts';

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

/** Asserts an AgentError with this code whose message matches every pattern. */
function refusedWith(code: string, ...patterns: RegExp[]): (err: Error) => boolean {
  return (err) => {
    assert.equal((err as { code?: unknown }).code, code, String(err));
    for (const pattern of patterns) assert.match(err.message, pattern);
    return true;
  };
}

const isRoot = process.geteuid?.() === 0;
const NEEDS_ROOT = isRoot ? false : 'needs root to give a directory to another uid';
const OTHER_UID = 4001;

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

    /** A fresh directory of ours (0755) under the suite's directory. */
    const fresh = async (name: string, mode = 0o755): Promise<string> => {
      const path = join(dir, name);
      await mkdir(path);
      await chmod(path, mode);
      return path;
    };

    it('creates the missing directories 0755 and owned by us; the socket is 0777 by default; close() removes it', async () => {
      const path = join(dir, 'new', 'deeper', 'agent.sock');
      extra = newServer(path);
      await extra.listen();
      for (const d of [join(dir, 'new'), join(dir, 'new', 'deeper')]) {
        const info = await stat(d);
        assert.ok(info.isDirectory());
        assert.equal(info.mode & 0o7777, 0o755, d);
        assert.equal(info.uid, process.geteuid?.());
      }
      const info = await lstat(path);
      assert.ok(info.isSocket());
      assert.equal(info.mode & 0o777, 0o777);
      await extra.close();
      await assert.rejects(lstat(path), { code: 'ENOENT' });
    });

    it('honours socketMode, and gives a directory it creates only the matching search bits', async () => {
      const path = join(dir, 'mode', 'agent.sock');
      extra = newServer(path, { socketMode: 0o660 });
      await extra.listen();
      assert.equal((await lstat(path)).mode & 0o777, 0o660);
      assert.equal((await stat(join(dir, 'mode'))).mode & 0o7777, 0o750);
    });

    it('refuses a socket directory writable by group or others, sticky or not, naming its owner and mode', async () => {
      for (const mode of [0o777, 0o775, 0o757, 0o1777]) {
        const open = await fresh(`writable-${mode.toString(8)}`, mode);
        const octal = `0${mode.toString(8)}`;
        await assert.rejects(
          prepareSocketPath(join(open, 'agent.sock')),
          refusedWith(
            AgentErrorCode.SocketDirectory,
            new RegExp(`${open} \\(owner (root|uid \\d+), mode ${octal}\\) is writable by group or others`),
            /fake agent/,
          ),
        );
      }
    });

    it('accepts a sticky world-writable directory above the socket directory (like /tmp above a mkdtemp one)', async () => {
      const sticky = await fresh('sticky-parent', 0o1777);
      const path = join(sticky, 'ours', 'agent.sock');
      assert.equal((await prepareSocketPath(path)).state, 'free');
      assert.equal((await stat(join(sticky, 'ours'))).mode & 0o7777, 0o755);
    });

    it('refuses a directory above the socket directory that others may write without the sticky bit, creating nothing in it', async () => {
      const open = await fresh('open-parent', 0o777);
      await assert.rejects(
        prepareSocketPath(join(open, 'sub', 'agent.sock')),
        refusedWith(
          AgentErrorCode.SocketDirectory,
          new RegExp(`${open} .*writable by group or others and not sticky`),
        ),
      );
      await assert.rejects(lstat(join(open, 'sub')), { code: 'ENOENT' });
    });

    it('follows a symlink to the directory it points at, refusing an unsafe target and accepting a safe one', async () => {
      const unsafe = await fresh('link-target-unsafe', 0o777);
      const safe = await fresh('link-target-safe');
      const links = await fresh('links');
      await symlink(unsafe, join(links, 'to-unsafe'));
      await symlink('../link-target-safe', join(links, 'to-safe'));
      await assert.rejects(
        prepareSocketPath(join(links, 'to-unsafe', 'agent.sock')),
        refusedWith(AgentErrorCode.SocketDirectory, new RegExp(`${unsafe} .*writable by group or others`)),
      );
      await assert.rejects(
        prepareSocketPath(join(links, 'to-unsafe', 'below', 'agent.sock')),
        refusedWith(AgentErrorCode.SocketDirectory, new RegExp(`${unsafe} .*not sticky`)),
      );
      assert.deepEqual(await prepareSocketPath(join(links, 'to-safe', 'agent.sock')), {
        state: 'free',
        realPath: join(safe, 'agent.sock'),
      });
      extra = newServer(join(links, 'to-safe', 'agent.sock'));
      await extra.listen();
      assert.ok((await lstat(join(safe, 'agent.sock'))).isSocket());
    });

    it('walks `..` after a symlink as the kernel does (from the link target), not lexically', async () => {
      const unsafe = await fresh('dotdot-unsafe', 0o777);
      await mkdir(join(unsafe, 'inner'), { mode: 0o755 });
      const links = await fresh('dotdot-links');
      await symlink(join(unsafe, 'inner'), join(links, 'l'));
      // Lexically this is links/agent.sock, a safe place; the kernel binds it in `unsafe`.
      await assert.rejects(
        prepareSocketPath(`${links}/l/../agent.sock`),
        refusedWith(AgentErrorCode.SocketDirectory, new RegExp(`${unsafe} .*is writable by group or others`)),
      );
    });

    it('refuses a socket directory owned by another uid', { skip: NEEDS_ROOT }, async () => {
      const foreign = await fresh('foreign');
      await chown(foreign, OTHER_UID, OTHER_UID);
      extra = newServer(join(foreign, 'agent.sock'));
      await assert.rejects(
        extra.listen(),
        refusedWith(
          AgentErrorCode.SocketDirectory,
          new RegExp(`${foreign} \\(owner uid ${OTHER_UID}, mode 0755\\) is owned by uid ${OTHER_UID}`),
          /chown/,
        ),
      );
      await assert.rejects(lstat(join(foreign, 'agent.sock')), { code: 'ENOENT' });
    });

    it('refuses a directory above the socket directory owned by another uid', {
      skip: NEEDS_ROOT,
    }, async () => {
      const foreign = await fresh('foreign-parent');
      await mkdir(join(foreign, 'ours'));
      await chown(foreign, OTHER_UID, OTHER_UID);
      await assert.rejects(
        prepareSocketPath(join(foreign, 'ours', 'agent.sock')),
        refusedWith(AgentErrorCode.SocketDirectory, new RegExp(`${foreign} .*is owned by uid ${OTHER_UID}`)),
      );
    });

    it('refuses a symlink owned by another uid in a sticky directory, even to a safe directory', {
      skip: NEEDS_ROOT,
    }, async () => {
      const sticky = await fresh('sticky-links', 0o1777);
      const safe = await fresh('safe-target');
      const link = join(sticky, 'link');
      await symlink(safe, link);
      await lchown(link, OTHER_UID, OTHER_UID);
      await assert.rejects(
        prepareSocketPath(join(link, 'agent.sock')),
        refusedWith(
          AgentErrorCode.SocketDirectory,
          new RegExp(`${link} .*is a symlink owned by uid ${OTHER_UID}`),
        ),
      );
    });

    it('refuses an existing regular file at the path and leaves it intact', async () => {
      const path = join(await fresh('file'), 'agent.sock');
      await writeFile(path, 'precious');
      extra = newServer(path);
      await assert.rejects(extra.listen(), refusedWith(AgentErrorCode.SocketInUse, /not a socket/));
      await extra.close();
      assert.equal(await readFile(path, 'utf8'), 'precious');
    });

    it('refuses a stale socket of another uid and leaves it', { skip: NEEDS_ROOT }, async () => {
      const path = join(await fresh('foreign-stale'), 'agent.sock');
      await makeStaleSocket(path);
      await lchown(path, OTHER_UID, OTHER_UID);
      extra = newServer(path);
      await assert.rejects(
        extra.listen(),
        refusedWith(AgentErrorCode.SocketInUse, new RegExp(`a socket of uid ${OTHER_UID} is there`)),
      );
      await extra.close();
      assert.equal((await lstat(path)).uid, OTHER_UID);
    });

    it('refuses a path another server listens on, and closing the refused server leaves that socket alone', async () => {
      extra = newServer(socketPath);
      await assert.rejects(
        extra.listen(),
        refusedWith(AgentErrorCode.SocketInUse, /another server is listening/),
      );
      await extra.close();
      assert.ok((await lstat(socketPath)).isSocket());
      const r = await first(socketPath, 'FetchX509SVID');
      assert.equal(r.code, grpc.status.OK, r.details);
    });

    it('replaces a stale socket of its own that nobody listens on', async () => {
      const path = join(await fresh('stale'), 'agent.sock');
      await makeStaleSocket(path);
      const before = await lstat(path);
      assert.ok(before.isSocket(), 'the killed listener left its socket behind');
      assert.equal((await prepareSocketPath(path)).state, 'stale');
      extra = newServer(path);
      await extra.listen();
      assert.notEqual((await lstat(path)).ino, before.ino);
      const r = await first(path, 'FetchX509SVID');
      assert.equal(r.code, grpc.status.OK, r.details);
    });

    it('leaves in place a file that replaced its socket after it bound', async () => {
      const d = await fresh('swapped-file');
      const path = join(d, 'agent.sock');
      extra = newServer(path);
      await extra.listen();
      await rename(path, join(d, 'moved.sock'));
      await writeFile(path, 'not the agent');
      await extra.close();
      assert.equal(await readFile(path, 'utf8'), 'not the agent');
    });

    it('leaves in place another socket that replaced its socket after it bound', async () => {
      const d = await fresh('swapped-socket');
      const path = join(d, 'agent.sock');
      extra = newServer(path);
      await extra.listen();
      await unlink(path);
      await makeStaleSocket(path);
      const replacement = await lstat(path);
      await extra.close();
      const after = await lstat(path);
      assert.ok(after.isSocket());
      assert.equal(after.ino, replacement.ino);
    });

    it('leaves no temporary socket behind in the directory', async () => {
      const d = await fresh('tidy');
      extra = newServer(join(d, 'agent.sock'));
      await extra.listen();
      assert.deepEqual(await readdir(d), ['agent.sock']);
      await extra.close();
      assert.deepEqual(await readdir(d), []);
    });
  });
});
