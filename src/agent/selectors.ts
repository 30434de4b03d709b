import { AgentError, AgentErrorCode } from './errors.ts';

/**
 * A selector is one fact about a workload, written `type:value` as SPIRE writes it: `unix:uid:1000`,
 * `k8s:ns:argocd`, `k8s:pod-label:app:argocd-server`. The type is everything before the first colon.
 */
export interface Selector {
  readonly type: string;
  readonly value: string;
}

/** The attestor types the bundled agent knows. An entry naming any other type is refused at load. */
export const SELECTOR_TYPES: ReadonlySet<string> = new Set(['unix', 'k8s']);

/**
 * What each attestor can produce, as `key` (the part of the value before its first colon) → whether the rest
 * must be a number. A selector no attestor can produce would never match, so it is almost always a typo and is
 * refused when the entries file is loaded.
 */
const SELECTOR_KEYS: Readonly<Record<string, Readonly<Record<string, 'number' | 'text'>>>> = {
  unix: {
    uid: 'number',
    gid: 'number',
    user: 'text',
    group: 'text',
    supplementary_gid: 'number',
    supplementary_group: 'text',
    path: 'text',
    sha256: 'text',
  },
  k8s: {
    ns: 'text',
    sa: 'text',
    'pod-name': 'text',
    'pod-uid': 'text',
    'pod-label': 'text',
    'pod-owner': 'text',
    'pod-owner-uid': 'text',
    'container-name': 'text',
    'container-image': 'text',
    'pod-image': 'text',
    'pod-init-image': 'text',
    'pod-image-count': 'number',
    'pod-init-image-count': 'number',
    'node-name': 'text',
  },
};

export function parseSelector(text: string): Selector {
  const colon = text.indexOf(':');
  if (colon <= 0 || colon === text.length - 1) {
    throw new AgentError(AgentErrorCode.Selector, `selector "${text}" is not of the form type:value`);
  }
  const type = text.slice(0, colon);
  const value = text.slice(colon + 1);
  if (!SELECTOR_TYPES.has(type)) {
    throw new AgentError(
      AgentErrorCode.Selector,
      `selector "${text}" has unknown type "${type}" (known: ${[...SELECTOR_TYPES].join(', ')})`,
    );
  }
  const keys = SELECTOR_KEYS[type] ?? {};
  const sep = value.indexOf(':');
  const key = sep < 0 ? value : value.slice(0, sep);
  const rest = sep < 0 ? '' : value.slice(sep + 1);
  const kind = keys[key];
  if (kind === undefined) {
    throw new AgentError(
      AgentErrorCode.Selector,
      `selector "${text}": the ${type} attestor has no "${key}" selector (known: ${Object.keys(keys).join(', ')})`,
    );
  }
  if (rest === '') {
    throw new AgentError(AgentErrorCode.Selector, `selector "${text}" has no value after "${type}:${key}:"`);
  }
  if (kind === 'number' && !/^\d+$/.test(rest)) {
    throw new AgentError(
      AgentErrorCode.Selector,
      `selector "${text}": ${type}:${key} takes a number, got "${rest}"`,
    );
  }
  return { type, value };
}

export function formatSelector(selector: Selector): string {
  return `${selector.type}:${selector.value}`;
}

/** True when every selector of `required` is among `have` (SPIRE's "all must match"). */
export function selectorsMatch(required: readonly Selector[], have: ReadonlySet<string>): boolean {
  return required.every((s) => have.has(formatSelector(s)));
}
