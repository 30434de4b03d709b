/**
 * What a request to kube-apiserver asks for, worked out from its method and request target exactly as
 * kube-apiserver's `RequestInfoFactory` (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go) does, so the
 * proxy's request limits see the request the way the apiserver's authorizers will:
 *
 * - `/api/{version}/…` is the core group, `/apis/{group}/{version}/…` a named group; anything else, and the
 *   discovery paths `/api`, `/api/{version}`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`, is a
 *   non-resource request whose verb is the lower-case HTTP method.
 * - `…/namespaces/{ns}/{resource}[/{name}[/{subresource}]]` is namespaced; `namespaces/{ns}[/status|/finalize]`
 *   is the namespace itself (its namespace is `{ns}`).
 * - Verbs: POST create, GET/HEAD get, PUT update, PATCH patch, DELETE delete; a GET without a name is list, or
 *   watch when the first `watch` query value is anything but `0` or `false` (any case; even empty); a DELETE
 *   without a name is deletecollection; the legacy prefixes `/{version}/watch/…` and `/{version}/proxy/…` give
 *   the verbs watch and proxy whatever the method.
 *
 * The path is percent-decoded first (Go's `URL.Path` is). Where Go would refuse the target, or where reading it
 * could depend on later path cleaning (`.`/`..` or empty segments), this refuses it with a `RequestInfoError`:
 * stricter than the apiserver, never more lenient. Not derived: a name from `fieldSelector=metadata.name=…`
 * on list/watch (the apiserver does; request limits never look at names).
 */
import { RequestInfoError } from './errors.ts';
import type { RequestInfo } from './types.ts';

/** Longest request target accepted, in characters. */
export const MAX_REQUEST_TARGET = 16 * 1024;
/** Most query parameters accepted (Go caps them too; no client sends this many). */
export const MAX_QUERY_PARAMETERS = 1000;

const SPECIAL_VERBS = new Set(['proxy', 'watch']);
const NAMESPACE_SUBRESOURCES = new Set(['status', 'finalize']);

const HEX = /^[0-9a-fA-F]{2}$/;
/**
 * The characters RFC 3986 allows unescaped in an origin-form target (pchar, "/" and "?"): unreserved,
 * sub-delims, ":", "@" and "%" for escapes. Everything else (`\`, `#`, `"`, `<`, `>`, `[`, `]`, `^`, `` ` ``,
 * `{`, `|`, `}`) is read differently by different parsers (WHATWG URL reads `\` as `/`), so it is refused.
 */
const TARGET_CHARS = /^[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*$/;

/** Go's `unescape`: every `%` takes two hex digits; `+` is a space in query mode. Undefined when malformed. */
function unescapeBytes(text: string, query: boolean): Buffer | undefined {
  const bytes: number[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x25) {
      const hex = text.slice(i + 1, i + 3);
      if (!HEX.test(hex)) return undefined;
      bytes.push(Number.parseInt(hex, 16));
      i += 2;
    } else if (c === 0x2b && query) {
      bytes.push(0x20);
    } else {
      // The target was checked to be printable ASCII.
      bytes.push(c);
    }
  }
  return Buffer.from(bytes);
}

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

function fail(message: string, target: string): never {
  const shown = target.length > 120 ? `${target.slice(0, 120)}…` : target;
  throw new RequestInfoError(`${message}: ${JSON.stringify(shown)}`);
}

/** The first value of `key` in a raw query, parsed as Go's `url.ParseQuery` does (bad pairs are skipped). */
function firstQueryValue(rawQuery: string, key: string): string | undefined {
  for (const pair of rawQuery.split('&')) {
    if (pair === '' || pair.includes(';')) continue;
    const eq = pair.indexOf('=');
    const rawKey = eq < 0 ? pair : pair.slice(0, eq);
    const rawValue = eq < 0 ? '' : pair.slice(eq + 1);
    const k = unescapeBytes(rawKey, true);
    const v = unescapeBytes(rawValue, true);
    if (k === undefined || v === undefined) continue;
    if (k.toString('utf8') === key) return v.toString('utf8');
  }
  return undefined;
}

/** Go's `strings.EqualFold(s, "false")`: ASCII case folding, plus U+017F (long s) folding to s. */
function isFalse(value: string): boolean {
  return value === '0' || value.toLowerCase().replaceAll('\u017f', 's') === 'false';
}

/**
 * The RequestInfo of a request, from its method (as sent, upper case) and its request target (`req.url`:
 * origin form, path and optional query). Throws `RequestInfoError` (code `ERR_POLICY_BAD_REQUEST`) for a
 * target that is not origin form, holds a character RFC 3986 does not allow unescaped (`\`, `#`, spaces,
 * controls, non-ASCII…), has a malformed `%` escape, or whose decoded path has `.`, `..` or empty segments,
 * control characters, `\` or invalid UTF-8.
 */
