/**
 * A state directory: where the agent keeps what must survive a restart (its CA keys and chain, its JWT keys,
 * federated bundles it fetched or was given). Keys are secrets, so the directory is 0700 and every file 0600,
 * both owned by the user the agent runs as; anything looser is refused, naming the path and the fix, rather
 * than silently used or silently tightened (a loose mode means someone else may already have read the keys).
 * Every write is atomic: a temporary file beside the target, written, fsynced and renamed over it, then the
 * directory fsynced, so a crash leaves either the old file or the new one, never half of one.
 */
import { randomBytes } from 'node:crypto';
import { constants, type Stats } from 'node:fs';
import { lstat, mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { KspError } from '../spiffe/errors.ts';

export const STATE_DIR_MODE = 0o700;
export const STATE_FILE_MODE = 0o600;

/** The stable code of every refusal here. */
export const STATE_ERROR_CODE = 'ERR_STATE_DIR';

export class StateDirError extends KspError {
  readonly path: string;

  constructor(path: string, message: string, options?: ErrorOptions) {
    super(STATE_ERROR_CODE, message, options);
    this.name = 'StateDirError';
    this.path = path;
  }
}

const uid = (): number => process.getuid?.() ?? 0;

function checkOwnerAndMode(path: string, st: Stats, what: 'directory' | 'file'): void {
  const wanted = what === 'directory' ? STATE_DIR_MODE : STATE_FILE_MODE;
  if (what === 'directory' ? !st.isDirectory() : !st.isFile()) {
    throw new StateDirError(
      path,
      `state ${what} ${path} is not a ${what === 'directory' ? 'directory' : 'regular file'} (symlinks are refused)`,
    );
  }
  if (st.uid !== uid()) {
    throw new StateDirError(
      path,
      `state ${what} ${path} is owned by uid ${st.uid}, not by the agent's uid ${uid()}: chown it or choose another stateDir`,
    );
  }
  if ((st.mode & 0o077) !== 0) {
    throw new StateDirError(
      path,
      `state ${what} ${path} has mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}; it holds private keys and must be ` +
        `${wanted.toString(8).padStart(4, '0')} (chmod ${wanted.toString(8)} ${path}). If others could read it, treat the keys as exposed`,
    );
  }
}

/** A directory of state files; `open` creates it (0700) or checks it. Subdirectories are opened the same way. */
export class StateDir {
  readonly path: string;

  private constructor(path: string) {
    this.path = path;
  }

  /**
   * Opens (creating it and its parents if missing, unless `create` is false) a state directory, refusing a loose
   * or foreign one.
   */
  static async open(path: string, options: { create?: boolean } = {}): Promise<StateDir> {
    const dir = resolve(path);
    let st: Stats;
    try {
      st = await lstat(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new StateDirError(dir, `cannot inspect state directory ${dir}: ${(err as Error).message}`, {
          cause: err,
        });
      }
      if (options.create === false) {
        throw new StateDirError(dir, `state directory ${dir} does not exist (is it the agent's stateDir?)`, {
          cause: err,
        });
      }
      try {
        await mkdir(dirname(dir), { recursive: true, mode: 0o755 });
        await mkdir(dir, { mode: STATE_DIR_MODE });
      } catch (cause) {
        if ((cause as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw new StateDirError(dir, `cannot create state directory ${dir}: ${(cause as Error).message}`, {
            cause,
          });
        }
      }
      st = await lstat(dir);
    }
    checkOwnerAndMode(dir, st, 'directory');
    return new StateDir(dir);
  }

  /** A subdirectory, created or checked like the top one. */
  sub(name: string): Promise<StateDir> {
    return StateDir.open(join(this.path, checkName(name)));
  }

  /** Reads a state file; undefined when it does not exist. A loose or foreign file is refused. */
  async read(name: string): Promise<Buffer | undefined> {
    const file = join(this.path, checkName(name));
    let st: Stats;
    try {
      st = await lstat(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new StateDirError(file, `cannot inspect state file ${file}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    checkOwnerAndMode(file, st, 'file');
    try {
      return await readFile(file);
    } catch (err) {
      throw new StateDirError(file, `cannot read state file ${file}: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }

  /** Writes a state file atomically with mode 0600. */
  async write(name: string, data: string | Uint8Array): Promise<void> {
    const file = join(this.path, checkName(name));
    const tmp = join(this.path, `.${name}.${randomBytes(6).toString('hex')}.tmp`);
    try {
      const handle = await open(
        tmp,
        constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
        STATE_FILE_MODE,
      );
      try {
        await handle.writeFile(data);
        await handle.sync();
      } finally {
        await handle.close();
      }
      await rename(tmp, file);
      const dir = await open(this.path, constants.O_RDONLY | constants.O_DIRECTORY);
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
    } catch (err) {
      await rm(tmp, { force: true }).catch(() => undefined);
      throw new StateDirError(file, `cannot write state file ${file}: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }

  /** Removes a state file; no error when it is already gone. */
  async remove(name: string): Promise<void> {
    const file = join(this.path, checkName(name));
    try {
      await rm(file, { force: true });
    } catch (err) {
      throw new StateDirError(file, `cannot remove state file ${file}: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }

  /** Names of the regular files in the directory (not temporaries, not subdirectories), sorted. */
  async list(): Promise<string[]> {
    const entries = await readdir(this.path, { withFileTypes: true });
    return entries
      .filter((e) => e.isFile() && !e.name.startsWith('.'))
      .map((e) => e.name)
      .sort();
  }
}

/** A state file name is one path component of safe characters: never a path a caller could steer elsewhere. */
function checkName(name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name) || name.length > 255) {
    throw new StateDirError(name, `"${name}" is not a valid state file name`);
  }
  return name;
}
