/**
 * dev/git-server.ts, the loopback git smart-HTTP server later tests point Flux's source-controller at: the git
 * CLI clones a repository from it and fetches a later commit, over protocol v0 (what go-git speaks) and v2 (the
 * git CLI's default), and the server's request log shows which protocol each client asked for.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { commitFiles, type GitServer, initRepo, startGitServer } from '../../dev/git-server.ts';

const execFileP = promisify(execFile);

/** The git CLI as a client, without the developer's configuration. */
async function gitRun(
  args: readonly string[],
  options: { cwd?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<{ stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith('GIT_')) env[key] = value;
  return execFileP('git', [...args], {
    ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
    env: {
      ...env,
      GIT_CONFIG_NOSYSTEM: '1',
      GIT_CONFIG_GLOBAL: '/dev/null',
      GIT_TERMINAL_PROMPT: '0',
      ...options.env,
    },
  });
}

async function git(args: readonly string[], cwd?: string): Promise<string> {
  return (await gitRun(args, cwd === undefined ? {} : { cwd })).stdout.trim();
}

describe('dev/git-server.ts', () => {
  let dir: string;
  let server: GitServer;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-git-server-'));
    server = await startGitServer({ root: join(dir, 'repos') });
  });

  after(async () => {
    await server?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  for (const version of [0, 2] as const) {
    it(`serves a clone and a later fetch over protocol v${version}`, async () => {
      const name = `app-v${version}`;
      const repos = join(dir, 'repos');
      const first = await initRepo(repos, name, {
        'deploy/configmap.yaml': 'kind: ConfigMap\nname: one\n',
        'README.md': 'first\n',
      });
      const work = join(dir, `clone-v${version}`);
      const seen = server.requests.length;

      await git(['-c', `protocol.version=${version}`, 'clone', '--quiet', `${server.url}/${name}.git`, work]);
      assert.equal(readFileSync(join(work, 'deploy/configmap.yaml'), 'utf8'), 'kind: ConfigMap\nname: one\n');
      assert.equal(await git(['rev-parse', 'HEAD'], work), first);
      assert.equal(await git(['rev-parse', '--abbrev-ref', 'HEAD'], work), 'main');

      const second = await commitFiles(
        repos,
        name,
        { 'deploy/configmap.yaml': 'kind: ConfigMap\nname: two\n', 'README.md': null },
        'second',
      );
      assert.notEqual(second, first);
      await git(['-c', `protocol.version=${version}`, 'pull', '--quiet', '--ff-only'], work);
      assert.equal(await git(['rev-parse', 'HEAD'], work), second);
      assert.equal(readFileSync(join(work, 'deploy/configmap.yaml'), 'utf8'), 'kind: ConfigMap\nname: two\n');
      assert.equal(existsSync(join(work, 'README.md')), false);

      // Both the clone and the pull went through this server's smart protocol, asking for the version set.
      const mine = server.requests.slice(seen);
      const advertisements = mine.filter((r) => r.url === `/${name}.git/info/refs?service=git-upload-pack`);
      assert.equal(advertisements.length, 2);
      for (const r of advertisements) {
        assert.equal(r.status, 200);
        assert.equal(r.gitProtocol, version === 2 ? 'version=2' : undefined);
      }
      const packs = mine.filter((r) => r.method === 'POST' && r.url === `/${name}.git/git-upload-pack`);
      assert.ok(packs.length >= 2, `upload-pack POSTs: ${JSON.stringify(mine)}`);
      assert.ok(packs.every((r) => r.status === 200));

      // What the server answered in: a v2 server's first packet line says so, a v0 one lists refs at once.
      const { stdout, stderr } = await gitRun(
        ['-c', `protocol.version=${version}`, 'ls-remote', `${server.url}/${name}.git`, 'refs/heads/main'],
        { env: { GIT_TRACE_PACKET: '1' } },
      );
      assert.equal(stdout.trim(), `${second}\trefs/heads/main`);
      assert.equal(/git< version 2$/m.test(stderr), version === 2);
    });
  }

  it('answers 404 for a repository that does not exist, and the clone fails', async () => {
    await assert.rejects(
      git(['clone', '--quiet', `${server.url}/missing.git`, join(dir, 'missing')]),
      /not found/i,
    );
    assert.equal(server.requests.at(-1)?.status, 404);
  });
});
