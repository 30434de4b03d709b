/**
 * The CA's state file (`ca.json` in the state directory): every CA generation that may have signed a live SVID
 * or soon will, with its keys, and the bundle's sequence number. Keys are PKCS#8 PEM, certificates PEM, times
 * ISO 8601. Decoding checks everything it can (the trust domain, each key against its certificate, the roles)
 * and throws a plain Error naming what is wrong; the CA turns that into ERR_AGENT_CA naming the file.
 */
import { createPrivateKey, createPublicKey, type KeyObject, X509Certificate } from 'node:crypto';
import { SpiffeBundle } from '../spiffe/bundle.ts';
import { TrustDomain } from '../spiffe/id.ts';
import type { CaSlot } from './ca.ts';
import { toSigningKey, x509 } from './keys.ts';

export const CA_STATE_FILE = 'ca.json';
const VERSION = 1;

export interface CaState {
  readonly trustDomain: TrustDomain;
  readonly sequence: bigint;
  readonly active: CaSlot;
  readonly next?: CaSlot;
  readonly retired: readonly CaSlot[];
  /** The bundle published from these slots: kept beside them so `bundle show` prints exactly what is served. */
  readonly bundle?: SpiffeBundle;
}

interface StoredSlot {
  generation: number;
  issuedAt: string;
  certificate: string;
  privateKey: string;
  intermediates: string[];
  roots: string[];
  jwt: { kid: string; privateKey: string };
}

interface StoredState {
  version: number;
  trustDomain: string;
  sequence: string;
  active: StoredSlot;
  next?: StoredSlot;
  retired: StoredSlot[];
  /** SPIFFE bundle JSON, as a string (written, never read back by the CA: it recomputes the bundle). */
  bundle?: string;
}

const pem = (key: KeyObject): string => key.export({ format: 'pem', type: 'pkcs8' }).toString();

function encodeSlot(slot: CaSlot): StoredSlot {
  return {
    generation: slot.generation,
    issuedAt: slot.issuedAt.toISOString(),
    certificate: slot.certificate.toString(),
    privateKey: pem(slot.privateKey),
    intermediates: slot.intermediates.map((c) => c.toString()),
    roots: slot.roots.map((c) => c.toString()),
    jwt: { kid: slot.jwtAuthority.kid, privateKey: pem(slot.jwtPrivateKey) },
  };
}

export function encodeCaState(state: CaState): string {
  const stored: StoredState = {
    version: VERSION,
    trustDomain: state.trustDomain.name,
    sequence: state.sequence.toString(),
    active: encodeSlot(state.active),
    ...(state.next ? { next: encodeSlot(state.next) } : {}),
    retired: state.retired.map(encodeSlot),
    ...(state.bundle ? { bundle: state.bundle.marshal() } : {}),
  };
  return `${JSON.stringify(stored, null, 2)}\n`;
}

function text(value: unknown, what: string): string {
  if (typeof value !== 'string' || value.length === 0) throw new Error(`${what} is missing or not a string`);
  return value;
}

