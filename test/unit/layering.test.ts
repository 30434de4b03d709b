/**
 * Layering: which folders may import which. Product code (src/) ships alone, so it imports nothing outside src/;
 * the development harness (dev/), scripts/, bench/ and deploy/ may use src/ and each other but never test/.
 * Inside src/, folders are layered (LAYERS, bottom first) and an import upwards is a back-edge: the ones that
 * exist today are listed in KNOWN_BACK_EDGES, and the test asserts that list is exact, so a new one fails and a
 * removed one asks for the list to shrink.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { describe, it } from 'node:test';

const ROOT = resolve(import.meta.dirname, '..', '..');

/** Static `from '…'`, side-effect `import '…'` and dynamic `import('…')`. */
const IMPORT = /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)['"]([^'"\n]+)['"]/g;

interface Import {
  /** Importing file, relative to the repository root, with `/` separators. */
  readonly file: string;
  /** The imported file, likewise. */
  readonly target: string;
}

function tsFiles(top: string): string[] {
  return readdirSync(join(ROOT, top), { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts'))
    .map((f) => `${top}/${f.split(sep).join('/')}`)
    .sort();
}

/** Every relative import in the .ts files under the given top-level folders. */
function relativeImports(tops: readonly string[]): Import[] {
  const found: Import[] = [];
  for (const file of tops.flatMap(tsFiles)) {
    const text = readFileSync(join(ROOT, file), 'utf8');
    for (const [, specifier] of text.matchAll(IMPORT)) {
      if (specifier === undefined || !specifier.startsWith('.')) continue;
      const target = relative(ROOT, resolve(ROOT, dirname(file), specifier))
        .split(sep)
        .join('/');
      found.push({ file, target });
    }
  }
  return found;
}

const top = (path: string): string => path.split('/')[0] ?? '';
/** The folder directly under src/ (or the file name, for a file at src/'s root). */
const srcFolder = (path: string): string => path.split('/')[1] ?? '';

const imports = relativeImports(['src', 'scripts', 'bench', 'dev', 'deploy']);

function show(list: readonly Import[]): string {
  return list.map((i) => `  ${i.file} imports ${i.target}`).join('\n');
}

describe('layering', () => {
  it('finds the imports it checks', () => {
    // Guards the regex: if it stopped matching, every rule below would pass vacuously.
    assert.ok(imports.some((i) => i.file === 'scripts/local-stack.ts' && i.target === 'dev/controlplane.ts'));
    assert.ok(imports.filter((i) => top(i.file) === 'src').length > 100);
  });

  it('src/, scripts/, bench/, dev/ and deploy/ import nothing from test/', () => {
    assert.deepEqual(show(imports.filter((i) => top(i.target) === 'test')), '');
  });

  it('src/ imports only src/ (not dev/, scripts/, bench/, certs-dev/ or test/): it ships alone', () => {
    assert.deepEqual(show(imports.filter((i) => top(i.file) === 'src' && top(i.target) !== 'src')), '');
  });
});

/** src/ folders, bottom layer first: a folder should import only folders listed before it. */
const LAYERS = [
  'spiffe',
  'observability',
  'admin',
  'config',
  'workload',
  'federation',
  'agent',
  'policy',
  'proxy',
  'client',
  'writer',
  'cli',
] as const;

/**
 * Imports from a folder to one above it, as they are today. Each closes a cycle; shrink this list as they go.
 */
const KNOWN_BACK_EDGES: readonly string[] = [];

/** Folder edges of src/, each with the imports behind it. */
function folderEdges(): Map<string, Import[]> {
  const edges = new Map<string, Import[]>();
  for (const i of imports) {
    if (top(i.file) !== 'src' || top(i.target) !== 'src') continue;
    const from = srcFolder(i.file);
    const to = srcFolder(i.target);
    if (from === to) continue;
    const key = `${from} -> ${to}`;
    edges.set(key, [...(edges.get(key) ?? []), i]);
  }
  return edges;
}

/** Strongly connected components with more than one folder (Tarjan), i.e. the import cycles. */
function cycles(edges: Iterable<string>): string[][] {
  const next = new Map<string, string[]>();
  for (const edge of edges) {
    const [from = '', to = ''] = edge.split(' -> ');
    next.set(from, [...(next.get(from) ?? []), to]);
    if (!next.has(to)) next.set(to, []);
  }
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (v: string): void => {
    index.set(v, index.size);
    low.set(v, index.get(v) ?? 0);
    stack.push(v);
    onStack.add(v);
    for (const w of next.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v) ?? 0, low.get(w) ?? 0));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v) ?? 0, index.get(w) ?? 0));
      }
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      let w: string | undefined;
      do {
        w = stack.pop();
        if (w !== undefined) {
          onStack.delete(w);
          component.push(w);
        }
      } while (w !== undefined && w !== v);
      if (component.length > 1) found.push(component.sort());
    }
  };
  for (const v of [...next.keys()].sort()) if (!index.has(v)) visit(v);
  return found;
}

describe('layering inside src/', () => {
  const edges = folderEdges();
  const rank = new Map<string, number>(LAYERS.map((folder, i) => [folder, i]));

  it('places every src/ folder in LAYERS', () => {
    const folders = readdirSync(join(ROOT, 'src'), { withFileTypes: true })
      .filter((d) => d.isDirectory())
      .map((d) => d.name)
      .sort();
    assert.deepEqual(folders, [...LAYERS].sort(), 'add a new src/ folder to LAYERS, at its layer');
  });

  it('has exactly the known back-edges (a new one fails; a removed one asks to shrink KNOWN_BACK_EDGES)', (t) => {
    const back = [...edges.keys()]
      .filter((edge) => {
        const [from = '', to = ''] = edge.split(' -> ');
        return (rank.get(from) ?? -1) < (rank.get(to) ?? -1);
      })
      .sort();
    const cyclic = cycles(edges.keys());
    t.diagnostic(
      `import cycles among src/ folders: ${cyclic.map((c) => c.join(' ↔ ')).join('; ') || 'none'}`,
    );
    const added = back.filter((edge) => !KNOWN_BACK_EDGES.includes(edge));
    const removed = KNOWN_BACK_EDGES.filter((edge) => !back.includes(edge));
    const explain = [
      ...added.map(
        (edge) => `new back-edge ${edge} (imports upwards in LAYERS):\n${show(edges.get(edge) ?? [])}`,
      ),
      ...removed.map((edge) => `back-edge ${edge} is gone: remove it from KNOWN_BACK_EDGES`),
      `import cycles today: ${cyclic.map((c) => c.join(' ↔ ')).join('; ') || 'none'}`,
    ].join('\n');
    assert.deepEqual(back, [...KNOWN_BACK_EDGES].sort(), explain);
  });

  it('is acyclic once the known back-edges are set aside', () => {
    const rest = [...edges.keys()].filter((edge) => !KNOWN_BACK_EDGES.includes(edge));
    assert.deepEqual(cycles(rest), []);
  });
});
