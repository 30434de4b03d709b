import { nestedImpersonationChecks } from '../policy/nested.ts';
import type { KubeIdentity, NestedIdentity } from '../policy/types.ts';
import type { Upstream } from './forward.ts';

export type SarResult = { readonly allowed: true } | { readonly allowed: false; readonly reason: string };

/**
 * Asks kube-apiserver, with SubjectAccessReviews made under the proxy's own credential, whether the identity the
 * client's SPIFFE ID maps to may impersonate `nested`: the same check kube-apiserver would make had the client
 * impersonated directly. Every permission must be granted; any error refuses (fail closed).
 */
export async function mayImpersonate(
  upstream: Upstream,
  as: KubeIdentity,
  nested: NestedIdentity,
): Promise<SarResult> {
  for (const target of nestedImpersonationChecks(nested)) {
    const review = {
      apiVersion: 'authorization.k8s.io/v1',
      kind: 'SubjectAccessReview',
      spec: {
        user: as.user,
        groups: [...as.groups],
        ...(as.uid ? { uid: as.uid } : {}),
        extra: Object.fromEntries(Object.entries(as.extra).map(([k, v]) => [k, [...v]])),
        resourceAttributes: target,
      },
    };
    let answer: { status: number; json: unknown };
    try {
      answer = await upstream.call('POST', '/apis/authorization.k8s.io/v1/subjectaccessreviews', review);
    } catch (err) {
      return { allowed: false, reason: `the SubjectAccessReview failed: ${(err as Error).message}` };
    }
    const status = (answer.json as { status?: { allowed?: boolean; reason?: string } } | undefined)?.status;
    if (answer.status !== 201 && answer.status !== 200) {
      return { allowed: false, reason: `the SubjectAccessReview was answered ${answer.status}` };
    }
    if (status?.allowed !== true) {
      const what = target.namespace
        ? `${target.resource} ${target.namespace}/${target.name}`
        : `${target.resource} ${target.name}`;
      return {
        allowed: false,
        reason: `${as.user} may not impersonate ${what}${status?.reason ? ` (${status.reason})` : ''}`,
      };
    }
  }
  return { allowed: true };
}
