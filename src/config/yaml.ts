/**
 * Reading YAML config files with positions: every problem is reported with its 1-based line and column, all
 * problems of a file are collected before it is refused, and nothing of a refused file is used.
 */
import {
  type Document,
  isAlias,
  isMap,
  isScalar,
  isSeq,
  LineCounter,
  type Node,
  type Pair,
  parseDocument,
  type Scalar,
  type YAMLMap,
  type YAMLSeq,
} from 'yaml';
import { parseDuration } from './duration.ts';

/** One thing wrong with a config file; `line` and `column` are 1-based. */
export interface YamlProblem {
  readonly line: number;
  readonly column: number;
  readonly message: string;
}

/** Formats problems as `<file>:<line>:<col>: <what>`, one a line. */
export function formatProblems(file: string, problems: readonly YamlProblem[]): string {
  return problems.map((p) => `${file}:${p.line}:${p.column}: ${p.message}`).join('\n');
}

export function quote(text: string): string {
  return JSON.stringify(text.length > 80 ? `${text.slice(0, 80)}…` : text);
}

export function describe(node: Node | null): string {
  if (node === null) return 'nothing';
  if (isMap(node)) return 'a map';
  if (isSeq(node)) return 'a list';
  if (isScalar(node)) {
    const v = node.value;
    if (v === null || v === undefined) return 'null';
    if (typeof v === 'string') return `a string ${quote(v)}`;
    if (typeof v === 'number' || typeof v === 'bigint') return `a number (${String(v)})`;
    if (typeof v === 'boolean') return `a boolean (${String(v)})`;
    return 'a scalar of an unsupported type';
  }
  return 'an alias';
}

export class YamlReader {
  readonly problems: YamlProblem[] = [];
  readonly doc: Document.Parsed;
  readonly lineCounter: LineCounter;

  constructor(doc: Document.Parsed, lines: LineCounter) {
    this.doc = doc;
    this.lineCounter = lines;
  }

  position(offset: number): { line: number; column: number } {
    const { line, col } = this.lineCounter.linePos(offset);
    return { line: Math.max(line, 1), column: Math.max(col, 1) };
  }

  offsetOf(node: Node | null, fallback: number): number {
    return node?.range?.[0] ?? fallback;
  }

  report(offset: number, message: string): void {
    this.problems.push({ ...this.position(offset), message });
  }

  /** Follows an alias to its anchored node; undefined (after reporting) when it leads nowhere. */
  deref(node: Node | null, fallback: number): Node | null | undefined {
    if (node === null || !isAlias(node)) return node;
    const target = node.resolve(this.doc);
    if (target === undefined) {
      this.report(this.offsetOf(node, fallback), `alias *${node.source} refers to no anchor`);
      return undefined;
    }
    return target;
  }

  /**
   * The pairs of a map with string keys from `allowed`, each key once; reports the others. Returns the value
   * of each allowed key with the key's offset.
   */
  fields<K extends string>(
    map: YAMLMap,
    allowed: readonly K[],
    where: string,
  ): Map<K, { value: Node | null; keyOffset: number; valueOffset: number }> {
    const out = new Map<K, { value: Node | null; keyOffset: number; valueOffset: number }>();
    const mapOffset = this.offsetOf(map, 0);
    for (const pair of map.items as Pair<Node | null, Node | null>[]) {
      const keyNode = pair.key;
      const keyOffset = this.offsetOf(keyNode, mapOffset);
      const valueOffset = this.offsetOf(pair.value, keyOffset);
      const key = keyNode !== null && isScalar(keyNode) ? keyNode.value : undefined;
      if (typeof key !== 'string') {
        this.report(keyOffset, `${where} keys must be strings, got ${describe(keyNode)}`);
        continue;
      }
      if (!(allowed as readonly string[]).includes(key)) {
        this.report(keyOffset, `unknown key ${quote(key)} in ${where} (allowed: ${allowed.join(', ')})`);
        continue;
      }
      // Duplicate keys are refused by the YAML parser already (uniqueKeys).
      out.set(key as K, { value: pair.value, keyOffset, valueOffset });
    }
    return out;
  }

