// A server's CPU time and memory as the kernel accounts them, for a whole process tree: a master and its workers
// (nginx, the proxy with workers), each with its threads (Node's and Go's runtimes). Linux only (/proc).
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

const CLOCK_TICKS = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
const PAGE_BYTES = Number(execFileSync('getconf', ['PAGESIZE'], { encoding: 'utf8' }).trim()) || 4096;
const TICK_US = 1_000_000 / CLOCK_TICKS;

interface ProcStat {
  readonly pid: number;
  readonly ppid: number;
  /** utime + stime of every thread of the process, live or exited, in µs (to a clock tick). */
  readonly cpuUs: number;
  readonly rssBytes: number;
}

function readStat(pid: number): ProcStat | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined; // gone between the listing and the read
  }
  // The command name (field 2) may hold spaces and parentheses: the fields that follow start after the last ')'.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  // Fields from 3 on (man 5 proc): state ppid ... utime(14) stime(15) ... rss(24).
  const at = (n: number): number => Number(fields[n - 3]);
  return {
    pid,
    ppid: at(4),
    cpuUs: ((at(14) + at(15)) * 1_000_000) / CLOCK_TICKS,
    rssBytes: at(24) * PAGE_BYTES,
  };
}

/** The process and all its descendants, as they are now. */
function processTree(root: number): ProcStat[] {
  const all: ProcStat[] = [];
  for (const name of readdirSync('/proc')) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    const stat = readStat(pid);
    if (stat !== undefined) all.push(stat);
  }
  const children = new Map<number, ProcStat[]>();
  for (const stat of all) {
    const list = children.get(stat.ppid);
    if (list === undefined) children.set(stat.ppid, [stat]);
    else list.push(stat);
  }
  const self = all.find((s) => s.pid === root);
  if (self === undefined) throw new Error(`process ${root} is gone`);
  const tree: ProcStat[] = [];
  const queue = [self];
  for (let next = queue.shift(); next !== undefined; next = queue.shift()) {
    tree.push(next);
    queue.push(...(children.get(next.pid) ?? []));
  }
  return tree;
}

/** Each live thread's time on CPU in µs, to the nanosecond (/proc/PID/task/TID/schedstat, first field). */
function threadTimes(pid: number, into: Map<string, number>): void {
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return;
  }
  for (const tid of tids) {
    try {
      const ns = Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
      if (Number.isFinite(ns)) into.set(`${pid}/${tid}`, ns / 1000);
    } catch {
      // a thread that just exited: its time is in the process's utime + stime
    }
  }
}

export interface TreeSample {
  /** utime + stime of the tree, exited threads included, in µs (to a clock tick per process). */
  readonly statCpuUs: number;
  /** Per live thread ("pid/tid"), time on CPU in µs (to the nanosecond). */
  readonly threads: ReadonlyMap<string, number>;
  readonly rssBytes: number;
  readonly processes: number;
}

export function sampleTree(root: number): TreeSample {
  const tree = processTree(root);
  const threads = new Map<string, number>();
  for (const p of tree) threadTimes(p.pid, threads);
  return {
    statCpuUs: tree.reduce((sum, p) => sum + p.cpuUs, 0),
    threads,
    rssBytes: tree.reduce((sum, p) => sum + p.rssBytes, 0),
    processes: tree.length,
  };
}

/**
 * CPU the tree used between two samples, in µs: the threads' own clocks (nanoseconds; a thread or process born
 * in between counts whole), unless threads that ended in between took more than two clock ticks with them,
 * which only the processes' utime + stime (to a tick) still hold.
 */
export function cpuDeltaUs(before: TreeSample, after: TreeSample): number {
  let threads = 0;
  for (const [id, us] of after.threads) threads += us - (before.threads.get(id) ?? 0);
  const ticks = after.statCpuUs - before.statCpuUs;
  return ticks - threads > 2 * TICK_US ? ticks : threads;
}

/**
 * A sample taken once the tree has gone quiet (under 2% of a core over `quietMs`, or `maxMs` passed): the
 * closes and frees that follow the client's last operation are counted in the loop that caused them.
 */
export async function settledSample(root: number, quietMs = 40, maxMs = 2000): Promise<TreeSample> {
  const deadline = performance.now() + maxMs;
  let last = sampleTree(root);
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, quietMs));
    const next = sampleTree(root);
    if (cpuDeltaUs(last, next) < quietMs * 20 || performance.now() > deadline) return next;
    last = next;
  }
}
