import { KeyObject, randomInt } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { SpiffeId } from '../spiffe/id.ts';
import { type JwtSvid, mintJwtSvid } from '../spiffe/jwtsvid.ts';
import type { X509Svid } from '../spiffe/x509svid.ts';
import type { LocalCa } from './ca.ts';
import type { RegistrationEntry } from './entries.ts';
import { generateKeyPair, type KeyType } from './keys.ts';

/** An X.509-SVID the agent minted for one registration entry, with what the Workload API needs to send it. */
export interface IssuedX509Svid {
  readonly entryKey: string;
  readonly id: SpiffeId;
  readonly hint?: string;
  readonly svid: X509Svid;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** When the issuer will replace it: half-life, less jitter. */
  readonly rotateAt: Date;
  /** PKCS#8 DER of the private key (what the Workload API sends; never logged). */
  readonly keyDer: Buffer;
  /** Leaf then intermediates, concatenated DER. */
  readonly chainDer: Buffer;
  /** The CA generation that signed it. */
  readonly caGeneration: number;
}

export interface SvidIssuerOptions {
  readonly ca: LocalCa;
  readonly keyType?: KeyType;
  /** Default X.509-SVID lifetime, seconds (1 h). An entry's own TTL wins. */
  readonly x509SvidTtlSeconds?: number;
  /** Default JWT-SVID lifetime, seconds (5 min). */
  readonly jwtSvidTtlSeconds?: number;
  /** Rotation happens up to this fraction of the lifetime before half-life, spreading load (default 0.1). */
  readonly jitter?: number;
  readonly now?: () => Date;
}

export interface SvidIssuerEvents {
  /** The SVID of this entry was replaced. */
  rotated: [IssuedX509Svid];
  /** Minting failed; the previous SVID (if any) stays in use and minting is retried. */
  error: [Error, string];
}

export const DEFAULT_X509_SVID_TTL_SECONDS = 3600;
export const DEFAULT_JWT_SVID_TTL_SECONDS = 300;
const RETRY_MS = 1000;
const MAX_TIMER_MS = 2 ** 31 - 1;

interface Slot {
  entry: RegistrationEntry;
  current?: IssuedX509Svid;
  minting?: Promise<IssuedX509Svid>;
  timer?: NodeJS.Timeout;
}

/**
 * Mints SVIDs for registration entries and rotates them at half-life. Like SPIRE's agent, one SVID serves every
 * workload that matches its entry; an edited entry has a new key, so it gets a new SVID. JWT-SVIDs are cached
 * per entry and audience until half their life has passed.
 */
export class SvidIssuer extends EventEmitter<SvidIssuerEvents> {
  readonly #ca: LocalCa;
  readonly #keyType: KeyType;
  readonly #x509Ttl: number;
  readonly #jwtTtl: number;
  readonly #jitter: number;
  readonly #now: () => Date;
  readonly #slots = new Map<string, Slot>();
  readonly #jwtCache = new Map<string, { svid: JwtSvid; refreshAt: number }>();
  #closed = false;

  constructor(options: SvidIssuerOptions) {
    super();
    this.#ca = options.ca;
    this.#keyType = options.keyType ?? 'ec-p256';
    this.#x509Ttl = options.x509SvidTtlSeconds ?? DEFAULT_X509_SVID_TTL_SECONDS;
    this.#jwtTtl = options.jwtSvidTtlSeconds ?? DEFAULT_JWT_SVID_TTL_SECONDS;
    this.#jitter = options.jitter ?? 0.1;
    this.#now = options.now ?? (() => new Date());
  }

  /** The entry's current SVID, minted on first use. */
  x509For(entry: RegistrationEntry): Promise<IssuedX509Svid> {
    let slot = this.#slots.get(entry.key);
    if (slot === undefined) {
      slot = { entry };
      this.#slots.set(entry.key, slot);
    }
    if (slot.current !== undefined && slot.current.notAfter.getTime() > this.#now().getTime()) {
      return Promise.resolve(slot.current);
    }
    return this.#mint(slot);
  }

  /** The cached SVID for an entry, if one was minted. */
  peek(entryKey: string): IssuedX509Svid | undefined {
    return this.#slots.get(entryKey)?.current;
  }

