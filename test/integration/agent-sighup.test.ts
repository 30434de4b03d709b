/**
 * The agent command in a child process, driven by signals as an init system would: SIGHUP re-reads every file
 * and never stops it; SIGTERM stops it cleanly. The entries file is reached through a symlink in another
 * directory (its directory watch cannot see the edit) and watchPollInterval is a day, so a change in force after
 * the reload is the SIGHUP's doing.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CLI, cliEnv, runCli } from '../helpers/cli.ts';

interface LogLine {
  level: string;
  msg: string;
  [key: string]: unknown;
}

const uid = process.getuid?.() ?? 0;
const RELOADING = 'agent: reloading every file it reads';
const RELOADED = 'agent: reload done';

function entries(path: string): string {
  return `entries:\n  - spiffeId: spiffe://example.org/${path}\n    selectors: ["unix:uid:${uid}"]\n`;
}

function config(extra = ''): string {
  return [
    'trustDomain: example.org',
    'entriesFile: conf/entries.yaml',
    'stateDir: state',
    'socketPath: sock/agent.sock',
    'watchPollInterval: 24h',
    'logLevel: info',
    extra,
  ].join('\n');
}

describe('kube-svid-proxy agent: SIGHUP and SIGTERM', () => {
  let dir: string;
  let configFile: string;
  let entriesData: string;
  let socketPath: string;
  let child: ChildProcess;
  let exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  const logs: LogLine[] = [];
  let stderr = '';
  let waiters: (() => void)[] = [];

  /** Resolves with the index of the first log line from `from` on that passes `accept`; fails at the deadline. */
  function waitForLog(accept: (line: LogLine) => boolean, what: string, from = 0): Promise<number> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no log line ${what} within 20 s:\n${stderr}`)),
        20_000,
      );
      const check = (): void => {
        const i = logs.findIndex((l, n) => n >= from && accept(l));
        if (i < 0) return;
        clearTimeout(timer);
        waiters = waiters.filter((w) => w !== check);
        resolve(i);
      };
      waiters.push(check);
      check();
    });
  }

  /** Sends SIGHUP and waits for the reload it starts to be done; returns the log index where it started. */
  async function hangUp(): Promise<number> {
    const from = logs.length;
    child.kill('SIGHUP');
    const start = await waitForLog((l) => l.msg === RELOADING, 'reloading', from);
    await waitForLog((l) => l.msg === RELOADED, RELOADED, start);
    return start;
  }

  async function fetchIds(): Promise<string[]> {
    const r = await runCli(['api', 'fetch', 'x509', '--socket', `unix://${socketPath}`, '--json'], cliEnv());
    assert.equal(r.status, 0, r.stderr);
    return (JSON.parse(r.stdout) as { svids: { spiffeId: string }[] }).svids.map((s) => s.spiffeId);
  }

  const running = (): boolean => child.exitCode === null && child.signalCode === null;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-sighup-'));
    mkdirSync(join(dir, 'conf'));
    mkdirSync(join(dir, 'data'));
    entriesData = join(dir, 'data', 'entries.yaml');
    writeFileSync(entriesData, entries('before'));
    symlinkSync(entriesData, join(dir, 'conf', 'entries.yaml'));
    configFile = join(dir, 'agent.yaml');
    writeFileSync(configFile, config());
    socketPath = join(dir, 'sock', 'agent.sock');
    child = spawn(process.execPath, [CLI, 'agent', '--config', configFile], {
      env: cliEnv(),
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    let partial = '';
    child.stderr?.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      const lines = (partial + d).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) if (line.startsWith('{')) logs.push(JSON.parse(line) as LogLine);
      for (const w of [...waiters]) w();
    });
    await Promise.race([
      waitForLog((l) => l.msg === 'agent started', '"agent started"'),
      exited.then(({ code }) => assert.fail(`the agent exited (${code}) before starting:\n${stderr}`)),
    ]);
  });

  after(async () => {
    if (child && running()) {
      child.kill('SIGKILL');
      await exited;
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('SIGHUP re-reads the entries file: an edit made just before is in force once the reload is done', async () => {
    assert.deepEqual(await fetchIds(), ['spiffe://example.org/before']);
    writeFileSync(entriesData, entries('after'));
    const start = await hangUp();
    assert.ok(running(), 'SIGHUP does not stop the agent');
    const reloaded = logs.findIndex((l) => l.msg === 'registration entries reloaded');
    assert.ok(reloaded > start, 'the entries were re-read by the SIGHUP, not before it');
    assert.deepEqual(await fetchIds(), ['spiffe://example.org/after']);
  });

  it('SIGHUP with a broken agent.yaml logs the problems and keeps the running configuration', async () => {
    writeFileSync(configFile, config('bogus: 1\n'));
    const start = await hangUp();
    assert.ok(running());
    const refused = logs.findIndex(
      (l, i) => i > start && l.msg === 'configuration rejected; keeping the running configuration',
    );
    const err = logs[refused]?.err as { code?: string; message?: string } | undefined;
    assert.equal(err?.code, 'ERR_AGENT_CONFIG');
    assert.match(err?.message ?? '', /:7:1: unknown key "bogus"/);
    assert.deepEqual(await fetchIds(), ['spiffe://example.org/after']);
  });

  it('SIGHUP applies logLevel at once and logs a new socketPath as needing a restart', async () => {
    writeFileSync(
      configFile,
      config().replace('sock/agent.sock', 'elsewhere/agent.sock').replace('info', 'debug'),
    );
    const start = await hangUp();
    const after = logs.slice(start);
    const restart = after.find(
      (l) => l.msg === 'configuration changed in keys that need a restart; keeping their running values',
    );
    assert.deepEqual(restart?.keys, ['socketPath']);
    const level = after.find((l) => l.msg === 'log level changed');
    assert.deepEqual([level?.from, level?.to], ['info', 'debug']);
    assert.equal(existsSync(join(dir, 'elsewhere')), false);
    assert.deepEqual(await fetchIds(), ['spiffe://example.org/after']);
    assert.ok(running());
  });

  it('SIGTERM stops it with exit 0, logs "agent stopped" and removes its socket', async () => {
    child.kill('SIGTERM');
    const { code, signal } = await exited;
    assert.equal(signal, null);
    assert.equal(code, 0, stderr);
    assert.ok(logs.some((l) => l.msg === 'agent stopped'));
    assert.equal(existsSync(socketPath), false);
  });
});
