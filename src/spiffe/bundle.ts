import { createPublicKey, type JsonWebKey, type KeyObject, X509Certificate } from 'node:crypto';
import { BundleErrorCode, SpiffeError } from './errors.ts';
import type { TrustDomain } from './id.ts';
import { decodeCertificates } from './pem.ts';

/** Something that can hand out the X.509 bundle of a trust domain: a bundle, a `BundleSet`, a live source. */
export interface X509BundleSource {
  getX509Bundle(trustDomain: TrustDomain): X509Bundle | undefined;
}

/** Something that can hand out the JWT bundle of a trust domain. */
export interface JwtBundleSource {
  getJwtBundle(trustDomain: TrustDomain): JwtBundle | undefined;
}

function sameDer(a: X509Certificate, b: X509Certificate): boolean {
  return a.raw.equals(b.raw);
}

/** The X.509 authorities (CA certificates) of one trust domain. Immutable. */
export class X509Bundle implements X509BundleSource {
  readonly trustDomain: TrustDomain;
  readonly authorities: readonly X509Certificate[];

  constructor(trustDomain: TrustDomain, authorities: Iterable<X509Certificate>) {
    this.trustDomain = trustDomain;
    const unique: X509Certificate[] = [];
    for (const cert of authorities) if (!unique.some((u) => sameDer(u, cert))) unique.push(cert);
    this.authorities = Object.freeze(unique);
  }

  /** Reads authorities from PEM (any number of CERTIFICATE blocks) or from concatenated DER. */
  static parse(trustDomain: TrustDomain, data: string | Uint8Array): X509Bundle {
    let certs: X509Certificate[];
    try {
      certs = decodeCertificates(data).map((der) => new X509Certificate(der));
    } catch (cause) {
      throw new SpiffeError(
        BundleErrorCode.Certificate,
        `X.509 bundle for "${trustDomain}": ${(cause as Error).message}`,
        { cause },
      );
    }
    return new X509Bundle(trustDomain, certs);
  }

  hasAuthority(cert: X509Certificate): boolean {
    return this.authorities.some((a) => sameDer(a, cert));
  }

  getX509Bundle(trustDomain: TrustDomain): X509Bundle | undefined {
    return trustDomain.equals(this.trustDomain) ? this : undefined;
  }

  toPem(): string {
    return this.authorities.map((c) => c.toString()).join('');
  }
}

/** One JWT signing authority: its key ID and public key. */
export interface JwtAuthority {
  readonly kid: string;
  readonly publicKey: KeyObject;
}

/** The JWT authorities (public keys by key ID) of one trust domain. Immutable. */
export class JwtBundle implements JwtBundleSource {
  readonly trustDomain: TrustDomain;
  readonly authorities: ReadonlyMap<string, KeyObject>;

  constructor(trustDomain: TrustDomain, authorities: Iterable<JwtAuthority>) {
    this.trustDomain = trustDomain;
    const map = new Map<string, KeyObject>();
    for (const { kid, publicKey } of authorities) {
      if (kid.length === 0) {
        throw new SpiffeError(
          BundleErrorCode.KidMissing,
          `JWT authority of "${trustDomain}" has an empty kid`,
        );
      }
      if (map.has(kid)) {
        throw new SpiffeError(
          BundleErrorCode.KidDuplicate,
          `JWT authorities of "${trustDomain}" repeat kid "${kid}"`,
        );
      }
      if (publicKey.type !== 'public') {
        throw new SpiffeError(
          BundleErrorCode.JwtKey,
          `JWT authority "${kid}" of "${trustDomain}" must be a public key`,
        );
      }
      map.set(kid, publicKey);
    }
    this.authorities = map;
  }

