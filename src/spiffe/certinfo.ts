import type { X509Certificate } from 'node:crypto';
import { AsnConvert } from '@peculiar/asn1-schema';
import {
  BasicConstraints,
  Extensions,
  type GeneralName,
  id_ce_authorityKeyIdentifier,
  id_ce_basicConstraints,
  id_ce_extKeyUsage,
  id_ce_keyUsage,
  id_ce_nameConstraints,
  id_ce_subjectAltName,
  id_ce_subjectKeyIdentifier,
  KeyUsage,
  NameConstraints,
  SubjectAlternativeName,
} from '@peculiar/asn1-x509';
import { readTlv } from './der.ts';

/** RFC 5280 key usage bits, as @peculiar/asn1-x509 numbers them. */
export const KU = {
  digitalSignature: 1,
  keyCertSign: 32,
  cRLSign: 64,
} as const;

/** Name constraints we can evaluate (URI and DNS); anything else makes `unsupported` non-empty. */
export interface NameConstraintSet {
  readonly permittedUri: readonly string[];
  readonly excludedUri: readonly string[];
  readonly permittedDns: readonly string[];
  readonly excludedDns: readonly string[];
  readonly unsupported: readonly string[];
}

/** The facts about one certificate that SVID validation needs, read once. */
export interface CertInfo {
  readonly cert: X509Certificate;
  readonly uriSans: readonly string[];
  readonly dnsSans: readonly string[];
  readonly isCa: boolean;
  readonly pathLen: number | undefined;
  /** Key usage bits, or undefined when the extension is absent. */
  readonly keyUsage: number | undefined;
  readonly nameConstraints: NameConstraintSet | undefined;
  /** OIDs of critical extensions this validator does not process (RFC 5280 §4.2: must reject). */
  readonly unhandledCritical: readonly string[];
  readonly notBefore: number;
  readonly notAfter: number;
  readonly selfIssued: boolean;
}

const HANDLED: ReadonlySet<string> = new Set([
  id_ce_basicConstraints,
  id_ce_keyUsage,
  id_ce_subjectAltName,
  id_ce_extKeyUsage,
  id_ce_subjectKeyIdentifier,
  id_ce_authorityKeyIdentifier,
  id_ce_nameConstraints,
]);

const cache = new WeakMap<X509Certificate, CertInfo>();

/** Reads (and caches per certificate object) what validation needs. Throws if an extension is malformed. */
export function inspect(cert: X509Certificate): CertInfo {
  const hit = cache.get(cert);
  if (hit !== undefined) return hit;
  const extensionsDer = findExtensions(cert.raw);
  const uriSans: string[] = [];
  const dnsSans: string[] = [];
  let isCa = false;
  let pathLen: number | undefined;
  let keyUsage: number | undefined;
  let nameConstraints: NameConstraintSet | undefined;
  const unhandledCritical: string[] = [];
  const extensions = extensionsDer === undefined ? [] : AsnConvert.parse(extensionsDer, Extensions);
  for (const ext of extensions) {
    const value = ext.extnValue.buffer;
    switch (ext.extnID) {
      case id_ce_basicConstraints: {
        const bc = AsnConvert.parse(value, BasicConstraints);
        isCa = bc.cA;
        pathLen = bc.pathLenConstraint;
        break;
      }
      case id_ce_keyUsage:
        keyUsage = AsnConvert.parse(value, KeyUsage).toNumber();
        break;
      case id_ce_subjectAltName:
        for (const name of AsnConvert.parse(value, SubjectAlternativeName)) {
          if (name.uniformResourceIdentifier !== undefined) uriSans.push(name.uniformResourceIdentifier);
          if (name.dNSName !== undefined) dnsSans.push(name.dNSName);
        }
        break;
      case id_ce_nameConstraints:
        nameConstraints = readNameConstraints(AsnConvert.parse(value, NameConstraints));
        break;
      default:
        if (ext.critical && !HANDLED.has(ext.extnID)) unhandledCritical.push(ext.extnID);
    }
  }
  const info: CertInfo = {
    cert,
    uriSans,
    dnsSans,
    isCa,
    pathLen,
    keyUsage,
    nameConstraints,
    unhandledCritical,
    notBefore: cert.validFromDate.getTime(),
    notAfter: cert.validToDate.getTime(),
    selfIssued: cert.subject === cert.issuer,
  };
  cache.set(cert, info);
  return info;
}

