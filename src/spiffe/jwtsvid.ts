import type { KeyObject } from 'node:crypto';
import {
  decodeJwt,
  decodeProtectedHeader,
  type JWTPayload,
  errors as joseErrors,
  jwtVerify,
  SignJWT,
} from 'jose';
import type { JwtBundleSource } from './bundle.ts';
import { JwtErrorCode, SpiffeError } from './errors.ts';
import { SpiffeId } from './id.ts';

/** JWT-SVID §2.1: RS, ES and PS at 256/384/512 bits. `none`, HS* and everything else are refused. */
export const JWT_SVID_ALGORITHMS = [
  'RS256',
  'RS384',
  'RS512',
  'ES256',
  'ES384',
  'ES512',
  'PS256',
  'PS384',
  'PS512',
] as const;
export type JwtSvidAlgorithm = (typeof JWT_SVID_ALGORITHMS)[number];

/** JWT-SVID §2: no JOSE header beyond these may appear. */
const ALLOWED_HEADERS: ReadonlySet<string> = new Set(['alg', 'kid', 'typ']);
const ALLOWED_ALGORITHMS: ReadonlySet<string> = new Set(JWT_SVID_ALGORITHMS);

/** The curve each ES algorithm needs (RFC 7518 §3.4), by OpenSSL name. */
const EC_CURVES: Readonly<Record<string, string>> = {
  ES256: 'prime256v1',
  ES384: 'secp384r1',
  ES512: 'secp521r1',
};

/**
 * Whether `key` can verify `alg`. Checked before jose runs, so that a header naming an algorithm the bundle key
 * cannot do is refused as an algorithm error, whatever the crypto layer would have thrown.
 * RSA-PSS-only keys (`rsa-pss`) are not supported: bundles carry plain RSA keys, which serve both RS* and PS*.
 */
function keyFitsAlgorithm(key: KeyObject, alg: string): boolean {
  if (alg.startsWith('ES'))
    return key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === EC_CURVES[alg];
  return key.asymmetricKeyType === 'rsa';
}

/** Default clock-skew leeway on `exp` and `nbf`, and the most a caller may ask for. */
export const DEFAULT_JWT_LEEWAY_SECONDS = 30;
export const MAX_JWT_LEEWAY_SECONDS = 300;

/** A JWT-SVID and what it says. After `verifyJwtSvid` returns one, every field has been checked. */
export interface JwtSvid {
  readonly token: string;
  readonly id: SpiffeId;
  readonly audience: readonly string[];
  readonly expiry: Date;
  readonly issuedAt: Date | undefined;
  readonly claims: Readonly<JWTPayload>;
  /** Workload API hint, when the issuer set one. */
  readonly hint?: string;
}

/** A JWT authority's signing half. */
export interface JwtSigner {
  readonly kid: string;
  readonly privateKey: KeyObject;
  /** Defaults from the key: ES256/ES384/ES512 by curve, RS256 for RSA. */
  readonly alg?: JwtSvidAlgorithm;
}

export interface MintJwtSvidOptions {
  readonly id: SpiffeId;
  readonly audience: string | readonly string[];
  readonly signer: JwtSigner;
  /** Lifetime in seconds; default 300 (five minutes). */
  readonly ttlSeconds?: number;
  readonly now?: Date;
  /** Extra claims; `sub`, `aud`, `exp` and `iat` are ours to set and may not be overridden. */
  readonly claims?: Readonly<JWTPayload>;
}

export interface VerifyJwtSvidOptions {
  readonly now?: Date;
  /** Leeway on `exp`/`nbf` in seconds, at most `MAX_JWT_LEEWAY_SECONDS`. */
  readonly leewaySeconds?: number;
}

function err(code: JwtErrorCode, message: string, cause?: unknown): SpiffeError {
  return new SpiffeError(code, message, { cause });
}

function defaultAlgorithm(key: KeyObject): JwtSvidAlgorithm {
  if (key.asymmetricKeyType === 'rsa') return 'RS256';
  const curve = key.asymmetricKeyType === 'ec' ? key.asymmetricKeyDetails?.namedCurve : undefined;
  for (const [alg, c] of Object.entries(EC_CURVES)) if (c === curve) return alg as JwtSvidAlgorithm;
  throw err(
    JwtErrorCode.Mint,
    `a ${key.asymmetricKeyType ?? key.type} key cannot sign a JWT-SVID (allowed: ${JWT_SVID_ALGORITHMS.join(', ')})`,
  );
}

