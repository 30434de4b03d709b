/**
 * What the Workload API client refuses or reports about the *content* of what the agent sent, with stable codes
 * like `SpiffeError` in the SPIFFE layer. Transport failures (gRPC status codes) stay `WorkloadApiError`s.
 * Logs, metrics and tests key on the code; the message is for people, names the SPIFFE ID and never holds keys.
 */
import { KspError } from '../spiffe/errors.ts';

export const WorkloadErrorCode = {
  /**
   * The agent ended the X.509-SVID stream with PermissionDenied: the caller is no longer entitled to the SVIDs
   * it held (say, its registration entry was removed). `X509Source.svid()` throws this until SVIDs come again.
   */
  SvidWithdrawn: 'ERR_WORKLOAD_SVID_WITHDRAWN',
  /**
   * An X.509-SVID in a response is malformed, expired or not yet valid, badly signed, or does not chain to the
   * bundle of its trust domain sent with it. The whole response is refused; the last good one stays in use.
   */
  SvidRefused: 'ERR_WORKLOAD_SVID_REFUSED',
  /** A JWT-SVID from FetchJWTSVID is malformed, expired, for another audience or another SPIFFE ID. */
  JwtSvidRefused: 'ERR_WORKLOAD_JWT_SVID_REFUSED',
  /** A response is malformed otherwise (no SVID, a bad bundle, a bad trust domain key); the last good stays. */
  ResponseRefused: 'ERR_WORKLOAD_RESPONSE_REFUSED',
  /**
   * A warning, not a refusal: one key of a JWT bundle was ignored as the specifications require (unknown `kty`,
   * a `use` other than `jwt-svid`, a key type or curve that cannot verify a JWT-SVID); the rest of the bundle
   * applies.
   */
  KeyIgnored: 'ERR_WORKLOAD_KEY_IGNORED',
} as const;

export type WorkloadErrorCode = (typeof WorkloadErrorCode)[keyof typeof WorkloadErrorCode];

export class WorkloadError extends KspError {
  override readonly name = 'WorkloadError';
  declare readonly code: WorkloadErrorCode;
  /** The SPIFFE ID concerned, when there is one. */
  readonly spiffeId: string | undefined;

  constructor(code: WorkloadErrorCode, message: string, options?: { cause?: unknown; spiffeId?: string }) {
    super(code, message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.spiffeId = options?.spiffeId;
  }
}

export function isWorkloadError(err: unknown, code?: WorkloadErrorCode): err is WorkloadError {
  return err instanceof WorkloadError && (code === undefined || err.code === code);
}
