/**
 * Identity templates: the `identity` values of a policy rule, such as `spiffe:{trustDomain}:{path}`, parsed
 * once and expanded for each caller's SPIFFE ID.
 */
import { quote } from '../config/yaml.ts';
import type { SpiffeId } from '../spiffe/id.ts';

/** One piece of an identity template. */
export type TemplatePart =
  | { readonly kind: 'text'; readonly text: string }
  | { readonly kind: 'id' }
  | { readonly kind: 'trustDomain' }
  | { readonly kind: 'path' }
  | { readonly kind: 'segment'; readonly index: number };

/** A parsed template such as `spiffe:{trustDomain}:{path}`. */
export interface Template {
  /** As written in the file. */
  readonly source: string;
  readonly parts: readonly TemplatePart[];
}

export interface IdentityTemplates {
  readonly user: Template;
  readonly groups: readonly Template[];
  readonly uid?: Template;
  /** Keys lower-case, in file order. */
  readonly extra: Readonly<Record<string, readonly Template[]>>;
}

/**
 * Path segment `index` of a SPIFFE ID path (`/a/b`), as `path.slice(1).split('/')[index]` gives it, without
 * splitting the whole path: decisions read one or two segments of an ID, once each.
 */
export function pathSegment(path: string, index: number): string | undefined {
  if (path.length === 0) return undefined;
  let start = 1;
  for (let i = 0; i < index; i++) {
    const slash = path.indexOf('/', start);
    if (slash < 0) return undefined;
    start = slash + 1;
  }
  const end = path.indexOf('/', start);
  return end < 0 ? path.slice(start) : path.slice(start, end);
}

/** Expands a template for an ID; `{ missing }` names a `{segment:N}` the ID does not have. */
export function expandTemplate(template: Template, id: SpiffeId): string | { readonly missing: number } {
  let out = '';
  for (const part of template.parts) {
    switch (part.kind) {
      case 'text':
        out += part.text;
        break;
      case 'id':
        out += id.toString();
        break;
      case 'trustDomain':
        out += id.trustDomain.name;
        break;
      case 'path':
        out += id.path.slice(1);
        break;
      case 'segment': {
        const segment = pathSegment(id.path, part.index);
        if (segment === undefined) return { missing: part.index };
        out += segment;
        break;
      }
    }
  }
  return out;
}

export const PLACEHOLDERS = ['{id}', '{trustDomain}', '{path}', '{segment:N}'] as const;
const MAX_SEGMENT_INDEX = 1023;

interface TemplateProblem {
  /** Character index in the template's text. */
  readonly at: number;
  readonly message: string;
}

interface ParsedTemplate {
  readonly template: Template;
  /** Each `{segment:N}` with where it starts, to check N against the rule's match. */
  readonly segmentRefs: readonly { readonly index: number; readonly at: number }[];
}

/** Parses a template; returns the problems found (all of them) or the template. */
export function parseTemplate(source: string): ParsedTemplate | { problems: TemplateProblem[] } {
  const problems: TemplateProblem[] = [];
  const parts: TemplatePart[] = [];
  const segmentRefs: { index: number; at: number }[] = [];
  let text = '';
  const flush = (): void => {
    if (text !== '') parts.push({ kind: 'text', text });
    text = '';
  };
  if (source.length === 0) problems.push({ at: 0, message: 'must not be empty' });
  else if (/^\s|\s$/.test(source)) {
    problems.push({
      at: 0,
      message: 'must not start or end with white space (HTTP strips it from header values)',
    });
  }
  let i = 0;
  while (i < source.length) {
    const c = source[i] as string;
    if (c === '{') {
      if (source[i + 1] === '{') {
        text += '{';
        i += 2;
        continue;
      }
      const close = source.indexOf('}', i + 1);
      if (close < 0) {
        problems.push({ at: i, message: 'unclosed "{" (write "{{" for a literal brace)' });
        break;
      }
      const name = source.slice(i + 1, close);
      if (name === 'id' || name === 'trustDomain' || name === 'path') {
        flush();
        parts.push({ kind: name });
      } else if (/^segment:(0|[1-9][0-9]*)$/.test(name)) {
        const index = Number(name.slice('segment:'.length));
        if (index > MAX_SEGMENT_INDEX) {
          problems.push({
            at: i,
            message: `{${name}}: the segment index must be at most ${MAX_SEGMENT_INDEX}`,
          });
        } else {
          flush();
          parts.push({ kind: 'segment', index });
          segmentRefs.push({ index, at: i });
        }
      } else if (/^segment\b/.test(name)) {
        problems.push({
          at: i,
          message: `placeholder ${quote(`{${name}}`)} needs a whole number index from 0, e.g. {segment:0}`,
        });
      } else {
        problems.push({
          at: i,
          message: `unknown placeholder ${quote(`{${name}}`)} (known: ${PLACEHOLDERS.join(', ')}; write "{{" and "}}" for literal braces)`,
        });
      }
      i = close + 1;
      continue;
    }
    if (c === '}') {
      if (source[i + 1] === '}') {
        text += '}';
        i += 2;
        continue;
      }
      problems.push({ at: i, message: 'lone "}" (write "}}" for a literal brace)' });
      i++;
      continue;
    }
    const code = source.charCodeAt(i);
    if (code < 0x20 || code > 0x7e) {
      problems.push({
        at: i,
        message: `only printable ASCII characters are allowed (found U+${code.toString(16).toUpperCase().padStart(4, '0')})`,
      });
      break;
    }
    text += c;
    i++;
  }
  flush();
  if (problems.length > 0) return { problems };
  return { template: Object.freeze({ source, parts: Object.freeze(parts) }), segmentRefs };
}
