/**
 * Request limits: a rule's optional `limits` (verbs, resources, namespaces, non-resource paths) narrowing what
 * its clients may do on top of the cluster's RBAC; each entry checked when the policy is parsed, and a request
 * checked against them when it is decided.
 */
import { quote } from '../config/yaml.ts';
import type { PolicyRule } from './model.ts';
import { formatResource } from './request.ts';
import type { RequestInfo } from './types.ts';

/** Request limits as written (each list absent when not given). */
export interface RequestLimits {
  readonly verbs?: readonly string[];
  readonly resources?: readonly string[];
  readonly namespaces?: readonly string[];
  readonly nonResourcePaths?: readonly string[];
}

export const SUB_NONE = '';
export const SUB_ANY = '*';
/** With or without a subresource. */
export const SUB_ALL = '**';

export interface ResourceMatcher {
  /** '*' for any group. */
  readonly group: string;
  /** '*' for any resource. */
  readonly resource: string;
  /** SUB_NONE, SUB_ANY (some subresource), SUB_ALL (with or without), or one subresource name. */
  readonly subresource: string;
}

function list(values: readonly string[]): string {
  return `[${values.join(', ')}]`;
}

/** Verbs a non-resource request's lower-case method counts as, for `limits.verbs`. */
const NON_RESOURCE_VERBS: Readonly<Record<string, string>> = {
  get: 'get',
  head: 'get',
  post: 'create',
  put: 'update',
  patch: 'patch',
  delete: 'delete',
};

function resourceMatches(m: ResourceMatcher, request: RequestInfo): boolean {
  if (m.group !== '*' && m.group !== request.apiGroup) return false;
  if (m.resource !== '*' && m.resource !== request.resource) return false;
  switch (m.subresource) {
    case SUB_ALL:
      return true;
    case SUB_NONE:
      return request.subresource === '';
    case SUB_ANY:
      return request.subresource !== '';
    default:
      return request.subresource === m.subresource;
  }
}

function pathMatches(entry: string, path: string): boolean {
  return entry.endsWith('*') ? path.startsWith(entry.slice(0, -1)) : path === entry;
}

/**
 * Why a rule's request limits refuse a request, or undefined when they allow it (or the rule has none). Every
 * list present must allow the request; a rule with limits but no `nonResourcePaths` refuses non-resource
 * requests.
 */
export function limitRefusal(rule: PolicyRule, request: RequestInfo): string | undefined {
  const limits = rule.limits;
  if (limits === undefined) return undefined;
  if (limits.verbs !== undefined && !limits.verbs.includes('*')) {
    if (request.isResourceRequest) {
      if (!limits.verbs.includes(request.verb)) {
        return `verb ${quote(request.verb)} is not in limits.verbs ${list(limits.verbs)}`;
      }
    } else {
      const verb = NON_RESOURCE_VERBS[request.verb];
      if (verb === undefined || !limits.verbs.includes(verb)) {
        const counted = verb === undefined ? 'no verb' : `verb ${quote(verb)}`;
        return `method ${quote(request.verb.toUpperCase())} (${counted} for a non-resource request) is not allowed by limits.verbs ${list(limits.verbs)}`;
      }
    }
  }
  if (request.isResourceRequest) {
    if (limits.resources !== undefined) {
      const matchers =
        (rule as PolicyRule & { readonly resourceMatchers?: readonly ResourceMatcher[] }).resourceMatchers ??
        compileResourceMatchers(limits.resources);
      if (!matchers.some((m) => resourceMatches(m, request))) {
        return `resource ${quote(formatResource(request))} is not in limits.resources ${list(limits.resources)}`;
      }
    }
    if (limits.namespaces !== undefined) {
      if (request.namespace === '') {
        return `cluster-scoped request refused: limits.namespaces ${list(limits.namespaces)} is set`;
      }
      if (!limits.namespaces.includes('*') && !limits.namespaces.includes(request.namespace)) {
        return `namespace ${quote(request.namespace)} is not in limits.namespaces ${list(limits.namespaces)}`;
      }
    }
    return undefined;
  }
  if (limits.nonResourcePaths === undefined) {
    return `non-resource path ${quote(request.path)} refused: the rule has limits but no limits.nonResourcePaths`;
  }
  if (!limits.nonResourcePaths.some((entry) => pathMatches(entry, request.path))) {
    return `non-resource path ${quote(request.path)} is not in limits.nonResourcePaths ${list(limits.nonResourcePaths)}`;
  }
  return undefined;
}

/** Verbs `limits.verbs` may name, besides `*`. */
export const VERBS = [
  'get',
  'list',
  'watch',
  'create',
  'update',
  'patch',
  'delete',
  'deletecollection',
] as const;

