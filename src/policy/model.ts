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
import { compareStrings } from '../config/compare.ts';
import { quote } from '../config/yaml.ts';
import type { SpiffeId } from '../spiffe/id.ts';
import { limitRefusal, type RequestLimits, type ResourceMatcher } from './limits.ts';
import { type ImpersonationAllowance, nestedDecision } from './nested.ts';
import { patternMatches } from './pattern.ts';
import { expandTemplate, type IdentityTemplates, type Template } from './template.ts';
import {
  type CompiledPolicy,
  type Decision,
  type KubeIdentity,
  type NestedImpersonationRequest,
  type NestedPolicyDecision,
  PolicyDenyCode,
  type RequestInfo,
} from './types.ts';

/** How a rule matches IDs; also its precedence class, in this order. */
export type MatchKind = 'id' | 'pattern' | 'trustDomain';

export const MATCH_KINDS: readonly MatchKind[] = ['id', 'pattern', 'trustDomain'];

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

/** A rule with its `limits.resources` compiled once. */
export interface Rule extends PolicyRule {
  readonly resourceMatchers?: readonly ResourceMatcher[];
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
export const SERVICE_ACCOUNT_PREFIX = 'system:serviceaccount:';

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
