import { KeyObject, randomBytes, type webcrypto, X509Certificate } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import type { StateDir } from '../config/statedir.ts';
import { type JwtAuthority, SpiffeBundle } from '../spiffe/bundle.ts';
import type { SpiffeId, TrustDomain } from '../spiffe/id.ts';
import type { JwtSigner } from '../spiffe/jwtsvid.ts';
import { parseCertificates, parsePrivateKey } from '../spiffe/x509svid.ts';
import { CA_STATE_FILE, decodeCaState, encodeCaState } from './ca-state.ts';
import { AgentError, AgentErrorCode } from './errors.ts';
import {
  generateKeyPair,
  type KeyType,
  randomKid,
  randomSerial,
  signingAlgorithm,
  toSigningKey,
  x509,
} from './keys.ts';

/**
 * The embedded default: a local CA for one trust domain.
 *
 * Each CA generation ("slot") has an X.509 signing key and a JWT signing key and lives `caTtlSeconds`.
 * Rotation follows SPIRE's schedule so that no SVID is ever signed by an authority its peers do not know yet:
 *   - at half the active CA's life the next CA is prepared and published in the bundle, but signs nothing;
 *   - at five sixths of its life the next CA becomes active;
 *   - a retired CA stays in the bundle until it expires, and every SVID it signed expires no later than it.
 * With a state directory, every CA generation (keys, certificates, JWT key) and the bundle's sequence number are
 * written to `ca.json` there before anyone is told about them, and `create` resumes from that file: the same CA,
 * the same bundle, the rotation schedule where it was. Without one, keys live in memory only and a restart
 * starts a new, unrelated CA (its name still differs, by a random suffix). With an upstream (SPIRE's "disk" UpstreamAuthority), each slot is an intermediate
 * signed by the organisation's CA and the bundle holds the organisation's roots. A replaced upstream (its files
 * re-read on SIGHUP) signs from the next slot on; its roots are published at once, and the old roots stay while
 * a slot that chains to them lives.
 */

export interface UpstreamAuthority {
  /** The organisation's signing CA certificate, then any intermediates up to (not including) the root. */
  readonly certificates: readonly X509Certificate[];
  readonly privateKey: KeyObject;
  /** The roots published in the bundle: from `bundleFile`, or the upstream certificate itself if self-signed. */
  readonly roots: readonly X509Certificate[];
}

export interface LocalCaOptions {
  readonly trustDomain: TrustDomain;
  /** Key type of the CA slots (default ec-p256). */
  readonly keyType?: KeyType;
  /** Lifetime of each CA slot, seconds (default 24 h). */
  readonly caTtlSeconds?: number;
  readonly upstream?: UpstreamAuthority;
  /** Injected clock for tests and benches. */
  readonly now?: () => Date;
  /** Subject organisation of the CA certificates. */
  readonly organization?: string;
  /** Where the CA keeps its state (`ca.json`); without it, keys live in memory only. */
  readonly stateDir?: StateDir;
}

export const DEFAULT_CA_TTL_SECONDS = 24 * 3600;
/** Certificates are backdated this much to tolerate clock skew between hosts (SPIRE does the same). */
export const BACKDATE_SECONDS = 10;

const PREPARE_AT = 1 / 2;
const ACTIVATE_AT = 5 / 6;
const MAX_TIMER_MS = 2 ** 31 - 1;

export interface CaSlot {
  /** 1 for the first CA, then 2, 3, … */
  readonly generation: number;
  readonly certificate: X509Certificate;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** When it was minted (notBefore is backdated); its rotation schedule counts from here. */
  readonly issuedAt: Date;
  /** Certificates a leaf it signs must present after itself: this CA when it is an intermediate, and upstream's. */
  readonly intermediates: readonly X509Certificate[];
  /** The trust anchors its chain ends at: itself when self-signed, else the upstream roots it was minted under. */
  readonly roots: readonly X509Certificate[];
  readonly jwtAuthority: JwtAuthority;
  /** @internal */
  readonly signingKey: webcrypto.CryptoKey;
  /** @internal */
  readonly peculiarCert: x509.X509Certificate;
  /** @internal */
  readonly jwtPrivateKey: KeyObject;
  /** @internal The CA's signing key as a KeyObject: what the state file stores. */
  readonly privateKey: KeyObject;
}

