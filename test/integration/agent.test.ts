/**
 * The bundled agent end to end: a real Workload API server on a Unix socket, the real local CA, the real unix
 * attestor reading SO_PEERCRED and /proc, and our client. Rotation tests use short lifetimes and wait for the
 * pushed messages; they assert what arrives, never how fast.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import {
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  renameSync,
  rmSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, describe, it } from 'node:test';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { bundleJson, makeDevPki } from '../../certs-dev/devpki.ts';
import { WorkloadAgent } from '../../src/agent/agent.ts';
import { AgentErrorCode } from '../../src/agent/errors.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { TrustDomain } from '../../src/spiffe/id.ts';
import { verifyX509Svid, type X509Svid } from '../../src/spiffe/x509svid.ts';
import {
  type WorkloadApiError,
  WorkloadClient,
  type X509Context,
  X509Source,
} from '../../src/workload/client.ts';
import { SECURITY_HEADER, WorkloadApiClient } from '../../src/workload/proto.ts';
import { entryFor, startTestAgent, type TestAgent, TRUST_DOMAIN, waitFor } from '../helpers/agent.ts';

const uid = process.getuid?.() ?? 0;
const execFileAsync = promisify(execFile);
const fetchScript = new URL('./fixtures/fetch-x509.ts', import.meta.url).pathname;

function updates(source: X509Source) {
  return (listener: (ctx: X509Context) => void) => {
    source.on('update', listener);
    return () => source.off('update', listener);
  };
}

const leafOf = (ctx: X509Context, i = 0): X509Certificate => ctx.svids[i]?.certificates[0] as X509Certificate;

/** A raw gRPC call, with or without the security header. */
function rawCall(
  address: string,
  method: string,
  request: unknown,
  withHeader: boolean,
): Promise<{ code: grpc.status; details: string }> {
  const client = new WorkloadApiClient(address, grpc.credentials.createInsecure()) as unknown as Record<
    string,
    (...args: unknown[]) => unknown
  > &
    grpc.Client;
  const md = new grpc.Metadata();
  if (withHeader) md.set(SECURITY_HEADER, 'true');
  return new Promise((resolve) => {
    const done = (code: grpc.status, details: string): void => {
      client.close();
      resolve({ code, details });
    };
    const fn = client[method] as (...args: unknown[]) => unknown;
    if (method === 'FetchJWTSVID' || method === 'ValidateJWTSVID') {
      fn.call(client, request, md, (err: grpc.ServiceError | null) =>
        done(err ? err.code : grpc.status.OK, err?.details ?? ''),
      );
      return;
    }
    const call = fn.call(client, request, md) as grpc.ClientReadableStream<unknown>;
    call.on('data', () => {
      call.cancel();
      done(grpc.status.OK, '');
    });
    call.on('error', (err: grpc.ServiceError) => {
      if (err.code !== grpc.status.CANCELLED) done(err.code, err.details);
    });
  });
}

