/** One DER tag-length-value header: where its content starts and where it ends. */
export interface Tlv {
  readonly tag: number;
  readonly contentStart: number;
  readonly end: number;
}

/** Reads the TLV header at `offset` (definite lengths up to 4 bytes); throws on truncation. */
export function readTlv(der: Uint8Array, offset: number): Tlv {
  if (offset + 2 > der.length) throw new Error('truncated DER');
  const tag = der[offset] as number;
  const first = der[offset + 1] as number;
  let length = first;
  let contentStart = offset + 2;
  if (first >= 0x80) {
    const n = first & 0x7f;
    if (n === 0 || n > 4 || contentStart + n > der.length) throw new Error('bad DER length');
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + (der[contentStart + i] as number);
    contentStart += n;
  }
  const end = contentStart + length;
  if (end > der.length) throw new Error('truncated DER');
  return { tag, contentStart, end };
}
