/**
 * `kube-svid-proxy serve` in a child process, driven by signals as an init system would, against an HTTPS
 * STAND-IN for kube-apiserver (HTTP/2; it records the headers that reach it and holds watches open until the
 * test ends): SIGHUP re-reads every file and never stops the proxy; SIGTERM turns /readyz unready, sends
 * GOAWAY, stops accepting, drains up to timeouts.shutdownDrain and exits 0; a second SIGTERM exits 1 at once.
 *
 * The policy and token files are reached through symlinks in another directory (their directory watches cannot
 * see the edit, and the poll runs every 5 s), so a change in force right after a SIGHUP is the SIGHUP's doing.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import http2, { type IncomingHttpHeaders } from 'node:http2';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import type { AuditEvent } from '../../src/proxy/audit.ts';
import { CLI, cliEnv } from '../helpers/cli.ts';
import {
  clientTls,
  type Http2StandIn,
  listenHttp2StandIn,
  type ProxyFiles,
  proxyConfigYaml,
  requestStatus,
  until,
  writeProxyFiles,
} from '../helpers/proxy-fixture.ts';

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const RELOADING = 'proxy: reloading every file it reads';
const RELOADED = 'proxy: reload done';
const PODS = '/api/v1/namespaces/default/pods';
const WATCH = '/api/v1/namespaces/default/configmaps?watch=true';

interface LogLine {
  level: string;
  msg: string;
  [key: string]: unknown;
}

function policyYaml(user: string): string {
  return `rules:\n  - name: argocd\n    match:\n      id: ${ARGOCD}\n    identity:\n      user: ${user}\n`;
}

/** The stand-in for kube-apiserver: records what reaches it, answers lists, holds watches open. */
class UpstreamStandIn {
  readonly recorded: { path: string; headers: IncomingHttpHeaders }[] = [];
  #standIn: Http2StandIn | undefined;

  async listen(pki: DevPki): Promise<number> {
    this.#standIn = await listenHttp2StandIn(
      pki,
      // kube-apiserver answers HTTP/1.1 too (the proxy's readiness probe and upgrades use it).
      { allowHTTP1: true },
      (req, res) => {
        this.recorded.push({ path: req.url, headers: req.headers });
        res.writeHead(200, { 'content-type': 'application/json' });
        if (req.url.includes('watch=true')) {
          // A watch: headers and one event now, the rest never.
          res.write('{"type":"ADDED"}\n');
          return;
        }
        res.end('{"kind":"PodList","items":[]}');
      },
    );
    return this.#standIn.port;
  }

  /** The last request for `path` that reached the stand-in. */
  last(path: string): IncomingHttpHeaders | undefined {
    return this.recorded.findLast((r) => r.path === path)?.headers;
  }

  async close(): Promise<void> {
    await this.#standIn?.close();
  }
}

/** One `serve` child process, its JSON log lines (stderr) and audit Events (stdout), and the ports it bound. */
class ServeProcess {
  readonly logs: LogLine[] = [];
  /** The audit Events, `audit.file: "-"` (the default). */
  readonly audit: AuditEvent[] = [];
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  readonly #child: ChildProcess;
  #stderr = '';
  #waiters: (() => void)[] = [];
  port = 0;
  adminPort = 0;