describe('Workload API security header and caller identity', () => {
  let t: TestAgent;
  after(() => t?.close());

  it('answers InvalidArgument to every RPC without the workload.spiffe.io header', async () => {
    t = await startTestAgent(`entries:\n${entryFor(uid, 'me')}`);
    for (const [method, request] of [
      ['FetchX509SVID', {}],
      ['FetchX509Bundles', {}],
      ['FetchJWTBundles', {}],
      ['FetchJWTSVID', { audience: ['a'] }],
      ['ValidateJWTSVID', { audience: 'a', svid: 'x.y.z' }],
    ] as const) {
      const r = await rawCall(t.address, method, request, false);
      assert.equal(r.code, grpc.status.INVALID_ARGUMENT, `${method}: ${r.details}`);
      assert.match(r.details, /security header/);
    }
    // The same calls with the header succeed, so the header is what made the difference.
    assert.equal((await rawCall(t.address, 'FetchX509SVID', {}, true)).code, grpc.status.OK);
  });

  it('answers InvalidArgument to an empty audience or token, and Unimplemented to the WIT-SVID profile', async () => {
    assert.equal(
      (await rawCall(t.address, 'FetchJWTSVID', { audience: [] }, true)).code,
      grpc.status.INVALID_ARGUMENT,
    );
    assert.equal(
      (await rawCall(t.address, 'ValidateJWTSVID', { audience: '', svid: 'a.b.c' }, true)).code,
      grpc.status.INVALID_ARGUMENT,
    );
    assert.equal(
      (await rawCall(t.address, 'ValidateJWTSVID', { audience: 'a', svid: '' }, true)).code,
      grpc.status.INVALID_ARGUMENT,
    );
    assert.equal(
      (await rawCall(t.address, 'FetchJWTSVID', { audience: ['a'], spiffe_id: 'spiffe://Bad/x' }, true)).code,
      grpc.status.INVALID_ARGUMENT,
    );
    assert.equal((await rawCall(t.address, 'FetchWITSVID', {}, true)).code, grpc.status.UNIMPLEMENTED);
    assert.equal((await rawCall(t.address, 'FetchWITBundles', {}, true)).code, grpc.status.UNIMPLEMENTED);
  });

  it('answers PermissionDenied to a caller no entry matches, on every profile', async () => {
    const other = await startTestAgent(`entries:\n${entryFor(uid + 4242, 'someone-else')}`);
    try {
      for (const [method, request] of [
        ['FetchX509SVID', {}],
        ['FetchX509Bundles', {}],
        ['FetchJWTBundles', {}],
        ['FetchJWTSVID', { audience: ['a'] }],
      ] as const) {
        const r = await rawCall(other.address, method, request, true);
        assert.equal(r.code, grpc.status.PERMISSION_DENIED, `${method}: ${r.details}`);
      }
    } finally {
      await other.close();
    }
  });

  it('answers PermissionDenied for a JWT-SVID of a SPIFFE ID the caller does not have', async () => {
    const r = await rawCall(
      t.address,
      'FetchJWTSVID',
      { audience: ['a'], spiffe_id: `spiffe://${TRUST_DOMAIN}/not-mine` },
      true,
    );
    assert.equal(r.code, grpc.status.PERMISSION_DENIED);
  });

  it('gives callers running under different uids different SVIDs, and nothing to an unregistered uid', {
    skip: uid !== 0 ? 'needs root to start callers under other uids' : false,
  }, async () => {
    const multi = await startTestAgent(
      `entries:\n${entryFor(4001, 'uid-4001')}${entryFor(4002, 'uid-4002')}${entryFor(0, 'root')}`,
    );
    try {
      // Asynchronously: the agent serves from this process's event loop.
      const runAs = async (id: number): Promise<{ ids?: string[]; serial?: string; error?: string }> => {
        const { stdout } = await execFileAsync(process.execPath, [fetchScript, multi.address], {
          uid: id,
          gid: id,
        });
        return JSON.parse(stdout);
      };
      const [a, b] = await Promise.all([runAs(4001), runAs(4002)]);
      assert.deepEqual(a.ids, [`spiffe://${TRUST_DOMAIN}/uid-4001`]);
      assert.deepEqual(b.ids, [`spiffe://${TRUST_DOMAIN}/uid-4002`]);
      assert.notEqual(a.serial, b.serial);
      assert.deepEqual(await runAs(4003), { error: 'PERMISSION_DENIED' });
    } finally {
      await multi.close();
    }
  });
});

describe('durable trust: the state directory', () => {
  it('restarted on the same stateDir, the agent serves the same bundle and what it served before still verifies', async () => {
    const state = join(mkdtempSync(join(tmpdir(), 'ksp-state-')), 'agent');
    const entries = `entries:\n${entryFor(uid, 'durable')}`;
    const first = await startTestAgent(entries, { stateDir: state });
    let before: X509Context;
    const s1 = await X509Source.create({ address: first.address });
    try {
      before = s1.context;
    } finally {
      s1.close();
      await first.close();
    }
    const second = await startTestAgent(entries, { stateDir: state });
    const s2 = await X509Source.create({ address: second.address });
    try {
      const now = s2.context;
      const own = (ctx: X509Context) => ctx.bundles.getX509Bundle(TrustDomain.parse(TRUST_DOMAIN));
      assert.deepEqual(
        own(now)?.authorities.map((c) => c.fingerprint256),
        own(before)?.authorities.map((c) => c.fingerprint256),
        'the same CA after the restart',
      );
      // The SVID handed out by the first process verifies against the bundle the second one serves.
      const id = verifyX509Svid(before.svids[0]?.certificates ?? [], now.bundles).id;
      assert.equal(id.toString(), `spiffe://${TRUST_DOMAIN}/durable`);
      assert.equal(second.agent.ca.origin, 'resumed');
    } finally {
      s2.close();
      await second.close();
      rmSync(dirname(state), { recursive: true, force: true });
    }
  });
});

