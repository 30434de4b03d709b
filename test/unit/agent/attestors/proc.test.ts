import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  readCgroup,
  readMountinfo,
  readProcessStartTime,
  readProcessStatus,
} from '../../../../src/agent/attestors/proc.ts';
import { AgentErrorCode, isAgentError } from '../../../../src/agent/errors.ts';

/** A /proc/<pid>/stat line with `comm` and field 22 (starttime) as given; other fields are plausible filler. */
function statLine(pid: number, comm: string, startTime: string): string {
  // Fields 3..21 (state .. itrealvalue), then 22 starttime, then a few more.
  const fields3to21 = ['S', '1', String(pid), String(pid), '0', '-1', '4194560', '1034', '0', '0', '0'];
  fields3to21.push('12', '3', '0', '0', '20', '0', '1', '0');
  return `${pid} (${comm}) ${fields3to21.join(' ')} ${startTime} 226787328 2113 18446744073709551615\n`;
}

const STATUS = [
  'Name:\tweb server',
  'Umask:\t0022',
  'State:\tS (sleeping)',
  'Tgid:\t4242',
  'Pid:\t4242',
  'PPid:\t1',
  'Uid:\t1000\t1001\t1002\t1003',
  'Gid:\t2000\t2001\t2002\t2003',
  'FDSize:\t64',
  'Groups:\t4 24 27 1000 ',
  'VmPeak:\t  10000 kB',
  '',
].join('\n');

const isAttestationError = (err: unknown): boolean => isAgentError(err, AgentErrorCode.Attestation);

describe('procfs readers', () => {
  let root: string;

  const writeProc = (pid: number, name: string, text: string): void => {
    mkdirSync(join(root, String(pid)), { recursive: true });
    writeFileSync(join(root, String(pid), name), text);
  };

  before(() => {
    root = mkdtempSync(join(tmpdir(), 'ksp-proc-'));
    writeProc(100, 'stat', statLine(100, 'nginx', '123456'));
    writeProc(101, 'stat', statLine(101, 'my worker', '987654321987'));
    writeProc(102, 'stat', statLine(102, 'a) b (c) 9 9', '555'));
    writeProc(103, 'stat', '103 (short) S 1 103\n');
    writeProc(104, 'stat', statLine(104, 'evil', 'notanumber'));
    writeProc(105, 'stat', statLine(999, 'liar', '42'));
    writeProc(200, 'status', STATUS);
    writeProc(201, 'status', STATUS.replace('Groups:\t4 24 27 1000 ', 'Groups:\t'));
    writeProc(202, 'status', STATUS.replace(/^Uid:.*$/m, ''));
    writeProc(203, 'status', STATUS.replace(/^Gid:.*$/m, 'Gid:\tx y'));
    writeProc(300, 'cgroup', '0::/kubepods.slice/x.scope\n');
    writeProc(300, 'mountinfo', '25 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n');
  });

  after(() => {
    rmSync(root, { recursive: true, force: true });
  });

  describe('readProcessStartTime', () => {
    it('returns field 22 of the stat line', async () => {
      assert.equal(await readProcessStartTime(100, root), 123456n);
    });

    it('copes with a command name holding spaces', async () => {
      assert.equal(await readProcessStartTime(101, root), 987654321987n);
    });

    it('copes with a command name holding parentheses, by splitting after the last ")"', async () => {
      assert.equal(await readProcessStartTime(102, root), 555n);
    });

    it('refuses a truncated stat line, naming the pid', async () => {
      await assert.rejects(readProcessStartTime(103, root), (err: unknown) => {
        assert.ok(isAttestationError(err));
        assert.match((err as Error).message, /103/);
        assert.match((err as Error).message, /starttime/);
        return true;
      });
    });

    it('refuses a non-numeric start time', async () => {
      await assert.rejects(readProcessStartTime(104, root), isAttestationError);
    });

    it('refuses a stat file that names another pid', async () => {
      await assert.rejects(readProcessStartTime(105, root), isAttestationError);
    });

    it('reports a process that is gone as ERR_AGENT_ATTESTATION naming the pid', async () => {
      await assert.rejects(readProcessStartTime(777, root), (err: unknown) => {
        assert.ok(isAttestationError(err));
        assert.match((err as Error).message, /process 777 is gone/);
        return true;
      });
    });

    it('refuses pids that are not positive integers', async () => {
      for (const pid of [0, -1, 1.5, Number.NaN]) {
        await assert.rejects(readProcessStartTime(pid, root), isAttestationError);
      }
    });

    it('reads the real start time of this process from /proc', async () => {
      const start = await readProcessStartTime(process.pid);
      assert.ok(start > 0n);
      const stat = readFileSync(`/proc/${process.pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      assert.equal(start, BigInt(fields[19] ?? ''));
    });
  });

  describe('readProcessStatus', () => {
    it('returns the Uid, Gid and Groups lines', async () => {
      assert.deepEqual(await readProcessStatus(200, root), {
        uids: [1000, 1001, 1002, 1003],
        gids: [2000, 2001, 2002, 2003],
        groups: [4, 24, 27, 1000],
      });
    });

    it('returns no supplementary groups for an empty Groups line', async () => {
      assert.deepEqual((await readProcessStatus(201, root)).groups, []);
    });

    it('refuses a status file without a Uid line', async () => {
      await assert.rejects(readProcessStatus(202, root), isAttestationError);
    });

    it('refuses a Gid line that is not numbers', async () => {
      await assert.rejects(readProcessStatus(203, root), isAttestationError);
    });

    it('reports a missing process as ERR_AGENT_ATTESTATION', async () => {
      await assert.rejects(readProcessStatus(777, root), isAttestationError);
    });

    it('reads this process from the real /proc', async () => {
      const status = await readProcessStatus(process.pid);
      assert.equal(status.uids[0], process.getuid?.());
      assert.equal(status.uids[1], process.geteuid?.());
      assert.equal(status.gids[0], process.getgid?.());
      // getgroups(2) may add the effective gid to the list; /proc only shows the supplementary groups.
      const groups = new Set(process.getgroups?.() ?? []);
      for (const gid of status.groups) {
        assert.ok(groups.has(gid), `supplementary gid ${gid} is not in process.getgroups()`);
      }
    });
  });

  describe('readCgroup and readMountinfo', () => {
    it('return the raw text', async () => {
      assert.equal(await readCgroup(300, root), '0::/kubepods.slice/x.scope\n');
      assert.equal(await readMountinfo(300, root), '25 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n');
    });

    it('report a missing process as ERR_AGENT_ATTESTATION', async () => {
      await assert.rejects(readCgroup(777, root), isAttestationError);
      await assert.rejects(readMountinfo(777, root), isAttestationError);
    });
  });
});