  /**
   * Parses a standard JWK Set of JWT authorities, as the Workload API's FetchJWTBundles delivers it (SPIFFE
   * Workload API §6.2.2: no SPIFFE members, `use` usually absent). Keys the specifications say to ignore are
   * ignored and reported through `onIgnoredKey`, exactly as `SpiffeBundle.parse` ignores them: a `use` other
   * than `jwt-svid` (such a key must never verify a JWT-SVID), a missing or unknown `kty`, a key type or curve
   * that cannot verify a JWT-SVID. Anything else malformed is an error, so a broken update never silently
   * shrinks the bundle.
   */
  static parse(
    trustDomain: TrustDomain,
    json: string | Uint8Array,
    options: ParseBundleOptions = {},
  ): JwtBundle {
    const keys = parseJwkSet(trustDomain, json).keys;
    const ignore = (index: number, reason: string): void => options.onIgnoredKey?.(index, reason);
    const authorities: JwtAuthority[] = [];
    for (const [index, key] of keys.entries()) {
      const use = key.use;
      if (use !== undefined && use !== JWT_USE) {
        ignore(index, `"use" is ${JSON.stringify(use)}, not "${JWT_USE}"`);
        continue;
      }
      const authority = jwtAuthorityOf(trustDomain, key, index, ignore);
      if (authority !== undefined) authorities.push(authority);
    }
    return new JwtBundle(trustDomain, authorities);
  }

  findAuthority(kid: string): KeyObject | undefined {
    return this.authorities.get(kid);
  }

  getJwtBundle(trustDomain: TrustDomain): JwtBundle | undefined {
    return trustDomain.equals(this.trustDomain) ? this : undefined;
  }
}

export interface SpiffeBundleInit {
  readonly x509Authorities?: Iterable<X509Certificate>;
  readonly jwtAuthorities?: Iterable<JwtAuthority>;
  /** `spiffe_sequence`: 64-bit safe, hence a bigint. */
  readonly sequence?: bigint;
  /** `spiffe_refresh_hint`, in seconds. */
  readonly refreshHint?: number;
}

export interface ParseBundleOptions {
  /** Called for every JWK that the SPIFFE specifications say to ignore, with its index and why. */
  readonly onIgnoredKey?: (index: number, reason: string) => void;
}

const X509_USE = 'x509-svid';
const JWT_USE = 'jwt-svid';
/** JWT-SVID allows only RS*, PS* and ES* algorithms, so only RSA and EC keys can verify one. */
const JWT_KEY_TYPES: ReadonlySet<string> = new Set(['RSA', 'EC']);
/** The curves of ES256, ES384 and ES512 (RFC 7518 §3.4). */
const JWT_CURVES: ReadonlySet<string> = new Set(['P-256', 'P-384', 'P-521']);
const PRIVATE_JWK_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'oth', 'k'];
const X509_KEY_TYPES: ReadonlySet<string> = new Set(['RSA', 'EC', 'OKP']);

type Json = null | boolean | number | string | bigint | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

function isObject(v: Json | undefined): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function bundleError(
  code: BundleErrorCode,
  trustDomain: TrustDomain,
  message: string,
  cause?: unknown,
): SpiffeError {
  return new SpiffeError(code, `SPIFFE bundle for "${trustDomain}": ${message}`, { cause });
}

/**
 * A SPIFFE bundle: everything a trust domain publishes about its authorities (SPIFFE Trust Domain and
 * Bundle §4). It carries both the X.509 and the JWT authorities and round-trips through the JWK Set form.
 */
export class SpiffeBundle implements X509BundleSource, JwtBundleSource {
  readonly trustDomain: TrustDomain;
  readonly x509Bundle: X509Bundle;
  readonly jwtBundle: JwtBundle;
  readonly sequence: bigint | undefined;
  readonly refreshHint: number | undefined;

  constructor(trustDomain: TrustDomain, init: SpiffeBundleInit = {}) {
    this.trustDomain = trustDomain;
    this.x509Bundle = new X509Bundle(trustDomain, init.x509Authorities ?? []);
    this.jwtBundle = new JwtBundle(trustDomain, init.jwtAuthorities ?? []);
    if (init.sequence !== undefined && init.sequence < 0n) {
      throw bundleError(BundleErrorCode.Sequence, trustDomain, 'spiffe_sequence must not be negative');
    }
    if (
      init.refreshHint !== undefined &&
      !(Number.isSafeInteger(init.refreshHint) && init.refreshHint >= 0)
    ) {
      throw bundleError(
        BundleErrorCode.RefreshHint,
        trustDomain,
        'spiffe_refresh_hint must be whole seconds ≥ 0',
      );
    }
    this.sequence = init.sequence;
    this.refreshHint = init.refreshHint;
  }

