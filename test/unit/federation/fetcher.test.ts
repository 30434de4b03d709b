// Must stay first: @peculiar/x509 (used by the CA and the cert helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import type { X509Certificate } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LocalCa } from '../../../src/agent/ca.ts';
import { StateDir } from '../../../src/config/statedir.ts';
import { FederationErrorCode, isFederationError } from '../../../src/federation/errors.ts';
import {
  BundleFetcher,
  type BundleFetcherOptions,
  type FetchProfile,
  type RelationshipStatus,
} from '../../../src/federation/fetcher.ts';
import { FederationStore } from '../../../src/federation/store.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import { SpiffeBundle } from '../../../src/spiffe/bundle.ts';
import { SpiffeId, TrustDomain } from '../../../src/spiffe/id.ts';
import { capturingLogger, clock, makeWebPki, type WebPki, webServerCert } from '../../helpers/federation.ts';

const td = TrustDomain.parse('a.test');
const otherTd = TrustDomain.parse('b.test');

type Handler = (req: IncomingMessage, res: ServerResponse) => void;

/** An HTTPS server on 127.0.0.1 whose answer each test chooses. */
interface Stage {
  readonly port: number;
  readonly url: string;
  handler: Handler;
  hits: number;
  close(): Promise<void>;
}

async function stage(pair: { certPem: string; keyPem: string }): Promise<Stage> {
  const server: Server = createServer({ cert: pair.certPem, key: pair.keyPem });
  const s: Stage = {
    port: 0,
    url: '',
    handler: (_req, res) => res.end(),
    hits: 0,
    close: async () => {
      const closed = new Promise((resolve) => server.close(resolve));
      server.closeAllConnections();
      await closed;
    },
  };
  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    s.hits++;
    s.handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return Object.assign(s, { port, url: `https://127.0.0.1:${port}/bundle` });
}

const json =
  (text: string, status = 200, headers: Record<string, string> = {}): Handler =>
  (_req, res) => {
    res.writeHead(status, { 'content-type': 'application/json', ...headers });
    res.end(text);
  };

function bundleText(
  authorities: readonly X509Certificate[],
  init: { sequence?: bigint; refreshHint?: number } = {},
): string {
  return new SpiffeBundle(td, { x509Authorities: authorities, ...init }).marshal();
}

function assertCode(status: RelationshipStatus, code: string, pattern?: RegExp): void {
  assert.equal(status.lastError?.code, code, status.lastError?.message);
  if (pattern !== undefined) assert.match(status.lastError?.message ?? '', pattern);
}

