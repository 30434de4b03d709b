/**
 * src/agent/spire/client.ts against a fake SPIRE server (grpc-js, our own .proto files, a test CA): what the client
 * sends, and how it refuses answers that do not hold together, a server that is not spiffe://<td>/spire/server,
 * a challenge it cannot answer, and the server's refusals (a ban, in AttestAgent's words and in
 * PermissionDeniedDetails). test/interop/spire-client.test.ts runs the same client against a real SPIRE server.
 */
// Must stay first: @peculiar/x509 (via tsyringe) refuses to load without a Reflect metadata polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { createPrivateKey, generateKeyPairSync, type KeyObject, type X509Certificate } from 'node:crypto';
import { after, before, beforeEach, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { DAY, HOUR, makeCa, makeLeaf, type TestIssuer } from '../../../../dev/certs.ts';
import { x509 } from '../../../../src/agent/keys.ts';
import { makeCsr, SpireServerClient, SpireServerError } from '../../../../src/agent/spire/client.ts';
import type { SpireSession } from '../../../../src/agent/spire/types.ts';
import { SpiffeBundle } from '../../../../src/spiffe/bundle.ts';
import { TrustDomain } from '../../../../src/spiffe/id.ts';

const TD = 'fake.test';
const PROTO_DIR = fileURLToPath(new URL('../../../../src/agent/spire/proto', import.meta.url));
const definitions = protoLoader.loadSync(
  [
    'spire/api/server/agent/v1/agent.proto',
    'spire/api/server/entry/v1/entry.proto',
    'spire/api/server/svid/v1/svid.proto',
    'spire/api/server/bundle/v1/bundle.proto',
  ],
  { includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const service = (name: string) => definitions[name] as grpc.ServiceDefinition;

// biome-ignore lint/suspicious/noExplicitAny: proto-loader messages are untyped here
type Message = any;
type Unary = (request: Message) => Message | grpc.ServiceError | 'hang';

/** What the fake server does; each test sets what it needs. */
interface Behaviour {
  attest: (request: Message, call: grpc.ServerDuplexStream<Message, Message>) => void;
  unary: Record<string, Unary>;
}

function spiffeId(id: string): { trust_domain: string; path: string } {
  const url = new URL(id);
  return { trust_domain: url.host, path: url.pathname };
}

// --- google.rpc.Status with a PermissionDeniedDetails, encoded by hand (protobuf wire format) ---
function varint(n: number): Buffer {
  const out: number[] = [];
  let v = n;
  do {
    out.push((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
    v = Math.floor(v / 0x80);
  } while (v > 0);
  return Buffer.from(out);
}
const field = (n: number, bytes: Buffer): Buffer =>
  Buffer.concat([varint((n << 3) | 2), varint(bytes.length), bytes]);
const varintField = (n: number, value: number): Buffer => Buffer.concat([varint(n << 3), varint(value)]);

function deniedWith(reason: number, message: string): grpc.ServiceError {
  const details = Buffer.concat([
    varintField(1, grpc.status.PERMISSION_DENIED),
    field(2, Buffer.from(message)),
    field(
      3,
      Buffer.concat([
        field(1, Buffer.from('type.googleapis.com/spire.api.types.PermissionDeniedDetails')),
        field(2, varintField(1, reason)),
      ]),
    ),
  ]);
  const metadata = new grpc.Metadata();
  metadata.set('grpc-status-details-bin', details);
  return Object.assign(new Error(message), {
    code: grpc.status.PERMISSION_DENIED,
    details: message,
    metadata,
  });
}

function statusError(code: grpc.status, message: string): grpc.ServiceError {
  return Object.assign(new Error(message), { code, details: message, metadata: new grpc.Metadata() });
}

async function startFake(
  ca: TestIssuer,
  uri: string,
  behaviour: Behaviour,
): Promise<{ port: number; server: grpc.Server }> {
  const leaf = await makeLeaf({
    subject: 'CN=fake spire server',
    issuer: ca,
    uris: [uri],
    notBefore: new Date(Date.now() - HOUR),
    notAfter: new Date(Date.now() + DAY),
  });
  const server = new grpc.Server();
  const unary =
    (name: string): grpc.handleUnaryCall<Message, Message> =>
    (call, callback) => {
      const answer = behaviour.unary[name]?.(call.request) ?? statusError(grpc.status.UNIMPLEMENTED, name);
      if (answer === 'hang') return;
      if (answer instanceof Error) callback(answer);
      else callback(null, answer);
    };
  server.addService(service('spire.api.server.agent.v1.Agent'), {
    AttestAgent: (call: grpc.ServerDuplexStream<Message, Message>) => {
      call.once('data', (request: Message) => behaviour.attest(request, call));
    },
    RenewAgent: unary('RenewAgent'),
  });
  server.addService(service('spire.api.server.entry.v1.Entry'), {
    GetAuthorizedEntries: unary('GetAuthorizedEntries'),
  });
  server.addService(service('spire.api.server.svid.v1.SVID'), {
    BatchNewX509SVID: unary('BatchNewX509SVID'),
    NewJWTSVID: unary('NewJWTSVID'),
  });
  server.addService(service('spire.api.server.bundle.v1.Bundle'), {
    GetBundle: unary('GetBundle'),
    GetFederatedBundle: unary('GetFederatedBundle'),
  });
  const credentials = grpc.ServerCredentials.createSsl(
    null,
    [{ private_key: Buffer.from(leaf.keyPem), cert_chain: Buffer.from(leaf.node.toString()) }],
    false,
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', credentials, (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { port, server };
}

function newKey(curve = 'prime256v1'): { privateKey: KeyObject; publicKey: KeyObject } {
  return generateKeyPairSync('ec', { namedCurve: curve });
}

/** An X509SVID message for `id` whose leaf carries `publicKey`, signed by `ca`; `uri` overrides the leaf's SAN. */
async function svidMessage(ca: TestIssuer, id: string, publicKey: KeyObject, uri = id): Promise<Message> {
  const leaf = await makeLeaf({
    subject: 'CN=svid',
    issuer: ca,
    uris: [uri],
    notBefore: new Date(Date.now() - HOUR),
    notAfter: new Date(Date.now() + HOUR),
    keys: {
      publicKey: publicKey.toCryptoKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['verify']),
      // Unused: the issuer signs.
      privateKey: newKey().privateKey.toCryptoKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign']),
    },
  });
  return {
    cert_chain: [leaf.node.raw],
    id: spiffeId(id),
    expires_at: String(Math.floor(leaf.node.validToDate.getTime() / 1000)),
  };
}

async function refusal(promise: Promise<unknown>, code: string): Promise<SpireServerError> {
  const err = await promise.then(
    () => assert.fail(`expected ${code}, got a result`),
    (e: unknown) => e,
  );
  assert.ok(err instanceof SpireServerError, `expected a SpireServerError, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  return err;
}

describe('SpireServerClient against a fake server', () => {
  const trustDomain = TrustDomain.parse(TD);
  const agentId = `spiffe://${TD}/spire/agent/join_token/t`;
  let ca: TestIssuer;
  let bundle: SpiffeBundle;
  let fake: { port: number; server: grpc.Server };
  let impostor: { port: number; server: grpc.Server };
  let client: SpireServerClient;
  let session: SpireSession;
  let agent: { certificates: X509Certificate[]; privateKey: KeyObject };
  const behaviour: Behaviour = { attest: () => undefined, unary: {} };

  before(async () => {
    ca = await makeCa({
      subject: 'CN=fake spire ca',
      notBefore: new Date(Date.now() - HOUR),
      notAfter: new Date(Date.now() + DAY),
    });
    bundle = new SpiffeBundle(trustDomain, { x509Authorities: [ca.node] });
    fake = await startFake(ca, `spiffe://${TD}/spire/server`, behaviour);
    impostor = await startFake(ca, `spiffe://${TD}/not/the/server`, behaviour);
    client = new SpireServerClient({
      address: { host: '127.0.0.1', port: fake.port },
      trustDomain,
      timeoutMs: 5_000,
    });
    const agentLeaf = await makeLeaf({
      subject: 'CN=agent',
      issuer: ca,
      uris: [agentId],
      notBefore: new Date(Date.now() - HOUR),
      notAfter: new Date(Date.now() + HOUR),
    });
    agent = { certificates: [agentLeaf.node], privateKey: createPrivateKey(agentLeaf.keyPem) };
    session = client.session(bundle, agent);
  });

  beforeEach(() => {
    behaviour.attest = (_request, call) =>
      call.emit('error', statusError(grpc.status.UNIMPLEMENTED, 'not set'));
    behaviour.unary = {};
  });

  after(() => {
    session?.close();
    fake?.server.forceShutdown();
    impostor?.server.forceShutdown();
  });

  it('sends join_token and k8s_psat evidence as SPIRE expects, with the CSR; accepts an SVID for the CSR key', async () => {
    const { privateKey, publicKey } = newKey();
    const csr = await makeCsr(privateKey);
    const seen: Message[] = [];
    const svid = await svidMessage(ca, agentId, publicKey);
    behaviour.attest = (request, call) => {
      seen.push(request);
      call.write({ result: { svid, reattestable: request.params.data.type === 'k8s_psat' } });
      call.end();
    };
    const joined = await client.attest(bundle, { type: 'join_token', token: 'secret-token' }, csr);
    assert.equal(joined.svid.id.toString(), agentId);
    assert.equal(joined.reattestable, false);
    const psat = await client.attest(bundle, { type: 'k8s_psat', cluster: 'c1', token: 'a.b.c' }, csr);
    assert.equal(psat.reattestable, true);

    assert.equal(seen[0].step, 'params');
    assert.equal(seen[0].params.data.type, 'join_token');
    assert.equal(Buffer.from(seen[0].params.data.payload).toString(), 'secret-token');
    assert.deepEqual(Buffer.from(seen[0].params.params.csr), csr);
    assert.equal(seen[1].params.data.type, 'k8s_psat');
    assert.deepEqual(JSON.parse(Buffer.from(seen[1].params.data.payload).toString()), {
      cluster: 'c1',
      token: 'a.b.c',
    });
  });

  it('refuses an SVID whose leaf does not name its ID, or carries another key than the CSR', async () => {
    const { privateKey, publicKey } = newKey();
    const csr = await makeCsr(privateKey);
    let svid = await svidMessage(ca, agentId, publicKey, `spiffe://${TD}/someone/else`);
    behaviour.attest = (_request, call) => {
      call.write({ result: { svid, reattestable: false } });
      call.end();
    };
    const mismatch = await refusal(
      client.attest(bundle, { type: 'join_token', token: 't' }, csr),
      'ERR_AGENT_UPSTREAM',
    );
    assert.match(mismatch.message, /its leaf names spiffe:\/\/fake\.test\/someone\/else/);
    assert.equal(mismatch.grpcCode, undefined);

    svid = await svidMessage(ca, agentId, newKey().publicKey);
    const otherKey = await refusal(
      client.attest(bundle, { type: 'join_token', token: 't' }, csr),
      'ERR_AGENT_UPSTREAM',
    );
    assert.match(otherKey.message, /does not carry the public key of the CSR/);

    svid = await svidMessage(ca, `spiffe://other.test/spire/agent/x`, publicKey);
    await refusal(client.attest(bundle, { type: 'join_token', token: 't' }, csr), 'ERR_AGENT_UPSTREAM');
  });

  it('a challenge is an attestation failure naming the attestor; the token never appears in errors', async () => {
    behaviour.attest = (_request, call) => {
      call.write({ challenge: Buffer.from('nonce') });
    };
    const err = await refusal(
      client.attest(bundle, { type: 'join_token', token: 'do-not-leak' }, await makeCsr(newKey().privateKey)),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
    assert.match(err.message, /join_token attestor has no challenge/);
    assert.ok(!err.message.includes('do-not-leak'));
  });

  it('AttestAgent: "agent is banned" is ERR_AGENT_BANNED; refused evidence ERR_AGENT_UPSTREAM_AUTH; INTERNAL ERR_AGENT_UPSTREAM', async () => {
    const csr = await makeCsr(newKey().privateKey);
    const cases: [grpc.status, string, string][] = [
      [grpc.status.PERMISSION_DENIED, 'failed to attest: agent is banned', 'ERR_AGENT_BANNED'],
      [
        grpc.status.PERMISSION_DENIED,
        'token not authenticated according to TokenReview API',
        'ERR_AGENT_UPSTREAM_AUTH',
      ],
      [grpc.status.INVALID_ARGUMENT, 'join token expired', 'ERR_AGENT_UPSTREAM_AUTH'],
      [grpc.status.FAILED_PRECONDITION, 'error getting node attestor', 'ERR_AGENT_UPSTREAM_AUTH'],
      [grpc.status.INTERNAL, 'unable to validate token with TokenReview API', 'ERR_AGENT_UPSTREAM'],
      [grpc.status.RESOURCE_EXHAUSTED, 'rate limited', 'ERR_AGENT_UPSTREAM'],
    ];
    for (const [code, message, expected] of cases) {
      behaviour.attest = (_request, call) => call.emit('error', statusError(code, message));
      const err = await refusal(client.attest(bundle, { type: 'join_token', token: 't' }, csr), expected);
      assert.equal(err.grpcCode, code);
      assert.ok(err.message.includes(message), err.message);
    }
  });

  it('a server presenting another SPIFFE ID than spiffe://<td>/spire/server is ERR_AGENT_UPSTREAM_AUTH', async () => {
    const wrong = new SpireServerClient({ address: { host: '127.0.0.1', port: impostor.port }, trustDomain });
    behaviour.attest = () => assert.fail('AttestAgent must not be reached');
    const err = await refusal(
      wrong.attest(bundle, { type: 'join_token', token: 't' }, await makeCsr(newKey().privateKey)),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
    assert.match(
      err.message,
      /presented spiffe:\/\/fake\.test\/not\/the\/server, expected spiffe:\/\/fake\.test\/spire\/server/,
    );
  });

  it('entries: federates_with normalised to names; an entry without a SPIFFE ID is an unparseable answer', async () => {
    const entry = {
      id: 'e1',
      spiffe_id: spiffeId(`spiffe://${TD}/w`),
      parent_id: spiffeId(agentId),
      selectors: [{ type: 'unix', value: 'uid:1' }],
      x509_svid_ttl: 60,
      jwt_svid_ttl: 30,
      federates_with: ['spiffe://x.test', 'y.test'],
      dns_names: ['w.test'],
      hint: 'h',
      revision_number: '12345678901234567',
      created_at: '1700000000',
      admin: true,
      downstream: false,
    };
    behaviour.unary.GetAuthorizedEntries = () => ({ entries: [entry] });
    const [got] = await session.authorizedEntries();
    assert.ok(got !== undefined);
    assert.deepEqual(got.federatesWith, ['x.test', 'y.test']);
    assert.deepEqual(got.selectors, ['unix:uid:1']);
    assert.equal(got.revisionNumber, 12345678901234567n);
    assert.equal(got.createdAt, 1700000000);
    assert.equal(got.admin, true);

    behaviour.unary.GetAuthorizedEntries = () => ({ entries: [{ ...entry, spiffe_id: null }] });
    const err = await refusal(session.authorizedEntries(), 'ERR_AGENT_UPSTREAM');
    assert.match(err.message, /spiffe_id is missing/);
  });

  it('PermissionDeniedDetails: AGENT_BANNED is ERR_AGENT_BANNED; AGENT_EXPIRED asks to reattest', async () => {
    behaviour.unary.GetAuthorizedEntries = () => deniedWith(4, 'authorization denied');
    const banned = await refusal(session.authorizedEntries(), 'ERR_AGENT_BANNED');
    assert.equal(banned.denial, 'AGENT_BANNED');
    assert.equal(banned.reattest, false);

    behaviour.unary.GetAuthorizedEntries = () => deniedWith(1, 'authorization denied');
    const expired = await refusal(session.authorizedEntries(), 'ERR_AGENT_UPSTREAM');
    assert.equal(expired.denial, 'AGENT_EXPIRED');
    assert.equal(expired.reattest, true);
    assert.equal(expired.grpcCode, grpc.status.PERMISSION_DENIED);

    behaviour.unary.GetAuthorizedEntries = () => statusError(grpc.status.PERMISSION_DENIED, 'no details');
    const plain = await refusal(session.authorizedEntries(), 'ERR_AGENT_UPSTREAM');
    assert.equal(plain.denial, undefined);
    assert.equal(plain.reattest, false);
  });

  it('refuses a batch answer of the wrong length, and a bundle of another trust domain', async () => {
    behaviour.unary.BatchNewX509SVID = () => ({ results: [] });
    await refusal(
      session.newX509Svids([{ entryId: 'e1', csr: await makeCsr(newKey().privateKey) }]),
      'ERR_AGENT_UPSTREAM',
    );
    behaviour.unary.GetBundle = () => ({
      trust_domain: 'other.test',
      x509_authorities: [{ asn1: ca.node.raw }],
      jwt_authorities: [],
      refresh_hint: '0',
      sequence_number: '1',
    });
    const err = await refusal(session.bundle(), 'ERR_AGENT_UPSTREAM');
    assert.match(err.message, /other\.test/);
  });

  it('every call has a deadline: a server that does not answer is DEADLINE_EXCEEDED', async () => {
    const impatient = new SpireServerClient({
      address: { host: '127.0.0.1', port: fake.port },
      trustDomain,
      timeoutMs: 300,
    });
    const s = impatient.session(bundle, agent);
    try {
      behaviour.unary.GetBundle = () => 'hang';
      const err = await refusal(s.bundle(), 'ERR_AGENT_UPSTREAM');
      assert.equal(err.grpcCode, grpc.status.DEADLINE_EXCEEDED);
    } finally {
      s.close();
    }
  });
});

describe('makeCsr', () => {
  for (const [label, pair] of [
    ['EC P-256', () => generateKeyPairSync('ec', { namedCurve: 'prime256v1' })],
    ['EC P-384', () => generateKeyPairSync('ec', { namedCurve: 'secp384r1' })],
    ['RSA 2048', () => generateKeyPairSync('rsa', { modulusLength: 2048 })],
  ] as const) {
    it(`${label}: a PKCS#10 request carrying the public key, signed by the private key`, async () => {
      const { privateKey, publicKey } = pair();
      const der = await makeCsr(privateKey, publicKey);
      const request = new x509.Pkcs10CertificateRequest(der);
      assert.deepEqual(
        Buffer.from(request.publicKey.rawData),
        publicKey.export({ type: 'spki', format: 'der' }),
      );
      assert.equal(await request.verify(), true);
      // The public key defaults to the private key's own.
      const derived = new x509.Pkcs10CertificateRequest(await makeCsr(privateKey));
      assert.deepEqual(Buffer.from(derived.publicKey.rawData), Buffer.from(request.publicKey.rawData));
    });
  }

  it('refuses a public key that is not the private key’s', async () => {
    await assert.rejects(makeCsr(newKey().privateKey, newKey().publicKey), RangeError);
  });
});
