/**
 * The request target the policy judges is the one the upstream receives, byte for byte, on every path through
 * the proxy. Against a STAND-IN for kube-apiserver that records the exact target bytes of every request it gets
 * (raw HTTP/1.1 parsed by hand, HTTP/2 `:path` as latin1), plus a decoy listener that no request may ever reach:
 * for arbitrary targets, the proxy either refuses with 400 and forwards nothing, or forwards exactly what the
 * client sent, with the audit Event naming the path it judged. The upstream is `https:`: HTTP/2 for ordinary
 * requests, HTTP/1.1 for upgrades.
 */
import assert from 'node:assert/strict';
import http2 from 'node:http2';
import type net from 'node:net';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import fc from 'fast-check';
import { type DevPki, makeDevPki } from '../../certs-dev/devpki.ts';
import { silentLogger } from '../../src/observability/logger.ts';
import type { AuditEvent } from '../../src/proxy/audit.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import { memoryAudit, type ProxyFiles, proxyConfigYaml, writeProxyFiles } from '../helpers/proxy-fixture.ts';
import {
  ConnectionWitness,
  connectHttp2,
  http1Request,
  http2Request,
  rawHttp1,
  type SvidClient,
} from '../helpers/raw-http.ts';

const FLUX = 'spiffe://hub.example.org/ns/flux-system/sa/kustomize-controller';
const RUNS = 100;
const TEST_ID = 'x-target-test-id';

/** What the stand-in received for one request. */
interface Received {
  readonly id: string | undefined;
  readonly target: Buffer;
  readonly via: 'http/1.1' | 'h2';
}

/**
 * The STAND-IN upstream. HTTP/1.1 is parsed by hand so the target bytes are recorded exactly as they came,
 * whatever they are; it always answers 200 (also to an upgrade: no tunnel is needed to see the target) and closes.
 */
class StandIn {
  readonly received: Received[] = [];
  readonly server: net.Server;
  readonly #h2 = http2.createServer();

