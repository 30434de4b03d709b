/**
 * What the front door trusts and presents: the bundles of the trust domains clients may come from (ours and those
 * the policy names), recomputed only when the bundles or the policy change, and the TLS context new handshakes
 * get (the current SVID). A change that removes an authority also replaces the session ticket keys, so no
 * session resumes under the old trust. Request handling lives in server.ts.
 */
import { constants as cryptoConstants, randomBytes } from 'node:crypto';
import type { SecureContextOptions } from 'node:tls';
import type { Logger } from 'pino';
import type { CompiledPolicy } from '../policy/types.ts';
import { BundleSet } from '../spiffe/bundle.ts';
import type { TrustDomain } from '../spiffe/id.ts';
import type { X509Svid } from '../spiffe/x509svid.ts';
import type { TrustState } from './authenticate.ts';
import type { IdentitySource } from './source.ts';

/** The policy as the proxy sees it: the current compiled policy and its generation, swapped whole on reload. */
export interface PolicyHolder {
  readonly current: CompiledPolicy;
  readonly generation: number;
}

/** Where new TLS contexts and ticket keys go: the front door's TLS server. */
export interface TlsContextTarget {
  setSecureContext(options: SecureContextOptions): void;
  setTicketKeys(keys: Buffer): void;
}

export class ServingTrust {
  readonly #trustDomain: TrustDomain;
  readonly #source: IdentitySource;
  readonly #policy: PolicyHolder;
  readonly #log: Logger;
  #target: TlsContextTarget | undefined;
  #state: TrustState = { bundles: new BundleSet(), generation: 0 };
  #key = '';
  #roots = new Set<string>();
  /** The inputs the state was last computed from; unchanged objects mean nothing to recompute. */
  #inputs: { bundles: BundleSet; policy: CompiledPolicy } | undefined;
  /** Why the identity source has no SVID to serve with, while it has none. */
  #withoutSvid: string | undefined;

  constructor(options: {
    trustDomain: TrustDomain;
    source: IdentitySource;
    policy: PolicyHolder;
    logger: Logger;
  }) {
    this.#trustDomain = options.trustDomain;
    this.#source = options.source;
    this.#policy = options.policy;
    this.#log = options.logger;
    this.refresh();
  }

  /** From now on, changes install new contexts (and ticket keys) on `target`. */
  attach(target: TlsContextTarget): void {
    this.#target = target;
  }

  /** The bundles clients are verified against, current as of now. */
  get state(): TrustState {
    this.refresh();
    return this.#state;
  }

  /** Why there is no SVID to serve with, or undefined while there is one. */
  get withoutSvid(): string | undefined {
    return this.#withoutSvid;
  }

  /** TLS options for the server's first context; throws when the source has no SVID (at start, that is fatal). */
  initialContext(): SecureContextOptions {
    return this.#contextOptions(this.#source.svid());
  }

  #contextOptions(svid: X509Svid): SecureContextOptions {
    return {
      // TLS 1.2 renegotiation is never needed and has a history of attacks: refused.
      secureOptions: cryptoConstants.SSL_OP_NO_RENEGOTIATION,
      cert: svid.certificates.map((c) => c.toString()).join(''),
      key: svid.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
      // No `ca`: the Authenticator decides, against the bundles of the client's own trust domain, and cannot use
      // OpenSSL's verdict (authenticate.ts says why). With our authorities in its store, OpenSSL would only check
      // the same signatures once more on every handshake, and Node would then hand over no intermediates (Node
      // 24.21, nodejs/node#65579). Clients see no CA names: SPIFFE clients present their SVID regardless.
    };
  }

  /** Recomputes the trust state when the bundles or the policy's trust domains changed; true when it changed. */
  refresh(): boolean {
    const policy = this.#policy.current;
    const all = this.#source.bundles();
    // Called on every request: both inputs are immutable values swapped whole, so identity says "unchanged".
    if (this.#inputs?.bundles === all && this.#inputs.policy === policy) return false;
    this.#inputs = { bundles: all, policy };
    const accepted = new Set([this.#trustDomain.name, ...policy.trustDomains]);
    const bundles = new BundleSet(all.bundles().filter((b) => accepted.has(b.trustDomain.name)));
    const roots = new Set(bundles.allX509Authorities().map((c) => c.fingerprint256));
    const key = `${[...roots].sort().join(',')}|${[...accepted].sort().join(',')}`;
    if (key === this.#key) return false;
    const lost = [...this.#roots].some((fp) => !roots.has(fp));
    this.#key = key;
    this.#roots = roots;
    this.#state = { bundles, generation: this.#state.generation + 1 };
    if (this.#target !== undefined) {
      this.#install();
      if (lost) {
        // A removed authority must not live on in resumable sessions: new ticket keys void every old ticket.
        this.#target.setTicketKeys(randomBytes(48));
        this.#log.info('a trust bundle lost an authority: session ticket keys replaced');
      }
    }
    return true;
  }

  /** The identity source changed (SVID rotated, bundles, or the SVID withdrawn): new handshakes follow. */
  identityChanged(): void {
    // A changed trust state installed the new context already; otherwise only the SVID changed.
    if (!this.refresh()) this.#install();
    const svid = this.#svid();
    if (svid === undefined) return;
    this.#log.info(
      {
        spiffeId: svid.id.toString(),
        notAfter: svid.certificates[0]?.validTo,
        trustGeneration: this.#state.generation,
      },
      'serving SVID or bundles updated; new handshakes use them, open connections stay',
    );
  }

  /** The SVID to serve with, or undefined (and why, logged once) while the identity source has none. */
  #svid(): X509Svid | undefined {
    try {
      const svid = this.#source.svid();
      if (this.#withoutSvid !== undefined) {
        this.#log.info(
          { spiffeId: svid.id.toString() },
          'an SVID to serve with is back: accepting clients again',
        );
        this.#withoutSvid = undefined;
      }
      return svid;
    } catch (err) {
      if (this.#withoutSvid === undefined) {
        this.#withoutSvid = (err as Error).message;
        this.#log.error(
          { err: { message: this.#withoutSvid } },
          'no SVID to serve with: new connections are closed after their handshake and /readyz fails until ' +
            'the identity source delivers one again; open connections keep going',
        );
      }
      return undefined;
    }
  }

  /** A new secure context for new handshakes (the current SVID); none while there is no SVID. */
  #install(): void {
    const svid = this.#svid();
    if (svid !== undefined) this.#target?.setSecureContext(this.#contextOptions(svid));
  }
}
