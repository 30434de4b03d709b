import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readlinkSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseIdNames, UnixAttestor } from '../../../../src/agent/attestors/unix.ts';
import { AgentErrorCode, isAgentError } from '../../../../src/agent/errors.ts';
import { formatSelector, type Selector } from '../../../../src/agent/selectors.ts';

const PASSWD = [
  '# local users',
  'root:x:0:0:root:/root:/bin/bash',
  'daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin',
  'web:x:1000:1000:Web Server,,,:/home/web:/bin/bash',
  'webdup:x:1000:1000:second name for uid 1000:/home/web:/bin/bash',
  '+nisuser::::::',
  'broken line without colons',
  '',
].join('\n');

const GROUP = [
  'root:x:0:',
  'adm:x:4:syslog,web',
  'sudo:x:27:web',
  'web:x:1000:',
  'docker:x:998:web',
  '',
].join('\n');

function status(groups: string): string {
  return [
    'Name:\tweb',
    'Uid:\t1000\t1000\t1000\t1000',
    'Gid:\t1000\t1000\t1000\t1000',
    `Groups:\t${groups}`,
    '',
  ].join('\n');
}

const strings = (selectors: Selector[]): string[] => selectors.map(formatSelector);
const isAttestationError = (err: unknown): boolean => isAgentError(err, AgentErrorCode.Attestation);

