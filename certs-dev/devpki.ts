/**
 * Development PKI: two SPIFFE trust domains, a handful of well-formed X509-SVIDs and a rogues' gallery of
 * malformed ones, generated entirely in memory.
 *
 * DEVELOPMENT AND TESTS ONLY. Nothing here is fit for production: the CA keys are exported in the clear.
 * Tests call `makeDevPki()` directly; `generate.ts` writes the same material to disk for manual use.
 */
// Must stay first: @peculiar/x509 (via tsyringe) refuses to load without a Reflect metadata polyfill.
import 'reflect-metadata';
import { X509Certificate as NodeX509Certificate, randomBytes, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto);

export interface DevIdentity {
  /** Base file name, e.g. 'client-argocd' (files are `<file>.crt.pem`, `<file>.key.pem`). */
  readonly file: string;
  /** One sentence: what it is for / what is wrong with it. */
  readonly description: string;
  /** URI SAN it carries (the first one), if any. */
  readonly spiffeId: string | undefined;
  /** Leaf first, then intermediates (never the root), PEM concatenated. */
  readonly chainPem: string;
  /** PKCS#8 PEM. */
  readonly keyPem: string;
}

export interface DevTrustDomain {
  /** Trust domain name, e.g. 'hub.example.org'. */
  readonly name: string;
  /** Root CA certificate PEM. */
  readonly rootPem: string;
  /** Root CA private key, PKCS#8 PEM. */
  readonly rootKeyPem: string;
  /** Intermediate CA certificate PEM (only for the domain that has one). */
  readonly intermediatePem?: string;
  /** Intermediate CA private key, PKCS#8 PEM. */
  readonly intermediateKeyPem?: string;
}

export type GoodName = 'proxyServer' | 'clientArgocd' | 'clientFlux' | 'clientSpoke';
export type BadName =
  | 'leafIsCa'
  | 'twoUriSans'
  | 'noUriSan'
  | 'leafKeyCertSign'
  | 'noDigitalSignature'
  | 'expired'
  | 'notYetValid'
  | 'wrongScheme'
  | 'forgedTrustDomain'
  | 'rootPath'
  | 'leafCrlSign';

export interface DevPki {
  /** 'hub.example.org', root-only: the root signs leaves directly. */
  readonly hub: DevTrustDomain;
  /** 'spoke.example.org': root -> intermediate -> leaves. */
  readonly spoke: DevTrustDomain;
  readonly good: Readonly<Record<GoodName, DevIdentity>>;
  readonly bad: Readonly<Record<BadName, DevIdentity>>;
}

export const HUB_TRUST_DOMAIN = 'hub.example.org';
export const SPOKE_TRUST_DOMAIN = 'spoke.example.org';

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

const KEY_ALGORITHM: webcrypto.EcKeyGenParams = { name: 'ECDSA', namedCurve: 'P-256' };
const SIGNING_ALGORITHM: webcrypto.EcdsaParams = { name: 'ECDSA', hash: 'SHA-256' };
const CA_KEY_USAGE = x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign;

/** A CA able to issue certificates, plus the intermediates a leaf it signs must present. */
interface Issuer {
  readonly cert: x509.X509Certificate;
  readonly keys: webcrypto.CryptoKeyPair;
  /** Intermediates from this issuer up to (excluding) the root, issuer first. */
  readonly chain: readonly x509.X509Certificate[];
}

interface LeafSpec {
  readonly file: string;
  readonly description: string;
  readonly issuer: Issuer;
  readonly uris: readonly string[];
  readonly dnsNames?: readonly string[];
  readonly ips?: readonly string[];
  /** Subject CN; defaults to the last path segment (or host) of the first URI. */
  readonly commonName?: string;
  readonly ca?: boolean;
  readonly keyUsage?: x509.KeyUsageFlags;
  readonly notBefore: Date;
  readonly notAfter: Date;
}

/** 16 random bytes, hex, high bit cleared so the DER INTEGER is positive. */
export function randomSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0] ?? 0) & 0x7f;
  return bytes.toString('hex');
}

async function generateKeys(): Promise<webcrypto.CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(KEY_ALGORITHM, true, [
    'sign',
    'verify',
  ])) as webcrypto.CryptoKeyPair;
}

