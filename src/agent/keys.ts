// Must stay first: @peculiar/x509 (via tsyringe) refuses to load without a Reflect metadata polyfill.
import 'reflect-metadata';
import { type KeyObject, randomBytes, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto);

export { x509 };

/** Key types the agent can generate for its CA and its SVIDs. */
export const KEY_TYPES = ['ec-p256', 'ec-p384', 'rsa-2048', 'rsa-4096'] as const;
export type KeyType = (typeof KEY_TYPES)[number];

export function isKeyType(value: unknown): value is KeyType {
  return typeof value === 'string' && (KEY_TYPES as readonly string[]).includes(value);
}

type GenParams = webcrypto.EcKeyGenParams | webcrypto.RsaHashedKeyGenParams;

function generationParams(type: KeyType): GenParams {
  switch (type) {
    case 'ec-p256':
      return { name: 'ECDSA', namedCurve: 'P-256' };
    case 'ec-p384':
      return { name: 'ECDSA', namedCurve: 'P-384' };
    case 'rsa-2048':
    case 'rsa-4096':
      return {
        name: 'RSASSA-PKCS1-v1_5',
        modulusLength: type === 'rsa-2048' ? 2048 : 4096,
        publicExponent: new Uint8Array([1, 0, 1]),
        hash: 'SHA-256',
      };
  }
}

export async function generateKeyPair(type: KeyType): Promise<webcrypto.CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(generationParams(type), true, [
    'sign',
    'verify',
  ])) as webcrypto.CryptoKeyPair;
}

/** The WebCrypto signature algorithm a signing key uses (SHA-384 for P-384, SHA-256 otherwise). */
export function signingAlgorithm(key: webcrypto.CryptoKey): webcrypto.EcdsaParams | webcrypto.Algorithm {
  const alg = key.algorithm as webcrypto.EcKeyAlgorithm;
  if (alg.name === 'ECDSA')
    return { name: 'ECDSA', hash: alg.namedCurve === 'P-384' ? 'SHA-384' : 'SHA-256' };
  return { name: alg.name };
}

/** Imports a Node private key (from a PEM file) as a WebCrypto signing key. */
export function toSigningKey(key: KeyObject): webcrypto.CryptoKey {
  if (key.asymmetricKeyType === 'ec') {
    const curve = key.asymmetricKeyDetails?.namedCurve;
    const namedCurve = curve === 'prime256v1' ? 'P-256' : curve === 'secp384r1' ? 'P-384' : undefined;
    if (namedCurve === undefined)
      throw new RangeError(`EC curve ${curve} is not supported (use P-256 or P-384)`);
    return key.toCryptoKey({ name: 'ECDSA', namedCurve }, false, ['sign']);
  }
  if (key.asymmetricKeyType === 'rsa') {
    return key.toCryptoKey({ name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }, false, ['sign']);
  }
  throw new RangeError(
    `${key.asymmetricKeyType} keys cannot sign certificates here (use EC P-256/P-384 or RSA)`,
  );
}

/** 16 random bytes, hex, high bit cleared so the DER INTEGER is positive (RFC 5280 §4.1.2.2). */
export function randomSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0] ?? 0) & 0x7f;
  return bytes.toString('hex');
}

/** An opaque, unguessable key ID for a JWT authority. */
export function randomKid(): string {
  return randomBytes(24).toString('base64url');
}
