// Must stay first: @peculiar/x509 (used by the dev PKI and the cert helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { before, describe, it, mock } from 'node:test';
import { type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import {
  DAY,
  generateKeys,
  HOUR,
  importIssuer,
  makeCa,
  makeLeaf,
  type TestIssuer,
} from '../../../dev/certs.ts';
import {
  BundleSet,
  parseCertificates,
  SpiffeBundle,
  TrustDomain,
  verifyX509Svid,
  X509ErrorCode,
} from '../../../src/spiffe/index.ts';
import { SignatureMemory } from '../../../src/spiffe/x509svid.ts';

const NOW = new Date('2040-01-01T00:00:00Z');
const VALID = { notBefore: new Date(NOW.getTime() - HOUR), notAfter: new Date(NOW.getTime() + DAY) };

let pki: DevPki;
let spokeRoot: X509Certificate;
let hubRoot: X509Certificate;
let intermediatePem: string;
let bundles: BundleSet;

before(async () => {
  pki = await makeDevPki({ now: NOW });
  spokeRoot = new X509Certificate(pki.spoke.rootPem);
  hubRoot = new X509Certificate(pki.hub.rootPem);
  intermediatePem = pki.spoke.intermediatePem as string;
  bundles = new BundleSet([
    new SpiffeBundle(TrustDomain.parse(pki.hub.name), { x509Authorities: [hubRoot] }),
    new SpiffeBundle(TrustDomain.parse(pki.spoke.name), { x509Authorities: [spokeRoot] }),
  ]);
});

describe('SignatureMemory', () => {
  it('checks a signature once per pair of certificates, whatever objects carry them', () => {
    const memory = new SignatureMemory();
    const first = new X509Certificate(intermediatePem);
    const checks = mock.method(first, 'verify');
    assert.equal(memory.verified(first, spokeRoot), true);
    const second = new X509Certificate(intermediatePem);
    const again = mock.method(second, 'verify');
    assert.equal(memory.verified(second, new X509Certificate(pki.spoke.rootPem)), true);
    assert.equal(checks.mock.callCount() + again.mock.callCount(), 1);
  });

  it('keeps the verdict of each issuer apart: a check against one root says nothing of another', () => {
    const memory = new SignatureMemory();
    const intermediate = new X509Certificate(intermediatePem);
    assert.equal(memory.verified(intermediate, spokeRoot), true);
    assert.equal(memory.verified(intermediate, hubRoot), false);
    assert.equal(memory.verified(intermediate, spokeRoot), true);
  });

  it('forgets the oldest verdicts past its bound, and checks them again', () => {
    const memory = new SignatureMemory(1);
    const intermediate = new X509Certificate(intermediatePem);
    const checks = mock.method(intermediate, 'verify');
    memory.verified(intermediate, spokeRoot);
    memory.verified(intermediate, hubRoot);
    memory.verified(intermediate, spokeRoot);
    assert.equal(checks.mock.callCount(), 3);
  });
});

describe('verifyX509Svid with a SignatureMemory', () => {
  it('verifies a second leaf under the same intermediate without checking the intermediate again', () => {
    const memory = new SignatureMemory();
    const [leaf, intermediate] = parseCertificates(pki.good.clientSpoke.chainPem) as [
      X509Certificate,
      X509Certificate,
    ];
    verifyX509Svid([leaf, intermediate], bundles, NOW, { signatures: memory });
    const [leaf2, intermediate2] = parseCertificates(pki.good.clientSpoke.chainPem) as [
      X509Certificate,
      X509Certificate,
    ];
    const leafChecks = mock.method(leaf2, 'verify');
    const intermediateChecks = mock.method(intermediate2, 'verify');
    const { id } = verifyX509Svid([leaf2, intermediate2], bundles, NOW, { signatures: memory });
    assert.equal(id.toString(), pki.good.clientSpoke.spiffeId);
    assert.equal(intermediateChecks.mock.callCount(), 0, 'the intermediate → root link was remembered');
    assert.equal(leafChecks.mock.callCount(), 1, "the leaf's own signature is always checked");
  });

  it('refuses a leaf under a remembered intermediate when another key signed it', async () => {
    const memory = new SignatureMemory();
    const intermediate = await importIssuer(intermediatePem, pki.spoke.intermediateKeyPem as string);
    const good = await makeLeaf({
      subject: 'CN=a',
      ...VALID,
      issuer: intermediate,
      uris: ['spiffe://spoke.example.org/a'],
    });
    verifyX509Svid([good.node, intermediate.node], bundles, NOW, { signatures: memory });
    const forged = await makeLeaf({
      subject: 'CN=a',
      ...VALID,
      issuer: { ...intermediate, privateKey: (await generateKeys()).privateKey },
      uris: ['spiffe://spoke.example.org/a'],
    });
    assert.throws(
      () => verifyX509Svid([forged.node, intermediate.node], bundles, NOW, { signatures: memory }),
      (e: unknown) => (e as { code?: string }).code === X509ErrorCode.Untrusted,
    );
  });

  it('gives the same verdict with it, twice, as without it: a spoke ID under CAs of the hub', async () => {
    const hub = await importIssuer(pki.hub.rootPem, pki.hub.rootKeyPem);
    const rogues: TestIssuer[] = [];
    for (let i = 0; i < 4; i++)
      rogues.push(await makeCa({ subject: `CN=rogue ${i}`, ...VALID, issuer: hub }));
    const leaf = await makeLeaf({
      subject: 'CN=w',
      ...VALID,
      issuer: rogues[0] as TestIssuer,
      uris: ['spiffe://spoke.example.org/w'],
    });
    const chain = [leaf.node, ...rogues.map((r) => r.node)];
    const memory = new SignatureMemory();
    const codes = [undefined, memory, memory].map((signatures) => {
      try {
        verifyX509Svid(chain, bundles, NOW, signatures === undefined ? {} : { signatures });
        return 'accepted';
      } catch (e) {
        return (e as { code?: string }).code;
      }
    });
    assert.deepEqual(codes, [
      X509ErrorCode.WrongTrustDomain,
      X509ErrorCode.WrongTrustDomain,
      X509ErrorCode.WrongTrustDomain,
    ]);
  });
});