function decodeSlot(value: unknown, what: string): CaSlot {
  if (typeof value !== 'object' || value === null) throw new Error(`${what} is not an object`);
  const s = value as Partial<StoredSlot>;
  const generation = s.generation;
  if (!Number.isSafeInteger(generation) || (generation as number) < 1) {
    throw new Error(`${what}.generation is not a positive integer`);
  }
  const issuedAt = new Date(text(s.issuedAt, `${what}.issuedAt`));
  if (Number.isNaN(issuedAt.getTime())) throw new Error(`${what}.issuedAt is not a date`);
  let certificate: X509Certificate;
  let privateKey: KeyObject;
  let jwtPrivateKey: KeyObject;
  try {
    certificate = new X509Certificate(text(s.certificate, `${what}.certificate`));
  } catch (err) {
    throw new Error(`${what}.certificate: ${(err as Error).message}`);
  }
  try {
    privateKey = createPrivateKey(text(s.privateKey, `${what}.privateKey`));
    jwtPrivateKey = createPrivateKey(text(s.jwt?.privateKey, `${what}.jwt.privateKey`));
  } catch (err) {
    throw new Error(`${what}: a private key cannot be read: ${(err as Error).message}`);
  }
  if (!certificate.checkPrivateKey(privateKey)) {
    throw new Error(`${what}.privateKey does not match ${what}.certificate`);
  }
  const certs = (list: unknown, name: string): X509Certificate[] => {
    if (!Array.isArray(list)) throw new Error(`${what}.${name} is not a list`);
    return list.map((c, i) => {
      try {
        return new X509Certificate(text(c, `${what}.${name}[${i}]`));
      } catch (err) {
        throw new Error(`${what}.${name}[${i}]: ${(err as Error).message}`);
      }
    });
  };
  const intermediates = certs(s.intermediates, 'intermediates');
  const roots = certs(s.roots, 'roots');
  if (roots.length === 0) throw new Error(`${what}.roots is empty`);
  return {
    generation: generation as number,
    certificate,
    notBefore: new Date(certificate.validFrom),
    notAfter: new Date(certificate.validTo),
    issuedAt,
    intermediates,
    roots,
    jwtAuthority: { kid: text(s.jwt?.kid, `${what}.jwt.kid`), publicKey: createPublicKey(jwtPrivateKey) },
    signingKey: toSigningKey(privateKey),
    peculiarCert: new x509.X509Certificate(certificate.raw),
    jwtPrivateKey,
    privateKey,
  };
}

/** Reads a state file written by `encodeCaState`, for `trustDomain`; throws naming the first problem. */
export function decodeCaState(data: string, trustDomain: TrustDomain): CaState {
  let doc: Partial<StoredState>;
  try {
    doc = JSON.parse(data) as Partial<StoredState>;
  } catch (err) {
    throw new Error(`not valid JSON: ${(err as Error).message}`);
  }
  if (typeof doc !== 'object' || doc === null) throw new Error('not a JSON object');
  if (doc.version !== VERSION)
    throw new Error(`version ${String(doc.version)} is not supported (expected ${VERSION})`);
  if (doc.trustDomain !== trustDomain.name) {
    throw new Error(
      `it holds the CA of trust domain "${String(doc.trustDomain)}", but the agent is configured for "${trustDomain.name}"`,
    );
  }
  if (typeof doc.sequence !== 'string' || !/^[0-9]{1,20}$/.test(doc.sequence)) {
    throw new Error('sequence is not a non-negative integer string');
  }
  if (!Array.isArray(doc.retired)) throw new Error('retired is not a list');
  const active = decodeSlot(doc.active, 'active');
  const next = doc.next === undefined ? undefined : decodeSlot(doc.next, 'next');
  const retired = doc.retired.map((slot, i) => decodeSlot(slot, `retired[${i}]`));
  const generations = [...retired, active, ...(next ? [next] : [])].map((s) => s.generation);
  if (generations.some((g, i) => i > 0 && g <= (generations[i - 1] as number))) {
    throw new Error(`CA generations are not in increasing order (${generations.join(', ')})`);
  }
  return { trustDomain, sequence: BigInt(doc.sequence), active, ...(next ? { next } : {}), retired };
}

/**
 * The published bundle and the trust domain of a state file, without loading any key (what `bundle show` needs).
 * Throws naming the first problem.
 */
export function readPublishedBundle(data: string): SpiffeBundle {
  let doc: Partial<StoredState>;
  try {
    doc = JSON.parse(data) as Partial<StoredState>;
  } catch (err) {
    throw new Error(`not valid JSON: ${(err as Error).message}`);
  }
  if (typeof doc !== 'object' || doc === null) throw new Error('not a JSON object');
  if (doc.version !== VERSION)
    throw new Error(`version ${String(doc.version)} is not supported (expected ${VERSION})`);
  const trustDomain = TrustDomain.parse(text(doc.trustDomain, 'trustDomain'));
  return SpiffeBundle.parse(trustDomain, text(doc.bundle, 'bundle'));
}