export function requestInfo(method: string, target: string): RequestInfo {
  if (target.length > MAX_REQUEST_TARGET) fail(`request target is longer than ${MAX_REQUEST_TARGET}`, target);
  if (!target.startsWith('/')) fail('request target must be a path starting with "/"', target);
  if (!TARGET_CHARS.test(target)) {
    for (let i = 0; i < target.length; i++) {
      const c = target.charCodeAt(i);
      if (c <= 0x20 || c >= 0x7f) fail('request target may hold only printable ASCII', target);
      if (!TARGET_CHARS.test(target[i] as string)) {
        fail(`request target holds ${JSON.stringify(target[i])}, which RFC 3986 allows only escaped`, target);
      }
    }
  }
  const q = target.indexOf('?');
  const rawPath = q < 0 ? target : target.slice(0, q);
  const rawQuery = q < 0 ? '' : target.slice(q + 1);
  if (rawQuery.split('&').length > MAX_QUERY_PARAMETERS) {
    fail(`request has more than ${MAX_QUERY_PARAMETERS} query parameters`, target);
  }
  let path: string;
  if (!rawPath.includes('%')) {
    // Nothing escaped: the path is the (printable ASCII) target itself.
    path = rawPath;
  } else {
    const pathBytes = unescapeBytes(rawPath, false);
    if (pathBytes === undefined) fail('request path has a malformed "%" escape', target);
    try {
      path = strictUtf8.decode(pathBytes);
    } catch {
      fail('request path is not UTF-8 once decoded', target);
    }
  }
  for (let i = 0; i < path.length; i++) {
    const c = path.charCodeAt(i);
    if (c < 0x20 || c === 0x7f) fail('request path holds control characters once decoded', target);
    // kube-apiserver reads "\" literally, but URL parsers of the WHATWG kind (and some proxies behind the
    // apiserver) read it as "/": refused, so no reader can see another path.
    if (c === 0x5c) fail('request path holds "\\" once decoded', target);
  }
  if (path.includes('//')) fail('request path has an empty segment ("//")', target);
  // splitPath: trim slashes at both ends, split on "/".
  const trimmed = path.replace(/^\/+/, '').replace(/\/+$/, '');
  const parts = trimmed === '' ? [] : trimmed.split('/');
  for (const part of parts) {
    if (part === '') fail('request path has an empty segment ("//")', target);
    if (part === '.' || part === '..') fail('request path has a "." or ".." segment', target);
  }

  const nonResource: RequestInfo = {
    isResourceRequest: false,
    verb: method.toLowerCase(),
    path,
    apiGroup: '',
    apiVersion: '',
    resource: '',
    subresource: '',
    namespace: '',
    name: '',
  };
  if (parts.length < 3) return nonResource;
  const prefix = parts[0];
  if (prefix !== 'api' && prefix !== 'apis') return nonResource;
  let rest = parts.slice(1);
  let apiGroup = '';
  if (prefix === 'apis') {
    if (rest.length < 3) return nonResource;
    apiGroup = rest[0] as string;
    rest = rest.slice(1);
  }
  const apiVersion = rest[0] as string;
  rest = rest.slice(1);

  let verb: string;
  const first = rest[0] as string;
  if (SPECIAL_VERBS.has(first)) {
    if (rest.length < 2) fail('unable to determine kind and namespace from the URL', target);
    verb = first;
    rest = rest.slice(1);
  } else {
    switch (method) {
      case 'POST':
        verb = 'create';
        break;
      case 'GET':
      case 'HEAD':
        verb = 'get';
        break;
      case 'PUT':
        verb = 'update';
        break;
      case 'PATCH':
        verb = 'patch';
        break;
      case 'DELETE':
        verb = 'delete';
        break;
      default:
        verb = '';
    }
  }

  let namespace = '';
  if (rest[0] === 'namespaces') {
    if (rest.length > 1) {
      namespace = rest[1] as string;
      if (rest.length > 2 && !NAMESPACE_SUBRESOURCES.has(rest[2] as string)) rest = rest.slice(2);
    }
  }

  let subresource = '';
  let name = '';
  if (rest.length >= 3 && verb !== 'proxy') subresource = rest[2] as string;
  if (rest.length >= 2) name = rest[1] as string;
  const resource = rest[0] ?? '';

  if (name === '' && verb === 'get') {
    const watch = firstQueryValue(rawQuery, 'watch');
    verb = watch !== undefined && !isFalse(watch) ? 'watch' : 'list';
  }
  if (name === '' && verb === 'delete') verb = 'deletecollection';

  return {
    isResourceRequest: true,
    verb,
    path,
    apiGroup,
    apiVersion,
    resource,
    subresource,
    namespace,
    name,
  };
}

/** `group/resource[/subresource]` as written in `limits.resources` (the core group has no prefix). */
export function formatResource(request: Pick<RequestInfo, 'apiGroup' | 'resource' | 'subresource'>): string {
  const parts = [request.apiGroup, request.resource, request.subresource].filter((p) => p !== '');
  return parts.join('/');
}

/** A short description for people: `get apps/deployments/scale "web" in namespace "default"`, `get /healthz`. */
export function describeRequest(request: RequestInfo): string {
  if (!request.isResourceRequest) return `${request.verb || '(no verb)'} ${request.path}`;
  let text = `${request.verb || '(no verb)'} ${formatResource(request)}`;
  if (request.name !== '') text += ` ${JSON.stringify(request.name)}`;
  text +=
    request.namespace === '' ? ' (cluster-scoped)' : ` in namespace ${JSON.stringify(request.namespace)}`;
  return text;
}