describe('X.509-SVID rotation and pushes', () => {
  it('pushes a new SVID at half-life on the open stream, before the old one expires, without reconnecting', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'rotating', '    x509SvidTtl: 4s\n')}`);
    const source = await X509Source.create({ address: t.address });
    try {
      const first = leafOf(source.context);
      const next = await waitFor(
        updates(source),
        (ctx) => leafOf(ctx).serialNumber !== first.serialNumber,
        'rotation',
      );
      const arrivedAt = new Date();
      assert.ok(arrivedAt < first.validToDate, 'the new SVID arrived while the old one was still valid');
      assert.equal(next.svids[0]?.id.toString(), `spiffe://${TRUST_DOMAIN}/rotating`);
      verifyX509Svid(next.svids[0]?.certificates ?? [], next.bundles);
      assert.equal(source.connects, 1);
    } finally {
      source.close();
      await t.close();
    }
  });

  it('pushes a CA rotation: the next CA is announced first, then signs, and SVIDs of the old CA still verify', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'ca-rotation')}`, {
      ca: { ttlSeconds: 6 },
      svid: { x509TtlSeconds: 1 },
    });
    const source = await X509Source.create({ address: t.address });
    try {
      const caOf = (ctx: X509Context): string => leafOf(ctx).issuer;
      const firstCa = caOf(source.context);
      const authorities = (ctx: X509Context): number => ctx.bundles.bundles()[0]?.x509Authorities.length ?? 0;
      assert.equal(authorities(source.context), 1);
      // Announced: two authorities in the bundle while the old CA still signs.
      const announced = await waitFor(
        updates(source),
        (ctx) => authorities(ctx) === 2,
        'the next CA in the bundle',
      );
      assert.equal(caOf(announced), firstCa, 'the announced CA does not sign yet');
      let lastOfOldCa = announced;
      const unsubscribe = updates(source)((ctx) => {
        if (caOf(ctx) === firstCa) lastOfOldCa = ctx;
      });
      const rotated = await waitFor(
        updates(source),
        (ctx) => caOf(ctx) !== firstCa,
        'an SVID signed by the next CA',
      );
      unsubscribe();
      assert.equal(authorities(rotated), 2, 'the old CA stays in the bundle after the switch');
      // Overlap: an SVID of the old CA verifies against the bundle delivered with the new CA's SVIDs.
      const old = lastOfOldCa.svids[0] as X509Svid;
      const at = new Date(
        Math.min(Date.now(), (old.certificates[0] as X509Certificate).validToDate.getTime() - 1),
      );
      assert.equal(verifyX509Svid(old.certificates, rotated.bundles, at).id.toString(), old.id.toString());
      verifyX509Svid((rotated.svids[0] as X509Svid).certificates, rotated.bundles);
      assert.equal(source.connects, 1);
    } finally {
      source.close();
      await t.close();
    }
  });
});

describe('registration entries hot reload on open streams', () => {
  it('adds and removes identities on an open stream, and ends it with PermissionDenied when none is left', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'first')}`);
    const source = await X509Source.create({ address: t.address });
    const ids = (ctx: X509Context): string[] => ctx.svids.map((s) => s.id.toString());
    try {
      assert.deepEqual(ids(source.context), [`spiffe://${TRUST_DOMAIN}/first`]);
      t.writeEntries(`entries:\n${entryFor(uid, 'first')}${entryFor(uid, 'second', '    hint: second\n')}`);
      const added = await waitFor(updates(source), (ctx) => ctx.svids.length === 2, 'the added identity');
      assert.deepEqual(ids(added), [`spiffe://${TRUST_DOMAIN}/first`, `spiffe://${TRUST_DOMAIN}/second`]);
      assert.equal(source.svid('second').id.toString(), `spiffe://${TRUST_DOMAIN}/second`);

      t.writeEntries(`entries:\n${entryFor(uid, 'second', '    hint: second\n')}`);
      const removed = await waitFor(updates(source), (ctx) => ctx.svids.length === 1, 'the removed identity');
      assert.deepEqual(ids(removed), [`spiffe://${TRUST_DOMAIN}/second`]);

      // A broken edit changes nothing: the stream keeps the last good identities.
      t.writeEntries('entries:\n  - spiffeId: spiffe://other.org/x\n    selectors: []\n');
      t.writeEntries(`entries:\n${entryFor(uid + 1, 'not-me')}`);
      const denied = await new Promise<WorkloadApiError>((resolve) => source.once('error', resolve));
      assert.equal(denied.code, grpc.status.PERMISSION_DENIED);
      assert.deepEqual(
        ids(source.context),
        [`spiffe://${TRUST_DOMAIN}/second`],
        'the last good value is kept',
      );
    } finally {
      source.close();
      await t.close();
    }
  });
});