describe('UnixAttestor', () => {
  let dir: string;
  let procRoot: string;
  let etcRoot: string;
  let binary: string;
  const binaryBytes = Buffer.from('#!/bin/false\nthis stands in for an executable\n');

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-unix-'));
    procRoot = join(dir, 'proc');
    etcRoot = join(dir, 'etc');
    mkdirSync(etcRoot, { recursive: true });
    writeFileSync(join(etcRoot, 'passwd'), PASSWD);
    writeFileSync(join(etcRoot, 'group'), GROUP);
    binary = join(dir, 'usr-bin-web');
    writeFileSync(binary, binaryBytes);

    const proc = (pid: number, groups: string): string => {
      const p = join(procRoot, String(pid));
      mkdirSync(p, { recursive: true });
      writeFileSync(join(p, 'status'), status(groups));
      return p;
    };
    symlinkSync(binary, join(proc(4242, '4 27 998 5555 1000 '), 'exe'));
    proc(4343, '');
    symlinkSync(join(dir, 'does-not-exist'), join(proc(4444, ''), 'exe'));
  });

  after(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  it('emits uid, gid, names and supplementary groups, sorted', async () => {
    const attestor = new UnixAttestor({ procRoot, etcRoot });
    assert.equal(attestor.name, 'unix');
    const selectors = await attestor.attest({ pid: 4242, uid: 1000, gid: 1000 });
    assert.ok(selectors.every((s) => s.type === 'unix'));
    assert.deepEqual(strings(selectors), [
      'unix:gid:1000',
      'unix:group:web',
      'unix:supplementary_gid:1000',
      'unix:supplementary_gid:27',
      'unix:supplementary_gid:4',
      'unix:supplementary_gid:5555',
      'unix:supplementary_gid:998',
      'unix:supplementary_group:adm',
      'unix:supplementary_group:docker',
      'unix:supplementary_group:sudo',
      'unix:supplementary_group:web',
      'unix:uid:1000',
      'unix:user:web',
    ]);
  });

  it('takes uid and gid from the caller (the kernel), not from /proc', async () => {
    const attestor = new UnixAttestor({ procRoot, etcRoot });
    const selectors = strings(await attestor.attest({ pid: 4343, uid: 0, gid: 4 }));
    assert.deepEqual(selectors, ['unix:gid:4', 'unix:group:adm', 'unix:uid:0', 'unix:user:root']);
  });

  it('emits no user or group name for ids without one', async () => {
    const attestor = new UnixAttestor({ procRoot, etcRoot });
    const selectors = strings(await attestor.attest({ pid: 4343, uid: 31337, gid: 31337 }));
    assert.deepEqual(selectors, ['unix:gid:31337', 'unix:uid:31337']);
  });

  it('emits only ids when there is no passwd or group file', async () => {
    const attestor = new UnixAttestor({ procRoot, etcRoot: join(dir, 'no-etc') });
    const selectors = strings(await attestor.attest({ pid: 4242, uid: 1000, gid: 1000 }));
    assert.ok(!selectors.some((s) => s.startsWith('unix:user:') || s.includes('group:')));
    assert.ok(selectors.includes('unix:supplementary_gid:27'));
  });

  it('adds the executable path when asked, without hashing by default', async () => {
    const attestor = new UnixAttestor({ procRoot, etcRoot, discoverWorkloadPath: true });
    const selectors = strings(await attestor.attest({ pid: 4242, uid: 1000, gid: 1000 }));
    assert.ok(selectors.includes(`unix:path:${binary}`));
    assert.ok(!selectors.some((s) => s.startsWith('unix:sha256:')));
  });

  it('adds the SHA-256 of the executable when it fits the size limit', async () => {
    const attestor = new UnixAttestor({
      procRoot,
      etcRoot,
      discoverWorkloadPath: true,
      workloadSizeLimit: binaryBytes.length,
    });
    const selectors = strings(await attestor.attest({ pid: 4242, uid: 1000, gid: 1000 }));
    const digest = createHash('sha256').update(binaryBytes).digest('hex');
    assert.ok(selectors.includes(`unix:sha256:${digest}`));
    assert.deepEqual(selectors, [...selectors].sort());
  });

  it('refuses an executable over the size limit, naming size and limit', async () => {
    const attestor = new UnixAttestor({
      procRoot,
      etcRoot,
      discoverWorkloadPath: true,
      workloadSizeLimit: 10,
    });
    await assert.rejects(attestor.attest({ pid: 4242, uid: 1000, gid: 1000 }), (err: unknown) => {
      assert.ok(isAttestationError(err));
      assert.match((err as Error).message, new RegExp(`${binaryBytes.length} bytes`));
      assert.match((err as Error).message, /limit of 10 bytes/);
      return true;
    });
  });

  it('fails when the executable cannot be opened', async () => {
    const attestor = new UnixAttestor({
      procRoot,
      etcRoot,
      discoverWorkloadPath: true,
      workloadSizeLimit: 100,
    });
    await assert.rejects(attestor.attest({ pid: 4444, uid: 1000, gid: 1000 }), isAttestationError);
  });

  it('fails when the executable path cannot be read', async () => {
    const attestor = new UnixAttestor({ procRoot, etcRoot, discoverWorkloadPath: true });
    await assert.rejects(attestor.attest({ pid: 4343, uid: 1000, gid: 1000 }), isAttestationError);
  });

  it('reports a process that is gone as ERR_AGENT_ATTESTATION', async () => {
    const attestor = new UnixAttestor({ procRoot, etcRoot });
    await assert.rejects(attestor.attest({ pid: 9999, uid: 1000, gid: 1000 }), (err: unknown) => {
      assert.ok(isAttestationError(err));
      assert.match((err as Error).message, /9999/);
      return true;
    });
  });

  it('refuses a negative size limit', () => {
    assert.throws(
      () => new UnixAttestor({ workloadSizeLimit: -1 }),
      (err: unknown) => isAgentError(err, AgentErrorCode.Config),
    );
  });

  it('attests this very process against the real /proc and /etc', async () => {
    const uid = process.getuid?.() ?? 0;
    const gid = process.getgid?.() ?? 0;
    const attestor = new UnixAttestor({ discoverWorkloadPath: true, workloadSizeLimit: 1 << 30 });
    const selectors = strings(await attestor.attest({ pid: process.pid, uid, gid }));
    assert.ok(selectors.includes(`unix:uid:${uid}`));
    assert.ok(selectors.includes(`unix:gid:${gid}`));
    const users = parseIdNames(readFileSync('/etc/passwd', 'utf8'));
    const user = users.get(uid);
    if (user !== undefined) {
      assert.ok(selectors.includes(`unix:user:${user}`));
    }
    const exe = readlinkSync(`/proc/${process.pid}/exe`);
    assert.ok(selectors.includes(`unix:path:${exe}`));
    const digest = createHash('sha256').update(readFileSync(exe)).digest('hex');
    assert.ok(selectors.includes(`unix:sha256:${digest}`));
  });
});

describe('parseIdNames', () => {
  it('maps ids to the first name given, skipping comments, NIS lines and junk', () => {
    const names = parseIdNames(PASSWD);
    assert.deepEqual(
      [...names],
      [
        [0, 'root'],
        [1, 'daemon'],
        [1000, 'web'],
      ],
    );
  });
});