  async jwtFor(entry: RegistrationEntry, audience: readonly string[]): Promise<JwtSvid> {
    const cacheKey = `${entry.key}\0${[...audience].sort().join('\0')}`;
    const now = this.#now();
    const cached = this.#jwtCache.get(cacheKey);
    if (cached !== undefined && now.getTime() < cached.refreshAt) return cached.svid;
    const { signer, notAfter } = this.#ca.jwtSigner();
    const wanted = entry.jwtSvidTtlSeconds ?? this.#jwtTtl;
    const ttlSeconds = Math.max(1, Math.min(wanted, Math.floor((notAfter.getTime() - now.getTime()) / 1000)));
    const minted = await mintJwtSvid({ id: entry.spiffeId, audience, signer, ttlSeconds, now });
    const svid: JwtSvid = entry.hint === undefined ? minted : { ...minted, hint: entry.hint };
    this.#jwtCache.set(cacheKey, { svid, refreshAt: now.getTime() + (ttlSeconds * 1000) / 2 });
    return svid;
  }

  /** Forget the SVIDs of entries that are gone (an edited entry counts as gone: its key changed). */
  retain(entries: readonly RegistrationEntry[]): void {
    const keep = new Set(entries.map((e) => e.key));
    for (const [key, slot] of this.#slots) {
      if (keep.has(key)) continue;
      if (slot.timer) clearTimeout(slot.timer);
      this.#slots.delete(key);
    }
    for (const key of this.#jwtCache.keys()) {
      if (!keep.has(key.slice(0, key.indexOf('\0')))) this.#jwtCache.delete(key);
    }
  }

  close(): void {
    this.#closed = true;
    for (const slot of this.#slots.values()) if (slot.timer) clearTimeout(slot.timer);
    this.#slots.clear();
    this.#jwtCache.clear();
  }

  #mint(slot: Slot): Promise<IssuedX509Svid> {
    if (slot.minting) return slot.minting;
    const minting = this.#mintFor(slot.entry).then(
      (issued) => {
        slot.minting = undefined;
        if (this.#closed || this.#slots.get(slot.entry.key) !== slot) return issued;
        const replaced = slot.current !== undefined;
        slot.current = issued;
        this.#arm(slot, issued.rotateAt.getTime());
        if (replaced) this.emit('rotated', issued);
        return issued;
      },
      (err: Error) => {
        slot.minting = undefined;
        if (!this.#closed && this.#slots.get(slot.entry.key) === slot)
          this.#arm(slot, this.#now().getTime() + RETRY_MS);
        this.emit('error', err, slot.entry.spiffeId.toString());
        throw err;
      },
    );
    slot.minting = minting;
    return minting;
  }

  #arm(slot: Slot, at: number): void {
    if (slot.timer) clearTimeout(slot.timer);
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, at - this.#now().getTime()));
    slot.timer = setTimeout(() => {
      slot.timer = undefined;
      this.#mint(slot).catch(() => {
        // Reported through the 'error' event; the current SVID stays until it expires.
      });
    }, delay);
    slot.timer.unref();
  }

  async #mintFor(entry: RegistrationEntry): Promise<IssuedX509Svid> {
    const keys = await generateKeyPair(this.#keyType);
    const issuedAt = this.#now().getTime();
    const signed = await this.#ca.signX509Svid({
      id: entry.spiffeId,
      publicKey: keys.publicKey,
      ttlSeconds: entry.x509SvidTtlSeconds ?? this.#x509Ttl,
      dnsNames: entry.dnsNames,
    });
    const privateKey = KeyObject.from(keys.privateKey);
    const life = signed.notAfter.getTime() - issuedAt;
    const jitter = this.#jitter > 0 ? randomInt(0, Math.max(1, Math.floor(life * this.#jitter))) : 0;
    return {
      entryKey: entry.key,
      id: entry.spiffeId,
      ...(entry.hint === undefined ? {} : { hint: entry.hint }),
      svid: {
        id: entry.spiffeId,
        certificates: signed.certificates,
        privateKey,
        ...(entry.hint === undefined ? {} : { hint: entry.hint }),
      },
      notBefore: signed.notBefore,
      notAfter: signed.notAfter,
      rotateAt: new Date(issuedAt + life / 2 - jitter),
      keyDer: privateKey.export({ format: 'der', type: 'pkcs8' }),
      chainDer: Buffer.concat(signed.certificates.map((c) => c.raw)),
      caGeneration: signed.generation,
    };
  }
}
