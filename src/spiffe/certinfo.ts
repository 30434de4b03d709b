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
/**
 * CA certificates by SHA-256 fingerprint: the intermediates and roots every client presents again, in new
 * X509Certificate objects on each connection. The facts depend on the DER alone, so equal fingerprints mean
 * equal facts. Leaves are new on every rotation and are not kept.
 */
const caByFingerprint = new Map<string, CertInfo>();
const MAX_CA_FINGERPRINTS = 1024;

/** Reads (and caches per certificate) what validation needs. Throws if an extension is malformed. */
export function inspect(cert: X509Certificate): CertInfo {
  const hit = cache.get(cert);
  if (hit !== undefined) return hit;
  const fingerprint = cert.fingerprint256;
  const known = caByFingerprint.get(fingerprint);
  if (known !== undefined) {
    const info = { ...known, cert };
    cache.set(cert, info);
    return info;
  }
  const extensionsDer = findExtensions(cert.raw);
  const facts =
    (extensionsDer === undefined ? NO_EXTENSIONS : readExtensions(extensionsDer)) ??
    readExtensionsBySchema(extensionsDer as Uint8Array);
  const info: CertInfo = {
    cert,
    ...facts,
    notBefore: cert.validFromDate.getTime(),
    notAfter: cert.validToDate.getTime(),
    // Read only for signing certificates (path length, name constraints): a leaf never pays for its names.
    get selfIssued(): boolean {
      const value = cert.subject === cert.issuer;
      Object.defineProperty(this, 'selfIssued', { value, enumerable: true });
      return value;
    },
  };
  cache.set(cert, info);
  if (info.isCa) {
    if (caByFingerprint.size >= MAX_CA_FINGERPRINTS) {
      const oldest = caByFingerprint.keys().next().value;
      if (oldest !== undefined) caByFingerprint.delete(oldest);
    }
    caByFingerprint.set(fingerprint, info);
  }
  return info;
}

/** What the extensions say: the part of CertInfo that comes from the `extensions` field. */
export type ExtensionFacts = Pick<
  CertInfo,
  'uriSans' | 'dnsSans' | 'isCa' | 'pathLen' | 'keyUsage' | 'nameConstraints' | 'unhandledCritical'
>;

const NO_EXTENSIONS: ExtensionFacts = Object.freeze({
  uriSans: Object.freeze([]),
  dnsSans: Object.freeze([]),
  isCa: false,
  pathLen: undefined,
  keyUsage: undefined,
  nameConstraints: undefined,
  unhandledCritical: Object.freeze([]),
});

/**
 * The extensions read through the @peculiar ASN.1 schemas: the reference reading, for whatever
 * `readExtensions` leaves to it. Throws if an extension is malformed.
 */
