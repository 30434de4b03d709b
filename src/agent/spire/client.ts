/**
 * The agent's side of the SPIRE server API (v1.13.3): node attestation, agent SVID renewal, authorized entries,
 * SVID minting and bundles, over gRPC with our own trimmed copies of the API's .proto files (./proto, loaded at
 * import time and copied into dist/ by the build). Answers are converted into the plain values of types.ts and
 * checked on the way in; a failure is a `SpireServerError`.
 *
 * Server authentication. The server must present `spiffe://<trust domain>/spire/server` chained to an X.509
 * authority of the bundle the caller gives (the bootstrap bundle at first contact): OpenSSL checks the chain
 * against that bundle's authorities alone (`ca`), and then `verifyX509Svid` checks it again with our SPIFFE rules
 * and the ID is compared, so a CA that happens to be trusted by Node (NODE_EXTRA_CA_CERTS, the system store) is
 * never enough. Host names play no part: SPIRE's server SVID names no DNS SAN.
 *
 * What SPIRE v1.13.3 answers (from its source, and test/interop/spire-client.test.ts):
 * - Every call an agent makes with its SVID (all but AttestAgent and GetBundle) first passes the server's agent
 *   check (pkg/server/endpoints/middleware.go AgentAuthorizer), which refuses with PERMISSION_DENIED and a
 *   `spire.api.types.PermissionDeniedDetails` in the status details (grpc-status-details-bin), reason:
 *   AGENT_BANNED when the agent was banned (`spire-server agent ban`: its serial number is erased);
 *   AGENT_NOT_ATTESTED when it was evicted (`spire-server agent evict` deletes the attested node);
 *   AGENT_EXPIRED when its SVID has expired; AGENT_NOT_ACTIVE when it presents an SVID older than the one the
 *   server has on record. RenewAgent adds AGENT_MUST_REATTEST for an agent whose attestation was reattestable.
 *   SPIRE's own agent shuts down on AGENT_BANNED and attests again on the four others
 *   (pkg/common/nodeutil/node.go); here a ban is ERR_AGENT_BANNED and the others are ERR_AGENT_UPSTREAM with
 *   `reattest` set.
 * - AttestAgent for a banned agent ID fails with PERMISSION_DENIED "failed to attest: agent is banned" and no
 *   details: ERR_AGENT_BANNED. A used, unknown or expired join token is INVALID_ARGUMENT; the k8s_psat attestor
 *   refuses with INVALID_ARGUMENT (a cluster it does not know, a malformed payload) or PERMISSION_DENIED (a
 *   token TokenReview does not authenticate, a service account not allowed); a server without the attestor
 *   answers FAILED_PRECONDITION: all are ERR_AGENT_UPSTREAM_AUTH (evidence refused). INTERNAL (e.g. the kube
 *   API unreachable from the server) and RESOURCE_EXHAUSTED (attestation is rate limited to 1/s per IP) are
 *   ERR_AGENT_UPSTREAM.
 * - GetFederatedBundle of a trust domain the server holds no bundle for is NOT_FOUND ("bundle not found").
 * - A server whose SVID does not verify fails the connection: grpc-js reports UNAVAILABLE with OpenSSL's or our
 *   message inside; when a call fails UNAVAILABLE, one plain TLS handshake (no client certificate) tells an
 *   unauthenticated server (ERR_AGENT_UPSTREAM_AUTH, naming what it presented) from an unreachable one.
 */
