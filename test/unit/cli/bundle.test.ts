// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LocalCa } from '../../../src/agent/ca.ts';
import { StateDir } from '../../../src/config/statedir.ts';
import { FederationStore } from '../../../src/federation/store.ts';
import { SpiffeBundle } from '../../../src/spiffe/bundle.ts';
import { TrustDomain } from '../../../src/spiffe/id.ts';
import { runCli } from '../../helpers/cli.ts';

const SPOKE = TrustDomain.parse('spoke.example.org');
const HUB = TrustDomain.parse('hub.example.org');

describe('kube-svid-proxy bundle show | list | set', () => {
  let dir: string;
  let state: string;
  let ca: LocalCa;
  let hub: LocalCa;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-bundle-cli-'));
    state = join(dir, 'state');
    ca = await LocalCa.create({ trustDomain: SPOKE, stateDir: await StateDir.open(state) });
    hub = await LocalCa.create({ trustDomain: HUB });
    writeFileSync(join(dir, 'hub.json'), hub.bundle.marshal());
    writeFileSync(join(dir, 'hub.pem'), hub.bundle.x509Bundle.toPem());
    writeFileSync(
      join(dir, 'agent.yaml'),
      `trustDomain: ${SPOKE.name}\nentriesFile: entries.yaml\nstateDir: state\n`,
    );
  });
  after(() => {
    ca.close();
    hub.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('show prints our bundle exactly as published, as SPIFFE JSON or PEM, found through --config too', async () => {
    const json = await runCli(['bundle', 'show', '--state-dir', state]);
    assert.equal(json.status, 0, json.stderr);
    assert.equal(json.stdout, `${ca.bundle.marshal()}\n`);
    assert.ok(SpiffeBundle.parse(SPOKE, json.stdout).equals(ca.bundle));
    const pem = await runCli(['bundle', 'show', '--config', join(dir, 'agent.yaml'), '--format', 'pem']);
    assert.equal(pem.status, 0, pem.stderr);
    assert.equal(pem.stdout, ca.bundle.x509Bundle.toPem());
  });

  it('show explains a state directory the agent never used', async () => {
    const missing = await runCli(['bundle', 'show', '--state-dir', join(dir, 'missing')]);
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /ERR_STATE_DIR: state directory .*missing does not exist/);
    assert.equal(existsSync(join(dir, 'missing')), false, 'nothing created');
    mkdirSync(join(dir, 'empty'), { mode: 0o700 });
    const r = await runCli(['bundle', 'show', '--state-dir', join(dir, 'empty')]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /ERR_BUNDLE: .*ca\.json does not exist/);
  });

  it('set stores a federated bundle (JSON or PEM) that list then shows; our own trust domain is refused', async () => {
    const set = await runCli([
      'bundle',
      'set',
      '--trust-domain',
      HUB.name,
      '--file',
      join(dir, 'hub.json'),
      '--state-dir',
      state,
    ]);
    assert.equal(set.status, 0, set.stderr);
    assert.match(set.stdout, /set the bundle of hub\.example\.org \(1 X\.509, 1 JWT authorities\)/);
    assert.match(set.stderr, /SIGHUP/);
    const stored = await (await FederationStore.open(await StateDir.open(state))).load(HUB);
    assert.equal(stored?.source, 'set');
    assert.ok(stored?.bundle.equals(hub.bundle));

    const list = await runCli(['bundle', 'list', '--state-dir', state]);
    assert.equal(list.status, 0, list.stderr);
    assert.match(
      list.stdout,
      /^hub\.example\.org\n {2}bundle: {7}1 X\.509 and 1 JWT authorities, sequence 1\n {2}source: {7}set, at /m,
    );
    const listJson = JSON.parse(
      (await runCli(['bundle', 'list', '--state-dir', state, '--json'])).stdout,
    ) as {
      trustDomain: string;
      source: string;
    }[];
    assert.deepEqual(
      listJson.map((e) => [e.trustDomain, e.source]),
      [['hub.example.org', 'set']],
    );

    const pem = await runCli([
      'bundle',
      'set',
      '--trust-domain',
      'other.example.org',
      '--file',
      join(dir, 'hub.pem'),
      '--format',
      'pem',
      '--state-dir',
      state,
    ]);
    assert.equal(pem.status, 0, pem.stderr);
    assert.match(pem.stdout, /other\.example\.org \(1 X\.509, 0 JWT authorities\)/);

    const own = await runCli([
      'bundle',
      'set',
      '--trust-domain',
      SPOKE.name,
      '--file',
      join(dir, 'hub.json'),
      '--state-dir',
      state,
    ]);
    assert.equal(own.status, 1);
    assert.match(own.stderr, /ERR_BUNDLE: spoke\.example\.org is this agent's own trust domain/);
  });

  it('set refuses a file that is not a bundle, naming it, and keeps what was stored', async () => {
    writeFileSync(join(dir, 'broken.json'), '{"keys": [{"use": "x509-svid"}]}');
    const r = await runCli([
      'bundle',
      'set',
      '--trust-domain',
      HUB.name,
      '--file',
      join(dir, 'broken.json'),
      '--state-dir',
      state,
    ]);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /broken\.json/);
    const absent = await runCli([
      'bundle',
      'set',
      '--trust-domain',
      HUB.name,
      '--file',
      join(dir, 'absent.json'),
      '--state-dir',
      state,
    ]);
    assert.equal(absent.status, 1);
    assert.match(absent.stderr, /ERR_BUNDLE: cannot read .*absent\.json/);
    const stored = await (await FederationStore.open(await StateDir.open(state))).load(HUB);
    assert.ok(stored?.bundle.equals(hub.bundle), 'the earlier bundle is untouched');
  });

  it('each subcommand has --help, and an unknown one is a usage error', async () => {
    for (const sub of ['show', 'list', 'set']) {
      const r = await runCli(['bundle', sub, '--help']);
      assert.equal(r.status, 0);
      assert.match(r.stdout, new RegExp(`^Usage: kube-svid-proxy bundle ${sub}`));
    }
    const bad = await runCli(['bundle', 'frob']);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /expected: show, list, set/);
  });
});
