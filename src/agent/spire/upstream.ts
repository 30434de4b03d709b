/**
 * The agent's side of a SPIRE server: node attestation, the agent's own SVID and its renewal, and a sync loop
 * that keeps the authorized entries, their X.509-SVIDs (keys made here, CSRs signed by the server), the trust
 * bundle and the federated bundles the entries name. Everything served comes from what the last good sync
 * brought: while the server is unreachable the cache keeps serving and the loop backs off; a ban stops it.
 */
import {
  createPrivateKey,
  generateKeyPair as generateKeyPairCb,
  type KeyObject,
  randomInt,
  X509Certificate,
} from 'node:crypto';
import { EventEmitter } from 'node:events';
import { promisify } from 'node:util';
import type { Logger } from 'pino';
import type { StateDir } from '../../config/statedir.ts';
import { SpiffeBundle } from '../../spiffe/bundle.ts';
import { SpiffeId, type TrustDomain } from '../../spiffe/id.ts';
import { type JwtSvid, parseJwtSvidInsecure } from '../../spiffe/jwtsvid.ts';
import { AgentError, AgentErrorCode, isAgentError } from '../errors.ts';
import type { KeyType } from '../keys.ts';
import type { Selector } from '../selectors.ts';
import { selectorsMatch } from '../selectors.ts';
import type { ServedX509Svid } from '../workload-api.ts';
import type { AgentSvid, MintedX509Svid, NodeAttestation, SpireEntry, SpireSession } from './types.ts';

const generateKeyPair = promisify(generateKeyPairCb);

/** What the upstream needs of a SPIRE server client (SpireServerClient; a stand-in in unit tests). */
export interface SpireConnector {
  attest(
    bundle: SpiffeBundle,
    attestation: NodeAttestation,
    csr: Buffer,
    signal?: AbortSignal,
  ): Promise<{ svid: MintedX509Svid; reattestable: boolean }>;
  session(
    bundle: SpiffeBundle,
    agent: { readonly certificates: readonly X509Certificate[]; readonly privateKey: KeyObject },
  ): SpireSession;
}

export interface SpireUpstreamOptions {
  readonly trustDomain: TrustDomain;
  readonly connector: SpireConnector;
  /** PKCS#10 DER for a key pair (client.ts `makeCsr`). */
  readonly makeCsr: (privateKey: KeyObject, publicKey: KeyObject) => Promise<Buffer>;
  /** The bundle that authenticates the server at first contact (until a fetched one replaces it). */
  readonly bootstrapBundle: SpiffeBundle;
  /** Evidence for node attestation, read afresh at each attestation (a projected token rotates). */
  readonly attestation: () => Promise<NodeAttestation>;
  /** Keeps the agent SVID, its key and the bundle across restarts; without it they live in memory. */
  readonly stateDir?: StateDir;
  /** Key type of the agent's and the workloads' keys (default ec-p256). */
  readonly keyType?: KeyType;
  /** Between two syncs when all is well (default 5 s, as SPIRE's agent). */
  readonly syncIntervalMs?: number;
  /** The longest wait between two tries while the server fails (default 60 s). */
  readonly maxBackoffMs?: number;
  readonly now?: () => Date;
  readonly logger: Logger;
}

/** An entry as the Workload API matches it. */
export interface ServedEntry {
  readonly entry: SpireEntry;
  readonly selectors: readonly Selector[];
}

/** An entry's X.509-SVID, kept by entry ID. */
interface HeldSvid {
  /** The entry's revision it was minted for: an edit re-mints. */
  readonly revision: bigint;
  readonly served: ServedX509Svid;
  readonly rotateAt: Date;
  /** Leaf first, as the server sent it: a rotation re-mints when its top is no longer under a bundle root. */
  readonly chain: readonly X509Certificate[];
}

interface UpstreamEvents {
  /** Something a caller may see changed: entries, SVIDs, bundles. */
  change: [];
  /** The server no longer accepts this agent; the loop has stopped. */
  banned: [AgentError];
  /** A sync ended: undefined when it succeeded, else why it failed. */
  synced: [AgentError | undefined];
}

