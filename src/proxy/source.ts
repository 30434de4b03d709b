import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import { type WatchedFile, watchFile } from '../config/watch.ts';
import { BundleSet, SpiffeBundle, X509Bundle } from '../spiffe/bundle.ts';
import { TrustDomain } from '../spiffe/id.ts';
import { parseX509Svid, type X509Svid } from '../spiffe/x509svid.ts';
import { type WorkloadApiError, X509Source } from '../workload/client.ts';

/** Whether an identity source can serve, and why (or why not), for readiness. */
export interface IdentityHealth {
  readonly ok: boolean;
  /** For people: what the source serves, or what is wrong. Never holds key material. */
  readonly detail: string;
}

/**
 * Where the proxy's own SVID and the trust bundles come from: the Workload API (the normal case) or PEM files
 * (tests, and sites without an agent). `update` fires whenever either changes, and when the SVID is withdrawn;
 * consumers swap whole values.
 */
export interface IdentitySource {
  /**
   * The SVID to present. Throws while there is none to present: a `WorkloadError` with code
   * `ERR_WORKLOAD_SVID_WITHDRAWN` once the Workload API has withdrawn it, a RangeError when the configured hint
   * names no SVID any more. Callers on the serving path must catch.
   */
  svid(): X509Svid;
  bundles(): BundleSet;
  /** When each trust domain's bundle last changed (for the bundle-age metric). */
  bundleChangedAt(): ReadonlyMap<string, Date>;
  /** Not ok while there is no SVID to serve, it has expired, or its files are refused; `detail` says why. */
  health(): IdentityHealth;
  /** Re-reads what the source reads (SIGHUP). Never throws: a refused file keeps the last good value. */
  reload(): Promise<void>;
  on(event: 'update', listener: () => void): this;
  off(event: 'update', listener: () => void): this;
  close(): void;
}

const iso = (date: Date): string => date.toISOString();

/** An SVID past its leaf's notAfter cannot serve, whatever else holds. */
function expiredAt(svid: X509Svid, now: number): Date | undefined {
  const leaf = svid.certificates[0];
  return leaf !== undefined && leaf.validToDate.getTime() <= now ? leaf.validToDate : undefined;
}

function bundleFingerprints(set: BundleSet): Map<string, string> {
  return new Map(
    set.bundles().map((b) => [b.trustDomain.name, b.x509Authorities.map((c) => c.fingerprint256).join(',')]),
  );
}

/** Tracks per-trust-domain change times across bundle set updates. */
class BundleAges {
  #last = new Map<string, string>();
  readonly changed = new Map<string, Date>();

  update(set: BundleSet, now = new Date()): void {
    const next = bundleFingerprints(set);
    for (const [td, fp] of next) if (this.#last.get(td) !== fp) this.changed.set(td, now);
    for (const td of this.changed.keys()) if (!next.has(td)) this.changed.delete(td);
    this.#last = next;
  }
}

/**
 * The proxy's identity from the Workload API, following rotations. Emits `update` when the SVID or bundles
 * change and when the agent withdraws the SVID (`svid()` then throws `ERR_WORKLOAD_SVID_WITHDRAWN`), so the
 * proxy re-evaluates.
 */
export class WorkloadIdentitySource extends EventEmitter implements IdentitySource {
  readonly #source: X509Source;
  readonly #hint: string | undefined;
  readonly #log: Logger;
  readonly #ages = new BundleAges();
  /** The stream's last failure, until an update proves it working again. */
  #failing: { error: WorkloadApiError; since: Date } | undefined;

  private constructor(source: X509Source, hint: string | undefined, log: Logger, who: string) {
    super();
    this.#source = source;
    this.#hint = hint;
    this.#log = log;
    this.#ages.update(source.bundles);
    source.on('update', (ctx) => {
      this.#failing = undefined;
      this.#ages.update(ctx.bundles);
      this.#emitUpdate();
    });
    source.on('withdrawn', (err) => {
      log.error(
        { code: err.code, spiffeId: err.spiffeId, err: { message: err.message } },
        `the Workload API withdrew the SVID; ${who} has none to present until it is issued again`,
      );
      this.#emitUpdate();
    });
    source.on('refused', (err) => {
      log.error(
        { code: err.code, spiffeId: err.spiffeId, err: { message: err.message } },
        'Workload API response refused; keeping the last good SVID and bundles',
      );
    });
    source.on('error', (err) => {
      this.#failing = { error: err, since: this.#failing?.since ?? new Date() };
      // While withdrawn, every retry is denied again: the withdrawal was logged once, at error level.
      log[source.withdrawn === undefined ? 'warn' : 'debug'](
        { code: err.codeName, err: { message: err.message } },
        source.withdrawn === undefined
          ? 'Workload API stream failed; keeping the last SVID'
          : 'Workload API stream failed; still withdrawn',
      );
    });
  }