describe('BundleFetcher configuration', () => {
  let bootstrap: SpiffeBundle;
  before(async () => {
    bootstrap = (await LocalCa.create({ trustDomain: td })).bundle;
  });

  const make = (o: Partial<BundleFetcherOptions> & { url?: string; fetch?: FetchProfile }) => () =>
    new BundleFetcher({
      relationship: {
        trustDomain: td,
        url: o.url ?? 'https://127.0.0.1:1/',
        fetch: o.fetch ?? { profile: 'https_web' },
      },
      logger: silentLogger(),
      ...o,
    });
  const config = (pattern: RegExp) => (err: unknown) =>
    isFederationError(err, FederationErrorCode.Config) && pattern.test(err.message);

  it('accepts https: URLs only, without userinfo', () => {
    assert.throws(make({ url: 'http://example.com/bundle' }), config(/must be https:/));
    assert.throws(make({ url: 'ftp://example.com/bundle' }), config(/must be https:/));
    assert.throws(make({ url: 'https://user:pw@example.com/bundle' }), config(/userinfo/));
    assert.throws(make({ url: 'example.com/bundle' }), config(/not a URL/));
    assert.doesNotThrow(make({ url: 'https://example.com:8443/bundle?td=a' }));
  });

  it('needs a bootstrap bundle for https_spiffe', () => {
    const fetch: FetchProfile = {
      profile: 'https_spiffe',
      endpointSpiffeId: SpiffeId.parse('spiffe://a.test/server'),
    };
    assert.throws(make({ fetch }), config(/bootstrap bundle/));
    assert.throws(
      make({ fetch, initial: { bundle: new SpiffeBundle(td), source: 'bootstrap', fetchedAt: new Date() } }),
      config(/bootstrap bundle/),
    );
    assert.doesNotThrow(
      make({ fetch, initial: { bundle: bootstrap, source: 'bootstrap', fetchedAt: new Date() } }),
    );
  });

  it('refuses an https_spiffe endpoint ID of another trust domain (not self-serving), or a trust domain ID', () => {
    const initial = { bundle: bootstrap, source: 'bootstrap', fetchedAt: new Date() } as const;
    assert.throws(
      make({
        initial,
        fetch: { profile: 'https_spiffe', endpointSpiffeId: SpiffeId.parse('spiffe://b.test/server') },
      }),
      config(/self-serving/),
    );
    assert.throws(
      make({
        initial,
        fetch: { profile: 'https_spiffe', endpointSpiffeId: SpiffeId.parse('spiffe://a.test') },
      }),
      config(/names a trust domain/),
    );
  });

  it("refuses an initial bundle of another trust domain than the relationship's", () => {
    const foreign = new SpiffeBundle(otherTd, { x509Authorities: bootstrap.x509Authorities });
    assert.throws(
      make({ initial: { bundle: foreign, source: 'set', fetchedAt: new Date() } }),
      config(/b\.test/),
    );
  });

  it('refuses refresh bounds that make no sense', () => {
    assert.throws(make({ refresh: { minSeconds: 600, maxSeconds: 60 } }), config(/minSeconds/));
    assert.throws(make({ refresh: { retrySeconds: 0 } }), config(/retrySeconds/));
    assert.throws(make({ timeoutMs: 0 }), config(/timeoutMs/));
  });
});