/** What `status()` reports (readiness, logs). */
export interface UpstreamStatus {
  readonly agentId?: string;
  readonly agentExpiresAt?: Date;
  readonly lastSync?: Date;
  readonly consecutiveFailures: number;
  readonly lastError?: { readonly code: string; readonly message: string };
  readonly entries: number;
  readonly svids: number;
  readonly banned: boolean;
}

const AGENT_STATE_FILE = 'spire-agent.json';
const BUNDLE_STATE_FILE = 'spire-bundle.json';
const DEFAULT_SYNC_MS = 5000;
const DEFAULT_MAX_BACKOFF_MS = 60_000;
const FIRST_BACKOFF_MS = 1000;
/** How long a replaced session stays open for the calls still using it (each has a 30 s deadline). */
const RETIRED_SESSION_MS = 35_000;
/**
 * JWT-SVIDs kept for reuse (entry × audience set). A caller that asks for ever new audiences only makes the
 * oldest fall out; each miss is a call to the server, as with SPIRE's agent.
 */
export const MAX_CACHED_JWT_SVIDS = 1000;
/** BatchNewX509SVID requests per call. */
const BATCH = 50;
/** The fraction of an SVID's life that may be cut from half-life to spread renewals. */
const JITTER = 0.1;

interface PersistedAgent {
  readonly version: 1;
  readonly spiffeId: string;
  /** DER, base64, leaf first. */
  readonly chain: readonly string[];
  /** PKCS#8 DER, base64. */
  readonly key: string;
  readonly reattestable: boolean;
}

/**
 * A SPIRE server as the source of this agent's identities. `start` loads the state directory and runs the
 * first sync (without waiting for it to succeed: a server that is down at start only delays the first SVIDs);
 * `ready` says whether one sync has completed.
 */
export class SpireUpstream extends EventEmitter<UpstreamEvents> {
  readonly trustDomain: TrustDomain;
  readonly #o: SpireUpstreamOptions;
  readonly #log: Logger;
  readonly #now: () => Date;
  readonly #syncMs: number;
  readonly #maxBackoffMs: number;
  #bundle: SpiffeBundle;
  /** True once a bundle came from the server (or the state directory): the bootstrap bundle is then unused. */
  #bundleFetched = false;
  #agent: AgentSvid | undefined;
  #session: SpireSession | undefined;
  /** Sessions replaced by a newer one, closed once calls in flight on them are done. */
  readonly #retired = new Set<SpireSession>();
  /** Roots the last GetBundle marked tainted (fingerprints): SVIDs, ours included, move off them. */
  #tainted: ReadonlySet<string> = new Set();
  #entries: readonly ServedEntry[] = [];
  readonly #svids = new Map<string, HeldSvid>();
  readonly #federated = new Map<string, SpiffeBundle>();
  /** By entry and sorted audience, oldest first; at most MAX_CACHED_JWT_SVIDS. */
  readonly #jwt = new Map<string, { svid: JwtSvid; refreshAt: number }>();
  readonly #jwtMinting = new Map<string, Promise<JwtSvid>>();
  #lastSync: Date | undefined;
  #failures = 0;
  #lastError: AgentError | undefined;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  readonly #abort = new AbortController();
  #banned = false;
  #closed = false;

  private constructor(options: SpireUpstreamOptions) {
    super();
    this.trustDomain = options.trustDomain;
    this.#o = options;
    this.#log = options.logger;
    this.#now = options.now ?? (() => new Date());
    this.#syncMs = options.syncIntervalMs ?? DEFAULT_SYNC_MS;
    this.#maxBackoffMs = Math.max(this.#syncMs, options.maxBackoffMs ?? DEFAULT_MAX_BACKOFF_MS);
    this.#bundle = options.bootstrapBundle;
  }

