/**
 * PEM as kube-svid-proxy reads it: certificates (bundle files, SVID chains) and PKCS#8 keys. Whitespace is free;
 * explanatory text may precede the first block; anything else outside the blocks is refused with the byte
 * offset, so a certificate that lost its BEGIN line is never dropped silently.
 */
import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import {
  parseCertificates,
  parsePrivateKey,
  SpiffeError,
  TrustDomain,
  X509Bundle,
  X509ErrorCode,
} from '../../../src/spiffe/index.ts';
import { decodeCertificates, decodePem, looksLikePem } from '../../../src/spiffe/pem.ts';

let pki: DevPki;
before(async () => {
  pki = await makeDevPki();
});

/** The base64 body of the first block, without its boundary lines. */
const bodyOf = (pem: string): string => pem.replace(/-----(BEGIN|END) [A-Z ]+-----/g, '').trim();

const refusedWith = (pattern: RegExp) => (err: unknown) => {
  assert.ok(err instanceof Error, String(err));
  assert.match(err.message, pattern);
  return true;
};

describe('decodePem: what may surround the blocks', () => {
  it('accepts whitespace before, between and after blocks, and CRLF line ends', () => {
    const two = `\n  ${pki.hub.rootPem}\r\n\t\n${pki.spoke.rootPem.replaceAll('\n', '\r\n')}  \n\n`;
    assert.deepEqual(
      decodeCertificates(two).map((d) => d.toString('base64')),
      parseCertificates(pki.hub.rootPem + pki.spoke.rootPem).map((c) => c.raw.toString('base64')),
    );
  });

  it("accepts explanatory text before the first block (RFC 7468 §5.2, openssl's Bag Attributes)", () => {
    const text = `Bag Attributes\n    localKeyID: 01 00 00 00\nsubject=CN = Zoë Root\nissuer=CN = Zoë Root\n${pki.hub.rootPem}`;
    assert.equal(decodeCertificates(text).length, 1);
    assert.equal(decodeCertificates(Buffer.from(text)).length, 1);
  });

  it('refuses data after the last END line, naming its byte offset', () => {
    const pem = `${pki.hub.rootPem}garbage\n`;
    const at = Buffer.byteLength(pki.hub.rootPem);
    assert.throws(
      () => decodePem(pem),
      refusedWith(new RegExp(`data after the last PEM block \\(1\\) at byte ${at};`)),
    );
    assert.throws(() => decodeCertificates(Buffer.from(pem)), refusedWith(new RegExp(`at byte ${at};`)));
  });

  it('refuses a certificate body that lost its BEGIN line after the last block (it would be dropped)', () => {
    const lost = pki.spoke.rootPem.replace('-----BEGIN CERTIFICATE-----\n', '');
    assert.throws(
      () => decodeCertificates(`${pki.hub.rootPem}\n${lost}`),
      refusedWith(/data after the last PEM block \(1\) at byte \d+/),
    );
  });

  it('refuses text between blocks, naming the blocks and the byte offset', () => {
    const between = `${pki.hub.rootPem}subject=CN = Spoke\n${pki.spoke.rootPem}`;
    const at = Buffer.byteLength(pki.hub.rootPem);
    assert.throws(
      () => decodeCertificates(between),
      refusedWith(new RegExp(`data between PEM blocks 1 and 2 at byte ${at};`)),
    );
  });

  it('counts offsets in UTF-8 bytes of the text, not in characters', () => {
    const text = `subject=CN = Zoë\n${pki.hub.rootPem}x`;
    const at = Buffer.byteLength(`subject=CN = Zoë\n${pki.hub.rootPem}`);
    assert.equal(at, text.length - 1 + 1, 'the character index of the x, plus one for the two bytes of ë');
    assert.throws(() => decodePem(text), refusedWith(new RegExp(`at byte ${at};`)));
  });

  it('refuses a boundary line before the first BEGIN line (a block that lost its BEGIN line)', () => {
    const lost = pki.spoke.rootPem.replace('-----BEGIN CERTIFICATE-----\n', '');
    assert.throws(
      () => decodeCertificates(lost + pki.hub.rootPem),
      refusedWith(/a boundary line before the first BEGIN line at byte \d+/),
    );
    assert.throws(() => decodeCertificates(lost), refusedWith(/a boundary line with no BEGIN at byte \d+/));
  });

  it('refuses binary data before the first BEGIN line', () => {
    const data = Buffer.concat([Buffer.from([0x01, 0x02, 0x00, 0x41]), Buffer.from(pki.hub.rootPem)]);
    assert.throws(() => decodeCertificates(data), refusedWith(/binary data \(control byte\) .* at byte 0/));
  });
});