function readNameConstraints(nc: NameConstraints): NameConstraintSet {
  const set = {
    permittedUri: [] as string[],
    excludedUri: [] as string[],
    permittedDns: [] as string[],
    excludedDns: [] as string[],
    unsupported: [] as string[],
  };
  const read = (
    subtrees: Iterable<{ base: GeneralName }> | undefined,
    uri: string[],
    dns: string[],
  ): void => {
    for (const { base } of subtrees ?? []) {
      if (base.uniformResourceIdentifier !== undefined)
        uri.push(base.uniformResourceIdentifier.toLowerCase());
      else if (base.dNSName !== undefined) dns.push(base.dNSName.toLowerCase());
      else set.unsupported.push(Object.keys(base).find((k) => (base as never)[k] !== undefined) ?? 'unknown');
    }
  };
  read(nc.permittedSubtrees, set.permittedUri, set.permittedDns);
  read(nc.excludedSubtrees, set.excludedUri, set.excludedDns);
  return set;
}

/** RFC 5280 §4.2.1.10 host matching: `.example.org` matches subdomains only; `example.org` that host only. */
function uriHostMatches(host: string, constraint: string): boolean {
  if (constraint.startsWith('.')) return host.endsWith(constraint);
  return host === constraint;
}

/** RFC 5280 §4.2.1.10 DNS matching: the name itself or any name below it (label boundaries respected). */
function dnsMatches(name: string, constraint: string): boolean {
  const c = constraint.startsWith('.') ? constraint.slice(1) : constraint;
  if (c.length === 0) return true;
  const n = name.toLowerCase();
  return n === c || n.endsWith(`.${c}`);
}

/** Returns why `subject`'s names break `nc`, or undefined when they satisfy it. */
export function nameConstraintViolation(nc: NameConstraintSet, subject: CertInfo): string | undefined {
  if (nc.unsupported.length > 0) return `unsupported name constraint type(s): ${nc.unsupported.join(', ')}`;
  for (const uri of subject.uriSans) {
    const host = uriHost(uri);
    if (host === undefined)
      return `URI SAN ${JSON.stringify(uri)} has no host to check against name constraints`;
    if (nc.excludedUri.some((c) => uriHostMatches(host, c))) return `URI SAN host "${host}" is excluded`;
    if (nc.permittedUri.length > 0 && !nc.permittedUri.some((c) => uriHostMatches(host, c))) {
      return `URI SAN host "${host}" is not within the permitted URI subtrees`;
    }
  }
  for (const dns of subject.dnsSans) {
    if (nc.excludedDns.some((c) => dnsMatches(dns, c))) return `DNS SAN "${dns}" is excluded`;
    if (nc.permittedDns.length > 0 && !nc.permittedDns.some((c) => dnsMatches(dns, c))) {
      return `DNS SAN "${dns}" is not within the permitted DNS subtrees`;
    }
  }
  return undefined;
}

function uriHost(uri: string): string | undefined {
  const m = /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\/(?:[^@/?#]*@)?([^:/?#]+)/.exec(uri);
  return m?.[1]?.toLowerCase();
}

/**
 * The DER of a certificate's `extensions` (RFC 5280 §4.1: the [3] EXPLICIT field of TBSCertificate), found by
 * walking TLV headers, so only that part goes through the (slow) ASN.1 schema parser. OpenSSL has already
 * parsed the certificate as a whole when node:crypto built the X509Certificate.
 */
function findExtensions(der: Uint8Array): Uint8Array | undefined {
  const certificate = readTlv(der, 0);
  const tbs = readTlv(der, certificate.contentStart);
  for (let offset = tbs.contentStart; offset < tbs.end; ) {
    const field = readTlv(der, offset);
    if (field.tag === 0xa3) return der.subarray(field.contentStart, field.end);
    offset = field.end;
  }
  return undefined;
}