import { createPublicKey, type KeyObject, type webcrypto, X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { connect, type DetailedPeerCertificate, type PeerCertificate } from 'node:tls';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { SpiffeBundle } from '../../spiffe/bundle.ts';
import { inspect } from '../../spiffe/certinfo.ts';
import { SpiffeId, TrustDomain } from '../../spiffe/id.ts';
import { parseJwtSvidInsecure } from '../../spiffe/jwtsvid.ts';
import { verifyX509Svid } from '../../spiffe/x509svid.ts';
import { AgentError, AgentErrorCode } from '../errors.ts';
import { signingAlgorithm, toSigningKey, x509 } from '../keys.ts';
import type {
  MintedJwtSvid,
  MintedX509Svid,
  NodeAttestation,
  SpireEntry,
  SpireServerAddress,
  SpireSession,
  X509SvidResult,
} from './types.ts';

// ---------------------------------------------------------------------------------------------------------------
// Protocol definitions

const PROTO_DIR = fileURLToPath(new URL('./proto', import.meta.url));

const packageDefinition = protoLoader.loadSync(
  [
    'spire/api/server/agent/v1/agent.proto',
    'spire/api/server/entry/v1/entry.proto',
    'spire/api/server/svid/v1/svid.proto',
    'spire/api/server/bundle/v1/bundle.proto',
  ],
  { includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);

function method<Req, Res>(service: string, name: string): grpc.MethodDefinition<Req, Res> {
  const definition = (packageDefinition[service] as grpc.ServiceDefinition | undefined)?.[name];
  if (definition === undefined)
    throw new Error(`${service}/${name} is missing from the bundled .proto files`);
  return definition as grpc.MethodDefinition<Req, Res>;
}

// Message shapes as @grpc/proto-loader produces them (keepCase, longs as strings, defaults, oneofs).

interface SpiffeIdMessage {
  trust_domain: string;
  path: string;
}

interface X509SvidMessage {
  cert_chain: Buffer[];
  id: SpiffeIdMessage | null;
  expires_at: string;
  hint: string;
}

interface JwtSvidMessage {
  token: string;
  id: SpiffeIdMessage | null;
  expires_at: string;
  issued_at: string;
  hint: string;
}

interface BundleMessage {
  trust_domain: string;
  x509_authorities: { asn1: Buffer; tainted: boolean }[];
  jwt_authorities: { public_key: Buffer; key_id: string; expires_at: string; tainted: boolean }[];
  refresh_hint: string;
  sequence_number: string;
}

interface EntryMessage {
  id: string;
  spiffe_id: SpiffeIdMessage | null;
  parent_id: SpiffeIdMessage | null;
  selectors: { type: string; value: string }[];
  x509_svid_ttl: number;
  federates_with: string[];
  admin: boolean;
  downstream: boolean;
  expires_at: string;
  dns_names: string[];
  revision_number: string;
  store_svid: boolean;
  jwt_svid_ttl: number;
  hint: string;
  created_at: string;
}

interface AttestAgentRequest {
  params?: { data: { type: string; payload: Buffer }; params: { csr: Buffer } };
  challenge_response?: Buffer;
}

interface AttestAgentResponse {
  step?: 'result' | 'challenge';
  result?: { svid: X509SvidMessage | null; reattestable: boolean } | null;
  challenge?: Buffer;
}

const AGENT = 'spire.api.server.agent.v1.Agent';
const ENTRY = 'spire.api.server.entry.v1.Entry';
const SVID = 'spire.api.server.svid.v1.SVID';
const BUNDLE = 'spire.api.server.bundle.v1.Bundle';

const rpc = {
  attestAgent: method<AttestAgentRequest, AttestAgentResponse>(AGENT, 'AttestAgent'),
  renewAgent: method<{ params: { csr: Buffer } }, { svid: X509SvidMessage | null }>(AGENT, 'RenewAgent'),
  getAuthorizedEntries: method<{ output_mask?: null }, { entries: EntryMessage[] }>(
    ENTRY,
    'GetAuthorizedEntries',
  ),
  batchNewX509Svid: method<
    { params: { entry_id: string; csr: Buffer }[] },
    {
      results: {
        status: { code: number; message: string } | null;
        svid: X509SvidMessage | null;
      }[];
    }
  >(SVID, 'BatchNewX509SVID'),
  newJwtSvid: method<{ entry_id: string; audience: string[] }, { svid: JwtSvidMessage | null }>(
    SVID,
    'NewJWTSVID',
  ),
  getBundle: method<Record<string, never>, BundleMessage>(BUNDLE, 'GetBundle'),
  getFederatedBundle: method<{ trust_domain: string }, BundleMessage>(BUNDLE, 'GetFederatedBundle'),
};

// ---------------------------------------------------------------------------------------------------------------
// Errors

/** `spire.api.types.PermissionDeniedDetails.Reason`, by its enum number. */
const DENIAL_REASONS = [
  'UNKNOWN',
  'AGENT_EXPIRED',
  'AGENT_NOT_ATTESTED',
  'AGENT_NOT_ACTIVE',
  'AGENT_BANNED',
  'AGENT_MUST_REATTEST',
] as const;
export type DenialReason = (typeof DENIAL_REASONS)[number];

/** The reasons on which SPIRE's own agent attests again (pkg/common/nodeutil ShouldAgentReattest). */
const REATTEST_REASONS: ReadonlySet<DenialReason> = new Set([
  'AGENT_EXPIRED',
  'AGENT_NOT_ATTESTED',
  'AGENT_NOT_ACTIVE',
  'AGENT_MUST_REATTEST',
]);

/** A failed call to the SPIRE server: an AgentError (ERR_AGENT_UPSTREAM, _UPSTREAM_AUTH or _BANNED) with the facts. */
export class SpireServerError extends AgentError {
  /** The gRPC method, e.g. `/spire.api.server.agent.v1.Agent/AttestAgent`; '' when no call was made. */
  readonly method: string;
  /**
   * The call's gRPC status code; undefined when no status is behind the failure (an answer refused here, a bundle
   * unfit to authenticate the server with, a closed session).
   */
  readonly grpcCode: grpc.status | undefined;
  /** The reason of a PERMISSION_DENIED the server explained (PermissionDeniedDetails). */
  readonly denial: DenialReason | undefined;
  /**
   * True when the server refused this agent's SVID in a way that attesting again repairs (the agent was evicted,
   * its SVID expired or was superseded, or it must reattest instead of renewing): what SPIRE's agent does then.
   */
  readonly reattest: boolean;

  constructor(
    code: AgentErrorCode,
    message: string,
    facts: { method: string; grpcCode?: grpc.status | undefined; denial?: DenialReason | undefined },
    options?: ErrorOptions,
  ) {
    super(code, message, options);
    this.name = 'SpireServerError';
    this.method = facts.method;
    this.grpcCode = facts.grpcCode;
    this.denial = facts.denial;
    this.reattest = facts.denial !== undefined && REATTEST_REASONS.has(facts.denial);
  }
}

/** Reads one protobuf field list (wire format); undefined when malformed. */
function protoFields(buf: Uint8Array): { field: number; varint?: bigint; bytes?: Uint8Array }[] | undefined {
  const out: { field: number; varint?: bigint; bytes?: Uint8Array }[] = [];
  let pos = 0;
  const varint = (): bigint | undefined => {
    let value = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      const byte = buf[pos++];
      if (byte === undefined) return undefined;
      value |= BigInt(byte & 0x7f) << shift;
      if ((byte & 0x80) === 0) return value;
    }
    return undefined;
  };
  while (pos < buf.length) {
    const key = varint();
    if (key === undefined) return undefined;
    const field = Number(key >> 3n);
    switch (Number(key & 7n)) {
      case 0: {
        const value = varint();
        if (value === undefined) return undefined;
        out.push({ field, varint: value });
        break;
      }
      case 1:
        pos += 8;
        break;
      case 2: {
        const length = varint();
        if (length === undefined || pos + Number(length) > buf.length) return undefined;
        out.push({ field, bytes: buf.subarray(pos, pos + Number(length)) });
        pos += Number(length);
        break;
      }
      case 5:
        pos += 4;
        break;
      default:
        return undefined;
    }
  }
  return pos === buf.length ? out : undefined;
}

const DENIED_DETAILS_TYPE = 'type.googleapis.com/spire.api.types.PermissionDeniedDetails';

/**
 * The PermissionDeniedDetails reason in a status's grpc-status-details-bin (a google.rpc.Status: details = 3,
 * each a google.protobuf.Any of type_url = 1 and value = 2; the details' reason = 1).
 */
function denialReason(metadata: grpc.Metadata | undefined): DenialReason | undefined {
  for (const value of metadata?.get('grpc-status-details-bin') ?? []) {
    if (typeof value === 'string') continue;
    for (const detail of protoFields(value) ?? []) {
      if (detail.field !== 3 || detail.bytes === undefined) continue;
      const any = protoFields(detail.bytes) ?? [];
      const typeUrl = any.find((f) => f.field === 1)?.bytes;
      if (typeUrl === undefined || Buffer.from(typeUrl).toString('utf8') !== DENIED_DETAILS_TYPE) continue;
      const payload = any.find((f) => f.field === 2)?.bytes ?? new Uint8Array();
      const reason = Number(protoFields(payload)?.find((f) => f.field === 1)?.varint ?? 0n);
      return DENIAL_REASONS[reason] ?? 'UNKNOWN';
    }
  }
  return undefined;
}

function isServiceError(err: unknown): err is grpc.ServiceError {
  return err instanceof Error && typeof (err as Partial<grpc.ServiceError>).code === 'number';
}

const AUTH_REFUSALS: ReadonlySet<grpc.status> = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.NOT_FOUND,
]);

