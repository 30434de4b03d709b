// The load generator of bench/compare.ts: mTLS handshakes (full, with a never-seen client certificate, resumed
// from a TLS 1.3 session ticket), idle connections, and GETs over HTTP/2 or HTTP/1.1 keep-alive, each on as
// many connections as asked, every answer checked. It runs in the bench's own process; its CPU is measured
// around each loop and reported apart from the servers'.
import http, { type IncomingMessage } from 'node:http';
import http2, { type ClientHttp2Session } from 'node:http2';
import https from 'node:https';
import type { Socket } from 'node:net';
import tls, { type SecureContext } from 'node:tls';
import { GET_PATH } from './contenders.ts';
import { BODY } from './upstream.ts';

const TIMEOUT_MS = 10_000;
/**
 * The one key exchange the client offers, so that every contender does the same work: Node 24's OpenSSL would
 * otherwise pick the hybrid X25519MLKEM768 with Node servers and X25519 with nginx (OpenSSL 3.0) and Ghostunnel.
 */
export const KEY_EXCHANGE = 'X25519';
/** How long a client waits for the server's session ticket, the proof that it accepted the certificate. */
const TICKET_TIMEOUT_MS = 3_000;

export interface Pem {
  readonly cert: string;
  readonly key: string;
}

/** A TLS 1.3-only client context presenting `identity` and trusting `ca`. */
export function clientContext(identity: Pem | undefined, ca: string): SecureContext {
  return tls.createSecureContext({
    ...(identity === undefined ? {} : { cert: identity.cert, key: identity.key }),
    ca,
    minVersion: 'TLSv1.3',
    maxVersion: 'TLSv1.3',
    ecdhCurve: KEY_EXCHANGE,
  });
}

function clientCpuUs(): number {
  const { user, system } = process.cpuUsage();
  return user + system;
}

// ---------------------------------------------------------------------------------------------------------------
// handshakes

interface Connected {
  readonly ms: number;
  readonly reused: boolean;
  readonly ticket: Buffer | undefined;
  readonly group: string | undefined;
}

/**
 * One TLS connection: connect, handshake, wait for the server's session ticket (TLS 1.3 servers send one only
 * once the client's certificate and Finished are accepted; a refusal arrives as an alert instead) unless the
 * session was resumed, close.
 * Resolves once the connection has closed, with connect → 'secureConnect' in ms.
 */
function connectOnce(
  port: number,
  context: SecureContext,
  alpn: readonly string[] | undefined,
  session: Buffer | undefined,
): Promise<Connected> {
  return new Promise((resolve, reject) => {
    let failure: Error | undefined;
    let result: Connected | undefined;
    let ticket: Buffer | undefined;
    let ms: number | undefined;
    const start = performance.now();
    const socket = tls.connect({
      host: '127.0.0.1',
      port,
      servername: 'localhost',
      secureContext: context,
      ...(alpn === undefined ? {} : { ALPNProtocols: [...alpn] }),
      ...(session === undefined ? {} : { session }),
    });
    const timer = setTimeout(() => {
      failure ??= new Error(`connection not done after ${TIMEOUT_MS} ms`);
      socket.destroy();
    }, TIMEOUT_MS);
    const finish = (): void => {
      // A resumed handshake proves nothing more by a new ticket (and not every server sends one then): it
      // keeps the one it offered.
      if (ms !== undefined && ticket === undefined && socket.isSessionReused()) ticket = session;
      if (ms === undefined || ticket === undefined || result !== undefined) return;
      const key = socket.getEphemeralKeyInfo();
      result = {
        ms,
        reused: socket.isSessionReused(),
        ticket,
        group: key !== null && 'name' in key ? String(key.name) : undefined,
      };
      socket.end();
    };
    socket.on('session', (s: Buffer) => {
      ticket = s;
      finish();
    });
    socket.once('secureConnect', () => {
      ms = performance.now() - start;
      if (!socket.authorized) failure = new Error(`server not authorized: ${socket.authorizationError}`);
      else if (socket.getProtocol() !== 'TLSv1.3') failure = new Error(`negotiated ${socket.getProtocol()}`);
      else if (alpn !== undefined && socket.alpnProtocol !== alpn[0]) {
        failure = new Error(`ALPN ${String(socket.alpnProtocol)}, not ${alpn[0]}`);
      }
      if (failure !== undefined) socket.destroy();
      else {
        socket.setTimeout(TICKET_TIMEOUT_MS, () => {
          failure ??= new Error(`no session ticket within ${TICKET_TIMEOUT_MS} ms of the handshake`);
          socket.destroy();
        });
        finish();
      }
      socket.resume(); // read (and drop) SETTINGS and the server's end, so that 'close' comes
    });
    socket.on('error', (err) => {
      // A reset once the ticket is in (a server closing its side first) is not a failed handshake.
      if (result === undefined) failure ??= err;
    });
    socket.once('close', () => {
      clearTimeout(timer);
      if (result !== undefined) resolve(result);
      else reject(failure ?? new Error('closed before the handshake completed'));
    });
  });
}

