import { createPrivateKey, type KeyObject, X509Certificate } from 'node:crypto';
import type { X509Bundle, X509BundleSource } from './bundle.ts';
import { type CertInfo, inspect, KU, nameConstraintViolation } from './certinfo.ts';
import { SpiffeError, X509ErrorCode } from './errors.ts';
import { SpiffeId } from './id.ts';
import { decodeCertificates, pemOrUndefined } from './pem.ts';

/** An X.509-SVID with its private key: what a workload holds and presents. */
export interface X509Svid {
  readonly id: SpiffeId;
  /** Leaf first, then any intermediates; never the trust anchor. */
  readonly certificates: readonly X509Certificate[];
  readonly privateKey: KeyObject;
  /** Workload API hint (e.g. `internal`), when the issuer set one. */
  readonly hint?: string;
}

/** What a successful verification proves. */
export interface VerifiedX509Svid {
  readonly id: SpiffeId;
  /** The verified path: leaf, intermediates, and last the authority from the bundle. */
  readonly verifiedChain: readonly X509Certificate[];
}

/** An X509BundleSource that can also list all its bundles, which lets errors name a wrong trust domain. */
interface ListableX509Source extends X509BundleSource {
  x509Bundles(): Iterable<X509Bundle>;
}

/** Longest path (leaf to anchor) we will build; SPIFFE deployments use two to four. */
const MAX_PATH_LENGTH = 8;
/**
 * Work limits for one verification, against chains crafted to make path building explode (say, many CA
 * certificates that all issue each other). Go's crypto/x509 stops at 100 signature checks too.
 */
const MAX_SIGNATURE_CHECKS = 100;
const MAX_PATH_VISITS = 1000;

/**
 * Signature checks between CA certificates, kept across verifications by the two certificates' SHA-256
 * fingerprints: the intermediates and roots behind every client are the same, so after the first client only a
 * new leaf's own link costs a signature check. A verdict depends on the two DER encodings alone. Bounded; the
 * oldest verdicts go first.
 */
export class SignatureMemory {
  readonly #verdicts = new Map<string, boolean>();
  readonly #max: number;

  constructor(max = 4096) {
    this.#max = max;
  }

  /** Whether `child` verifies under `parent`'s key, from memory or checked now (and remembered). */
  verified(child: X509Certificate, parent: X509Certificate): boolean {
    const key = `${child.fingerprint256}>${parent.fingerprint256}`;
    const known = this.#verdicts.get(key);
    if (known !== undefined) return known;
    const verdict = child.verify(parent.publicKey);
    if (this.#verdicts.size >= this.#max) {
      const oldest = this.#verdicts.keys().next().value;
      if (oldest !== undefined) this.#verdicts.delete(oldest);
    }
    this.#verdicts.set(key, verdict);
    return verdict;
  }
}

/** What a caller of verifyX509Svid can lend it to save work; never a check skipped. */
export interface VerifyX509SvidOptions {
  /** Signature checks between CA certificates remembered across calls. */
  readonly signatures?: SignatureMemory;
}

/** Per-verification memory of issuer checks, and the work budget they draw on. */
class PathSearch {
  readonly #issued = new Map<CertInfo, Map<CertInfo, boolean>>();
  readonly #signatures: SignatureMemory | undefined;
  #signatureChecks = 0;
  #visits = 0;

  constructor(signatures?: SignatureMemory) {
    this.#signatures = signatures;
  }