// ---------------------------------------------------------------------------------------------------------------
// Conversions: messages to types.ts values, each checked

/** An answer that does not hold together. */
class BadAnswer extends Error {}

function spiffeIdOf(message: SpiffeIdMessage | null | undefined, what: string): SpiffeId {
  if (message === null || message === undefined) throw new BadAnswer(`${what} is missing`);
  try {
    return SpiffeId.fromPath(TrustDomain.parse(message.trust_domain), message.path);
  } catch (cause) {
    throw new BadAnswer(
      `${what} {trust_domain: ${JSON.stringify(message.trust_domain)}, path: ${JSON.stringify(message.path)}} is not a SPIFFE ID: ${(cause as Error).message}`,
    );
  }
}

function certificateOf(der: Uint8Array, what: string): X509Certificate {
  try {
    return new X509Certificate(der);
  } catch (cause) {
    throw new BadAnswer(`${what} is not an X.509 certificate: ${(cause as Error).message}`);
  }
}

function spkiOf(key: KeyObject): Buffer {
  return key.export({ type: 'spki', format: 'der' });
}

/** The SubjectPublicKeyInfo (DER) a PKCS#10 request carries; undefined when it does not parse. */
function csrPublicKey(csr: Uint8Array): Buffer | undefined {
  try {
    return Buffer.from(new x509.Pkcs10CertificateRequest(csr).publicKey.rawData);
  } catch {
    return undefined;
  }
}

/**
 * An X509SVID message: a chain whose leaf names exactly `id` (one URI SAN), optionally a given ID, and optionally
 * the public key of the CSR it answers.
 */