  static async create(options: {
    address?: string;
    hint?: string;
    logger: Logger;
    /** Who presents the SVID, for the logs (default "the proxy"). */
    who?: string;
  }): Promise<WorkloadIdentitySource> {
    const source = await X509Source.create(options.address === undefined ? {} : { address: options.address });
    const identity = new WorkloadIdentitySource(
      source,
      options.hint,
      options.logger,
      options.who ?? 'the proxy',
    );
    identity.svid(); // fails now, not at the first handshake, when the hint names no SVID
    return identity;
  }

  /**
   * Emits `update` without letting a listener's exception escape into the gRPC stream callbacks, where it would
   * take the process down; it is logged instead.
   */
  #emitUpdate(): void {
    try {
      this.emit('update');
    } catch (err) {
      this.#log.error({ err: { message: (err as Error).message } }, 'an identity update listener failed');
    }
  }

  /** Throws `ERR_WORKLOAD_SVID_WITHDRAWN` while the Workload API has withdrawn the SVID. */
  svid(): X509Svid {
    return this.#source.svid(this.#hint);
  }

  bundles(): BundleSet {
    return this.#source.bundles;
  }

  bundleChangedAt(): ReadonlyMap<string, Date> {
    return this.#ages.changed;
  }

  /**
   * Not ok when the agent withdrew the SVID, when the hint names no SVID any more, or when the SVID has expired
   * (the stream failing meanwhile, or the agent not rotating it). A failing stream alone is ok while the last
   * SVID is still valid: it is what the proxy serves with, and the source keeps reconnecting.
   */
  health(now: Date = new Date()): IdentityHealth {
    const withdrawn = this.#source.withdrawn;
    if (withdrawn !== undefined) return { ok: false, detail: withdrawn.message };
    let svid: X509Svid;
    try {
      svid = this.svid();
    } catch (err) {
      return { ok: false, detail: (err as Error).message };
    }
    const failing = this.#failing;
    const stream =
      failing === undefined
        ? 'the Workload API stream is up'
        : `the Workload API stream has been failing since ${iso(failing.since)} (${failing.error.message})`;
    const expired = expiredAt(svid, now.getTime());
    if (expired !== undefined) {
      return { ok: false, detail: `the SVID ${svid.id} expired at ${iso(expired)}; ${stream}` };
    }
    const leaf = svid.certificates[0];
    const until = leaf === undefined ? '' : `, valid until ${iso(leaf.validToDate)}`;
    return {
      ok: true,
      detail: `${svid.id} from the Workload API${until}; ${stream}${failing === undefined ? '' : ', keeping the last SVID'}`,
    };
  }

  /** Nothing to re-read: the stream delivers every change as it happens. */
  async reload(): Promise<void> {}

  close(): void {
    this.#source.close();
  }
}

export interface StaticFiles {
  /** The proxy's SVID chain (PEM, leaf first) and its PKCS#8 key. */
  readonly certFile: string;
  readonly keyFile: string;
  /** Trust domain name → bundle file: SPIFFE bundle JSON or PEM CA certificates. */
  readonly bundles: ReadonlyMap<string, string>;
}

export function parseBundleFile(trustDomain: string, text: string): SpiffeBundle {
  const td = TrustDomain.parse(trustDomain);
  if (text.trimStart().startsWith('{')) return SpiffeBundle.parse(td, text);
  return new SpiffeBundle(td, { x509Authorities: X509Bundle.parse(td, text).authorities });
}

/** A file the source refused, and since when; cleared when the file is accepted again. */
interface FileFailure {
  readonly message: string;
  readonly at: Date;
}

function sameSvid(a: X509Svid, b: X509Svid): boolean {
  return (
    a.certificates.length === b.certificates.length &&
    a.certificates.every((c, i) => c.raw.equals((b.certificates[i] as typeof c).raw)) &&
    a.privateKey.equals(b.privateKey)
  );
}

/**
 * The proxy's identity from PEM files, re-read when they change (cert-manager's csi-driver or a projected
 * volume rotates them in place). A half-written rotation (key and certificate that do not match) keeps the last
 * good pair; so does any refused file, and `health()` names it until it is accepted again.
 */
export class StaticIdentitySource extends EventEmitter implements IdentitySource {
  #svid: X509Svid;
  #bundles: BundleSet;
  readonly #files: StaticFiles;
  readonly #ages = new BundleAges();
  readonly #watchers: WatchedFile<unknown>[] = [];
  /** The SVID pair was refused (they do not parse, or do not match). */
  #svidFailure: FileFailure | undefined;
  /** Files that could not be read or parsed, by path. */
  readonly #fileFailures = new Map<string, FileFailure>();
  #reloadSvid: () => Promise<void> = async () => {};

