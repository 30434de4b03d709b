import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';

/**
 * The CPUs this process can use: the CPUs it may run on (`os.availableParallelism()`, which follows the affinity
 * mask), capped by the cgroup's CPU quota when there is one, rounded up. A pod limited to 1500m on a 64-core node
 * gets 2, not 64: the quota, not the node's size, is what the workers share.
 */
export function availableCpus(
  read: (file: string) => string | undefined = readOptional,
  parallelism: number = availableParallelism(),
): number {
  const quota = cgroupQuota(read);
  return Math.max(1, quota === undefined ? parallelism : Math.min(parallelism, Math.ceil(quota)));
}

/** The cgroup's CPU quota in CPUs (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`), or undefined. */
function cgroupQuota(read: (file: string) => string | undefined): number | undefined {
  const v2 = read('/sys/fs/cgroup/cpu.max')?.trim().split(/\s+/);
  if (v2 !== undefined) {
    const [max, period] = v2;
    if (max === 'max' || max === undefined) return undefined;
    return ratio(max, period);
  }
  const quota = read('/sys/fs/cgroup/cpu/cpu.cfs_quota_us')?.trim();
  if (quota === undefined || quota === '-1') return undefined;
  return ratio(quota, read('/sys/fs/cgroup/cpu/cpu.cfs_period_us')?.trim());
}

function ratio(quota: string, period: string | undefined): number | undefined {
  const q = Number(quota);
  const p = Number(period);
  return Number.isFinite(q) && Number.isFinite(p) && q > 0 && p > 0 ? q / p : undefined;
}

function readOptional(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}