function x509SvidOf(
  message: X509SvidMessage | null | undefined,
  expect: { id?: SpiffeId; trustDomain?: TrustDomain; csr?: Uint8Array } = {},
): MintedX509Svid {
  if (message === null || message === undefined) throw new BadAnswer('the answer carries no X509-SVID');
  const id = spiffeIdOf(message.id, 'the X509-SVID ID');
  if (expect.id !== undefined && !id.equals(expect.id))
    throw new BadAnswer(`the X509-SVID is for ${id}, not ${expect.id}`);
  if (expect.trustDomain !== undefined && !id.isMemberOf(expect.trustDomain))
    throw new BadAnswer(`the X509-SVID ${id} is not in trust domain ${expect.trustDomain}`);
  if (message.cert_chain.length === 0) throw new BadAnswer(`the X509-SVID of ${id} has no certificate`);
  const certificates = message.cert_chain.map((der, i) =>
    certificateOf(der, i === 0 ? `the leaf of ${id}` : `certificate ${i} of ${id}'s chain`),
  );
  const leaf = certificates[0] as X509Certificate;
  let uris: readonly string[];
  try {
    uris = inspect(leaf).uriSans;
  } catch (cause) {
    throw new BadAnswer(`the leaf of ${id} does not parse: ${(cause as Error).message}`);
  }
  if (uris.length !== 1 || uris[0] !== id.toString()) {
    throw new BadAnswer(
      `the X509-SVID says ${id} but its leaf names ${uris.length === 0 ? 'no URI SAN' : uris.join(', ')}`,
    );
  }
  if (expect.csr !== undefined) {
    const wanted = csrPublicKey(expect.csr);
    if (wanted !== undefined && !spkiOf(leaf.publicKey).equals(wanted))
      throw new BadAnswer(`the leaf of ${id} does not carry the public key of the CSR it answers`);
  }
  return { id, certificates, expiresAt: leaf.validToDate };
}

function bundleOf(message: BundleMessage, trustDomain: TrustDomain): SpiffeBundle {
  if (message.trust_domain !== trustDomain.name)
    throw new BadAnswer(`asked for the bundle of ${trustDomain}, got one of "${message.trust_domain}"`);
  try {
    return new SpiffeBundle(trustDomain, {
      x509Authorities: message.x509_authorities.map((a, i) =>
        certificateOf(a.asn1, `X.509 authority ${i} of ${trustDomain}`),
      ),
      jwtAuthorities: message.jwt_authorities.map((k) => {
        try {
          return {
            kid: k.key_id,
            publicKey: createPublicKey({ key: k.public_key, format: 'der', type: 'spki' }),
          };
        } catch (cause) {
          throw new BadAnswer(
            `JWT authority "${k.key_id}" of ${trustDomain} is not a public key: ${(cause as Error).message}`,
          );
        }
      }),
      sequence: BigInt(message.sequence_number),
      refreshHint: Number(message.refresh_hint),
    });
  } catch (cause) {
    if (cause instanceof BadAnswer) throw cause;
    throw new BadAnswer(`the bundle of ${trustDomain} is invalid: ${(cause as Error).message}`);
  }
}

/** `federates_with` holds names; SPIRE accepted `spiffe://` IDs in the past, so both are read. */
function trustDomainName(value: string): string {
  try {
    return TrustDomain.parse(value).name;
  } catch (cause) {
    throw new BadAnswer(`federates_with "${value}" is not a trust domain: ${(cause as Error).message}`);
  }
}

function integer(value: string, what: string): bigint {
  try {
    return BigInt(value);
  } catch {
    throw new BadAnswer(`${what} "${value}" is not an integer`);
  }
}

function entryOf(message: EntryMessage): SpireEntry {
  const what = `entry ${JSON.stringify(message.id)}`;
  if (message.id === '') throw new BadAnswer('an entry has no ID');
  return {
    id: message.id,
    spiffeId: spiffeIdOf(message.spiffe_id, `${what}: spiffe_id`),
    parentId: spiffeIdOf(message.parent_id, `${what}: parent_id`),
    selectors: message.selectors.map((s) => `${s.type}:${s.value}`),
    x509SvidTtl: message.x509_svid_ttl,
    jwtSvidTtl: message.jwt_svid_ttl,
    federatesWith: message.federates_with.map(trustDomainName),
    dnsNames: [...message.dns_names],
    hint: message.hint,
    revisionNumber: integer(message.revision_number, `${what}: revision_number`),
    createdAt: Number(integer(message.created_at, `${what}: created_at`)),
    admin: message.admin,
    downstream: message.downstream,
  };
}

