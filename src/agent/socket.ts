/**
 * The Workload API socket's path: checked before the agent binds it, and removed at the end only if it is still
 * the socket the agent bound.
 *
 * Whoever can write the socket's directory, or any directory above it, can swap the socket for a fake agent that
 * hands workloads (the proxy among them) an attacker's trust bundle. So every directory from / down to the
 * socket's own must be owned by root or by the agent's uid and not writable by group or others. Two allowances,
 * both safe: a directory ABOVE the socket's may be a sticky shared one such as /tmp (owned by root or us), since
 * the sticky bit stops others from renaming or removing the next directory down, which must itself pass; and
 * symlinks on the way are followed if each link is owned by root or us (the directory that holds it has passed
 * already). Once the whole chain passes nobody else can change it, so check-then-bind is race-free.
 */
import type { BigIntStats, Stats } from 'node:fs';
import { chmod, lstat, mkdir, readlink, unlink } from 'node:fs/promises';
import net from 'node:net';
import { basename, dirname, isAbsolute, join } from 'node:path';
import { AgentError, AgentErrorCode } from './errors.ts';

/** Identity of the socket file the server bound: what it may remove at the end, and nothing else. */
export interface SocketFileId {
  readonly dev: bigint;
  readonly ino: bigint;
}

/** What `prepareSocketPath` found at the socket path, and where the path really leads. */
export interface PreparedSocketPath {
  /** `free`: nothing there; `stale`: a socket of ours nobody answers on, which may be replaced. */
  readonly state: 'free' | 'stale';
  /** The socket path with every symlink and `..` resolved as the kernel would, through checked directories. */
  readonly realPath: string;
}

const MAX_SYMLINKS = 40;

/** Directories the agent creates let in whoever the socket mode lets connect (search only): 0755 for 0777. */
export function socketDirectoryMode(socketMode: number): number {
  return 0o700 | ((socketMode & 0o070) !== 0 ? 0o050 : 0) | ((socketMode & 0o007) !== 0 ? 0o005 : 0);
}

function effectiveUid(): number {
  return process.geteuid?.() ?? 0;
}

const octal = (mode: number): string => `0${(mode & 0o7777).toString(8).padStart(3, '0')}`;
const owner = (uid: number): string => (uid === 0 ? 'root' : `uid ${uid}`);

/**
 * Makes sure the socket's directory exists and that only root and the agent's uid can change it or any directory
 * above it, creating missing directories with `directoryMode`, owned by the agent. Returns the directory's real
 * path. Throws ERR_AGENT_SOCKET_DIR naming the path at fault, its owner and mode, and the fix.
 */
export async function secureSocketDirectory(
  socketPath: string,
  options: { directoryMode?: number } = {},
): Promise<string> {
  const uid = effectiveUid();
  const mode = options.directoryMode ?? 0o755;
  const trusted = (who: number): boolean => who === 0 || who === uid;
  const who = uid === 0 ? "root (the agent's user)" : `root and the agent's user (uid ${uid})`;
  const fail = (path: string, st: Stats | undefined, problem: string, fix: string): never => {
    const what = st === undefined ? path : `${path} (owner ${owner(st.uid)}, mode ${octal(st.mode)})`;
    const why =
      st === undefined
        ? ''
        : ` Only ${who} may be able to change the socket's directory and the directories above it, or anyone ` +
          'else could replace the socket with a fake agent.';
    throw new AgentError(
      AgentErrorCode.SocketDirectory,
      `socket ${socketPath}: ${what} ${problem}.${why} ${fix}`,
    );
  };
  const check = (path: string, st: Stats, own: boolean): void => {
    if (!st.isDirectory()) fail(path, st, 'is not a directory', 'Choose another socketPath.');
    if (!trusted(st.uid)) {
      fail(
        path,
        st,
        `is owned by ${owner(st.uid)}`,
        `Make root or the agent its owner (chown ${uid} ${path}), or put the socket in a directory of the ` +
          "agent's own such as /run/kube-svid-proxy.",
      );
    }
    if ((st.mode & 0o022) === 0) return;
    if (own) {
      fail(
        path,
        st,
        'is writable by group or others',
        (st.mode & 0o1000) !== 0
          ? 'A shared sticky directory such as /tmp cannot hold the socket (anyone may create its name first); ' +
              "use a directory of the agent's own such as /run/kube-svid-proxy."
          : `Remove the write bits (chmod go-w ${path}) or use a directory such as /run/kube-svid-proxy.`,
      );
    }
    if ((st.mode & 0o1000) === 0) {
      fail(
        path,
        st,
        'is writable by group or others and not sticky',
        `Remove the write bits: chmod go-w ${path}.`,
      );
    }
  };

  // A path walk as the kernel does it (no lexical clean-up first: `link/..` is the parent of the link's target),
  // checking each directory and symlink before going through it, and creating what is missing inside
  // directories that passed.
  const absolute = isAbsolute(socketPath) ? socketPath : `${process.cwd()}/${socketPath}`;
  const pending = components(dirname(absolute));
  let current = '/';
  let links = 0;
  check(current, await lstat(current), pending.length === 0);
  while (pending.length > 0) {
    const name = pending.pop() as string;
    if (name === '.') continue;
    if (name === '..') {
      current = dirname(current); // already checked on the way down
      continue;
    }
    const path = join(current, name);
    let st = await lstat(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      return fail(path, undefined, `cannot be examined (${err.code ?? err.message})`, 'Check the path.');
    });
    if (st === undefined) {
      try {
        await mkdir(path, { mode });
        await chmod(path, mode); // mkdir's mode is masked by the umask
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        if (e.code !== 'EEXIST') {
          fail(
            path,
            undefined,
            `cannot be created (${e.code ?? e.message})`,
            `Create it beforehand, owned by the agent: install -d -o ${uid} -m ${octal(mode)} ${path}.`,
          );
        }
      }
      st = await lstat(path);
    }
    if (st.isSymbolicLink()) {
      if (!trusted(st.uid)) {
        fail(path, st, `is a symlink owned by ${owner(st.uid)}`, 'Give socketPath without that symlink.');
      }
      if (++links > MAX_SYMLINKS) fail(path, st, 'leads through too many symlinks', 'Check the path.');
      const target = await readlink(path);
      if (isAbsolute(target)) current = '/';
      pending.push(...components(target));
      continue;
    }
    check(path, st, false);
    current = path;
  }
  // The socket's own directory, by the stricter rule: a sticky bit does not stop others creating the name.
  check(current, await lstat(current), true);
  return current;
}

