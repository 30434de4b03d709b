// Cost of authenticating one peer chain with verifyX509Svid, against the bare signature checks it contains
// (node:crypto X509Certificate.verify over the same chain), measured in the same run.
// Run: node bench/verify.ts [iterations]
import { X509Certificate } from 'node:crypto';
import { cpus } from 'node:os';
import { makeDevPki } from '../certs-dev/devpki.ts';
import {
  BundleSet,
  parseCertificates,
  SpiffeBundle,
  TrustDomain,
  verifyX509Svid,
} from '../src/spiffe/index.ts';

const iterations = Number(process.argv[2] ?? 2000);
const pki = await makeDevPki();
const bundles = new BundleSet([
  new SpiffeBundle(TrustDomain.parse('hub.example.org'), {
    x509Authorities: parseCertificates(pki.hub.rootPem),
  }),
  new SpiffeBundle(TrustDomain.parse('spoke.example.org'), {
    x509Authorities: parseCertificates(pki.spoke.rootPem),
  }),
]);
const root = parseCertificates(pki.spoke.rootPem)[0] as X509Certificate;
const ders = parseCertificates(pki.good.clientSpoke.chainPem).map((c) => c.raw);

function time(label: string, fn: () => void): number {
  for (let i = 0; i < 200; i++) fn(); // warm up
  const start = process.hrtime.bigint();
  for (let i = 0; i < iterations; i++) fn();
  const us = Number(process.hrtime.bigint() - start) / 1000 / iterations;
  process.stdout.write(`${label.padEnd(58)} ${us.toFixed(1).padStart(8)} µs/op\n`);
  return us;
}

process.stdout.write(
  `node ${process.version}, ${cpus()[0]?.model ?? 'cpu'} x${cpus().length}, ${iterations} iterations\n`,
);
process.stdout.write('chain: leaf -> spoke intermediate -> spoke root (ECDSA P-256)\n');
// Fresh X509Certificate objects each time: a new peer, nothing cached.
const bare = time('baseline: parse chain + 2 signature checks (node:crypto)', () => {
  const [leaf, inter] = ders.map((d) => new X509Certificate(d)) as [X509Certificate, X509Certificate];
  if (!leaf.verify(inter.publicKey) || !inter.verify(root.publicKey)) throw new Error('bad chain');
});
const full = time('verifyX509Svid, new peer (parse + SPIFFE rules + path)', () => {
  verifyX509Svid(
    ders.map((d) => new X509Certificate(d)),
    bundles,
  );
});
const parsed = ders.map((d) => new X509Certificate(d));
const warm = time('verifyX509Svid, same certificate objects (extensions cached)', () => {
  verifyX509Svid(parsed, bundles);
});
process.stdout.write(
  `ratio new peer / baseline: ${(full / bare).toFixed(2)}x; cached / baseline: ${(warm / bare).toFixed(2)}x\n`,
);
