/**
 * SPIFFE Federation: our bundle endpoint (`BundleEndpointServer`), one `BundleFetcher` per relationship with a
 * foreign trust domain, and the `FederationStore` that keeps fetched bundles across restarts.
 */
export {
  type BundleEndpointOptions,
  BundleEndpointServer,
  DEFAULT_ENDPOINT_HOST,
  DEFAULT_ENDPOINT_LIMITS,
  DEFAULT_ENDPOINT_PATH,
  DEFAULT_REFRESH_HINT_SECONDS,
  type EndpointIdentity,
  type EndpointLimits,
  type EndpointTls,
} from './endpoint.ts';
export { FederationError, FederationErrorCode, isFederationError } from './errors.ts';
export {
  BundleFetcher,
  type BundleFetcherEvents,
  type BundleFetcherOptions,
  DEFAULT_FETCH_TIMEOUT_MS,
  DEFAULT_MAX_BUNDLE_BYTES,
  DEFAULT_REFRESH,
  type FetchProfile,
  type RefreshOptions,
  type Relationship,
  type RelationshipStatus,
} from './fetcher.ts';
export { FEDERATION_STATE_SUBDIR, FederationStore, federationFileName, type StoredBundle } from './store.ts';