  static async start(options: SpireUpstreamOptions): Promise<SpireUpstream> {
    if (!options.bootstrapBundle.trustDomain.equals(options.trustDomain)) {
      throw new AgentError(
        AgentErrorCode.Config,
        `the bootstrap bundle is for ${options.bootstrapBundle.trustDomain.name}, not ${options.trustDomain.name}`,
      );
    }
    const upstream = new SpireUpstream(options);
    await upstream.#load();
    upstream.#schedule(0);
    return upstream;
  }

  /** The trust bundle in force: the server's, or the bootstrap bundle before the first sync. */
  get bundle(): SpiffeBundle {
    return this.#bundle;
  }

  /** Whether a sync has completed since start (entries, SVIDs and bundle are the server's). */
  get ready(): boolean {
    return this.#lastSync !== undefined && !this.#banned;
  }

  status(): UpstreamStatus {
    return {
      ...(this.#agent ? { agentId: this.#agent.id.toString(), agentExpiresAt: this.#agent.expiresAt } : {}),
      ...(this.#lastSync ? { lastSync: this.#lastSync } : {}),
      consecutiveFailures: this.#failures,
      ...(this.#lastError
        ? { lastError: { code: this.#lastError.code, message: this.#lastError.message } }
        : {}),
      entries: this.#entries.length,
      svids: this.#svids.size,
      banned: this.#banned,
    };
  }

  /**
   * The entries a caller with these selectors gets, in SPIRE's order (oldest entry first, then by ID), the
   * first of two with one hint kept; only entries whose SVID is held.
   */
  match(selectors: ReadonlySet<string>): ServedEntry[] {
    const out: ServedEntry[] = [];
    const hints = new Set<string>();
    for (const served of this.#entries) {
      if (served.selectors.length === 0 || !selectorsMatch(served.selectors, selectors)) continue;
      const hint = served.entry.hint;
      if (hint !== '' && hints.has(hint)) continue;
      if (hint !== '') hints.add(hint);
      out.push(served);
    }
    return out;
  }

  /** The held X.509-SVID of an entry (undefined until the server has signed one). */
  x509For(entryId: string): ServedX509Svid | undefined {
    return this.#svids.get(entryId)?.served;
  }

  /** Bundles of the named trust domains that the server gave us. */
  federatedBundles(names: Iterable<string>): SpiffeBundle[] {
    return [...new Set(names)]
      .sort()
      .map((n) => this.#federated.get(n))
      .filter((b): b is SpiffeBundle => b !== undefined);
  }

  /**
   * A JWT-SVID for the entry and audience, minted by the server and cached until half its life has passed;
   * while the server fails, a cached token that has not expired is served.
   */
  async jwtFor(served: ServedEntry, audience: readonly string[]): Promise<JwtSvid> {
    const key = `${served.entry.id}\0${[...audience].sort().join('\0')}`;
    const now = this.#now().getTime();
    const cached = this.#jwt.get(key);
    if (cached !== undefined && now < cached.refreshAt) return cached.svid;
    // Callers asking at once for the same entry and audience share one call to the server.
    let minting = this.#jwtMinting.get(key);
    if (minting === undefined) {
      minting = this.#mintJwt(served, audience, key).finally(() => this.#jwtMinting.delete(key));
      this.#jwtMinting.set(key, minting);
    }
    try {
      return await minting;
    } catch (err) {
      if (cached !== undefined && cached.svid.expiry.getTime() > this.#now().getTime()) {
        this.#log.warn(
          { spiffeId: served.entry.spiffeId.toString(), err: errInfo(err) },
          'JWT-SVID could not be renewed; serving the cached one',
        );
        return cached.svid;
      }
      throw err;
    }
  }

  async #mintJwt(served: ServedEntry, audience: readonly string[], key: string): Promise<JwtSvid> {
    const agent = this.#agent;
    if (agent === undefined) {
      throw new AgentError(AgentErrorCode.Upstream, 'not attested to the SPIRE server yet');
    }
    this.#session ??= this.#o.connector.session(this.#bundle, agent);
    const minted = await this.#session.newJwtSvid(served.entry.id, audience, this.#abort.signal);
    const parsed = parseJwtSvidInsecure(minted.token);
    const now = this.#now().getTime();
    const problem = !parsed.id.equals(served.entry.spiffeId)
      ? `for ${parsed.id}, not ${served.entry.spiffeId}`
      : audience.some((a) => !parsed.audience.includes(a))
        ? `for the audience ${JSON.stringify(parsed.audience)}, not ${JSON.stringify(audience)}`
        : parsed.expiry.getTime() <= now
          ? `that expired at ${parsed.expiry.toISOString()}`
          : undefined;
    if (problem !== undefined) {
      throw new AgentError(AgentErrorCode.Upstream, `the server minted a JWT-SVID ${problem}`);
    }
    const hint = served.entry.hint;
    const svid: JwtSvid = hint === '' ? parsed : { ...parsed, hint };
    const issued = Math.min(now, (parsed.issuedAt ?? new Date(now)).getTime());
    if (this.#jwt.size >= MAX_CACHED_JWT_SVIDS && !this.#jwt.has(key)) {
      const oldest = this.#jwt.keys().next().value;
      if (oldest !== undefined) this.#jwt.delete(oldest);
    }
    this.#jwt.delete(key);
    this.#jwt.set(key, { svid, refreshAt: issued + (parsed.expiry.getTime() - issued) / 2 });
    return svid;
  }

  /** Runs a sync now (SIGHUP, tests); resolves when it ended, whatever its outcome. */
  syncNow(): Promise<void> {
    if (this.#closed || this.#banned) return Promise.resolve();
    if (this.#running) return this.#running;
    this.#schedule(0);
    return this.#running ?? Promise.resolve();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#abort.abort();
    if (this.#timer) clearTimeout(this.#timer);
    await this.#running?.catch(() => undefined);
    this.#session?.close();
    this.#session = undefined;
    for (const old of this.#retired) old.close();
    this.#retired.clear();
  }

  // The loop

  #schedule(delayMs: number): void {
    if (this.#closed || this.#banned) return;
    if (this.#timer) clearTimeout(this.#timer);
    const run = (): void => {
      this.#timer = undefined;
      this.#running = this.#sync()
        .then(
          () => {
            this.#failures = 0;
            this.#lastError = undefined;
            this.emit('synced', undefined);
            this.#schedule(this.#syncMs);
          },
          (err: unknown) => this.#failed(err),
        )
        .finally(() => {
          this.#running = undefined;
        });
    };
    if (delayMs === 0) run();
    else {
      this.#timer = setTimeout(run, delayMs);
      this.#timer.unref();
    }
  }

  #failed(err: unknown): void {
    if (this.#closed) return;
    const error = isAgentError(err)
      ? err
      : new AgentError(AgentErrorCode.Upstream, (err as Error).message, { cause: err });
    this.emit('synced', error);
    if (error.code === AgentErrorCode.Banned) {
      this.#banned = true;
      this.#lastError = error;
      this.#log.error({ err: errInfo(error) }, 'the SPIRE server no longer accepts this agent; stopping');
      this.#forgetAgent().finally(() => this.emit('banned', error));
      return;
    }
    this.#failures++;
    this.#lastError = error;
    const backoff = Math.min(this.#maxBackoffMs, FIRST_BACKOFF_MS * 2 ** Math.min(16, this.#failures - 1));
    this.#log[this.#failures === 1 ? 'warn' : 'error'](
      {
        err: errInfo(error),
        failures: this.#failures,
        retryInMs: backoff,
        serving: { entries: this.#entries.length, svids: this.#svids.size },
      },
      'sync with the SPIRE server failed; serving what is held',
    );
    this.#schedule(backoff);
  }

  async #sync(): Promise<void> {
    const signal = this.#abort.signal;
    let session: SpireSession;
    let entries: SpireEntry[];
    try {
      session = await this.#ensureSession(signal);
      entries = await session.authorizedEntries(signal);
    } catch (err) {
      if (!mustReattest(err)) throw err;
      // Evicted, expired or superseded, or told to attest instead of renewing: attest again, as SPIRE's agent
      // does (with a spent join token this fails until the agent is given a new one).
      this.#log.warn({ err: errInfo(err) }, 'the SPIRE server wants this agent to attest again; attesting');
      await this.#attest(signal);
      session = await this.#ensureSession(signal);
      entries = await session.authorizedEntries(signal);
    }
    const bundle = await session.bundle(signal);
    const tainted = session.taintedX509Authorities();
    this.#tainted = tainted;
    if (!bundle.trustDomain.equals(this.trustDomain)) {
      throw new AgentError(
        AgentErrorCode.Upstream,
        `the server sent a bundle for ${bundle.trustDomain.name}, not ${this.trustDomain.name}`,
      );
    }
    let changed = false;
    if (!this.#bundleFetched || !bundle.equals(this.#bundle)) {
      const before = this.#bundle;
      this.#bundle = bundle;
      this.#bundleFetched = true;
      // The session trusts the bundle it was opened with; the next one opens with this one.
      this.#dropSession();
      changed = !bundle.equals(before);
      if (changed) {
        this.#log.info(
          {
            trustDomain: bundle.trustDomain.name,
            sequence: bundle.sequence?.toString(),
            authorities: bundle.x509Authorities.length,
          },
          'trust bundle changed',
        );
      }
      await this.#persist(BUNDLE_STATE_FILE, bundle.marshal());
    }
    changed = this.#setEntries(entries) || changed;
    changed = (await this.#syncFederated(session, entries, signal)) || changed;
    changed = (await this.#syncSvids(session, signal)) || changed;
    this.#lastSync = this.#now();
    if (changed) this.emit('change');
  }

  async #ensureSession(signal: AbortSignal): Promise<SpireSession> {
    const agent = this.#agent;
    const now = this.#now().getTime();
    if (agent === undefined || agent.expiresAt.getTime() <= now) {
      await this.#attest(signal);
    } else if (now >= this.#renewAt(agent) || !anchoredIn(agent.certificates, this.#trustedRoots())) {
      await this.#renew(signal);
    }
    if (this.#session === undefined) {
      const current = this.#agent as AgentSvid;
      this.#session = this.#o.connector.session(this.#bundle, current);
    }
    return this.#session;
  }

  /** The bundle's roots less those the server tainted (all of them, should it have tainted every one). */
  #trustedRoots(): readonly X509Certificate[] {
    const all = this.#bundle.x509Authorities;
    const untainted = all.filter((r) => !this.#tainted.has(r.fingerprint256));
    // The server never taints the authority that signs; should every root be tainted, taint changes nothing.
    return untainted.length > 0 ? untainted : all;
  }

  #renewAt(agent: AgentSvid): number {
    const notBefore = agent.certificates[0] ? Date.parse(agent.certificates[0].validFrom) : 0;
    return notBefore + (agent.expiresAt.getTime() - notBefore) / 2;
  }

  async #attest(signal: AbortSignal): Promise<void> {
    const keys = await this.#keys();
    const csr = await this.#o.makeCsr(keys.privateKey, keys.publicKey);
    const attestation = await this.#o.attestation();
    const { svid, reattestable } = await this.#o.connector.attest(this.#bundle, attestation, csr, signal);
    this.#checkAgentSvid(svid, keys.publicKey);
    await this.#setAgent({ ...svid, privateKey: keys.privateKey, reattestable });
    this.#log.info(
      {
        attestor: attestation.type,
        agentId: svid.id.toString(),
        expiresAt: svid.expiresAt.toISOString(),
        reattestable,
      },
      'node attested to the SPIRE server',
    );
  }

  async #renew(signal: AbortSignal): Promise<void> {
    const agent = this.#agent as AgentSvid;
    if (agent.reattestable) {
      await this.#attest(signal);
      return;
    }
    const session = this.#session ?? this.#o.connector.session(this.#bundle, agent);
    this.#session = session;
    const keys = await this.#keys();
    const csr = await this.#o.makeCsr(keys.privateKey, keys.publicKey);
    const svid = await session.renewAgent(csr, signal);
    this.#checkAgentSvid(svid, keys.publicKey);
    if (!svid.id.equals(agent.id)) {
      throw new AgentError(
        AgentErrorCode.Upstream,
        `RenewAgent returned an SVID for ${svid.id}, not this agent (${agent.id})`,
      );
    }
    await this.#setAgent({ ...svid, privateKey: keys.privateKey, reattestable: false });
    this.#log.info(
      { agentId: svid.id.toString(), expiresAt: svid.expiresAt.toISOString() },
      'agent SVID renewed',
    );
  }

  #checkAgentSvid(svid: MintedX509Svid, publicKey: KeyObject): void {
    const leaf = svid.certificates[0];
    if (leaf === undefined)
      throw new AgentError(AgentErrorCode.Upstream, 'the server sent an empty agent SVID');
    if (!leaf.publicKey.equals(publicKey)) {
      throw new AgentError(AgentErrorCode.Upstream, 'the agent SVID the server sent is not for our key');
    }
    if (!svid.id.isMemberOf(this.trustDomain)) {
      throw new AgentError(
        AgentErrorCode.Upstream,
        `the agent SVID names ${svid.id}, outside ${this.trustDomain.name}`,
      );
    }
  }

  async #setAgent(agent: AgentSvid): Promise<void> {
    this.#agent = agent;
    this.#dropSession();
    const persisted: PersistedAgent = {
      version: 1,
      spiffeId: agent.id.toString(),
      chain: agent.certificates.map((c) => c.raw.toString('base64')),
      key: agent.privateKey.export({ format: 'der', type: 'pkcs8' }).toString('base64'),
      reattestable: agent.reattestable,
    };
    await this.#persist(AGENT_STATE_FILE, `${JSON.stringify(persisted, null, 2)}\n`);
  }

  async #forgetAgent(): Promise<void> {
    this.#agent = undefined;
    this.#dropSession();
    try {
      await this.#o.stateDir?.remove(AGENT_STATE_FILE);
    } catch (err) {
      this.#log.error({ err: errInfo(err) }, 'could not remove the agent SVID from the state directory');
    }
  }