describe('BundleFetcher (https_web)', () => {
  let dir: string;
  let pki: WebPki;
  let caFile: string;
  let web: Stage;
  let authorities: X509Certificate[];
  let moreAuthorities: X509Certificate[];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-federation-fetcher-'));
    pki = await makeWebPki();
    caFile = join(dir, 'ca.pem');
    await writeFile(caFile, pki.caPem);
    web = await stage(await webServerCert(pki));
    const ca = await LocalCa.create({ trustDomain: td });
    authorities = [...ca.bundle.x509Authorities];
    const ca2 = await LocalCa.create({ trustDomain: td });
    moreAuthorities = [...authorities, ...ca2.bundle.x509Authorities];
  });
  after(async () => {
    await web.close();
    await rm(dir, { recursive: true, force: true });
  });

  const fetcher = (o: Partial<BundleFetcherOptions> = {}) =>
    new BundleFetcher({
      relationship: { trustDomain: td, url: web.url, fetch: { profile: 'https_web', caFile } },
      logger: silentLogger(),
      ...o,
    });

  it('fetches the bundle, emits bundle and status, and reports the success', async () => {
    web.handler = json(bundleText(authorities, { sequence: 7n, refreshHint: 60 }));
    const time = clock();
    const f = fetcher({ now: time.now });
    const bundles: SpiffeBundle[] = [];
    const statuses: RelationshipStatus[] = [];
    f.on('bundle', (b) => bundles.push(b));
    f.on('status', (s) => statuses.push(s));
    const status = await f.refreshNow();
    assert.equal(status.lastError, undefined);
    assert.equal(status.source, 'endpoint');
    assert.equal(status.profile, 'https_web');
    assert.equal(status.trustDomain, 'a.test');
    assert.equal(status.consecutiveFailures, 0);
    assert.deepEqual(status.lastSuccess, time.now());
    assert.equal(f.bundle?.sequence, 7n);
    assert.equal(bundles.length, 1);
    assert.equal(statuses.length, 1);
    assert.equal(statuses[0], status);
  });

  it("always takes the bundle as the relationship's trust domain's, whatever it is served for", async () => {
    web.handler = json(bundleText(authorities, { sequence: 1n }));
    const f = new BundleFetcher({
      relationship: { trustDomain: otherTd, url: web.url, fetch: { profile: 'https_web', caFile } },
      logger: silentLogger(),
    });
    await f.refreshNow();
    assert.equal(f.bundle?.trustDomain.name, 'b.test');
    assert.equal(f.bundle?.getX509Bundle(td), undefined);
    assert.equal(f.bundle?.getX509Bundle(otherTd)?.authorities.length, 1);
    assert.equal(f.status.trustDomain, 'b.test');
  });

  it('polls at the refresh hint, bounded to [min, max], and at the default without one', async () => {
    const cases: [number | undefined, Parameters<typeof fetcher>[0], number][] = [
      [undefined, {}, 300],
      [120, {}, 120],
      [10, {}, 30],
      [100_000, {}, 3600],
      [10, { refresh: { minSeconds: 60 } }, 60],
      [undefined, { refresh: { defaultSeconds: 90 } }, 90],
      [7200, { refresh: { maxSeconds: 600 } }, 600],
    ];
    for (const [hint, options, expected] of cases) {
      web.handler = json(bundleText(authorities, hint === undefined ? {} : { refreshHint: hint }));
      const time = clock();
      const status = await fetcher({ ...options, now: time.now }).refreshNow();
      assert.equal(status.lastError, undefined);
      assert.equal(
        ((status.nextAttempt?.getTime() ?? 0) - time.ms) / 1000,
        expected,
        `hint ${hint} with ${JSON.stringify(options)}`,
      );
    }
  });

  it('keeps the last good bundle through failures, counting them and backing off up to the poll interval', async () => {
    web.handler = json(bundleText(authorities, { sequence: 3n, refreshHint: 40 }));
    const time = clock();
    const log = capturingLogger();
    const f = fetcher({ now: time.now, logger: log.logger });
    const good = await f.refreshNow();
    const held = f.bundle;
    web.handler = json('{"error":"overloaded"}', 503);
    const delays: number[] = [];
    for (let i = 1; i <= 5; i++) {
      time.advance(1);
      const status = await f.refreshNow();
      assertCode(status, FederationErrorCode.Fetch, /503/);
      assert.equal(status.consecutiveFailures, i);
      assert.deepEqual(status.lastSuccess, good.lastSuccess);
      assert.deepEqual(status.lastAttempt, time.now());
      assert.equal(f.bundle, held);
      assert.equal(status.bundle, held);
      delays.push(((status.nextAttempt?.getTime() ?? 0) - time.ms) / 1000);
    }
    assert.deepEqual(delays, [5, 10, 20, 40, 40]);
    assert.ok(log.lines.some((l) => l.level === 'warn' && l.code === FederationErrorCode.Fetch));
    // Recovery resets the count; lastError stays for the record.
    web.handler = json(bundleText(authorities, { sequence: 3n, refreshHint: 40 }));
    const back = await f.refreshNow();
    assert.equal(back.consecutiveFailures, 0);
    assert.equal(back.lastError?.code, FederationErrorCode.Fetch);
  });

  it('refuses a bundle whose sequence went backwards, and keeps the held one', async () => {
    web.handler = json(bundleText(moreAuthorities, { sequence: 5n }));
    const f = fetcher();
    await f.refreshNow();
    const held = f.bundle;
    web.handler = json(bundleText(authorities, { sequence: 4n }));
    const status = await f.refreshNow();
    assertCode(status, FederationErrorCode.Bundle, /sequence went backwards/);
    assert.equal(f.bundle, held);
    assert.equal(f.bundle?.x509Authorities.length, 2);
    // The same sequence with other content, or no sequence at all, is the latest (SPIFFE Federation §4.2).
    web.handler = json(bundleText(authorities, { sequence: 5n }));
    assert.equal((await f.refreshNow()).consecutiveFailures, 0);
    assert.equal(f.bundle?.x509Authorities.length, 1);
    web.handler = json(bundleText(moreAuthorities));
    await f.refreshNow();
    assert.equal(f.bundle?.sequence, undefined);
  });

  it('takes an identical bundle as a success only: no bundle event, nothing saved again', async () => {
    const stateDir = await StateDir.open(join(dir, 'state-identical'));
    const store = await FederationStore.open(stateDir);
    web.handler = json(bundleText(authorities, { sequence: 9n }));
    const time = clock();
    const f = fetcher({ now: time.now, store });
    let bundleEvents = 0;
    let statusEvents = 0;
    f.on('bundle', () => bundleEvents++);
    f.on('status', () => statusEvents++);
    await f.refreshNow();
    const saved = await store.load(td);
    time.advance(60);
    const status = await f.refreshNow();
    assert.deepEqual(status.lastSuccess, time.now());
    assert.equal(bundleEvents, 1);
    assert.equal(statusEvents, 2);
    assert.deepEqual((await store.load(td))?.fetchedAt, saved?.fetchedAt);
  });

  it('refuses a bundle without an X.509 authority, and what is not a SPIFFE bundle', async () => {
    const f = fetcher();
    web.handler = json(bundleText(authorities, { sequence: 1n }));
    await f.refreshNow();
    const held = f.bundle;
    const jwtOnly = (await LocalCa.create({ trustDomain: td })).bundle;
    const cases: [string, RegExp][] = [
      [
        new SpiffeBundle(td, {
          jwtAuthorities: [...jwtOnly.jwtAuthorities].map(([kid, publicKey]) => ({ kid, publicKey })),
          sequence: 2n,
        }).marshal(),
        /no X\.509 authority/,
      ],
      ['{"keys": 5}', /ERR_BUNDLE_KEYS_MISSING/],
      ['[1, 2]', /not a JSON object|ERR_BUNDLE_JSON/],
      ['{"keys": [], "spiffe_sequence": -1}', /ERR_BUNDLE_SEQUENCE/],
    ];
    for (const [body, pattern] of cases) {
      web.handler = json(body);
      assertCode(await f.refreshNow(), FederationErrorCode.Bundle, pattern);
      assert.equal(f.bundle, held);
    }
  });

  it('refuses, as fetch failures, other statuses, redirects (not followed), non-JSON, non-UTF-8 and oversize bodies', async () => {
    const target = await stage(await webServerCert(pki));
    target.handler = json(bundleText(authorities));
    try {
      const cases: [Handler, RegExp][] = [
        [json('{}', 404), /HTTP status 404/],
        [json('', 302, { location: target.url }), /HTTP status 302 redirecting to .* not followed/],
        [json('', 307, { location: target.url }), /not followed/],
        [json('<html>hello</html>'), /not JSON/],
        [
          (_req, res) => {
            res.writeHead(200, { 'content-type': 'application/json' });
            res.end(Buffer.from([0x7b, 0xff, 0xfe, 0x7d]));
          },
          /not UTF-8/,
        ],
        [json(`{"keys":[],"pad":"${'x'.repeat(2000)}"}`), /above the limit of 1024/],
        [
          (_req, res) => {
            // Cut off half-way through a declared length.
            res.writeHead(200, { 'content-type': 'application/json', 'content-length': '100' });
            res.write('{"keys":', () => res.socket?.destroy());
          },
          /before the response was complete|aborted|ECONNRESET/,
        ],
        [
          (_req, res) => {
            // Chunked, so no Content-Length says the size up front.
            res.writeHead(200, { 'content-type': 'application/json' });
            for (let i = 0; i < 10; i++) res.write('x'.repeat(200));
            res.end();
          },
          /above the limit of 1024 bytes/,
        ],
      ];
      const f = fetcher({ maxBytes: 1024 });
      for (const [handler, pattern] of cases) {
        web.handler = handler;
        assertCode(await f.refreshNow(), FederationErrorCode.Fetch, pattern);
        assert.equal(f.bundle, undefined);
      }
      assert.equal(target.hits, 0, 'a redirect was followed');
    } finally {
      await target.close();
    }
  });

  it('gives up on an endpoint that does not answer in time', async () => {
    web.handler = () => undefined;
    const status = await fetcher({ timeoutMs: 200 }).refreshNow();
    assertCode(status, FederationErrorCode.Fetch, /within 200 ms/);
  });

  it('reports an unreachable endpoint as a fetch failure', async () => {
    const gone = await stage(await webServerCert(pki));
    await gone.close();
    const f = new BundleFetcher({
      relationship: { trustDomain: td, url: gone.url, fetch: { profile: 'https_web', caFile } },
      logger: silentLogger(),
    });
    assertCode(await f.refreshNow(), FederationErrorCode.Fetch, /ECONNREFUSED/);
  });

  it('refuses an endpoint whose certificate is not trusted or does not name the host', async () => {
    web.handler = json(bundleText(authorities));
    // System roots only: the private CA is unknown.
    const noCa = new BundleFetcher({
      relationship: { trustDomain: td, url: web.url, fetch: { profile: 'https_web' } },
      logger: silentLogger(),
    });
    assertCode(await noCa.refreshNow(), FederationErrorCode.Untrusted);
    // Another private CA.
    const otherCaFile = join(dir, 'other-ca.pem');
    await writeFile(otherCaFile, (await makeWebPki('another root')).caPem);
    const otherCa = new BundleFetcher({
      relationship: { trustDomain: td, url: web.url, fetch: { profile: 'https_web', caFile: otherCaFile } },
      logger: silentLogger(),
    });
    assertCode(await otherCa.refreshNow(), FederationErrorCode.Untrusted);
    // The right CA, a certificate for another name.
    const misnamed = await stage(await webServerCert(pki, { dns: ['bundles.example.com'], ips: [] }));
    misnamed.handler = json(bundleText(authorities));
    try {
      const f = new BundleFetcher({
        relationship: { trustDomain: td, url: misnamed.url, fetch: { profile: 'https_web', caFile } },
        logger: silentLogger(),
      });
      assertCode(await f.refreshNow(), FederationErrorCode.Untrusted, /ERR_TLS_CERT_ALTNAME_INVALID/);
      assert.equal(misnamed.hits, 0);
    } finally {
      await misnamed.close();
    }
    assert.equal(noCa.bundle, undefined);
  });

  it('reports an unusable CA file as a configuration error', async () => {
    const missing = fetcher({});
    const broken = new BundleFetcher({
      relationship: {
        trustDomain: td,
        url: web.url,
        fetch: { profile: 'https_web', caFile: join(dir, 'nope.pem') },
      },
      logger: silentLogger(),
    });
    web.handler = json(bundleText(authorities));
    assertCode(await broken.refreshNow(), FederationErrorCode.Config, /nope\.pem/);
    assert.equal((await missing.refreshNow()).lastError, undefined);
  });

  it('setBundle replaces the held bundle whatever its sequence, and refuses another trust domain or no X.509', async () => {
    web.handler = json(bundleText(authorities, { sequence: 10n }));
    const f = fetcher();
    await f.refreshNow();
    const events: SpiffeBundle[] = [];
    f.on('bundle', (b) => events.push(b));
    const set = new SpiffeBundle(td, { x509Authorities: moreAuthorities, sequence: 2n });
    f.setBundle({ bundle: set, source: 'set', fetchedAt: new Date() });
    assert.equal(f.bundle, set);
    assert.equal(f.status.source, 'set');
    assert.deepEqual(events, [set]);
    assert.throws(
      () =>
        f.setBundle({
          bundle: new SpiffeBundle(otherTd, { x509Authorities: authorities }),
          source: 'set',
          fetchedAt: new Date(),
        }),
      (err: unknown) => isFederationError(err, FederationErrorCode.Bundle),
    );
    assert.throws(
      () => f.setBundle({ bundle: new SpiffeBundle(td), source: 'set', fetchedAt: new Date() }),
      (err: unknown) => isFederationError(err, FederationErrorCode.Bundle),
    );
    assert.equal(f.bundle, set);
    // The next fetch compares with the bundle set: sequence 10 is newer than 2.
    assert.equal((await f.refreshNow()).lastError, undefined);
    assert.equal(f.bundle?.sequence, 10n);
  });

  it('start() fetches at once; close() stops it, and a fetch cut short by close emits nothing', async () => {
    web.handler = json(bundleText(authorities));
    const f = fetcher();
    const first = new Promise<RelationshipStatus>((resolve) => f.once('status', resolve));
    f.start();
    assert.equal((await first).lastError, undefined);
    assert.ok(f.status.nextAttempt !== undefined);
    f.close();

    web.handler = () => undefined;
    const g = fetcher();
    let events = 0;
    g.on('status', () => events++);
    const pending = g.refreshNow();
    setTimeout(() => g.close(), 50);
    const status = await pending;
    assert.equal(events, 0);
    assert.equal(status.lastAttempt, undefined);
  });
});
