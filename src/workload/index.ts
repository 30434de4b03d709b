/**
 * kube-svid-proxy/workload: the client side of the SPIFFE Workload API.
 *
 * `X509Source` and `JwtSource` stream from the agent (ours, or SPIRE's), reconnect with backoff, emit `update`
 * on every rotation or bundle change, and always hold the latest good SVIDs and bundles. What the agent sends is
 * checked before it is used (`refused`, `warning`), and SVIDs the agent withdraws are no longer handed out
 * (`withdrawn`); those reports are `WorkloadError`s with stable codes (`WorkloadErrorCode`).
 */
export {
  JwtSource,
  type ParseJwtBundlesOptions,
  parseJwtBundlesResponse,
  parseX509BundlesResponse,
  parseX509SvidResponse,
  resolveEndpoint,
  type SourceEvents,
  type SourceOptions,
  WorkloadApiError,
  WorkloadClient,
  type WorkloadClientOptions,
  type X509Context,
  X509Source,
  type X509SourceEvents,
} from './client.ts';
export { isWorkloadError, WorkloadError, WorkloadErrorCode } from './errors.ts';
export { ENDPOINT_SOCKET_ENV, parseEndpointAddress, SECURITY_HEADER } from './proto.ts';