  /**
   * The next call opens a new session (a new bundle or agent SVID). The old one is closed a little later, not at
   * once: a sync or a JWT-SVID request may still be using it.
   */
  #dropSession(): void {
    const old = this.#session;
    this.#session = undefined;
    if (old === undefined) return;
    this.#retired.add(old);
    setTimeout(() => {
      this.#retired.delete(old);
      old.close();
    }, RETIRED_SESSION_MS).unref();
  }

  #setEntries(entries: readonly SpireEntry[]): boolean {
    const sorted = [...entries].sort(
      (a, b) => a.createdAt - b.createdAt || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0),
    );
    const before = new Map(this.#entries.map((s) => [s.entry.id, s.entry.revisionNumber]));
    const changed =
      before.size !== sorted.length || sorted.some((e) => before.get(e.id) !== e.revisionNumber);
    this.#entries = sorted.map((entry) => ({ entry, selectors: entry.selectors.map(toSelector) }));
    const keep = new Set(sorted.map((e) => e.id));
    for (const id of this.#svids.keys()) if (!keep.has(id)) this.#svids.delete(id);
    for (const key of this.#jwt.keys()) if (!keep.has(key.slice(0, key.indexOf('\0')))) this.#jwt.delete(key);
    if (changed) {
      this.#log.info({ entries: sorted.length, before: before.size }, 'registration entries synced');
    }
    return changed;
  }

  async #syncFederated(
    session: SpireSession,
    entries: readonly SpireEntry[],
    signal: AbortSignal,
  ): Promise<boolean> {
    const names = new Set(entries.flatMap((e) => e.federatesWith));
    names.delete(this.trustDomain.name);
    let changed = false;
    for (const name of this.#federated.keys()) {
      if (!names.has(name)) {
        this.#federated.delete(name);
        changed = true;
      }
    }
    for (const name of [...names].sort()) {
      const bundle = await session.federatedBundle(name, signal);
      const held = this.#federated.get(name);
      if (bundle === undefined) {
        // The server holds none (yet): keep what we had rather than take a trust domain away on a gap.
        if (held === undefined) this.#log.debug({ trustDomain: name }, 'no federated bundle on the server');
        continue;
      }
      if (bundle.trustDomain.name !== name) {
        throw new AgentError(
          AgentErrorCode.Upstream,
          `asked for the bundle of ${name}, the server sent ${bundle.trustDomain.name}'s`,
        );
      }
      if (held === undefined || !held.equals(bundle)) {
        this.#federated.set(name, bundle);
        this.#log.info(
          { trustDomain: name, sequence: bundle.sequence?.toString() },
          'federated bundle changed',
        );
        changed = true;
      }
    }
    return changed;
  }

  /**
   * Mints what is missing, stale (half-life, jittered), for an edited entry, or under a root no longer trusted:
   * gone from the bundle, or tainted by the server (its key is being retired, so SVIDs move off it now).
   */
  async #syncSvids(session: SpireSession, signal: AbortSignal): Promise<boolean> {
    const now = this.#now().getTime();
    const roots = this.#trustedRoots();
    const due = this.#entries.filter(({ entry }) => {
      const held = this.#svids.get(entry.id);
      return (
        held === undefined ||
        held.revision !== entry.revisionNumber ||
        now >= held.rotateAt.getTime() ||
        !anchoredIn(held.chain, roots)
      );
    });
    let changed = false;
    for (let i = 0; i < due.length; i += BATCH) {
      const batch = due.slice(i, i + BATCH);
      const keys = await Promise.all(batch.map(() => this.#keys()));
      const csrs = await Promise.all(keys.map((k) => this.#o.makeCsr(k.privateKey, k.publicKey)));
      const results = await session.newX509Svids(
        batch.map(({ entry }, j) => ({ entryId: entry.id, csr: csrs[j] as Buffer })),
        signal,
      );
      for (const [j, { entry }] of batch.entries()) {
        const result = results[j];
        const key = keys[j];
        if (result === undefined || key === undefined) continue;
        if ('error' in result) {
          this.#log.error(
            { entryId: entry.id, spiffeId: entry.spiffeId.toString(), status: result.error },
            'the server refused to sign an SVID for this entry; keeping the current one',
          );
          continue;
        }
        const svid = result.svid;
        const leaf = svid.certificates[0];
        if (leaf === undefined || !svid.id.equals(entry.spiffeId) || !leaf.publicKey.equals(key.publicKey)) {
          this.#log.error(
            { entryId: entry.id, spiffeId: entry.spiffeId.toString(), got: svid.id.toString() },
            'the server returned an SVID that does not match the entry or our key; discarded',
          );
          continue;
        }
        const notBefore = new Date(leaf.validFrom);
        const life = svid.expiresAt.getTime() - notBefore.getTime();
        const jitter = life > 0 ? randomInt(0, Math.max(1, Math.floor(life * JITTER))) : 0;
        const replaced = this.#svids.has(entry.id);
        this.#svids.set(entry.id, {
          revision: entry.revisionNumber,
          chain: svid.certificates,
          rotateAt: new Date(notBefore.getTime() + life / 2 - jitter),
          served: {
            id: entry.spiffeId,
            chainDer: Buffer.concat(svid.certificates.map((c) => c.raw)),
            keyDer: key.privateKey.export({ format: 'der', type: 'pkcs8' }),
            ...(entry.hint === '' ? {} : { hint: entry.hint }),
            notAfter: svid.expiresAt,
          },
        });
        this.#log.info(
          {
            spiffeId: entry.spiffeId.toString(),
            entryId: entry.id,
            expiresAt: svid.expiresAt.toISOString(),
          },
          replaced ? 'X509-SVID rotated' : 'X509-SVID issued',
        );
        changed = true;
      }
    }
    return changed;
  }

  async #keys(): Promise<{ privateKey: KeyObject; publicKey: KeyObject }> {
    switch (this.#o.keyType ?? 'ec-p256') {
      case 'ec-p256':
        return generateKeyPair('ec', { namedCurve: 'P-256' });
      case 'ec-p384':
        return generateKeyPair('ec', { namedCurve: 'P-384' });
      case 'rsa-2048':
        return generateKeyPair('rsa', { modulusLength: 2048 });
      case 'rsa-4096':
        return generateKeyPair('rsa', { modulusLength: 4096 });
    }
  }

  // The state directory

  async #load(): Promise<void> {
    const dir = this.#o.stateDir;
    if (dir === undefined) return;
    const bundleText = await dir.read(BUNDLE_STATE_FILE);
    if (bundleText !== undefined) {
      try {
        this.#bundle = SpiffeBundle.parse(this.trustDomain, bundleText.toString('utf8'));
        this.#bundleFetched = true;
      } catch (err) {
        throw new AgentError(
          AgentErrorCode.Upstream,
          `${dir.path}/${BUNDLE_STATE_FILE}: not a SPIFFE bundle of ${this.trustDomain.name} (${(err as Error).message}); remove it to start again from the bootstrap bundle`,
          { cause: err },
        );
      }
    }
    const agentText = await dir.read(AGENT_STATE_FILE);
    if (agentText === undefined) return;
    try {
      const p = JSON.parse(agentText.toString('utf8')) as PersistedAgent;
      if (p.version !== 1 || !Array.isArray(p.chain) || typeof p.key !== 'string') {
        throw new Error('unknown format');
      }
      const certificates = p.chain.map((b64) => new X509Certificate(Buffer.from(b64, 'base64')));
      const leaf = certificates[0];
      if (leaf === undefined) throw new Error('no certificate');
      const privateKey = createPrivateKey({
        key: Buffer.from(p.key, 'base64'),
        format: 'der',
        type: 'pkcs8',
      });
      const id = SpiffeId.parse(p.spiffeId);
      if (!leaf.checkPrivateKey(privateKey)) throw new Error('the key does not match the certificate');
      this.#agent = {
        id,
        certificates,
        privateKey,
        expiresAt: new Date(leaf.validTo),
        reattestable: p.reattestable === true,
      };
      this.#log.info(
        { agentId: id.toString(), expiresAt: this.#agent.expiresAt.toISOString() },
        'agent SVID resumed from the state directory',
      );
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Upstream,
        `${dir.path}/${AGENT_STATE_FILE}: unusable (${(err as Error).message}); remove it to attest again`,
        { cause: err },
      );
    }
  }

  async #persist(name: string, data: string): Promise<void> {
    try {
      await this.#o.stateDir?.write(name, data);
    } catch (err) {
      this.#log.error(
        { file: name, err: errInfo(err) },
        'could not write the state directory; going on in memory, but a restart would lose this',
      );
    }
  }
}

/** The client marks refusals that a new attestation repairs (client.ts SpireServerError.reattest). */
function mustReattest(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { reattest?: unknown }).reattest === true;
}

function toSelector(text: string): Selector {
  const i = text.indexOf(':');
  return i < 0 ? { type: text, value: '' } : { type: text.slice(0, i), value: text.slice(i + 1) };
}

/** Whether the chain's last certificate is one of the bundle's roots or verifies under one. */
function anchoredIn(chain: readonly X509Certificate[], roots: readonly X509Certificate[]): boolean {
  const top = chain.at(-1);
  if (top === undefined) return false;
  return roots.some(
    (root) =>
      root.fingerprint256 === top.fingerprint256 || (top.checkIssued(root) && top.verify(root.publicKey)),
  );
}

function errInfo(err: unknown): { code?: string; message: string } {
  const e = err as Error & { code?: string };
  return { ...(e.code ? { code: e.code } : {}), message: e.message };
}