export interface HandshakeLoop {
  readonly count: number;
  /** Connections that resumed a session (must be all of them in a resumed loop, none in a full one). */
  readonly reused: number;
  readonly latenciesMs: number[];
  readonly wallMs: number;
  readonly clientCpuUs: number;
  readonly groups: string[];
}

/**
 * `n` handshakes on `concurrency` lanes, each lane one connection at a time. With `tickets` (one slot per
 * lane), each connection offers the ticket its lane's previous connection received: resumed handshakes.
 */
export async function handshakeLoop(options: {
  readonly port: number;
  readonly alpn: readonly string[] | undefined;
  readonly context: (i: number) => SecureContext;
  readonly n: number;
  readonly concurrency: number;
  readonly tickets?: (Buffer | undefined)[];
}): Promise<HandshakeLoop> {
  const { port, alpn, context, n, concurrency, tickets } = options;
  const latenciesMs: number[] = [];
  const groups = new Set<string>();
  let reused = 0;
  let next = 0;
  const cpu = clientCpuUs();
  const start = performance.now();
  const lane = async (slot: number): Promise<void> => {
    for (let i = next++; i < n; i = next++) {
      const c = await connectOnce(port, context(i), alpn, tickets?.[slot]);
      if (tickets !== undefined) tickets[slot] = c.ticket;
      latenciesMs.push(c.ms);
      if (c.reused) reused++;
      if (c.group !== undefined) groups.add(c.group);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, (_, slot) => lane(slot)));
  return {
    count: n,
    reused,
    latenciesMs,
    wallMs: performance.now() - start,
    clientCpuUs: clientCpuUs() - cpu,
    groups: [...groups],
  };
}

// ---------------------------------------------------------------------------------------------------------------
// requests

/** To a contender (with the client SVID), or straight to the stand-in: h2 or HTTP/1.1 over TLS, HTTP/1.1 plain. */
export type RequestKind = 'h2' | 'http/1.1' | 'direct-h2' | 'direct-https1' | 'direct-h1';

/** Open connections that each carry one GET at a time. */
export interface Clients {
  readonly connections: number;
  get(lane: number): Promise<void>;
  close(): Promise<void>;
}

function checkAnswer(status: number | undefined, length: number, where: string): void {
  if (status !== 200) throw new Error(`${where}: status ${status}`);
  if (length !== BODY.length) throw new Error(`${where}: body of ${length} bytes, not ${BODY.length}`);
}

