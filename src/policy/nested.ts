/**
 * Nested impersonation: a client that itself sends `Impersonate-User` (Argo CD's sync impersonation, Flux's
 * `serviceAccountName`) asks to act as another identity. The proxy allows it only when the client's rule names
 * that identity under `impersonate`; the proxy then asks kube-apiserver, with a SubjectAccessReview as the
 * client's mapped identity, whether that identity may impersonate it, and forwards the nested identity itself.
 *
 * Everything here is pure: reading the client's headers, checking them against a rule, and the attributes the
 * SubjectAccessReview must check (the ones kube-apiserver's impersonation filter would).
 */
import { quote } from '../config/yaml.ts';
import {
  type NestedDecision,
  type NestedIdentity,
  type NestedImpersonationRequest,
  PolicyDenyCode,
} from './types.ts';

/** What a rule's `impersonate` key allows; each list absent when not given (never empty). */
export interface ImpersonationAllowance {
  /** `<namespace>/<name>` or `<namespace>/*`, as written. */
  readonly serviceAccounts?: readonly string[];
  /** Exact user names; never `system:serviceaccount:…`. */
  readonly users?: readonly string[];
  /** Exact group names the nested identity may carry, besides the implied ones (see `impliedGroups`). */
  readonly groups?: readonly string[];
}

/** The part of a rule nested impersonation looks at. */
export interface NestedRule {
  readonly name: string;
  readonly impersonate?: ImpersonationAllowance;
}

/** kube-apiserver reads a user named so as a service account (`system:serviceaccount:<namespace>:<name>`). */
export const SERVICE_ACCOUNT_USER_PREFIX = 'system:serviceaccount:';

/**
 * The user extra the proxy adds to a forwarded nested impersonation, holding the client's SPIFFE ID, so that
 * kube-apiserver's audit log still names the workload behind the nested identity. `policy rbac` grants it.
 */
export const NESTED_SPIFFE_ID_EXTRA = 'spiffe.io/id';

const ALL_AUTHENTICATED = 'system:authenticated';
const ANONYMOUS = 'system:anonymous';
const ALL_SERVICE_ACCOUNTS = 'system:serviceaccounts';

const DNS_LABEL = /^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$/;
const DNS_SUBDOMAIN = /^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$/;
const MAX_SUBDOMAIN = 253;
/** Printable ASCII, no comma (a comma is where Node.js joins repeated header lines). */
const NAME_CHARS = /^[\x20-\x2b\x2d-\x7e]+$/;

// ---------------------------------------------------------------------------------------------------------
// Names

/** The namespace and name of a service account user, as kube-apiserver's `serviceaccount.SplitUsername`. */
export function parseServiceAccountUser(user: string): { namespace: string; name: string } | undefined {
  if (!user.startsWith(SERVICE_ACCOUNT_USER_PREFIX)) return undefined;
  const parts = user.slice(SERVICE_ACCOUNT_USER_PREFIX.length).split(':');
  if (parts.length !== 2) return undefined;
  const [namespace, name] = parts as [string, string];
  if (!DNS_LABEL.test(namespace) || !isServiceAccountName(name)) return undefined;
  return { namespace, name };
}

function isServiceAccountName(name: string): boolean {
  return name.length <= MAX_SUBDOMAIN && DNS_SUBDOMAIN.test(name);
}

/**
 * What is wrong with an `impersonate.serviceAccounts` entry (`<namespace>/<name>` or `<namespace>/*`), or
 * undefined when it is fine.
 */
export function serviceAccountEntryProblem(entry: string): string | undefined {
  if (entry.startsWith(SERVICE_ACCOUNT_USER_PREFIX)) {
    const sa = parseServiceAccountUser(entry);
    return `write a service account as "<namespace>/<name>"${sa === undefined ? '' : ` (here "${sa.namespace}/${sa.name}")`}, not as its user name`;
  }
  const parts = entry.split('/');
  if (parts.length !== 2) return 'must be "<namespace>/<name>" or "<namespace>/*"';
  const [namespace, name] = parts as [string, string];
  if (namespace === '*') {
    return 'the namespace must be literal (RBAC grants service account impersonation per namespace): list each namespace, as "<namespace>/*" for all of its service accounts';
  }
  if (!DNS_LABEL.test(namespace)) {
    return `the namespace ${quote(namespace)} is not a namespace name (a DNS label: 1-63 of lower-case [a-z0-9-], not starting or ending with "-")`;
  }
  if (name === '*') return undefined;
  if (name.includes('*')) return `"*" must be the whole name ("${namespace}/*" allows every service account)`;
  if (!isServiceAccountName(name)) {
    return `the name ${quote(name)} is not a service account name (a DNS subdomain: lower-case [a-z0-9-.], at most 253 characters)`;
  }
  return undefined;
}

