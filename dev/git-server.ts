/**
 * A git smart-HTTP server on loopback, for tests: node:http in front of `git http-backend` run as a CGI program,
 * so what a client (the git CLI, go-git in Flux's source-controller) talks to is git's own server side, over
 * both the v0 and the v2 wire protocol. Anonymous and read-only: http-backend refuses receive-pack without an
 * authenticated REMOTE_USER, so tests change repositories with `commitFiles`, not by pushing over HTTP.
 *
 *   const repos = mkdtempSync(join(tmpdir(), 'git-'));
 *   const sha = await initRepo(repos, 'app', { 'deploy/cm.yaml': '...' });  // <repos>/app.git, branch main
 *   const server = await startGitServer({ root: repos });                    // server.url: http://127.0.0.1:<port>
 *   // clone `${server.url}/app.git`
 *   await commitFiles(repos, 'app', { 'deploy/cm.yaml': '...', 'old.yaml': null }, 'second');
 *   await server.close();
 *
 * Facts of git this relies on:
 * - http-backend serves only repositories under GIT_PROJECT_ROOT that are exported: GIT_HTTP_EXPORT_ALL exports
 *   all of them (else each needs a git-daemon-export-ok file).
 * - It reads the `Git-Protocol` request header from HTTP_GIT_PROTOCOL (CGI passes every header as HTTP_*); that
 *   header is how a client asks for protocol v2, so without it every client would fall back to v0. Likewise
 *   HTTP_CONTENT_ENCODING: clients gzip large upload-pack requests.
 * - Without CONTENT_LENGTH (a chunked request body) it reads the body to EOF.
 * - It answers with CGI headers (`Status: 404 Not Found`, absent for 200), a blank line, then the body.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

/** One request the server answered, for tests that must show a client really fetched from it. */
export interface GitRequest {
  readonly method: string;
  /** Path and query, as received. */
  readonly url: string;
  /** The `Git-Protocol` request header (`version=2` when the client asked for v2). */
  readonly gitProtocol?: string;
  /** Status sent to the client. */
  readonly status: number;
}

export interface GitServer {
  /** `http://127.0.0.1:<port>`; a repository `<root>/<name>.git` is at `${url}/<name>.git`. */
  readonly url: string;
  /** Every answered request, in order. */
  readonly requests: readonly GitRequest[];
  /** Stops listening, drops open connections and kills running http-backend processes. */
  close(): Promise<void>;
}

/**
 * The environment git runs in here: the caller's, minus variables that would point git somewhere else (GIT_DIR
 * from a hook, GIT_PROTOCOL of an outer request), and without the user's or system's git configuration, so that a
 * developer's `commit.gpgsign` or `init.defaultBranch` cannot change what a test sees.
 */
function gitEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith('GIT_')) env[key] = value;
  return { ...env, GIT_CONFIG_NOSYSTEM: '1', GIT_CONFIG_GLOBAL: '/dev/null', ...extra };
}

/** CGI meta-variables for one request (RFC 3875), plus http-backend's own. */
function cgiEnv(root: string, req: IncomingMessage, url: URL): NodeJS.ProcessEnv {
  const env = gitEnv({
    GIT_PROJECT_ROOT: root,
    GIT_HTTP_EXPORT_ALL: '1',
    GATEWAY_INTERFACE: 'CGI/1.1',
    SERVER_PROTOCOL: `HTTP/${req.httpVersion}`,
    REQUEST_METHOD: req.method ?? 'GET',
    // CGI's PATH_INFO is decoded; http-backend itself refuses paths that leave GIT_PROJECT_ROOT.
    PATH_INFO: decodeURIComponent(url.pathname),
    QUERY_STRING: url.search.slice(1),
    REMOTE_ADDR: req.socket.remoteAddress ?? '127.0.0.1',
  });
  const contentType = req.headers['content-type'];
  if (contentType !== undefined) env.CONTENT_TYPE = contentType;
  const contentLength = req.headers['content-length'];
  if (contentLength !== undefined) env.CONTENT_LENGTH = contentLength;
  for (const [name, value] of Object.entries(req.headers)) {
    if (value === undefined || name === 'content-type' || name === 'content-length') continue;
    env[`HTTP_${name.toUpperCase().replaceAll('-', '_')}`] = Array.isArray(value) ? value.join(', ') : value;
  }
  return env;
}

/** Splits a CGI header block into the status and the headers to send. */
function parseCgiHeaders(block: string): { status: number; headers: Map<string, string[]> } {
  let status = 200;
  const headers = new Map<string, string[]>();
  for (const line of block.split(/\r?\n/)) {
    if (line === '') continue;
    const colon = line.indexOf(':');
    if (colon <= 0) throw new Error(`malformed CGI header line ${JSON.stringify(line)}`);
    const name = line.slice(0, colon).trim();
    const value = line.slice(colon + 1).trim();
    if (name.toLowerCase() === 'status') {
      status = Number.parseInt(value, 10);
      if (!Number.isInteger(status) || status < 100 || status > 599)
        throw new Error(`bad CGI Status: ${value}`);
      continue;
    }
    headers.set(name, [...(headers.get(name) ?? []), value]);
  }
  return { status, headers };
}

/** Where the CGI header block ends (the blank line) and its body begins, or undefined while incomplete. */
function headerEnd(buffer: Buffer): { end: number; bodyStart: number } | undefined {
  const crlf = buffer.indexOf('\r\n\r\n');
  const lf = buffer.indexOf('\n\n');
  if (crlf !== -1 && (lf === -1 || crlf < lf)) return { end: crlf, bodyStart: crlf + 4 };
  if (lf !== -1) return { end: lf, bodyStart: lf + 2 };
  return undefined;
}

