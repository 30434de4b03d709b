import type { X509Certificate } from 'node:crypto';
import { AuthzErrorCode, SpiffeError } from './errors.ts';
import type { SpiffeId, TrustDomain } from './id.ts';

/**
 * Decides whether an authenticated peer may talk to us. Called only after `verifyX509Svid` succeeded, with the
 * peer's SPIFFE ID and verified chain. Throws `SpiffeError` (`ERR_AUTHZ_UNAUTHORIZED`) to refuse.
 */
export type Authorizer = (id: SpiffeId, verifiedChain: readonly X509Certificate[]) => void;

function refuse(id: SpiffeId, why: string): never {
  throw new SpiffeError(AuthzErrorCode.Unauthorized, `${id} is not authorized: ${why}`);
}

/** Any authenticated SPIFFE ID. Authentication still happened; this only skips authorization. */
export function authorizeAny(): Authorizer {
  return () => {};
}

/** Exactly this SPIFFE ID. */
export function authorizeId(allowed: SpiffeId): Authorizer {
  return (id) => {
    if (!id.equals(allowed)) refuse(id, `expected ${allowed}`);
  };
}

/** Any of these SPIFFE IDs. */
export function authorizeOneOf(...allowed: readonly SpiffeId[]): Authorizer {
  const set = new Set(allowed.map((a) => a.toString()));
  return (id) => {
    if (!set.has(id.toString())) refuse(id, `not one of ${[...set].join(', ') || '(none)'}`);
  };
}

/** Any SPIFFE ID in this trust domain. */
export function authorizeMemberOf(trustDomain: TrustDomain): Authorizer {
  return (id) => {
    if (!id.isMemberOf(trustDomain)) refuse(id, `not a member of trust domain "${trustDomain}"`);
  };
}
