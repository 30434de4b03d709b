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
  return { type, value };
}

export function formatSelector(selector: Selector): string {
  return `${selector.type}:${selector.value}`;
}

/** True when every selector of `required` is among `have` (SPIRE's "all must match"). */
export function selectorsMatch(required: readonly Selector[], have: ReadonlySet<string>): boolean {
  return required.every((s) => have.has(formatSelector(s)));
}
