/**
 * The proxy's Authenticator behind a REAL TLS handshake: a node:tls server with the proxy's own TLS context
 * (ServingTrust's, and server.ts's client-certificate options) calls `authenticate` on 'secureConnection', as the
 * proxy does. Clients present the dev PKI's SVIDs, its bad ones, and forgeries built against OpenSSL's own chain
 * building. Where OpenSSL, given our authorities as `ca`, would have said yes, a second server shows it.
 */
// Must stay first: @peculiar/x509 (used by the dev PKI and the cert helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { webcrypto, X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import tls, { type TLSSocket } from 'node:tls';
import * as x509 from '@peculiar/x509';
import { type BadName, type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import {
  generateKeys,
  HOUR,
  importIssuer,
  KeyUsage,
  MINUTE,
  makeCa,
  makeLeaf,
  type TestIssuer,
} from '../../../dev/certs.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import type { CompiledPolicy } from '../../../src/policy/types.ts';
import { Authenticator, type PeerIdentity, type TrustState } from '../../../src/proxy/authenticate.ts';
import type { IdentitySource } from '../../../src/proxy/source.ts';
import { ServingTrust } from '../../../src/proxy/trust.ts';
import {
  BundleSet,
  IdErrorCode,
  parseCertificates,
  parseX509Svid,
  SpiffeBundle,
  SpiffeError,
  TrustDomain,
  X509ErrorCode,
} from '../../../src/spiffe/index.ts';

x509.cryptoProvider.set(webcrypto);

const BAD_CODES: Readonly<Record<BadName, string>> = {
  leafIsCa: X509ErrorCode.LeafCa,
  twoUriSans: X509ErrorCode.MultipleUriSans,
  noUriSan: X509ErrorCode.NoUriSan,
  leafKeyCertSign: X509ErrorCode.LeafKeyCertSign,
  leafCrlSign: X509ErrorCode.LeafCrlSign,
  noDigitalSignature: X509ErrorCode.LeafNoDigitalSignature,
  expired: X509ErrorCode.Expired,
  notYetValid: X509ErrorCode.NotYetValid,
  wrongScheme: IdErrorCode.WrongScheme,
  rootPath: X509ErrorCode.LeafRootPath,
  forgedTrustDomain: X509ErrorCode.WrongTrustDomain,
};

const ARGOCD = 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller';
const EVIL = TrustDomain.parse('evil.example.org');

/** What a client presents: its chain (leaf first) and key, PEM. */
interface Presented {
  readonly chainPem: string;
  readonly keyPem: string;
}

/** What the server saw of one handshake, and what `authenticate` made of it. */
interface Outcome {
  readonly socket: TLSSocket;
  readonly identity?: PeerIdentity;
  readonly code?: string;
}

/**
 * A node:tls server with the proxy's TLS context for `bundles` (ServingTrust, accepting every trust domain given),
 * and server.ts's client-certificate options, calling the Authenticator on 'secureConnection'. With `ca`, the
 * context also carries our authorities as OpenSSL's trust store: what OpenSSL would then say is `authorized`.
 */
class Front {
  readonly authenticator = new Authenticator();
  readonly trust: TrustState;
  readonly #server: tls.Server;
  readonly #waiting: ((socket: TLSSocket) => void)[] = [];

  private constructor(server: tls.Server, trust: TrustState) {
    this.#server = server;
    this.trust = trust;
    server.on('secureConnection', (socket: TLSSocket) => this.#waiting.shift()?.(socket));
  }

  static async start(bundles: readonly SpiffeBundle[], options: { ca?: boolean } = {}): Promise<Front> {
    const serving = servingTrust(bundles);
    const trust = serving.state;
    const server = tls.createServer({
      ...serving.initialContext(),
      ...(options.ca === true ? { ca: trust.bundles.allX509Authorities().map((c) => c.toString()) } : {}),
      // As server.ts creates the listener.
      requestCert: true,
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    return new Front(server, trust);
  }

  get port(): number {
    return (this.#server.address() as AddressInfo).port;
  }

  /** One handshake by `client`; returns the server's socket once 'secureConnection' fired, and the client's. */
  async handshake(
    client: Presented,
    options: { session?: Buffer; maxVersion?: tls.SecureVersion } = {},
  ): Promise<{ server: TLSSocket; client: tls.TLSSocket; session: Promise<Buffer | undefined> }> {
    const server = new Promise<TLSSocket>((resolve) => this.#waiting.push(resolve));
    const socket = tls.connect({
      host: '127.0.0.1',
      port: this.port,
      cert: client.chainPem,
      key: client.keyPem,
      rejectUnauthorized: false,
      ...(options.session === undefined ? {} : { session: options.session }),
      ...(options.maxVersion === undefined ? {} : { maxVersion: options.maxVersion }),
    });
    socket.on('error', () => {});
    const session = new Promise<Buffer | undefined>((resolve) => {
      socket.once('session', resolve);
      socket.once('close', () => resolve(undefined));
    });
    await once(socket, 'secureConnect');
    return { server: await server, client: socket, session };
  }

  /** A handshake by `client`, authenticated against the front's trust; both ends closed after. */
  async authenticate(client: Presented): Promise<Outcome> {
    const { server, client: socket } = await this.handshake(client);
    try {
      return { socket: server, identity: this.authenticator.authenticate(server, this.trust) };
    } catch (e) {
      assert.ok(e instanceof SpiffeError, `expected a SpiffeError, got ${String(e)}`);
      return { socket: server, code: e.code };
    } finally {
      socket.destroy();
      server.destroy();
    }
  }

  async close(): Promise<void> {
    this.#server.close();
    await once(this.#server, 'close');
  }
}

/** The proxy's trust and TLS context, serving the dev proxy SVID (spoke), every given trust domain accepted. */
function servingTrust(bundles: readonly SpiffeBundle[]): ServingTrust {
  const svid = parseX509Svid(pki.good.proxyServer.chainPem, pki.good.proxyServer.keyPem);
  const set = new BundleSet(bundles);
  const source = { svid: () => svid, bundles: () => set } as unknown as IdentitySource;
  const policy = { trustDomains: bundles.map((b) => b.trustDomain.name) } as unknown as CompiledPolicy;
  return new ServingTrust({
    trustDomain: svid.id.trustDomain,
    source,
    policy: { current: policy, generation: 1 },
    logger: silentLogger(),
  });
}

function trustOf(generation: number, ...bundles: SpiffeBundle[]): TrustState {
  return { bundles: new BundleSet(bundles), generation };
}

function pemOf(...certs: X509Certificate[]): string {
  return certs.map((c) => c.toString()).join('');
}

function skidOf(cert: x509.X509Certificate): string {
  const skid = cert.getExtension(x509.SubjectKeyIdentifierExtension);
  assert.ok(skid !== null, 'certificate has a subject key identifier');
  return skid.keyId;
}

/**
 * A self-signed CA certificate that copies `of`'s subject name and subject key identifier, with a key of its own:
 * what the operator of another trust domain can put in that domain's bundle.
 */
async function mimic(of: x509.X509Certificate, trustDomain: TrustDomain): Promise<TestIssuer> {
  const keys = await generateKeys();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '0badc0ffee',
    name: of.subjectName,
    notBefore: new Date(Date.now() - HOUR),
    notAfter: new Date(Date.now() + 24 * HOUR),
    keys,
    signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(KeyUsage.keyCertSign | KeyUsage.cRLSign, true),
      new x509.SubjectKeyIdentifierExtension(skidOf(of)),
      new x509.SubjectAlternativeNameExtension([{ type: 'url', value: `spiffe://${trustDomain.name}` }]),
    ],
  });
  return { cert, privateKey: keys.privateKey, node: new X509Certificate(Buffer.from(cert.rawData)) };
}

const validNow = () => ({
  notBefore: new Date(Date.now() - 5 * MINUTE),
  notAfter: new Date(Date.now() + HOUR),
});

let pki: DevPki;
let hubRoot: X509Certificate;
let spokeRoot: X509Certificate;
let spokeIntermediate: X509Certificate;
let hub: SpiffeBundle;
let spoke: SpiffeBundle;
/** The proxy's TLS context, hub and spoke accepted. */
let front: Front;
/** The same with our authorities as OpenSSL's trust store: OpenSSL's verdict, for comparison. */
let withCa: Front;

before(async () => {
  pki = await makeDevPki();
  hubRoot = new X509Certificate(pki.hub.rootPem);
  spokeRoot = new X509Certificate(pki.spoke.rootPem);
  spokeIntermediate = new X509Certificate(pki.spoke.intermediatePem as string);
  hub = new SpiffeBundle(TrustDomain.parse(pki.hub.name), { x509Authorities: [hubRoot] });
  spoke = new SpiffeBundle(TrustDomain.parse(pki.spoke.name), { x509Authorities: [spokeRoot] });
  front = await Front.start([hub, spoke]);
  withCa = await Front.start([hub, spoke], { ca: true });
});

after(async () => {
  await front.close();
  await withCa.close();
});

/** Runs `check` on the server's socket of one handshake by `client`, connection open; closes both ends after. */
async function open(client: Presented, check: (socket: TLSSocket) => void): Promise<void> {
  const { server, client: socket } = await front.handshake(client);
  try {
    check(server);
  } finally {
    socket.destroy();
    server.destroy();
  }
}

function fingerprints(certs: readonly X509Certificate[]): string[] {
  return certs.map((c) => c.fingerprint256);
}

describe('Authenticator through a real TLS handshake: the dev PKI', () => {
  for (const name of ['clientArgocd', 'clientFlux'] as const) {
    it(`accepts the hub SVID ${name} (root → leaf), anchored at the hub root`, async () => {
      const { identity } = await front.authenticate(pki.good[name]);
      assert.ok(identity, 'authenticated');
      assert.equal(identity.id.toString(), pki.good[name].spiffeId);
      assert.equal(identity.verifiedChain.at(-1)?.fingerprint256, hubRoot.fingerprint256);
      assert.equal(identity.resumed, false);
    });
  }

  it('accepts the spoke SVID (root → intermediate → leaf), anchored at the spoke root', async () => {
    const { identity } = await front.authenticate(pki.good.clientSpoke);
    assert.ok(identity, 'authenticated');
    assert.equal(identity.id.toString(), pki.good.clientSpoke.spiffeId);
    const leaf = parseCertificates(pki.good.clientSpoke.chainPem)[0] as X509Certificate;
    assert.deepEqual(
      fingerprints(identity.verifiedChain),
      fingerprints([leaf, spokeIntermediate, spokeRoot]),
    );
  });

  it('accepts a second spoke client through the same intermediate (its signature check remembered)', async () => {
    const intermediate = await importIssuer(
      pki.spoke.intermediatePem as string,
      pki.spoke.intermediateKeyPem as string,
    );
    const leaf = await makeLeaf({
      subject: 'O=SPIRE dev, CN=second',
      ...validNow(),
      issuer: intermediate,
      uris: ['spiffe://spoke.example.org/ns/ops/sa/second'],
    });
    const { identity } = await front.authenticate({
      chainPem: pemOf(leaf.node, spokeIntermediate),
      keyPem: leaf.keyPem,
    });
    assert.equal(identity?.id.toString(), 'spiffe://spoke.example.org/ns/ops/sa/second');
    // The same leaf, signed by another key under the intermediate's name: the remembered link does not vouch.
    const impostor = await makeLeaf({
      subject: 'O=SPIRE dev, CN=second',
      ...validNow(),
      issuer: { ...intermediate, privateKey: (await generateKeys()).privateKey },
      uris: ['spiffe://spoke.example.org/ns/ops/sa/second'],
    });
    const refused = await front.authenticate({
      chainPem: pemOf(impostor.node, spokeIntermediate),
      keyPem: impostor.keyPem,
    });
    assert.equal(refused.code, X509ErrorCode.Untrusted);
  });

  for (const name of Object.keys(BAD_CODES) as BadName[]) {
    it(`refuses the bad SVID ${name} with ${BAD_CODES[name]}`, async () => {
      const { identity, code } = await front.authenticate(pki.bad[name]);
      assert.equal(identity, undefined);
      assert.equal(code, BAD_CODES[name]);
    });
  }

  it('refuses every bad SVID with the same code when OpenSSL has our authorities too', async () => {
    for (const name of Object.keys(BAD_CODES) as BadName[]) {
      assert.equal((await withCa.authenticate(pki.bad[name])).code, BAD_CODES[name], name);
    }
  });

  it('refuses the forged spoke SVID that OpenSSL accepts (the hub root signed it): the trust domain is ours to check', async () => {
    const { socket, code } = await withCa.authenticate(pki.bad.forgedTrustDomain);
    assert.equal(socket.authorized, true, 'OpenSSL verified the chain against the hub root');
    assert.equal(code, X509ErrorCode.WrongTrustDomain);
  });
});

describe('Authenticator through a real TLS handshake: authorities another trust domain controls', () => {
  it('refuses a hub ID signed by a root of another trust domain that copies the hub root name and key ID', async () => {
    const evilRoot = await mimic((await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem)).cert, EVIL);
    const forged = await makeLeaf({
      subject: 'O=SPIRE dev, CN=argocd-application-controller',
      ...validNow(),
      issuer: evilRoot,
      uris: [ARGOCD],
    });
    const client = { chainPem: pemOf(forged.node), keyPem: forged.keyPem };
    const evil = new SpiffeBundle(EVIL, { x509Authorities: [evilRoot.node] });
    // Either order of the two same-named roots, in the bundle set and in OpenSSL's store.
    for (const bundles of [
      [hub, spoke, evil],
      [evil, hub, spoke],
    ]) {
      for (const ca of [false, true]) {
        const door = await Front.start(bundles, { ca });
        try {
          assert.equal((await door.authenticate(client)).code, X509ErrorCode.WrongTrustDomain);
          const genuine = await door.authenticate(pki.good.clientArgocd);
          assert.equal(genuine.identity?.id.toString(), ARGOCD, 'the genuine hub SVID still passes');
        } finally {
          await door.close();
        }
      }
    }
  });

  it('refuses a spoke ID whose issuer OpenSSL takes from its trusted roots first (a root mimicking the spoke intermediate)', async () => {
    // OpenSSL looks for an issuer among its trusted certificates before those the client sent: the evil root,
    // named and keyed like the spoke intermediate, signs the leaf, and the client sends the genuine intermediate
    // along. OpenSSL's chain is leaf → evil root, and it says "authorized"; the chain the client presented, the
    // one Node reports, reads leaf → spoke intermediate → spoke root. Taking OpenSSL's word for the leaf's
    // signature would accept a spoke identity the spoke never issued.
    const intermediate = await importIssuer(
      pki.spoke.intermediatePem as string,
      pki.spoke.intermediateKeyPem as string,
    );
    const evilRoot = await mimic(intermediate.cert, EVIL);
    const forged = await makeLeaf({
      subject: 'O=SPIRE dev, CN=debugger',
      ...validNow(),
      issuer: evilRoot,
      uris: ['spiffe://spoke.example.org/ns/ops/sa/debugger'],
    });
    const client = { chainPem: pemOf(forged.node, spokeIntermediate), keyPem: forged.keyPem };
    const bundles = [hub, spoke, new SpiffeBundle(EVIL, { x509Authorities: [evilRoot.node] })];
    for (const ca of [false, true]) {
      const door = await Front.start(bundles, { ca });
      try {
        const { socket, code } = await door.authenticate(client);
        if (ca) assert.equal(socket.authorized, true, "OpenSSL's chain ends at the evil root");
        assert.equal(code, X509ErrorCode.WrongTrustDomain);
      } finally {
        await door.close();
      }
    }
  });

  it('refuses a hub ID whose leaf certificate another trust domain put in its own bundle', async () => {
    // A certificate in OpenSSL's store is trusted as it stands, its signature unchecked.
    const keys = await generateKeys();
    const cert = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: '0badc0de',
      name: 'O=SPIRE dev, CN=argocd-application-controller',
      ...validNow(),
      keys,
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(KeyUsage.digitalSignature, true),
        new x509.SubjectAlternativeNameExtension([{ type: 'url', value: ARGOCD }]),
      ],
    });
    const leaf = new X509Certificate(Buffer.from(cert.rawData));
    const keyPem = x509.PemConverter.encode(
      await webcrypto.subtle.exportKey('pkcs8', keys.privateKey),
      'PRIVATE KEY',
    );
    const bundles = [hub, spoke, new SpiffeBundle(EVIL, { x509Authorities: [leaf] })];
    for (const ca of [false, true]) {
      const door = await Front.start(bundles, { ca });
      try {
        const { identity, code } = await door.authenticate({ chainPem: pemOf(leaf), keyPem });
        assert.equal(identity, undefined);
        assert.equal(code, X509ErrorCode.Untrusted);
      } finally {
        await door.close();
      }
    }
  });
});

