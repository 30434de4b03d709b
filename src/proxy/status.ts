import { type ServerResponse, STATUS_CODES } from 'node:http';
import http2, { type Http2ServerResponse, type ServerHttp2Stream } from 'node:http2';
import type { Duplex } from 'node:stream';

/** kube-apiserver's StatusReason for each status the proxy itself produces. */
const REASONS: Readonly<Record<number, string>> = {
  400: 'BadRequest',
  401: 'Unauthorized',
  403: 'Forbidden',
  429: 'TooManyRequests',
  500: 'InternalError',
  502: 'InternalError',
  503: 'ServiceUnavailable',
  504: 'Timeout',
};

/** The StatusReason kube-apiserver gives a status code the proxy produces. */
export function statusReason(code: number): string {
  return REASONS[code] ?? 'InternalError';
}

/**
 * A Kubernetes `Status` object (meta/v1), so kubectl and client-go print the message instead of a parse error.
 * The message says who is refused and why, with the stable code; it never carries credentials.
 */
export function kubeStatus(code: number, message: string): string {
  return JSON.stringify({
    kind: 'Status',
    apiVersion: 'v1',
    metadata: {},
    status: 'Failure',
    message,
    reason: statusReason(code),
    code,
  });
}

/** Writes a Status response unless headers went out already (then the stream is cut, which clients see). */
export function sendStatus(
  res: ServerResponse | Http2ServerResponse,
  code: number,
  message: string,
  headers: Record<string, string> = {},
): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = kubeStatus(code, message);
  res.statusCode = code;
  res.setHeader('content-type', 'application/json');
  res.setHeader('content-length', Buffer.byteLength(body));
  res.setHeader('cache-control', 'no-store');
  for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
  res.end(body);
}

/** `sendStatus` on an HTTP/2 stream (the proxy's HTTP/2 path, without compatibility objects). */
export function respondStatus(
  stream: ServerHttp2Stream,
  code: number,
  message: string,
  headers: Record<string, string> = {},
): void {
  if (stream.headersSent || stream.destroyed) {
    if (!stream.destroyed) stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
    return;
  }
  const body = kubeStatus(code, message);
  stream.respond({
    ...headers,
    ':status': code,
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
  });
  stream.end(body);
}

/** A Kubernetes Status as a whole HTTP/1.1 response on a raw socket (the upgrade path), then close. */
export function writeRawStatus(
  socket: Duplex,
  status: number,
  message: string,
  headers: Record<string, string> = {},
): void {
  const body = kubeStatus(status, message);
  let extra = '';
  for (const [name, value] of Object.entries(headers)) extra += `${name}: ${value}\r\n`;
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\nContent-Type: application/json\r\n${extra}` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}
