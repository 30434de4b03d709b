/**
 * Registration entries for the bundled agent: which SPIFFE ID a workload gets, given the selectors its
 * attestors found. They live in a YAML file (usually a ConfigMap), are validated as a whole (every problem is
 * reported with its line and column, and a file with any problem is refused), and are re-read when the file
 * changes so that an edit takes effect without a restart and a broken edit never replaces a working set.
 *
 * ```yaml
 * entries:
 *   - spiffeId: spiffe://spoke.example.org/kube-svid-proxy
 *     selectors: [ "unix:uid:0" ]
 *     x509SvidTtl: 1h
 *     jwtSvidTtl: 5m
 *     dnsNames: [ localhost ]
 *     federatesWith: [ hub.example.org ]
 *     hint: internal
 * ```
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { isMap, type Node } from 'yaml';
import { compareStrings } from '../config/compare.ts';
import { type WatchedFile, watchFile } from '../config/watch.ts';
import { describe, quote, readYaml, type YamlProblem, YamlReader } from '../config/yaml.ts';
import { SpiffeError } from '../spiffe/errors.ts';
import { SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { AgentError, AgentErrorCode, FileProblemsError } from './errors.ts';
import { formatSelector, parseSelector, type Selector, selectorsMatch } from './selectors.ts';

/** One registration entry. Immutable; `key` identifies its content (any edit yields a new key). */
export interface RegistrationEntry {
  /** First 16 hex digits of the SHA-256 of a canonical JSON of every field below except `line`. */
  readonly key: string;
  readonly spiffeId: SpiffeId;
  /** All must match. Sorted by string form (`type:value`). */
  readonly selectors: readonly Selector[];
  readonly x509SvidTtlSeconds?: number;
  readonly jwtSvidTtlSeconds?: number;
  /** In file order. */
  readonly dnsNames: readonly string[];
  /** Sorted by name; never the agent's own trust domain. */
  readonly federatesWith: readonly TrustDomain[];
  readonly hint?: string;
  /** 1-based line of the entry in its file. */
  readonly line: number;
}

/** One thing wrong with an entries file; `line` and `column` are 1-based. */
export type EntryProblem = YamlProblem;

/**
 * An entries file was refused. The message lists every problem, one a line, as `<file>:<line>:<col>: <what>`;
 * `problems` holds the same, for programs. `code` is `ERR_AGENT_ENTRIES`.
 */
export class EntriesError extends FileProblemsError {
  constructor(file: string, problems: readonly EntryProblem[]) {
    super(AgentErrorCode.Entries, file, problems);
    this.name = 'EntriesError';
  }
}

/** A validated, immutable set of registration entries, in file order. */
export class EntrySet {
  static readonly empty: EntrySet = new EntrySet([]);

  readonly entries: readonly RegistrationEntry[];

  constructor(entries: readonly RegistrationEntry[]) {
    this.entries = Object.freeze([...entries]);
  }

  /**
   * The entries whose selectors are all among `selectors` (formatted `type:value` strings), in file order: the
   * first is the caller's default identity. A later match is skipped when it repeats a hint already returned,
   * or repeats a SPIFFE ID already returned with the same (or no) hint, since hints must be unique per response.
   */
  match(selectors: ReadonlySet<string>): RegistrationEntry[] {
    const out: RegistrationEntry[] = [];
    const hints = new Set<string>();
    const idHints = new Set<string>();
    for (const entry of this.entries) {
      // An entry with no selectors would match every caller; parseEntries never makes one.
      if (entry.selectors.length === 0 || !selectorsMatch(entry.selectors, selectors)) continue;
      const hint = entry.hint ?? '';
      const idHint = `${entry.spiffeId.toString()}\n${hint}`;
      if ((hint !== '' && hints.has(hint)) || idHints.has(idHint)) continue;
      if (hint !== '') hints.add(hint);
      idHints.add(idHint);
      out.push(entry);
    }
    return out;
  }