export interface SignX509SvidRequest {
  readonly id: SpiffeId;
  readonly publicKey: webcrypto.CryptoKey;
  readonly ttlSeconds: number;
  readonly dnsNames?: readonly string[];
}

export interface SignedX509Svid {
  /** Leaf first, then intermediates; never the root. */
  readonly certificates: readonly X509Certificate[];
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** The CA slot that signed it. */
  readonly generation: number;
}

export interface LocalCaEvents {
  /** The published bundle changed (a CA prepared, pruned or a JWT key added/removed). */
  bundle: [SpiffeBundle];
  /** A prepared CA became the active one. */
  activated: [CaSlot];
  /**
   * Writing the state file failed. The CA goes on in memory (refusing to sign would stop every workload), but a
   * restart before the next successful write loses what changed since.
   */
  persistError: [Error];
}

export class LocalCa extends EventEmitter<LocalCaEvents> {
  readonly trustDomain: TrustDomain;
  readonly keyType: KeyType;
  readonly caTtlSeconds: number;
  #upstream: UpstreamAuthority | undefined;
  readonly #now: () => Date;
  readonly #organization: string;
  #active!: CaSlot;
  #next: CaSlot | undefined;
  #retired: CaSlot[] = [];
  #bundle!: SpiffeBundle;
  #sequence = 0n;
  #timer: NodeJS.Timeout | undefined;
  #closed = false;
  #ticking: Promise<void> = Promise.resolve();
  readonly #stateDir: StateDir | undefined;
  #persisting: Promise<void> = Promise.resolve();
  /** How the CA came to be: minted now, or resumed from the state directory. */
  #origin: 'new' | 'resumed' = 'new';

  private constructor(options: LocalCaOptions) {
    super();
    this.trustDomain = options.trustDomain;
    this.keyType = options.keyType ?? 'ec-p256';
    this.caTtlSeconds = options.caTtlSeconds ?? DEFAULT_CA_TTL_SECONDS;
    if (!(this.caTtlSeconds >= 6))
      throw new RangeError(`caTtl must be at least 6 s, got ${this.caTtlSeconds}`);
    this.#upstream = options.upstream;
    this.#now = options.now ?? (() => new Date());
    this.#organization = options.organization ?? 'kube-svid-proxy';
    this.#stateDir = options.stateDir;
  }

