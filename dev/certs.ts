/**
 * Builder, for tests and benchmarks, of custom X.509 certificates (CAs and leaves) the dev PKI does not provide:
 * odd basic constraints, key usages, path lengths, name constraints, unknown critical extensions.
 * Same approach as certs-dev/devpki.ts (P-256 keys, @peculiar/x509 over node's WebCrypto).
 */
// Must stay first: @peculiar/x509 (via tsyringe) refuses to load without a Reflect metadata polyfill.
import 'reflect-metadata';
import { X509Certificate as NodeX509Certificate, webcrypto } from 'node:crypto';
import { AsnConvert } from '@peculiar/asn1-schema';
import {
  GeneralName,
  GeneralSubtree,
  GeneralSubtrees,
  id_ce_nameConstraints,
  Name,
  NameConstraints,
} from '@peculiar/asn1-x509';
import * as x509 from '@peculiar/x509';
import { randomSerial } from '../certs-dev/devpki.ts';

x509.cryptoProvider.set(webcrypto);

export const MINUTE = 60_000;
export const HOUR = 60 * MINUTE;
export const DAY = 24 * HOUR;

const KEY_ALGORITHM: webcrypto.EcKeyImportParams & webcrypto.EcKeyGenParams = {
  name: 'ECDSA',
  namedCurve: 'P-256',
};
const SIGNING_ALGORITHM: webcrypto.EcdsaParams = { name: 'ECDSA', hash: 'SHA-256' };

/** Key usage flags, re-exported so tests need not import @peculiar/x509 themselves. */
export const KeyUsage = x509.KeyUsageFlags;
export const CA_KEY_USAGE = x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign;

/** A certificate able to sign others: its @peculiar/x509 form (for names and key IDs) and its private key. */
export interface TestIssuer {
  readonly cert: x509.X509Certificate;
  readonly privateKey: webcrypto.CryptoKey;
  /** The same certificate as node's X509Certificate, what the code under test consumes. */
  readonly node: NodeX509Certificate;
}

/** A leaf certificate and its private key (PKCS#8 PEM). */
export interface TestLeaf {
  readonly node: NodeX509Certificate;
  readonly keyPem: string;
}

/** A fresh P-256 key pair (pass it as `keys` to several certificates to make them share a key). */
export async function generateKeys(): Promise<webcrypto.CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(KEY_ALGORITHM, true, [
    'sign',
    'verify',
  ])) as webcrypto.CryptoKeyPair;
}

function toNode(cert: x509.X509Certificate): NodeX509Certificate {
  return new NodeX509Certificate(Buffer.from(cert.rawData));
}

function subjectKeyId(cert: x509.X509Certificate): string | undefined {
  return cert.getExtension(x509.SubjectKeyIdentifierExtension)?.keyId;
}

/** Turns an existing CA (certificate PEM + PKCS#8 key PEM, e.g. a dev PKI root) into an issuer. */
export async function importIssuer(certPem: string, keyPem: string): Promise<TestIssuer> {
  const cert = new x509.X509Certificate(certPem);
  const privateKey = await webcrypto.subtle.importKey(
    'pkcs8',
    x509.PemConverter.decodeFirst(keyPem),
    KEY_ALGORITHM,
    true,
    ['sign'],
  );
  return { cert, privateKey, node: toNode(cert) };
}

export interface CertOptions {
  /** Subject DN, e.g. `CN=test intermediate`. Must differ from the issuer's (or it is self-issued). */
  readonly subject: string;
  /** Omitted: self-signed. */
  readonly issuer?: TestIssuer;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** BasicConstraints cA (critical). Default: true for `makeCa`, false for `makeLeaf`. */
  readonly ca?: boolean;
  readonly pathLength?: number;
  /** KeyUsage (critical); `null` leaves the extension out. */
  readonly keyUsage?: number | null;
  readonly uris?: readonly string[];
  readonly extensions?: readonly x509.Extension[];
  /** The certificate's key pair; default: a fresh one. */
  readonly keys?: webcrypto.CryptoKeyPair;
}