async function privateKeyPem(key: webcrypto.CryptoKey): Promise<string> {
  const pkcs8 = await webcrypto.subtle.exportKey('pkcs8', key);
  return ensureTrailingNewline(x509.PemConverter.encode(pkcs8, 'PRIVATE KEY'));
}

function certPem(cert: x509.X509Certificate): string {
  return ensureTrailingNewline(cert.toString('pem'));
}

function ensureTrailingNewline(pem: string): string {
  const normalized = pem.replace(/\r\n/g, '\n');
  return normalized.endsWith('\n') ? normalized : `${normalized}\n`;
}

function subjectKeyId(cert: x509.X509Certificate): string {
  const ski = cert.getExtension(x509.SubjectKeyIdentifierExtension);
  if (!ski) throw new Error(`issuer ${cert.subject} has no SubjectKeyIdentifier`);
  return ski.keyId;
}

function uriSan(uri: string): x509.JsonGeneralName {
  return { type: 'url', value: uri };
}

function defaultCommonName(uri: string | undefined, file: string): string {
  if (uri === undefined) return file;
  const url = new URL(uri);
  const segments = url.pathname.split('/').filter((s) => s !== '');
  return segments.at(-1) ?? url.hostname;
}

async function makeRoot(trustDomain: string, now: Date): Promise<Issuer> {
  const keys = await generateKeys();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: `CN=${trustDomain} root, O=kube-svid-proxy dev`,
    notBefore: new Date(now.getTime() - HOUR),
    notAfter: new Date(now.getTime() + 365 * DAY),
    keys,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(CA_KEY_USAGE, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      // Signing certificates may carry the trust domain ID, without a path (X509-SVID §3.2).
      new x509.SubjectAlternativeNameExtension([uriSan(`spiffe://${trustDomain}`)], false),
    ],
  });
  return { cert, keys, chain: [] };
}

async function makeIntermediate(trustDomain: string, root: Issuer, now: Date): Promise<Issuer> {
  const keys = await generateKeys();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: `CN=${trustDomain} intermediate, O=kube-svid-proxy dev`,
    issuer: root.cert.subjectName,
    notBefore: new Date(now.getTime() - HOUR),
    notAfter: new Date(now.getTime() + 30 * DAY),
    publicKey: keys.publicKey,
    signingKey: root.keys.privateKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(CA_KEY_USAGE, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      new x509.AuthorityKeyIdentifierExtension(subjectKeyId(root.cert), false),
      new x509.SubjectAlternativeNameExtension([uriSan(`spiffe://${trustDomain}`)], false),
    ],
  });
  return { cert, keys, chain: [cert, ...root.chain] };
}

async function makeLeaf(spec: LeafSpec): Promise<DevIdentity> {
  const keys = await generateKeys();
  const firstUri = spec.uris[0];
  const commonName = spec.commonName ?? defaultCommonName(firstUri, spec.file);
  const names: x509.JsonGeneralName[] = [
    ...spec.uris.map(uriSan),
    ...(spec.dnsNames ?? []).map((value): x509.JsonGeneralName => ({ type: 'dns', value })),
    ...(spec.ips ?? []).map((value): x509.JsonGeneralName => ({ type: 'ip', value })),
  ];
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: `O=SPIRE dev, CN=${commonName}`,
    issuer: spec.issuer.cert.subjectName,
    notBefore: spec.notBefore,
    notAfter: spec.notAfter,
    publicKey: keys.publicKey,
    signingKey: spec.issuer.keys.privateKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(spec.ca ?? false, undefined, true),
      new x509.KeyUsagesExtension(spec.keyUsage ?? x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([
        x509.ExtendedKeyUsage.serverAuth,
        x509.ExtendedKeyUsage.clientAuth,
      ]),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      new x509.AuthorityKeyIdentifierExtension(subjectKeyId(spec.issuer.cert), false),
      // The subject is never empty here, so the SAN need not be critical (X509-SVID §3.1).
      new x509.SubjectAlternativeNameExtension(names, false),
    ],
  });
  return {
    file: spec.file,
    description: spec.description,
    spiffeId: firstUri,
    chainPem: [cert, ...spec.issuer.chain].map(certPem).join(''),
    keyPem: await privateKeyPem(keys.privateKey),
  };
}

