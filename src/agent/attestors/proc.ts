/**
 * Small readers over procfs. Every function takes the procfs root (default `/proc`) so tests can point them
 * at a fake tree. A process that is gone, or a file that does not parse, is an `AgentError` (Attestation)
 * naming the pid: the attestor cannot say who the caller is.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AgentError, AgentErrorCode } from '../errors.ts';

export const DEFAULT_PROC_ROOT = '/proc';

/** The credentials in /proc/<pid>/status: real, effective, saved and filesystem IDs, and supplementary groups. */
export interface ProcessStatus {
  /** `Uid:` line: real, effective, saved set, filesystem. */
  readonly uids: number[];
  /** `Gid:` line: real, effective, saved set, filesystem. */
  readonly gids: number[];
  /** `Groups:` line: supplementary group IDs (may be empty). */
  readonly groups: number[];
}

/** The path of `/proc/<pid>/<name>` under `procRoot`, after checking that `pid` is a plain positive integer. */
export function procPath(pid: number, name: string, procRoot: string = DEFAULT_PROC_ROOT): string {
  if (!Number.isSafeInteger(pid) || pid <= 0) {
    throw new AgentError(AgentErrorCode.Attestation, `pid ${String(pid)} is not a positive integer`);
  }
  return join(procRoot, String(pid), name);
}

function errnoCode(err: unknown): string | undefined {
  if (err instanceof Error && 'code' in err && typeof err.code === 'string') {
    return err.code;
  }
  return undefined;
}

/** Reads `/proc/<pid>/<name>` as text; a missing process (ENOENT, ESRCH) says so plainly. */
async function readProcFile(pid: number, name: string, procRoot: string): Promise<string> {
  const path = procPath(pid, name, procRoot);
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    const code = errnoCode(err);
    if (code === 'ENOENT' || code === 'ESRCH') {
      throw new AgentError(AgentErrorCode.Attestation, `process ${pid} is gone (${path} does not exist)`, {
        cause: err,
      });
    }
    throw new AgentError(
      AgentErrorCode.Attestation,
      `cannot read ${path} for process ${pid}: ${err instanceof Error ? err.message : String(err)}`,
      { cause: err },
    );
  }
}

/**
 * Field 22 of /proc/<pid>/stat: the time the process started, in clock ticks after boot. Together with the
 * pid it names one process for its whole life, so a caller can check the pid was not reused.
 *
 * The second field is the command name in parentheses and may itself hold spaces and `)`; the fields after
 * it start after the LAST `)` of the line.
 */
export async function readProcessStartTime(
  pid: number,
  procRoot: string = DEFAULT_PROC_ROOT,
): Promise<bigint> {
  const text = await readProcFile(pid, 'stat', procRoot);
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  if (open <= 0 || close < open) {
    throw new AgentError(AgentErrorCode.Attestation, `/proc/${pid}/stat is malformed: no (comm) field`);
  }
  const statPid = text.slice(0, open).trim();
  if (statPid !== String(pid)) {
    throw new AgentError(
      AgentErrorCode.Attestation,
      `/proc/${pid}/stat is malformed: it names pid "${statPid}"`,
    );
  }
  // Fields 3 (state) onwards; starttime is field 22, so index 22 - 3 here.
  const rest = text
    .slice(close + 1)
    .trim()
    .split(/\s+/);
  const startTime = rest[22 - 3];
  if (startTime === undefined || !/^\d+$/.test(startTime)) {
    throw new AgentError(
      AgentErrorCode.Attestation,
      `/proc/${pid}/stat is malformed: field 22 (starttime) is ${startTime === undefined ? 'missing' : `"${startTime}"`}`,
    );
  }
  return BigInt(startTime);
}

function parseIdList(pid: number, key: string, value: string): number[] {
  const fields = value.trim() === '' ? [] : value.trim().split(/\s+/);
  return fields.map((field) => {
    if (!/^\d+$/.test(field)) {
      throw new AgentError(
        AgentErrorCode.Attestation,
        `/proc/${pid}/status is malformed: "${key}:" holds "${field}", not a number`,
      );
    }
    return Number(field);
  });
}

/** The `Uid:`, `Gid:` and `Groups:` lines of /proc/<pid>/status. */
export async function readProcessStatus(
  pid: number,
  procRoot: string = DEFAULT_PROC_ROOT,
): Promise<ProcessStatus> {
  const text = await readProcFile(pid, 'status', procRoot);
  const lines = new Map<string, string>();
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) {
      lines.set(line.slice(0, colon), line.slice(colon + 1));
    }
  }
  const required = (key: string): number[] => {
    const value = lines.get(key);
    if (value === undefined) {
      throw new AgentError(AgentErrorCode.Attestation, `/proc/${pid}/status is malformed: no "${key}:" line`);
    }
    const ids = parseIdList(pid, key, value);
    if (ids.length === 0) {
      throw new AgentError(
        AgentErrorCode.Attestation,
        `/proc/${pid}/status is malformed: "${key}:" is empty`,
      );
    }
    return ids;
  };
  const uids = required('Uid');
  const gids = required('Gid');
  const groupsLine = lines.get('Groups');
  const groups = groupsLine === undefined ? [] : parseIdList(pid, 'Groups', groupsLine);
  return { uids, gids, groups };
}

/** The raw text of /proc/<pid>/cgroup. */
export async function readCgroup(pid: number, procRoot: string = DEFAULT_PROC_ROOT): Promise<string> {
  return readProcFile(pid, 'cgroup', procRoot);
}

/** The raw text of /proc/<pid>/mountinfo. */
export async function readMountinfo(pid: number, procRoot: string = DEFAULT_PROC_ROOT): Promise<string> {
  return readProcFile(pid, 'mountinfo', procRoot);
}
