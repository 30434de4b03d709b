/**
 * The pattern rules of a policy as a segment trie per trust domain, so that finding the first pattern that
 * matches an ID costs a walk along the ID's segments instead of a test of every pattern. It answers exactly
 * what testing the patterns one by one in file order answers (`patternMatches`): the first matching pattern.
 */

/** What the index needs of a pattern rule: its literal trust domain and its segments (`*`, a final `**`). */
export interface IndexedPattern {
  readonly trustDomain: string;
  readonly segments: readonly string[];
}

/** No pattern. A small integer rather than Infinity, so that positions stay small integers in V8's objects. */
const NONE = 2 ** 30 - 1;

/** Up to this many literal children are compared in place; more are looked up by a slice of the path. */
const SCAN_LIMIT = 4;

interface TrieNode {
  /** Literal segments leading to children, and the children, at the same indexes. */
  readonly keys: string[];
  readonly children: TrieNode[];
  /** The children by key, once there are more than SCAN_LIMIT (built with the index). */
  byKey: Map<string, TrieNode> | undefined;
  /** The child for `*`: any one segment. */
  star: TrieNode | undefined;
  /** The first pattern (its position in the order given) that ends here: IDs with exactly this many segments. */
  end: number;
  /** The first pattern whose final `**` follows this node: IDs with at least one segment more. */
  rest: number;
  /** The smallest position anywhere in this subtree, to skip a subtree that cannot hold an earlier match. */
  min: number;
}

function node(): TrieNode {
  return { keys: [], children: [], byKey: undefined, star: undefined, end: NONE, rest: NONE, min: NONE };
}

function literalChildForBuild(at: TrieNode, segment: string): TrieNode {
  const i = at.keys.indexOf(segment);
  if (i >= 0) return at.children[i] as TrieNode;
  const child = node();
  at.keys.push(segment);
  at.children.push(child);
  return child;
}

/** The patterns of one policy, immutable once built. */
export class PatternIndex<P extends IndexedPattern> {
  readonly #patterns: readonly P[];
  readonly #roots = new Map<string, TrieNode>();

  /** `patterns` in precedence order (file order); earlier ones win. Duplicates are allowed: the first wins. */
  constructor(patterns: readonly P[]) {
    if (patterns.length >= NONE) throw new RangeError(`too many patterns: ${patterns.length}`);
    this.#patterns = patterns;
    // While building, a node's children are found through a map (built on the first child).
    const building = new Map<TrieNode, Map<string, TrieNode>>();
    for (const [position, pattern] of patterns.entries()) {
      let at = this.#roots.get(pattern.trustDomain);
      if (at === undefined) {
        at = node();
        this.#roots.set(pattern.trustDomain, at);
      }
      at.min = Math.min(at.min, position);
      const last = pattern.segments.length - 1;
      for (const [i, segment] of pattern.segments.entries()) {
        if (segment === '**' && i === last) {
          at.rest = Math.min(at.rest, position);
          break;
        }
        let next: TrieNode;
        if (segment === '*') {
          next = at.star ??= node();
        } else if (at.keys.length < SCAN_LIMIT) {
          next = literalChildForBuild(at, segment);
        } else {
          let map = building.get(at);
          if (map === undefined) {
            const { keys, children } = at;
            map = new Map(keys.map((key, k) => [key, children[k] as TrieNode]));
            building.set(at, map);
          }
          let child = map.get(segment);
          if (child === undefined) {
            child = node();
            map.set(segment, child);
            at.keys.push(segment);
            at.children.push(child);
          }
          next = child;
        }
        next.min = Math.min(next.min, position);
        at = next;
        if (i === last) at.end = Math.min(at.end, position);
      }
    }
    for (const [at, map] of building) if (at.keys.length > SCAN_LIMIT) at.byKey = map;
  }

  get size(): number {
    return this.#patterns.length;
  }

  /**
   * The first pattern (in the order given) of `trustDomain` that matches an ID's path (`/a/b`, as
   * `SpiffeId.path`; its segments are not split out, only compared in place or sliced one at a time), or
   * undefined.
   */
  first(trustDomain: string, path: string): P | undefined {
    const root = this.#roots.get(trustDomain);
    if (root === undefined || path.length === 0) return undefined;
    const best = firstMatch(root, path, 0, NONE);
    return best === NONE ? undefined : this.#patterns[best];
  }
}

/**
 * The smallest position under `at` whose pattern matches the rest of `path` from `slash` (the index of the "/"
 * before the next segment, or `path.length` when none is left), if smaller than `best`; otherwise `best`.
 * Follows one child at a time, and recurses only where a node has both a literal child and a `*` that match.
 */
function firstMatch(start: TrieNode, path: string, from: number, bestSoFar: number): number {
  let at: TrieNode | undefined = start;
  let slash = from;
  let best = bestSoFar;
  while (at !== undefined && at.min < best) {
    if (slash === path.length) return at.end < best ? at.end : best;
    // A `**` here takes the rest, which holds at least one segment.
    if (at.rest < best) best = at.rest;
    let next = path.indexOf('/', slash + 1);
    if (next < 0) next = path.length;
    const literal = literalChild(at, path, slash + 1, next);
    if (literal !== undefined && at.star !== undefined) best = firstMatch(literal, path, next, best);
    at = at.star ?? literal;
    slash = next;
  }
  return best;
}

/** The child for the literal segment `path[start, end)`. */
function literalChild(at: TrieNode, path: string, start: number, end: number): TrieNode | undefined {
  if (at.byKey !== undefined) return at.byKey.get(path.slice(start, end));
  const keys = at.keys;
  const length = end - start;
  for (let i = 0; i < keys.length; i++) {
    const key = keys[i] as string;
    if (key.length === length && path.startsWith(key, start)) return at.children[i];
  }
  return undefined;
}