describe('bundles', () => {
  it('delivers federated bundles to entries that federate, and pushes their changes', async () => {
    const pki = await makeDevPki();
    const other = await makeDevPki();
    const dir = mkdtempSync(join(tmpdir(), 'ksp-federation-'));
    const hubFile = join(dir, 'hub-bundle.json');
    writeFileSync(hubFile, bundleJson(pki.hub));
    const t = await startTestAgent(
      `entries:\n${entryFor(uid, 'federating', '    federatesWith: [hub.example.org]\n')}${entryFor(uid + 1, 'not-federating')}`,
      { federatedBundles: new Map([['hub.example.org', hubFile]]) },
    );
    const source = await X509Source.create({ address: t.address });
    const client = new WorkloadClient({ address: t.address });
    const hubRoot = (ctx: X509Context): string | undefined =>
      ctx.bundles.getX509Bundle(TrustDomain.parse('hub.example.org'))?.authorities[0]?.fingerprint256;
    const fingerprint = (pem: string): string => new X509Certificate(pem).fingerprint256;
    try {
      assert.equal(hubRoot(source.context), fingerprint(pki.hub.rootPem));
      assert.deepEqual(
        (await client.fetchX509Bundles()).trustDomains().map((td) => td.name),
        ['example.org', 'hub.example.org'],
      );
      writeFileSync(hubFile, bundleJson(other.hub));
      await waitFor(
        updates(source),
        (ctx) => hubRoot(ctx) === fingerprint(other.hub.rootPem),
        'the changed federated bundle',
      );
    } finally {
      source.close();
      client.close();
      await t.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('mints JWT-SVIDs that the Workload API validates for the right audience only', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'jwt', '    hint: api\n')}`);
    const client = new WorkloadClient({ address: t.address });
    try {
      const [svid] = await client.fetchJwtSvids(['kube-svid-proxy']);
      assert.equal(svid?.id.toString(), `spiffe://${TRUST_DOMAIN}/jwt`);
      assert.equal(svid?.hint, 'api');
      const valid = await client.validateJwtSvid(svid?.token ?? '', 'kube-svid-proxy');
      assert.equal(valid.id.toString(), `spiffe://${TRUST_DOMAIN}/jwt`);
      assert.deepEqual(valid.claims.aud, ['kube-svid-proxy']);
      await assert.rejects(
        client.validateJwtSvid(svid?.token ?? '', 'another-audience'),
        (err: WorkloadApiError) => {
          assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
          assert.match(err.message, /ERR_JWT_AUDIENCE/);
          return true;
        },
      );
    } finally {
      client.close();
      await t.close();
    }
  });
});

describe("the socket: a safe directory, removed at the end only while it is still the agent's own", () => {
  const isRoot = process.geteuid?.() === 0;

  it('refuses to start in a socket directory another user owns (the attacker could swap in a fake agent)', {
    skip: isRoot ? false : 'needs root to give the directory to another uid',
  }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ksp-socket-dir-'));
    try {
      writeFileSync(join(dir, 'entries.yaml'), `entries:\n${entryFor(uid, 'me')}`);
      const attackers = join(dir, 'made-by-someone-else');
      mkdirSync(attackers, { mode: 0o755 });
      chownSync(attackers, 4001, 4001);
      await assert.rejects(
        WorkloadAgent.start({
          trustDomain: TrustDomain.parse(TRUST_DOMAIN),
          socketPath: join(attackers, 'agent.sock'),
          entriesFile: join(dir, 'entries.yaml'),
          logger: silentLogger(),
        }),
        (err: Error & { code?: string }) => {
          assert.equal(err.code, AgentErrorCode.SocketDirectory);
          assert.match(err.message, /owner uid 4001, mode 0755\) is owned by uid 4001/);
          return true;
        },
      );
      assert.equal(existsSync(join(attackers, 'agent.sock')), false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('leaves a fake agent that took over the socket path answering after it stops', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'me')}`);
    const fake = net.createServer((socket) => socket.end('fake'));
    try {
      unlinkSync(t.socketPath);
      await new Promise<void>((resolve) => fake.listen(t.socketPath, resolve));
      await t.agent.close();
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = net.connect(t.socketPath);
        socket.setEncoding('utf8').once('data', resolve);
        socket.once('error', reject);
      });
      assert.equal(answer, 'fake');
    } finally {
      await new Promise((resolve) => fake.close(resolve));
      await t.close();
    }
  });

  it('replaces the stale socket a crashed agent left behind', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'me')}`);
    try {
      // A crashed agent: its socket file stays, nobody answers on it.
      const stale = net.createServer();
      await new Promise<void>((resolve) => stale.listen(`${t.socketPath}.crashed`, resolve));
      await t.agent.close();
      renameSync(`${t.socketPath}.crashed`, t.socketPath);
      await new Promise((resolve) => stale.close(resolve));
      assert.ok(existsSync(t.socketPath), 'the stale socket is there');
      const again = await WorkloadAgent.start({
        trustDomain: TrustDomain.parse(TRUST_DOMAIN),
        socketPath: t.socketPath,
        entriesFile: t.entriesFile,
        logger: silentLogger(),
      });
      try {
        const client = new WorkloadClient({ address: t.address });
        try {
          const context = await client.fetchX509Context();
          assert.equal(context.svids[0]?.id.toString(), `spiffe://${TRUST_DOMAIN}/me`);
        } finally {
          client.close();
        }
      } finally {
        await again.close();
      }
    } finally {
      await t.close();
    }
  });
});
