/**
 * The authorization policy: which SPIFFE IDs may use the proxy, the Kubernetes identity each is impersonated
 * as, and optional request limits on top of the cluster's RBAC. Security teams edit it as YAML; it is validated
 * as a whole (every problem with its line and column, nothing of a refused file is used), compiled once, and
 * swapped whole on reload.
 *
 * ```yaml
 * rules:
 *   - name: argocd-controller
 *     match:
 *       id: spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller
 *     identity:
 *       user: "spiffe:{trustDomain}:{path}"
 *       groups: ["gitops"]
 *     limits:
 *       verbs: [get, list, watch]
 *     impersonate:                 # optional: nested impersonation (the client's own Impersonate-User)
 *       serviceAccounts: ["apps/*"]
 * ```
 *
 * Precedence: exact-ID rules, then pattern rules, then trust-domain rules; within each kind, file order. Only
 * the first rule that matches is used; no rule means deny.
 */
import { readFile } from 'node:fs/promises';
import { isMap, isScalar, type Node, type Scalar } from 'yaml';
import { describe, quote, readYaml, YamlReader } from '../config/yaml.ts';
import { SpiffeError } from '../spiffe/errors.ts';
import { MAX_ID_BYTES, SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { PolicyError } from './errors.ts';
import {
  type ImpersonationAllowance,
  nestedDecision,
  nestedNameProblem,
  serviceAccountEntryProblem,
} from './nested.ts';
import { formatResource } from './request.ts';
import {
  type CompiledPolicy,
  type Decision,
  type KubeIdentity,
  type NestedImpersonationRequest,
  type NestedPolicyDecision,
  PolicyDenyCode,
  type RequestInfo,
} from './types.ts';

// ---------------------------------------------------------------------------------------------------------
// The compiled form

/** How a rule matches IDs; also its precedence class, in this order. */
export type MatchKind = 'id' | 'pattern' | 'trustDomain';

export const MATCH_KINDS: readonly MatchKind[] = ['id', 'pattern', 'trustDomain'];

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

/** Request limits as written (each list absent when not given). */
export interface RequestLimits {
  readonly verbs?: readonly string[];
  readonly resources?: readonly string[];
  readonly namespaces?: readonly string[];
  readonly nonResourcePaths?: readonly string[];
}

export interface PolicyRule {
  readonly name: string;
  /** 1-based line of the rule in its file. */
  readonly line: number;
  readonly kind: MatchKind;
  /** The match as written: the SPIFFE ID, the pattern, or the trust domain name. */
  readonly match: string;
  readonly trustDomain: string;
  /** The ID's segments (`id`), the pattern's segments with `*` and `**` (`pattern`); empty for `trustDomain`. */
  readonly segments: readonly string[];
  readonly identity: IdentityTemplates;
  readonly limits?: RequestLimits;
  /** Nested impersonation its clients may request; absent: none (any client Impersonate-* header is refused). */
  readonly impersonate?: ImpersonationAllowance;
}

/** The rule an ID matched and the identity it maps to, or why no identity could be made for that ID. */
export type Resolution =
  | { readonly rule: PolicyRule; readonly identity: KubeIdentity }
  | { readonly rule: PolicyRule; readonly problem: string };

const SUB_NONE = '';
const SUB_ANY = '*';
/** With or without a subresource. */
const SUB_ALL = '**';

interface ResourceMatcher {
  /** '*' for any group. */
  readonly group: string;
  /** '*' for any resource. */
  readonly resource: string;
  /** SUB_NONE, SUB_ANY (some subresource), SUB_ALL (with or without), or one subresource name. */
  readonly subresource: string;
}

interface Rule extends PolicyRule {
  readonly resourceMatchers?: readonly ResourceMatcher[];
}

function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function list(values: readonly string[]): string {
  return `[${values.join(', ')}]`;
}

/** Expands a template for an ID; `{ missing }` names a `{segment:N}` the ID does not have. */
export function expandTemplate(template: Template, id: SpiffeId): string | { readonly missing: number } {
  let out = '';
  let segments: string[] | undefined;
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
        segments ??= id.segments;
        const segment = segments[part.index];
        if (segment === undefined) return { missing: part.index };
        out += segment;
        break;
      }
    }
  }
  return out;
}

function unique(values: string[]): string[] {
  return [...new Set(values)];
}