  constructor(configFile: string) {
    this.#child = spawn(process.execPath, [CLI, 'serve', '--config', configFile], {
      env: cliEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.exited = new Promise((resolve) =>
      this.#child.on('exit', (code, signal) => resolve({ code, signal })),
    );
    let auditPartial = '';
    this.#child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      this.#stderr += `[stdout] ${d}`;
      const lines = (auditPartial + d).split('\n');
      auditPartial = lines.pop() ?? '';
      for (const line of lines) if (line.startsWith('{')) this.audit.push(JSON.parse(line) as AuditEvent);
      for (const w of [...this.#waiters]) w();
    });
    let partial = '';
    this.#child.stderr?.setEncoding('utf8').on('data', (d: string) => {
      this.#stderr += d;
      const lines = (partial + d).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) if (line.startsWith('{')) this.logs.push(JSON.parse(line) as LogLine);
      for (const w of [...this.#waiters]) w();
    });
  }

  async started(): Promise<void> {
    const i = await Promise.race([
      this.waitForLog((l) => l.msg === 'proxy started', '"proxy started"'),
      this.exited.then(({ code }) => assert.fail(`serve exited (${code}) before starting:\n${this.#stderr}`)),
    ]);
    const line = this.logs[i] as LogLine & { listen: string; admin: { port: number } };
    this.port = Number(line.listen.slice(line.listen.lastIndexOf(':') + 1));
    this.adminPort = line.admin.port;
    assert.ok(this.port > 0 && this.adminPort > 0, JSON.stringify(line));
  }

  get running(): boolean {
    return this.#child.exitCode === null && this.#child.signalCode === null;
  }

  kill(signal: NodeJS.Signals): void {
    this.#child.kill(signal);
  }

  /** The index of the first log line from `from` on that passes `accept`; fails at the deadline. */
  waitForLog(accept: (line: LogLine) => boolean, what: string, from = 0): Promise<number> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no log line ${what} within 20 s:\n${this.#stderr}`)),
        20_000,
      );
      const check = (): void => {
        const i = this.logs.findIndex((l, n) => n >= from && accept(l));
        if (i < 0) return;
        clearTimeout(timer);
        this.#waiters = this.#waiters.filter((w) => w !== check);
        resolve(i);
      };
      this.#waiters.push(check);
      check();
    });
  }

  /** Index of the first line with message `msg` after `from`, or -1. */
  find(msg: string | RegExp, from = 0): number {
    return this.logs.findIndex(
      (l, n) => n >= from && (typeof msg === 'string' ? l.msg === msg : msg.test(l.msg)),
    );
  }

  /** Sends SIGHUP, waits for the reload it starts to be done; returns the log index where it started. */
  async hangUp(): Promise<number> {
    const from = this.logs.length;
    this.kill('SIGHUP');
    const start = await this.waitForLog((l) => l.msg === RELOADING, RELOADING, from);
    await this.waitForLog((l) => l.msg === RELOADED, RELOADED, start);
    return start;
  }

  async stop(): Promise<void> {
    if (this.running) {
      this.kill('SIGKILL');
      await this.exited;
    }
  }

  get output(): string {
    return this.#stderr;
  }
}

/** GET on the admin port, on a connection of its own. */
function adminGet(port: number, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        body += d;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
  });
}

/** The error code of a plain TCP connect to the data port ('connected' when it was accepted). */
function tcpConnect(port: number): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve('connected');
    });
    socket.once('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
  });
}

/** The proxy's files in a temporary directory; the policy and the token are symlinks into data/. */
class ServeFiles {
  readonly dir: string;
  readonly configFile: string;
  readonly policyData: string;
  readonly tokenData: string;
  readonly #files: ProxyFiles;
  #upstreamPort = 0;

  constructor(pki: DevPki) {
    this.#files = writeProxyFiles('ksp-serve-signals-', pki, { upstreamCa: pki.spoke.rootPem });
    this.dir = this.#files.dir;
    this.configFile = this.#files.configFile;
    mkdirSync(join(this.dir, 'conf'));
    mkdirSync(join(this.dir, 'data'));
    this.policyData = this.#files.write(join('data', 'policy.yaml'), policyYaml('argocd'));
    this.tokenData = this.#files.write(join('data', 'token'), 'proxy-token\n');
    symlinkSync(this.policyData, join(this.dir, 'conf', 'policy.yaml'));
    symlinkSync(this.tokenData, join(this.dir, 'conf', 'token'));
  }

  /**
   * Ten lines: a key appended lands on line 11, which the rejected-reload test names. One process (`workers: 1`):
   * the log lines these tests read come from the one front door; test/integration/workers.test.ts covers workers.
   */
  config(upstreamPort = this.#upstreamPort, listen = '127.0.0.1:0'): string {
    this.#upstreamPort = upstreamPort;
    return proxyConfigYaml(this.#files, {
      upstreamUrl: `https://127.0.0.1:${upstreamPort}`,
      listen,
      policyFile: 'conf/policy.yaml',
      tokenFile: 'conf/token',
      extra: 'logLevel: info\nworkers: 1\ntimeouts: { shutdownDrain: 3s }\n',
    });
  }

  writeConfig(text: string): void {
    writeFileSync(this.configFile, text);
  }

  remove(): void {
    this.#files.remove();
  }
}