  get x509Authorities(): readonly X509Certificate[] {
    return this.x509Bundle.authorities;
  }

  get jwtAuthorities(): ReadonlyMap<string, KeyObject> {
    return this.jwtBundle.authorities;
  }

  getX509Bundle(trustDomain: TrustDomain): X509Bundle | undefined {
    return this.x509Bundle.getX509Bundle(trustDomain);
  }

  getJwtBundle(trustDomain: TrustDomain): JwtBundle | undefined {
    return this.jwtBundle.getJwtBundle(trustDomain);
  }

  /**
   * Parses the SPIFFE bundle JSON (a JWK Set) of `trustDomain`.
   * Keys of unknown `kty` or `use`, and `x509-svid` keys without `x5c`, are ignored as the specifications
   * require; anything else malformed is an error, so that a broken update never silently shrinks a bundle.
   */
  static parse(
    trustDomain: TrustDomain,
    json: string | Uint8Array,
    options: ParseBundleOptions = {},
  ): SpiffeBundle {
    const { doc, keys } = parseJwkSet(trustDomain, json);

    let sequence: bigint | undefined;
    if (doc.spiffe_sequence !== undefined) {
      if (typeof doc.spiffe_sequence !== 'bigint' || doc.spiffe_sequence < 0n) {
        throw bundleError(
          BundleErrorCode.Sequence,
          trustDomain,
          'spiffe_sequence must be a non-negative integer',
        );
      }
      sequence = doc.spiffe_sequence;
    }
    let refreshHint: number | undefined;
    if (doc.spiffe_refresh_hint !== undefined) {
      const hint = doc.spiffe_refresh_hint;
      if (typeof hint !== 'bigint' || hint < 0n || hint > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw bundleError(
          BundleErrorCode.RefreshHint,
          trustDomain,
          'spiffe_refresh_hint must be a non-negative integer number of seconds',
        );
      }
      refreshHint = Number(hint);
    }

    const ignore = (index: number, reason: string): void => options.onIgnoredKey?.(index, reason);
    const x509Authorities: X509Certificate[] = [];
    const jwtAuthorities: JwtAuthority[] = [];
    for (const [index, key] of keys.entries()) {
      const { use, kty } = key;
      if (typeof use !== 'string' || (use !== X509_USE && use !== JWT_USE)) {
        ignore(index, `unknown or missing "use" (${JSON.stringify(use ?? null)})`);
      } else if (use === X509_USE) {
        if (typeof kty !== 'string') ignore(index, 'missing "kty"');
        else if (!X509_KEY_TYPES.has(kty)) ignore(index, `unknown key type "${kty}" for x509-svid`);
        else {
          const cert = parseX509Key(trustDomain, key, index, ignore);
          if (cert !== undefined) x509Authorities.push(cert);
        }
      } else {
        const authority = jwtAuthorityOf(trustDomain, key, index, ignore);
        if (authority !== undefined) jwtAuthorities.push(authority);
      }
    }
    return new SpiffeBundle(trustDomain, { x509Authorities, jwtAuthorities, sequence, refreshHint });
  }

  /** The SPIFFE bundle JSON: one `x509-svid` JWK per CA certificate, one `jwt-svid` JWK per key. Stable. */
  marshal(): string {
    const keys: Record<string, unknown>[] = [];
    for (const cert of this.x509Bundle.authorities) {
      keys.push({ use: X509_USE, ...publicJwk(cert.publicKey), x5c: [cert.raw.toString('base64')] });
    }
    for (const [kid, publicKey] of this.jwtBundle.authorities) {
      keys.push({ use: JWT_USE, kid, ...publicJwk(publicKey) });
    }
    let text = `{"keys":${JSON.stringify(keys)}`;
    if (this.sequence !== undefined) text += `,"spiffe_sequence":${this.sequence.toString()}`;
    if (this.refreshHint !== undefined) text += `,"spiffe_refresh_hint":${this.refreshHint}`;
    return `${text}}`;
  }