/** The identity a rule maps an ID to, or a problem when a template needs a segment the ID lacks. */
function buildIdentity(rule: PolicyRule, id: SpiffeId): KubeIdentity | string {
  const expand = (template: Template, what: string): string => {
    const value = expandTemplate(template, id);
    if (typeof value !== 'string') {
      throw new MissingSegment(
        `rule ${quote(rule.name)} maps ${what} with {segment:${value.missing}}, but ${id.toString()} has ` +
          `${id.segments.length} path segment${id.segments.length === 1 ? '' : 's'}`,
      );
    }
    return value;
  };
  try {
    const user = expand(rule.identity.user, 'the user');
    if (user === '') return `rule ${quote(rule.name)} maps ${id.toString()} to an empty user`;
    if (user.startsWith(SERVICE_ACCOUNT_PREFIX)) {
      return `rule ${quote(rule.name)} maps ${id.toString()} to ${quote(user)}, a service account: the proxy never impersonates service accounts`;
    }
    const groups = unique(rule.identity.groups.map((g) => expand(g, 'a group')));
    const uid = rule.identity.uid === undefined ? undefined : expand(rule.identity.uid, 'the uid');
    const extra: Record<string, readonly string[]> = {};
    for (const [key, templates] of Object.entries(rule.identity.extra)) {
      extra[key] = Object.freeze(unique(templates.map((t) => expand(t, `extra ${quote(key)}`))));
    }
    return Object.freeze({
      user,
      groups: Object.freeze(groups),
      ...(uid !== undefined && { uid }),
      extra: Object.freeze(extra),
    });
  } catch (err) {
    if (err instanceof MissingSegment) return err.message;
    throw err;
  }
}

class MissingSegment extends Error {}

/** Users named so are service accounts to kube-apiserver's impersonation filter; the policy never maps to one. */
const SERVICE_ACCOUNT_PREFIX = 'system:serviceaccount:';

function patternMatches(segments: readonly string[], idSegments: readonly string[]): boolean {
  const last = segments.length - 1;
  const rest = segments[last] === '**';
  if (rest ? idSegments.length < segments.length : idSegments.length !== segments.length) return false;
  for (let i = 0; i < (rest ? last : segments.length); i++) {
    const want = segments[i];
    if (want !== '*' && want !== idSegments[i]) return false;
  }
  return true;
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
      const matchers = (rule as Rule).resourceMatchers ?? compileResourceMatchers(limits.resources);
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

/** A validated policy. Immutable. */
export class Policy implements CompiledPolicy {
  readonly file: string;
  readonly trustDomains: readonly string[];
  /** Every rule, in file order. */
  readonly rules: readonly PolicyRule[];
  readonly #exact: ReadonlyMap<string, Rule>;
  readonly #patterns: readonly Rule[];
  readonly #byTrustDomain: ReadonlyMap<string, Rule>;

  /** @internal use `parsePolicy`; the rules are assumed valid (unique names, IDs, patterns, trust domains). */
  constructor(file: string, rules: readonly Rule[]) {
    this.file = file;
    this.rules = Object.freeze([...rules]);
    this.trustDomains = Object.freeze(unique(rules.map((r) => r.trustDomain)).sort(compareStrings));
    const exact = new Map<string, Rule>();
    const byTrustDomain = new Map<string, Rule>();
    const patterns: Rule[] = [];
    for (const rule of rules) {
      if (rule.kind === 'id') {
        if (!exact.has(rule.match)) exact.set(rule.match, rule);
      } else if (rule.kind === 'pattern') {
        patterns.push(rule);
      } else if (!byTrustDomain.has(rule.trustDomain)) {
        byTrustDomain.set(rule.trustDomain, rule);
      }
    }
    this.#exact = exact;
    this.#patterns = patterns;
    this.#byTrustDomain = byTrustDomain;
  }

  /** How many rules of each kind. */
  counts(): Record<MatchKind, number> {
    const counts: Record<MatchKind, number> = { id: 0, pattern: 0, trustDomain: 0 };
    for (const rule of this.rules) counts[rule.kind]++;
    return counts;
  }

  /** The first rule (by precedence) whose match accepts the ID, or undefined. IDs without a path match none. */
  ruleFor(id: SpiffeId): PolicyRule | undefined {
    if (id.isRoot) return undefined;
    const exact = this.#exact.get(id.toString());
    if (exact !== undefined) return exact;
    if (this.#patterns.length > 0) {
      const segments = id.segments;
      for (const rule of this.#patterns) {
        if (rule.trustDomain === id.trustDomain.name && patternMatches(rule.segments, segments)) return rule;
      }
    }
    return this.#byTrustDomain.get(id.trustDomain.name);
  }

  /** The matching rule and the identity it maps the ID to (or why it cannot); undefined when no rule matches. */
  resolve(id: SpiffeId): Resolution | undefined {
    const rule = this.ruleFor(id);
    if (rule === undefined) return undefined;
    const identity = buildIdentity(rule, id);
    return typeof identity === 'string' ? { rule, problem: identity } : { rule, identity };
  }

  match(id: SpiffeId): { rule: string; identity: KubeIdentity } | undefined {
    const resolution = this.resolve(id);
    if (resolution === undefined || !('identity' in resolution)) return undefined;
    return { rule: resolution.rule.name, identity: resolution.identity };
  }

  /** Why no rule matches an ID, for people. */
  noRuleReason(id: SpiffeId): string {
    if (id.isRoot) return `${id.toString()} has no path: it names a trust domain, and no rule matches it`;
    const domain = id.trustDomain.name;
    const named = this.trustDomains.includes(domain);
    return `no rule matches ${id.toString()}${named ? '' : ` (no rule names trust domain ${quote(domain)})`}; deny by default`;
  }

  decide(id: SpiffeId, request: RequestInfo): Decision {
    return this.#decide(id, this.resolve(id), request);
  }

  decideNested(
    id: SpiffeId,
    request: RequestInfo,
    requested: NestedImpersonationRequest,
  ): NestedPolicyDecision {
    const resolution = this.resolve(id);
    const decision = this.#decide(id, resolution, request);
    if (!decision.allowed) return decision;
    // An allowed decision always comes from a resolution.
    const nested = nestedDecision(resolution?.rule ?? { name: decision.rule }, requested);
    if (!nested.allowed)
      return { allowed: false, rule: decision.rule, code: nested.code, reason: nested.reason };
    return { ...decision, nested: nested.impersonated };
  }

  #decide(id: SpiffeId, resolution: Resolution | undefined, request: RequestInfo): Decision {
    if (resolution === undefined) {
      return { allowed: false, code: PolicyDenyCode.NoRule, reason: this.noRuleReason(id) };
    }
    const rule = resolution.rule.name;
    if (!('identity' in resolution)) {
      return { allowed: false, rule, code: PolicyDenyCode.Identity, reason: resolution.problem };
    }
    const refusal = limitRefusal(resolution.rule, request);
    if (refusal !== undefined) {
      return {
        allowed: false,
        rule,
        code: PolicyDenyCode.RequestLimit,
        reason: `rule ${quote(rule)}: ${refusal}`,
      };
    }
    return { allowed: true, rule, identity: resolution.identity };
  }
}