/** Path components, last first (a stack to pop). */
function components(path: string): string[] {
  return path
    .split('/')
    .filter((c) => c !== '')
    .reverse();
}

/**
 * Checks the directory chain (creating the directory if needed) and what is at the socket path: nothing, or a
 * stale socket of ours that nobody answers on (the agent may replace it). Refuses, with ERR_AGENT_SOCKET_IN_USE,
 * a file that is not a socket, another user's socket, and a socket a server answers on or might.
 */
export async function prepareSocketPath(
  socketPath: string,
  options: { directoryMode?: number } = {},
): Promise<PreparedSocketPath> {
  const realPath = join(await secureSocketDirectory(socketPath, options), basename(socketPath));
  const fail = (message: string): never => {
    throw new AgentError(AgentErrorCode.SocketInUse, `socket ${socketPath}: ${message}`);
  };
  const existing = await lstat(realPath).catch(() => undefined);
  if (existing === undefined) return { state: 'free', realPath };
  if (!existing.isSocket()) fail('the path exists and is not a socket; refusing to replace it');
  const uid = effectiveUid();
  if (existing.uid !== uid) {
    fail(`a socket of ${owner(existing.uid)} is there; the agent replaces only a stale socket of its own`);
  }
  // Only a refused connection proves the socket is stale; any other error (EAGAIN: a live server's backlog is
  // full, EACCES) leaves the question open, and then we refuse rather than unlink someone's live socket.
  const probe = await new Promise<string>((resolve) => {
    const socket = net.connect(realPath);
    socket.once('connect', () => {
      socket.destroy();
      resolve('live');
    });
    socket.once('error', (err: NodeJS.ErrnoException) =>
      resolve(err.code === 'ECONNREFUSED' ? 'stale' : (err.code ?? err.message)),
    );
  });
  if (probe === 'live') fail('another server is listening on it');
  if (probe !== 'stale') fail(`cannot tell whether another server is listening on it (${probe})`);
  return { state: 'stale', realPath };
}

/** The identity of the file at `path` (not following a symlink). */
export async function socketFileId(path: string): Promise<SocketFileId> {
  const st: BigIntStats = await lstat(path, { bigint: true });
  return { dev: st.dev, ino: st.ino };
}

/**
 * Removes the socket at `path` only if it is still the file `id` names: whatever else is there now (someone
 * else's socket, a file) stays. Returns what it found.
 */
export async function removeSocketFile(
  path: string,
  id: SocketFileId,
): Promise<'removed' | 'gone' | 'replaced'> {
  const st = await lstat(path, { bigint: true }).catch(() => undefined);
  if (st === undefined) return 'gone';
  if (st.dev !== id.dev || st.ino !== id.ino) return 'replaced';
  await unlink(path).catch(() => {});
  return 'removed';
}
