/**
 * Every refusal in the agent is an `AgentError` with a stable `code`, like `SpiffeError` in the SPIFFE layer.
 * Logs key on the code; the message names the file, line and column or the value at fault.
 */

import { formatProblems, type YamlProblem } from '../config/yaml.ts';
import { KspError } from '../spiffe/errors.ts';

export const AgentErrorCode = {
  /** A selector string is not `type:value`, or its type is unknown. */
  Selector: 'ERR_AGENT_SELECTOR',
  /** The registration entries file cannot be read, parsed or validated. */
  Entries: 'ERR_AGENT_ENTRIES',
  /** The agent configuration file is invalid. */
  Config: 'ERR_AGENT_CONFIG',
  /** The calling process could not be identified (it exited, its PID was reused, /proc was unreadable). */
  Attestation: 'ERR_AGENT_ATTESTATION',
  /** The kubelet could not be asked, or did not know the caller's pod. */
  Kubelet: 'ERR_AGENT_KUBELET',
  /** The CA key or certificate files are unusable. */
  Ca: 'ERR_AGENT_CA',
  /** SO_PEERCRED is unavailable (the native addon is not built, or the platform is not Linux). */
  PeerCred: 'ERR_AGENT_PEERCRED',
  /**
   * The socket's directory, or a directory above it, could be changed by a user other than root and the agent:
   * owned by someone else, writable by group or others (a sticky world-writable directory too, for the socket's
   * own directory), reached through someone else's symlink, or not a directory. Whoever can write there could
   * put a fake agent in our place.
   */
  SocketDirectory: 'ERR_AGENT_SOCKET_DIR',
  /**
   * The socket path is taken by something the agent may not replace: a file that is not a socket, a socket of
   * another user, a server that answers on it, or a socket whose liveness cannot be told.
   */
  SocketInUse: 'ERR_AGENT_SOCKET_IN_USE',
  /**
   * The SPIRE server could not be reached, or a call to it failed (unavailable, timed out, an answer that does
   * not parse). The agent keeps serving what it holds and retries.
   */
  Upstream: 'ERR_AGENT_UPSTREAM',
  /**
   * The SPIRE server did not prove it is `spiffe://<trust domain>/spire/server` under the bundle the agent
   * holds (bootstrap bundle at first contact), or refused the agent's attestation evidence.
   */
  UpstreamAuth: 'ERR_AGENT_UPSTREAM_AUTH',
  /** The SPIRE server no longer accepts this agent (banned, or evicted without a way to attest again). */
  Banned: 'ERR_AGENT_BANNED',
} as const;

export type AgentErrorCode = (typeof AgentErrorCode)[keyof typeof AgentErrorCode];

export class AgentError extends KspError {
  declare readonly code: AgentErrorCode;

  constructor(code: AgentErrorCode, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'AgentError';
  }
}

/** A file (entries, config) refused as a whole: every problem with its line and column, one a line. */
export class FileProblemsError extends AgentError {
  readonly file: string;
  readonly problems: readonly YamlProblem[];

  constructor(code: AgentErrorCode, file: string, problems: readonly YamlProblem[]) {
    super(code, formatProblems(file, problems));
    this.name = 'FileProblemsError';
    this.file = file;
    this.problems = problems;
  }
}

export function isAgentError(err: unknown, code?: AgentErrorCode): err is AgentError {
  return err instanceof AgentError && (code === undefined || err.code === code);
}
