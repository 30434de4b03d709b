import type { X509Certificate } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import type { BundleSet } from '../spiffe/bundle.ts';
import { isSpiffeError } from '../spiffe/errors.ts';
import type { SpiffeId } from '../spiffe/id.ts';
import { presentedIntermediates, SignatureMemory, verifyX509Svid } from '../spiffe/x509svid.ts';
import { ProxyError, ProxyErrorCode } from './errors.ts';

/** A refusal by the TLS layer itself (the SPIFFE checks throw SpiffeError). */
export class TlsAuthError extends ProxyError {
  override readonly name = 'TlsAuthError';
}

/** A client that proved a SPIFFE ID, and until when that proof holds. */
export interface PeerIdentity {
  readonly id: SpiffeId;
  readonly leaf: X509Certificate;
  /** Leaf, intermediates, and the authority from the bundle. */
  readonly verifiedChain: readonly X509Certificate[];
  /** The earliest notAfter along the verified chain: past it, the connection's requests are refused. */
  readonly validUntil: Date;
  /** The trust generation it was verified against. */
  readonly generation: number;
  /** Whether the TLS session was resumed (no certificate verification by OpenSSL at all). */
  readonly resumed: boolean;
}

/** The bundles the proxy trusts right now; `generation` changes whenever they do. */
export interface TrustState {
  readonly bundles: BundleSet;
  readonly generation: number;
}

const MAX_REMEMBERED_CHAINS = 10_000;

/**
 * Authenticates a TLS client to the X509-SVID specification, whatever OpenSSL concluded: exactly one SPIFFE
 * URI SAN, a chain to a root of the bundle of *that ID's* trust domain, leaf rules, validity. OpenSSL verifies
 * nothing on a resumed session, so a resumed session is checked the same way, at the current time, against the
 * current bundles; its intermediates come from the full handshake that created it, since a resumed session
 * carries only the leaf.
 *
 * Why OpenSSL's verdict (`socket.authorized`) would buy nothing here (and why ServingTrust gives OpenSSL no
 * `ca` to reach one): it proves that some chain from the leaf reaches some certificate of the TLS context's store,
 * and nothing tells which. The store holds Node's default roots besides any `ca`; OpenSSL takes an issuer from the
 * store before the certificates the client sent, matching by name and key identifier only, so another trust
 * domain's root named like our intermediate signs for it while the chain Node reports runs through the
 * intermediate; and a certificate that is itself in the store gets no signature check at all.
 * (authenticate.test.ts plays each against a real handshake.) So the leaf's signature,
 * the one check a never-seen client brings, is verified here on the path built from our bundles; everything that
 * repeats is remembered: the extension facts and signature checks of CA certificates by fingerprint
 * (certinfo.ts, SignatureMemory), and whole results by chain and trust generation.
 */
export class Authenticator {
  readonly #intermediates = new Map<string, readonly X509Certificate[]>();
  /**
   * Verified results by presented chain and trust generation: a client presents the same SVID on every
   * connection until it rotates, so only its first connection pays for the full check. A hit is still bounded
   * by the chain's validity, and any bundle change (a new generation) misses.
   */
  readonly #verified = new Map<string, Omit<PeerIdentity, 'resumed'>>();
  /** Intermediate-to-authority signature checks: done once per intermediate, not once per client. */
  readonly #signatures = new SignatureMemory();
  readonly #onLearned:
    | ((leafFingerprint: string, intermediates: readonly X509Certificate[]) => void)
    | undefined;

  /**
   * `onLearned`: a client authenticated with intermediates not known for its leaf before (with `workers`, the
   * other workers are told, so the client's next session resumes on any of them: a resumed session carries the
   * leaf alone).
   */
  constructor(
    options: {
      onLearned?: (leafFingerprint: string, intermediates: readonly X509Certificate[]) => void;
    } = {},
  ) {
    this.#onLearned = options.onLearned;
  }

  /** Intermediates another process saw with this leaf in a full handshake that authenticated. */
  learn(leafFingerprint: string, intermediates: readonly X509Certificate[]): void {
    if (intermediates.length > 0) this.#remember(leafFingerprint, intermediates);
  }

  authenticate(socket: TLSSocket, trust: TrustState, now = new Date()): PeerIdentity {
    const leaf = socket.getPeerX509Certificate();
    if (leaf === undefined) {
      throw new TlsAuthError(ProxyErrorCode.NoClientCertificate, 'the client presented no certificate');
    }
    const resumed = socket.isSessionReused();
    // What the client sent after its leaf, or, when Node shows none, what it sent with this leaf before: a
    // resumed session carries the leaf alone, and Node 24.21 shows the chain to the first call only (and to none
    // when OpenSSL's own verification passed: nodejs/node#65579, fixed in 24.22). More intermediates than the
    // client sent this time only offer more paths, each checked in full.
    let intermediates: readonly X509Certificate[] = presentedIntermediates(leaf);
    const known = this.#intermediates.get(leaf.fingerprint256);
    const learned = intermediates.length > 0 && !sameCertificates(intermediates, known);
    if (intermediates.length > 0) this.#remember(leaf.fingerprint256, intermediates);
    else intermediates = known ?? [];
    const key = `${trust.generation}|${leaf.fingerprint256}|${intermediates.map((c) => c.fingerprint256).join('|')}`;
    const cached = this.#verified.get(key);
    if (cached !== undefined && now.getTime() < cached.validUntil.getTime()) {
      // It passed every check when verified; since then only expiry can change that, which validUntil covers.
      return { ...cached, resumed };
    }
    const { id, verifiedChain } = verifyX509Svid([leaf, ...intermediates], trust.bundles, now, {
      signatures: this.#signatures,
    });
    const validUntil = new Date(Math.min(...verifiedChain.map((c) => c.validToDate.getTime())));
    const verified = { id, leaf, verifiedChain, validUntil, generation: trust.generation };
    bounded(this.#verified, key, verified);
    // Only what authenticated is passed on: a client that fails cannot make the workers talk.
    if (learned) this.#onLearned?.(leaf.fingerprint256, intermediates);
    return { ...verified, resumed };
  }

  #remember(fingerprint: string, intermediates: readonly X509Certificate[]): void {
    bounded(this.#intermediates, fingerprint, intermediates);
  }
}

function sameCertificates(a: readonly X509Certificate[], b: readonly X509Certificate[] | undefined): boolean {
  return (
    b !== undefined && a.length === b.length && a.every((c, i) => c.fingerprint256 === b[i]?.fingerprint256)
  );
}

/** Map insert that keeps at most MAX_REMEMBERED_CHAINS entries, dropping the oldest. */
function bounded<V>(map: Map<string, V>, key: string, value: V): void {
  map.delete(key);
  if (map.size >= MAX_REMEMBERED_CHAINS) {
    const oldest = map.keys().next().value;
    if (oldest !== undefined) map.delete(oldest);
  }
  map.set(key, value);
}

/** True when an identity verified earlier may still be used for a request at `now`. */
export function stillValid(identity: PeerIdentity, trust: TrustState, now = new Date()): boolean {
  return identity.generation === trust.generation && now.getTime() < identity.validUntil.getTime();
}

export function authFailureCode(err: unknown): string {
  if (isSpiffeError(err) || err instanceof TlsAuthError) return err.code;
  return ProxyErrorCode.Authentication;
}