async function h2Clients(
  port: number,
  connections: number,
  options: http2.SecureClientSessionOptions,
): Promise<Clients> {
  const sessions: ClientHttp2Session[] = [];
  try {
    for (let i = 0; i < connections; i++) {
      const session = http2.connect(`https://127.0.0.1:${port}`, { servername: 'localhost', ...options });
      session.on('error', () => {});
      sessions.push(session);
      await new Promise<void>((resolve, reject) => {
        session.once('connect', () => resolve());
        session.once('error', reject);
      });
    }
  } catch (err) {
    for (const s of sessions) s.destroy();
    throw err;
  }
  const get = (lane: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const req = (sessions[lane] as ClientHttp2Session).request(
        { ':path': GET_PATH, accept: 'application/json' },
        { endStream: true },
      );
      let status: number | undefined;
      let length = 0;
      req.setTimeout(TIMEOUT_MS, () => req.close(http2.constants.NGHTTP2_CANCEL));
      req.on('response', (headers) => {
        status = Number(headers[':status']);
      });
      req.on('data', (chunk: Buffer) => {
        length += chunk.length;
      });
      req.on('end', () => {
        try {
          checkAnswer(status, length, 'HTTP/2 GET');
          resolve();
        } catch (err) {
          reject(err);
        }
      });
      req.on('error', reject);
    });
  return {
    connections,
    get,
    close: async () => {
      await Promise.all(sessions.map(closeSession));
    },
  };
}

function closeSession(session: ClientHttp2Session): Promise<void> {
  if (session.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => session.destroy(), TIMEOUT_MS);
    session.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
    session.close();
  });
}

/**
 * HTTP/1.1 keep-alive on `connections` sockets of one agent; every measured request must ride one of them. (Not
 * `req.reusedSocket`: a request queued for a busy socket and handed it once free is not flagged as reusing it.)
 */
async function h1Clients(
  connections: number,
  agent: http.Agent,
  request: (options: http.RequestOptions, cb: (res: IncomingMessage) => void) => http.ClientRequest,
  port: number,
): Promise<Clients> {
  const seen = new Set<Socket>();
  let opened = false;
  const get = (_lane: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const req = request(
        { host: '127.0.0.1', port, path: GET_PATH, agent, headers: { accept: 'application/json' } },
        (res) => {
          let length = 0;
          res.on('data', (chunk: Buffer) => {
            length += chunk.length;
          });
          res.on('end', () => {
            try {
              checkAnswer(res.statusCode, length, 'HTTP/1.1 GET');
              resolve();
            } catch (err) {
              reject(err);
            }
          });
          res.on('error', reject);
        },
      );
      req.once('socket', (socket) => {
        if (!opened) seen.add(socket);
        else if (!seen.has(socket)) req.destroy(new Error('HTTP/1.1 GET on a new connection'));
      });
      req.setTimeout(TIMEOUT_MS, () => req.destroy(new Error('HTTP/1.1 GET timed out')));
      req.on('error', reject);
      req.end();
    });
  // Open every socket now, outside the measured loop.
  await Promise.all(Array.from({ length: connections }, (_, lane) => get(lane)));
  if (seen.size !== connections) {
    agent.destroy();
    throw new Error(`HTTP/1.1: ${seen.size} sockets open, not ${connections}`);
  }
  opened = true;
  return {
    connections,
    get,
    close: async () => agent.destroy(),
  };
}

export async function openClients(
  kind: RequestKind,
  port: number,
  connections: number,
  tlsOptions: { readonly identity?: Pem; readonly ca: string },
): Promise<Clients> {
  const creds = {
    ...(tlsOptions.identity === undefined
      ? {}
      : { cert: tlsOptions.identity.cert, key: tlsOptions.identity.key }),
    ca: tlsOptions.ca,
    minVersion: 'TLSv1.3' as const,
    maxVersion: 'TLSv1.3' as const,
    ecdhCurve: KEY_EXCHANGE,
  };
  const agentOptions = { keepAlive: true, maxSockets: connections, maxFreeSockets: connections };
  switch (kind) {
    case 'h2':
      return h2Clients(port, connections, creds);
    case 'direct-h2':
      return h2Clients(port, connections, { ca: tlsOptions.ca, ecdhCurve: KEY_EXCHANGE });
    case 'http/1.1':
      return h1Clients(
        connections,
        new https.Agent({ ...agentOptions, ...creds, servername: 'localhost' }),
        https.request,
        port,
      );
    case 'direct-https1':
      return h1Clients(
        connections,
        new https.Agent({
          ...agentOptions,
          ca: tlsOptions.ca,
          ecdhCurve: KEY_EXCHANGE,
          servername: 'localhost',
        }),
        https.request,
        port,
      );
    case 'direct-h1':
      return h1Clients(connections, new http.Agent(agentOptions), http.request, port);
  }
}

