/**
 * Federated bundles that must survive a restart, one file per trust domain in `<stateDir>/federation/`: the
 * bundle last fetched from a relationship's endpoint, or the one an operator set. Without it, a restarted agent
 * would fall back to its bootstrap bundle, which for `https_spiffe` may no longer authenticate the endpoint.
 *
 * A file is one JSON document, `{"trustDomain", "source", "url"?, "fetchedAt", "bundle"}`, where `bundle` is the
 * SPIFFE bundle itself, so an operator can read it and hand it to other tools.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import type { StateDir } from '../config/statedir.ts';
import { SpiffeBundle } from '../spiffe/bundle.ts';
import { TrustDomain } from '../spiffe/id.ts';
import { FederationError, FederationErrorCode } from './errors.ts';

/** A foreign trust domain's bundle as held: where it came from and when. */
export interface StoredBundle {
  readonly bundle: SpiffeBundle;
  /** `endpoint`: fetched; `bootstrap`: from configuration; `set`: put there by an operator. */
  readonly source: 'endpoint' | 'bootstrap' | 'set';
  /** When it was fetched (or set). */
  readonly fetchedAt: Date;
  /** The endpoint it was fetched from. */
  readonly url?: string;
}

const SOURCES: ReadonlySet<string> = new Set(['endpoint', 'bootstrap', 'set']);
/** The subdirectory of the state directory. */
export const FEDERATION_STATE_SUBDIR = 'federation';
const SUFFIX = '.json';

/** JSON.rawJSON (Node 21+) writes a value's source text as is; the TypeScript library does not declare it yet. */
const rawJson = (JSON as unknown as { rawJSON(text: string): unknown }).rawJSON;

/**
 * The file of a trust domain: `<name>.json`, or, for a name that is not a safe file name (it starts with `.`,
 * `-` or `_`, or is too long for one), `td-<sha256 prefix>.json`. The document names its trust domain either way.
 */
export function federationFileName(trustDomain: TrustDomain): string {
  const name = trustDomain.name;
  if (/^[a-z0-9]/.test(name) && name.length + SUFFIX.length <= 255) return name + SUFFIX;
  return `td-${createHash('sha256').update(name).digest('hex').slice(0, 32)}${SUFFIX}`;
}

export class FederationStore {
  readonly #dir: StateDir;

  private constructor(dir: StateDir) {
    this.#dir = dir;
  }

  /** Opens (creating it, 0700) the `federation` subdirectory of the state directory. */
  static async open(stateDir: StateDir): Promise<FederationStore> {
    return new FederationStore(await stateDir.sub(FEDERATION_STATE_SUBDIR));
  }

  /** Where the files are. */
  get path(): string {
    return this.#dir.path;
  }

  /**
   * The stored bundle of `trustDomain`, or undefined when there is none. A corrupt file, or one that holds another
   * trust domain, is a `FederationError` (`ERR_FEDERATION_STATE`) naming the file; a file with loose permissions
   * is refused by the state directory (`ERR_STATE_DIR`).
   */
  async load(trustDomain: TrustDomain): Promise<StoredBundle | undefined> {
    const name = federationFileName(trustDomain);
    const data = await this.#dir.read(name);
    return data === undefined ? undefined : this.#decode(name, data, trustDomain);
  }

  /** Writes the bundle of `trustDomain` atomically (0600), replacing any earlier one. */
  async save(trustDomain: TrustDomain, stored: StoredBundle): Promise<void> {
    if (!stored.bundle.trustDomain.equals(trustDomain)) {
      throw new FederationError(
        FederationErrorCode.State,
        `refusing to store the bundle of "${stored.bundle.trustDomain}" as the bundle of "${trustDomain}"`,
      );
    }
    if (Number.isNaN(stored.fetchedAt.getTime())) throw new RangeError('fetchedAt is not a valid Date');
    await this.#dir.write(federationFileName(trustDomain), encode(stored));
  }

  /** Every stored bundle, in file name order. One corrupt file fails the whole listing (the error names it). */
  async list(): Promise<StoredBundle[]> {
    const out: StoredBundle[] = [];
    for (const name of await this.#dir.list()) {
      if (!name.endsWith(SUFFIX)) continue;
      const data = await this.#dir.read(name);
      if (data !== undefined) out.push(this.#decode(name, data, undefined));
    }
    return out;
  }

  /** Forgets the bundle of `trustDomain` (ending the relationship); nothing happens when there is none. */
  async remove(trustDomain: TrustDomain): Promise<void> {
    await this.#dir.remove(federationFileName(trustDomain));
  }

  #decode(name: string, data: Buffer, expected: TrustDomain | undefined): StoredBundle {
    const file = join(this.#dir.path, name);
    const fail = (why: string, cause?: unknown): never => {
      throw new FederationError(FederationErrorCode.State, `stored federated bundle ${file}: ${why}`, {
        cause,
      });
    };
    let doc: unknown;
    try {
      // spiffe_sequence is 64-bit: integers keep their source text, so re-serialising the bundle is exact.
      doc = JSON.parse(
        new TextDecoder('utf-8', { fatal: true }).decode(data),
        (_key, value, context?: { source?: string }) => {
          const source = context?.source;
          return typeof value === 'number' && source !== undefined && /^-?\d+$/.test(source)
            ? rawJson(source)
            : value;
        },
      );
    } catch (cause) {
      return fail(`not valid JSON (${(cause as Error).message})`, cause);
    }
    if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) return fail('not a JSON object');
    const { trustDomain, source, url, fetchedAt, bundle } = doc as Record<string, unknown>;
    if (typeof trustDomain !== 'string') return fail('"trustDomain" is missing');
    let td: TrustDomain;
    try {
      td = TrustDomain.parse(trustDomain);
    } catch (cause) {
      return fail(`"trustDomain": ${(cause as Error).message}`, cause);
    }
    if (expected !== undefined ? !td.equals(expected) : federationFileName(td) !== name) {
      return fail(`holds trust domain "${trustDomain}", not the one its name is for`);
    }
    if (typeof source !== 'string' || !SOURCES.has(source)) {
      return fail(`"source" must be one of ${[...SOURCES].join(', ')}`);
    }
    if (url !== undefined && typeof url !== 'string') return fail('"url" must be a string');
    const at = typeof fetchedAt === 'string' ? new Date(fetchedAt) : undefined;
    if (at === undefined || Number.isNaN(at.getTime())) return fail('"fetchedAt" must be an ISO 8601 time');
    if (typeof bundle !== 'object' || bundle === null || Array.isArray(bundle)) {
      return fail('"bundle" must be a SPIFFE bundle (a JSON object)');
    }
    let parsed: SpiffeBundle;
    try {
      parsed = SpiffeBundle.parse(td, JSON.stringify(bundle));
    } catch (cause) {
      return fail((cause as Error).message, cause);
    }
    return {
      bundle: parsed,
      source: source as StoredBundle['source'],
      fetchedAt: at,
      ...(url === undefined ? {} : { url }),
    };
  }
}

function encode(stored: StoredBundle): string {
  const head: Record<string, string> = {
    trustDomain: stored.bundle.trustDomain.name,
    source: stored.source,
    ...(stored.url === undefined ? {} : { url: stored.url }),
    fetchedAt: stored.fetchedAt.toISOString(),
  };
  // The bundle's own text, embedded as is: marshal() writes spiffe_sequence exactly.
  const fields = Object.entries(head).map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`);
  return `{${fields.join(',')},"bundle":${stored.bundle.marshal()}}\n`;
}
