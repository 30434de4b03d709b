import { readTlv } from './der.ts';

/**
 * Splits PEM (any number of CERTIFICATE blocks; any other block type is an error, so a key pasted into a
 * bundle file is noticed) or DER (one or several concatenated certificates) into DER certificates.
 */
export function decodeCertificates(data: string | Uint8Array): Buffer[] {
  const text =
    typeof data === 'string' ? data : looksLikePem(data) ? Buffer.from(data).toString('latin1') : null;
  if (text === null) return splitDer(Buffer.from(data as Uint8Array));
  const blocks = decodePem(text);
  if (blocks.length === 0) throw new Error('no PEM CERTIFICATE block found');
  return blocks.map(({ label, der }, i) => {
    if (label !== 'CERTIFICATE') throw new Error(`PEM block ${i + 1} is "${label}", expected CERTIFICATE`);
    return der;
  });
}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----([A-Za-z0-9+/=\s]*?)-----END \1-----/g;

/** RFC 7468 textual encoding: labelled base64 blocks; text between blocks is ignored, as OpenSSL does. */
export function decodePem(text: string): { label: string; der: Buffer }[] {
  const blocks = [...text.matchAll(PEM_BLOCK)].map((m) => ({
    label: m[1] as string,
    der: Buffer.from((m[2] as string).replace(/\s+/g, ''), 'base64'),
  }));
  const begins = text.match(/-----BEGIN /g)?.length ?? 0;
  if (begins !== blocks.length)
    throw new Error('malformed PEM: a BEGIN line has no matching END or bad base64');
  return blocks;
}

/** True when the first 4 KiB of `data` hold a PEM BEGIN line. */
export function looksLikePem(data: Uint8Array): boolean {
  return Buffer.from(data.subarray(0, 4096)).toString('latin1').includes('-----BEGIN ');
}

/** Splits concatenated DER SEQUENCEs by their outer length (the Workload API sends chains this way). */
function splitDer(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let offset = 0; offset < buf.length; ) {
    const tlv = readTlv(buf, offset);
    if (tlv.tag !== 0x30) throw new Error(`no DER SEQUENCE at byte ${offset}`);
    out.push(buf.subarray(offset, tlv.end));
    offset = tlv.end;
  }
  if (out.length === 0) throw new Error('no certificate found');
  return out;
}
