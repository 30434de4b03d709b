/**
 * Refusals of the client mode (`kube-svid-proxy client`): a `ClientError` with a stable code, like every
 * component's errors. The codes also reach the local caller, in the Kubernetes Status the listener answers with.
 */
import { formatProblems, type YamlProblem } from '../config/yaml.ts';
import { KspError } from '../spiffe/errors.ts';

export const ClientErrorCode = {
  /** `client.yaml` is invalid; every problem as `file:line:col`, and `client` does not start. */
  Config: 'ERR_CLIENT_CONFIG',
  /** No X.509-SVID to present: the Workload API has not given one, or withdrew it (503 to the caller). */
  NoSvid: 'ERR_CLIENT_NO_SVID',
  /**
   * The spoke's server is not who it must be: its certificate is not an X.509-SVID, does not verify against the
   * bundle of its trust domain, or names a SPIFFE ID the spoke's `serverId` / `trustDomain` does not allow (502).
   */
  ServerRefused: 'ERR_CLIENT_SERVER_REFUSED',
  /** The spoke could not be reached, or the exchange with it broke (502), or took too long to connect (504). */
  Upstream: 'ERR_CLIENT_UPSTREAM',
  /** A limit refused the request or connection (`limits.*`; 503 to the caller, named in the message). */
  Limit: 'ERR_CLIENT_LIMIT',
  /** The local request is one the client mode does not forward (CONNECT, a target not in origin form, h2c upgrade): 400. */
  BadRequest: 'ERR_CLIENT_BAD_REQUEST',
} as const;

export type ClientErrorCode = (typeof ClientErrorCode)[keyof typeof ClientErrorCode];

export class ClientError extends KspError {
  declare readonly code: ClientErrorCode;
  /** The HTTP status the local caller gets, when not the code's usual one (504 for a connect timeout). */
  readonly status: number | undefined;

  constructor(code: ClientErrorCode, message: string, options?: ErrorOptions & { status?: number }) {
    super(code, message, options);
    this.name = 'ClientError';
    this.status = options?.status;
  }
}

/** `client.yaml` refused as a whole: every problem with its line and column, one a line. */
export class ClientConfigError extends ClientError {
  readonly file: string;
  readonly problems: readonly YamlProblem[];

  constructor(file: string, problems: readonly YamlProblem[]) {
    super(ClientErrorCode.Config, formatProblems(file, problems));
    this.name = 'ClientConfigError';
    this.file = file;
    this.problems = problems;
  }
}