export async function startGitServer(opts: { root: string }): Promise<GitServer> {
  const children = new Set<ChildProcess>();
  const requests: GitRequest[] = [];

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const gitProtocol = req.headers['git-protocol'];
    const record = (status: number): void => {
      requests.push({
        method: req.method ?? 'GET',
        url: req.url ?? '/',
        ...(typeof gitProtocol === 'string' ? { gitProtocol } : {}),
        status,
      });
    };
    const fail = (status: number, message: string): void => {
      record(status);
      if (res.headersSent) {
        res.destroy();
        return;
      }
      res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8' }).end(`${message}\n`);
    };

    let env: NodeJS.ProcessEnv;
    try {
      env = cgiEnv(opts.root, req, url);
    } catch (err) {
      fail(400, (err as Error).message); // a path that does not decode
      return;
    }
    const child = spawn('git', ['http-backend'], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    children.add(child);
    child.on('close', () => children.delete(child));
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-4000);
    });
    child.on('error', (err) => fail(502, `git http-backend: ${err.message}`));
    // The body goes to http-backend as it comes; a client that gives up must not leave the child waiting.
    req.pipe(child.stdin);
    child.stdin.on('error', () => {}); // http-backend may exit before reading a body it refuses
    req.on('aborted', () => child.kill('SIGKILL'));
    res.on('close', () => {
      if (!res.writableFinished) child.kill('SIGKILL');
    });

    let head: Buffer = Buffer.alloc(0);
    const onHead = (chunk: Buffer): void => {
      head = Buffer.concat([head, chunk]);
      const found = headerEnd(head);
      if (found === undefined) return;
      child.stdout.off('data', onHead);
      let parsed: ReturnType<typeof parseCgiHeaders>;
      try {
        parsed = parseCgiHeaders(head.subarray(0, found.end).toString('latin1'));
      } catch (err) {
        child.kill('SIGKILL');
        fail(502, `git http-backend: ${(err as Error).message}`);
        return;
      }
      record(parsed.status);
      // An array is sent as one header line per value, so a single value needs no special case.
      for (const [name, values] of parsed.headers) res.setHeader(name, values);
      res.writeHead(parsed.status);
      const rest = head.subarray(found.bodyStart);
      if (rest.length > 0) res.write(rest);
      child.stdout.pipe(res);
    };
    child.stdout.on('data', onHead);
    child.on('close', (code, signal) => {
      // Exited before finishing its headers: nothing useful was sent, so say why.
      if (!res.headersSent && !res.destroyed) {
        fail(502, `git http-backend exited (${signal ?? code}) without a response: ${stderr.trim()}`);
      }
    });
  };

  const server = createServer(handle);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      for (const child of children) child.kill('SIGKILL');
      await closed;
    },
  };
}

async function git(args: readonly string[], cwd?: string): Promise<string> {
  const { stdout } = await execFileP('git', [...args], {
    ...(cwd === undefined ? {} : { cwd }),
    env: gitEnv(),
    maxBuffer: 64 * 1024 * 1024,
  });
  return stdout.trim();
}

const AUTHOR = ['-c', 'user.name=kube-svid-proxy tests', '-c', 'user.email=tests@kube-svid-proxy.invalid'];

/**
 * Writes `files` (path → content; null removes the path) into a work tree, commits everything and pushes `main`
 * to the bare repository. Returns the new commit's SHA.
 */
async function commitAndPush(
  work: string,
  bare: string,
  files: Readonly<Record<string, string | null>>,
  message: string,
): Promise<string> {
  for (const [path, content] of Object.entries(files)) {
    const target = join(work, path);
    if (content === null) rmSync(target, { force: true });
    else {
      mkdirSync(dirname(target), { recursive: true });
      writeFileSync(target, content);
    }
  }
  await git(['add', '--all', '.'], work);
  await git([...AUTHOR, 'commit', '--quiet', '--allow-empty', '-m', message], work);
  await git(['push', '--quiet', bare, 'HEAD:refs/heads/main'], work);
  return git(['rev-parse', 'HEAD'], work);
}

function barePath(root: string, name: string): string {
  return join(root, `${name}.git`);
}

/**
 * Creates the bare repository `<root>/<name>.git` whose branch `main` (also its HEAD, so a plain clone checks it
 * out) holds one commit with `files` (paths may have directories). Returns that commit's SHA.
 */
export async function initRepo(root: string, name: string, files: Record<string, string>): Promise<string> {
  const bare = barePath(root, name);
  await git(['init', '--quiet', '--bare', '--initial-branch=main', bare]);
  const work = mkdtempSync(join(tmpdir(), `ksp-git-${name}-`));
  try {
    await git(['init', '--quiet', '--initial-branch=main', work]);
    return await commitAndPush(work, bare, files, `initial commit of ${name}`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/**
 * Adds a commit on `main` of `<root>/<name>.git`: each path of `files` set to its content, or removed when null;
 * other files are kept. Returns the new commit's SHA.
 */
export async function commitFiles(
  root: string,
  name: string,
  files: Record<string, string | null>,
  message: string,
): Promise<string> {
  const bare = barePath(root, name);
  const work = mkdtempSync(join(tmpdir(), `ksp-git-${name}-`));
  try {
    await git(['clone', '--quiet', '--branch', 'main', bare, work]);
    return await commitAndPush(work, bare, files, message);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
