/**
 * Interop with real SPIFFE software: the SPIRE agent's own CLI (`spire-agent api fetch|validate`, v1.13.3) and a
 * go-spiffe v2.9.0 program of ours (dev/peers/gospiffe) talk to our agent's socket, unchanged. Both are built
 * from their Go modules into a cache outside the repository (dev/peers/peers.ts). Without Go these tests skip,
 * saying why; with KSP_REQUIRE_PEERS=1 (CI) a missing peer fails the run instead.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { bundleJson, makeDevPki } from '../../certs-dev/devpki.ts';
import { peer } from '../../dev/peers/peers.ts';
import { BundleSet } from '../../src/spiffe/bundle.ts';
import { verifyJwtSvid } from '../../src/spiffe/jwtsvid.ts';
import { parseCertificates, parseX509Svid, verifyX509Svid } from '../../src/spiffe/x509svid.ts';
import { entryFor, startTestAgent, type TestAgent, TRUST_DOMAIN } from '../helpers/agent.ts';

// Never execFileSync here: the agent answers from this process's event loop.
const run = promisify(execFile);
const uid = process.getuid?.() ?? 0;

// Resolved at load time so that a missing Go becomes a visible skip of the whole suite.
const spire = peer('spire-agent');
const gospiffe = peer('gospiffe-probe');
const skip = 'skip' in spire ? spire.skip : 'skip' in gospiffe ? gospiffe.skip : false;

function lines(stdout: string): Record<string, unknown>[] {
  return stdout
    .trim()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe('interop with real SPIFFE clients', { skip }, () => {
  let t: TestAgent;
  let dir: string;
  const spireAgent = 'path' in spire ? spire.path : '';
  const probe = 'path' in gospiffe ? gospiffe.path : '';

  before(async () => {
    const pki = await makeDevPki();
    dir = mkdtempSync(join(tmpdir(), 'ksp-interop-'));
    const hubBundle = join(dir, 'hub.json');
    writeFileSync(hubBundle, bundleJson(pki.hub));
    t = await startTestAgent(
      `entries:\n${entryFor(uid, 'interop', '    x509SvidTtl: 3s\n    hint: interop\n    federatesWith: [hub.example.org]\n')}`,
      { federatedBundles: new Map([['hub.example.org', hubBundle]]), svid: { rotationJitter: 0 } },
    );
  });

  after(async () => {
    await t?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('spire-agent api fetch x509 gets our SVID, its bundle and the federated bundle, and writes PEM files', async () => {
    const { stdout } = await run(spireAgent, [
      'api',
      'fetch',
      'x509',
      '-socketPath',
      t.socketPath,
      '-output',
      'json',
    ]);
    const response = JSON.parse(stdout) as {
      svids: { spiffe_id: string; x509_svid: string; x509_svid_key: string; bundle: string; hint: string }[];
      federated_bundles: Record<string, string>;
    };
    assert.equal(response.svids.length, 1);
    const [m] = response.svids;
    assert.equal(m?.spiffe_id, `spiffe://${TRUST_DOMAIN}/interop`);
    assert.equal(m?.hint, 'interop');
    assert.deepEqual(Object.keys(response.federated_bundles), ['spiffe://hub.example.org']);
    const svid = parseX509Svid(
      Buffer.from(m?.x509_svid ?? '', 'base64'),
      Buffer.from(m?.x509_svid_key ?? '', 'base64'),
    );
    assert.equal(verifyX509Svid(svid.certificates, t.agent.ca.bundle).id.toString(), m?.spiffe_id);

    const out = join(dir, 'written');
    const { mkdirSync } = await import('node:fs');
    mkdirSync(out);
    await run(spireAgent, ['api', 'fetch', 'x509', '-socketPath', t.socketPath, '-write', out]);
    const chain = parseCertificates(readFileSync(join(out, 'svid.0.pem')));
    const roots = parseCertificates(readFileSync(join(out, 'bundle.0.pem')));
    assert.deepEqual(
      roots.map((c) => c.fingerprint256),
      t.agent.ca.bundle.x509Authorities.map((c) => c.fingerprint256),
    );
    assert.equal(verifyX509Svid(chain, t.agent.ca.bundle).id.toString(), `spiffe://${TRUST_DOMAIN}/interop`);
    assert.ok(readFileSync(join(out, 'svid.0.key'), 'utf8').includes('PRIVATE KEY'));
  });

  it('spire-agent api fetch jwt gets a JWT-SVID that verifies against our bundle, and the JWT bundle', async () => {
    const { stdout } = await run(spireAgent, [
      'api',
      'fetch',
      'jwt',
      '-audience',
      'spoke-apiserver',
      '-socketPath',
      t.socketPath,
      '-output',
      'json',
    ]);
    // spire-agent prints the JWTSVIDResponse, then the JWTBundlesResponse.
    const [svids, bundles] = JSON.parse(stdout) as [
      { svids: { spiffe_id: string; svid: string; hint: string }[] },
      { bundles: Record<string, string> },
    ];
    const token = svids.svids[0]?.svid ?? '';
    const verified = await verifyJwtSvid(token, new BundleSet([t.agent.ca.bundle]), 'spoke-apiserver');
    assert.equal(verified.id.toString(), `spiffe://${TRUST_DOMAIN}/interop`);
    assert.equal(svids.svids[0]?.hint, 'interop');
    assert.deepEqual(Object.keys(bundles.bundles).sort(), [
      `spiffe://${TRUST_DOMAIN}`,
      'spiffe://hub.example.org',
    ]);
    const jwks = JSON.parse(
      Buffer.from(bundles.bundles[`spiffe://${TRUST_DOMAIN}`] ?? '', 'base64').toString(),
    ) as {
      keys: { kid: string }[];
    };
    assert.deepEqual(
      jwks.keys.map((k) => k.kid),
      [...t.agent.ca.bundle.jwtAuthorities.keys()],
    );
  });

  it('spire-agent api validate jwt accepts our token for its audience and refuses it for another', async () => {
    const [svid] = await t.agent.mintJwtSvids(new Set([`unix:uid:${uid}`]), ['spoke-apiserver']);
    const token = svid?.token ?? '';
    const ok = await run(spireAgent, [
      'api',
      'validate',
      'jwt',
      '-audience',
      'spoke-apiserver',
      '-svid',
      token,
      '-socketPath',
      t.socketPath,
    ]);
    assert.match(ok.stdout, /SVID is valid/);
    assert.match(ok.stdout, new RegExp(`spiffe://${TRUST_DOMAIN}/interop`));
    await assert.rejects(
      run(spireAgent, [
        'api',
        'validate',
        'jwt',
        '-audience',
        'other',
        '-svid',
        token,
        '-socketPath',
        t.socketPath,
      ]),
      (err: { code?: number; stdout?: string; stderr?: string }) => {
        assert.notEqual(err.code, 0);
        assert.match(`${err.stdout}${err.stderr}`, /not valid/);
        return true;
      },
    );
  });

  it('go-spiffe X509Source receives rotations on one stream, each verifying against the bundle it came with', async () => {
    const before = t.agent.server.stats;
    const { stdout } = await run(probe, ['x509', '-socket', t.address, '-updates', '3', '-timeout', '30s']);
    const all = lines(stdout);
    // Closing the client after the last update cancels the watch ("the client connection is closing"): only
    // errors before "done" would mean a reconnect.
    const events = all.slice(0, all.findIndex((e) => e.event === 'done') + 1 || all.length);
    const updates = events.filter((e) => e.event === 'x509');
    assert.equal(updates.length, 3);
    assert.deepEqual(
      events.filter((e) => e.event === 'watch-error'),
      [],
      'go-spiffe reported no stream error, so it never reconnected',
    );
    for (const u of updates) {
      assert.equal(u.id, `spiffe://${TRUST_DOMAIN}/interop`);
      assert.equal(u.hint, 'interop');
      assert.equal(u.verified, true, String(u.verify_error));
      assert.deepEqual(u.trust_domains, [`spiffe://${TRUST_DOMAIN}`, 'spiffe://hub.example.org']);
    }
    assert.equal(new Set(updates.map((u) => u.leaf_sha256)).size, 3, 'three different SVIDs: two rotations');
    const after = t.agent.server.stats;
    assert.equal(
      (after.calls.FetchX509SVID ?? 0) - (before.calls.FetchX509SVID ?? 0),
      1,
      'one stream for all',
    );
    assert.equal(after.connections - before.connections, 1, 'one connection for all');
  });

  it('go-spiffe fetches a JWT-SVID, validates it locally with the JWT bundles and through ValidateJWTSVID', async () => {
    const { stdout } = await run(probe, ['jwt', '-socket', t.address, '-audience', 'spoke-apiserver']);
    const events = lines(stdout);
    assert.deepEqual(
      events.map((e) => e.event),
      ['jwt', 'jwt-local-valid', 'jwt-remote-valid', 'jwt-wrong-audience-refused', 'done'],
    );
    assert.equal(events[0]?.id, `spiffe://${TRUST_DOMAIN}/interop`);
    assert.deepEqual(events[0]?.audience, ['spoke-apiserver']);
    assert.match(String(events[3]?.error), /InvalidArgument/);
  });
});