  /** Same trust domain, authorities, sequence and refresh hint. */
  equals(other: SpiffeBundle): boolean {
    return this.trustDomain.equals(other.trustDomain) && this.marshal() === other.marshal();
  }
}

/** Parses a JWK Set: a JSON object whose `keys` is an array of objects. Integers are read as bigints. */
function parseJwkSet(
  trustDomain: TrustDomain,
  json: string | Uint8Array,
): { doc: JsonObject; keys: JsonObject[] } {
  const text = typeof json === 'string' ? json : Buffer.from(json).toString('utf8');
  let doc: Json;
  try {
    // spiffe_sequence needs 64 bits: read integers from their source text, not through a double.
    doc = JSON.parse(text, (_key, value, context?: { source?: string }) =>
      typeof value === 'number' && context?.source !== undefined && /^-?\d+$/.test(context.source)
        ? BigInt(context.source)
        : value,
    ) as Json;
  } catch (cause) {
    throw bundleError(
      BundleErrorCode.Json,
      trustDomain,
      `not valid JSON (${(cause as Error).message})`,
      cause,
    );
  }
  if (!isObject(doc)) throw bundleError(BundleErrorCode.Json, trustDomain, 'not a JSON object');
  const keys = doc.keys;
  if (!Array.isArray(keys)) {
    throw bundleError(BundleErrorCode.KeysMissing, trustDomain, '"keys" must be present and be an array');
  }
  for (const [index, key] of keys.entries()) {
    if (!isObject(key))
      throw bundleError(BundleErrorCode.Json, trustDomain, `keys[${index}] is not an object`);
  }
  return { doc, keys: keys as JsonObject[] };
}

/** The JWT authority of a `jwt-svid` key, or undefined (reported through `ignore`) when it cannot verify one. */
function jwtAuthorityOf(
  trustDomain: TrustDomain,
  key: JsonObject,
  index: number,
  ignore: (index: number, reason: string) => void,
): JwtAuthority | undefined {
  const { kty, crv } = key;
  if (typeof kty !== 'string') {
    ignore(index, 'missing "kty"');
    return undefined;
  }
  if (!JWT_KEY_TYPES.has(kty)) {
    ignore(index, `key type "${kty}" cannot verify a JWT-SVID`);
    return undefined;
  }
  if (kty === 'EC' && typeof crv === 'string' && !JWT_CURVES.has(crv)) {
    ignore(
      index,
      `curve "${crv}" cannot verify a JWT-SVID (ES256, ES384 and ES512 use ${[...JWT_CURVES].join(', ')})`,
    );
    return undefined;
  }
  return parseJwtKey(trustDomain, key, index);
}

function publicJwk(key: KeyObject): JsonWebKey {
  const { kty, crv, x, y, n, e } = key.export({ format: 'jwk' });
  // A fixed member order keeps marshal() byte-stable.
  return Object.fromEntries(Object.entries({ kty, crv, x, y, n, e }).filter(([, v]) => v !== undefined));
}

function parseX509Key(
  trustDomain: TrustDomain,
  key: JsonObject,
  index: number,
  ignore: (index: number, reason: string) => void,
): X509Certificate | undefined {
  const x5c = key.x5c;
  // X509-SVID §6.2: an entry without x5c is ignored; only the first certificate counts.
  if (x5c === undefined || (Array.isArray(x5c) && x5c.length === 0)) {
    ignore(index, 'x509-svid key without "x5c"');
    return undefined;
  }
  if (!Array.isArray(x5c) || typeof x5c[0] !== 'string') {
    throw bundleError(
      BundleErrorCode.Certificate,
      trustDomain,
      `keys[${index}].x5c must be an array of strings`,
    );
  }
  if (x5c.length > 1) ignore(index, `x5c holds ${x5c.length} certificates; all but the first are ignored`);
  try {
    const der = Buffer.from(x5c[0], 'base64');
    if (der.length === 0 || der.toString('base64') !== x5c[0].replace(/\s/g, ''))
      throw new Error('not base64');
    return new X509Certificate(der);
  } catch (cause) {
    throw bundleError(
      BundleErrorCode.Certificate,
      trustDomain,
      `keys[${index}].x5c[0] is not a base64 DER certificate`,
      cause,
    );
  }
}

