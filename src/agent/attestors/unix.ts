/**
 * The `unix` workload attestor, after SPIRE's: the caller's uid and gid (as the kernel reported them on the
 * socket), their names, its supplementary groups, and optionally the path and SHA-256 of its executable.
 *
 * Names come from the agent's own /etc/passwd and /etc/group (parsed here, no NSS), as SPIRE looks them up
 * in the agent's view of the system.
 */
import { createHash } from 'node:crypto';
import { open, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { compareStrings } from '../../config/compare.ts';
import { AgentError, AgentErrorCode } from '../errors.ts';
import { formatSelector, type Selector } from '../selectors.ts';
import { DEFAULT_PROC_ROOT, procPath, readProcessStatus } from './proc.ts';
import type { Caller, WorkloadAttestor } from './types.ts';

export interface UnixAttestorOptions {
  /** procfs root; default `/proc`. */
  readonly procRoot?: string;
  /** Directory holding `passwd` and `group`; default `/etc`. */
  readonly etcRoot?: string;
  /** Add `path:` (and `sha256:` when `workloadSizeLimit` > 0) for the caller's executable. Default false. */
  readonly discoverWorkloadPath?: boolean;
  /**
   * With `discoverWorkloadPath`, hash executables up to this many bytes and refuse larger ones.
   * Default 0: do not hash.
   */
  readonly workloadSizeLimit?: number;
}

const SELECTOR_TYPE = 'unix';
const HASH_CHUNK = 1 << 20;

function errnoCode(err: unknown): string | undefined {
  if (err instanceof Error && 'code' in err && typeof err.code === 'string') {
    return err.code;
  }
  return undefined;
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * id → name from a passwd(5) or group(5) file: `name:password:id:...`. The first line for an id wins, as
 * getpwuid(3) would answer. Comments, blank lines and NIS `+`/`-` lines are skipped.
 */
export function parseIdNames(text: string): Map<number, string> {
  const names = new Map<number, string>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#') || line.startsWith('+') || line.startsWith('-')) {
      continue;
    }
    const fields = line.split(':');
    const name = fields[0];
    const id = fields[2];
    if (name === undefined || name === '' || id === undefined || !/^\d+$/.test(id)) {
      continue;
    }
    const n = Number(id);
    if (!names.has(n)) {
      names.set(n, name);
    }
  }
  return names;
}

async function readIdNames(path: string): Promise<Map<number, string>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') {
      return new Map();
    }
    throw new AgentError(AgentErrorCode.Attestation, `cannot read ${path}: ${describe(err)}`, { cause: err });
  }
  return parseIdNames(text);
}

export class UnixAttestor implements WorkloadAttestor {
  readonly name = 'unix';
  readonly #procRoot: string;
  readonly #etcRoot: string;
  readonly #discoverWorkloadPath: boolean;
  readonly #workloadSizeLimit: number;

  constructor(options: UnixAttestorOptions = {}) {
    const limit = options.workloadSizeLimit ?? 0;
    if (!Number.isSafeInteger(limit) || limit < 0) {
      throw new AgentError(
        AgentErrorCode.Config,
        `unix attestor: workloadSizeLimit must be a non-negative integer, got ${String(limit)}`,
      );
    }
    this.#procRoot = options.procRoot ?? DEFAULT_PROC_ROOT;
    this.#etcRoot = options.etcRoot ?? '/etc';
    this.#discoverWorkloadPath = options.discoverWorkloadPath ?? false;
    this.#workloadSizeLimit = limit;
  }

  async attest(caller: Caller, signal?: AbortSignal): Promise<Selector[]> {
    signal?.throwIfAborted();
    const [status, users, groups] = await Promise.all([
      readProcessStatus(caller.pid, this.#procRoot),
      readIdNames(join(this.#etcRoot, 'passwd')),
      readIdNames(join(this.#etcRoot, 'group')),
    ]);

    const values: string[] = [`uid:${caller.uid}`, `gid:${caller.gid}`];
    const user = users.get(caller.uid);
    if (user !== undefined) {
      values.push(`user:${user}`);
    }
    const group = groups.get(caller.gid);
    if (group !== undefined) {
      values.push(`group:${group}`);
    }
    for (const gid of status.groups) {
      values.push(`supplementary_gid:${gid}`);
      const name = groups.get(gid);
      if (name !== undefined) {
        values.push(`supplementary_group:${name}`);
      }
    }

    if (this.#discoverWorkloadPath) {
      values.push(`path:${await this.#exePath(caller.pid)}`);
      if (this.#workloadSizeLimit > 0) {
        signal?.throwIfAborted();
        values.push(`sha256:${await this.#exeDigest(caller.pid)}`);
      }
    }

    const unique = [...new Set(values)].map((value): Selector => ({ type: SELECTOR_TYPE, value }));
    return unique.sort((a, b) => compareStrings(formatSelector(a), formatSelector(b)));
  }

  /** The executable's path as the process sees it (in its own mount namespace). */
  async #exePath(pid: number): Promise<string> {
    const link = procPath(pid, 'exe', this.#procRoot);
    try {
      return await readlink(link);
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Attestation,
        `cannot read the executable path of process ${pid} (${link}): ${describe(err)}`,
        { cause: err },
      );
    }
  }

  /**
   * SHA-256 of the executable, read through /proc/<pid>/exe (as SPIRE does): the kernel resolves that link to
   * the very file the process runs, across mount namespaces and even when the path was replaced since.
   */
  async #exeDigest(pid: number): Promise<string> {
    const link = procPath(pid, 'exe', this.#procRoot);
    const limit = this.#workloadSizeLimit;
    let handle: Awaited<ReturnType<typeof open>>;
    try {
      handle = await open(link, 'r');
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Attestation,
        `cannot open the executable of process ${pid} (${link}): ${describe(err)}`,
        { cause: err },
      );
    }
    try {
      const { size } = await handle.stat();
      if (size > limit) {
        throw new AgentError(
          AgentErrorCode.Attestation,
          `executable of process ${pid} is ${size} bytes, over the workload size limit of ${limit} bytes`,
        );
      }
      const hash = createHash('sha256');
      const buffer = Buffer.alloc(Math.min(HASH_CHUNK, limit + 1));
      let total = 0;
      for (;;) {
        const { bytesRead } = await handle.read(buffer, 0, buffer.length, null);
        if (bytesRead === 0) {
          break;
        }
        total += bytesRead;
        if (total > limit) {
          // The file grew after the size check.
          throw new AgentError(
            AgentErrorCode.Attestation,
            `executable of process ${pid} is over the workload size limit of ${limit} bytes`,
          );
        }
        hash.update(buffer.subarray(0, bytesRead));
      }
      return hash.digest('hex');
    } catch (err) {
      if (err instanceof AgentError) {
        throw err;
      }
      throw new AgentError(
        AgentErrorCode.Attestation,
        `cannot hash the executable of process ${pid} (${link}): ${describe(err)}`,
        { cause: err },
      );
    } finally {
      await handle.close();
    }
  }
}
