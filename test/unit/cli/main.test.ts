import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { bundleJson, type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';

const main = join(import.meta.dirname, '..', '..', '..', 'src', 'cli', 'main.ts');

function run(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [main, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('kube-svid-proxy CLI', () => {
  let dir: string;
  let pki: DevPki;
  const file = (name: string, content: string): string => {
    const path = join(dir, name);
    writeFileSync(path, content);
    return path;
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-cli-'));
    pki = await makeDevPki();
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('prints help and exits 0; with no command it prints help and exits 2', () => {
    assert.equal(run('help').status, 0);
    assert.match(run('help').stdout, /svid verify/);
    assert.equal(run().status, 2);
  });

  it('says clearly that the proxy is not built yet instead of failing silently', () => {
    const r = run('serve');
    assert.equal(r.status, 3);
    assert.match(r.stderr, /serve: the proxy .* not built yet/);
  });

  it('refuses unknown commands and flags with usage errors (exit 2)', () => {
    assert.equal(run('frobnicate').status, 2);
    assert.equal(run('svid', 'verify', 'x', '--bogus').status, 2);
    assert.match(run('svid', 'verify', 'x', '--bundle', 'no-equals').stderr, /TRUST_DOMAIN=FILE/);
  });

  it('svid verify prints the SPIFFE ID of a good SVID, reading JSON and PEM bundles', () => {
    const hub = file('hub.json', bundleJson(pki.hub));
    const spoke = file('spoke.pem', pki.spoke.rootPem);
    const chain = file('client.pem', pki.good.clientSpoke.chainPem);
    const r = run(
      'svid',
      'verify',
      chain,
      '--bundle',
      `hub.example.org=${hub}`,
      '--bundle',
      `spoke.example.org=${spoke}`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^OK spiffe:\/\/spoke\.example\.org\/ns\/ops\/sa\/debugger$/m);
  });

  it('svid verify names the rule a bad SVID breaks and exits 1', () => {
    const hub = file('hub2.json', bundleJson(pki.hub));
    const spoke = file('spoke2.json', bundleJson(pki.spoke));
    const forged = file('forged.pem', pki.bad.forgedTrustDomain.chainPem);
    const r = run(
      'svid',
      'verify',
      forged,
      '--bundle',
      `hub.example.org=${hub}`,
      '--bundle',
      `spoke.example.org=${spoke}`,
    );
    assert.equal(r.status, 1);
    assert.match(r.stderr, /^REFUSED ERR_X509_WRONG_TRUST_DOMAIN/);
    const late = run(
      'svid',
      'verify',
      file('argocd.pem', pki.good.clientArgocd.chainPem),
      '--bundle',
      `hub.example.org=${hub}`,
      '--at',
      '2099-01-01T00:00:00Z',
    );
    assert.equal(late.status, 1);
    assert.match(late.stderr, /^REFUSED ERR_X509_EXPIRED/);
  });

  it('reports a missing file by name', () => {
    const r = run(
      'svid',
      'verify',
      join(dir, 'absent.pem'),
      '--bundle',
      `hub.example.org=${join(dir, 'absent.json')}`,
    );
    assert.equal(r.status, 1);
    assert.match(r.stderr, /ENOENT.*absent\.json/);
  });
});