  private constructor(svid: X509Svid, bundles: BundleSet, files: StaticFiles) {
    super();
    this.#svid = svid;
    this.#bundles = bundles;
    this.#files = files;
    this.#ages.update(bundles);
  }

  static async create(files: StaticFiles, log: Logger, pollIntervalMs = 5000): Promise<StaticIdentitySource> {
    const loadSvid = async (): Promise<X509Svid> =>
      parseX509Svid(await readFile(files.certFile), await readFile(files.keyFile));
    const bundles = new BundleSet(
      await Promise.all(
        [...files.bundles].map(async ([td, file]) => parseBundleFile(td, await readFile(file, 'utf8'))),
      ),
    );
    const source = new StaticIdentitySource(await loadSvid(), bundles, files);
    // One re-read at a time, so a slow read can never overwrite the result of a later one.
    let svidReads = Promise.resolve();
    source.#reloadSvid = () => {
      svidReads = svidReads.then(() =>
        loadSvid().then(
          (svid) => {
            source.#svidFailure = undefined;
            if (sameSvid(svid, source.#svid)) return;
            source.#svid = svid;
            log.info(
              { spiffeId: svid.id.toString(), notAfter: svid.certificates[0]?.validTo },
              'SVID files reloaded',
            );
            source.emit('update');
          },
          (err: Error) => {
            source.#svidFailure = { message: err.message, at: new Date() };
            log.error(
              { certFile: files.certFile, keyFile: files.keyFile, err: { message: err.message } },
              'SVID files rejected; keeping the last good SVID',
            );
          },
        ),
      );
      return svidReads;
    };
    const failed = (file: string) => (err: Error) => {
      source.#fileFailures.set(file, { message: err.message, at: new Date() });
      log.error({ file, err: { message: err.message } }, 'identity file rejected; keeping the last good');
    };
    const accepted = (file: string): void => {
      source.#fileFailures.delete(file);
    };
    for (const file of [files.certFile, files.keyFile]) {
      const reread = (): void => {
        accepted(file);
        void source.#reloadSvid();
      };
      source.#watchers.push(
        await watchFile(file, {
          parse: (t) => t,
          pollIntervalMs,
          onChange: reread,
          onRecover: reread,
          onError: failed(file),
        }),
      );
    }
    for (const [td, file] of files.bundles) {
      source.#watchers.push(
        await watchFile(file, {
          parse: (text) => parseBundleFile(td, text),
          pollIntervalMs,
          onChange: (bundle) => {
            accepted(file);
            source.#bundles = source.#bundles.with(bundle);
            source.#ages.update(source.#bundles);
            log.info({ trustDomain: td, file }, 'bundle file reloaded');
            source.emit('update');
          },
          onRecover: () => accepted(file),
          onError: failed(file),
        }),
      );
    }
    return source;
  }

  svid(): X509Svid {
    return this.#svid;
  }

  bundles(): BundleSet {
    return this.#bundles;
  }

  bundleChangedAt(): ReadonlyMap<string, Date> {
    return this.#ages.changed;
  }

  /** Ok unless a file is refused or the SVID has expired; `detail` names the files either way. */
  health(now: Date = new Date()): IdentityHealth {
    const { certFile, keyFile } = this.#files;
    const svid = this.#svid;
    const problems: string[] = [];
    if (this.#svidFailure !== undefined) {
      problems.push(
        `SVID files ${certFile} and ${keyFile} refused since ${iso(this.#svidFailure.at)} ` +
          `(${this.#svidFailure.message}); keeping the last good SVID ${svid.id}`,
      );
    }
    for (const [file, failure] of this.#fileFailures) {
      const message = failure.message.startsWith(file) ? failure.message : `${file}: ${failure.message}`;
      problems.push(`refused since ${iso(failure.at)}: ${message}`);
    }
    const expired = expiredAt(svid, now.getTime());
    if (expired !== undefined)
      problems.push(`the SVID ${svid.id} from ${certFile} expired at ${iso(expired)}`);
    if (problems.length > 0) return { ok: false, detail: problems.join('; ') };
    const leaf = svid.certificates[0];
    const bundles = [...this.#files.bundles].map(([td, file]) => `${td}=${file}`).join(', ');
    return {
      ok: true,
      detail:
        `${svid.id} from ${certFile} and ${keyFile}` +
        `${leaf === undefined ? '' : `, valid until ${iso(leaf.validToDate)}`}; bundles from ${bundles}`,
    };
  }

  /** Re-reads every file now; resolves once the SVID pair and the bundles were handled. */
  async reload(): Promise<void> {
    await Promise.all(this.#watchers.map((w) => w.reload()));
    await this.#reloadSvid();
  }

  close(): void {
    for (const w of this.#watchers) w.close();
  }
}
