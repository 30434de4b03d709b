import { IdErrorCode, SpiffeError } from './errors.ts';

const SCHEME_PREFIX = 'spiffe://';
/** SPIFFE-ID §2.3: implementations must support IDs up to 2048 bytes; we accept no more. */
export const MAX_ID_BYTES = 2048;
/** SPIFFE-ID §2.3: the host component, and so the trust domain name, is at most 255 bytes. */
export const MAX_TRUST_DOMAIN_BYTES = 255;

function fail(code: IdErrorCode, message: string, input: string): never {
  // Inputs can be long and hostile: quote a bounded prefix only.
  const shown = input.length > 80 ? `${input.slice(0, 80)}…` : input;
  throw new SpiffeError(code, `${message}: ${JSON.stringify(shown)}`);
}

function isTrustDomainChar(c: number): boolean {
  return (
    (c >= 0x61 && c <= 0x7a) || // a-z
    (c >= 0x30 && c <= 0x39) || // 0-9
    c === 0x2e || // .
    c === 0x2d || // -
    c === 0x5f // _
  );
}

function isPathSegmentChar(c: number): boolean {
  return isTrustDomainChar(c) || (c >= 0x41 && c <= 0x5a); // plus A-Z
}

/** Checks a trust domain name (the authority of a SPIFFE ID) and returns it unchanged. */
function checkTrustDomainName(name: string, input: string): string {
  if (name.length === 0) fail(IdErrorCode.MissingTrustDomain, 'SPIFFE ID has no trust domain', input);
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    if (isTrustDomainChar(c)) continue;
    if (c === 0x40) fail(IdErrorCode.Userinfo, 'trust domain must not contain userinfo ("@")', input);
    if (c === 0x3a) fail(IdErrorCode.Port, 'trust domain must not contain a port (":")', input);
    if (c === 0x25) fail(IdErrorCode.PercentEncoded, 'trust domain must not be percent-encoded', input);
    if (c >= 0x41 && c <= 0x5a)
      fail(IdErrorCode.TrustDomainUppercase, 'trust domain must be lowercase', input);
    fail(IdErrorCode.TrustDomainChar, 'trust domain may contain only [a-z0-9._-]', input);
  }
  // All characters are ASCII here, so length is the byte count.
  if (name.length > MAX_TRUST_DOMAIN_BYTES) {
    fail(
      IdErrorCode.TrustDomainTooLong,
      `trust domain is longer than ${MAX_TRUST_DOMAIN_BYTES} bytes`,
      input,
    );
  }
  return name;
}

/**
 * Checks a SPIFFE ID path ('' or '/seg/seg…') against SPIFFE-ID §2.2.
 * Query and fragment markers are reported as such, since in a full ID that is what they are.
 */
function checkPath(path: string, input: string): void {
  if (path.length === 0) return;
  if (path.charCodeAt(0) !== 0x2f) fail(IdErrorCode.PathNoLeadingSlash, 'path must start with "/"', input);
  let segmentStart = 1;
  for (let i = 1; i <= path.length; i++) {
    const c = i < path.length ? path.charCodeAt(i) : 0x2f;
    if (c !== 0x2f) {
      if (isPathSegmentChar(c)) continue;
      if (c === 0x3f) fail(IdErrorCode.Query, 'SPIFFE ID must not have a query ("?")', input);
      if (c === 0x23) fail(IdErrorCode.Fragment, 'SPIFFE ID must not have a fragment ("#")', input);
      if (c === 0x25) fail(IdErrorCode.PercentEncoded, 'path must not be percent-encoded', input);
      fail(IdErrorCode.PathSegmentChar, 'path segments may contain only [a-zA-Z0-9._-]', input);
    }
    const length = i - segmentStart;
    if (length === 0) {
      if (i === path.length) fail(IdErrorCode.TrailingSlash, 'path must not end with "/"', input);
      fail(IdErrorCode.EmptySegment, 'path must not contain empty segments ("//")', input);
    }
    if (
      (length === 1 && path.charCodeAt(segmentStart) === 0x2e) ||
      (length === 2 && path.charCodeAt(segmentStart) === 0x2e && path.charCodeAt(segmentStart + 1) === 0x2e)
    ) {
      fail(IdErrorCode.DotSegment, 'path must not contain "." or ".." segments', input);
    }
    segmentStart = i + 1;
  }
}

/** A SPIFFE trust domain name, e.g. `example.org`. Immutable; compare with `equals`. */
export class TrustDomain {
  readonly name: string;

  private constructor(name: string) {
    this.name = name;
  }

  /**
   * Parses a trust domain name (`example.org`). A full SPIFFE ID (`spiffe://example.org/…`) is accepted
   * too, and yields its trust domain, since configuration files hold either form.
   */
  static parse(input: string): TrustDomain {
    if (input.startsWith(SCHEME_PREFIX)) return SpiffeId.parse(input).trustDomain;
    if (input.length === 0) fail(IdErrorCode.MissingTrustDomain, 'trust domain is empty', input);
    if (input.includes('/'))
      fail(IdErrorCode.TrustDomainChar, 'trust domain may contain only [a-z0-9._-]', input);
    return new TrustDomain(checkTrustDomainName(input, input));
  }