async function build(options: CertOptions, defaults: { ca: boolean; keyUsage: number }) {
  const keys = options.keys ?? (await generateKeys());
  const issuerCert = options.issuer?.cert;
  const authorityKeyId = issuerCert === undefined ? undefined : subjectKeyId(issuerCert);
  const keyUsage = options.keyUsage === undefined ? defaults.keyUsage : options.keyUsage;
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(options.ca ?? defaults.ca, options.pathLength, true),
    ...(keyUsage === null ? [] : [new x509.KeyUsagesExtension(keyUsage, true)]),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ...(authorityKeyId === undefined
      ? []
      : [new x509.AuthorityKeyIdentifierExtension(authorityKeyId, false)]),
    ...((options.uris ?? []).length === 0
      ? []
      : [
          new x509.SubjectAlternativeNameExtension(
            (options.uris ?? []).map((value): x509.JsonGeneralName => ({ type: 'url', value })),
            false,
          ),
        ]),
    ...(options.extensions ?? []),
  ];
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: options.subject,
    issuer: issuerCert?.subjectName ?? options.subject,
    notBefore: options.notBefore,
    notAfter: options.notAfter,
    publicKey: keys.publicKey,
    signingKey: options.issuer?.privateKey ?? keys.privateKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions,
  });
  return { cert, keys };
}

/** A CA certificate (cA=true, keyCertSign|cRLSign unless overridden), self-signed when no issuer is given. */
export async function makeCa(options: CertOptions): Promise<TestIssuer> {
  const { cert, keys } = await build(options, { ca: true, keyUsage: CA_KEY_USAGE });
  return { cert, privateKey: keys.privateKey, node: toNode(cert) };
}

/** A leaf certificate (cA=false, digitalSignature unless overridden). */
export async function makeLeaf(options: CertOptions & { readonly issuer: TestIssuer }): Promise<TestLeaf> {
  const { cert, keys } = await build(options, { ca: false, keyUsage: x509.KeyUsageFlags.digitalSignature });
  const pkcs8 = await webcrypto.subtle.exportKey('pkcs8', keys.privateKey);
  return { node: toNode(cert), keyPem: x509.PemConverter.encode(pkcs8, 'PRIVATE KEY') };
}

/** A general name for a name constraint subtree. */
export type ConstraintName = { readonly uri: string } | { readonly dns: string } | { readonly dn: string };

function generalName(name: ConstraintName): GeneralName {
  if ('uri' in name) return new GeneralName({ uniformResourceIdentifier: name.uri });
  if ('dns' in name) return new GeneralName({ dNSName: name.dns });
  return new GeneralName({ directoryName: AsnConvert.parse(new x509.Name(name.dn).toArrayBuffer(), Name) });
}

function subtrees(names: readonly ConstraintName[] | undefined): GeneralSubtrees | undefined {
  if (names === undefined || names.length === 0) return undefined;
  return new GeneralSubtrees(names.map((n) => new GeneralSubtree({ base: generalName(n) })));
}

/** A critical NameConstraints extension (RFC 5280 §4.2.1.10). */
export function nameConstraints(constraints: {
  readonly permitted?: readonly ConstraintName[];
  readonly excluded?: readonly ConstraintName[];
}): x509.Extension {
  const nc = new NameConstraints({
    permittedSubtrees: subtrees(constraints.permitted),
    excludedSubtrees: subtrees(constraints.excluded),
  });
  return new x509.Extension(id_ce_nameConstraints, true, AsnConvert.serialize(nc));
}

/** An extension of an arbitrary OID whose value is an ASN.1 NULL. */
export function opaqueExtension(oid: string, critical: boolean): x509.Extension {
  return new x509.Extension(oid, critical, new Uint8Array([0x05, 0x00]));
}
