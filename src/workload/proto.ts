import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/** Metadata every Workload API request must carry (SPIFFE Workload Endpoint §3); InvalidArgument without it. */
export const SECURITY_HEADER = 'workload.spiffe.io';
/** The environment variable naming the Workload API endpoint, e.g. `unix:///run/spire/agent.sock`. */
export const ENDPOINT_SOCKET_ENV = 'SPIFFE_ENDPOINT_SOCKET';

// workload.proto ships next to this file (copied into dist/ by the build).
const PROTO_PATH = fileURLToPath(new URL('./workload.proto', import.meta.url));

const packageDefinition = protoLoader.loadSync(PROTO_PATH, {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});

/** The service definition of `SpiffeWorkloadAPI` (no package: paths are `/SpiffeWorkloadAPI/<Method>`). */
export const workloadApiService = packageDefinition.SpiffeWorkloadAPI as grpc.ServiceDefinition;

/** A client constructor for `SpiffeWorkloadAPI`. */
export const WorkloadApiClient = grpc.makeClientConstructor(workloadApiService, 'SpiffeWorkloadAPI');

// Message shapes as @grpc/proto-loader produces them (keepCase, defaults): field names as in the proto.

export interface X509SvidMessage {
  spiffe_id: string;
  x509_svid: Buffer;
  x509_svid_key: Buffer;
  bundle: Buffer;
  hint: string;
}

export interface X509SvidResponse {
  svids: X509SvidMessage[];
  crl: Buffer[];
  federated_bundles: Record<string, Buffer>;
}

export interface X509BundlesResponse {
  crl: Buffer[];
  bundles: Record<string, Buffer>;
}

export interface JwtSvidRequest {
  audience: string[];
  spiffe_id: string;
}

export interface JwtSvidMessage {
  spiffe_id: string;
  svid: string;
  hint: string;
}

export interface JwtSvidResponse {
  svids: JwtSvidMessage[];
}

export interface JwtBundlesResponse {
  bundles: Record<string, Buffer>;
}

export interface ValidateJwtSvidRequest {
  audience: string;
  svid: string;
}

/** google.protobuf.Value as proto-loader represents it. */
export interface StructValue {
  nullValue?: 'NULL_VALUE';
  numberValue?: number;
  stringValue?: string;
  boolValue?: boolean;
  structValue?: StructMessage;
  listValue?: { values: StructValue[] };
  kind?: string;
}

export interface StructMessage {
  fields: Record<string, StructValue>;
}

export interface ValidateJwtSvidResponse {
  spiffe_id: string;
  claims: StructMessage | null;
}

/** JSON → google.protobuf.Struct. */
export function toStruct(object: Readonly<Record<string, unknown>>): StructMessage {
  const fields: Record<string, StructValue> = {};
  for (const [key, value] of Object.entries(object)) fields[key] = toValue(value);
  return { fields };
}

function toValue(value: unknown): StructValue {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'number') return { numberValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  if (typeof value === 'object') return { structValue: toStruct(value as Record<string, unknown>) };
  return { stringValue: String(value) };
}

/** google.protobuf.Struct → JSON. */
export function fromStruct(struct: StructMessage | null | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(struct?.fields ?? {})) out[key] = fromValue(value);
  return out;
}

function fromValue(value: StructValue): unknown {
  switch (value.kind) {
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return value.boolValue;
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return (value.listValue?.values ?? []).map(fromValue);
    default:
      return null;
  }
}

/**
 * Parses a Workload API address: `unix:///abs/path` or `unix:/abs/path` (RFC 3986, as SPIFFE_ENDPOINT_SOCKET
 * is written), or a bare absolute path. TCP addresses are refused: a TCP caller cannot be attested.
 * Returns the socket path.
 */
export function parseEndpointAddress(address: string): string {
  const text = address.trim();
  if (text.startsWith('/')) return text;
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new RangeError(`Workload API address "${address}" is not a URI (expected unix:///path/to/socket)`);
  }
  if (url.protocol !== 'unix:') {
    throw new RangeError(
      `Workload API address "${address}" has scheme "${url.protocol.slice(0, -1)}"; only unix:///path is supported`,
    );
  }
  if (
    url.host !== '' ||
    url.search !== '' ||
    url.hash !== '' ||
    url.username !== '' ||
    !url.pathname.startsWith('/')
  ) {
    throw new RangeError(
      `Workload API address "${address}" must be unix:///absolute/path, with no host or query`,
    );
  }
  return decodeURIComponent(url.pathname);
}
