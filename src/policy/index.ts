/** The policy layer: parse, compile and decide; request info; RBAC for the proxy; hot reload. */
export { isPolicyError, PolicyError, PolicyErrorCode, RequestInfoError } from './errors.ts';
export {
  describedNested,
  describedRequest,
  type Explanation,
  explain,
  formatExplanation,
  type NestedDescription,
  type RequestDescription,
} from './explain.ts';
export {
  type ImpersonationAllowance,
  type ImpersonationCheck,
  impliedGroups,
  NESTED_SPIFFE_ID_EXTRA,
  type NestedRule,
  nestedDecision,
  nestedImpersonationChecks,
  nestedNameProblem,
  parseImpersonationHeaders,
  parseServiceAccountUser,
  SERVICE_ACCOUNT_USER_PREFIX,
  serviceAccountAllowedBy,
  serviceAccountEntryProblem,
  serviceAccountGroups,
} from './nested.ts';
export {
  DOTLESS_GROUPS,
  expandTemplate,
  type IdentityTemplates,
  limitRefusal,
  loadPolicyFile,
  MATCH_KINDS,
  type MatchKind,
  PLACEHOLDERS,
  Policy,
  type PolicyRule,
  parsePolicy,
  parseRequestResource,
  parseTemplate,
  type RequestLimits,
  type Resolution,
  type Template,
  type TemplatePart,
  VERBS,
} from './policy.ts';
export {
  DEFAULT_SERVICE_ACCOUNT,
  type ImpersonationGrant,
  impersonationGrants,
  type RbacManifests,
  rbacManifests,
  type ServiceAccountGrant,
  type ServiceAccountRef,
  serviceAccountGrants,
  type UnboundedCause,
  unboundedWarnings,
} from './rbac.ts';
export {
  describeRequest,
  formatResource,
  MAX_QUERY_PARAMETERS,
  MAX_REQUEST_TARGET,
  requestInfo,
} from './request.ts';
export {
  type CompiledPolicy,
  type Decision,
  type Denial,
  type KubeIdentity,
  type NestedDecision,
  type NestedIdentity,
  type NestedImpersonationRequest,
  type NestedPolicyDecision,
  PolicyDenyCode,
  type RequestInfo,
} from './types.ts';
export { type PolicyWatcher, type WatchPolicyOptions, watchPolicy } from './watch.ts';