/** API groups without a dot, which `limits.resources` recognizes as groups in `group/resource`. */
export const DOTLESS_GROUPS = ['apps', 'autoscaling', 'batch', 'extensions', 'policy'] as const;

const DNS_LABEL = /^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$/;
const RESOURCE_NAME = /^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$/;

function isGroupName(text: string): boolean {
  return (DOTLESS_GROUPS as readonly string[]).includes(text) || text.includes('.');
}

function groupProblem(group: string): string | undefined {
  if (group.length > 253) return 'is longer than 253 characters';
  for (const label of group.split('.')) {
    if (!DNS_LABEL.test(label))
      return 'is not a DNS subdomain (lower-case labels of [a-z0-9-] joined by ".")';
  }
  return undefined;
}

/** Parses one `limits.resources` entry; a string is what is wrong with it. */
export function parseResourceEntry(entry: string): ResourceMatcher | string {
  if (entry === '*') return { group: '*', resource: '*', subresource: SUB_ALL };
  const parts = entry.split('/');
  const name = (text: string, what: string): string | undefined =>
    text === '*' || RESOURCE_NAME.test(text)
      ? undefined
      : `the ${what} ${quote(text)} must be "*" or lower-case [a-z0-9-] (not starting or ending with "-")`;
  const group = (text: string): string | undefined => {
    const problem = groupProblem(text);
    return problem === undefined ? undefined : `the API group ${quote(text)} ${problem}`;
  };
  if (parts.length === 1) {
    const [resource] = parts as [string];
    return name(resource, 'resource') ?? { group: '', resource, subresource: SUB_NONE };
  }
  if (parts.length === 2) {
    const [a, b] = parts as [string, string];
    if (a !== '*' && isGroupName(a)) {
      return (
        group(a) ??
        name(b, 'resource') ?? { group: a, resource: b, subresource: b === '*' ? SUB_ALL : SUB_NONE }
      );
    }
    return (
      name(a, 'resource') ??
      name(b, 'subresource') ?? { group: '', resource: a, subresource: b === '*' ? SUB_ANY : b }
    );
  }
  if (parts.length === 3) {
    const [g, r, s] = parts as [string, string, string];
    if (!isGroupName(g)) {
      return `${quote(g)} is not an API group: a three-part entry is group/resource/subresource, and group names contain a "." or are one of ${DOTLESS_GROUPS.join(', ')} (the core group has no prefix)`;
    }
    return (
      group(g) ??
      name(r, 'resource') ??
      name(s, 'subresource') ?? { group: g, resource: r, subresource: s === '*' ? SUB_ANY : s }
    );
  }
  return 'too many "/": write resource, resource/subresource, group/resource or group/resource/subresource';
}

/**
 * Reads `resource`, `resource/subresource`, `group/resource` or `group/resource/subresource` (no wildcards) as
 * `limits.resources` does, for describing a request; a string is what is wrong with it.
 */
export function parseRequestResource(
  text: string,
): { apiGroup: string; resource: string; subresource: string } | string {
  if (text.includes('*')) return `${quote(text)}: a request names one resource, without "*"`;
  const m = parseResourceEntry(text);
  if (typeof m === 'string') return `${quote(text)}: ${m}`;
  return {
    apiGroup: m.group,
    resource: m.resource,
    subresource: m.subresource === SUB_NONE ? '' : m.subresource,
  };
}

export function compileResourceMatchers(entries: readonly string[]): ResourceMatcher[] {
  const out: ResourceMatcher[] = [];
  for (const entry of entries) {
    const m = parseResourceEntry(entry);
    if (typeof m !== 'string') out.push(m);
  }
  return out;
}

export function nonResourcePathProblem(entry: string): string | undefined {
  if (entry === '*') return undefined;
  if (!entry.startsWith('/')) return 'must start with "/" (or be "*")';
  const star = entry.indexOf('*');
  if (star >= 0 && star !== entry.length - 1)
    return 'may have "*" only as its last character (a prefix match)';
  if (!/^[\x21-\x7e]+$/.test(entry)) return 'may hold only printable ASCII without spaces';
  if (entry.includes('?') || entry.includes('#')) return 'is a path: no query ("?") or fragment ("#")';
  return undefined;
}

/** What is wrong with a `limits.verbs` entry, or undefined. */
export function verbEntryProblem(verb: string): string | undefined {
  return verb === '*' || (VERBS as readonly string[]).includes(verb)
    ? undefined
    : `unknown verb (allowed: ${VERBS.join(', ')}, or "*")`;
}

/** What is wrong with a `limits.namespaces` entry, or undefined. */
export function namespaceEntryProblem(namespace: string): string | undefined {
  return namespace === '*' || DNS_LABEL.test(namespace)
    ? undefined
    : 'not a namespace name (a DNS label: 1-63 of lower-case [a-z0-9-], not starting or ending with "-"), or "*"';
}
