import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { availableCpus } from '../../../src/config/cpus.ts';

const files =
  (entries: Record<string, string>) =>
  (file: string): string | undefined =>
    entries[file];

describe('availableCpus: the workers default (workers: auto)', () => {
  it('is the CPUs the process may run on when no cgroup quota limits it', () => {
    assert.equal(availableCpus(files({}), 8), 8);
    assert.equal(availableCpus(files({ '/sys/fs/cgroup/cpu.max': 'max 100000\n' }), 8), 8);
    assert.equal(availableCpus(files({ '/sys/fs/cgroup/cpu/cpu.cfs_quota_us': '-1\n' }), 8), 8);
  });

  it('follows a cgroup v2 quota, rounded up, never above the CPUs or below 1', () => {
    assert.equal(availableCpus(files({ '/sys/fs/cgroup/cpu.max': '150000 100000\n' }), 64), 2);
    assert.equal(availableCpus(files({ '/sys/fs/cgroup/cpu.max': '10000 100000\n' }), 64), 1);
    assert.equal(availableCpus(files({ '/sys/fs/cgroup/cpu.max': '1600000 100000\n' }), 4), 4);
  });

  it('follows a cgroup v1 quota', () => {
    const v1 = {
      '/sys/fs/cgroup/cpu/cpu.cfs_quota_us': '250000',
      '/sys/fs/cgroup/cpu/cpu.cfs_period_us': '100000',
    };
    assert.equal(availableCpus(files(v1), 64), 3);
  });

  it('ignores a quota it cannot read', () => {
    assert.equal(availableCpus(files({ '/sys/fs/cgroup/cpu.max': 'garbage\n' }), 6), 6);
  });
});