  /** Did `parent` issue `child`? Names, key identifiers and key usage by OpenSSL, then the signature. */
  issued(child: CertInfo, parent: CertInfo): boolean {
    let known = this.#issued.get(child);
    if (known === undefined) {
      known = new Map();
      this.#issued.set(child, known);
    }
    const hit = known.get(parent);
    if (hit !== undefined) return hit;
    let result = child.cert.checkIssued(parent.cert);
    if (result) {
      // Counted whether or not the memory answers, so the budget (and what passes) is the same either way.
      if (++this.#signatureChecks > MAX_SIGNATURE_CHECKS)
        this.#giveUp(`${MAX_SIGNATURE_CHECKS} signature checks`);
      result =
        child.isCa && this.#signatures !== undefined
          ? this.#signatures.verified(child.cert, parent.cert)
          : child.cert.verify(parent.cert.publicKey);
    }
    known.set(parent, result);
    return result;
  }

  visit(): void {
    if (++this.#visits > MAX_PATH_VISITS) this.#giveUp(`${MAX_PATH_VISITS} candidate paths`);
  }

  #giveUp(what: string): never {
    throw err(
      X509ErrorCode.Untrusted,
      `path building gave up after ${what}: the presented chain is not a plausible SVID chain`,
    );
  }
}

function err(code: X509ErrorCode, message: string, cause?: unknown): SpiffeError {
  return new SpiffeError(code, message, { cause });
}

/** Parses certificates from PEM or DER (one or several concatenated), leaf first. */
export function parseCertificates(data: string | Uint8Array): X509Certificate[] {
  try {
    return decodeCertificates(data).map((der) => new X509Certificate(der));
  } catch (cause) {
    throw err(X509ErrorCode.Parse, `cannot parse certificates: ${(cause as Error).message}`, cause);
  }
}

/**
 * Parses a PKCS#8 private key, PEM (exactly one `BEGIN PRIVATE KEY` block, read as strictly as certificates)
 * or DER. Encrypted keys are refused.
 */
export function parsePrivateKey(data: string | Uint8Array): KeyObject {
  try {
    const blocks = pemOrUndefined(data);
    if (blocks === undefined) {
      return createPrivateKey({ key: Buffer.from(data as Uint8Array), format: 'der', type: 'pkcs8' });
    }
    const label = blocks[0]?.label;
    if (label !== 'PRIVATE KEY') {
      throw new Error(`expected a PKCS#8 "PRIVATE KEY" PEM block, found "${label ?? 'none'}"`);
    }
    if (blocks.length > 1) {
      throw new Error(`expected one PEM block, found ${blocks.length} (a key file holds the key alone)`);
    }
    return createPrivateKey({ key: (blocks[0] as { der: Buffer }).der, format: 'der', type: 'pkcs8' });
  } catch (cause) {
    // Neither our messages nor OpenSSL's include key bytes, so they are safe to pass on.
    throw err(X509ErrorCode.KeyParse, `cannot parse private key: ${(cause as Error).message}`, cause);
  }
}

/**
 * Parses an X.509-SVID: its chain (leaf first) and its PKCS#8 key, PEM or DER. Checks the leaf rules, the
 * signing-certificate rules for any intermediates, and that the key belongs to the leaf. Does not check trust:
 * that is `verifyX509Svid`'s job, against the bundle of the SVID's trust domain.
 */
export function parseX509Svid(chain: string | Uint8Array, key: string | Uint8Array, hint?: string): X509Svid {
  const certificates = parseCertificates(chain);
  const leaf = certificates[0];
  if (leaf === undefined) throw err(X509ErrorCode.EmptyChain, 'SVID chain holds no certificate');
  const id = checkLeaf(inspectOrThrow(leaf, 'leaf'));
  certificates.slice(1).forEach((cert, i) => {
    checkSigning(inspectOrThrow(cert, `intermediate ${i + 1}`), `intermediate ${i + 1}`, false);
  });
  const privateKey = parsePrivateKey(key);
  if (!leaf.checkPrivateKey(privateKey)) {
    throw err(X509ErrorCode.KeyMismatch, `private key does not match the leaf certificate of ${id}`);
  }
  return hint === undefined ? { id, certificates, privateKey } : { id, certificates, privateKey, hint };
}

function inspectOrThrow(cert: X509Certificate, what: string): CertInfo {
  try {
    return inspect(cert);
  } catch (cause) {
    throw err(
      X509ErrorCode.Parse,
      `${what} certificate has a malformed extension: ${(cause as Error).message}`,
      cause,
    );
  }
}

/** X509-SVID §2, §3.1, §4, §5.2: the leaf rules. Returns the leaf's SPIFFE ID. */
function checkLeaf(leaf: CertInfo): SpiffeId {
  if (leaf.uriSans.length === 0) throw err(X509ErrorCode.NoUriSan, 'leaf certificate has no URI SAN');
  if (leaf.uriSans.length > 1) {
    throw err(
      X509ErrorCode.MultipleUriSans,
      `leaf certificate has ${leaf.uriSans.length} URI SANs; exactly one is allowed`,
    );
  }
  const uri = leaf.uriSans[0] as string;
  let id: SpiffeId;
  try {
    id = SpiffeId.parse(uri);
  } catch (cause) {
    if (!(cause instanceof SpiffeError)) throw cause;
    // Keep the ID rule's own code (ERR_ID_*): it names exactly what is wrong with the URI SAN.
    throw new SpiffeError(cause.code, `leaf URI SAN is not a valid SPIFFE ID: ${cause.message}`, { cause });
  }
  if (id.isRoot)
    throw err(X509ErrorCode.LeafRootPath, `leaf SPIFFE ID ${id} has no path; leaf IDs must name a workload`);
  if (leaf.isCa) throw err(X509ErrorCode.LeafCa, `leaf certificate of ${id} has the CA flag set`);
  const ku = leaf.keyUsage ?? 0;
  if (ku & KU.keyCertSign)
    throw err(X509ErrorCode.LeafKeyCertSign, `leaf certificate of ${id} has keyCertSign set`);
  if (ku & KU.cRLSign) throw err(X509ErrorCode.LeafCrlSign, `leaf certificate of ${id} has cRLSign set`);
  if (!(ku & KU.digitalSignature)) {
    throw err(
      X509ErrorCode.LeafNoDigitalSignature,
      `leaf certificate of ${id} lacks the digitalSignature key usage`,
    );
  }
  return id;
}

/** X509-SVID §3.2, §4.1, §4.3: the signing-certificate rules. */
function checkSigning(ca: CertInfo, what: string, isAnchor: boolean): void {
  if (!ca.isCa) {
    throw err(
      X509ErrorCode.SigningNotCa,
      `${what} certificate is not a CA (basicConstraints cA is not true)`,
    );
  }
  // Only a trust anchor may lack the key usage extension (old organisation roots); where present it must allow signing.
  if (ca.keyUsage === undefined ? !isAnchor : !(ca.keyUsage & KU.keyCertSign)) {
    throw err(X509ErrorCode.SigningNoKeyCertSign, `${what} certificate lacks the keyCertSign key usage`);
  }
  for (const uri of ca.uriSans) {
    if (!uri.startsWith('spiffe://')) continue;
    const afterAuthority = uri.indexOf('/', 'spiffe://'.length);
    if (afterAuthority !== -1) {
      throw err(X509ErrorCode.SigningIdHasPath, `${what} certificate carries SPIFFE ID ${uri} with a path`);
    }
  }
}

function checkTime(info: CertInfo, what: string, now: number): void {
  if (now < info.notBefore) {
    throw err(
      X509ErrorCode.NotYetValid,
      `${what} certificate is not valid before ${info.cert.validFromDate.toISOString()}`,
    );
  }
  if (now > info.notAfter) {
    throw err(X509ErrorCode.Expired, `${what} certificate expired at ${info.cert.validToDate.toISOString()}`);
  }
}

/** RFC 5280 path checks over a built path (leaf first, anchor last). */
function checkPath(path: readonly CertInfo[], id: SpiffeId, now: number): void {
  for (let i = 0; i < path.length; i++) {
    const info = path[i] as CertInfo;
    const what = i === 0 ? 'leaf' : i === path.length - 1 ? 'trust anchor' : `intermediate ${i}`;
    if (info.unhandledCritical.length > 0) {
      throw err(
        X509ErrorCode.UnhandledCriticalExtension,
        `${what} certificate has unhandled critical extension(s) ${info.unhandledCritical.join(', ')}`,
      );
    }
    checkTime(info, what, now);
    if (i === 0) continue;
    checkSigning(info, what, i === path.length - 1);
    // Non-self-issued intermediates between this CA and the leaf (RFC 5280 §4.2.1.9).
    const below = path.slice(1, i).filter((c) => !c.selfIssued).length;
    if (info.pathLen !== undefined && below > info.pathLen) {
      throw err(
        X509ErrorCode.PathLength,
        `${what} certificate allows ${info.pathLen} intermediate(s) below it, the path has ${below}`,
      );
    }
    if (info.nameConstraints !== undefined) {
      for (let j = 0; j < i; j++) {
        const subject = path[j] as CertInfo;
        if (j > 0 && subject.selfIssued) continue;
        const violation = nameConstraintViolation(info.nameConstraints, subject);
        if (violation !== undefined) {
          throw err(
            X509ErrorCode.NameConstraints,
            `${what} certificate's name constraints reject ${id}: ${violation}`,
          );
        }
      }
    }
  }
}

/**
 * Depth-first path building from the leaf to any anchor, through the presented intermediates.
 * Returns the first path that passes every check, or throws the first check failure met.
 */
function buildPath(
  search: PathSearch,
  leaf: CertInfo,
  intermediates: readonly CertInfo[],
  anchors: readonly CertInfo[],
  id: SpiffeId,
  now: number,
): CertInfo[] | undefined {
  let firstFailure: SpiffeError | undefined;
  const visit = (path: CertInfo[]): CertInfo[] | undefined => {
    search.visit();
    const current = path[path.length - 1] as CertInfo;
    for (const anchor of anchors) {
      if (!search.issued(current, anchor)) continue;
      const candidate = [...path, anchor];
      try {
        checkPath(candidate, id, now);
        return candidate;
      } catch (e) {
        firstFailure ??= e as SpiffeError;
      }
    }
    if (path.length + 1 >= MAX_PATH_LENGTH) return undefined;
    for (const next of intermediates) {
      if (path.includes(next) || !search.issued(current, next)) continue;
      const found = visit([...path, next]);
      if (found !== undefined) return found;
    }
    return undefined;
  };
  const found = visit([leaf]);
  if (found === undefined && firstFailure !== undefined) throw firstFailure;
  return found;
}

function hasListing(source: X509BundleSource): source is ListableX509Source {
  return typeof (source as Partial<ListableX509Source>).x509Bundles === 'function';
}

/**
 * The certificates a TLS peer sent after its leaf, leaf excluded: OpenSSL's view of the peer chain, walked through
 * `issuerCertificate` (at most 17, stopping at the first repeat). What `verifyX509Svid` takes after the leaf.
 */
export function presentedIntermediates(leaf: X509Certificate): X509Certificate[] {
  const out: X509Certificate[] = [];
  const seen = new Set<string>([leaf.fingerprint256]);
  for (
    let cert = leaf.issuerCertificate;
    cert !== undefined && out.length <= 16;
    cert = cert.issuerCertificate
  ) {
    if (seen.has(cert.fingerprint256)) break;
    seen.add(cert.fingerprint256);
    out.push(cert);
  }
  return out;
}

/**
 * Verifies a peer's X.509-SVID chain (leaf first, as presented in TLS) against the bundle of the trust domain
 * *that the leaf claims*, and no other: a CA trusted for another trust domain never vouches for this one.
 * Returns the SPIFFE ID and the verified path, or throws a `SpiffeError` whose code names the rule broken.
 * `options.signatures` lets a long-lived caller (the proxy's Authenticator) keep CA-to-CA signature checks
 * between calls; the verdict is the same with or without it.
 */
export function verifyX509Svid(
  chain: readonly X509Certificate[],
  bundles: X509BundleSource,
  now: Date = new Date(),
  options: VerifyX509SvidOptions = {},
): VerifiedX509Svid {
  if (Number.isNaN(now.getTime())) throw new RangeError('verifyX509Svid: now is not a valid Date');
  const leafCert = chain[0];
  if (leafCert === undefined) throw err(X509ErrorCode.EmptyChain, 'peer presented no certificate');
  const leaf = inspectOrThrow(leafCert, 'leaf');
  const id = checkLeaf(leaf);
  const intermediates = chain.slice(1).map((c, i) => inspectOrThrow(c, `intermediate ${i + 1}`));
  const bundle = bundles.getX509Bundle(id.trustDomain);
  if (bundle === undefined || bundle.authorities.length === 0) {
    throw err(
      X509ErrorCode.NoBundle,
      `no X.509 bundle (or an empty one) for trust domain "${id.trustDomain}" of ${id}`,
    );
  }
  const anchors = bundle.authorities.map((c) => inspectOrThrow(c, 'trust anchor'));
  const path = buildPath(new PathSearch(options.signatures), leaf, intermediates, anchors, id, now.getTime());
  if (path !== undefined) return { id, verifiedChain: path.map((p) => p.cert) };

  // Failure path only: say whether another trust domain's authority signed it (a cross-domain forgery).
  if (hasListing(bundles)) {
    for (const other of bundles.x509Bundles()) {
      if (other.trustDomain.equals(id.trustDomain)) continue;
      const otherAnchors = other.authorities.map((c) => inspectOrThrow(c, 'trust anchor'));
      if (reachesAnchor(new PathSearch(options.signatures), leaf, intermediates, otherAnchors)) {
        throw err(
          X509ErrorCode.WrongTrustDomain,
          `${id} claims trust domain "${id.trustDomain}" but was issued by an authority of "${other.trustDomain}"`,
        );
      }
    }
  }
  throw err(
    X509ErrorCode.Untrusted,
    `${id} does not chain to any authority of trust domain "${id.trustDomain}"`,
  );
}

function reachesAnchor(
  search: PathSearch,
  leaf: CertInfo,
  intermediates: readonly CertInfo[],
  anchors: readonly CertInfo[],
): boolean {
  const seen = new Set<CertInfo>();
  const visit = (current: CertInfo, depth: number): boolean => {
    if (anchors.some((a) => search.issued(current, a))) return true;
    if (depth >= MAX_PATH_LENGTH) return false;
    for (const next of intermediates) {
      if (seen.has(next) || !search.issued(current, next)) continue;
      seen.add(next);
      if (visit(next, depth + 1)) return true;
    }
    return false;
  };
  return visit(leaf, 1);
}
