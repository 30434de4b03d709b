import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

const repo = join(import.meta.dirname, '..', '..');
const bin = (name: string): string => join(repo, 'node_modules', '.bin', name);

// A consumer that installs kube-svid-proxy by path, as a platform team's own tool would.
describe('the published package', () => {
  let scratch: string;

  before(() => {
    // The package's own build: tsc, then the Workload API proto beside the compiled client.
    execFileSync('npm', ['run', '--silent', 'build'], { cwd: repo, stdio: 'inherit' });
    scratch = mkdtempSync(join(tmpdir(), 'ksp-consumer-'));
    writeFileSync(
      join(scratch, 'package.json'),
      JSON.stringify({ name: 'consumer', private: true, type: 'module' }),
    );
    execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', '--ignore-scripts', repo], {
      cwd: scratch,
      stdio: 'pipe',
    });
  });

  after(() => rmSync(scratch, { recursive: true, force: true }));

  it('exports the SPIFFE library as kube-svid-proxy/spiffe at run time', () => {
    writeFileSync(
      join(scratch, 'use.mjs'),
      [
        "import { SpiffeId, verifyX509Svid, SpiffeError } from 'kube-svid-proxy/spiffe';",
        "const id = SpiffeId.parse('spiffe://example.org/ns/default/sa/web');",
        'let code;',
        "try { SpiffeId.parse('spiffe://example.org/a/'); } catch (e) { code = e instanceof SpiffeError && e.code; }",
        'console.log(JSON.stringify({ id: id.toString(), td: id.trustDomain.name, verify: typeof verifyX509Svid, code }));',
      ].join('\n'),
    );
    const out = execFileSync(process.execPath, ['use.mjs'], { cwd: scratch, encoding: 'utf8' });
    assert.deepEqual(JSON.parse(out), {
      id: 'spiffe://example.org/ns/default/sa/web',
      td: 'example.org',
      verify: 'function',
      code: 'ERR_ID_TRAILING_SLASH',
    });
  });

  it('exports the Workload API client as kube-svid-proxy/workload, with its proto file', () => {
    writeFileSync(
      join(scratch, 'workload.mjs'),
      [
        "import { X509Source, JwtSource, WorkloadClient, parseEndpointAddress } from 'kube-svid-proxy/workload';",
        "const client = new WorkloadClient({ address: 'unix:///nonexistent/agent.sock' });",
        'client.close();',
        'console.log(JSON.stringify({ x509: typeof X509Source.create, jwt: typeof JwtSource.create,',
        "  path: parseEndpointAddress('unix:///run/spire/agent.sock'), socket: client.socketPath }));",
      ].join('\n'),
    );
    const out = execFileSync(process.execPath, ['workload.mjs'], { cwd: scratch, encoding: 'utf8' });
    assert.deepEqual(JSON.parse(out), {
      x509: 'function',
      jwt: 'function',
      path: '/run/spire/agent.sock',
      socket: '/nonexistent/agent.sock',
    });
  });

  it('ships type declarations that a strict TypeScript consumer compiles against', () => {
    writeFileSync(
      join(scratch, 'use.ts'),
      [
        "import { SpiffeId, verifyX509Svid, type VerifiedX509Svid, BundleSet } from 'kube-svid-proxy/spiffe';",
        "import { X509Source, type X509Context } from 'kube-svid-proxy/workload';",
        'const onUpdate = (source: X509Source): X509Context => source.context;',
        "const id: SpiffeId = SpiffeId.parse('spiffe://example.org/x');",
        'const check = (chain: Parameters<typeof verifyX509Svid>[0]): VerifiedX509Svid =>',
        '  verifyX509Svid(chain, new BundleSet());',
        'export { id, check, onUpdate };',
      ].join('\n'),
    );
    writeFileSync(
      join(scratch, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          module: 'nodenext',
          moduleResolution: 'nodenext',
          target: 'es2023',
          strict: true,
          noEmit: true,
          typeRoots: [join(repo, 'node_modules', '@types')],
          types: ['node'],
        },
        files: ['use.ts'],
      }),
    );
    execFileSync(bin('tsc'), ['-p', join(scratch, 'tsconfig.json')], { cwd: scratch, stdio: 'pipe' });
  });
});