describe('decodePem: the blocks themselves', () => {
  it('refuses a block without an END line, an END of another label and bad base64', () => {
    const body = bodyOf(pki.hub.rootPem);
    assert.throws(
      () => decodePem(`-----BEGIN CERTIFICATE-----\n${body}\n`),
      refusedWith(/block 1 \("CERTIFICATE"\) has no END line/),
    );
    assert.throws(
      () => decodePem(`-----BEGIN CERTIFICATE-----\n${body}\n-----END PRIVATE KEY-----\n`),
      refusedWith(/block 1 begins as "CERTIFICATE" but ends as "PRIVATE KEY"/),
    );
    assert.throws(
      () => decodePem(`-----BEGIN CERTIFICATE-----\nMIIB=AAA${body}\n-----END CERTIFICATE-----\n`),
      refusedWith(/block 1 \("CERTIFICATE"\) is not valid base64/),
    );
    assert.throws(
      () =>
        decodePem(
          `-----BEGIN CERTIFICATE-----\n${body.slice(0, 10)}!${body.slice(10)}\n-----END CERTIFICATE-----\n`,
        ),
      refusedWith(/holds a character that is not base64 at byte 38/),
    );
  });

  it('never echoes the body of a refused block', () => {
    const body = bodyOf(pki.good.clientArgocd.keyPem).replaceAll('\n', '');
    const broken = `-----BEGIN PRIVATE KEY-----\n${body}!\n-----END PRIVATE KEY-----\nrest`;
    for (const attempt of [() => decodePem(broken), () => parsePrivateKey(broken)]) {
      assert.throws(attempt, (err: Error) => {
        assert.ok(!err.message.includes(body.slice(0, 16)), err.message);
        return true;
      });
    }
  });
});

describe('PEM or DER', () => {
  it('reads bytes that start as DER as DER, even when a PEM block appears inside them', () => {
    const [hubRoot] = parseCertificates(pki.hub.rootPem);
    assert.ok(hubRoot);
    // A DER certificate followed by the text of another one: before, the embedded PEM block was read instead.
    const smuggled = Buffer.concat([hubRoot.raw, Buffer.from(pki.spoke.rootPem)]);
    assert.equal(looksLikePem(smuggled), false);
    assert.throws(() => decodeCertificates(smuggled), refusedWith(/no DER SEQUENCE at byte/));
    assert.equal(looksLikePem(Buffer.from(pki.spoke.rootPem)), true);
  });

  it('bundle files: trailing garbage refuses the bundle with ERR_BUNDLE_CERTIFICATE', () => {
    assert.throws(
      () => X509Bundle.parse(TrustDomain.parse('hub.example.org'), `${pki.hub.rootPem}trailing`),
      (err: unknown) => {
        assert.ok(err instanceof SpiffeError);
        assert.equal(err.code, 'ERR_BUNDLE_CERTIFICATE');
        assert.match(err.message, /data after the last PEM block \(1\) at byte \d+/);
        return true;
      },
    );
  });

  it('SVID chains: trailing garbage refuses the chain with ERR_X509_PARSE', () => {
    assert.throws(
      () => parseCertificates(`${pki.good.clientSpoke.chainPem}MIIBtrailing==\n`),
      (err: unknown) => err instanceof SpiffeError && err.code === X509ErrorCode.Parse,
    );
  });
});

describe('parsePrivateKey', () => {
  it('reads one PKCS#8 block, with leading text and surrounding whitespace', () => {
    const key = parsePrivateKey(`note: the proxy key\n\n${pki.good.clientSpoke.keyPem}\n\n`);
    assert.equal(key.type, 'private');
  });

  const refused: [string, () => string, RegExp][] = [
    ['trailing data', () => `${pki.good.clientSpoke.keyPem}junk`, /data after the last PEM block \(1\)/],
    [
      'a second block after the key',
      () => pki.good.clientSpoke.keyPem + pki.hub.rootPem,
      /expected one PEM block, found 2/,
    ],
    ['a certificate first', () => pki.hub.rootPem + pki.good.clientSpoke.keyPem, /found "CERTIFICATE"/],
    ['no block at all', () => 'not a key', /found "none"/],
  ];
  for (const [what, make, message] of refused) {
    it(`refuses ${what} with ERR_X509_KEY_PARSE`, () => {
      assert.throws(
        () => parsePrivateKey(make()),
        (err: unknown) => {
          assert.ok(err instanceof SpiffeError, String(err));
          assert.equal(err.code, X509ErrorCode.KeyParse);
          assert.match(err.message, message);
          return true;
        },
      );
    });
  }
});