export function readExtensionsBySchema(extensionsDer: Uint8Array): ExtensionFacts {
  const uriSans: string[] = [];
  const dnsSans: string[] = [];
  let isCa = false;
  let pathLen: number | undefined;
  let keyUsage: number | undefined;
  let nameConstraints: NameConstraintSet | undefined;
  const unhandledCritical: string[] = [];
  for (const ext of AsnConvert.parse(extensionsDer, Extensions)) {
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
  return { uriSans, dnsSans, isCa, pathLen, keyUsage, nameConstraints, unhandledCritical };
}

/*
 * A direct DER reading of the extensions an X509-SVID carries: about 4 µs where the schema parser takes 0.8 ms,
 * most of a full TLS handshake's CPU (bench/verify.ts). It reads only the common, canonical case: basic
 * constraints, key usage, a SAN of URIs and DNS names in printable ASCII, and extensions it may ignore (key
 * identifiers, extended key usage, any non-critical one). Anything else (name constraints, another name type,
 * an unknown critical extension, a duplicate, a non-DER encoding, trailing bytes) returns undefined and the
 * schema reads the certificate instead. So for every certificate it answers for, it gives exactly the schema's
 * facts (test/unit/spiffe/certinfo.test.ts checks this on every case it can build, and on mutations).
 */

/** The DER contents of the extension OIDs, 2.5.29.x, by their last byte. */
const OID_2_5_29 = [0x55, 0x1d] as const;
const EXT = {
  subjectKeyIdentifier: 0x0e,
  keyUsage: 0x0f,
  subjectAltName: 0x11,
  basicConstraints: 0x13,
  nameConstraints: 0x1e,
  authorityKeyIdentifier: 0x23,
  extKeyUsage: 0x25,
} as const;

/** A DER element: tag, and where its contents start and end (no long form for lengths under 128). */
interface Element {
  readonly tag: number;
  readonly start: number;
  readonly end: number;
}

/** The element at `offset`, in DER's minimal length form, ending by `limit`; undefined otherwise. */
function element(der: Uint8Array, offset: number, limit: number): Element | undefined {
  if (offset + 2 > limit) return undefined;
  const tag = der[offset] as number;
  if ((tag & 0x1f) === 0x1f) return undefined; // high tag numbers: none in what we read
  const first = der[offset + 1] as number;
  let length = first;
  let start = offset + 2;
  if (first >= 0x80) {
    const n = first & 0x7f;
    if (n === 0 || n > 3 || start + n > limit) return undefined;
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + (der[start + i] as number);
    if (der[start] === 0 || length < 0x80) return undefined; // not the minimal form
    start += n;
  }
  const end = start + length;
  return end > limit ? undefined : { tag, start, end };
}

/** A well-formed OID (non-empty, every arc ends, none starts with a padding byte). */
function isOid(der: Uint8Array, e: Element): boolean {
  if (e.tag !== 0x06 || e.end === e.start || (der[e.end - 1] as number) >= 0x80) return false;
  for (let i = e.start; i < e.end; i++) {
    const atArcStart = i === e.start || (der[i - 1] as number) < 0x80;
    if (atArcStart && der[i] === 0x80) return false;
  }
  return true;
}

/** The last byte of an id-ce OID (2.5.29.x, x < 128), or -1 for any other OID. */
function idCe(der: Uint8Array, e: Element): number {
  if (e.end - e.start !== 3 || der[e.start] !== OID_2_5_29[0] || der[e.start + 1] !== OID_2_5_29[1])
    return -1;
  const last = der[e.start + 2] as number;
  return last < 0x80 ? last : -1;
}

/** The facts, or undefined where this reader does not answer (then the schema does). */
export function readExtensions(der: Uint8Array): ExtensionFacts | undefined {
  const list = element(der, 0, der.length);
  if (list === undefined || list.tag !== 0x30 || list.end !== der.length || list.start === list.end) {
    return undefined;
  }
  const uriSans: string[] = [];
  const dnsSans: string[] = [];
  let isCa = false;
  let pathLen: number | undefined;
  let keyUsage: number | undefined;
  const seenIdCe = new Set<number>();
  const seenOther = new Set<string>();
  for (let offset = list.start; offset < list.end; ) {
    const ext = element(der, offset, list.end);
    if (ext === undefined || ext.tag !== 0x30) return undefined;
    offset = ext.end;
    const oid = element(der, ext.start, ext.end);
    if (oid === undefined || !isOid(der, oid)) return undefined;
    let next = element(der, oid.end, ext.end);
    let critical = false;
    if (next?.tag === 0x01) {
      // DER: only TRUE is ever encoded (FALSE is the default); anything else goes to the schema.
      if (next.end - next.start !== 1 || der[next.start] !== 0xff) return undefined;
      critical = true;
      next = element(der, next.end, ext.end);
    }
    if (next === undefined || next.tag !== 0x04 || next.end !== ext.end) return undefined;
    const id = idCe(der, oid);
    if (id >= 0) {
      if (seenIdCe.has(id)) return undefined;
      seenIdCe.add(id);
    } else {
      const key = String.fromCharCode(...der.subarray(oid.start, oid.end));
      if (seenOther.has(key)) return undefined;
      seenOther.add(key);
    }
    const value = { start: next.start, end: next.end };
    switch (id) {
      case EXT.basicConstraints: {
        const bc = readBasicConstraints(der, value);
        if (bc === undefined) return undefined;
        ({ isCa, pathLen } = bc);
        break;
      }
      case EXT.keyUsage:
        keyUsage = readKeyUsage(der, value);
        if (keyUsage === undefined) return undefined;
        break;
      case EXT.subjectAltName:
        if (!readSan(der, value, uriSans, dnsSans)) return undefined;
        break;
      case EXT.subjectKeyIdentifier:
      case EXT.authorityKeyIdentifier:
      case EXT.extKeyUsage:
        break; // handled: the schema reading does not look inside them either
      default:
        // Name constraints, and any critical extension we do not process: the schema's business.
        if (critical || id === EXT.nameConstraints) return undefined;
    }
  }
  return { uriSans, dnsSans, isCa, pathLen, keyUsage, nameConstraints: undefined, unhandledCritical: [] };
}

/** BasicConstraints ::= SEQUENCE { cA BOOLEAN DEFAULT FALSE, pathLenConstraint INTEGER (0..MAX) OPTIONAL } */
function readBasicConstraints(
  der: Uint8Array,
  value: { start: number; end: number },
): { isCa: boolean; pathLen: number | undefined } | undefined {
  const seq = element(der, value.start, value.end);
  if (seq === undefined || seq.tag !== 0x30 || seq.end !== value.end) return undefined;
  let isCa = false;
  let pathLen: number | undefined;
  let offset = seq.start;
  if (offset < seq.end) {
    const flag = element(der, offset, seq.end);
    if (flag?.tag === 0x01) {
      if (flag.end - flag.start !== 1 || der[flag.start] !== 0xff) return undefined;
      isCa = true;
      offset = flag.end;
    }
  }
  if (offset < seq.end) {
    // A small non-negative INTEGER in minimal form; the schema reads anything else.
    const n = element(der, offset, seq.end);
    if (n === undefined || n.tag !== 0x02 || n.end !== seq.end) return undefined;
    const length = n.end - n.start;
    const first = der[n.start] as number;
    if (length === 1 && first < 0x80) pathLen = first;
    else if (length === 2 && first === 0 && (der[n.start + 1] as number) >= 0x80) {
      pathLen = der[n.start + 1] as number;
    } else return undefined;
  }
  return { isCa, pathLen };
}

/**
 * KeyUsage ::= BIT STRING, as a number whose bit i is named bit i (digitalSignature = 1, keyCertSign = 32),
 * the way @peculiar's BitString.toNumber() counts. One or two content bytes, unused bits zero (DER).
 */
function readKeyUsage(der: Uint8Array, value: { start: number; end: number }): number | undefined {
  const bits = element(der, value.start, value.end);
  if (bits === undefined || bits.tag !== 0x03 || bits.end !== value.end) return undefined;
  const bytes = bits.end - bits.start - 1;
  const unused = der[bits.start] as number;
  if (bytes < 1 || bytes > 2 || unused > 7) return undefined;
  const last = der[bits.end - 1] as number;
  if ((last & ((1 << unused) - 1)) !== 0) return undefined;
  let n = 0;
  for (let i = 0; i < bytes * 8 - unused; i++) {
    const byte = der[bits.start + 1 + (i >> 3)] as number;
    if (byte & (0x80 >> (i & 7))) n += 2 ** i;
  }
  return n;
}

/** SubjectAltName ::= SEQUENCE OF GeneralName, here only dNSName [2] and uniformResourceIdentifier [6]. */
function readSan(
  der: Uint8Array,
  value: { start: number; end: number },
  uriSans: string[],
  dnsSans: string[],
): boolean {
  const seq = element(der, value.start, value.end);
  if (seq === undefined || seq.tag !== 0x30 || seq.end !== value.end || seq.start === seq.end) return false;
  for (let offset = seq.start; offset < seq.end; ) {
    const name = element(der, offset, seq.end);
    if (name === undefined || (name.tag !== 0x82 && name.tag !== 0x86)) return false;
    offset = name.end;
    let text = '';
    for (let i = name.start; i < name.end; i++) {
      const c = der[i] as number;
      if (c < 0x20 || c > 0x7e) return false; // IA5String beyond printable ASCII: the schema decides
      text += String.fromCharCode(c);
    }
    (name.tag === 0x86 ? uriSans : dnsSans).push(text);
  }
  return true;
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
 * walking TLV headers: only that part is read here. OpenSSL has already parsed the certificate as a whole when
 * node:crypto built the X509Certificate, and node:crypto gives the rest (validity, names, fingerprints).
 */
export function findExtensions(der: Uint8Array): Uint8Array | undefined {
  const certificate = readTlv(der, 0);
  const tbs = readTlv(der, certificate.contentStart);
  for (let offset = tbs.contentStart; offset < tbs.end; ) {
    const field = readTlv(der, offset);
    if (field.tag === 0xa3) return der.subarray(field.contentStart, field.end);
    offset = field.end;
  }
  return undefined;
}