function audienceList(audience: string | readonly string[]): string[] {
  const list = typeof audience === 'string' ? [audience] : [...audience];
  if (list.length === 0 || list.some((a) => a.length === 0)) {
    throw err(JwtErrorCode.Audience, 'an audience is required and its values must not be empty');
  }
  return list;
}

/** Mints a JWT-SVID for `id`: header `alg`, `kid`, `typ: JWT`; claims `sub`, `aud`, `exp`, `iat`. */
export async function mintJwtSvid(options: MintJwtSvidOptions): Promise<JwtSvid> {
  const { id, signer } = options;
  const audience = audienceList(options.audience);
  const now = options.now ?? new Date();
  const ttl = options.ttlSeconds ?? 300;
  if (!(Number.isSafeInteger(ttl) && ttl > 0))
    throw err(JwtErrorCode.Mint, 'ttlSeconds must be a positive integer');
  if (signer.kid.length === 0) throw err(JwtErrorCode.Mint, 'the signer needs a kid');
  const alg = signer.alg ?? defaultAlgorithm(signer.privateKey);
  const reserved = ['sub', 'aud', 'exp', 'iat'].filter(
    (c) => options.claims !== undefined && c in options.claims,
  );
  if (reserved.length > 0) throw err(JwtErrorCode.Mint, `claims may not override ${reserved.join(', ')}`);
  const iat = Math.floor(now.getTime() / 1000);
  const exp = iat + ttl;
  let token: string;
  try {
    token = await new SignJWT({ ...options.claims })
      .setProtectedHeader({ alg, kid: signer.kid, typ: 'JWT' })
      .setSubject(id.toString())
      .setAudience(audience)
      .setIssuedAt(iat)
      .setExpirationTime(exp)
      .sign(signer.privateKey);
  } catch (cause) {
    throw err(
      JwtErrorCode.Mint,
      `cannot sign JWT-SVID for ${id} with ${alg}: ${(cause as Error).message}`,
      cause,
    );
  }
  return {
    token,
    id,
    audience,
    expiry: new Date(exp * 1000),
    issuedAt: new Date(iat * 1000),
    claims: decodeJwt(token),
  };
}

interface Inspected {
  readonly alg: string;
  readonly kid: string;
  readonly id: SpiffeId;
  readonly payload: JWTPayload;
}

/** The header and subject checks that come before any key is looked up. */
function inspectToken(token: string): Inspected {
  if (typeof token !== 'string' || token.length === 0) throw err(JwtErrorCode.Malformed, 'token is empty');
  if (token.split('.').length !== 3) {
    throw err(
      JwtErrorCode.Malformed,
      'token is not a JWS in compact serialization (three dot-separated parts)',
    );
  }
  let header: Record<string, unknown>;
  let payload: JWTPayload;
  try {
    header = decodeProtectedHeader(token) as Record<string, unknown>;
    payload = decodeJwt(token);
  } catch (cause) {
    throw err(JwtErrorCode.Malformed, `token cannot be decoded: ${(cause as Error).message}`, cause);
  }
  const { alg, kid, typ } = header;
  if (typeof alg !== 'string' || !ALLOWED_ALGORITHMS.has(alg)) {
    throw err(
      JwtErrorCode.Algorithm,
      `algorithm ${JSON.stringify(alg ?? null)} is not allowed for JWT-SVIDs`,
    );
  }
  const extra = Object.keys(header).filter((h) => !ALLOWED_HEADERS.has(h));
  if (extra.length > 0)
    throw err(JwtErrorCode.Header, `JOSE header carries disallowed member(s): ${extra.join(', ')}`);
  if (typeof kid !== 'string' || kid.length === 0)
    throw err(JwtErrorCode.KidMissing, 'token header has no kid');
  if (typ !== undefined && typ !== 'JWT' && typ !== 'JOSE') {
    throw err(JwtErrorCode.Type, `token typ ${JSON.stringify(typ)} is neither "JWT" nor "JOSE"`);
  }
  if (typeof payload.sub !== 'string') throw err(JwtErrorCode.Subject, 'token has no sub claim');
  const { aud } = payload;
  if (
    aud !== undefined &&
    typeof aud !== 'string' &&
    !(Array.isArray(aud) && aud.every((a) => typeof a === 'string'))
  ) {
    throw err(JwtErrorCode.Audience, 'aud must be a string or an array of strings');
  }
  let id: SpiffeId;
  try {
    id = SpiffeId.parse(payload.sub);
  } catch (cause) {
    throw err(JwtErrorCode.Subject, `sub is not a valid SPIFFE ID: ${(cause as Error).message}`, cause);
  }
  return { alg, kid, id, payload };
}

