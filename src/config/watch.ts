import { type FSWatcher, watch } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';

export interface WatchedFile<T> {
  /** The last valid value. */
  readonly current: T;
  /** 1 for the initial load, then +1 on every change of `current`. */
  readonly generation: number;
  /** Re-read now (tests, SIGHUP). Resolves after the re-read was handled. */
  reload(): Promise<void>;
  /** Stops watching. Idempotent. */
  close(): void;
}

export interface WatchFileOptions<T> {
  /** Turns the file's text into a value, throwing a descriptive error if it is invalid. */
  readonly parse: (text: string) => T;
  /** Quiet time after a file system event before re-reading (default 200 ms). */
  readonly debounceMs?: number;
  /** Re-read this often regardless of events, since fs.watch can miss some (default 5000 ms). */
  readonly pollIntervalMs?: number;
  readonly onChange?: (value: T, previous: T) => void;
  /**
   * The file is valid again after a failure, with the content already in force (a broken edit was reverted):
   * nothing changed, but the failure is over.
   */
  readonly onRecover?: () => void;
  /** The file became unreadable or invalid; `current` keeps the last valid value. Once per distinct failure. */
  readonly onError?: (err: Error) => void;
}

/**
 * Loads a file (throwing if it is unreadable or invalid) and follows its changes, keeping the last valid value.
 * The directory is watched rather than the file, because a Kubernetes ConfigMap volume replaces files by
 * swapping a `..data` symlink; a slow unref'd poll catches what fs.watch misses. Nothing here keeps the process
 * alive.
 */
export async function watchFile<T>(file: string, options: WatchFileOptions<T>): Promise<WatchedFile<T>> {
  const path = resolve(file);
  const { parse, debounceMs = 200, pollIntervalMs = 5000, onChange, onRecover, onError } = options;
  let lastText = await readFile(path, 'utf8');
  let current = parse(lastText);
  let generation = 1;
  let lastFailure: string | undefined;
  let closed = false;
  let running: Promise<void> | undefined;
  let again = false;
  let debounce: NodeJS.Timeout | undefined;

  const fail = (key: string, err: Error): void => {
    if (lastFailure === key) return;
    lastFailure = key;
    onError?.(err);
  };

  const check = async (): Promise<void> => {
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (closed) return;
      fail(`read:${e.message}`, new Error(`${file}: cannot read the file: ${e.message}`, { cause: err }));
      return;
    }
    if (closed) return;
    if (text === lastText) {
      if (lastFailure !== undefined) {
        lastFailure = undefined;
        onRecover?.();
      }
      return;
    }
    let value: T;
    try {
      value = parse(text);
    } catch (err) {
      fail(`text:${text}`, err as Error);
      return;
    }
    lastText = text;
    lastFailure = undefined;
    const previous = current;
    current = value;
    generation++;
    try {
      onChange?.(value, previous);
    } catch (err) {
      onError?.(new Error(`${file}: the change handler failed: ${(err as Error).message}`, { cause: err }));
    }
  };

  const reload = async (): Promise<void> => {
    if (closed) return;
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      do {
        again = false;
        await check();
      } while (again && !closed);
    })().finally(() => {
      running = undefined;
    });
    return running;
  };

  const schedule = (): void => {
    if (closed) return;
    if (debounce) clearTimeout(debounce);
    debounce = setTimeout(() => void reload(), debounceMs);
    debounce.unref();
  };

  let watcher: FSWatcher | undefined;
  try {
    const name = basename(path);
    watcher = watch(dirname(path), { persistent: false }, (_event, changed) => {
      // A ConfigMap swap touches `..data`, not the file name; react to both.
      if (changed === null || changed === name || changed.startsWith('..')) schedule();
    });
    watcher.on('error', (err) => {
      // The poll below carries on; report the lost watch once.
      fail(
        `watch:${err.message}`,
        new Error(`${file}: watching the directory failed: ${err.message}`, { cause: err }),
      );
    });
  } catch (err) {
    watcher = undefined;
    const reason = (err as Error).message;
    fail(
      `watch:${reason}`,
      new Error(`${file}: cannot watch the directory (polling only): ${reason}`, { cause: err }),
    );
  }
  const poll = setInterval(() => void reload(), pollIntervalMs);
  poll.unref();

  return {
    get current() {
      return current;
    },
    get generation() {
      return generation;
    },
    reload,
    close() {
      closed = true;
      watcher?.close();
      clearInterval(poll);
      if (debounce) clearTimeout(debounce);
    },
  };
}
