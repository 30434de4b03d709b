/**
 * A rule's identity templates compiled once, when the policy is loaded: the Kubernetes identity a rule maps an
 * ID to, or why none can be made. Templates without placeholders are expanded at compile time, and a list or
 * map made only of them is built and frozen once, so that a decision builds only what depends on the ID.
 */
import { quote } from '../config/yaml.ts';
import type { SpiffeId } from '../spiffe/id.ts';
import { expandTemplate, type IdentityTemplates, type Template } from './template.ts';
import type { KubeIdentity } from './types.ts';

/** Users named so are service accounts to kube-apiserver's impersonation filter; the policy never maps to one. */
export const SERVICE_ACCOUNT_PREFIX = 'system:serviceaccount:';

/** A template's text when it has no placeholder, otherwise the template. */
type Compiled = string | Template;

function compile(template: Template): Compiled {
  let text = '';
  for (const part of template.parts) {
    if (part.kind !== 'text') return template;
    text += part.text;
  }
  return text;
}

/** The values without repeats, first occurrence first (as `[...new Set(values)]`). */
function unique(values: string[]): string[] {
  for (let i = 1; i < values.length; i++) {
    if (values.indexOf(values[i] as string) < i) return [...new Set(values)];
  }
  return values;
}

/** A list of templates: its frozen expansion when no entry has a placeholder. */
interface CompiledList {
  readonly templates: readonly Compiled[];
  readonly constant?: readonly string[];
}

function compileList(templates: readonly Template[]): CompiledList {
  const compiled = templates.map(compile);
  if (!compiled.every((c) => typeof c === 'string')) return { templates: compiled };
  return { templates: compiled, constant: Object.freeze(unique(compiled as string[])) };
}

const NO_EXTRA: Readonly<Record<string, readonly string[]>> = Object.freeze({});

/** The `{segment:N}` a template needs and the ID lacks. */
class MissingSegment {
  readonly index: number;
  constructor(index: number) {
    this.index = index;
  }
}

/** A template's expansion for the ID, or the segment it needs and the ID lacks. */
function expand(template: Compiled, id: SpiffeId): string | MissingSegment {
  if (typeof template === 'string') return template;
  const value = expandTemplate(template, id);
  return typeof value === 'string' ? value : new MissingSegment(value.missing);
}

function expandList(list: CompiledList, id: SpiffeId): readonly string[] | MissingSegment {
  if (list.constant !== undefined) return list.constant;
  const out: string[] = [];
  for (const template of list.templates) {
    const value = expand(template, id);
    if (typeof value !== 'string') return value;
    out.push(value);
  }
  return Object.freeze(unique(out));
}

/** A rule's identity templates, compiled: `make` gives the identity for an ID, or why none can be made. */
export class CompiledIdentity {
  readonly #rule: string;
  readonly #user: Compiled;
  readonly #groups: CompiledList;
  readonly #uid: Compiled | undefined;
  readonly #extraKeys: readonly string[];
  readonly #extraLists: readonly CompiledList[];
  /** The extra map when every value is constant, built once. */
  readonly #constantExtra: Readonly<Record<string, readonly string[]>> | undefined;

  /** `rule` names the rule in the problems `make` returns. */
  constructor(rule: { readonly name: string; readonly identity: IdentityTemplates }) {
    this.#rule = rule.name;
    this.#user = compile(rule.identity.user);
    this.#groups = compileList(rule.identity.groups);
    this.#uid = rule.identity.uid === undefined ? undefined : compile(rule.identity.uid);
    this.#extraKeys = Object.keys(rule.identity.extra);
    this.#extraLists = this.#extraKeys.map((key) => compileList(rule.identity.extra[key] ?? []));
    if (this.#extraKeys.length === 0) this.#constantExtra = NO_EXTRA;
    else if (this.#extraLists.every((l) => l.constant !== undefined)) {
      const extra: Record<string, readonly string[]> = {};
      for (const [i, key] of this.#extraKeys.entries()) {
        extra[key] = this.#extraLists[i]?.constant as readonly string[];
      }
      this.#constantExtra = Object.freeze(extra);
    }
  }

  /**
   * The identity for the ID, or the problem. The problems, and their order, are those of expanding user, groups,
   * uid and extra one after the other.
   */
  make(id: SpiffeId): KubeIdentity | string {
    const user = expand(this.#user, id);
    if (typeof user !== 'string') return this.#missing('the user', user, id);
    if (user === '') return `rule ${quote(this.#rule)} maps ${id.toString()} to an empty user`;
    if (user.startsWith(SERVICE_ACCOUNT_PREFIX)) {
      return `rule ${quote(this.#rule)} maps ${id.toString()} to ${quote(user)}, a service account: the proxy never impersonates service accounts`;
    }
    const groups = expandList(this.#groups, id);
    if (groups instanceof MissingSegment) return this.#missing('a group', groups, id);
    let uid: string | undefined;
    if (this.#uid !== undefined) {
      const value = expand(this.#uid, id);
      if (typeof value !== 'string') return this.#missing('the uid', value, id);
      uid = value;
    }
    let extra = this.#constantExtra;
    if (extra === undefined) {
      const built: Record<string, readonly string[]> = {};
      for (let i = 0; i < this.#extraKeys.length; i++) {
        const key = this.#extraKeys[i] as string;
        const values = expandList(this.#extraLists[i] as CompiledList, id);
        if (values instanceof MissingSegment) return this.#missing(`extra ${quote(key)}`, values, id);
        built[key] = values;
      }
      extra = Object.freeze(built);
    }
    return uid === undefined
      ? Object.freeze({ user, groups, extra })
      : Object.freeze({ user, groups, uid, extra });
  }

  #missing(what: string, missing: MissingSegment, id: SpiffeId): string {
    const count = id.segments.length;
    return (
      `rule ${quote(this.#rule)} maps ${what} with {segment:${missing.index}}, but ${id.toString()} has ` +
      `${count} path segment${count === 1 ? '' : 's'}`
    );
  }
}
