/**
 * Byte-exact HTTP clients for attack tests, and a witness listener. Node's own HTTP clients normalise what they
 * send (and refuse much of it), so a request line that is meant to probe the proxy's parser is written raw over
 * TLS; HTTP/2 goes through node:http2 with `:path` as given, latin1, so every byte is the one meant.
 */
import http2 from 'node:http2';
import net, { type AddressInfo } from 'node:net';
import tls from 'node:tls';

/** What a client needs to reach the proxy with an SVID. */
export interface SvidClient {
  readonly port: number;
  /** PEM roots that verify the proxy's serving SVID. */
  readonly ca: string;
  readonly cert: string;
  readonly key: string;
}

export interface RawAnswer {
  /** Every byte received before the connection closed (or the safety deadline passed). */
  readonly raw: Buffer;
  /** The status of the first response line; 0 when nothing parsable arrived. */
  readonly status: number;
  readonly head: string;
  /** The body, de-chunked when the answer was chunked. */
  readonly body: string;
  /** The connection was still open at the deadline (then it was destroyed). */
  readonly timedOut: boolean;
}

function tlsOptions(client: SvidClient, alpn: string[]): tls.ConnectionOptions {
  return {
    host: '127.0.0.1',
    port: client.port,
    servername: 'localhost',
    ca: client.ca,
    cert: client.cert,
    key: client.key,
    ALPNProtocols: alpn,
  };
}

function dechunk(body: Buffer): Buffer {
  const parts: Buffer[] = [];
  let at = 0;
  for (;;) {
    const eol = body.indexOf('\r\n', at);
    if (eol < 0) break;
    const size = Number.parseInt(body.subarray(at, eol).toString('latin1'), 16);
    if (!Number.isFinite(size) || size === 0) break;
    parts.push(body.subarray(eol + 2, eol + 2 + size));
    at = eol + 2 + size + 2;
  }
  return Buffer.concat(parts);
}

/** Splits one HTTP/1.1 response (the first in `raw`) into status, head and body. */
export function parseHttp1Answer(raw: Buffer, timedOut = false): RawAnswer {
  const end = raw.indexOf('\r\n\r\n');
  const head = (end < 0 ? raw : raw.subarray(0, end)).toString('latin1');
  const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(head)?.[1] ?? 0);
  let body = end < 0 ? Buffer.alloc(0) : raw.subarray(end + 4);
  if (/\r\ntransfer-encoding:\s*chunked/i.test(head)) body = dechunk(body);
  return { raw, status, head, body: body.toString('utf8'), timedOut };
}

/**
 * Sends `request` byte for byte over a new TLS connection (ALPN http/1.1) and collects everything until the
 * peer closes. The request should ask for `Connection: close` (or be an upgrade, which the proxy closes unless
 * it is joined); `deadlineMs` only guards against a hang and is not part of any assertion.
 */
export function rawHttp1(
  client: SvidClient,
  request: Buffer | string,
  deadlineMs = 15_000,
): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect(tlsOptions(client, ['http/1.1']));
    const chunks: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      socket.destroy();
    }, deadlineMs);
    socket.on('secureConnect', () => socket.write(request));
    socket.on('data', (d: Buffer) => chunks.push(d));
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(parseHttp1Answer(Buffer.concat(chunks), timedOut));
    });
    socket.on('error', (err: Error & { code?: string }) => {
      // The peer may reset after its answer; what arrived is still the answer.
      if (chunks.length > 0 || err.code === 'ECONNRESET') return;
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** An HTTP/1.1 request as bytes: the target is inserted as given (a Buffer stays byte-exact). */
export function http1Request(
  method: string,
  target: Buffer | string,
  headers: readonly (readonly [string, string])[],
): Buffer {
  const lines = headers.map(([name, value]) => `${name}: ${value}\r\n`).join('');
  return Buffer.concat([
    Buffer.from(`${method} `, 'latin1'),
    typeof target === 'string' ? Buffer.from(target, 'latin1') : target,
    Buffer.from(` HTTP/1.1\r\n${lines}\r\n`, 'latin1'),
  ]);
}

export function connectHttp2(client: SvidClient): http2.ClientHttp2Session {
  const session = http2.connect(`https://127.0.0.1:${client.port}`, {
    servername: 'localhost',
    ca: client.ca,
    cert: client.cert,
    key: client.key,
  });
  // A session the proxy ends (GOAWAY after a protocol error) is reported through its streams.
  session.on('error', () => {});
  return session;
}

export interface Http2Answer {
  /** 0 when the stream was reset or the session failed before a response. */
  readonly status: number;
  readonly body: string;
  /** Why the stream ended without a response (e.g. NGHTTP2_PROTOCOL_ERROR from the proxy's HTTP/2 layer). */
  readonly reset?: string;
}

/**
 * One HTTP/2 request; `path` goes into `:path` as latin1, so pass `buffer.toString('latin1')` to send exact bytes.
 * Resolves on the end of the stream, a reset, or the safety deadline (then `reset` says so).
 */
export function http2Request(
  session: http2.ClientHttp2Session,
  headers: http2.OutgoingHttpHeaders,
  body?: string,
  deadlineMs = 15_000,
): Promise<Http2Answer> {
  return new Promise((resolve) => {
    let stream: http2.ClientHttp2Stream;
    try {
      stream = session.request(headers);
    } catch (err) {
      resolve({ status: 0, body: '', reset: `client refused to send: ${(err as Error).message}` });
      return;
    }
    let status = 0;
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      stream.close(http2.constants.NGHTTP2_CANCEL);
      resolve({ status, body: Buffer.concat(chunks).toString('utf8'), reset: 'deadline' });
    }, deadlineMs);
    stream.on('response', (h) => {
      status = Number(h[':status']);
    });
    stream.on('data', (d: Buffer) => chunks.push(d));
    stream.on('close', () => {
      clearTimeout(timer);
      const text = Buffer.concat(chunks).toString('utf8');
      const code = stream.rstCode;
      resolve(
        status === 0 || (code !== undefined && code !== http2.constants.NGHTTP2_NO_ERROR && text === '')
          ? { status, body: text, reset: `stream closed with code ${code}` }
          : { status, body: text },
      );
    });
    stream.on('error', () => {});
    stream.end(body);
  });
}

/**
 * A plain TCP listener standing in for a host an attacker names: it counts connections and keeps their first
 * bytes, then drops them. `settle` waits a short while for a connection that may still be on its way.
 */
export class ConnectionWitness {
  readonly server: net.Server;
  readonly firstBytes: Buffer[] = [];
  connections = 0;
  #waiters: (() => void)[] = [];

  private constructor(server: net.Server) {
    this.server = server;
  }

  static async listen(): Promise<ConnectionWitness> {
    const server = net.createServer();
    const witness = new ConnectionWitness(server);
    server.on('connection', (socket) => {
      witness.connections++;
      socket.once('data', (d: Buffer) => {
        witness.firstBytes.push(d);
        socket.destroy();
      });
      socket.on('error', () => {});
      socket.setTimeout(2_000, () => socket.destroy());
      for (const wake of witness.#waiters.splice(0)) wake();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return witness;
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  /**
   * Resolves with the connection count once it exceeds `since` or `quietMs` pass without that: a bounded wait
   * for a connection that may still be on its way, never a measure of time.
   */
  settle(since = 0, quietMs = 250): Promise<number> {
    if (this.connections > since) return Promise.resolve(this.connections);
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.#waiters = this.#waiters.filter((w) => w !== done);
        resolve(this.connections);
      };
      const timer = setTimeout(done, quietMs);
      this.#waiters.push(done);
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
