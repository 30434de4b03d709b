import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';

const peers = join(import.meta.dirname, '..', '..', '..', 'dev', 'peers', 'peers.ts');

/** Asks for a peer in a child process whose PATH has no Go and whose cache is empty. */
function askWithoutGo(
  required: boolean,
  cache: string,
): { status: number | null; stdout: string; stderr: string } {
  const script = `import(${JSON.stringify(peers)}).then((m) => console.log(JSON.stringify(m.peer('gospiffe-probe'))))`;
  const env: NodeJS.ProcessEnv = { PATH: '/nonexistent', KSP_CACHE_DIR: cache, HOME: cache };
  if (required) env.KSP_REQUIRE_PEERS = '1';
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env, encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('real-peer builder without Go', () => {
  const cache = mkdtempSync(join(tmpdir(), 'ksp-peers-'));
  after(() => rmSync(cache, { recursive: true, force: true }));

  it('skips, saying why and how to make it a failure', () => {
    const r = askWithoutGo(false, cache);
    assert.equal(r.status, 0, r.stderr);
    const { skip } = JSON.parse(r.stdout) as { skip: string };
    assert.match(skip, /Go is not installed/);
    assert.match(skip, /KSP_REQUIRE_PEERS=1/);
  });

  it('fails instead when KSP_REQUIRE_PEERS=1, as CI sets it', () => {
    const r = askWithoutGo(true, cache);
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /PeerUnavailableError: Go is not installed/);
  });
});
