/**
 * Every refusal of the proxy itself is a `ProxyError` with a stable `code`, like `SpiffeError` in the SPIFFE
 * layer; the SPIFFE and policy layers' refusals keep their own classes and codes.
 */
import { formatProblems, type YamlProblem } from '../config/yaml.ts';
import { KspError } from '../spiffe/errors.ts';

export const ProxyErrorCode = {
  /** `proxy.yaml` is invalid, or a file it names (credential, audit log) is unusable. */
  Config: 'ERR_PROXY_CONFIG',
  /** A limit refused an allowed request (per identity 429, full upstream pool 503, header timeout 504). */
  Limit: 'ERR_PROXY_LIMIT',
  /** Forwarding an allowed request failed otherwise (unreachable 503, broken exchange 502, shutting down). */
  Upstream: 'ERR_UPSTREAM',
  /** The TLS handshake failed without a code of its own. */
  TlsHandshake: 'ERR_TLS_HANDSHAKE',
  /** The client finished the handshake without a certificate. */
  NoClientCertificate: 'ERR_TLS_NO_CLIENT_CERT',
  /** Authentication failed for a reason without a code of its own (never the client's fault). */
  Authentication: 'ERR_AUTHENTICATION',
  /** A request target that could not be read, for a reason without a code of its own. */
  BadRequest: 'ERR_BAD_REQUEST',
} as const;

export type ProxyErrorCode = (typeof ProxyErrorCode)[keyof typeof ProxyErrorCode];

export class ProxyError extends KspError {
  declare readonly code: ProxyErrorCode;

  constructor(code: ProxyErrorCode, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'ProxyError';
  }
}

/** `proxy.yaml` refused as a whole: every problem with its line and column, one a line. */
export class ProxyConfigError extends ProxyError {
  readonly file: string;
  readonly problems: readonly YamlProblem[];

  constructor(file: string, problems: readonly YamlProblem[]) {
    super(ProxyErrorCode.Config, formatProblems(file, problems));
    this.name = 'ProxyConfigError';
    this.file = file;
    this.problems = problems;
  }
}

export function isProxyError(err: unknown, code?: ProxyErrorCode): err is ProxyError {
  return err instanceof ProxyError && (code === undefined || err.code === code);
}