  /**
   * Resumes the CA from the state directory when it holds one, else mints the first CA slot; publishes the
   * bundle either way. A state file that cannot be used (corrupt, another trust domain, a key that does not
   * match its certificate) is refused, never replaced: replacing it would silently invalidate every SVID and
   * every copy of the bundle held elsewhere. Call `start()` to begin rotating.
   */
  static async create(options: LocalCaOptions): Promise<LocalCa> {
    const ca = new LocalCa(options);
    const stored = await ca.#load();
    if (stored === undefined) {
      ca.#active = await ca.#mintSlot(1);
      ca.#publishAs(1n);
    } else {
      ca.#origin = 'resumed';
      ca.#active = stored.active;
      ca.#next = stored.next;
      ca.#retired = [...stored.retired];
      ca.#sequence = stored.sequence;
      // Catch up with the schedule: the agent may have been down through a preparation, an activation or an
      // expiry. Republishing bumps the sequence only when something changed.
      await ca.#tick();
      // After a downtime longer than a CA lives, one tick may activate a prepared CA that has expired too: go on
      // until the CA that signs is valid (the next tick prepares and activates a fresh one).
      for (let i = 0; i < 3 && ca.#active.notAfter.getTime() <= ca.#now().getTime(); i++) await ca.#tick();
      if (ca.#bundle === undefined) ca.#publishAs(ca.#sequence);
    }
    await ca.#persisting;
    // Before anyone is handed an SVID: a CA that cannot be kept would be replaced at the next restart.
    await ca.#writeState();
    return ca;
  }

  /** `resumed` when the CA was read back from the state directory, `new` when it was minted by this process. */
  get origin(): 'new' | 'resumed' {
    return this.#origin;
  }

  /** Resolves once the state written so far is on disk (tests; shutdown). */
  flushed(): Promise<void> {
    return this.#persisting;
  }

  get active(): CaSlot {
    return this.#active;
  }

  get next(): CaSlot | undefined {
    return this.#next;
  }

  /** The current bundle of our trust domain: every CA and JWT key that may have signed a live SVID, or soon will. */
  get bundle(): SpiffeBundle {
    return this.#bundle;
  }

  /** The signer for new JWT-SVIDs, and the latest expiry a token it signs may have. */
  jwtSigner(): { signer: JwtSigner; notAfter: Date } {
    const slot = this.#active;
    return {
      signer: { kid: slot.jwtAuthority.kid, privateKey: slot.jwtPrivateKey },
      notAfter: slot.notAfter,
    };
  }

  /**
   * Replaces the upstream authority (its files were re-read): the next CA generation is signed by it. New roots
   * are published at once, and roots that a live CA generation chains to stay until it expires, so no SVID ever
   * chains to a root its peers were not told about. Returns false when it is the same authority. A self-signed
   * CA cannot take an upstream without a restart.
   */
  setUpstream(upstream: UpstreamAuthority): boolean {
    const current = this.#upstream;
    if (current === undefined) {
      throw new AgentError(
        AgentErrorCode.Ca,
        'this CA is self-signed; adding an upstream authority needs a restart',
      );
    }
    const ids = (u: UpstreamAuthority): string =>
      [...u.certificates, ...u.roots].map((c) => c.fingerprint256).join(',');
    if (ids(current) === ids(upstream)) return false;
    const before = this.#authorities();
    this.#upstream = upstream;
    if (fingerprintsOf(this.#authorities()) !== fingerprintsOf(before)) this.#republish();
    return true;
  }

  /** Starts the rotation schedule. Timers are unref'd: they never keep the process alive by themselves. */
  start(): void {
    this.#schedule();
  }

  close(): void {
    this.#closed = true;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** Runs the rotation schedule now (tests and benches drive it with an injected clock). */
  async tick(): Promise<void> {
    this.#ticking = this.#ticking.then(() => this.#tick());
    await this.#ticking;
  }

  /**
   * Prepares the next CA now instead of at half-life (SPIRE: `localauthority x509 prepare`): it is published in
   * the bundle and persisted, but signs nothing until `activate()` or its scheduled time. No-op when one is ready.
   */
  async prepare(): Promise<CaSlot> {
    const run = async (): Promise<CaSlot> => {
      if (this.#next === undefined) {
        this.#next = await this.#mintSlot(this.#active.generation + 1);
        this.#republish();
      }
      return this.#next;
    };
    const done = this.#ticking.then(run);
    this.#ticking = done.then(
      () => undefined,
      () => undefined,
    );
    return done;
  }

  /**
   * Makes the prepared CA the active one now (SPIRE: `localauthority x509 activate`). Only safe once peers have
   * fetched the bundle that announces it; the schedule does this by itself at 5/6 of the active CA's life.
   */
  async activate(): Promise<CaSlot> {
    const run = async (): Promise<CaSlot> => {
      const next = this.#next;
      if (next === undefined)
        throw new AgentError(AgentErrorCode.Ca, 'no prepared CA to activate: prepare one first');
      this.#retired.push(this.#active);
      this.#active = next;
      this.#next = undefined;
      this.#republish();
      this.emit('activated', next);
      if (this.#timer) {
        clearTimeout(this.#timer);
        this.#schedule();
      }
      return next;
    };
    const done = this.#ticking.then(run);
    this.#ticking = done.then(
      () => undefined,
      () => undefined,
    );
    return done;
  }

  async signX509Svid(request: SignX509SvidRequest): Promise<SignedX509Svid> {
    const slot = this.#active;
    const now = this.#now();
    const notBefore = new Date(Math.max(now.getTime() - BACKDATE_SECONDS * 1000, slot.notBefore.getTime()));
    const notAfter = new Date(Math.min(now.getTime() + request.ttlSeconds * 1000, slot.notAfter.getTime()));
    const dnsNames = request.dnsNames ?? [];
    const names: x509.JsonGeneralName[] = [
      { type: 'url', value: request.id.toString() },
      ...dnsNames.map((value): x509.JsonGeneralName => ({ type: 'dns', value })),
    ];
    const isRsa = request.publicKey.algorithm.name === 'RSASSA-PKCS1-v1_5';
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: subjectName(this.#organization, dnsNames[0]),
      issuer: slot.peculiarCert.subjectName,
      notBefore,
      notAfter,
      publicKey: request.publicKey,
      signingKey: slot.signingKey,
      signingAlgorithm: signingAlgorithm(slot.signingKey),
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(
          x509.KeyUsageFlags.digitalSignature | (isRsa ? x509.KeyUsageFlags.keyEncipherment : 0),
          true,
        ),
        new x509.ExtendedKeyUsageExtension([
          x509.ExtendedKeyUsage.serverAuth,
          x509.ExtendedKeyUsage.clientAuth,
        ]),
        await x509.SubjectKeyIdentifierExtension.create(request.publicKey),
        new x509.AuthorityKeyIdentifierExtension(subjectKeyId(slot.peculiarCert), false),
        new x509.SubjectAlternativeNameExtension(names, false),
      ],
    });
    return {
      certificates: [new X509Certificate(Buffer.from(cert.rawData)), ...slot.intermediates],
      notBefore,
      notAfter,
      generation: slot.generation,
    };
  }

  async #tick(): Promise<void> {
    if (this.#closed) return;
    const now = this.#now().getTime();
    const active = this.#active;
    const life = active.notAfter.getTime() - active.issuedAt.getTime();
    let changed = false;
    if (this.#next === undefined && now >= active.issuedAt.getTime() + life * PREPARE_AT) {
      this.#next = await this.#mintSlot(active.generation + 1);
      changed = true;
    }
    const next = this.#next;
    if (next !== undefined && now >= this.#activateAt(active, next)) {
      this.#retired.push(active);
      this.#active = next;
      this.#next = undefined;
      changed = true;
      this.emit('activated', next);
    }
    const before = this.#retired.length;
    this.#retired = this.#retired.filter((slot) => slot.notAfter.getTime() > now);
    if (this.#retired.length !== before) changed = true;
    if (changed) this.#republish();
  }

  /**
   * When `next` may start signing: at 5/6 of the active CA's life, but never before peers had time to fetch the
   * bundle that announces it (the normal gap of a third of a life, or half of what the active CA has left when
   * the schedule was late, e.g. after a suspended host wakes up).
   */
  #activateAt(active: CaSlot, next: CaSlot): number {
    const start = active.issuedAt.getTime();
    const life = active.notAfter.getTime() - start;
    const published = next.issuedAt.getTime();
    const propagation = Math.min(
      life * (ACTIVATE_AT - PREPARE_AT),
      (active.notAfter.getTime() - published) / 2,
    );
    return Math.max(start + life * ACTIVATE_AT, published + propagation);
  }

  #schedule(): void {
    if (this.#closed) return;
    const active = this.#active;
    const start = active.issuedAt.getTime();
    const life = active.notAfter.getTime() - start;
    const due = [
      this.#next === undefined ? start + life * PREPARE_AT : this.#activateAt(active, this.#next),
      ...this.#retired.map((slot) => slot.notAfter.getTime()),
    ];
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, Math.min(...due) - this.#now().getTime()));
    this.#timer = setTimeout(() => {
      this.tick().then(
        () => this.#schedule(),
        // Minting a slot only fails on a crypto error; try again shortly rather than stop rotating.
        () => setTimeout(() => this.#schedule(), 1000).unref(),
      );
    }, delay);
    this.#timer.unref();
  }

  #slots(): CaSlot[] {
    return [...this.#retired, this.#active, ...(this.#next ? [this.#next] : [])];
  }

  /** Every root a live slot chains to, then the current upstream's, each once. */
  #authorities(): X509Certificate[] {
    const seen = new Map<string, X509Certificate>();
    for (const root of [...this.#slots().flatMap((slot) => slot.roots), ...(this.#upstream?.roots ?? [])]) {
      if (!seen.has(root.fingerprint256)) seen.set(root.fingerprint256, root);
    }
    return [...seen.values()];
  }

  #republish(): void {
    this.#publishAs(this.#sequence + 1n);
    this.#persisting = this.#persisting.then(() => this.#persist());
    this.emit('bundle', this.#bundle);
  }

  #publishAs(sequence: bigint): void {
    const slots = this.#slots();
    this.#sequence = sequence;
    this.#bundle = new SpiffeBundle(this.trustDomain, {
      x509Authorities: this.#authorities(),
      jwtAuthorities: slots.map((slot) => slot.jwtAuthority),
      sequence,
    });
  }

  /** Writes the current slots and sequence to the state directory; failures are reported, never thrown. */
  async #persist(): Promise<void> {
    try {
      await this.#writeState();
    } catch (err) {
      this.emit('persistError', err as Error);
    }
  }

  async #writeState(): Promise<void> {
    const dir = this.#stateDir;
    if (dir === undefined) return;
    await dir.write(
      CA_STATE_FILE,
      encodeCaState({
        trustDomain: this.trustDomain,
        sequence: this.#sequence,
        active: this.#active,
        ...(this.#next ? { next: this.#next } : {}),
        retired: this.#retired,
        bundle: this.#bundle,
      }),
    );
  }

  async #load(): Promise<Awaited<ReturnType<typeof decodeCaState>> | undefined> {
    const dir = this.#stateDir;
    if (dir === undefined) return undefined;
    const data = await dir.read(CA_STATE_FILE);
    if (data === undefined) return undefined;
    const file = `${dir.path}/${CA_STATE_FILE}`;
    try {
      return decodeCaState(data.toString('utf8'), this.trustDomain);
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Ca,
        `${file}: ${(err as Error).message}. The agent will not replace it: a new CA would invalidate every SVID ` +
          'and every copy of the bundle issued so far. Fix or restore the file, or move it aside on purpose to start a new CA',
        { cause: err },
      );
    }
  }

  async #mintSlot(generation: number): Promise<CaSlot> {
    const now = this.#now().getTime();
    const upstream = this.#upstream;
    const notBefore = new Date(now - BACKDATE_SECONDS * 1000);
    let notAfter = new Date(now + this.caTtlSeconds * 1000);
    const keys = await generateKeyPair(this.keyType);
    const jwtKeys = await generateKeyPair(this.keyType);
    const trustDomainId = this.trustDomain.idString;
    // The generation continues across restarts (state directory); the random suffix tells apart two CAs that
    // share a generation (two agents without state, or a state directory deliberately started afresh).
    const subject = `O=${this.#organization}, CN=${this.trustDomain.name} CA ${generation} ${randomBytes(4).toString('hex')}`;
    const extensions = [
      new x509.BasicConstraintsExtension(true, upstream ? 0 : undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      // A signing certificate may carry the trust domain ID, without a path (X509-SVID §3.2).
      new x509.SubjectAlternativeNameExtension([{ type: 'url', value: trustDomainId }], false),
    ];
    let cert: x509.X509Certificate;
    let intermediates: X509Certificate[] = [];
    if (upstream === undefined) {
      cert = await x509.X509CertificateGenerator.createSelfSigned({
        serialNumber: randomSerial(),
        name: subject,
        notBefore,
        notAfter,
        keys,
        signingAlgorithm: signingAlgorithm(keys.privateKey),
        extensions,
      });
    } else {
      const upstreamCert = upstream.certificates[0] as X509Certificate;
      const upstreamEnd = new Date(upstreamCert.validTo);
      if (notAfter > upstreamEnd) notAfter = upstreamEnd;
      if (notAfter.getTime() <= now) {
        throw new AgentError(
          AgentErrorCode.Ca,
          `the upstream CA certificate expired at ${upstreamCert.validTo}`,
        );
      }
      const issuer = new x509.X509Certificate(upstreamCert.raw);
      const signingKey = toSigningKey(upstream.privateKey);
      const ski = issuer.getExtension(x509.SubjectKeyIdentifierExtension);
      cert = await x509.X509CertificateGenerator.create({
        serialNumber: randomSerial(),
        subject,
        issuer: issuer.subjectName,
        notBefore,
        notAfter,
        publicKey: keys.publicKey,
        signingKey,
        signingAlgorithm: signingAlgorithm(signingKey),
        extensions: ski
          ? [...extensions, new x509.AuthorityKeyIdentifierExtension(ski.keyId, false)]
          : extensions,
      });
      const own = new X509Certificate(Buffer.from(cert.rawData));
      // Present the upstream chain too, except a self-signed upstream root, which peers have in the bundle.
      intermediates = [own, ...upstream.certificates.filter((c) => !isSelfSigned(c))];
    }
    const certificate = new X509Certificate(Buffer.from(cert.rawData));
    return {
      generation,
      certificate,
      notBefore,
      notAfter,
      issuedAt: new Date(now),
      intermediates,
      roots: upstream ? upstream.roots : [certificate],
      jwtAuthority: { kid: randomKid(), publicKey: KeyObject.from(jwtKeys.publicKey) },
      signingKey: keys.privateKey,
      peculiarCert: cert,
      jwtPrivateKey: KeyObject.from(jwtKeys.privateKey),
      privateKey: KeyObject.from(keys.privateKey),
    };
  }
}

