/**
 * kube-svid-proxy/workload: the client side of the SPIFFE Workload API.
 *
 * `X509Source` and `JwtSource` stream from the agent (ours, or SPIRE's), reconnect with backoff, emit `update`
 * on every rotation or bundle change, and always hold the latest SVIDs and bundles.
 */
export {
  JwtSource,
  parseJwtBundlesResponse,
  parseX509BundlesResponse,
  parseX509SvidResponse,
  resolveEndpoint,
  type SourceOptions,
  WorkloadApiError,
  WorkloadClient,
  type WorkloadClientOptions,
  type X509Context,
  X509Source,
} from './client.ts';
export { ENDPOINT_SOCKET_ENV, parseEndpointAddress, SECURITY_HEADER } from './proto.ts';
