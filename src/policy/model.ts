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
import { CompiledIdentity, SERVICE_ACCOUNT_PREFIX } from './identity.ts';
import { limitRefusal, type RequestLimits, type ResourceMatcher } from './limits.ts';
import { type ImpersonationAllowance, nestedDecision } from './nested.ts';
import { PatternIndex } from './pattern-index.ts';
import type { IdentityTemplates } from './template.ts';
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

/** What the lookups hold: a rule with its identity templates compiled. */
interface Entry {
  readonly rule: Rule;
  readonly trustDomain: string;
  readonly segments: readonly string[];
  readonly identity: CompiledIdentity;
}

export { SERVICE_ACCOUNT_PREFIX };

/** A validated policy. Immutable. */
export class Policy implements CompiledPolicy {
  readonly file: string;
  readonly trustDomains: readonly string[];
  /** Every rule, in file order. */
  readonly rules: readonly PolicyRule[];
  readonly #exact: ReadonlyMap<string, Entry>;
  readonly #patterns: PatternIndex<Entry>;
  readonly #byTrustDomain: ReadonlyMap<string, Entry>;
  readonly #named: ReadonlySet<string>;

  /** @internal use `parsePolicy`; the rules are assumed valid (unique names, IDs, patterns, trust domains). */
  constructor(file: string, rules: readonly Rule[]) {
    this.file = file;
    this.rules = Object.freeze([...rules]);
    this.#named = new Set(rules.map((r) => r.trustDomain));
    this.trustDomains = Object.freeze([...this.#named].sort(compareStrings));
    const exact = new Map<string, Entry>();
    const byTrustDomain = new Map<string, Entry>();
    const patterns: Entry[] = [];
    for (const rule of rules) {
      // A rule that can never be used (a repeated ID or trust domain) is not compiled.
      const map = rule.kind === 'id' ? exact : rule.kind === 'trustDomain' ? byTrustDomain : undefined;
      const key = rule.kind === 'id' ? rule.match : rule.trustDomain;
      if (map?.has(key)) continue;
      const entry: Entry = {
        rule,
        trustDomain: rule.trustDomain,
        segments: rule.segments,
        identity: new CompiledIdentity(rule),
      };
      if (map === undefined) patterns.push(entry);
      else map.set(key, entry);
    }
    this.#exact = exact;
    this.#patterns = new PatternIndex(patterns);
    this.#byTrustDomain = byTrustDomain;
  }

  /** How many rules of each kind. */
  counts(): Record<MatchKind, number> {
    const counts: Record<MatchKind, number> = { id: 0, pattern: 0, trustDomain: 0 };
    for (const rule of this.rules) counts[rule.kind]++;
    return counts;
  }

  /**
   * The first rule by precedence. Each kind is looked up, not scanned: exact IDs and trust domains in maps,
   * patterns in a segment trie that answers the first matching pattern in file order (`pattern-index.ts`).
   */
  #entryFor(id: SpiffeId): Entry | undefined {
    if (id.isRoot) return undefined;
    const exact = this.#exact.get(id.toString());
    if (exact !== undefined) return exact;
    const domain = id.trustDomain.name;
    return this.#patterns.first(domain, id.path) ?? this.#byTrustDomain.get(domain);
  }

  /** The first rule (by precedence) whose match accepts the ID, or undefined. IDs without a path match none. */
  ruleFor(id: SpiffeId): PolicyRule | undefined {
    return this.#entryFor(id)?.rule;
  }

  /** The matching rule and the identity it maps the ID to (or why it cannot); undefined when no rule matches. */
  resolve(id: SpiffeId): Resolution | undefined {
    const entry = this.#entryFor(id);
    if (entry === undefined) return undefined;
    const identity = entry.identity.make(id);
    return typeof identity === 'string'
      ? { rule: entry.rule, problem: identity }
      : { rule: entry.rule, identity };
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
    const named = this.#named.has(domain);
    return `no rule matches ${id.toString()}${named ? '' : ` (no rule names trust domain ${quote(domain)})`}; deny by default`;
  }

  decide(id: SpiffeId, request: RequestInfo): Decision {
    const entry = this.#entryFor(id);
    return this.#decide(id, entry, entry?.identity.make(id), request);
  }

  decideNested(
    id: SpiffeId,
    request: RequestInfo,
    requested: NestedImpersonationRequest,
  ): NestedPolicyDecision {
    const entry = this.#entryFor(id);
    const decision = this.#decide(id, entry, entry?.identity.make(id), request);
    if (!decision.allowed) return decision;
    // An allowed decision always comes from a rule.
    const nested = nestedDecision(entry?.rule ?? { name: decision.rule }, requested);
    if (!nested.allowed)
      return { allowed: false, rule: decision.rule, code: nested.code, reason: nested.reason };
    return { ...decision, nested: nested.impersonated };
  }

  #decide(
    id: SpiffeId,
    entry: Entry | undefined,
    identity: KubeIdentity | string | undefined,
    request: RequestInfo,
  ): Decision {
    if (entry === undefined || identity === undefined) {
      return { allowed: false, code: PolicyDenyCode.NoRule, reason: this.noRuleReason(id) };
    }
    const rule = entry.rule.name;
    if (typeof identity === 'string') {
      return { allowed: false, rule, code: PolicyDenyCode.Identity, reason: identity };
    }
    const refusal = limitRefusal(entry.rule, request);
    if (refusal !== undefined) {
      return {
        allowed: false,
        rule,
        code: PolicyDenyCode.RequestLimit,
        reason: `rule ${quote(rule)}: ${refusal}`,
      };
    }
    return { allowed: true, rule, identity };
  }
}