function fingerprintsOf(certs: readonly X509Certificate[]): string {
  return certs.map((c) => c.fingerprint256).join(',');
}

function subjectName(organization: string, commonName: string | undefined): string {
  return commonName === undefined ? `O=${organization}` : `O=${organization}, CN=${commonName}`;
}

function subjectKeyId(cert: x509.X509Certificate): string {
  const ski = cert.getExtension(x509.SubjectKeyIdentifierExtension);
  if (!ski)
    throw new AgentError(AgentErrorCode.Ca, `CA certificate ${cert.subject} has no SubjectKeyIdentifier`);
  return ski.keyId;
}

function isSelfSigned(cert: X509Certificate): boolean {
  return cert.issuer === cert.subject && cert.checkIssued(cert) && cert.verify(cert.publicKey);
}

export interface UpstreamFiles {
  /** The organisation's CA certificate that signs our CA, then its intermediates (PEM). */
  readonly certFile: string;
  /** Its private key (PKCS#8 PEM). */
  readonly keyFile: string;
  /** The organisation's root(s) to publish (PEM). Optional when `certFile` is itself a self-signed root. */
  readonly bundleFile?: string;
}

/**
 * Loads and checks an upstream authority: a CA certificate able to sign, a key that matches it, and a chain
 * that ends at one of the published roots. Every problem is refused with ERR_AGENT_CA naming the file.
 */