  /** A string scalar, or undefined after reporting. */
  string(node: Node | null, offset: number, what: string): string | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    if (target !== null && isScalar(target) && typeof target.value === 'string') return target.value;
    this.report(offset, `${what} must be a string, got ${describe(target)}`);
    return undefined;
  }

  /** The items of a list, each with its own offset, or undefined after reporting. */
  list(node: Node | null, offset: number, what: string): { node: Node | null; offset: number }[] | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    if (target === null || !isSeq(target)) {
      this.report(offset, `${what} must be a list, got ${describe(target)}`);
      return undefined;
    }
    return (target as YAMLSeq<Node | null>).items.map((item) => ({
      node: item,
      offset: this.offsetOf(item, offset),
    }));
  }

  duration(node: Node | null, offset: number, what: string, minSeconds = 0): number | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    const value = target !== null && isScalar(target) ? (target as Scalar).value : undefined;
    if (typeof value !== 'string' && typeof value !== 'number') {
      this.report(offset, `${what} must be a duration such as 1h, 5m or 30s, got ${describe(target)}`);
      return undefined;
    }
    let seconds: number;
    try {
      seconds = parseDuration(value);
    } catch (err) {
      this.report(offset, `${what}: ${err instanceof Error ? err.message : String(err)}`);
      return undefined;
    }
    if (!Number.isFinite(seconds)) {
      this.report(offset, `${what} ${quote(String(value))} is too large`);
      return undefined;
    }
    if (seconds < minSeconds) {
      this.report(offset, `${what} ${quote(String(value))} is shorter than the minimum of ${minSeconds}s`);
      return undefined;
    }
    return seconds;
  }

  /** A map node, or undefined after reporting. */
  map(node: Node | null, offset: number, what: string): YAMLMap | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    if (target !== null && isMap(target)) return target;
    this.report(offset, `${what} must be a map, got ${describe(target)}`);
    return undefined;
  }

  /** A number within [min, max], or undefined after reporting. */
  number(
    node: Node | null,
    offset: number,
    what: string,
    min = -Infinity,
    max = Infinity,
  ): number | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    const value = target !== null && isScalar(target) ? (target as Scalar).value : undefined;
    if (typeof value !== 'number' || !Number.isFinite(value)) {
      this.report(offset, `${what} must be a number, got ${describe(target)}`);
      return undefined;
    }
    if (value < min || value > max) {
      this.report(offset, `${what} must be between ${min} and ${max}, got ${value}`);
      return undefined;
    }
    return value;
  }

  boolean(node: Node | null, offset: number, what: string): boolean | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    const value = target !== null && isScalar(target) ? (target as Scalar).value : undefined;
    if (typeof value === 'boolean') return value;
    this.report(offset, `${what} must be true or false, got ${describe(target)}`);
    return undefined;
  }

  /**
   * The items of the one required list of a file whose top level is a map holding only `key`, each with its
   * offset; empty after reporting a file of another shape. `notMap` is the problem for a top level that is not
   * a map (`, got <what>` is appended); `missingHint` is put in parentheses after a missing key's problem.
   */
  topLevelList(
    key: string,
    messages: { notMap: string; missingHint: string },
  ): { node: Node | null; offset: number }[] {
    const contents = this.doc.contents as Node | null;
    const top = this.deref(contents, 0);
    if (top === undefined) return [];
    if (top === null || !isMap(top)) {
      this.report(this.offsetOf(contents, 0), `${messages.notMap}, got ${describe(top)}`);
      return [];
    }
    const field = this.fields(top, [key], 'the top level').get(key);
    if (field === undefined) {
      this.report(this.offsetOf(top, 0), `missing required key ${quote(key)} (${messages.missingHint})`);
      return [];
    }
    return this.list(field.value, field.valueOffset, quote(key)) ?? [];
  }

  /** Problems in file order (ties keep the order they were found in). */
  sortedProblems(): YamlProblem[] {
    return this.problems
      .map((p, i) => ({ p, i }))
      .sort((a, b) => a.p.line - b.p.line || a.p.column - b.p.column || a.i - b.i)
      .map(({ p }) => p);
  }
}

/**
 * Parses YAML text into a reader. Syntax errors are reported as problems (and the tree is then not read, since
 * it is a guess); `ok` tells whether the tree may be read.
 */
export function readYaml(text: string, what: string): { reader: YamlReader; ok: boolean } {
  const lines = new LineCounter();
  let doc: Document.Parsed;
  try {
    doc = parseDocument(text, { lineCounter: lines, prettyErrors: false });
  } catch (err) {
    const reader = new YamlReader(parseDocument(''), lines);
    reader.problems.push({ line: 1, column: 1, message: `cannot parse YAML: ${(err as Error).message}` });
    return { reader, ok: false };
  }
  const reader = new YamlReader(doc, lines);
  for (const e of doc.errors) {
    const message =
      e.code === 'MULTIPLE_DOCS'
        ? `the file holds more than one YAML document ("---"); put all of ${what} in one`
        : (e.message.split('\n')[0] ?? e.message);
    reader.report(e.pos[0], `YAML syntax: ${message}`);
  }
  return { reader, ok: doc.errors.length === 0 };
}