function parseJwtKey(trustDomain: TrustDomain, key: JsonObject, index: number): JwtAuthority {
  const kid = key.kid;
  if (typeof kid !== 'string' || kid.length === 0) {
    throw bundleError(BundleErrorCode.KidMissing, trustDomain, `keys[${index}] (jwt-svid) has no "kid"`);
  }
  const { use: _use, kid: _kid, ...jwk } = key;
  const secret = PRIVATE_JWK_MEMBERS.filter((m) => m in jwk);
  if (secret.length > 0) {
    // Never echo the values: they are key material that should not have been published.
    throw bundleError(
      BundleErrorCode.JwtKey,
      trustDomain,
      `keys[${index}] (jwt-svid, kid "${kid}") carries private key members (${secret.join(', ')})`,
    );
  }
  try {
    const publicKey = createPublicKey({ key: jwk as JsonWebKey, format: 'jwk' });
    if (publicKey.type !== 'public') throw new Error('not a public key');
    return { kid, publicKey };
  } catch (cause) {
    throw bundleError(
      BundleErrorCode.JwtKey,
      trustDomain,
      `keys[${index}] (jwt-svid, kid "${kid}") is not a valid public key: ${(cause as Error).message}`,
      cause,
    );
  }
}

/**
 * SPIFFE bundles keyed by trust domain: ours and the federated ones. Immutable: `with` and `without` return a
 * new set, so a holder swaps the whole value and readers never see a half-applied update.
 * Each trust domain has exactly one bundle; bundles of different trust domains are never merged.
 */
export class BundleSet implements X509BundleSource, JwtBundleSource {
  readonly #bundles: ReadonlyMap<string, SpiffeBundle>;

  constructor(bundles: Iterable<SpiffeBundle> = []) {
    const map = new Map<string, SpiffeBundle>();
    for (const b of bundles) {
      if (map.has(b.trustDomain.name)) {
        throw new SpiffeError(
          BundleErrorCode.DuplicateTrustDomain,
          `two bundles for trust domain "${b.trustDomain}"; a set holds one per trust domain`,
        );
      }
      map.set(b.trustDomain.name, b);
    }
    this.#bundles = map;
  }

  get size(): number {
    return this.#bundles.size;
  }

  get(trustDomain: TrustDomain): SpiffeBundle | undefined {
    return this.#bundles.get(trustDomain.name);
  }

  has(trustDomain: TrustDomain): boolean {
    return this.#bundles.has(trustDomain.name);
  }

  /** A new set with `bundle` added, or replacing the bundle of its trust domain. */
  with(bundle: SpiffeBundle): BundleSet {
    return new BundleSet([
      ...[...this.#bundles.values()].filter((b) => !b.trustDomain.equals(bundle.trustDomain)),
      bundle,
    ]);
  }

  /** A new set without the bundle of `trustDomain`. */
  without(trustDomain: TrustDomain): BundleSet {
    return new BundleSet([...this.#bundles.values()].filter((b) => !b.trustDomain.equals(trustDomain)));
  }

  /** Bundles in trust-domain name order. */
  bundles(): SpiffeBundle[] {
    return [...this.#bundles.values()].sort((a, b) => a.trustDomain.compare(b.trustDomain));
  }

  trustDomains(): TrustDomain[] {
    return this.bundles().map((b) => b.trustDomain);
  }

  getX509Bundle(trustDomain: TrustDomain): X509Bundle | undefined {
    return this.get(trustDomain)?.x509Bundle;
  }

  getJwtBundle(trustDomain: TrustDomain): JwtBundle | undefined {
    return this.get(trustDomain)?.jwtBundle;
  }

  /** Every X.509 bundle; lets `verifyX509Svid` say which trust domain really issued a forged SVID. */
  x509Bundles(): X509Bundle[] {
    return this.bundles().map((b) => b.x509Bundle);
  }

  /** All X.509 authorities of all trust domains: the `ca` option of a TLS server that then checks per domain. */
  allX509Authorities(): X509Certificate[] {
    return this.bundles().flatMap((b) => [...b.x509Authorities]);
  }
}