export async function loadUpstreamAuthority(
  files: UpstreamFiles,
  now = new Date(),
): Promise<UpstreamAuthority> {
  const fail = (message: string, cause?: unknown): never => {
    throw new AgentError(AgentErrorCode.Ca, message, { cause });
  };
  const read = async (file: string): Promise<Buffer> => {
    try {
      return await readFile(file);
    } catch (err) {
      return fail(`cannot read ${file}: ${(err as Error).message}`, err);
    }
  };
  let certificates: X509Certificate[] = [];
  let privateKey: KeyObject | undefined;
  try {
    certificates = parseCertificates(await read(files.certFile));
  } catch (err) {
    fail(`${files.certFile}: ${(err as Error).message}`, err);
  }
  try {
    privateKey = parsePrivateKey(await read(files.keyFile));
  } catch (err) {
    fail(`${files.keyFile}: ${(err as Error).message}`, err);
  }
  const signer = certificates[0] as X509Certificate;
  if (!signer.ca) fail(`${files.certFile}: the first certificate (${signer.subject}) is not a CA`);
  const ku = new x509.X509Certificate(signer.raw).getExtension(x509.KeyUsagesExtension);
  if (ku && (ku.usages & x509.KeyUsageFlags.keyCertSign) === 0) {
    fail(`${files.certFile}: the CA certificate may not sign certificates (no keyCertSign)`);
  }
  if (!signer.checkPrivateKey(privateKey as KeyObject)) {
    fail(`${files.keyFile} does not match the certificate in ${files.certFile}`);
  }
  if (new Date(signer.validTo) <= now)
    fail(`${files.certFile}: the CA certificate expired at ${signer.validTo}`);
  let roots: X509Certificate[];
  if (files.bundleFile !== undefined) {
    try {
      roots = parseCertificates(await read(files.bundleFile));
    } catch (err) {
      return fail(`${files.bundleFile}: ${(err as Error).message}`, err);
    }
  } else if (isSelfSigned(certificates.at(-1) as X509Certificate)) {
    roots = [certificates.at(-1) as X509Certificate];
  } else {
    return fail(`${files.certFile} does not end in a self-signed root, so bundleFile is required`);
  }
  // The chain must lead from the signer to a published root, link by link.
  for (let i = 0; i < certificates.length; i++) {
    const cert = certificates[i] as X509Certificate;
    if (roots.some((root) => root.fingerprint256 === cert.fingerprint256)) break;
    const parent =
      certificates[i + 1] ?? roots.find((root) => cert.checkIssued(root) && cert.verify(root.publicKey));
    if (parent === undefined || !cert.checkIssued(parent) || !cert.verify(parent.publicKey)) {
      fail(
        `${files.certFile}: "${cert.subject}" is not signed by the next certificate or by a root in the bundle`,
      );
    }
    if (certificates[i + 1] === undefined) break;
  }
  // Our CA is one more CA under the signer: every CA above it must allow that (RFC 5280 §4.2.1.9).
  const last = certificates.at(-1) as X509Certificate;
  const root = roots.find((r) => last.checkIssued(r) && last.verify(r.publicKey));
  let below = 1;
  for (const cert of root === undefined ? certificates : [...certificates, root]) {
    const pathLen = new x509.X509Certificate(cert.raw).getExtension(
      x509.BasicConstraintsExtension,
    )?.pathLength;
    if (pathLen !== undefined && below > pathLen) {
      fail(
        `${files.certFile}: "${cert.subject}" has pathLenConstraint ${pathLen}, leaving no room for our CA below it`,
      );
    }
    if (roots.some((r) => r.fingerprint256 === cert.fingerprint256)) break;
    if (cert.issuer !== cert.subject) below++;
  }
  return { certificates, privateKey: privateKey as KeyObject, roots };
}
