// The crypto floor under an mTLS handshake, from `openssl speed`: what the primitives cost on this machine with
// the system's OpenSSL, whatever the server around them does.
import { spawnSync } from 'node:child_process';

export interface CryptoFloor {
  readonly command: string;
  readonly openssl: string | undefined;
  readonly ecdsaP256SignUs: number;
  readonly ecdsaP256VerifyUs: number;
  readonly ecdhP256Us: number;
  readonly x25519Us: number;
  /**
   * Server side of a full TLS 1.3 mTLS handshake with P-256 certificates and an X25519 key share, counting the
   * primitives only: one signature (CertificateVerify), two verifications (the client's CertificateVerify and
   * its leaf's signature by the hub root), two X25519 operations (key generation, shared secret).
   */
  readonly fullHandshakeUs: number;
  /** A resumed handshake (psk_dhe_ke): the two X25519 operations. */
  readonly resumedHandshakeUs: number;
}

export function cryptoFloor(seconds: number): CryptoFloor | { readonly error: string } {
  const args = ['speed', '-seconds', String(seconds), 'ecdsap256', 'ecdhp256', 'ecdhx25519'];
  const run = spawnSync('openssl', args, { encoding: 'utf8' });
  if (run.error !== undefined || run.status !== 0) {
    return { error: `openssl ${args.join(' ')}: ${run.error?.message ?? run.stderr.trim()}` };
  }
  const out = run.stdout;
  const ecdsa = /ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)/.exec(out);
  const ecdh = /ecdh \(nistp256\)\s+\S+\s+([\d.]+)/.exec(out);
  const x25519 = /ecdh \(X25519\)\s+\S+\s+([\d.]+)/.exec(out);
  if (ecdsa === null || ecdh === null || x25519 === null) {
    return { error: `openssl speed: unexpected output:\n${out}` };
  }
  const us = (perSecond: string | undefined): number => 1_000_000 / Number(perSecond);
  const sign = us(ecdsa[1]);
  const verify = us(ecdsa[2]);
  const x = us(x25519[1]);
  const version = spawnSync('openssl', ['version'], { encoding: 'utf8' }).stdout?.trim();
  return {
    command: `openssl ${args.join(' ')}`,
    openssl: version,
    ecdsaP256SignUs: sign,
    ecdsaP256VerifyUs: verify,
    ecdhP256Us: us(ecdh[1]),
    x25519Us: x,
    fullHandshakeUs: sign + 2 * verify + 2 * x,
    resumedHandshakeUs: 2 * x,
  };
}