/** What is wrong with an `impersonate.users` or `impersonate.groups` entry, or undefined when it is fine. */
export function nestedNameProblem(entry: string, what: 'user' | 'group'): string | undefined {
  if (entry === '') return 'must not be empty';
  if (entry.includes('*')) return `"*" is not a wildcard here: list each ${what} by its exact name`;
  if (entry.includes(',')) {
    return 'must not contain "," (repeated headers are joined with ",", so the name could not be told apart)';
  }
  if (!NAME_CHARS.test(entry)) return 'may hold only printable ASCII characters';
  if (entry.trim() !== entry)
    return 'must not start or end with white space (HTTP strips it from header values)';
  if (what === 'user' && entry.startsWith(SERVICE_ACCOUNT_USER_PREFIX)) {
    const sa = parseServiceAccountUser(entry);
    return `names a service account: list it under impersonate.serviceAccounts${sa === undefined ? '' : ` as "${sa.namespace}/${sa.name}"`}`;
  }
  return undefined;
}

/**
 * Groups a nested identity may always carry, because kube-apiserver gives them to it anyway:
 * `system:authenticated` for every user but `system:anonymous`, and `system:serviceaccounts` and
 * `system:serviceaccounts:<namespace>` for a service account.
 */
export function impliedGroups(user: string): string[] {
  const sa = parseServiceAccountUser(user);
  if (sa !== undefined) return serviceAccountGroups(sa.namespace);
  return user === ANONYMOUS ? [] : [ALL_AUTHENTICATED];
}

/** The groups kube-apiserver gives every service account of a namespace (`impliedGroups` of each). */
export function serviceAccountGroups(namespace: string): string[] {
  return [ALL_SERVICE_ACCOUNTS, `${ALL_SERVICE_ACCOUNTS}:${namespace}`, ALL_AUTHENTICATED];
}

// ---------------------------------------------------------------------------------------------------------
// The client's headers

const USER_HEADER = 'impersonate-user';
const GROUP_HEADER = 'impersonate-group';
const UID_HEADER = 'impersonate-uid';
const EXTRA_PREFIX = 'impersonate-extra-';
const HEADER_PREFIX = 'impersonate-';

/**
 * Reads a client's own impersonation headers, names in any case: undefined when it sent none, the requested
 * identity, or why it is refused.
 *
 * - `Impersonate-User` exactly once (one value); `Impersonate-Group` any number of times. A `string[]` value is
 *   one entry per header line (`req.headersDistinct`); a string may hold lines Node.js joined with `", "`
 *   (`req.headers`). Either way each value is split at commas, which names never contain (the policy refuses
 *   them), so both forms read the same.
 * - `Impersonate-Uid` and `Impersonate-Extra-*` are refused: nested impersonation carries a user and groups
 *   only. So is every other `Impersonate-*` header.
 * - Groups without a user are refused (kube-apiserver requires a user), and so are empty values and values
 *   that are not printable ASCII.
 */
export function parseImpersonationHeaders(
  headers: Readonly<Record<string, string | readonly string[] | undefined>>,
): NestedImpersonationRequest | { readonly refused: string } | undefined {
  const users: string[] = [];
  const groups: string[] = [];
  let seen = false;
  for (const [rawName, value] of Object.entries(headers)) {
    const name = rawName.toLowerCase();
    if (!name.startsWith(HEADER_PREFIX) || value === undefined) continue;
    seen = true;
    if (name === UID_HEADER) return { refused: 'Impersonate-Uid is not allowed in nested impersonation' };
    if (name.startsWith(EXTRA_PREFIX)) {
      return { refused: `${headerLabel(rawName)} is not allowed in nested impersonation (no user extras)` };
    }
    if (name !== USER_HEADER && name !== GROUP_HEADER) {
      return {
        refused: `unknown impersonation header ${headerLabel(rawName)} (nested impersonation takes Impersonate-User and Impersonate-Group)`,
      };
    }
    const label = name === USER_HEADER ? 'Impersonate-User' : 'Impersonate-Group';
    for (const line of typeof value === 'string' ? [value] : value) {
      for (const piece of line.split(',')) {
        const text = piece.trim();
        if (text === '') return { refused: `${label} has an empty value` };
        if (!NAME_CHARS.test(text)) return { refused: `${label} ${quote(text)} is not printable ASCII` };
        (name === USER_HEADER ? users : groups).push(text);
      }
    }
  }
  if (!seen) return undefined;
  if (users.length === 0) {
    return {
      refused: `Impersonate-Group without Impersonate-User (kube-apiserver requires a user)`,
    };
  }
  const [user] = users as [string, ...string[]];
  if (users.length > 1) {
    return {
      refused: `Impersonate-User given ${users.length} times (${users.map((u) => quote(u)).join(', ')}); nested impersonation takes exactly one user`,
    };
  }
  return Object.freeze({ user, groups: Object.freeze([...new Set(groups)]) });
}

function headerLabel(name: string): string {
  return name
    .toLowerCase()
    .split('-')
    .map((w, i) => (i < 2 ? `${w.charAt(0).toUpperCase()}${w.slice(1)}` : w))
    .join('-');
}