  /** Every trust domain some entry federates with, sorted by name, each once. */
  federatedTrustDomains(): TrustDomain[] {
    const byName = new Map<string, TrustDomain>();
    for (const entry of this.entries) for (const td of entry.federatesWith) byName.set(td.name, td);
    return [...byName.values()].sort((a, b) => a.compare(b));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Parsing

const ENTRY_KEYS = [
  'spiffeId',
  'selectors',
  'x509SvidTtl',
  'jwtSvidTtl',
  'dnsNames',
  'federatesWith',
  'hint',
] as const;
type EntryKey = (typeof ENTRY_KEYS)[number];

const MIN_TTL_SECONDS = 1;
const MAX_HINT_BYTES = 1024;
const MAX_DNS_NAME_LENGTH = 253;
const DNS_LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** Checks a DNS name for a certificate SAN; returns what is wrong with it, or undefined. */
function dnsNameProblem(name: string): string | undefined {
  if (name.length === 0) return 'is empty';
  if (name.length > MAX_DNS_NAME_LENGTH) return `is longer than ${MAX_DNS_NAME_LENGTH} characters`;
  const labels = name.split('.');
  if (labels[0] === '*') {
    labels.shift();
    if (labels.length === 0) return 'is a bare wildcard (write e.g. *.example.org)';
  }
  for (const label of labels) {
    if (label.length === 0) return 'has an empty label (leading, trailing or doubled ".")';
    if (label.includes('*')) return 'may have a wildcard only as its whole first label ("*.")';
    if (!DNS_LABEL.test(label)) {
      return `has an invalid label "${label.length > 70 ? `${label.slice(0, 70)}…` : label}" (labels are 1–63 of [a-z0-9-], not starting or ending with "-")`;
    }
  }
  return undefined;
}

class Parser extends YamlReader {
  readonly #trustDomain: TrustDomain;

  constructor(reader: YamlReader, trustDomain: TrustDomain) {
    super(reader.doc, reader.lineCounter);
    this.problems.push(...reader.problems);
    this.#trustDomain = trustDomain;
  }

  top(): RegistrationEntry[] {
    const items = this.topLevelList('entries', {
      notMap: 'the file must be a map with an "entries" list (write "entries: []" for none)',
      missingHint: 'write "entries: []" for no identities',
    });
    const out: RegistrationEntry[] = [];
    const seen = new Map<string, number>();
    for (const [index, item] of items.entries()) {
      const entry = this.entry(item.node, item.offset, index);
      if (entry === undefined) continue;
      const identity = JSON.stringify([entry.spiffeId.toString(), entry.selectors.map(formatSelector)]);
      const first = seen.get(identity);
      if (first !== undefined) {
        this.report(
          item.offset,
          `duplicate entry: the entry at line ${first} has the same spiffeId and selectors`,
        );
        continue;
      }
      seen.set(identity, entry.line);
      out.push(entry);
    }
    return out;
  }

  entry(node: Node | null, offset: number, index: number): RegistrationEntry | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    const where = `entry ${index + 1}`;
    if (target === null || !isMap(target)) {
      this.report(offset, `${where} must be a map with spiffeId and selectors, got ${describe(target)}`);
      return undefined;
    }
    const before = this.problems.length;
    const fields = this.fields<EntryKey>(target, ENTRY_KEYS, where);
    const line = this.position(offset).line;
    const field = (key: EntryKey) => fields.get(key);

    // spiffeId
    let spiffeId: SpiffeId | undefined;
    const idField = field('spiffeId');
    if (idField === undefined) {
      this.report(offset, `${where} is missing required key "spiffeId"`);
    } else {
      const text = this.string(idField.value, idField.valueOffset, 'spiffeId');
      if (text !== undefined) spiffeId = this.spiffeId(text, idField.valueOffset);
    }

    // selectors
    const selectors: Selector[] = [];
    const selField = field('selectors');
    if (selField === undefined) {
      this.report(
        offset,
        `${where} is missing required key "selectors" (at least one, e.g. "unix:uid:1000")`,
      );
    } else {
      const items = this.list(selField.value, selField.valueOffset, 'selectors');
      if (items !== undefined && items.length === 0) {
        this.report(
          selField.valueOffset,
          'selectors must not be empty: an entry needs at least one selector',
        );
      }
      const seen = new Set<string>();
      for (const item of items ?? []) {
        const text = this.string(item.node, item.offset, 'a selector');
        if (text === undefined) continue;
        let selector: Selector;
        try {
          selector = parseSelector(text);
        } catch (err) {
          this.report(item.offset, err instanceof Error ? err.message : String(err));
          continue;
        }
        const formatted = formatSelector(selector);
        if (seen.has(formatted)) {
          this.report(item.offset, `duplicate selector ${quote(formatted)}`);
          continue;
        }
        seen.add(formatted);
        selectors.push(selector);
      }
      selectors.sort((a, b) => compareStrings(formatSelector(a), formatSelector(b)));
    }

    // TTLs
    const x509Field = field('x509SvidTtl');
    const x509SvidTtlSeconds =
      x509Field && this.duration(x509Field.value, x509Field.valueOffset, 'x509SvidTtl', MIN_TTL_SECONDS);
    const jwtField = field('jwtSvidTtl');
    const jwtSvidTtlSeconds =
      jwtField && this.duration(jwtField.value, jwtField.valueOffset, 'jwtSvidTtl', MIN_TTL_SECONDS);

    // dnsNames
    const dnsNames: string[] = [];
    const dnsField = field('dnsNames');
    if (dnsField !== undefined) {
      for (const item of this.list(dnsField.value, dnsField.valueOffset, 'dnsNames') ?? []) {
        const name = this.string(item.node, item.offset, 'a DNS name');
        if (name === undefined) continue;
        const problem = dnsNameProblem(name);
        if (problem !== undefined) this.report(item.offset, `DNS name ${quote(name)} ${problem}`);
        else if (dnsNames.includes(name)) this.report(item.offset, `duplicate DNS name ${quote(name)}`);
        else dnsNames.push(name);
      }
    }

    // federatesWith
    const federatesWith: TrustDomain[] = [];
    const fedField = field('federatesWith');
    if (fedField !== undefined) {
      for (const item of this.list(fedField.value, fedField.valueOffset, 'federatesWith') ?? []) {
        const text = this.string(item.node, item.offset, 'a trust domain');
        if (text === undefined) continue;
        let td: TrustDomain;
        try {
          td = TrustDomain.parse(text);
        } catch (err) {
          this.report(item.offset, `federatesWith: ${spiffeMessage(err)}`);
          continue;
        }
        if (td.equals(this.#trustDomain)) {
          this.report(
            item.offset,
            `federatesWith must not name the agent's own trust domain ${quote(td.name)}`,
          );
        } else if (federatesWith.some((other) => other.equals(td))) {
          this.report(item.offset, `duplicate trust domain ${quote(td.name)} in federatesWith`);
        } else {
          federatesWith.push(td);
        }
      }
      federatesWith.sort((a, b) => a.compare(b));
    }

    // hint
    let hint: string | undefined;
    const hintField = field('hint');
    if (hintField !== undefined) {
      const text = this.string(hintField.value, hintField.valueOffset, 'hint');
      if (text !== undefined) {
        if (text.length === 0) this.report(hintField.valueOffset, 'hint must not be empty (omit it instead)');
        else if (Buffer.byteLength(text, 'utf8') > MAX_HINT_BYTES) {
          this.report(hintField.valueOffset, `hint is longer than ${MAX_HINT_BYTES} bytes`);
        } else hint = text;
      }
    }

    if (this.problems.length !== before || spiffeId === undefined) return undefined;
    return makeEntry({
      spiffeId,
      selectors,
      ...(x509SvidTtlSeconds !== undefined && { x509SvidTtlSeconds }),
      ...(jwtSvidTtlSeconds !== undefined && { jwtSvidTtlSeconds }),
      dnsNames,
      federatesWith,
      ...(hint !== undefined && { hint }),
      line,
    });
  }

  spiffeId(text: string, offset: number): SpiffeId | undefined {
    let id: SpiffeId;
    try {
      id = SpiffeId.parse(text);
    } catch (err) {
      this.report(offset, `spiffeId: ${spiffeMessage(err)}`);
      return undefined;
    }
    if (!id.isMemberOf(this.#trustDomain)) {
      this.report(
        offset,
        `spiffeId ${quote(id.toString())} is outside the agent's trust domain ${quote(this.#trustDomain.name)}`,
      );
      return undefined;
    }
    if (id.isRoot) {
      this.report(
        offset,
        `spiffeId ${quote(id.toString())} has no path: a trust domain's own ID names no workload`,
      );
      return undefined;
    }
    return id;
  }
}

function spiffeMessage(err: unknown): string {
  if (err instanceof SpiffeError) return `${err.message} (${err.code})`;
  return err instanceof Error ? err.message : String(err);
}

/** Builds an entry with its content key. Exported for tests and for programs that make entries themselves. */
export function makeEntry(fields: Omit<RegistrationEntry, 'key'>): RegistrationEntry {
  const selectors = [...fields.selectors].sort((a, b) =>
    compareStrings(formatSelector(a), formatSelector(b)),
  );
  const federatesWith = [...fields.federatesWith].sort((a, b) => a.compare(b));
  const canonical = JSON.stringify({
    spiffeId: fields.spiffeId.toString(),
    selectors: selectors.map(formatSelector),
    x509SvidTtlSeconds: fields.x509SvidTtlSeconds ?? null,
    jwtSvidTtlSeconds: fields.jwtSvidTtlSeconds ?? null,
    dnsNames: fields.dnsNames,
    federatesWith: federatesWith.map((td) => td.name),
    hint: fields.hint ?? null,
  });
  const key = createHash('sha256').update(canonical).digest('hex').slice(0, 16);
  return Object.freeze({
    key,
    spiffeId: fields.spiffeId,
    selectors: Object.freeze(selectors),
    ...(fields.x509SvidTtlSeconds !== undefined && { x509SvidTtlSeconds: fields.x509SvidTtlSeconds }),
    ...(fields.jwtSvidTtlSeconds !== undefined && { jwtSvidTtlSeconds: fields.jwtSvidTtlSeconds }),
    dnsNames: Object.freeze([...fields.dnsNames]),
    federatesWith: Object.freeze(federatesWith),
    ...(fields.hint !== undefined && { hint: fields.hint }),
    line: fields.line,
  });
}

/**
 * Parses and validates an entries file. Throws one `EntriesError` (code `ERR_AGENT_ENTRIES`) listing every
 * problem found, each with its 1-based line and column; never anything else.
 */
export function parseEntries(text: string, options: { file: string; trustDomain: TrustDomain }): EntrySet {
  const { reader, ok } = readYaml(text, 'the entries');
  const parser = new Parser(reader, options.trustDomain);
  if (ok) {
    let entries: RegistrationEntry[] = [];
    try {
      entries = parser.top();
    } catch (err) {
      parser.report(0, `cannot read the entries: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (parser.problems.length === 0) return new EntrySet(entries);
  }
  throw new EntriesError(options.file, parser.sortedProblems());
}

/** Reads and parses an entries file. Throws `AgentError` (`ERR_AGENT_ENTRIES`); `EntriesError` if invalid. */
export async function loadEntriesFile(
  file: string,
  options: { trustDomain: TrustDomain },
): Promise<EntrySet> {
  const text = await readEntriesText(file);
  return parseEntries(text, { file, trustDomain: options.trustDomain });
}

async function readEntriesText(file: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new AgentError(AgentErrorCode.Entries, `${file}: cannot read the entries file: ${reason}`, {
      cause: err,
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Watching

export interface EntriesWatcher {
  /** The last valid set. */
  readonly current: EntrySet;
  /** 0 for the initial load, incremented on every change of `current`. */
  readonly generation: number;
  /** Re-reads the file now (SIGHUP); resolves once the change (or the refusal) was handled. */
  reload(): Promise<void>;
  /** Stops watching. Idempotent. */
  close(): void;
}

export interface WatchEntriesOptions {
  readonly trustDomain: TrustDomain;
  /** Quiet time after a file system event before re-reading. Default 200 ms. */
  readonly debounceMs?: number;
  /** Re-read this often regardless of events, since `fs.watch` can miss some. Default 5000 ms. */
  readonly pollIntervalMs?: number;
  /** Called after `current` changed to a new valid set. */
  readonly onChange?: (set: EntrySet, previous: EntrySet) => void;
  /**
   * Called when the file became unreadable or invalid (`EntriesError`, with `problems`); `current` keeps the
   * last valid set. Called once per distinct failure, not on every re-read.
   */
  readonly onError?: (err: AgentError) => void;
}

/**
 * Loads an entries file (throwing if it is unreadable or invalid) and follows its changes. The file's
 * directory is watched, not the file, since a Kubernetes ConfigMap volume replaces the file by swapping its
 * `..data` symlink; a slow unref'd poll catches whatever `fs.watch` misses. Nothing here keeps the process
 * alive.
 */
export async function watchEntries(file: string, options: WatchEntriesOptions): Promise<EntriesWatcher> {
  const { trustDomain, debounceMs = 200, pollIntervalMs = 5000, onChange, onError } = options;
  const asAgentError = (err: Error): AgentError =>
    err instanceof AgentError
      ? err
      : new AgentError(AgentErrorCode.Entries, `${file}: ${err.message}`, { cause: err });
  let watched: WatchedFile<EntrySet>;
  try {
    watched = await watchFile(file, {
      parse: (text) => parseEntries(text, { file, trustDomain }),
      debounceMs,
      pollIntervalMs,
      ...(onChange ? { onChange } : {}),
      onError: (err) => onError?.(asAgentError(err)),
    });
  } catch (err) {
    throw asAgentError(err as Error);
  }
  // Counted from this watcher's own start, whatever number the file watcher gives its first load.
  const initial = watched.generation;
  return {
    get current() {
      return watched.current;
    },
    get generation() {
      return watched.generation - initial;
    },
    reload: () => watched.reload(),
    close: () => watched.close(),
  };
}
