/**
 * Hot reload of the policy file: a valid edit replaces the compiled policy whole; an invalid or unreadable file
 * is reported (once per distinct failure) and the last good policy stays in force.
 */
import { type WatchedFile, watchFile } from '../config/watch.ts';
import { PolicyError } from './errors.ts';
import type { Policy } from './model.ts';
import { parsePolicy } from './parse.ts';

export interface PolicyWatcher {
  /** The last valid policy. */
  readonly current: Policy;
  /** 1 for the initial load, then +1 on every change of `current`. */
  readonly generation: number;
  /** The file's text `current` was parsed from (handed to the proxy's worker processes, which parse it again). */
  readonly text: string;
  /** Re-reads the file now (tests, SIGHUP); resolves once handled. */
  reload(): Promise<void>;
  /** Stops watching. Idempotent. */
  close(): void;
}

export interface WatchPolicyOptions {
  /** Quiet time after a file system event before re-reading. Default 200 ms. */
  readonly debounceMs?: number;
  /** Re-read this often regardless of events, since `fs.watch` can miss some. Default 5000 ms. */
  readonly pollIntervalMs?: number;
  /** Called after `current` changed to a new valid policy (`generation` is already incremented). */
  readonly onChange?: (policy: Policy, previous: Policy) => void;
  /** The file is valid again with the policy already in force (a broken edit was reverted). */
  readonly onRecover?: () => void;
  /**
   * The file became unreadable or invalid (`PolicyError`, code `ERR_POLICY`, with `problems` when invalid);
   * `current` keeps the last valid policy. Called once per distinct failure, not on every re-read.
   */
  readonly onError?: (err: PolicyError) => void;
}

function asPolicyError(file: string, err: Error, prefix = ''): PolicyError {
  if (err instanceof PolicyError) return err;
  const message = err.message.startsWith(`${file}: `) ? err.message : `${file}: ${prefix}${err.message}`;
  return new PolicyError(file, [], message, { cause: err });
}

/**
 * Loads a policy file (throwing `PolicyError` if it is unreadable or invalid) and follows its changes. The
 * directory is watched, not the file, since a Kubernetes ConfigMap volume replaces the file by swapping its
 * `..data` symlink; a slow unref'd poll catches what `fs.watch` misses. Nothing here keeps the process alive.
 */
export async function watchPolicy(file: string, options: WatchPolicyOptions = {}): Promise<PolicyWatcher> {
  const { debounceMs = 200, pollIntervalMs = 5000, onChange, onRecover, onError } = options;
  let watched: WatchedFile<Policy>;
  const texts = new WeakMap<Policy, string>();
  try {
    watched = await watchFile(file, {
      parse: (text) => {
        const policy = parsePolicy(text, { file });
        texts.set(policy, text);
        return policy;
      },
      debounceMs,
      pollIntervalMs,
      ...(onChange !== undefined && { onChange }),
      ...(onRecover !== undefined && { onRecover }),
      onError: (err) => onError?.(asPolicyError(file, err)),
    });
  } catch (err) {
    throw asPolicyError(
      file,
      err instanceof Error ? err : new Error(String(err)),
      'cannot read the policy file: ',
    );
  }
  return {
    get current() {
      return watched.current;
    },
    get generation() {
      return watched.generation;
    },
    get text() {
      return texts.get(watched.current) ?? '';
    },
    reload: () => watched.reload(),
    close: () => watched.close(),
  };
}
