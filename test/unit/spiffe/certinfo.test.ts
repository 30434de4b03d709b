// Must stay first: @peculiar/x509 (used by the dev PKI and the cert helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { before, describe, it } from 'node:test';
import fc from 'fast-check';
import { type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import {
  DAY,
  HOUR,
  importIssuer,
  KeyUsage,
  makeCa,
  makeLeaf,
  nameConstraints,
  opaqueExtension,
  type TestIssuer,
} from '../../../dev/certs.ts';
import {
  type ExtensionFacts,
  findExtensions,
  inspect,
  readExtensions,
  readExtensionsBySchema,
} from '../../../src/spiffe/certinfo.ts';
import { parseCertificates } from '../../../src/spiffe/index.ts';

const NOW = new Date('2040-01-01T00:00:00Z');
const VALID = { notBefore: new Date(NOW.getTime() - HOUR), notAfter: new Date(NOW.getTime() + DAY) };

// --- DER building blocks for hand-made extension lists --------------------------------------------------------

function tlv(tag: number, ...contents: Uint8Array[]): Uint8Array {
  const body = Buffer.concat(contents);
  const n = body.length;
  const length =
    n < 0x80
      ? [n]
      : n < 0x100
        ? [0x81, n]
        : n < 0x10000
          ? [0x82, n >> 8, n & 0xff]
          : [0x83, n >> 16, (n >> 8) & 0xff, n & 0xff];
  return Buffer.concat([Buffer.from([tag, ...length]), body]);
}
const bytes = (...b: number[]): Uint8Array => Buffer.from(b);
const seq = (...c: Uint8Array[]): Uint8Array => tlv(0x30, ...c);
const TRUE = tlv(0x01, bytes(0xff));
/** id-ce OIDs (2.5.29.x). */
const oid = (last: number): Uint8Array => tlv(0x06, bytes(0x55, 0x1d, last));
const BC = 0x13;
const KU_OID = 0x0f;
const SAN = 0x11;
const EKU = 0x25;
const SKID = 0x0e;
function ext(id: Uint8Array, value: Uint8Array, critical = false): Uint8Array {
  return seq(id, ...(critical ? [TRUE] : []), tlv(0x04, value));
}
const uri = (s: string): Uint8Array => tlv(0x86, Buffer.from(s, 'latin1'));
const dns = (s: string): Uint8Array => tlv(0x82, Buffer.from(s, 'latin1'));
const ku = (unused: number, ...b: number[]): Uint8Array => tlv(0x03, bytes(unused, ...b));
const SVID_LIKE = [
  ext(oid(BC), seq(), true),
  ext(oid(KU_OID), ku(7, 0x80), true),
  ext(oid(EKU), seq(tlv(0x06, bytes(0x2b, 6, 1, 5, 5, 7, 3, 2)))),
  ext(oid(SKID), tlv(0x04, bytes(1, 2, 3))),
  ext(oid(SAN), seq(uri('spiffe://example.org/ns/a/sa/b'))),
];

/** Both readings of `der`; the direct one may decline (undefined), never disagree. */
function compare(der: Uint8Array): { direct: ExtensionFacts | undefined; schema: ExtensionFacts | Error } {
  const direct = readExtensions(der);
  let schema: ExtensionFacts | Error;
  try {
    schema = readExtensionsBySchema(der);
  } catch (e) {
    schema = e as Error;
  }
  if (direct !== undefined) {
    assert.ok(
      !(schema instanceof Error),
      `direct reading answered where the schema throws: ${String(schema)}`,
    );
    assert.deepEqual({ ...direct }, { ...schema });
  }
  return { direct, schema };
}

/** A SEQUENCE around `content` whose length takes the long form though it fits the short one. */
function nonMinimal(content: Uint8Array): Uint8Array {
  return Buffer.concat([bytes(0x30, 0x81, content.length), content]);
}

function extensionsOf(cert: X509Certificate): Uint8Array {
  const der = findExtensions(cert.raw);
  assert.ok(der !== undefined, 'certificate has extensions');
  return der;
}

/** Random byte edits of `base`: wherever the direct reading still answers, the schema must agree. */
function mutate(base: Uint8Array): void {
  let answered = 0;
  fc.assert(
    fc.property(
      fc.array(
        fc.oneof(
          fc.record({ kind: fc.constant('flip'), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
          fc.record({ kind: fc.constant('cut'), at: fc.nat(), value: fc.constant(0) }),
          fc.record({ kind: fc.constant('insert'), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
        ),
        { minLength: 1, maxLength: 3 },
      ),
      (edits) => {
        let der = Buffer.from(base);
        for (const { kind, at, value } of edits) {
          const i = at % (der.length + 1);
          if (kind === 'flip') {
            if (i < der.length) der[i] = value;
          } else if (kind === 'cut') der = der.subarray(0, i);
          else der = Buffer.concat([der.subarray(0, i), bytes(value), der.subarray(i)]);
        }
        if (compare(der).direct !== undefined) answered++;
      },
    ),
    { numRuns: 3000 },
  );
  // Most mutations break the DER; those that keep it readable (a changed letter in the URI, say) still answer.
  assert.ok(answered > 0, 'no mutation was read directly: the property tested nothing');
}

let pki: DevPki;
let hub: TestIssuer;

before(async () => {
  pki = await makeDevPki({ now: NOW });
  hub = await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem);
});

describe('readExtensions (the direct DER reading) against the schema reading', () => {
  it('gives the schema facts for every certificate of the dev PKI, and answers for all but those it leaves', () => {
    const certs = [
      ...Object.values(pki.good).flatMap((i) => parseCertificates(i.chainPem)),
      ...Object.values(pki.bad).flatMap((i) => parseCertificates(i.chainPem)),
      ...parseCertificates(pki.hub.rootPem),
      ...parseCertificates(pki.spoke.rootPem),
    ];
    const declined: string[] = [];
    for (const cert of certs) {
      const { direct } = compare(extensionsOf(cert));
      if (direct === undefined) declined.push(cert.subject.replace(/\n/g, ', '));
    }
    // The proxy's own SVID carries an IP SAN, a name type the direct reading leaves to the schema.
    assert.deepEqual(declined, ['O=SPIRE dev, CN=kube-svid-proxy']);
  });

  it('gives the schema facts for CAs with path lengths, without key usage, with many key usage bits', async () => {
    const cases = [
      await makeCa({ subject: 'CN=pathlen 0', ...VALID, pathLength: 0 }),
      await makeCa({ subject: 'CN=pathlen 200', ...VALID, pathLength: 200 }),
      await makeCa({ subject: 'CN=no ku', ...VALID, keyUsage: null }),
      await makeCa({ subject: 'CN=all ku', ...VALID, keyUsage: 0x1ff }),
      await makeCa({ subject: 'CN=uri', ...VALID, uris: ['spiffe://example.org', 'https://x.example/'] }),
    ];
    for (const ca of cases) assert.ok(compare(extensionsOf(ca.node)).direct, ca.node.subject);
  });

  it('leaves name constraints, unknown critical extensions and other name types to the schema', async () => {
    const nc = await makeCa({
      subject: 'CN=nc',
      ...VALID,
      extensions: [nameConstraints({ permitted: [{ uri: '.example.org' }] })],
    });
    const critical = await makeLeaf({
      subject: 'CN=critical',
      ...VALID,
      issuer: hub,
      uris: ['spiffe://hub.example.org/a'],
      extensions: [opaqueExtension('1.3.6.1.4.1.99999.1', true)],
    });
    for (const cert of [nc.node, critical.node]) {
      const { direct, schema } = compare(extensionsOf(cert));
      assert.equal(direct, undefined);
      assert.ok(!(schema instanceof Error));
    }
    // The same unknown extension, non-critical, is ignored by both readings.
    const plain = await makeLeaf({
      subject: 'CN=plain',
      ...VALID,
      issuer: hub,
      uris: ['spiffe://hub.example.org/a'],
      extensions: [opaqueExtension('1.3.6.1.4.1.99999.1', false)],
    });
    assert.ok(compare(extensionsOf(plain.node)).direct);
  });

  const handMade: ReadonlyArray<[string, Uint8Array, 'answers' | 'declines']> = [
    ['an SVID-like list', seq(...SVID_LIKE), 'answers'],
    ['cA TRUE and pathLen 0', seq(ext(oid(BC), seq(TRUE, tlv(0x02, bytes(0))), true)), 'answers'],
    ['pathLen 128 (two bytes)', seq(ext(oid(BC), seq(TRUE, tlv(0x02, bytes(0, 0x80))))), 'answers'],
    ['pathLen without cA', seq(ext(oid(BC), seq(tlv(0x02, bytes(3))))), 'answers'],
    ['key usage over two bytes (decipherOnly)', seq(ext(oid(KU_OID), ku(7, 0x86, 0x80))), 'answers'],
    ['key usage with no unused bits', seq(ext(oid(KU_OID), ku(0, 0xff))), 'answers'],
    ['a DNS SAN next to a URI', seq(ext(oid(SAN), seq(dns('a.example'), uri('spiffe://a/b')))), 'answers'],
    [
      'critical BOOLEAN encoded as 0x01',
      seq(seq(oid(BC), tlv(0x01, bytes(1)), tlv(0x04, seq()))),
      'declines',
    ],
    [
      'critical FALSE encoded explicitly',
      seq(seq(oid(BC), tlv(0x01, bytes(0)), tlv(0x04, seq()))),
      'declines',
    ],
    ['cA BOOLEAN encoded as 0x01', seq(ext(oid(BC), seq(tlv(0x01, bytes(1))))), 'declines'],
    ['a negative pathLen', seq(ext(oid(BC), seq(TRUE, tlv(0x02, bytes(0xff))))), 'declines'],
    ['a non-minimal pathLen', seq(ext(oid(BC), seq(TRUE, tlv(0x02, bytes(0, 1))))), 'declines'],
    ['bytes after basicConstraints', seq(ext(oid(BC), Buffer.concat([seq(TRUE), bytes(0)]))), 'declines'],
    ['a duplicate extension', seq(ext(oid(KU_OID), ku(7, 0x80)), ext(oid(KU_OID), ku(2, 0x04))), 'declines'],
    ['key usage with an unused bit set', seq(ext(oid(KU_OID), ku(7, 0x81))), 'declines'],
    ['key usage without bits', seq(ext(oid(KU_OID), ku(0))), 'declines'],
    ['an empty SAN', seq(ext(oid(SAN), seq())), 'declines'],
    ['a URI beyond printable ASCII', seq(ext(oid(SAN), seq(tlv(0x86, bytes(0x73, 0xe9))))), 'declines'],
    ['an IP SAN', seq(ext(oid(SAN), seq(tlv(0x87, bytes(127, 0, 0, 1))))), 'declines'],
    ['a constructed URI', seq(ext(oid(SAN), seq(tlv(0xa6, tlv(0x16, bytes(0x61)))))), 'declines'],
    ['an empty extension list', seq(), 'declines'],
    ['bytes after the extension list', Buffer.concat([seq(...SVID_LIKE), bytes(0)]), 'declines'],
    ['a non-minimal length', nonMinimal(ext(oid(SKID), tlv(0x04, bytes(1)))), 'declines'],
    ['an OID arc padded with 0x80', seq(ext(tlv(0x06, bytes(0x55, 0x80, 0x1d, 0x13)), seq())), 'declines'],
    ['an OID that does not end', seq(ext(tlv(0x06, bytes(0x55, 0x1d, 0x93)), seq())), 'declines'],
  ];
  for (const [what, der, expected] of handMade) {
    it(`${expected === 'answers' ? 'answers with the schema facts' : 'declines'} for ${what}`, () => {
      const { direct } = compare(der);
      assert.equal(direct !== undefined, expected === 'answers');
    });
  }

  it('never disagrees with the schema on mutated SVID and CA extensions (flipped, cut and inserted bytes)', () => {
    for (const cert of parseCertificates(pki.good.clientSpoke.chainPem)) {
      mutate(extensionsOf(cert));
    }
  });

  it('never disagrees with the schema on generated extension lists', () => {
    type Generated =
      | { k: 'bc'; ca: boolean; len: number | null; crit: boolean }
      | { k: 'ku'; unused: number; b: number[]; crit: boolean }
      | { k: 'san'; names: [number, string][]; crit: boolean }
      | { k: 'other'; last: number; crit: boolean };
    const arbExt: fc.Arbitrary<Generated> = fc.oneof(
      fc.record({
        k: fc.constant('bc' as const),
        ca: fc.boolean(),
        len: fc.option(fc.nat(300)),
        crit: fc.boolean(),
      }),
      fc.record({
        k: fc.constant('ku' as const),
        unused: fc.nat(7),
        b: fc.array(fc.nat(255), { maxLength: 3 }),
        crit: fc.boolean(),
      }),
      fc.record({
        k: fc.constant('san' as const),
        names: fc.array(fc.tuple(fc.constantFrom(0x82, 0x86, 0x81, 0x87), fc.string({ maxLength: 12 })), {
          maxLength: 3,
        }),
        crit: fc.boolean(),
      }),
      fc.record({
        k: fc.constant('other' as const),
        last: fc.constantFrom(EKU, SKID, 0x23, 0x20, 0x1e),
        crit: fc.boolean(),
      }),
    );
    const encode = (e: Generated): Uint8Array => {
      switch (e.k) {
        case 'bc': {
          const len = e.len;
          const int =
            len === null ? [] : len < 0x80 ? [len] : len < 0x100 ? [0, len] : [len >> 8, len & 0xff];
          return ext(
            oid(BC),
            seq(...(e.ca ? [TRUE] : []), ...(len === null ? [] : [tlv(0x02, bytes(...int))])),
            e.crit,
          );
        }
        case 'ku':
          return ext(oid(KU_OID), ku(e.unused, ...e.b), e.crit);
        case 'san':
          return ext(
            oid(SAN),
            seq(...e.names.map(([tag, text]) => tlv(tag, Buffer.from(text, 'utf8')))),
            e.crit,
          );
        default:
          return ext(oid(e.last), tlv(0x04, bytes(1, 2)), e.crit);
      }
    };
    let answered = 0;
    fc.assert(
      fc.property(fc.array(arbExt, { minLength: 1, maxLength: 5 }), (exts) => {
        if (compare(seq(...exts.map(encode))).direct !== undefined) answered++;
      }),
      { numRuns: 2000 },
    );
    assert.ok(answered > 100, `only ${answered} generated lists were read directly`);
  });
});

describe('inspect', () => {
  it('gives a second object of the same CA certificate the same facts, and its own certificate', () => {
    const pem = pki.spoke.intermediatePem as string;
    const first = new X509Certificate(pem);
    const second = new X509Certificate(pem);
    const a = inspect(first);
    const b = inspect(second);
    assert.equal(a.cert, first);
    assert.equal(b.cert, second);
    assert.deepEqual({ ...a, cert: undefined }, { ...b, cert: undefined });
    assert.equal(b.isCa, true);
    assert.equal(b.pathLen, 0);
    assert.equal(b.selfIssued, false);
  });

  it('says a self-issued certificate is self-issued, and a leaf is not', () => {
    const root = inspect(new X509Certificate(pki.hub.rootPem));
    const leaf = inspect(parseCertificates(pki.good.clientArgocd.chainPem)[0] as X509Certificate);
    assert.equal(root.selfIssued, true);
    assert.equal(leaf.selfIssued, false);
    assert.deepEqual(leaf.uriSans, [pki.good.clientArgocd.spiffeId]);
    assert.equal(leaf.keyUsage, KeyUsage.digitalSignature);
  });

  it('reads a leaf whose key usage the schema numbers as it does (keyEncipherment only)', () => {
    const leaf = inspect(parseCertificates(pki.bad.noDigitalSignature.chainPem)[0] as X509Certificate);
    assert.equal(leaf.keyUsage, KeyUsage.keyEncipherment);
  });
});