function toSvid(token: string, id: SpiffeId, payload: JWTPayload): JwtSvid {
  const aud = payload.aud;
  return {
    token,
    id,
    audience: aud === undefined ? [] : typeof aud === 'string' ? [aud] : aud,
    expiry: new Date((payload.exp ?? 0) * 1000),
    issuedAt: payload.iat === undefined ? undefined : new Date(payload.iat * 1000),
    claims: payload,
  };
}

/**
 * Verifies a JWT-SVID: header rules first, then the signature with the key named by `kid` in the JWT bundle of
 * the token's own trust domain (from `sub`), then `aud` (one of `audience` must be present) and `exp`.
 * Keys come straight from our bundle, never from a JWK set helper: jose's local JWK sets skip keys whose `use`
 * is not `sig`, and every JWT-SVID authority has `use: jwt-svid`.
 */
export async function verifyJwtSvid(
  token: string,
  bundles: JwtBundleSource,
  audience: string | readonly string[],
  options: VerifyJwtSvidOptions = {},
): Promise<JwtSvid> {
  const expected = audienceList(audience);
  const leeway = options.leewaySeconds ?? DEFAULT_JWT_LEEWAY_SECONDS;
  if (!(leeway >= 0 && leeway <= MAX_JWT_LEEWAY_SECONDS)) {
    throw new RangeError(`leewaySeconds must be between 0 and ${MAX_JWT_LEEWAY_SECONDS}`);
  }
  const { alg, kid, id } = inspectToken(token);
  const bundle = bundles.getJwtBundle(id.trustDomain);
  if (bundle === undefined)
    throw err(JwtErrorCode.NoBundle, `no JWT bundle for trust domain "${id.trustDomain}"`);
  const key = bundle.findAuthority(kid);
  if (key === undefined) {
    throw err(
      JwtErrorCode.KeyNotFound,
      `no JWT authority with kid "${kid}" in the bundle of "${id.trustDomain}"`,
    );
  }
  if (!keyFitsAlgorithm(key, alg)) {
    throw err(JwtErrorCode.Algorithm, `JWT-SVID of ${id}: key "${kid}" of the bundle cannot verify ${alg}`);
  }
  let payload: JWTPayload;
  try {
    ({ payload } = await jwtVerify(token, key, {
      algorithms: [alg],
      audience: expected,
      currentDate: options.now ?? new Date(),
      clockTolerance: leeway,
      requiredClaims: ['exp', 'aud', 'sub'],
    }));
  } catch (cause) {
    throw mapJoseError(cause, id, kid, alg);
  }
  return toSvid(token, id, payload);
}

function mapJoseError(cause: unknown, id: SpiffeId, kid: string, alg: string): SpiffeError {
  if (cause instanceof joseErrors.JWTExpired)
    return err(JwtErrorCode.Expired, `JWT-SVID of ${id} has expired`, cause);
  if (cause instanceof joseErrors.JWTClaimValidationFailed) {
    switch (cause.claim) {
      case 'exp':
        return err(JwtErrorCode.ExpMissing, `JWT-SVID of ${id} has no valid exp claim`, cause);
      case 'aud':
        return err(
          JwtErrorCode.Audience,
          `JWT-SVID of ${id} is not for this audience: ${cause.message}`,
          cause,
        );
      case 'nbf':
        if (cause.reason === 'check_failed') {
          return err(JwtErrorCode.NotYetValid, `JWT-SVID of ${id} is not valid yet: ${cause.message}`, cause);
        }
        return err(JwtErrorCode.Malformed, `JWT-SVID of ${id}: claim nbf: ${cause.message}`, cause);
      default:
        return err(
          JwtErrorCode.Malformed,
          `JWT-SVID of ${id}: claim ${cause.claim}: ${cause.message}`,
          cause,
        );
    }
  }
  if (cause instanceof joseErrors.JWSSignatureVerificationFailed) {
    return err(
      JwtErrorCode.Signature,
      `JWT-SVID of ${id}: signature does not verify with kid "${kid}"`,
      cause,
    );
  }
  if (cause instanceof joseErrors.JOSENotSupported) {
    return err(JwtErrorCode.Algorithm, `JWT-SVID of ${id}: key "${kid}" cannot verify ${alg}`, cause);
  }
  return err(JwtErrorCode.Malformed, `JWT-SVID of ${id}: ${(cause as Error).message}`, cause);
}

/**
 * Reads a JWT-SVID without verifying its signature, for display (`api fetch jwt`) only. Header and subject
 * rules still apply. Never base an access decision on the result.
 */
export function parseJwtSvidInsecure(token: string): JwtSvid {
  const { id, payload } = inspectToken(token);
  return toSvid(token, id, payload);
}
