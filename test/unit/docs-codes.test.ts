/**
 * The error-code catalogue (docs/operator/errors.md) and the source cannot drift apart: every `ERR_…` code the
 * source produces is documented, and every code the page names exists in the source. Codes of Node.js itself
 * that the source only reads (never produces) are listed here, with the reason.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';

const ROOT = join(import.meta.dirname, '..', '..');
const CATALOGUE = join(ROOT, 'docs', 'operator', 'errors.md');

/** Node.js's own codes the source compares against; they are not ours to document. */
const NODE_CODES = new Set([
  'ERR_PARSE_ARGS', // prefix of util.parseArgs's codes, turned into a usage error (exit 2)
  'ERR_HTTP2_STREAM_CANCEL', // node:http2's cancelled stream, whose cause says whether the apiserver is unreachable
  'ERR_TLS_HANDSHAKE_TIMEOUT', // node:tls's handshake timeout, counted as a metric reason (and documented too)
]);

/** Prefixes the page uses for a family (`ERR_X509_*`) or for OpenSSL's codes (`ERR_SSL_…`). */
const FAMILY_PREFIXES = new Set([
  'ERR_ID_',
  'ERR_X509_',
  'ERR_SSL_',
  'ERR_JWT_',
  'ERR_POLICY_',
  'ERR_AGENT_',
]);

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) return sourceFiles(path);
    return path.endsWith('.ts') ? [path] : [];
  });
}

/** Every code the source writes as a string literal. */
function sourceCodes(): Map<string, string> {
  const codes = new Map<string, string>();
  for (const file of sourceFiles(join(ROOT, 'src'))) {
    for (const m of readFileSync(file, 'utf8').matchAll(/['"`](ERR_[A-Z0-9_]+)['"`]/g)) {
      codes.set(m[1] as string, file.slice(ROOT.length + 1));
    }
  }
  return codes;
}

function documentedCodes(): Set<string> {
  return new Set([...readFileSync(CATALOGUE, 'utf8').matchAll(/ERR_[A-Z0-9_]+/g)].map((m) => m[0]));
}

describe('the error-code catalogue', () => {
  it('documents every code the source produces', () => {
    const documented = documentedCodes();
    const missing = [...sourceCodes()]
      .filter(([code]) => !documented.has(code) && !NODE_CODES.has(code))
      .map(([code, file]) => `${code} (${file})`);
    assert.deepEqual(missing, [], 'add these to docs/operator/errors.md');
  });

  it('names no code the source does not have', () => {
    const source = sourceCodes();
    const stale = [...documentedCodes()].filter(
      (code) => !source.has(code) && !FAMILY_PREFIXES.has(code) && !NODE_CODES.has(code),
    );
    assert.deepEqual(stale, [], 'remove these from docs/operator/errors.md, or restore them in the source');
  });
});
