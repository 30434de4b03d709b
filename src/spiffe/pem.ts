import { readTlv } from './der.ts';

/**
 * Splits PEM (any number of CERTIFICATE blocks; any other block type is an error, so a key pasted into a
 * bundle file is noticed) or DER (one or several concatenated certificates) into DER certificates.
 */
export function decodeCertificates(data: string | Uint8Array): Buffer[] {
  const blocks = pemOrUndefined(data);
  if (blocks === undefined) return splitDer(Buffer.from(data as Uint8Array));
  if (blocks.length === 0) throw new Error('no PEM CERTIFICATE block found');
  return blocks.map(({ label, der }, i) => {
    if (label !== 'CERTIFICATE') throw new Error(`PEM block ${i + 1} is "${label}", expected CERTIFICATE`);
    return der;
  });
}

/** The PEM blocks of `data`, or undefined when `data` is bytes that are DER rather than PEM. */
export function pemOrUndefined(data: string | Uint8Array): { label: string; der: Buffer }[] | undefined {
  if (typeof data === 'string') return decodePem(data);
  if (!looksLikePem(data)) return undefined;
  // latin1 maps each byte to one character, so a character index is a byte offset.
  return decodePemText(Buffer.from(data).toString('latin1'), (i) => i);
}

/**
 * RFC 7468 textual encoding, read strictly: labelled base64 blocks separated by whitespace only.
 *
 * Explanatory text is allowed before the first BEGIN line, as RFC 7468 §2 permits and as OpenSSL writes it
 * (`subject=…`, `Bag Attributes`), provided it is text and holds no boundary fragment (`-----`): a stray END line
 * there means a block lost its BEGIN line. Anything else that is not whitespace, between blocks or after the
 * last END line, is refused: it is most often a certificate that lost its BEGIN line, and a bundle that silently
 * drops one of its authorities is worse than one that is refused. Offsets in errors are bytes of the UTF-8 text.
 */
export function decodePem(text: string): { label: string; der: Buffer }[] {
  return decodePemText(text, (i) => Buffer.byteLength(text.slice(0, i), 'utf8'));
}

const BEGIN = /-----BEGIN ([A-Z0-9 ]+)-----/y;
const BODY_AND_END = /([A-Za-z0-9+/=\s]*)-----END ([A-Z0-9 ]+)-----/y;
const WHITESPACE = /\s*/y;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function decodePemText(text: string, byteAt: (index: number) => number): { label: string; der: Buffer }[] {
  const first = text.indexOf('-----BEGIN ');
  if (first === -1) {
    const stray = text.indexOf('-----');
    if (stray !== -1)
      throw new Error(`malformed PEM: a boundary line with no BEGIN at byte ${byteAt(stray)}`);
    return [];
  }
  const preamble = text.slice(0, first);
  const control = controlIndex(preamble);
  if (control !== -1) {
    throw new Error(
      `malformed PEM: binary data (control byte) before the first PEM block at byte ${byteAt(control)}`,
    );
  }
  const stray = preamble.indexOf('-----');
  if (stray !== -1) {
    throw new Error(
      `malformed PEM: a boundary line before the first BEGIN line at byte ${byteAt(stray)} (a block without its BEGIN line?)`,
    );
  }

  const blocks: { label: string; der: Buffer }[] = [];
  let pos = first;
  for (;;) {
    const n = blocks.length + 1;
    BEGIN.lastIndex = pos;
    const begin = BEGIN.exec(text);
    if (begin === null) throw new Error(`malformed PEM: bad BEGIN line of block ${n} at byte ${byteAt(pos)}`);
    const label = begin[1] as string;
    BODY_AND_END.lastIndex = BEGIN.lastIndex;
    const end = BODY_AND_END.exec(text);
    if (end === null) throw new Error(bodyProblem(text, BEGIN.lastIndex, n, label, byteAt));
    if (end[2] !== label) {
      throw new Error(
        `malformed PEM: block ${n} begins as "${label}" but ends as "${end[2]}" at byte ${byteAt(BEGIN.lastIndex + (end[1] as string).length)}`,
      );
    }
    // Never echo the body: it may be a private key.
    const body = (end[1] as string).replace(/\s+/g, '');
    if (body.length === 0 || !BASE64.test(body)) {
      throw new Error(`malformed PEM: block ${n} ("${label}") is not valid base64`);
    }
    blocks.push({ label, der: Buffer.from(body, 'base64') });
    WHITESPACE.lastIndex = BODY_AND_END.lastIndex;
    WHITESPACE.exec(text);
    pos = WHITESPACE.lastIndex;
    if (pos === text.length) return blocks;
    if (!text.startsWith('-----BEGIN ', pos)) {
      const where = text.includes('-----BEGIN ', pos)
        ? `between PEM blocks ${n} and ${n + 1}`
        : `after the last PEM block (${n})`;
      throw new Error(
        `malformed PEM: data ${where} at byte ${byteAt(pos)}; only whitespace may follow a block's END line`,
      );
    }
  }
}

/** Index of the first C0 control character other than tab, LF and CR, or DEL: binary data, not text. */
function controlIndex(text: string): number {
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if ((c < 0x20 && c !== 0x09 && c !== 0x0a && c !== 0x0d) || c === 0x7f) return i;
  }
  return -1;
}

/** Why the body of the block whose BEGIN line ends at `start` did not reach a matching END line. */
function bodyProblem(
  text: string,
  start: number,
  n: number,
  label: string,
  byteAt: (index: number) => number,
): string {
  const bad = /[^A-Za-z0-9+/=\s]/g;
  bad.lastIndex = start;
  const found = bad.exec(text);
  if (found === null || !text.includes('-----END ', start)) {
    return `malformed PEM: block ${n} ("${label}") has no END line`;
  }
  if (text.startsWith('-----', found.index)) {
    return `malformed PEM: block ${n} ("${label}") has a bad boundary line at byte ${byteAt(found.index)}`;
  }
  return `malformed PEM: block ${n} ("${label}") holds a character that is not base64 at byte ${byteAt(found.index)}`;
}

/**
 * True when `data` is PEM text rather than DER. DER certificates and keys start with a SEQUENCE tag and a
 * long-form length (0x30 0x81..0x84), which no text does; a DER certificate that merely contains the text of a
 * BEGIN line somewhere inside is still DER.
 */
export function looksLikePem(data: Uint8Array): boolean {
  const second = data[1] ?? 0;
  if (data[0] === 0x30 && second >= 0x81 && second <= 0x84) return false;
  return Buffer.from(data).toString('latin1').includes('-----BEGIN ');
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