  constructor(secure: { cert: string; key: string }) {
    this.#h2.on('stream', (stream, headers) => {
      const id = headers[TEST_ID];
      this.received.push({
        id: typeof id === 'string' ? id : undefined,
        target: Buffer.from(String(headers[':path'] ?? ''), 'latin1'),
        via: 'h2',
      });
      stream.respond({ ':status': 200, 'content-type': 'application/json' });
      stream.end('{"standIn":true}');
    });
    this.#h2.on('sessionError', () => {});
    const onHttp1 = (socket: net.Socket): void => {
      let buffered = Buffer.alloc(0);
      socket.on('error', () => {});
      socket.on('data', (d: Buffer) => {
        buffered = Buffer.concat([buffered, d]);
        const end = buffered.indexOf('\r\n\r\n');
        if (end < 0) return;
        socket.removeAllListeners('data');
        const head = buffered.subarray(0, end);
        const lineEnd = head.indexOf('\r\n');
        const line = lineEnd < 0 ? head : head.subarray(0, lineEnd);
        // METHOD SP target SP HTTP/1.1: the target is everything between the first and the last space.
        const first = line.indexOf(0x20);
        const last = line.lastIndexOf(0x20);
        const id = new RegExp(`\\r\\n${TEST_ID}: ([^\\r]*)`, 'i').exec(head.toString('latin1'))?.[1];
        this.received.push({ id, target: Buffer.from(line.subarray(first + 1, last)), via: 'http/1.1' });
        const body = '{"standIn":true}';
        socket.end(
          `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n` +
            `Connection: close\r\n\r\n${body}`,
        );
      });
    };
    this.server = tls.createServer({ ...secure, ALPNProtocols: ['h2', 'http/1.1'] }, (socket) => {
      if (socket.alpnProtocol === 'h2') this.#h2.emit('connection', socket);
      else onHttp1(socket);
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return (this.server.address() as AddressInfo).port;
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** Go's path unescape (what kube-apiserver's URL.Path holds), or undefined where Go would refuse the escape. */
function goPath(target: Buffer): string | undefined {
  const text = target.toString('latin1');
  const q = text.indexOf('?');
  const raw = q < 0 ? text : text.slice(0, q);
  const bytes: number[] = [];
  for (let i = 0; i < raw.length; i++) {
    if (raw[i] === '%') {
      const hex = raw.slice(i + 1, i + 3);
      if (!/^[0-9a-fA-F]{2}$/.test(hex)) return undefined;
      bytes.push(Number.parseInt(hex, 16));
      i += 2;
    } else {
      bytes.push(raw.charCodeAt(i));
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

type Way = 'HTTP/1.1' | 'HTTP/1.1 Upgrade: websocket' | 'HTTP/2';

interface Answer {
  readonly status: number;
  readonly body: string;
  /** Refused below HTTP: an HTTP/2 stream reset, or a connection closed without an answer. */
  readonly reset?: string;
}

const TOKENS = [
  '/',
  '/',
  '/',
  '\\',
  '%',
  '%2e',
  '%2E',
  '%2f',
  '%2F',
  '%5c',
  '%5C',
  '%25',
  '%00',
  '.',
  '..',
  '?',
  '&',
  '=',
  '#',
  ';',
  ':',
  '@',
  'a',
  'z',
  'Q',
  '0',
  '7',
  'f',
  'E',
  'api',
  'v1',
  'namespaces',
  'pods',
  'secrets',
  'é',
  '\u2028',
  '\t',
  '\x7f',
  '\x01',
  '127.0.0.1',
];

/** Strings mixing the characters a parser differential lives on; no space, CR or LF (they end the target). */
const wild = fc.array(fc.constantFrom(...TOKENS), { minLength: 1, maxLength: 24 }).map((t) => t.join(''));

/** Mostly plain printable ASCII, so that many get past the target checks; now and then one odd character. */
const printable = fc
  .array(
    fc.oneof(
      {
        weight: 6,
        arbitrary: fc.constantFrom('a', 'b', 'x', '1', '-', '_', ':', '@', ';', '=', '~', '%41', '%20'),
      },
      { weight: 1, arbitrary: fc.constantFrom('\\', '#', '?', '&', '.', '%2e', '%5c', '%2f', '%25') },
    ),
    { minLength: 1, maxLength: 10 },
  )
  .map((t) => t.join(''));

const piece = fc.oneof(wild, printable);

function targets(decoyPort: number): fc.Arbitrary<Buffer> {
  const decoy = `127.0.0.1:${decoyPort}`;
  return fc
    .oneof(
      { weight: 4, arbitrary: fc.tuple(fc.boolean(), piece).map(([slash, p]) => (slash ? `/${p}` : p)) },
      {
        weight: 3,
        arbitrary: fc
          .array(printable, { minLength: 1, maxLength: 4 })
          .map((segments) => `/${segments.join('/')}`),
      },
      {
        weight: 3,
        arbitrary: fc
          .tuple(piece, piece, fc.option(piece, { nil: undefined }))
          .map(([ns, name, query]) => `/api/v1/namespaces/${ns}/pods/${name}${query ? `?${query}` : ''}`),
      },
      { weight: 1, arbitrary: fc.constant('/api/v1/namespaces/default/pods/web') },
      {
        weight: 2,
        arbitrary: fc
          .tuple(
            fc.constantFrom(
              `/\\${decoy}/x`,
              `/\\\\${decoy}/x`,
              `\\${decoy}/x`,
              `/%5C${decoy}/x`,
              `//${decoy}/x`,
              `/..\\${decoy}`,
              `/.\\${decoy}/x`,
              `http://${decoy}/x`,
              `https://${decoy}/x`,
              `/api/\\..\\..\\\\${decoy}/x`,
            ),
            fc.option(piece, { nil: undefined }),
          )
          .map(([t, tail]) => (tail === undefined ? t : `${t}${tail}`)),
      },
    )
    .map((text) => Buffer.from(text, 'utf8'));
}

describe('the request target reaches the upstream exactly as judged', { timeout: 300_000 }, () => {
  let pki: DevPki;
  let files: ProxyFiles;
  let decoy: ConnectionWitness;
  const modes: {
    readonly name: 'https';
    standIn: StandIn;
    proxy: RunningProxy;
    audit: AuditEvent[];
  }[] = [];

  before(async () => {
    pki = await makeDevPki();
    files = writeProxyFiles('ksp-target-', pki, {
      // No limits: every target the proxy can read is allowed, so refusals can only be about the target itself.
      policy: `rules:\n  - name: flux\n    match:\n      id: ${FLUX}\n    identity:\n      user: flux\n`,
      token: 'proxy-token\n',
      upstreamCa: pki.spoke.rootPem,
    });
    decoy = await ConnectionWitness.listen();
    for (const name of ['https'] as const) {
      // The stand-in serves with the spoke SVID (IP SAN 127.0.0.1), trusted through the spoke root.
      const standIn = new StandIn({ cert: pki.good.proxyServer.chainPem, key: pki.good.proxyServer.keyPem });
      const port = await standIn.listen();
      const audit = memoryAudit();
      const proxy = await startProxy(
        parseProxyConfig(
          proxyConfigYaml(files, { upstreamUrl: `${name}://127.0.0.1:${port}` }),
          join(files.dir, `proxy-${name}.yaml`),
        ),
        {
          logger: silentLogger(),
          audit: audit.sink,
          defaultMetrics: false,
          probeIntervalMs: 60_000,
        },
      );
      modes.push({ name, standIn, proxy, audit: audit.events });
    }
  });

  after(async () => {
    for (const m of modes) {
      await m.proxy.close();
      await m.standIn.close();
    }
    await decoy?.close();
    files?.remove();
  });

  const client = (port: number): SvidClient => ({
    port,
    ca: pki.spoke.rootPem,
    cert: pki.good.clientFlux.chainPem,
    key: pki.good.clientFlux.keyPem,
  });

  async function send(
    way: Way,
    port: number,
    session: () => http2.ClientHttp2Session,
    target: Buffer,
    id: string,
  ): Promise<Answer> {
    if (way === 'HTTP/2') {
      return http2Request(session(), { ':path': target.toString('latin1'), [TEST_ID]: id });
    }
    const upgrade: [string, string][] =
      way === 'HTTP/1.1'
        ? [['Connection', 'close']]
        : [
            ['Connection', 'Upgrade'],
            ['Upgrade', 'websocket'],
            ['Sec-WebSocket-Version', '13'],
            ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='],
          ];
    const answer = await rawHttp1(
      client(port),
      http1Request('GET', target, [['Host', 'localhost'], [TEST_ID, id], ...upgrade]),
    );
    return answer.status === 0 ? { ...answer, reset: 'closed without an answer' } : answer;
  }

  /** Waits (bounded) for the audit Event of the request just answered: it is written as the answer ends. */
  async function auditSince(audit: AuditEvent[], from: number): Promise<AuditEvent[]> {
    for (let i = 0; i < 200 && audit.length === from; i++) await new Promise((r) => setTimeout(r, 5));
    return audit.slice(from);
  }

  const WAYS: Way[] = ['HTTP/1.1', 'HTTP/1.1 Upgrade: websocket', 'HTTP/2'];
  for (const modeName of ['https'] as const) {
    for (const way of WAYS) {
      it(`over ${way} to an ${modeName}: upstream, a target is refused with 400 and nothing forwarded, or forwarded byte for byte`, async (t) => {
        const mode = modes.find((m) => m.name === modeName);
        assert.ok(mode);
        const { proxy, standIn, audit } = mode;
        let h2: http2.ClientHttp2Session | undefined;
        const session = (): http2.ClientHttp2Session => {
          if (h2 === undefined || h2.closed || h2.destroyed) h2 = connectHttp2(client(proxy.port));
          return h2;
        };
        let counter = 0;
        let forwarded = 0;
        const decoyAtStart = decoy.connections;
        try {
          await fc.assert(
            fc.asyncProperty(targets(decoy.port), async (target) => {
              const id = `${modeName}-${way}-${counter++}`;
              const auditFrom = audit.length;
              const decoyBefore = decoy.connections;
              const answer = await send(way, proxy.port, session, target, id);
              const reached = standIn.received.filter((r) => r.id === id);
              const shown = JSON.stringify(target.toString('latin1'));
              assert.equal(decoy.connections, decoyBefore, `the decoy got a connection for ${shown}`);
              if (answer.status === 400 || answer.reset !== undefined) {
                assert.deepEqual(reached, [], `refused ${shown}, yet the stand-in received it`);
                if (answer.status === 400 && answer.body !== '') {
                  // The proxy's own 400 (Node's HTTP parser answers a bare 400 to what it cannot parse).
                  const lines = await auditSince(audit, auditFrom);
                  assert.equal(lines.length, 1, `one audit line for ${shown}: ${JSON.stringify(lines)}`);
                  const event = lines[0] as AuditEvent;
                  assert.equal(event.annotations['kube-svid-proxy/code'], 'ERR_POLICY_BAD_REQUEST', shown);
                  assert.equal(event.annotations['kube-svid-proxy/decision'], 'bad-request', shown);
                }
                return;
              }
              assert.equal(answer.status, 200, `${shown}: status ${answer.status}: ${answer.body}`);
              assert.equal(
                reached.length,
                1,
                `${shown} was answered 200 but reached the stand-in ${reached.length}×`,
              );
              const got = (reached[0] as Received).target;
              assert.ok(
                got.equals(target),
                `the stand-in received ${JSON.stringify(got.toString('latin1'))} for ${shown}`,
              );
              const lines = await auditSince(audit, auditFrom);
              assert.equal(lines.length, 1, `one audit line for ${shown}: ${JSON.stringify(lines)}`);
              const line = lines[0] as AuditEvent;
              assert.equal(line.responseStatus.code, 200);
              assert.equal(line.annotations['kube-svid-proxy/decision'], 'allow');
              assert.equal(
                line.annotations['kube-svid-proxy/path'],
                goPath(target),
                `the audit's judged path is the target's path (${shown})`,
              );
              forwarded++;
            }),
            { numRuns: RUNS },
          );
          // Control: the property saw forwarding succeed, so a refuse-everything proxy could not pass it.
          t.diagnostic(`${forwarded} of ${RUNS} targets forwarded, the others refused`);
          assert.ok(forwarded >= RUNS / 10, `only ${forwarded} of ${RUNS} targets were forwarded`);
          await decoy.settle(decoyAtStart);
          assert.equal(decoy.connections, decoyAtStart, 'the decoy never got a connection');
        } finally {
          h2?.close();
        }
      });
    }
  }
});
