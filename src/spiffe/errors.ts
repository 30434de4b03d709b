/**
 * Every rejection in kube-svid-proxy's SPIFFE layer is a `SpiffeError` with a stable `code`.
 * Logs, metrics and tests key on the code; the message is for people and may change.
 */

/**
 * The base of every error kube-svid-proxy throws on purpose (jose's `JOSEError`): one class, a stable `code`.
 * Each component keeps its own table of codes and its own subclass; this layer is the lowest, so all can use it.
 */
export class KspError extends Error {
  override name = 'KspError';
  readonly code: string;

  constructor(code: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

export function isKspError(err: unknown, code?: string): err is KspError {
  return err instanceof KspError && (code === undefined || err.code === code);
}

/** SPIFFE ID rules (SPIFFE-ID specification §2). */
export const IdErrorCode = {
  Empty: 'ERR_ID_EMPTY',
  TooLong: 'ERR_ID_TOO_LONG',
  WrongScheme: 'ERR_ID_WRONG_SCHEME',
  MissingTrustDomain: 'ERR_ID_MISSING_TRUST_DOMAIN',
  TrustDomainChar: 'ERR_ID_TRUST_DOMAIN_CHAR',
  TrustDomainUppercase: 'ERR_ID_TRUST_DOMAIN_UPPERCASE',
  TrustDomainTooLong: 'ERR_ID_TRUST_DOMAIN_TOO_LONG',
  Port: 'ERR_ID_PORT',
  Userinfo: 'ERR_ID_USERINFO',
  Query: 'ERR_ID_QUERY',
  Fragment: 'ERR_ID_FRAGMENT',
  PercentEncoded: 'ERR_ID_PERCENT_ENCODED',
  EmptySegment: 'ERR_ID_EMPTY_SEGMENT',
  DotSegment: 'ERR_ID_DOT_SEGMENT',
  TrailingSlash: 'ERR_ID_TRAILING_SLASH',
  PathSegmentChar: 'ERR_ID_PATH_SEGMENT_CHAR',
  PathNoLeadingSlash: 'ERR_ID_PATH_NO_LEADING_SLASH',
} as const;

/** SPIFFE bundle rules (SPIFFE Trust Domain and Bundle §4, X509-SVID §6, JWT-SVID §6). */
export const BundleErrorCode = {
  Json: 'ERR_BUNDLE_JSON',
  KeysMissing: 'ERR_BUNDLE_KEYS_MISSING',
  Sequence: 'ERR_BUNDLE_SEQUENCE',
  RefreshHint: 'ERR_BUNDLE_REFRESH_HINT',
  Certificate: 'ERR_BUNDLE_CERTIFICATE',
  KidMissing: 'ERR_BUNDLE_KID_MISSING',
  KidDuplicate: 'ERR_BUNDLE_KID_DUPLICATE',
  JwtKey: 'ERR_BUNDLE_JWT_KEY',
  DuplicateTrustDomain: 'ERR_BUNDLE_DUPLICATE_TRUST_DOMAIN',
} as const;

/** X509-SVID rules (X509-SVID specification §2–§5). */
export const X509ErrorCode = {
  EmptyChain: 'ERR_X509_EMPTY_CHAIN',
  Parse: 'ERR_X509_PARSE',
  KeyParse: 'ERR_X509_KEY_PARSE',
  KeyMismatch: 'ERR_X509_KEY_MISMATCH',
  NoUriSan: 'ERR_X509_NO_URI_SAN',
  MultipleUriSans: 'ERR_X509_MULTIPLE_URI_SANS',
  LeafRootPath: 'ERR_X509_LEAF_ROOT_PATH',
  LeafCa: 'ERR_X509_LEAF_CA',
  LeafKeyCertSign: 'ERR_X509_LEAF_KEY_CERT_SIGN',
  LeafCrlSign: 'ERR_X509_LEAF_CRL_SIGN',
  LeafNoDigitalSignature: 'ERR_X509_LEAF_NO_DIGITAL_SIGNATURE',
  SigningNotCa: 'ERR_X509_SIGNING_NOT_CA',
  SigningNoKeyCertSign: 'ERR_X509_SIGNING_NO_KEY_CERT_SIGN',
  SigningIdHasPath: 'ERR_X509_SIGNING_ID_HAS_PATH',
  PathLength: 'ERR_X509_PATH_LENGTH',
  NameConstraints: 'ERR_X509_NAME_CONSTRAINTS',
  UnhandledCriticalExtension: 'ERR_X509_UNHANDLED_CRITICAL_EXTENSION',
  Expired: 'ERR_X509_EXPIRED',
  NotYetValid: 'ERR_X509_NOT_YET_VALID',
  NoBundle: 'ERR_X509_NO_BUNDLE',
  /** The chain ends at an authority of a different trust domain than the one the SVID claims. */
  WrongTrustDomain: 'ERR_X509_WRONG_TRUST_DOMAIN',
  Untrusted: 'ERR_X509_UNTRUSTED',
} as const;

/** JWT-SVID rules (JWT-SVID specification §2–§4). */
export const JwtErrorCode = {
  Malformed: 'ERR_JWT_MALFORMED',
  Algorithm: 'ERR_JWT_ALGORITHM',
  KidMissing: 'ERR_JWT_KID_MISSING',
  Type: 'ERR_JWT_TYPE',
  Header: 'ERR_JWT_HEADER',
  Subject: 'ERR_JWT_SUBJECT',
  Audience: 'ERR_JWT_AUDIENCE',
  ExpMissing: 'ERR_JWT_EXP_MISSING',
  Expired: 'ERR_JWT_EXPIRED',
  NotYetValid: 'ERR_JWT_NOT_YET_VALID',
  NoBundle: 'ERR_JWT_NO_BUNDLE',
  KeyNotFound: 'ERR_JWT_KEY_NOT_FOUND',
  Signature: 'ERR_JWT_SIGNATURE',
  Mint: 'ERR_JWT_MINT',
} as const;

/** Peer authorization (after authentication succeeded). */
export const AuthzErrorCode = {
  Unauthorized: 'ERR_AUTHZ_UNAUTHORIZED',
} as const;

type ValueOf<T> = T[keyof T];
export type IdErrorCode = ValueOf<typeof IdErrorCode>;
export type BundleErrorCode = ValueOf<typeof BundleErrorCode>;
export type X509ErrorCode = ValueOf<typeof X509ErrorCode>;
export type JwtErrorCode = ValueOf<typeof JwtErrorCode>;
export type AuthzErrorCode = ValueOf<typeof AuthzErrorCode>;
export type SpiffeErrorCode = IdErrorCode | BundleErrorCode | X509ErrorCode | JwtErrorCode | AuthzErrorCode;

export class SpiffeError extends KspError {
  override readonly name = 'SpiffeError';
  declare readonly code: SpiffeErrorCode;

  constructor(code: SpiffeErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export function isSpiffeError(err: unknown, code?: SpiffeErrorCode): err is SpiffeError {
  return err instanceof SpiffeError && (code === undefined || err.code === code);
}
