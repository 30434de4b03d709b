// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { chmod, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LocalCa, type SignedX509Svid } from '../../../src/agent/ca.ts';
import { AgentErrorCode, isAgentError } from '../../../src/agent/errors.ts';
import { generateKeyPair } from '../../../src/agent/keys.ts';
import { StateDir } from '../../../src/config/statedir.ts';
import { isKspError } from '../../../src/spiffe/errors.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import { mintJwtSvid, verifyJwtSvid } from '../../../src/spiffe/jwtsvid.ts';
import { verifyX509Svid } from '../../../src/spiffe/x509svid.ts';

const T0 = Date.UTC(2030, 0, 1, 12, 0, 0);
const HOUR = 3600;
const td = TrustDomain.parse('spoke.example.org');

function clockAt(ms: number): { ms: number; now: () => Date } {
  const clock = { ms, now: () => new Date(clock.ms) };
  return clock;
}

async function sign(ca: LocalCa, path: string): Promise<SignedX509Svid> {
  const keys = await generateKeyPair('ec-p256');
  return ca.signX509Svid({ id: SpiffeId.fromPath(td, path), publicKey: keys.publicKey, ttlSeconds: 600 });
}

describe('LocalCa with a state directory', () => {
  let root: string;
  let n = 0;
  const fresh = async (): Promise<string> => join(root, `state-${n++}`);
  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'ksp-ca-state-'));
  });
  after(() => rm(root, { recursive: true, force: true }));

  it('creates the directory 0700 and ca.json 0600, and a restart resumes the same CA and bundle', async () => {
    const path = await fresh();
    const clock = clockAt(T0);
    const first = await LocalCa.create({
      trustDomain: td,
      stateDir: await StateDir.open(path),
      now: clock.now,
    });
    assert.equal(first.origin, 'new');
    assert.equal((await stat(path)).mode & 0o777, 0o700);
    assert.equal((await stat(join(path, 'ca.json'))).mode & 0o777, 0o600);
    const svid = await sign(first, '/workload');
    const jwt = await mintJwtSvid({
      signer: first.jwtSigner().signer,
      id: SpiffeId.fromPath(td, '/workload'),
      audience: ['a'],
      now: clock.now(),
    });
    first.close();

    clock.ms += 60_000;
    const second = await LocalCa.create({
      trustDomain: td,
      stateDir: await StateDir.open(path),
      now: clock.now,
    });
    assert.equal(second.origin, 'resumed');
    assert.equal(second.active.certificate.fingerprint256, first.active.certificate.fingerprint256);
    assert.equal(second.bundle.marshal(), first.bundle.marshal(), 'same authorities and the same sequence');
    // What the first process handed out still verifies against what the second publishes.
    assert.equal(
      verifyX509Svid(svid.certificates, second.bundle, clock.now()).id.toString(),
      'spiffe://spoke.example.org/workload',
    );
    await verifyJwtSvid(jwt.token, second.bundle, 'a', { now: clock.now() });
    // And the resumed CA signs with the same key.
    const again = await sign(second, '/workload');
    assert.equal(again.certificates[0]?.verify(first.active.certificate.publicKey), true);
    second.close();
  });

  it('continues the rotation schedule where it was, and the bundle sequence keeps increasing', async () => {
    const path = await fresh();
    const clock = clockAt(T0);
    const open = async (): Promise<LocalCa> =>
      LocalCa.create({
        trustDomain: td,
        stateDir: await StateDir.open(path),
        now: clock.now,
        caTtlSeconds: 6 * HOUR,
      });
    const a = await open();
    clock.ms = T0 + 3 * HOUR * 1000; // half-life: the next CA is prepared and published
    await a.tick();
    await a.flushed();
    const prepared = a.next;
    assert.ok(prepared);
    const sequence = a.bundle.sequence as bigint;
    a.close();

    const b = await open();
    assert.equal(
      b.next?.certificate.fingerprint256,
      prepared.certificate.fingerprint256,
      'the prepared CA survives',
    );
    assert.equal(b.bundle.sequence, sequence);
    clock.ms = T0 + 5 * HOUR * 1000; // 5/6: the prepared CA becomes active, in the new process
    await b.tick();
    await b.flushed();
    assert.equal(b.active.certificate.fingerprint256, prepared.certificate.fingerprint256);
    assert.equal(b.active.generation, 2);
    assert.ok((b.bundle.sequence as bigint) > sequence);
    b.close();

    const c = await open();
    assert.equal(c.active.generation, 2);
    assert.equal(c.bundle.sequence, b.bundle.sequence);
    c.close();
  });

  it('after a downtime longer than the CA lives, starts the next generation rather than signing with an expired CA', async () => {
    const path = await fresh();
    const clock = clockAt(T0);
    const a = await LocalCa.create({
      trustDomain: td,
      stateDir: await StateDir.open(path),
      now: clock.now,
      caTtlSeconds: 6 * HOUR,
    });
    a.close();
    clock.ms = T0 + 48 * HOUR * 1000;
    const b = await LocalCa.create({
      trustDomain: td,
      stateDir: await StateDir.open(path),
      now: clock.now,
      caTtlSeconds: 6 * HOUR,
    });
    assert.equal(b.active.generation, 2);
    assert.ok(b.active.notAfter.getTime() > clock.ms);
    assert.equal(b.bundle.x509Authorities.length, 1, 'the expired CA left the bundle');
    b.close();
  });

  it('after such a downtime with a prepared CA that expired too, still resumes with a valid CA', async () => {
    const path = await fresh();
    const clock = clockAt(T0);
    const open = async (): Promise<LocalCa> =>
      LocalCa.create({
        trustDomain: td,
        stateDir: await StateDir.open(path),
        now: clock.now,
        caTtlSeconds: 6 * HOUR,
      });
    const a = await open();
    clock.ms = T0 + 3 * HOUR * 1000;
    await a.tick();
    await a.flushed();
    assert.equal(a.next?.generation, 2);
    a.close();
    clock.ms = T0 + 48 * HOUR * 1000;
    const b = await open();
    assert.ok(b.active.notAfter.getTime() > clock.ms, `generation ${b.active.generation} is valid`);
    assert.equal(b.active.generation, 3);
    const svid = await sign(b, '/after-downtime');
    assert.equal(verifyX509Svid(svid.certificates, b.bundle, clock.now()).id.path, '/after-downtime');
    b.close();
  });

  it('names each CA by generation and a random suffix, so two CAs never share a name', async () => {
    const a = await LocalCa.create({ trustDomain: td });
    const b = await LocalCa.create({ trustDomain: td });
    assert.match(a.active.certificate.subject, /CN=spoke\.example\.org CA 1 [0-9a-f]{8}/);
    assert.notEqual(a.active.certificate.subject, b.active.certificate.subject);
  });

  it('refuses, never replaces, a state file it cannot use, naming the file', async () => {
    const path = await fresh();
    const dir = await StateDir.open(path);
    (await LocalCa.create({ trustDomain: td, stateDir: dir })).close();
    const good = await readFile(join(path, 'ca.json'), 'utf8');

    const refuses = async (text: string, pattern: RegExp, trustDomain = td): Promise<void> => {
      await writeFile(join(path, 'ca.json'), text);
      await assert.rejects(LocalCa.create({ trustDomain, stateDir: dir }), (err: unknown) => {
        assert.ok(isAgentError(err, AgentErrorCode.Ca), String(err));
        assert.match((err as Error).message, /ca\.json/);
        assert.match((err as Error).message, pattern);
        return true;
      });
      // Still the file we wrote: nothing minted over it.
      assert.equal(await readFile(join(path, 'ca.json'), 'utf8'), text);
    };
    await refuses('{ not json', /not valid JSON/);
    await refuses(
      good,
      /trust domain "spoke\.example\.org".*"hub\.example\.org"/,
      TrustDomain.parse('hub.example.org'),
    );
    const doc = JSON.parse(good) as { active: { privateKey: string }; retired: unknown[] };
    const other = await LocalCa.create({ trustDomain: td });
    const swapped = JSON.parse(
      await (async () => {
        const p = await fresh();
        const d = await StateDir.open(p);
        (await LocalCa.create({ trustDomain: td, stateDir: d })).close();
        return readFile(join(p, 'ca.json'), 'utf8');
      })(),
    ) as { active: { privateKey: string } };
    other.close();
    doc.active.privateKey = swapped.active.privateKey;
    await refuses(JSON.stringify(doc), /active\.privateKey does not match active\.certificate/);
    await refuses(JSON.stringify({ ...JSON.parse(good), version: 9 }), /version 9 is not supported/);
  });

  it('refuses a state directory or file that others may read, with the fix in the message', async () => {
    const path = await fresh();
    const dir = await StateDir.open(path);
    (await LocalCa.create({ trustDomain: td, stateDir: dir })).close();
    await chmod(join(path, 'ca.json'), 0o644);
    await assert.rejects(LocalCa.create({ trustDomain: td, stateDir: dir }), (err: unknown) => {
      assert.ok(isKspError(err, 'ERR_STATE_DIR'), String(err));
      assert.match((err as Error).message, /mode 0644.*chmod 600/);
      return true;
    });
    await chmod(path, 0o755);
    await assert.rejects(StateDir.open(path), /mode 0755.*chmod 700/);
  });
});