function jwtSvidOf(message: JwtSvidMessage | null | undefined): MintedJwtSvid {
  if (message === null || message === undefined) throw new BadAnswer('the answer carries no JWT-SVID');
  const id = spiffeIdOf(message.id, 'the JWT-SVID ID');
  let subject: SpiffeId;
  try {
    subject = parseJwtSvidInsecure(message.token).id;
  } catch (cause) {
    throw new BadAnswer(`the JWT-SVID of ${id} does not parse: ${(cause as Error).message}`);
  }
  if (!subject.equals(id)) throw new BadAnswer(`the JWT-SVID says ${id} but its sub is ${subject}`);
  return {
    id,
    token: message.token,
    expiresAt: new Date(Number(integer(message.expires_at, 'expires_at')) * 1000),
    issuedAt: new Date(Number(integer(message.issued_at, 'issued_at')) * 1000),
    hint: message.hint,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Server authentication

/** The certificates of a TLS peer, leaf first, as Node's detailed peer certificate links them. */
function peerChain(cert: PeerCertificate): X509Certificate[] {
  const chain: X509Certificate[] = [];
  const seen = new Set<string>();
  let current: DetailedPeerCertificate | undefined = cert as DetailedPeerCertificate;
  while (current?.raw !== undefined && chain.length < 17 && !seen.has(current.fingerprint256)) {
    seen.add(current.fingerprint256);
    chain.push(new X509Certificate(current.raw));
    current = current.issuerCertificate;
  }
  return chain;
}

/** Checks a presented chain: the server's own ID, under `bundle`. Returns what is wrong, or undefined. */
function serverProblem(chain: readonly X509Certificate[], bundle: SpiffeBundle, serverId: SpiffeId) {
  const leaf = chain[0];
  let presented = 'no certificate';
  if (leaf !== undefined) {
    try {
      const uris = inspect(leaf).uriSans;
      presented = uris.length === 0 ? `a certificate with no URI SAN (${leaf.subject})` : uris.join(', ');
    } catch {
      presented = `an unreadable certificate (${leaf.subject})`;
    }
  }
  try {
    const { id } = verifyX509Svid(chain, bundle);
    if (id.equals(serverId)) return undefined;
    return `the server presented ${id}, expected ${serverId}`;
  } catch (cause) {
    return `the server presented ${presented}, expected ${serverId} under the trust bundle held: ${(cause as Error).message}`;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The client

export interface SpireServerClientOptions {
  readonly address: SpireServerAddress;
  readonly trustDomain: TrustDomain;
  /** Per-call deadline, default 30 s (SPIRE's agent uses the same). */
  readonly timeoutMs?: number;
}

/**
 * Largest answer accepted: 16 MiB, four times gRPC's default, for GetAuthorizedEntries, which is not paged and
 * carries every entry of the agent (about 200 bytes each without DNS names).
 */
const MAX_RECEIVE_BYTES = 16 * 1024 * 1024;
/** Reconnection backoff stays under this, so a server back after an outage is used again within seconds. */
const MAX_RECONNECT_BACKOFF_MS = 5_000;
const DEFAULT_TIMEOUT_MS = 30_000;

type Credentials = { readonly cert: string; readonly key: string } | undefined;

export class SpireServerClient {
  readonly address: SpireServerAddress;
  readonly trustDomain: TrustDomain;
  /** The server's own SPIFFE ID: spiffe://<td>/spire/server. */
  readonly serverId: SpiffeId;
  readonly timeoutMs: number;
  readonly #target: string;
  readonly #where: string;

  constructor(options: SpireServerClientOptions) {
    this.address = options.address;
    this.trustDomain = options.trustDomain;
    this.serverId = SpiffeId.fromPath(options.trustDomain, '/spire/server');
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!(Number.isSafeInteger(this.timeoutMs) && this.timeoutMs > 0))
      throw new RangeError(
        `timeoutMs must be a positive whole number of milliseconds, not ${this.timeoutMs}`,
      );
    const host = options.address.host;
    this.#target = isIP(host) === 6 ? `[${host}]:${options.address.port}` : `${host}:${options.address.port}`;
    this.#where = `SPIRE server ${this.#target}`;
  }

  /**
   * agent.v1.Agent/AttestAgent over TLS without a client certificate, trusting only `bundle`'s X.509 authorities.
   * Sends `{data: attestation, params: {csr}}`. A challenge is answered only by an attestor that has one; neither
   * join_token nor k8s_psat has, so a challenge fails the attestation (ERR_AGENT_UPSTREAM_AUTH). The SVID returned
   * must be of our trust domain and carry the CSR's public key. An aborted `signal` cancels the call and rejects
   * with `signal.reason`.
   */
  async attest(
    bundle: SpiffeBundle,
    attestation: NodeAttestation,
    csr: Buffer,
    signal?: AbortSignal,
  ): Promise<{ svid: MintedX509Svid; reattestable: boolean }> {
    signal?.throwIfAborted();
    const channel = this.#channel(bundle, undefined);
    try {
      return await this.#attestCall(channel, attestation, csr, signal);
    } catch (err) {
      throw await this.#failure(err, rpc.attestAgent.path, bundle, signal, true);
    } finally {
      channel.close();
    }
  }

  /**
   * An mTLS session presenting the agent SVID, on one gRPC channel of its own, the server authenticated against
   * `bundle` as given (open a new session after the bundle or the agent SVID changes).
   */
  session(
    bundle: SpiffeBundle,
    agent: { readonly certificates: readonly X509Certificate[]; readonly privateKey: KeyObject },
  ): SpireSession {
    const leaf = agent.certificates[0];
    if (leaf === undefined) throw new RangeError('the agent SVID has no certificate');
    const [uri, ...more] = inspect(leaf).uriSans;
    if (uri === undefined || more.length > 0)
      throw new RangeError('the agent SVID leaf must name exactly one SPIFFE ID (URI SAN)');
    const agentId = SpiffeId.parse(uri);
    const credentials = {
      cert: agent.certificates.map((c) => c.toString()).join(''),
      key: agent.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    };
    const channel = this.#channel(bundle, credentials);
    return new Session(
      this.trustDomain,
      agentId,
      (definition, request, convert, signal) =>
        this.#unary(channel, definition, request, bundle, convert, signal),
      () => channel.close(),
    );
  }

  #channel(bundle: SpiffeBundle, credentials: Credentials): grpc.Client {
    if (!bundle.trustDomain.equals(this.trustDomain)) {
      throw new SpireServerError(
        AgentErrorCode.UpstreamAuth,
        `${this.#where}: a bundle of ${bundle.trustDomain} cannot authenticate ${this.serverId}`,
        { method: '' },
      );
    }
    if (bundle.x509Authorities.length === 0) {
      throw new SpireServerError(
        AgentErrorCode.UpstreamAuth,
        `${this.#where}: the trust bundle of ${this.trustDomain} has no X.509 authority to authenticate ${this.serverId} with`,
        { method: '' },
      );
    }
    const checkServerIdentity = (_host: string, cert: PeerCertificate): Error | undefined => {
      const problem = serverProblem(peerChain(cert), bundle, this.serverId);
      return problem === undefined ? undefined : new Error(problem);
    };
    const channelCredentials = grpc.credentials.createSsl(
      Buffer.from(bundle.x509Bundle.toPem()),
      credentials === undefined ? null : Buffer.from(credentials.key),
      credentials === undefined ? null : Buffer.from(credentials.cert),
      { checkServerIdentity },
    );
    const options: grpc.ChannelOptions = {
      'grpc.max_receive_message_length': MAX_RECEIVE_BYTES,
      'grpc.max_reconnect_backoff_ms': MAX_RECONNECT_BACKOFF_MS,
      // Its own connections, never shared with another channel: close() really closes them.
      'grpc.use_local_subchannel_pool': 1,
      // grpc-js sends the host as SNI even when it is an IP address (RFC 6066 forbids it, Node warns): a name then.
      // The server ignores SNI, and checkServerIdentity above ignores the host.
      ...(isIP(this.address.host) === 0 ? {} : { 'grpc.ssl_target_name_override': this.trustDomain.name }),
    };
    return new grpc.Client(this.#target, channelCredentials, options);
  }

  #deadline(): Date {
    return new Date(Date.now() + this.timeoutMs);
  }

  #attestCall(
    channel: grpc.Client,
    attestation: NodeAttestation,
    csr: Buffer,
    signal: AbortSignal | undefined,
  ): Promise<{ svid: MintedX509Svid; reattestable: boolean }> {
    const payload =
      attestation.type === 'join_token'
        ? Buffer.from(attestation.token, 'utf8')
        : Buffer.from(JSON.stringify({ cluster: attestation.cluster, token: attestation.token }), 'utf8');
    return new Promise((resolve, reject) => {
      const call = channel.makeBidiStreamRequest(
        rpc.attestAgent.path,
        rpc.attestAgent.requestSerialize,
        rpc.attestAgent.responseDeserialize,
        new grpc.Metadata(),
        { deadline: this.#deadline() },
      );
      let settled = false;
      const settle = (fn: () => void): void => {
        if (settled) return;
        settled = true;
        signal?.removeEventListener('abort', onAbort);
        fn();
      };
      const onAbort = (): void => {
        settle(() => reject(signal?.reason));
        call.cancel();
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      call.on('data', (response: AttestAgentResponse) => {
        if (response.step === 'result' && response.result) {
          const result = response.result;
          settle(() => {
            try {
              resolve({
                svid: x509SvidOf(result.svid, { trustDomain: this.trustDomain, csr }),
                reattestable: result.reattestable,
              });
            } catch (err) {
              reject(err);
            }
          });
          call.end();
          return;
        }
        settle(() =>
          reject(
            new SpireServerError(
              AgentErrorCode.UpstreamAuth,
              `${this.#where}: the ${attestation.type} attestor has no challenge to answer, but the server sent one (is the server's NodeAttestor "${attestation.type}" another plugin?)`,
              { method: rpc.attestAgent.path },
            ),
          ),
        );
        call.cancel();
      });
      call.on('error', (err) => settle(() => reject(err)));
      call.on('end', () =>
        settle(() =>
          reject(new BadAnswer('the server ended AttestAgent without a result or an error status')),
        ),
      );
      call.write({
        params: { data: { type: attestation.type, payload }, params: { csr } },
      });
    });
  }

  /** A unary call on `channel`, its answer converted, its failure explained. */
  #unary<Req, Res, Out>(
    channel: grpc.Client,
    definition: grpc.MethodDefinition<Req, Res>,
    request: Req,
    bundle: SpiffeBundle,
    convert: (response: Res) => Out,
    signal: AbortSignal | undefined,
  ): Promise<Out> {
    const attempt = new Promise<Out>((resolve, reject) => {
      signal?.throwIfAborted();
      let settled = false;
      const onAbort = (): void => {
        if (settled) return;
        settled = true;
        reject(signal?.reason);
        call.cancel();
      };
      const call = channel.makeUnaryRequest(
        definition.path,
        definition.requestSerialize,
        definition.responseDeserialize,
        request,
        new grpc.Metadata(),
        { deadline: this.#deadline() },
        (err, response) => {
          if (settled) return;
          settled = true;
          signal?.removeEventListener('abort', onAbort);
          if (err !== null || response === undefined) {
            reject(err ?? new BadAnswer('no answer'));
            return;
          }
          try {
            resolve(convert(response));
          } catch (failure) {
            reject(failure);
          }
        },
      );
      signal?.addEventListener('abort', onAbort, { once: true });
    });
    return attempt.catch(async (err: unknown) => {
      throw await this.#failure(err, definition.path, bundle, signal, false);
    });
  }

  /** Any failure of a call, as the error the caller sees. */
  async #failure(
    err: unknown,
    path: string,
    bundle: SpiffeBundle,
    signal: AbortSignal | undefined,
    attesting: boolean,
  ): Promise<unknown> {
    if (signal?.aborted && err === signal.reason) return err;
    if (err instanceof AgentError) return err;
    const name = path.slice(path.lastIndexOf('/') + 1);
    if (err instanceof BadAnswer) {
      return new SpireServerError(AgentErrorCode.Upstream, `${this.#where}: ${name}: ${err.message}`, {
        method: path,
      });
    }
    if (!isServiceError(err)) {
      return new SpireServerError(
        AgentErrorCode.Upstream,
        `${this.#where}: ${name} failed: ${(err as Error)?.message ?? String(err)}`,
        { method: path },
        { cause: err },
      );
    }
    const status = grpc.status[err.code] ?? String(err.code);
    const facts = { method: path, grpcCode: err.code, denial: denialReason(err.metadata) };
    const said = `${name}: ${status}: ${err.details}`;
    if (
      facts.denial === 'AGENT_BANNED' ||
      (attesting && err.code === grpc.status.PERMISSION_DENIED && /\bbanned\b/.test(err.details))
    ) {
      return new SpireServerError(
        AgentErrorCode.Banned,
        `${this.#where} has banned this agent (${said})`,
        facts,
        {
          cause: err,
        },
      );
    }
    if (err.code === grpc.status.UNAVAILABLE) {
      const problem = await this.#probe(bundle, signal);
      if (problem !== undefined) {
        return new SpireServerError(
          AgentErrorCode.UpstreamAuth,
          `${this.#where} is not authenticated: ${problem}`,
          facts,
          { cause: err },
        );
      }
    }
    if (attesting && AUTH_REFUSALS.has(err.code)) {
      return new SpireServerError(
        AgentErrorCode.UpstreamAuth,
        `${this.#where} refused the attestation (${said})`,
        facts,
        { cause: err },
      );
    }
    return new SpireServerError(AgentErrorCode.Upstream, `${this.#where}: ${said}`, facts, { cause: err });
  }

  /**
   * One TLS handshake, for diagnosis only (the gRPC connection has already been refused): what is wrong with the
   * server's identity, or undefined when it is fine or the server cannot be reached.
   */
  #probe(bundle: SpiffeBundle, signal: AbortSignal | undefined): Promise<string | undefined> {
    return new Promise((resolve) => {
      if (signal?.aborted) {
        resolve(undefined);
        return;
      }
      const host = this.address.host;
      const socket = connect({
        host,
        port: this.address.port,
        ...(isIP(host) === 0 ? { servername: host } : {}),
        ALPNProtocols: ['h2'],
        // Verified below by serverProblem, not by OpenSSL, so that its answer can be told.
        rejectUnauthorized: false,
      });
      const done = (problem: string | undefined): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        socket.destroy();
        resolve(problem);
      };
      const onAbort = (): void => done(undefined);
      const timer = setTimeout(() => done(undefined), Math.min(this.timeoutMs, 10_000));
      signal?.addEventListener('abort', onAbort, { once: true });
      socket.once('secureConnect', () =>
        done(serverProblem(peerChain(socket.getPeerCertificate(true)), bundle, this.serverId)),
      );
      socket.once('error', () => done(undefined));
    });
  }
}