export interface RequestLoop {
  readonly count: number;
  readonly latenciesMs: number[];
  readonly wallMs: number;
  readonly clientCpuUs: number;
}

/** `n` GETs spread over the clients' connections, one at a time on each. */
export async function requestLoop(clients: Clients, n: number): Promise<RequestLoop> {
  const latenciesMs: number[] = [];
  let next = 0;
  const cpu = clientCpuUs();
  const start = performance.now();
  const lane = async (slot: number): Promise<void> => {
    for (let i = next++; i < n; i = next++) {
      const t = performance.now();
      await clients.get(slot);
      latenciesMs.push(performance.now() - t);
    }
  };
  await Promise.all(Array.from({ length: Math.min(clients.connections, n) }, (_, slot) => lane(slot)));
  return { count: n, latenciesMs, wallMs: performance.now() - start, clientCpuUs: clientCpuUs() - cpu };
}

// ---------------------------------------------------------------------------------------------------------------
// idle connections

/**
 * `k` mTLS connections left open and idle: HTTP/2 sessions (SETTINGS exchanged, one PING answered) for the
 * HTTP/2 servers, bare TLS connections (server's ticket received) for the others.
 */
export async function openIdle(options: {
  readonly port: number;
  readonly h2: boolean;
  readonly alpn: readonly string[] | undefined;
  readonly identity: Pem;
  readonly ca: string;
  readonly context: SecureContext;
  readonly k: number;
}): Promise<() => Promise<void>> {
  const closers: (() => Promise<void>)[] = [];
  const closeAll = async (): Promise<void> => {
    await Promise.all(closers.splice(0).map((c) => c()));
  };
  const openOne = async (): Promise<void> => {
    if (options.h2) {
      const clients = await h2Clients(options.port, 1, {
        cert: options.identity.cert,
        key: options.identity.key,
        ca: options.ca,
        minVersion: 'TLSv1.3',
        maxVersion: 'TLSv1.3',
        ecdhCurve: KEY_EXCHANGE,
      });
      closers.push(() => clients.close());
      return;
    }
    const socket = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const s = tls.connect({
        host: '127.0.0.1',
        port: options.port,
        servername: 'localhost',
        secureContext: options.context,
        ...(options.alpn === undefined ? {} : { ALPNProtocols: [...options.alpn] }),
      });
      s.once('session', () => resolve(s));
      s.once('error', reject);
      s.setTimeout(TIMEOUT_MS, () => s.destroy(new Error('idle connection: no session ticket')));
    });
    socket.setTimeout(0);
    socket.on('error', () => {});
    socket.resume();
    closers.push(
      () =>
        new Promise((resolve) => {
          socket.once('close', () => resolve());
          socket.end();
        }),
    );
  };
  try {
    let next = 0;
    const lane = async (): Promise<void> => {
      while (next++ < options.k) await openOne();
    };
    await Promise.all(Array.from({ length: Math.min(8, options.k) }, lane));
  } catch (err) {
    await closeAll();
    throw err;
  }
  return closeAll;
}

/** A GET with no client certificate must not be answered 200 (the server requires mTLS). */
export async function refusesWithoutClientCert(
  kind: 'h2' | 'http/1.1',
  port: number,
  ca: string,
): Promise<boolean> {
  let clients: Clients | undefined;
  try {
    clients = await openClients(kind, port, 1, { ca });
    await clients.get(0);
    return false;
  } catch {
    return true;
  } finally {
    await clients?.close();
  }
}