// ---------------------------------------------------------------------------------------------------------
// Templates

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

// ---------------------------------------------------------------------------------------------------------
// Parsing

const TOP_KEYS = ['rules'] as const;
const RULE_KEYS = ['name', 'match', 'identity', 'limits', 'impersonate'] as const;
const MATCH_KEYS = ['id', 'pattern', 'trustDomain'] as const;
const IDENTITY_KEYS = ['user', 'groups', 'uid', 'extra'] as const;
const LIMIT_KEYS = ['verbs', 'resources', 'namespaces', 'nonResourcePaths'] as const;
const IMPERSONATE_KEYS = ['serviceAccounts', 'users', 'groups'] as const;

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

const RULE_NAME = /^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$/;
const MAX_RULE_NAME = 63;
const EXTRA_KEY = /^[a-z0-9./-]+$/;
const DNS_LABEL = /^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$/;
const RESOURCE_NAME = /^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$/;
const SEGMENT_CHARS = /^[A-Za-z0-9._-]+$/;
const SCHEME = 'spiffe://';

function spiffeMessage(err: unknown): string {
  if (err instanceof SpiffeError) return `${err.message} (${err.code})`;
  return err instanceof Error ? err.message : String(err);
}

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
function parseResourceEntry(entry: string): ResourceMatcher | string {
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

function compileResourceMatchers(entries: readonly string[]): ResourceMatcher[] {
  const out: ResourceMatcher[] = [];
  for (const entry of entries) {
    const m = parseResourceEntry(entry);
    if (typeof m !== 'string') out.push(m);
  }
  return out;
}

function nonResourcePathProblem(entry: string): string | undefined {
  if (entry === '*') return undefined;
  if (!entry.startsWith('/')) return 'must start with "/" (or be "*")';
  const star = entry.indexOf('*');
  if (star >= 0 && star !== entry.length - 1)
    return 'may have "*" only as its last character (a prefix match)';
  if (!/^[\x21-\x7e]+$/.test(entry)) return 'may hold only printable ASCII without spaces';
  if (entry.includes('?') || entry.includes('#')) return 'is a path: no query ("?") or fragment ("#")';
  return undefined;
}

/** Parses `spiffe://td/seg/*\/**`; a problem carries the character index it is about. */
function parsePattern(
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

interface Field {
  readonly value: Node | null;
  readonly keyOffset: number;
  readonly valueOffset: number;
}

interface StringItem {
  readonly text: string;
  readonly offset: number;
  /** The file offset of character `i` of the text (exact for plain and simple quoted scalars). */
  readonly at: (i: number) => number;
}

interface ParsedMatch {
  readonly kind: MatchKind;
  readonly text: string;
  readonly trustDomain: string;
  readonly segments: readonly string[];
  readonly offset: number;
  readonly line: number;
}

class Parser extends YamlReader {
  readonly #text: string;

  constructor(reader: YamlReader, text: string) {
    super(reader.doc, reader.lineCounter);
    this.problems.push(...reader.problems);
    this.#text = text;
  }

  /** A string with a map from its characters to file offsets, or undefined after reporting. */
  stringItem(node: Node | null, offset: number, what: string): StringItem | undefined {
    const text = this.string(node, offset, what);
    if (text === undefined) return undefined;
    let base: number | undefined;
    if (node !== null && isScalar(node) && node.range) {
      const start = node.range[0];
      const type = (node as Scalar).type;
      if (type === 'PLAIN' && this.#text.slice(start, start + text.length) === text) base = start;
      if (
        (type === 'QUOTE_DOUBLE' || type === 'QUOTE_SINGLE') &&
        this.#text.slice(start + 1, start + 1 + text.length) === text
      ) {
        base = start + 1;
      }
    }
    return { text, offset, at: (i) => (base === undefined ? offset : base + i) };
  }

  stringList(field: Field, what: string): StringItem[] | undefined {
    const items = this.list(field.value, field.valueOffset, what);
    if (items === undefined) return undefined;
    const out: StringItem[] = [];
    for (const item of items) {
      const s = this.stringItem(item.node, item.offset, `an entry of ${what}`);
      if (s !== undefined) out.push(s);
    }
    return out;
  }

  top(): Rule[] {
    const contents = this.doc.contents as Node | null;
    const top = this.deref(contents, 0);
    if (top === undefined) return [];
    if (top === null || !isMap(top)) {
      this.report(
        this.offsetOf(contents, 0),
        `the policy must be a map with a "rules" list (write "rules: []" to deny everything), got ${describe(top)}`,
      );
      return [];
    }
    const fields = this.fields(top, TOP_KEYS, 'the top level');
    const rulesField = fields.get('rules');
    if (rulesField === undefined) {
      this.report(
        this.offsetOf(top, 0),
        'missing required key "rules" (write "rules: []" to deny everything)',
      );
      return [];
    }
    const items = this.list(rulesField.value, rulesField.valueOffset, '"rules"');
    if (items === undefined) return [];
    const rules: Rule[] = [];
    const names = new Map<string, number>();
    const matches = new Map<string, { label: string; line: number }>();
    for (const [index, item] of items.entries()) {
      // Duplicates are checked even among rules with other problems, so that one run reports them all.
      const parsed = this.rule(item.node, item.offset, index);
      if (parsed === undefined) continue;
      const { rule, name, nameOffset, match, line } = parsed;
      let ok = true;
      if (name !== undefined) {
        const firstLine = names.get(name);
        if (firstLine !== undefined) {
          this.report(nameOffset, `duplicate rule name ${quote(name)}: the rule at line ${firstLine} has it`);
          ok = false;
        } else {
          names.set(name, line);
        }
      }
      if (match !== undefined) {
        const key = `${match.kind}\n${match.kind === 'trustDomain' ? match.trustDomain : match.text}`;
        const first = matches.get(key);
        const label = name === undefined ? `the rule at line ${line}` : `rule ${quote(name)}`;
        if (first !== undefined) {
          const what = { id: 'ID', pattern: 'pattern', trustDomain: 'trust domain' }[match.kind];
          this.report(
            match.offset,
            `${label} matches the same ${what} as ${first.label} at line ${first.line}; only the first would ever be used`,
          );
          ok = false;
        } else {
          matches.set(key, { label: name === undefined ? 'the rule' : `rule ${quote(name)}`, line });
        }
      }
      if (ok && rule !== undefined) rules.push(rule);
    }
    return rules;
  }

  rule(
    node: Node | null,
    offset: number,
    index: number,
  ): { rule?: Rule; name?: string; nameOffset: number; match?: ParsedMatch; line: number } | undefined {
    const target = this.deref(node, offset);
    if (target === undefined) return undefined;
    let where = `rule ${index + 1}`;
    if (target === null || !isMap(target)) {
      this.report(offset, `${where} must be a map with name, match and identity, got ${describe(target)}`);
      return undefined;
    }
    const before = this.problems.length;
    const line = this.position(offset).line;
    // Name the rule in messages about its keys when its name is usable.
    const rawName = target.get('name');
    if (typeof rawName === 'string' && RULE_NAME.test(rawName) && rawName.length <= MAX_RULE_NAME) {
      where = `rule ${quote(rawName)}`;
    }
    const fields = this.fields(target, RULE_KEYS, where);

    // name
    let name: string | undefined;
    let nameOffset = offset;
    const nameField = fields.get('name');
    if (nameField === undefined) {
      this.report(offset, `${where} is missing required key "name"`);
    } else {
      nameOffset = nameField.valueOffset;
      const text = this.string(nameField.value, nameField.valueOffset, 'name');
      if (text !== undefined) {
        if (text === '') this.report(nameField.valueOffset, 'name must not be empty');
        else if (text.length > MAX_RULE_NAME) {
          this.report(
            nameField.valueOffset,
            `name ${quote(text)} is longer than ${MAX_RULE_NAME} characters`,
          );
        } else if (!RULE_NAME.test(text)) {
          this.report(
            nameField.valueOffset,
            `name ${quote(text)} may contain only [a-z0-9-], not starting or ending with "-" (it is used in logs and metric labels)`,
          );
        } else {
          name = text;
          where = `rule ${quote(text)}`;
        }
      }
    }

    // match
    let match: ParsedMatch | undefined;
    const matchField = fields.get('match');
    if (matchField === undefined) {
      this.report(offset, `${where} is missing required key "match" (one of id, pattern or trustDomain)`);
    } else {
      match = this.match(matchField, where, line);
    }

    // identity
    let identity: IdentityTemplates | undefined;
    const identityField = fields.get('identity');
    if (identityField === undefined) {
      this.report(offset, `${where} is missing required key "identity" (at least "user")`);
    } else {
      identity = this.identity(identityField, where, match);
    }

    // limits
    let limits: RequestLimits | undefined;
    let resourceMatchers: ResourceMatcher[] | undefined;
    const limitsField = fields.get('limits');
    if (limitsField !== undefined) {
      const parsed = this.limits(limitsField);
      if (parsed !== undefined) ({ limits, resourceMatchers } = parsed);
    }

    // impersonate
    let impersonate: ImpersonationAllowance | undefined;
    const impersonateField = fields.get('impersonate');
    if (impersonateField !== undefined) impersonate = this.impersonate(impersonateField, where);

    const partial = {
      nameOffset,
      line,
      ...(name !== undefined && { name }),
      ...(match !== undefined && { match }),
    };
    if (this.problems.length !== before || name === undefined || match === undefined) return partial;
    if (identity === undefined) return partial;
    const rule: Rule = Object.freeze({
      name,
      line,
      kind: match.kind,
      match: match.text,
      trustDomain: match.trustDomain,
      segments: Object.freeze([...match.segments]),
      identity,
      ...(limits !== undefined && { limits }),
      ...(resourceMatchers !== undefined && { resourceMatchers: Object.freeze(resourceMatchers) }),
      ...(impersonate !== undefined && { impersonate }),
    });
    return { ...partial, rule };
  }

  match(field: Field, where: string, line: number): ParsedMatch | undefined {
    const map = this.map(field.value, field.valueOffset, `${where}: match`);
    if (map === undefined) return undefined;
    const fields = this.fields(map, MATCH_KEYS, `${where} match`);
    const present = MATCH_KEYS.filter((k) => fields.has(k));
    if (present.length === 0) {
      this.report(field.valueOffset, `${where}: match needs exactly one of id, pattern or trustDomain`);
      return undefined;
    }
    if (present.length > 1) {
      const second = fields.get(present[1] as (typeof MATCH_KEYS)[number]);
      this.report(
        second?.keyOffset ?? field.valueOffset,
        `${where}: match has ${present.map((k) => `"${k}"`).join(' and ')}; give exactly one of id, pattern or trustDomain`,
      );
      return undefined;
    }
    const kind = present[0] as MatchKind;
    const f = fields.get(kind);
    if (f === undefined) return undefined;
    const item = this.stringItem(f.value, f.valueOffset, `match.${kind}`);
    if (item === undefined) return undefined;
    const text = item.text;
    if (kind === 'id') {
      let id: SpiffeId;
      try {
        id = SpiffeId.parse(text);
      } catch (err) {
        this.report(f.valueOffset, `match.id: ${spiffeMessage(err)}`);
        return undefined;
      }
      if (id.isRoot) {
        this.report(
          f.valueOffset,
          `match.id ${quote(text)} has no path: it names a trust domain, not a workload (write "trustDomain: ${id.trustDomain.name}" to match every ID in it)`,
        );
        return undefined;
      }
      return {
        kind,
        text,
        trustDomain: id.trustDomain.name,
        segments: id.segments,
        offset: f.valueOffset,
        line,
      };
    }
    if (kind === 'pattern') {
      const parsed = parsePattern(text);
      if ('message' in parsed) {
        this.report(item.at(parsed.at), `match.pattern: ${parsed.message}`);
        return undefined;
      }
      return { kind, text, ...parsed, offset: f.valueOffset, line };
    }
    let trustDomain: TrustDomain;
    try {
      if (text.startsWith(SCHEME) && !SpiffeId.parse(text).isRoot) {
        this.report(
          f.valueOffset,
          `match.trustDomain must be a trust domain name such as "example.org", not an ID with a path (use "id:" or "pattern:")`,
        );
        return undefined;
      }
      trustDomain = TrustDomain.parse(text);
    } catch (err) {
      this.report(f.valueOffset, `match.trustDomain: ${spiffeMessage(err)}`);
      return undefined;
    }
    return {
      kind,
      text: trustDomain.name,
      trustDomain: trustDomain.name,
      segments: [],
      offset: f.valueOffset,
      line,
    };
  }

  template(item: StringItem, what: string, match: ParsedMatch | undefined): Template | undefined {
    const parsed = parseTemplate(item.text);
    if ('problems' in parsed) {
      for (const p of parsed.problems) {
        this.report(item.text === '' ? item.offset : item.at(p.at), `${what}: ${p.message}`);
      }
      return undefined;
    }
    if (match !== undefined && match.kind !== 'trustDomain') {
      const count = match.segments.length;
      let ok = true;
      for (const ref of parsed.segmentRefs) {
        if (ref.index < count) continue;
        ok = false;
        const why =
          match.kind === 'id'
            ? `the ID ${quote(match.text)} has ${count} segment${count === 1 ? '' : 's'} (indexes 0 to ${count - 1})`
            : match.segments.at(-1) === '**'
              ? `the pattern guarantees only ${count} segment${count === 1 ? '' : 's'} (indexes 0 to ${count - 1}; "**" matches one or more)`
              : `the pattern matches IDs of exactly ${count} segment${count === 1 ? '' : 's'} (indexes 0 to ${count - 1})`;
        this.report(item.at(ref.at), `${what}: {segment:${ref.index}} cannot exist: ${why}`);
      }
      if (!ok) return undefined;
    }
    return parsed.template;
  }

  templates(field: Field, what: string, match: ParsedMatch | undefined): Template[] | undefined {
    const items = this.stringList(field, what);
    if (items === undefined) return undefined;
    const out: Template[] = [];
    const seen = new Set<string>();
    for (const item of items) {
      if (seen.has(item.text)) {
        this.report(item.offset, `duplicate entry ${quote(item.text)} in ${what}`);
        continue;
      }
      seen.add(item.text);
      const t = this.template(item, `${what} entry`, match);
      if (t !== undefined) out.push(t);
    }
    return out;
  }

  identity(field: Field, where: string, match: ParsedMatch | undefined): IdentityTemplates | undefined {
    const map = this.map(field.value, field.valueOffset, `${where}: identity`);
    if (map === undefined) return undefined;
    const before = this.problems.length;
    const fields = this.fields(map, IDENTITY_KEYS, `${where} identity`);
    let user: Template | undefined;
    const userField = fields.get('user');
    if (userField === undefined) {
      this.report(field.valueOffset, `${where}: identity is missing required key "user"`);
    } else {
      const item = this.stringItem(userField.value, userField.valueOffset, 'identity.user');
      if (item?.text.startsWith(SERVICE_ACCOUNT_PREFIX)) {
        this.report(
          item.offset,
          `identity.user ${quote(item.text)} names a service account ("${SERVICE_ACCOUNT_PREFIX}…"): the proxy impersonates users, never service accounts`,
        );
      } else if (item !== undefined) {
        user = this.template(item, 'identity.user', match);
      }
    }
    const groupsField = fields.get('groups');
    const groups = groupsField === undefined ? [] : this.templates(groupsField, 'identity.groups', match);
    let uid: Template | undefined;
    const uidField = fields.get('uid');
    if (uidField !== undefined) {
      const item = this.stringItem(uidField.value, uidField.valueOffset, 'identity.uid');
      if (item !== undefined) uid = this.template(item, 'identity.uid', match);
    }
    const extra: Record<string, readonly Template[]> = {};
    const extraField = fields.get('extra');
    if (extraField !== undefined) {
      const extraMap = this.map(extraField.value, extraField.valueOffset, 'identity.extra');
      if (extraMap !== undefined) {
        for (const pair of extraMap.items) {
          const keyNode = pair.key as Node | null;
          const keyOffset = this.offsetOf(keyNode, extraField.valueOffset);
          const key = keyNode !== null && isScalar(keyNode) ? keyNode.value : undefined;
          if (typeof key !== 'string') {
            this.report(keyOffset, `identity.extra keys must be strings, got ${describe(keyNode)}`);
            continue;
          }
          if (!EXTRA_KEY.test(key)) {
            this.report(
              keyOffset,
              `identity.extra key ${quote(key)} may contain only lower-case [a-z0-9./-] (it becomes an Impersonate-Extra-* header)`,
            );
            continue;
          }
          const valueNode = pair.value as Node | null;
          const valueField = {
            value: valueNode,
            keyOffset,
            valueOffset: this.offsetOf(valueNode, keyOffset),
          };
          const beforeValues = this.problems.length;
          const values = this.templates(valueField, `identity.extra ${quote(key)}`, match);
          if (values === undefined) continue;
          if (values.length === 0 && this.problems.length === beforeValues) {
            this.report(valueField.valueOffset, `identity.extra ${quote(key)} needs at least one value`);
            continue;
          }
          extra[key] = Object.freeze(values);
        }
      }
    }
    if (this.problems.length !== before || user === undefined || groups === undefined) return undefined;
    return Object.freeze({
      user,
      groups: Object.freeze(groups),
      ...(uid !== undefined && { uid }),
      extra: Object.freeze(extra),
    });
  }

  limits(field: Field): { limits: RequestLimits; resourceMatchers?: ResourceMatcher[] } | undefined {
    const map = this.map(field.value, field.valueOffset, 'limits');
    if (map === undefined) return undefined;
    const before = this.problems.length;
    const fields = this.fields(map, LIMIT_KEYS, 'limits');
    const entries = (
      key: (typeof LIMIT_KEYS)[number],
      check: (text: string) => string | undefined,
      allowEmpty = false,
    ): string[] | undefined => {
      const f = fields.get(key);
      if (f === undefined) return undefined;
      const beforeItems = this.problems.length;
      const items = this.stringList(f, `limits.${key}`);
      if (items === undefined) return undefined;
      if (items.length === 0 && !allowEmpty && this.problems.length === beforeItems) {
        this.report(
          f.valueOffset,
          `limits.${key} must not be empty: it would refuse every request (omit it to leave ${key} unlimited)`,
        );
      }
      const out: string[] = [];
      for (const item of items) {
        const problem = check(item.text);
        if (problem !== undefined)
          this.report(item.offset, `limits.${key} entry ${quote(item.text)}: ${problem}`);
        else if (out.includes(item.text))
          this.report(item.offset, `duplicate entry ${quote(item.text)} in limits.${key}`);
        else out.push(item.text);
      }
      return out;
    };
    const verbs = entries('verbs', (v) =>
      v === '*' || (VERBS as readonly string[]).includes(v)
        ? undefined
        : `unknown verb (allowed: ${VERBS.join(', ')}, or "*")`,
    );
    const matchers: ResourceMatcher[] = [];
    const resources = entries('resources', (r) => {
      const m = parseResourceEntry(r);
      if (typeof m === 'string') return m;
      matchers.push(m);
      return undefined;
    });
    const namespaces = entries('namespaces', (ns) =>
      ns === '*' || DNS_LABEL.test(ns)
        ? undefined
        : 'not a namespace name (a DNS label: 1-63 of lower-case [a-z0-9-], not starting or ending with "-"), or "*"',
    );
    const paths = entries('nonResourcePaths', nonResourcePathProblem, true);
    if (this.problems.length !== before) return undefined;
    const limits: RequestLimits = Object.freeze({
      ...(verbs !== undefined && { verbs: Object.freeze(verbs) }),
      ...(resources !== undefined && { resources: Object.freeze(resources) }),
      ...(namespaces !== undefined && { namespaces: Object.freeze(namespaces) }),
      ...(paths !== undefined && { nonResourcePaths: Object.freeze(paths) }),
    });
    return { limits, ...(resources !== undefined && { resourceMatchers: matchers }) };
  }

  impersonate(field: Field, where: string): ImpersonationAllowance | undefined {
    const map = this.map(field.value, field.valueOffset, `${where}: impersonate`);
    if (map === undefined) return undefined;
    const before = this.problems.length;
    const fields = this.fields(map, IMPERSONATE_KEYS, 'impersonate');
    const entries = (
      key: (typeof IMPERSONATE_KEYS)[number],
      check: (text: string) => string | undefined,
    ): StringItem[] | undefined => {
      const f = fields.get(key);
      if (f === undefined) return undefined;
      const beforeItems = this.problems.length;
      const items = this.stringList(f, `impersonate.${key}`);
      if (items === undefined) return undefined;
      if (items.length === 0 && this.problems.length === beforeItems) {
        this.report(f.valueOffset, `impersonate.${key} must not be empty (omit it to allow no ${key})`);
      }
      const out: StringItem[] = [];
      for (const item of items) {
        const problem = check(item.text);
        if (problem !== undefined) {
          this.report(item.offset, `impersonate.${key} entry ${quote(item.text)}: ${problem}`);
        } else if (out.some((o) => o.text === item.text)) {
          this.report(item.offset, `duplicate entry ${quote(item.text)} in impersonate.${key}`);
        } else {
          out.push(item);
        }
      }
      return out;
    };
    const serviceAccounts = entries('serviceAccounts', serviceAccountEntryProblem);
    const users = entries('users', (u) => nestedNameProblem(u, 'user'));
    const groups = entries('groups', (g) => nestedNameProblem(g, 'group'));
    // "apps/deployer" next to "apps/*" reads narrower than the rule is.
    const texts = serviceAccounts?.map((i) => i.text) ?? [];
    for (const item of serviceAccounts ?? []) {
      const [namespace, name] = item.text.split('/') as [string, string];
      if (name !== '*' && texts.includes(`${namespace}/*`)) {
        this.report(
          item.offset,
          `impersonate.serviceAccounts entry ${quote(item.text)} is already allowed by "${namespace}/*"`,
        );
      }
    }
    if (this.problems.length === before && serviceAccounts === undefined && users === undefined) {
      this.report(
        field.valueOffset,
        `${where}: impersonate needs serviceAccounts or users (kube-apiserver requires a user to impersonate; groups alone allow nothing)`,
      );
    }
    if (this.problems.length !== before) return undefined;
    const frozen = (items: StringItem[]): readonly string[] => Object.freeze(items.map((i) => i.text));
    return Object.freeze({
      ...(serviceAccounts !== undefined && { serviceAccounts: frozen(serviceAccounts) }),
      ...(users !== undefined && { users: frozen(users) }),
      ...(groups !== undefined && { groups: frozen(groups) }),
    });
  }
}

/**
 * Parses and validates a policy. Throws one `PolicyError` (code `ERR_POLICY`) listing every problem found, each
 * with its 1-based line and column; never anything else.
 */
export function parsePolicy(text: string, options: { file: string }): Policy {
  const { reader, ok } = readYaml(text, 'the policy');
  const parser = new Parser(reader, text);
  if (ok) {
    let rules: Rule[] = [];
    try {
      rules = parser.top();
    } catch (err) {
      parser.report(0, `cannot read the policy: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (parser.problems.length === 0) return new Policy(options.file, rules);
  }
  throw new PolicyError(options.file, parser.sortedProblems());
}

/** Reads and parses a policy file. Throws `PolicyError` (`ERR_POLICY`), with `problems` when it is invalid. */
export async function loadPolicyFile(file: string): Promise<Policy> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new PolicyError(file, [], `${file}: cannot read the policy file: ${reason}`, { cause: err });
  }
  return parsePolicy(text, { file });
}
