/**
 * Every refusal in SPIFFE Federation (serving our bundle, fetching a foreign one, storing it) is a
 * `FederationError` with a stable `code`. Logs and status reports key on the code; the message says what happened.
 */
import { KspError } from '../spiffe/errors.ts';

export const FederationErrorCode = {
  /**
   * A relationship is misconfigured and cannot run: its URL is not `https:` or carries userinfo, an `https_spiffe`
   * relationship has no bootstrap bundle or names an endpoint SPIFFE ID of another trust domain, a refresh bound
   * is out of range.
   */
  Config: 'ERR_FEDERATION_CONFIG',
  /**
   * Fetching from a bundle endpoint failed in transport: connection refused or reset, DNS, a TLS handshake that
   * failed for a reason other than the server's certificate, an HTTP status other than 200 (redirects included:
   * they are not followed), a body over the size limit, not UTF-8 or not JSON, the time limit reached.
   */
  Fetch: 'ERR_FEDERATION_FETCH',
  /**
   * The bundle endpoint could not be authenticated: `https_spiffe`, its X509-SVID is not for the configured
   * endpoint SPIFFE ID or does not chain to the current bundle of that ID's trust domain; `https_web`, its
   * certificate is not trusted (system roots or the configured CA file) or does not name the URL's host.
   */
  Untrusted: 'ERR_FEDERATION_UNTRUSTED',
  /**
   * The endpoint answered, but what it served cannot replace the bundle held: not a valid SPIFFE bundle, no X.509
   * authority in it, or a `spiffe_sequence` lower than the held bundle's (a replay of an older bundle).
   */
  Bundle: 'ERR_FEDERATION_BUNDLE',
  /**
   * Our bundle endpoint server cannot start or cannot take new credentials: unreadable or invalid certificate or
   * key files, a key that does not match its certificate, an address that is in use or cannot be bound.
   */
  Endpoint: 'ERR_FEDERATION_ENDPOINT',
  /** A stored federated bundle file is unreadable or corrupt, or holds another trust domain than its name says. */
  State: 'ERR_FEDERATION_STATE',
} as const;

export type FederationErrorCode = (typeof FederationErrorCode)[keyof typeof FederationErrorCode];

export class FederationError extends KspError {
  declare readonly code: FederationErrorCode;

  constructor(code: FederationErrorCode, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'FederationError';
  }
}

export function isFederationError(err: unknown, code?: FederationErrorCode): err is FederationError {
  return err instanceof FederationError && (code === undefined || err.code === code);
}
