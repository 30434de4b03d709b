/**
 * What the agent takes from a SPIRE server, as plain values: the client (client.ts) converts the server API's
 * messages into these, and the upstream (upstream.ts) works on them alone.
 */
import type { KeyObject, X509Certificate } from 'node:crypto';
import type { SpiffeBundle } from '../../spiffe/bundle.ts';
import type { SpiffeId } from '../../spiffe/id.ts';

/** Where the SPIRE server's API listens (`server_address`:`server_port` of a SPIRE agent). */
export interface SpireServerAddress {
  readonly host: string;
  readonly port: number;
}

/**
 * Node attestation evidence, as the server's node attestor plugin of the same name expects it:
 * `join_token` sends the token itself; `k8s_psat` sends `{"cluster": …, "token": …}` (a projected
 * service-account token the server checks with a TokenReview).
 */
export type NodeAttestation =
  | { readonly type: 'join_token'; readonly token: string }
  | { readonly type: 'k8s_psat'; readonly cluster: string; readonly token: string };

/** The agent's own X.509-SVID, as AttestAgent or RenewAgent returned it. */
export interface AgentSvid {
  readonly id: SpiffeId;
  /** Leaf first, then intermediates, as the server sent them. */
  readonly certificates: readonly X509Certificate[];
  readonly privateKey: KeyObject;
  readonly expiresAt: Date;
  /** AttestAgent's `reattestable`: the agent renews by attesting again instead of RenewAgent. */
  readonly reattestable: boolean;
}

/** A registration entry the server authorized this agent for (`spire.api.types.Entry`). */
export interface SpireEntry {
  readonly id: string;
  readonly spiffeId: SpiffeId;
  readonly parentId: SpiffeId;
  /** `type:value` strings, e.g. `unix:uid:1000`, `k8s:ns:default`. */
  readonly selectors: readonly string[];
  /** Seconds; 0 means the server's default. */
  readonly x509SvidTtl: number;
  readonly jwtSvidTtl: number;
  /** Trust domain names (the server sends `spiffe://` IDs or names; normalised to names). */
  readonly federatesWith: readonly string[];
  readonly dnsNames: readonly string[];
  readonly hint: string;
  readonly revisionNumber: bigint;
  /** Unix seconds; 0 when unset. */
  readonly createdAt: number;
  readonly admin: boolean;
  readonly downstream: boolean;
}

/** One minted X.509-SVID (`spire.api.types.X509SVID`), leaf first. */
export interface MintedX509Svid {
  readonly id: SpiffeId;
  readonly certificates: readonly X509Certificate[];
  readonly expiresAt: Date;
}

/** One minted JWT-SVID (`spire.api.types.JWTSVID`). */
export interface MintedJwtSvid {
  readonly id: SpiffeId;
  readonly token: string;
  readonly expiresAt: Date;
  readonly issuedAt: Date;
  readonly hint: string;
}

/** A result of BatchNewX509SVID: an SVID, or the per-entry status the server gave instead. */
export type X509SvidResult =
  | { readonly entryId: string; readonly svid: MintedX509Svid }
  | { readonly entryId: string; readonly error: { readonly code: number; readonly message: string } };

/**
 * A session with the server authenticated by the agent's SVID (mTLS), the server authenticated as
 * `spiffe://<trust domain>/spire/server` against the trust bundle given when it was opened.
 */
export interface SpireSession {
  /** entry.v1.Entry/GetAuthorizedEntries: every entry this agent may serve. */
  authorizedEntries(signal?: AbortSignal): Promise<SpireEntry[]>;
  /** svid.v1.SVID/BatchNewX509SVID: one result per request, in the same order. */
  newX509Svids(
    requests: readonly { readonly entryId: string; readonly csr: Buffer }[],
    signal?: AbortSignal,
  ): Promise<X509SvidResult[]>;
  /** svid.v1.SVID/NewJWTSVID for one entry. */
  newJwtSvid(entryId: string, audience: readonly string[], signal?: AbortSignal): Promise<MintedJwtSvid>;
  /** bundle.v1.Bundle/GetBundle: the server's own trust domain. */
  bundle(signal?: AbortSignal): Promise<SpiffeBundle>;
  /**
   * SHA-256 fingerprints (as X509Certificate.fingerprint256) of the X.509 authorities the last `bundle()` answer
   * marked tainted (`localauthority x509 taint`: a key to stop trusting soon). SVIDs under them are re-minted.
   */
  taintedX509Authorities(): ReadonlySet<string>;
  /** bundle.v1.Bundle/GetFederatedBundle; undefined when the server has none (NotFound). */
  federatedBundle(trustDomain: string, signal?: AbortSignal): Promise<SpiffeBundle | undefined>;
  /** agent.v1.Agent/RenewAgent with a CSR of a fresh key: the renewed agent SVID's chain. */
  renewAgent(csr: Buffer, signal?: AbortSignal): Promise<MintedX509Svid>;
  close(): void;
}