// ---------------------------------------------------------------------------------------------------------
// The decision

function list(values: readonly string[]): string {
  return `[${values.join(', ')}]`;
}

function refuse(reason: string): NestedDecision {
  return { allowed: false, code: PolicyDenyCode.NestedImpersonation, reason };
}

/** Whether an `impersonate.serviceAccounts` list allows a service account; the entry that does. */
export function serviceAccountAllowedBy(
  entries: readonly string[],
  sa: { readonly namespace: string; readonly name: string },
): string | undefined {
  return entries.find((e) => e === `${sa.namespace}/${sa.name}` || e === `${sa.namespace}/*`);
}

/**
 * Whether a rule allows a client to impersonate `requested`: only when the rule has `impersonate`, the user is
 * a service account its `serviceAccounts` allows or a user its `users` lists, and every group is in its
 * `groups` or implied (`impliedGroups`). Allowed, it answers the identity to forward.
 */
export function nestedDecision(rule: NestedRule, requested: NestedImpersonationRequest): NestedDecision {
  const where = `rule ${quote(rule.name)}`;
  const allowance = rule.impersonate;
  if (allowance === undefined) {
    return refuse(`${where} does not allow nested impersonation (it has no "impersonate" key)`);
  }
  const { user } = requested;
  let serviceAccount: { namespace: string; name: string } | undefined;
  if (user.startsWith(SERVICE_ACCOUNT_USER_PREFIX)) {
    serviceAccount = parseServiceAccountUser(user);
    if (serviceAccount === undefined) {
      return refuse(
        `${where}: user ${quote(user)} is not a service account user name (system:serviceaccount:<namespace>:<name>) and may not be impersonated`,
      );
    }
    const label = `service account "${serviceAccount.namespace}/${serviceAccount.name}"`;
    if (allowance.serviceAccounts === undefined) {
      return refuse(`${where}: ${label} is not allowed (the rule has no impersonate.serviceAccounts)`);
    }
    if (serviceAccountAllowedBy(allowance.serviceAccounts, serviceAccount) === undefined) {
      return refuse(
        `${where}: ${label} is not in impersonate.serviceAccounts ${list(allowance.serviceAccounts)}`,
      );
    }
  } else if (allowance.users === undefined) {
    return refuse(`${where}: user ${quote(user)} is not allowed (the rule has no impersonate.users)`);
  } else if (!allowance.users.includes(user)) {
    return refuse(`${where}: user ${quote(user)} is not in impersonate.users ${list(allowance.users)}`);
  }
  const implied = impliedGroups(user);
  const listed = allowance.groups ?? [];
  const refused = requested.groups.filter((g) => !implied.includes(g) && !listed.includes(g));
  if (refused.length > 0) {
    const what = refused.length === 1 ? `group ${quote(refused[0] ?? '')} is` : `groups ${list(refused)} are`;
    const allowed =
      allowance.groups === undefined
        ? 'the rule has no impersonate.groups'
        : `impersonate.groups ${list(listed)}`;
    return refuse(`${where}: ${what} not allowed (${allowed}; implied for this user: ${list(implied)})`);
  }
  const impersonated: NestedIdentity = Object.freeze({
    user,
    groups: Object.freeze([...new Set(requested.groups)]),
    ...(serviceAccount !== undefined && { serviceAccount: Object.freeze(serviceAccount) }),
  });
  return { allowed: true, impersonated };
}

// ---------------------------------------------------------------------------------------------------------
// The SubjectAccessReview

/**
 * One `resourceAttributes` of a SubjectAccessReview (`authorization.k8s.io/v1`): the names are the API's.
 * `group` is the core group (`""`) for users, groups and service accounts.
 */
export interface ImpersonationCheck {
  readonly verb: 'impersonate';
  readonly group: '';
  readonly resource: 'users' | 'groups' | 'serviceaccounts';
  /** Set for `serviceaccounts` only. */
  readonly namespace?: string;
  readonly name: string;
}

/**
 * What the client's mapped identity must be allowed, one SubjectAccessReview each, before the proxy forwards
 * `nested`: what kube-apiserver's impersonation filter would check had the client impersonated it directly
 * (`impersonate` on the service account, or on the user, and on each group forwarded).
 */
export function nestedImpersonationChecks(nested: NestedIdentity): ImpersonationCheck[] {
  const checks: ImpersonationCheck[] = [
    nested.serviceAccount === undefined
      ? { verb: 'impersonate', group: '', resource: 'users', name: nested.user }
      : {
          verb: 'impersonate',
          group: '',
          resource: 'serviceaccounts',
          namespace: nested.serviceAccount.namespace,
          name: nested.serviceAccount.name,
        },
  ];
  for (const g of nested.groups) checks.push({ verb: 'impersonate', group: '', resource: 'groups', name: g });
  return checks;
}