describe('Authenticator through a real TLS handshake: time, trust changes and resumption', () => {
  it('bounds a remembered verification by the leaf notAfter', async () => {
    await open(pki.good.clientArgocd, (socket) => {
      const identity = front.authenticator.authenticate(socket, front.trust);
      const leaf = parseCertificates(pki.good.clientArgocd.chainPem)[0] as X509Certificate;
      assert.equal(identity.validUntil.getTime(), leaf.validToDate.getTime());
      const later = new Date(leaf.validToDate.getTime() + 1000);
      assert.throws(
        () => front.authenticator.authenticate(socket, front.trust, later),
        (e: unknown) => e instanceof SpiffeError && e.code === X509ErrorCode.Expired,
      );
    });
  });

  it('bounds a remembered verification by an intermediate that expires before the leaf', async () => {
    const hubIssuer = await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem);
    const shortLived = await makeCa({
      subject: 'O=test, CN=short-lived hub intermediate',
      notBefore: new Date(Date.now() - HOUR),
      notAfter: new Date(Date.now() + 10 * MINUTE),
      issuer: hubIssuer,
    });
    const leaf = await makeLeaf({
      subject: 'O=test, CN=w',
      ...validNow(),
      issuer: shortLived,
      uris: [ARGOCD],
    });
    const client = { chainPem: pemOf(leaf.node, shortLived.node), keyPem: leaf.keyPem };
    await open(client, (socket) => {
      const identity = front.authenticator.authenticate(socket, front.trust);
      assert.equal(identity.validUntil.getTime(), shortLived.node.validToDate.getTime());
      assert.throws(
        () => front.authenticator.authenticate(socket, front.trust, new Date(Date.now() + 20 * MINUTE)),
        (e: unknown) => e instanceof SpiffeError && e.code === X509ErrorCode.Expired,
      );
    });
  });

  it('checks again, against the new bundles, when the trust generation changes', async () => {
    const otherHubRoot = await makeCa({ subject: 'CN=another hub root', ...validNow() });
    const rotated = trustOf(
      front.trust.generation + 100,
      new SpiffeBundle(TrustDomain.parse(pki.hub.name), { x509Authorities: [otherHubRoot.node] }),
      spoke,
    );
    await open(pki.good.clientArgocd, (socket) => {
      assert.equal(front.authenticator.authenticate(socket, front.trust).id.toString(), ARGOCD);
      assert.throws(
        () => front.authenticator.authenticate(socket, rotated),
        (e: unknown) => e instanceof SpiffeError && e.code === X509ErrorCode.Untrusted,
      );
    });
  });

  for (const maxVersion of ['TLSv1.3', 'TLSv1.2'] as const) {
    for (const client of ['clientArgocd', 'clientSpoke'] as const) {
      it(`checks a resumed ${maxVersion} session of ${client} (OpenSSL verifies nothing then) against the current bundles`, async () => {
        const first = await front.handshake(pki.good[client], { maxVersion });
        const verified = front.authenticator.authenticate(first.server, front.trust);
        assert.equal(verified.resumed, false);
        first.server.write('x'); // lets a TLS 1.3 ticket reach the client
        const session = await first.session;
        first.client.destroy();
        first.server.destroy();
        assert.ok(session, 'the client got a session to resume');

        const again = await front.handshake(pki.good[client], { session, maxVersion });
        try {
          assert.equal(again.server.isSessionReused(), true);
          const resumed = front.authenticator.authenticate(again.server, front.trust);
          assert.equal(resumed.resumed, true);
          assert.equal(resumed.id.toString(), pki.good[client].spiffeId);
          // Its intermediates come from the full handshake: a resumed session carries the leaf alone.
          assert.deepEqual(fingerprints(resumed.verifiedChain), fingerprints(verified.verifiedChain));
          // Its trust domain is no longer trusted: refused, whatever OpenSSL remembers of the session.
          const without = trustOf(front.trust.generation + 200, client === 'clientArgocd' ? spoke : hub);
          assert.throws(
            () => front.authenticator.authenticate(again.server, without),
            (e: unknown) => e instanceof SpiffeError && e.code === X509ErrorCode.NoBundle,
          );
        } finally {
          again.client.destroy();
          again.server.destroy();
        }
      });
    }
  }
});
