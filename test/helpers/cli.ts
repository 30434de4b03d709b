import { spawn } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** The CLI entry point, run from source as the tests run everything. */
export const CLI = join(import.meta.dirname, '..', '..', 'src', 'cli', 'main.ts');

export interface CliResult {
  readonly status: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * The environment for CLI runs: no inherited SPIFFE_ENDPOINT_SOCKET (tests pass their own), and a compile cache
 * that roughly halves each start.
 */
export function cliEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    NODE_COMPILE_CACHE:
      process.env.NODE_COMPILE_CACHE ?? join(tmpdir(), 'kube-svid-proxy-test-compile-cache'),
    ...extra,
  };
  if (!('SPIFFE_ENDPOINT_SOCKET' in extra)) delete env.SPIFFE_ENDPOINT_SOCKET;
  return env;
}

/** Runs the CLI without blocking, so independent runs can go in parallel and in-process servers keep serving. */
export function runCli(args: readonly string[], env: NodeJS.ProcessEnv = cliEnv()): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}
