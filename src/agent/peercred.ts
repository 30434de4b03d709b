import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import { AgentError, AgentErrorCode } from './errors.ts';

/** What the kernel recorded about the process at the other end of a Unix socket when it connected. */
export interface PeerCredentials {
  readonly pid: number;
  readonly uid: number;
  readonly gid: number;
}

interface PeerCredAddon {
  peerCred(fd: number): PeerCredentials;
}

let addon: PeerCredAddon | Error | undefined;

function load(): PeerCredAddon {
  if (addon === undefined) {
    try {
      // build/ sits at the package root both for src/ (run from source) and for dist/ (built).
      addon = createRequire(import.meta.url)('../../build/Release/peercred.node') as PeerCredAddon;
    } catch (err) {
      addon = err instanceof Error ? err : new Error(String(err));
    }
  }
  if (addon instanceof Error) {
    throw new AgentError(
      AgentErrorCode.PeerCred,
      `the SO_PEERCRED addon is not available (${addon.message}); build it with "npm rebuild kube-svid-proxy" ` +
        '(needs a C compiler and Python) — the agent cannot identify callers without it',
      { cause: addon },
    );
  }
  return addon;
}

/** Throws ERR_AGENT_PEERCRED early (at agent start) rather than on the first caller. */
export function assertPeerCredAvailable(): void {
  if (process.platform !== 'linux') {
    throw new AgentError(AgentErrorCode.PeerCred, `SO_PEERCRED needs Linux; this is ${process.platform}`);
  }
  load();
}

/**
 * SO_PEERCRED of an accepted Unix-socket connection. The values are fixed at connect() time by the kernel,
 * so the peer cannot change them afterwards; its PID can be reused once it exits, which callers guard
 * against with the process start time.
 */
export function peerCredentials(socket: Socket): PeerCredentials {
  // libuv keeps the descriptor on the handle; Node offers no public accessor for it.
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) {
    throw new AgentError(AgentErrorCode.PeerCred, 'the connection has no file descriptor (already closed?)');
  }
  try {
    return load().peerCred(fd);
  } catch (err) {
    if (err instanceof AgentError) throw err;
    throw new AgentError(AgentErrorCode.PeerCred, `SO_PEERCRED failed: ${(err as Error).message}`, {
      cause: err,
    });
  }
}