async function trustDomainOf(name: string, root: Issuer, intermediate?: Issuer): Promise<DevTrustDomain> {
  const base = {
    name,
    rootPem: certPem(root.cert),
    rootKeyPem: await privateKeyPem(root.keys.privateKey),
  };
  if (!intermediate) return base;
  return {
    ...base,
    intermediatePem: certPem(intermediate.cert),
    intermediateKeyPem: await privateKeyPem(intermediate.keys.privateKey),
  };
}

async function buildAll<K extends string>(specs: Record<K, LeafSpec>): Promise<Record<K, DevIdentity>> {
  const entries = await Promise.all(
    (Object.entries(specs) as [K, LeafSpec][]).map(
      async ([name, spec]) => [name, await makeLeaf(spec)] as const,
    ),
  );
  return Object.fromEntries(entries) as Record<K, DevIdentity>;
}

/**
 * Builds the whole development PKI in memory. Every validity period is relative to `options.now`
 * (default: the current time), so tests can pin the clock.
 */
export async function makeDevPki(options: { now?: Date } = {}): Promise<DevPki> {
  const now = options.now ?? new Date();
  const at = (offsetMs: number): Date => new Date(now.getTime() + offsetMs);

  const [hubRoot, spokeRoot] = await Promise.all([
    makeRoot(HUB_TRUST_DOMAIN, now),
    makeRoot(SPOKE_TRUST_DOMAIN, now),
  ]);
  const spokeIntermediate = await makeIntermediate(SPOKE_TRUST_DOMAIN, spokeRoot, now);

  const validFrom = at(-5 * MINUTE);
  const validTo = at(HOUR);
  const hubLeaf = { issuer: hubRoot, notBefore: validFrom, notAfter: validTo };
  const spokeLeaf = { issuer: spokeIntermediate, notBefore: validFrom, notAfter: validTo };
  const badId = (name: string): string => `spiffe://${HUB_TRUST_DOMAIN}/ns/bad/sa/${name}`;

  const goodSpecs: Record<GoodName, LeafSpec> = {
    proxyServer: {
      ...spokeLeaf,
      file: 'proxy-server',
      description:
        'Serving SVID of the proxy itself (spoke intermediate), with localhost/127.0.0.1 SANs for loopback tests.',
      uris: [`spiffe://${SPOKE_TRUST_DOMAIN}/kube-svid-proxy`],
      dnsNames: ['localhost'],
      ips: ['127.0.0.1'],
    },
    clientArgocd: {
      ...hubLeaf,
      file: 'client-argocd',
      description:
        'Valid hub client SVID for the Argo CD application controller, issued directly by the hub root.',
      uris: [`spiffe://${HUB_TRUST_DOMAIN}/ns/argocd/sa/argocd-application-controller`],
    },
    clientFlux: {
      ...hubLeaf,
      file: 'client-flux',
      description:
        'Valid hub client SVID for the Flux kustomize-controller, issued directly by the hub root.',
      uris: [`spiffe://${HUB_TRUST_DOMAIN}/ns/flux-system/sa/kustomize-controller`],
    },
    clientSpoke: {
      ...spokeLeaf,
      file: 'client-spoke',
      description:
        'Valid spoke client SVID issued by the spoke intermediate (tests chains with an intermediate).',
      uris: [`spiffe://${SPOKE_TRUST_DOMAIN}/ns/ops/sa/debugger`],
    },
  };

  const badSpecs: Record<BadName, LeafSpec> = {
    leafIsCa: {
      ...hubLeaf,
      file: 'bad-leaf-is-ca',
      description: 'Leaf with BasicConstraints cA=true; X509-SVID §4.1/§5.2 require cA=false on a leaf.',
      uris: [badId('leaf-is-ca')],
      ca: true,
    },
    twoUriSans: {
      ...hubLeaf,
      file: 'bad-two-uri-sans',
      description: 'Leaf with two URI SANs; X509-SVID §2/§5.2 require exactly one URI SAN.',
      uris: [badId('two-uri-sans'), badId('two-uri-sans-second')],
    },
    noUriSan: {
      ...hubLeaf,
      file: 'bad-no-uri-san',
      description: 'Leaf with only a DNS SAN and no URI SAN, hence no SPIFFE ID (X509-SVID §2).',
      uris: [],
      dnsNames: ['bad-no-uri-san.hub.example.org'],
      commonName: 'no-uri-san',
    },
    leafKeyCertSign: {
      ...hubLeaf,
      file: 'bad-leaf-key-cert-sign',
      description:
        'Leaf with KeyUsage keyCertSign (cA=false); X509-SVID §4.3/§5.2 forbid keyCertSign on a leaf.',
      uris: [badId('leaf-key-cert-sign')],
      keyUsage: x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyCertSign,
    },
    leafCrlSign: {
      ...hubLeaf,
      file: 'bad-leaf-crl-sign',
      description: 'Leaf with KeyUsage cRLSign (cA=false); X509-SVID §4.3/§5.2 forbid cRLSign on a leaf.',
      uris: [badId('leaf-crl-sign')],
      keyUsage: x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.cRLSign,
    },
    noDigitalSignature: {
      ...hubLeaf,
      file: 'bad-no-digital-signature',
      description:
        'Leaf with KeyUsage keyEncipherment only; X509-SVID §4.3 requires digitalSignature on a leaf.',
      uris: [badId('no-digital-signature')],
      keyUsage: x509.KeyUsageFlags.keyEncipherment,
    },
    expired: {
      ...hubLeaf,
      file: 'bad-expired',
      description:
        'Leaf valid from now-2h to now-1h: expired (RFC 5280 §6.1.3 path validation, X509-SVID §5.1).',
      uris: [badId('expired')],
      notBefore: at(-2 * HOUR),
      notAfter: at(-HOUR),
    },
    notYetValid: {
      ...hubLeaf,
      file: 'bad-not-yet-valid',
      description: 'Leaf valid from now+1h to now+2h: not yet valid (RFC 5280 §6.1.3, X509-SVID §5.1).',
      uris: [badId('not-yet-valid')],
      notBefore: at(HOUR),
      notAfter: at(2 * HOUR),
    },
    wrongScheme: {
      ...hubLeaf,
      file: 'bad-wrong-scheme',
      description:
        'Leaf whose only URI SAN uses the https scheme; X509-SVID §5.2 requires the spiffe scheme.',
      uris: [`https://${HUB_TRUST_DOMAIN}/ns/bad/sa/wrong-scheme`],
    },
    rootPath: {
      ...hubLeaf,
      file: 'bad-root-path',
      description:
        'Leaf carrying the bare trust domain ID; X509-SVID §3.1/§5.2 require a non-root path on a leaf.',
      uris: [`spiffe://${HUB_TRUST_DOMAIN}`],
      commonName: 'root-path',
    },
    forgedTrustDomain: {
      ...hubLeaf,
      file: 'bad-forged-trust-domain',
      description:
        'Otherwise valid leaf claiming a spoke.example.org ID but signed by the hub root; ' +
        'only spoke authorities may vouch for spoke IDs (SPIFFE-ID §3).',
      uris: [`spiffe://${SPOKE_TRUST_DOMAIN}/ns/ops/sa/debugger`],
    },
  };

  const [hub, spoke, good, bad] = await Promise.all([
    trustDomainOf(HUB_TRUST_DOMAIN, hubRoot),
    trustDomainOf(SPOKE_TRUST_DOMAIN, spokeRoot, spokeIntermediate),
    buildAll(goodSpecs),
    buildAll(badSpecs),
  ]);
  return { hub, spoke, good, bad };
}

/**
 * Renders the SPIFFE bundle (a JWK Set, SPIFFE Trust Domain and Bundle §4) for a trust domain. Only the root
 * goes in: one `x509-svid` JWK whose `x5c` holds the root's DER (X509-SVID §6.1).
 */
export function bundleJson(
  td: DevTrustDomain,
  options: { sequence?: number; refreshHint?: number } = {},
): string {
  const root = new NodeX509Certificate(td.rootPem);
  // `publicKey` is already a public KeyObject (createPublicKey() rejects KeyObjects of type 'public').
  const jwk = root.publicKey.export({ format: 'jwk' });
  if (jwk.kty !== 'EC' || typeof jwk.x !== 'string' || typeof jwk.y !== 'string') {
    throw new Error(`root of ${td.name} does not have an EC public key`);
  }
  const bundle = {
    keys: [
      {
        use: 'x509-svid',
        kty: jwk.kty,
        crv: jwk.crv,
        x: jwk.x,
        y: jwk.y,
        x5c: [root.raw.toString('base64')],
      },
    ],
    spiffe_sequence: options.sequence ?? 1,
    spiffe_refresh_hint: options.refreshHint ?? 300,
  };
  return JSON.stringify(bundle);
}
