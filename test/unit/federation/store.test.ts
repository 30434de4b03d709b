// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { chmod, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LocalCa } from '../../../src/agent/ca.ts';
import { StateDir } from '../../../src/config/statedir.ts';
import { FederationErrorCode, isFederationError } from '../../../src/federation/errors.ts';
import { FederationStore, federationFileName, type StoredBundle } from '../../../src/federation/store.ts';
import { SpiffeBundle } from '../../../src/spiffe/bundle.ts';
import { isKspError } from '../../../src/spiffe/errors.ts';
import { TrustDomain } from '../../../src/spiffe/id.ts';

const td = TrustDomain.parse('a.test');
const otherTd = TrustDomain.parse('b.test');

describe('FederationStore', () => {
  let dir: string;
  let source: SpiffeBundle;
  let n = 0;
  const fresh = async (): Promise<FederationStore> =>
    FederationStore.open(await StateDir.open(join(dir, `state-${n++}`)));
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-federation-store-'));
    source = (await LocalCa.create({ trustDomain: td })).bundle;
  });
  after(() => rm(dir, { recursive: true, force: true }));

  const bundleOf = (trustDomain: TrustDomain, sequence?: bigint): SpiffeBundle =>
    new SpiffeBundle(trustDomain, {
      x509Authorities: source.x509Authorities,
      jwtAuthorities: [...source.jwtAuthorities].map(([kid, publicKey]) => ({ kid, publicKey })),
      ...(sequence === undefined ? {} : { sequence }),
      refreshHint: 300,
    });

  it('round-trips a bundle with its source, URL and time, keeping a 64-bit sequence exact', async () => {
    const store = await fresh();
    const stored: StoredBundle = {
      bundle: bundleOf(td, 18_446_744_073_709_551_615n),
      source: 'endpoint',
      fetchedAt: new Date('2030-01-02T03:04:05.678Z'),
      url: 'https://bundles.a.test/bundle.json',
    };
    await store.save(td, stored);
    const loaded = await store.load(td);
    assert.ok(loaded !== undefined);
    assert.ok(loaded.bundle.equals(stored.bundle));
    assert.equal(loaded.bundle.sequence, 18_446_744_073_709_551_615n);
    assert.equal(loaded.source, 'endpoint');
    assert.equal(loaded.url, stored.url);
    assert.deepEqual(loaded.fetchedAt, stored.fetchedAt);
    assert.equal(loaded.bundle.trustDomain.name, 'a.test');
  });

  it('writes a readable document with the bundle embedded as JSON, mode 0600 in a 0700 directory', async () => {
    const store = await fresh();
    await store.save(td, { bundle: bundleOf(td, 42n), source: 'set', fetchedAt: new Date(0) });
    const file = join(store.path, 'a.test.json');
    const doc = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
    assert.equal(doc.trustDomain, 'a.test');
    assert.equal(doc.source, 'set');
    assert.equal(doc.url, undefined);
    assert.equal(doc.fetchedAt, '1970-01-01T00:00:00.000Z');
    assert.equal((doc.bundle as { spiffe_sequence: number }).spiffe_sequence, 42);
    assert.equal((await stat(file)).mode & 0o777, 0o600);
    assert.equal((await stat(store.path)).mode & 0o777, 0o700);
    assert.ok(store.path.endsWith('/federation'));
  });

  it('loads nothing for a trust domain never stored, and forgets one removed', async () => {
    const store = await fresh();
    assert.equal(await store.load(td), undefined);
    await store.save(td, { bundle: bundleOf(td), source: 'bootstrap', fetchedAt: new Date() });
    await store.remove(td);
    assert.equal(await store.load(td), undefined);
    await store.remove(td);
  });

  it('lists every stored bundle, each as its own trust domain', async () => {
    const store = await fresh();
    await store.save(otherTd, { bundle: bundleOf(otherTd, 2n), source: 'endpoint', fetchedAt: new Date() });
    await store.save(td, { bundle: bundleOf(td, 1n), source: 'set', fetchedAt: new Date() });
    const all = await store.list();
    assert.deepEqual(
      all.map((s) => [s.bundle.trustDomain.name, s.source, s.bundle.sequence]),
      [
        ['a.test', 'set', 1n],
        ['b.test', 'endpoint', 2n],
      ],
    );
  });

  it("refuses to store one trust domain's bundle under another's name", async () => {
    const store = await fresh();
    await assert.rejects(
      store.save(otherTd, { bundle: bundleOf(td), source: 'endpoint', fetchedAt: new Date() }),
      (err: unknown) => isFederationError(err, FederationErrorCode.State),
    );
  });

  it('refuses a corrupt file, or one holding another trust domain, with ERR_FEDERATION_STATE naming the file', async () => {
    const store = await fresh();
    const file = join(store.path, 'a.test.json');
    const good = { trustDomain: 'a.test', source: 'endpoint', fetchedAt: '2030-01-01T00:00:00Z' };
    const bundleJson = JSON.parse(bundleOf(td).marshal()) as unknown;
    const cases: [string, RegExp][] = [
      ['{"trustDomain": "a.te', /not valid JSON/],
      ['[]', /not a JSON object/],
      [
        JSON.stringify({ ...good, trustDomain: 'b.test', bundle: bundleJson }),
        /holds trust domain "b\.test"/,
      ],
      [JSON.stringify({ ...good, source: 'somewhere', bundle: bundleJson }), /"source"/],
      [JSON.stringify({ ...good, fetchedAt: 'yesterday', bundle: bundleJson }), /"fetchedAt"/],
      [JSON.stringify({ ...good }), /"bundle"/],
      [JSON.stringify({ ...good, bundle: { keys: 'none' } }), /"keys" must be present/],
    ];
    for (const [text, pattern] of cases) {
      await writeFile(file, text, { mode: 0o600 });
      await assert.rejects(store.load(td), (err: unknown) => {
        assert.ok(isFederationError(err, FederationErrorCode.State), String(err));
        assert.match(err.message, pattern);
        assert.ok(err.message.includes(file), err.message);
        return true;
      });
      await assert.rejects(store.list(), (err: unknown) => isFederationError(err, FederationErrorCode.State));
    }
  });

  it("leaves a loose file to the state directory's own refusal (ERR_STATE_DIR)", async () => {
    const store = await fresh();
    await store.save(td, { bundle: bundleOf(td), source: 'endpoint', fetchedAt: new Date() });
    await chmod(join(store.path, 'a.test.json'), 0o644);
    await assert.rejects(store.load(td), (err: unknown) => isKspError(err, 'ERR_STATE_DIR'));
  });

  it('names files after the trust domain, hashing names that are not safe file names', async () => {
    assert.equal(federationFileName(td), 'a.test.json');
    const dotted = TrustDomain.parse('-odd_.name');
    assert.match(federationFileName(dotted), /^td-[0-9a-f]{32}\.json$/);
    const long = TrustDomain.parse(`${'a'.repeat(250)}.x`);
    assert.match(federationFileName(long), /^td-[0-9a-f]{32}\.json$/);
    const store = await fresh();
    await store.save(dotted, { bundle: bundleOf(dotted), source: 'set', fetchedAt: new Date() });
    assert.equal((await store.load(dotted))?.bundle.trustDomain.name, '-odd_.name');
    assert.equal((await store.list())[0]?.bundle.trustDomain.name, '-odd_.name');
  });
});
