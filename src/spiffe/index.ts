/**
 * kube-svid-proxy/spiffe: SPIFFE primitives to the letter of the specifications (SPIFFE-ID, X509-SVID,
 * JWT-SVID, Trust Domain and Bundle). Pure: no sockets, no files, no timers.
 */
export {
  type Authorizer,
  authorizeAny,
  authorizeId,
  authorizeMemberOf,
  authorizeOneOf,
} from './authorize.ts';
export {
  BundleSet,
  type JwtAuthority,
  JwtBundle,
  type JwtBundleSource,
  type ParseBundleOptions,
  SpiffeBundle,
  type SpiffeBundleInit,
  X509Bundle,
  type X509BundleSource,
} from './bundle.ts';
export {
  AuthzErrorCode,
  BundleErrorCode,
  IdErrorCode,
  isKspError,
  isSpiffeError,
  JwtErrorCode,
  KspError,
  SpiffeError,
  type SpiffeErrorCode,
  X509ErrorCode,
} from './errors.ts';
export { MAX_ID_BYTES, MAX_TRUST_DOMAIN_BYTES, SpiffeId, TrustDomain, validatePath } from './id.ts';
export {
  DEFAULT_JWT_LEEWAY_SECONDS,
  JWT_SVID_ALGORITHMS,
  type JwtSigner,
  type JwtSvid,
  type JwtSvidAlgorithm,
  MAX_JWT_LEEWAY_SECONDS,
  type MintJwtSvidOptions,
  mintJwtSvid,
  parseJwtSvidInsecure,
  type VerifyJwtSvidOptions,
  verifyJwtSvid,
} from './jwtsvid.ts';
export {
  parseCertificates,
  parsePrivateKey,
  parseX509Svid,
  type VerifiedX509Svid,
  verifyX509Svid,
  type X509Svid,
} from './x509svid.ts';