describe('kube-svid-proxy serve: SIGHUP and SIGTERM', { timeout: 120_000 }, () => {
  let pki: DevPki;
  let upstream: UpstreamStandIn;
  let upstreamPort: number;
  const sessions: http2.ClientHttp2Session[] = [];
  const cleanups: (() => Promise<void> | void)[] = [];

  before(async () => {
    pki = await makeDevPki();
    upstream = new UpstreamStandIn();
    upstreamPort = await upstream.listen(pki);
  });

  after(async () => {
    for (const s of sessions) s.destroy();
    for (const cleanup of cleanups.reverse()) await cleanup();
    await upstream?.close();
  });

  async function startServe(): Promise<{ files: ServeFiles; proxy: ServeProcess }> {
    const files = new ServeFiles(pki);
    cleanups.push(() => files.remove());
    files.writeConfig(files.config(upstreamPort));
    const proxy = new ServeProcess(files.configFile);
    cleanups.push(() => proxy.stop());
    await proxy.started();
    return { files, proxy };
  }

  function connect(port: number): http2.ClientHttp2Session {
    const session = http2.connect(`https://127.0.0.1:${port}`, clientTls(pki, pki.good.clientArgocd));
    session.on('error', () => {});
    sessions.push(session);
    return session;
  }

  describe('SIGHUP re-reads every file and keeps serving', () => {
    let files: ServeFiles;
    let proxy: ServeProcess;
    let session: http2.ClientHttp2Session;

    before(async () => {
      ({ files, proxy } = await startServe());
      session = connect(proxy.port);
    });

    it('an edit of the policy made just before SIGHUP is in force for the next request', async () => {
      assert.equal((await requestStatus(session, PODS)).status, 200);
      assert.equal(upstream.last(PODS)?.['impersonate-user'], 'argocd');

      writeFileSync(files.policyData, policyYaml('argocd-renamed'));
      const start = await proxy.hangUp();
      assert.ok(proxy.running, 'SIGHUP does not stop the proxy');
      assert.ok(
        proxy.find('policy reloaded; open connections use it from their next request', start) > start,
        `expected the policy re-read by the SIGHUP:\n${proxy.output}`,
      );

      // The same connection, its next request: mapped to the new user.
      assert.equal((await requestStatus(session, PODS)).status, 200);
      assert.equal(upstream.last(PODS)?.['impersonate-user'], 'argocd-renamed');
      // The audit line is written once the exchange is over, possibly after the client saw the end.
      await until('an audit Event naming the new user', () =>
        proxy.audit.some(
          (e) =>
            e.annotations['kube-svid-proxy/path'] === PODS &&
            e.annotations['kube-svid-proxy/decision'] === 'allow' &&
            e.impersonatedUser?.username === 'argocd-renamed',
        ),
      );
    });

    it('a changed listen is logged as needing a restart, and the proxy keeps serving on the old port', async () => {
      files.writeConfig(files.config(upstreamPort, '127.0.0.1:1'));
      const start = await proxy.hangUp();
      const i = proxy.find(/^configuration changed in keys that take effect only after a restart/, start);
      assert.ok(i > start, `expected the restart warning after the SIGHUP:\n${proxy.output}`);
      assert.deepEqual(proxy.logs[i]?.keys, ['listen']);
      assert.ok(proxy.running);
      assert.equal(
        (await requestStatus(connect(proxy.port), PODS)).status,
        200,
        'still serving on the old port',
      );

      files.writeConfig(files.config(upstreamPort));
      const again = await proxy.hangUp();
      assert.ok(proxy.find('configuration re-read: no change that needs a restart', again) > again);
    });

    it('a broken configuration file is rejected on reload, and the proxy keeps serving', async () => {
      files.writeConfig(`${files.config(upstreamPort)}bogus: 1\n`);
      const start = await proxy.hangUp();
      const i = proxy.find(/^configuration file rejected on reload/, start);
      assert.ok(i > start, `expected the rejection after the SIGHUP:\n${proxy.output}`);
      const err = proxy.logs[i]?.err as { message?: string } | undefined;
      assert.match(err?.message ?? '', /:11:1: unknown key "bogus"/);
      assert.ok(proxy.running);
      assert.equal((await requestStatus(session, PODS)).status, 200);

      files.writeConfig('trustDomain: [unclosed\n');
      const broken = await proxy.hangUp();
      assert.ok(proxy.find(/^configuration file rejected on reload/, broken) > broken);
      assert.ok(proxy.running);
      assert.equal((await requestStatus(session, PODS)).status, 200);
      files.writeConfig(files.config(upstreamPort));
    });

    it('a rotated token file is re-read: the stand-in sees the new bearer token on the next request', async () => {
      assert.equal((await requestStatus(session, PODS)).status, 200);
      assert.equal(upstream.last(PODS)?.authorization, 'Bearer proxy-token');

      writeFileSync(files.tokenData, 'rotated-token\n');
      const start = await proxy.hangUp();
      assert.ok(
        proxy.find('upstream credential re-read; new requests use it', start) > start,
        `expected the credential re-read after the SIGHUP:\n${proxy.output}`,
      );
      assert.equal((await requestStatus(session, PODS)).status, 200);
      assert.equal(upstream.last(PODS)?.authorization, 'Bearer rotated-token');
    });

    it('a broken SVID file is refused on SIGHUP, and new connections still get the last good SVID', async () => {
      const certFile = join(files.dir, 'proxy.crt');
      const good = readFileSync(certFile, 'utf8');
      const from = proxy.logs.length;
      writeFileSync(certFile, '-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n');
      await proxy.hangUp();
      // The file's own watcher may see the edit first; either way the bad SVID is refused, never served.
      await proxy.waitForLog(
        (l) => l.msg === 'SVID files rejected; keeping the last good SVID',
        'the SVID files rejected',
        from,
      );
      assert.ok(proxy.running);
      assert.equal(
        (await requestStatus(connect(proxy.port), PODS)).status,
        200,
        'a new TLS connection is served',
      );
      writeFileSync(certFile, good);
    });

    it('is still running after every SIGHUP, with nothing logged as a failed reload', () => {
      assert.ok(proxy.running);
      assert.equal(proxy.find('proxy: reload failed'), -1);
      assert.equal(proxy.find('proxy stopped'), -1);
    });
  });

  describe('SIGTERM drains, then stops', () => {
    it('with a watch open: /readyz 503, GOAWAY, new connections refused, deadline reached, exit 0', async () => {
      const { proxy } = await startServe();
      assert.equal((await adminGet(proxy.adminPort, '/readyz')).status, 200);
      const session = connect(proxy.port);
      const goaway = new Promise<void>((resolve) => session.once('goaway', () => resolve()));
      assert.equal((await requestStatus(session, WATCH)).status, 200, 'the watch is open through the proxy');

      const from = proxy.logs.length;
      proxy.kill('SIGTERM');
      const draining = await proxy.waitForLog((l) => /^draining: /.test(l.msg), 'draining', from);
      assert.equal(proxy.logs[draining]?.longRunning, 1);
      assert.equal(proxy.logs[draining]?.connections, 1);

      // While the watch holds the drain open (the stand-in never ends it):
      const ready = await adminGet(proxy.adminPort, '/readyz');
      assert.equal(ready.status, 503);
      const checks = (JSON.parse(ready.body) as { checks: { name: string; ok: boolean; detail: string }[] })
        .checks;
      assert.deepEqual(
        checks.find((c) => c.name === 'shutdown'),
        { name: 'shutdown', ok: false, detail: 'draining for shutdown' },
      );
      await goaway;
      assert.equal(await tcpConnect(proxy.port), 'ECONNREFUSED');
      assert.ok(proxy.running, 'still draining');

      const { code, signal } = await proxy.exited;
      assert.equal(signal, null);
      assert.equal(code, 0, proxy.output);
      const order = [
        proxy.find('proxy: stopping', from),
        proxy.find('shutting down: /readyz now answers 503', from),
        draining,
        proxy.find('drain deadline reached (timeouts.shutdownDrain): closing the connections left', from),
        proxy.find('proxy stopped', from),
      ];
      assert.ok(
        order.every((i, n) => i >= 0 && (n === 0 || i > (order[n - 1] as number))),
        `log lines out of order or missing (${order}):\n${proxy.output}`,
      );
      assert.equal(proxy.find(/^drained: /, from), -1);
      assert.equal(proxy.find(/handles still open/, from), -1, 'nothing was left open after stopping');
    });

    it('with no request open: every connection finishes, "drained", exit 0', async () => {
      const { proxy } = await startServe();
      // A connection that made a request and holds nothing now.
      const session = connect(proxy.port);
      assert.equal((await requestStatus(session, PODS)).status, 200);

      const from = proxy.logs.length;
      proxy.kill('SIGTERM');
      const { code, signal } = await proxy.exited;
      assert.equal(signal, null);
      assert.equal(code, 0, proxy.output);
      const drained = proxy.find('drained: every client connection finished', from);
      assert.ok(drained > proxy.find(/^draining: /, from), proxy.output);
      assert.ok(proxy.find('proxy stopped', from) > drained, proxy.output);
      assert.equal(proxy.find(/^drain deadline reached/, from), -1);
      assert.equal(proxy.find(/handles still open/, from), -1, 'nothing was left open after stopping');
    });

    it('a second SIGTERM while draining exits 1 at once', async () => {
      const { proxy } = await startServe();
      const session = connect(proxy.port);
      assert.equal((await requestStatus(session, WATCH)).status, 200);

      const from = proxy.logs.length;
      proxy.kill('SIGTERM');
      await proxy.waitForLog((l) => /^draining: /.test(l.msg), 'draining', from);
      proxy.kill('SIGTERM');
      const { code } = await proxy.exited;
      assert.equal(code, 1, proxy.output);
      assert.ok(proxy.find('proxy: second signal while stopping; exiting now', from) >= 0, proxy.output);
      assert.equal(proxy.find('proxy stopped', from), -1);
    });
  });
});
