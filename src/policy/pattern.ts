/**
 * ID patterns: `match.pattern` of a policy rule, such as `spiffe://example.org/ns/*\/sa/**`: `*` is one whole
 * segment, `**` (last only) one or more; the trust domain is literal.
 */
import { quote } from '../config/yaml.ts';
import { MAX_ID_BYTES, TrustDomain } from '../spiffe/id.ts';
import { spiffeMessage } from './errors.ts';

const SEGMENT_CHARS = /^[A-Za-z0-9._-]+$/;
export const SCHEME = 'spiffe://';

/** Parses `spiffe://td/seg/*\/**`; a problem carries the character index it is about. */
export function parsePattern(
  text: string,
): { trustDomain: string; segments: string[] } | { at: number; message: string } {
  if (Buffer.byteLength(text, 'utf8') > MAX_ID_BYTES) {
    return { at: 0, message: `pattern is longer than ${MAX_ID_BYTES} bytes` };
  }
  if (!text.startsWith(SCHEME)) return { at: 0, message: 'pattern must start with "spiffe://"' };
  const slash = text.indexOf('/', SCHEME.length);
  const authority = slash < 0 ? text.slice(SCHEME.length) : text.slice(SCHEME.length, slash);
  if (authority.includes('*')) {
    return {
      at: SCHEME.length,
      message:
        'the trust domain of a pattern is literal (no "*" or "**"); match a whole trust domain with "trustDomain:"',
    };
  }
  let trustDomain: string;
  try {
    trustDomain = TrustDomain.parse(authority).name;
  } catch (err) {
    return { at: SCHEME.length, message: `pattern trust domain: ${spiffeMessage(err)}` };
  }
  if (slash < 0 || slash === text.length - 1) {
    return {
      at: slash < 0 ? text.length : slash,
      message: 'pattern needs at least one path segment (match a whole trust domain with "trustDomain:")',
    };
  }
  const segments = text.slice(slash + 1).split('/');
  let at = slash + 1;
  for (const [i, segment] of segments.entries()) {
    if (segment === '') return { at, message: 'pattern has an empty segment ("//" or a trailing "/")' };
    if (segment === '**') {
      if (i !== segments.length - 1) return { at, message: '"**" may only be the last segment of a pattern' };
    } else if (segment !== '*') {
      if (segment.includes('*')) {
        return {
          at,
          message: `"*" and "**" must be whole segments (${quote(segment)} is not supported; use "*")`,
        };
      }
      if (segment === '.' || segment === '..') {
        return { at, message: 'pattern segments must not be "." or ".." (ERR_ID_DOT_SEGMENT)' };
      }
      if (!SEGMENT_CHARS.test(segment)) {
        return {
          at,
          message: `pattern segment ${quote(segment)} may contain only [a-zA-Z0-9._-], or be "*" or "**" (ERR_ID_PATH_SEGMENT_CHAR)`,
        };
      }
    }
    at += segment.length + 1;
  }
  if (!segments.includes('*') && !segments.includes('**')) {
    return { at: 0, message: 'pattern has no "*" or "**": write it as "id:"' };
  }
  return { trustDomain, segments };
}

/** Whether an ID's segments match a pattern's (`*` one segment, a final `**` one or more). */
export function patternMatches(segments: readonly string[], idSegments: readonly string[]): boolean {
  const last = segments.length - 1;
  const rest = segments[last] === '**';
  if (rest ? idSegments.length < segments.length : idSegments.length !== segments.length) return false;
  for (let i = 0; i < (rest ? last : segments.length); i++) {
    const want = segments[i];
    if (want !== '*' && want !== idSegments[i]) return false;
  }
  return true;
}