/** A unary call of the session's channel, as SpireServerClient makes it. */
type UnaryCall = <Req, Res, Out>(
  definition: grpc.MethodDefinition<Req, Res>,
  request: Req,
  convert: (response: Res) => Out,
  signal: AbortSignal | undefined,
) => Promise<Out>;

class Session implements SpireSession {
  readonly #trustDomain: TrustDomain;
  readonly #agentId: SpiffeId;
  readonly #unary: UnaryCall;
  readonly close: () => void;
  #tainted: ReadonlySet<string> = new Set();

  constructor(trustDomain: TrustDomain, agentId: SpiffeId, unary: UnaryCall, close: () => void) {
    this.#trustDomain = trustDomain;
    this.#agentId = agentId;
    this.#unary = unary;
    this.close = close;
  }

  authorizedEntries(signal?: AbortSignal): Promise<SpireEntry[]> {
    // No output mask: every field (SPIRE's agent asks for fewer; the TTLs and DNS names are wanted here).
    return this.#unary(rpc.getAuthorizedEntries, {}, (r) => r.entries.map(entryOf), signal);
  }

  newX509Svids(
    requests: readonly { readonly entryId: string; readonly csr: Buffer }[],
    signal?: AbortSignal,
  ): Promise<X509SvidResult[]> {
    if (requests.length === 0) return Promise.resolve([]);
    return this.#unary(
      rpc.batchNewX509Svid,
      { params: requests.map((r) => ({ entry_id: r.entryId, csr: r.csr })) },
      (response) => {
        if (response.results.length !== requests.length) {
          throw new BadAnswer(`${requests.length} SVIDs asked for, ${response.results.length} results`);
        }
        return response.results.map((result, i): X509SvidResult => {
          const { entryId, csr } = requests[i] as { entryId: string; csr: Buffer };
          const code = result.status?.code ?? grpc.status.UNKNOWN;
          if (code !== grpc.status.OK) {
            return { entryId, error: { code, message: result.status?.message ?? 'no status' } };
          }
          return { entryId, svid: x509SvidOf(result.svid, { csr }) };
        });
      },
      signal,
    );
  }

  newJwtSvid(entryId: string, audience: readonly string[], signal?: AbortSignal): Promise<MintedJwtSvid> {
    return this.#unary(
      rpc.newJwtSvid,
      { entry_id: entryId, audience: [...audience] },
      (r) => jwtSvidOf(r.svid),
      signal,
    );
  }

  bundle(signal?: AbortSignal): Promise<SpiffeBundle> {
    return this.#unary(
      rpc.getBundle,
      {},
      (r) => {
        const bundle = bundleOf(r, this.#trustDomain);
        this.#tainted = new Set(
          r.x509_authorities.filter((a) => a.tainted).map((a) => new X509Certificate(a.asn1).fingerprint256),
        );
        return bundle;
      },
      signal,
    );
  }

  taintedX509Authorities(): ReadonlySet<string> {
    return this.#tainted;
  }

  async federatedBundle(trustDomain: string, signal?: AbortSignal): Promise<SpiffeBundle | undefined> {
    const td = TrustDomain.parse(trustDomain);
    try {
      return await this.#unary(
        rpc.getFederatedBundle,
        { trust_domain: td.name },
        (r) => bundleOf(r, td),
        signal,
      );
    } catch (err) {
      if (err instanceof SpireServerError && err.grpcCode === grpc.status.NOT_FOUND) return undefined;
      throw err;
    }
  }

  renewAgent(csr: Buffer, signal?: AbortSignal): Promise<MintedX509Svid> {
    return this.#unary(
      rpc.renewAgent,
      { params: { csr } },
      (r) => x509SvidOf(r.svid, { id: this.#agentId, csr }),
      signal,
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// CSRs

/**
 * A PKCS#10 certificate request (DER) for `privateKey`, with an empty subject, signed by the key (ECDSA with
 * SHA-256 for P-256, SHA-384 for P-384; RSASSA-PKCS1-v1_5 with SHA-256 for RSA). SPIRE takes only the public key
 * from it and, in BatchNewX509SVID, checks the signature. `publicKey` defaults to the private key's own and, when
 * given, must be it. Keys from `generateKeyPair` (WebCrypto) convert with `KeyObject.from(key)`.
 */
export async function makeCsr(privateKey: KeyObject, publicKey?: KeyObject): Promise<Buffer> {
  const derived = createPublicKey(privateKey);
  if (publicKey !== undefined && !spkiOf(publicKey).equals(spkiOf(derived)))
    throw new RangeError('makeCsr: the public key is not the private key’s');
  const signing = toSigningKey(privateKey);
  const verifying = derived.toCryptoKey(
    signing.algorithm as webcrypto.EcKeyImportParams | webcrypto.RsaHashedImportParams,
    true,
    ['verify'],
  );
  const request = await x509.Pkcs10CertificateRequestGenerator.create({
    keys: { privateKey: signing, publicKey: verifying },
    signingAlgorithm: signingAlgorithm(signing),
  });
  return Buffer.from(request.rawData);
}