  /** @internal the name is already validated. */
  static fromValidated(name: string): TrustDomain {
    return new TrustDomain(name);
  }

  /** The trust domain's own SPIFFE ID, `spiffe://<name>` (root path). */
  get id(): SpiffeId {
    return SpiffeId.fromPath(this, '');
  }

  /** `spiffe://<name>`: the key of Workload API bundle maps. */
  get idString(): string {
    return SCHEME_PREFIX + this.name;
  }

  equals(other: TrustDomain): boolean {
    return this.name === other.name;
  }

  compare(other: TrustDomain): number {
    return this.name < other.name ? -1 : this.name > other.name ? 1 : 0;
  }

  toString(): string {
    return this.name;
  }

  toJSON(): string {
    return this.name;
  }
}

/** A SPIFFE ID, `spiffe://<trust domain>[/<path>]`, validated to the letter of SPIFFE-ID §2. Immutable. */
export class SpiffeId {
  readonly trustDomain: TrustDomain;
  /** '' for the trust domain's own ID, otherwise '/seg/seg…'. */
  readonly path: string;
  readonly #text: string;

  private constructor(trustDomain: TrustDomain, path: string) {
    this.trustDomain = trustDomain;
    this.path = path;
    this.#text = SCHEME_PREFIX + trustDomain.name + path;
  }

  /** Parses and validates a SPIFFE ID; throws `SpiffeError` with an `ERR_ID_*` code naming the rule broken. */
  static parse(input: string): SpiffeId {
    if (typeof input !== 'string' || input.length === 0) fail(IdErrorCode.Empty, 'SPIFFE ID is empty', '');
    if (input.length > MAX_ID_BYTES || Buffer.byteLength(input, 'utf8') > MAX_ID_BYTES) {
      fail(IdErrorCode.TooLong, `SPIFFE ID is longer than ${MAX_ID_BYTES} bytes`, input);
    }
    if (!input.startsWith(SCHEME_PREFIX)) {
      fail(IdErrorCode.WrongScheme, 'SPIFFE ID must start with "spiffe://"', input);
    }
    let end = SCHEME_PREFIX.length;
    while (end < input.length) {
      const c = input.charCodeAt(end);
      if (c === 0x2f || c === 0x3f || c === 0x23) break; // '/', '?', '#' end the authority
      end++;
    }
    const name = checkTrustDomainName(input.slice(SCHEME_PREFIX.length, end), input);
    const rest = input.slice(end);
    if (rest.startsWith('?')) fail(IdErrorCode.Query, 'SPIFFE ID must not have a query ("?")', input);
    if (rest.startsWith('#')) fail(IdErrorCode.Fragment, 'SPIFFE ID must not have a fragment ("#")', input);
    checkPath(rest, input);
    return new SpiffeId(TrustDomain.fromValidated(name), rest);
  }

  /** Builds an ID from a trust domain and a path (`''` or `/a/b`), validating the path. */
  static fromPath(trustDomain: TrustDomain, path: string): SpiffeId {
    checkPath(path, path);
    const id = new SpiffeId(trustDomain, path);
    if (Buffer.byteLength(id.#text) > MAX_ID_BYTES) {
      fail(IdErrorCode.TooLong, `SPIFFE ID is longer than ${MAX_ID_BYTES} bytes`, id.#text);
    }
    return id;
  }

  /** Builds an ID from a trust domain and path segments (`'ns', 'default'`), validating each segment. */
  static fromSegments(trustDomain: TrustDomain, ...segments: readonly string[]): SpiffeId {
    for (const s of segments) {
      if (s.length === 0) fail(IdErrorCode.EmptySegment, 'path segments must not be empty', s);
      if (s.includes('/')) fail(IdErrorCode.PathSegmentChar, 'a path segment must not contain "/"', s);
    }
    return SpiffeId.fromPath(trustDomain, segments.map((s) => `/${s}`).join(''));
  }

  /** Path segments, e.g. `['ns', 'argocd', 'sa', 'controller']`; empty for a root path. */
  get segments(): string[] {
    return this.path.length === 0 ? [] : this.path.slice(1).split('/');
  }

  /** True for `spiffe://<trust domain>` itself: such an ID names a trust domain, never a workload. */
  get isRoot(): boolean {
    return this.path.length === 0;
  }

  isMemberOf(trustDomain: TrustDomain): boolean {
    return this.trustDomain.name === trustDomain.name;
  }

  equals(other: SpiffeId): boolean {
    return this.#text === other.#text;
  }

  compare(other: SpiffeId): number {
    return this.#text < other.#text ? -1 : this.#text > other.#text ? 1 : 0;
  }

  toString(): string {
    return this.#text;
  }

  toJSON(): string {
    return this.#text;
  }
}

/** Validates a SPIFFE ID path on its own (`''` or `/a/b`); throws `SpiffeError` as `SpiffeId.parse` does. */
export function validatePath(path: string): void {
  checkPath(path, path);
}
