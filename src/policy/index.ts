/** The policy layer: parse, compile and decide; request info; RBAC for the proxy; hot reload. */
export { isPolicyError, PolicyError, PolicyErrorCode, RequestInfoError } from './errors.ts';
export {
  describedRequest,
  type Explanation,
  explain,
  formatExplanation,
  type RequestDescription,
} from './explain.ts';
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
  type ServiceAccountRef,
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
  type KubeIdentity,
  PolicyDenyCode,
  type RequestInfo,
} from './types.ts';
export { type PolicyWatcher, type WatchPolicyOptions, watchPolicy } from './watch.ts';
