import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type AgentOptions, WorkloadAgent } from '../../src/agent/agent.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import { TrustDomain } from '../../src/spiffe/id.ts';

export const TRUST_DOMAIN = 'example.org';

export interface TestAgent {
  readonly agent: WorkloadAgent;
  readonly dir: string;
  readonly socketPath: string;
  /** unix:///… address of the socket. */
  readonly address: string;
  readonly entriesFile: string;
  /** Replaces the entries file (the agent picks the change up through its directory watch). */
  writeEntries(yaml: string): void;
  close(): Promise<void>;
}

/** One entry line-set for `unix:uid:<uid>`; handy for the common case. */
export function entryFor(uid: number, path: string, extra = ''): string {
  return `  - spiffeId: spiffe://${TRUST_DOMAIN}/${path}\n    selectors: ["unix:uid:${uid}"]\n${extra}`;
}

/**
 * Starts a real agent (local CA, unix attestor, real socket) in a fresh temporary directory that other users
 * may traverse, so tests can call it from processes running under other uids.
 */
export async function startTestAgent(
  entriesYaml: string,
  options: Partial<Omit<AgentOptions, 'socketPath' | 'entriesFile'>> = {},
): Promise<TestAgent> {
  const dir = mkdtempSync(join(tmpdir(), 'ksp-agent-'));
  chmodSync(dir, 0o755);
  const entriesFile = join(dir, 'entries.yaml');
  const socketPath = join(dir, 'sock', 'agent.sock');
  writeFileSync(entriesFile, entriesYaml);
  const agent = await WorkloadAgent.start({
    trustDomain: TrustDomain.parse(TRUST_DOMAIN),
    socketPath,
    entriesFile,
    logger: silentLogger(),
    watchPollMs: 500,
    ...options,
  });
  return {
    agent,
    dir,
    socketPath,
    address: `unix://${socketPath}`,
    entriesFile,
    writeEntries: (yaml) => writeFileSync(entriesFile, yaml),
    close: async () => {
      await agent.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Resolves with the first value `next()` yields that passes `accept`, or rejects after `timeoutMs`. */
export function waitFor<T>(
  subscribe: (listener: (value: T) => void) => () => void,
  accept: (value: T) => boolean,
  what: string,
  timeoutMs = 20_000,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      unsubscribe();
      reject(new Error(`timed out waiting for ${what}`));
    }, timeoutMs);
    const unsubscribe = subscribe((value) => {
      if (!accept(value)) return;
      clearTimeout(timer);
      unsubscribe();
      resolve(value);
    });
  });
}
