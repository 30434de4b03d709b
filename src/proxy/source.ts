import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import { type WatchedFile, watchFile } from '../config/watch.ts';
import { BundleSet, SpiffeBundle, X509Bundle } from '../spiffe/bundle.ts';
import { TrustDomain } from '../spiffe/id.ts';
import { parseX509Svid, type X509Svid } from '../spiffe/x509svid.ts';
import { X509Source } from '../workload/client.ts';

/**
 * Where the proxy's own SVID and the trust bundles come from: the Workload API (the normal case) or PEM files
 * (tests, and sites without an agent). `update` fires whenever either changes; consumers swap whole values.
 */
export interface IdentitySource {
  svid(): X509Svid;
  bundles(): BundleSet;
  /** When each trust domain's bundle last changed (for the bundle-age metric). */
  bundleChangedAt(): ReadonlyMap<string, Date>;
  on(event: 'update', listener: () => void): this;
  close(): void;
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

/** The proxy's identity from the Workload API, following rotations. */
export class WorkloadIdentitySource extends EventEmitter implements IdentitySource {
  readonly #source: X509Source;
  readonly #hint: string | undefined;
  readonly #ages = new BundleAges();

  private constructor(source: X509Source, hint: string | undefined, log: Logger) {
    super();
    this.#source = source;
    this.#hint = hint;
    this.#ages.update(source.bundles);
    source.on('update', (ctx) => {
      this.#ages.update(ctx.bundles);
      this.emit('update');
    });
    source.on('error', (err) => {
      log.warn(
        { code: err.codeName, err: { message: err.message } },
        'Workload API stream failed; keeping the last SVID',
      );
    });
  }

  static async create(options: {
    address?: string;
    hint?: string;
    logger: Logger;
  }): Promise<WorkloadIdentitySource> {
    const source = await X509Source.create(options.address === undefined ? {} : { address: options.address });
    const identity = new WorkloadIdentitySource(source, options.hint, options.logger);
    identity.svid(); // fails now, not at the first handshake, when the hint names no SVID
    return identity;
  }

  svid(): X509Svid {
    return this.#source.svid(this.#hint);
  }

  bundles(): BundleSet {
    return this.#source.bundles;
  }

  bundleChangedAt(): ReadonlyMap<string, Date> {
    return this.#ages.changed;
  }

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

/**
 * The proxy's identity from PEM files, re-read when they change (cert-manager's csi-driver or a projected
 * volume rotates them in place). A half-written rotation (key and certificate that do not match) keeps the last
 * good pair.
 */
export class StaticIdentitySource extends EventEmitter implements IdentitySource {
  #svid: X509Svid;
  #bundles: BundleSet;
  readonly #ages = new BundleAges();
  readonly #watchers: WatchedFile<unknown>[] = [];

  private constructor(svid: X509Svid, bundles: BundleSet) {
    super();
    this.#svid = svid;
    this.#bundles = bundles;
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
    const source = new StaticIdentitySource(await loadSvid(), bundles);
    const reloadSvid = (): void => {
      loadSvid().then(
        (svid) => {
          source.#svid = svid;
          log.info(
            { spiffeId: svid.id.toString(), notAfter: svid.certificates[0]?.validTo },
            'SVID files reloaded',
          );
          source.emit('update');
        },
        (err: Error) =>
          log.error({ err: { message: err.message } }, 'SVID files rejected; keeping the last good SVID'),
      );
    };
    for (const file of [files.certFile, files.keyFile]) {
      source.#watchers.push(await watchFile(file, { parse: (t) => t, pollIntervalMs, onChange: reloadSvid }));
    }
    for (const [td, file] of files.bundles) {
      source.#watchers.push(
        await watchFile(file, {
          parse: (text) => parseBundleFile(td, text),
          pollIntervalMs,
          onChange: (bundle) => {
            source.#bundles = source.#bundles.with(bundle);
            source.#ages.update(source.#bundles);
            log.info({ trustDomain: td, file }, 'bundle file reloaded');
            source.emit('update');
          },
          onError: (err) =>
            log.error(
              { trustDomain: td, file, err: { message: err.message } },
              'bundle file rejected; keeping the last good',
            ),
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

  close(): void {
    for (const w of this.#watchers) w.close();
  }
}
