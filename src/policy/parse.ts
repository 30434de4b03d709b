/**
 * The policy file parser: reads the YAML, validates every rule (all problems with their line and column) and
 * compiles the rules into a `Policy`. See `model.ts` for the file's shape and the precedence of rules.
 */
import { readFile } from 'node:fs/promises';
import { isMap, isScalar, type Node, type Scalar } from 'yaml';
import { describe, quote, readYaml, YamlReader } from '../config/yaml.ts';
import { SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { PolicyError, spiffeMessage } from './errors.ts';
import {
  namespaceEntryProblem,
  nonResourcePathProblem,
  parseResourceEntry,
  type RequestLimits,
  type ResourceMatcher,
  verbEntryProblem,
} from './limits.ts';
import { type MatchKind, Policy, type Rule, SERVICE_ACCOUNT_PREFIX } from './model.ts';
import { type ImpersonationAllowance, nestedNameProblem, serviceAccountEntryProblem } from './nested.ts';
import { parsePattern, SCHEME } from './pattern.ts';
import { type IdentityTemplates, parseTemplate, type Template } from './template.ts';

const RULE_KEYS = ['name', 'match', 'identity', 'limits', 'impersonate'] as const;
const MATCH_KEYS = ['id', 'pattern', 'trustDomain'] as const;
const IDENTITY_KEYS = ['user', 'groups', 'uid', 'extra'] as const;
const LIMIT_KEYS = ['verbs', 'resources', 'namespaces', 'nonResourcePaths'] as const;
const IMPERSONATE_KEYS = ['serviceAccounts', 'users', 'groups'] as const;

const RULE_NAME = /^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$/;
const MAX_RULE_NAME = 63;
const EXTRA_KEY = /^[a-z0-9./-]+$/;
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
    const items = this.topLevelList('rules', {
      notMap: 'the policy must be a map with a "rules" list (write "rules: []" to deny everything)',
      missingHint: 'write "rules: []" to deny everything',
    });
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
    const verbs = entries('verbs', verbEntryProblem);
    const matchers: ResourceMatcher[] = [];
    const resources = entries('resources', (r) => {
      const m = parseResourceEntry(r);
      if (typeof m === 'string') return m;
      matchers.push(m);
      return undefined;
    });
    const namespaces = entries('namespaces', namespaceEntryProblem);
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
