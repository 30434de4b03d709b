// Must stay first: @peculiar/x509 (used by the CA and the cert helpers) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { connect } from 'node:tls';
import { LocalCa } from '../../../src/agent/ca.ts';
import { type BundleEndpointOptions, BundleEndpointServer } from '../../../src/federation/endpoint.ts';
import { FederationErrorCode, isFederationError } from '../../../src/federation/errors.ts';
import { silentLogger } from '../../../src/observability/logger.ts';
import { SpiffeBundle } from '../../../src/spiffe/bundle.ts';
import { TrustDomain } from '../../../src/spiffe/id.ts';
import {
  capturingLogger,
  clock,
  eventually,
  httpsCall,
  makeWebPki,
  svidFrom,
  type WebPki,
  webServerCert,
  writeWebFiles,
} from '../../helpers/federation.ts';

const td = TrustDomain.parse('example.org');

async function withEndpoint(
  options: Partial<BundleEndpointOptions> & Pick<BundleEndpointOptions, 'tls' | 'bundle'>,
  body: (server: BundleEndpointServer) => Promise<void>,
): Promise<void> {
  const server = await BundleEndpointServer.start({
    host: '127.0.0.1',
    port: 0,
    logger: silentLogger(),
    ...options,
  });
  try {
    await body(server);
  } finally {
    await server.close();
  }
}

function rejectsWith(code: string) {
  return (err: unknown): boolean => {
    assert.ok(isFederationError(err), `expected a FederationError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    return true;
  };
}

describe('BundleEndpointServer (https_spiffe)', () => {
  let ca: LocalCa;
  const time = clock();
  before(async () => {
    ca = await LocalCa.create({ trustDomain: td, caTtlSeconds: 600, now: time.now });
  });

  it('serves the bundle as SPIFFE bundle JSON: x509-svid and jwt-svid keys, sequence and refresh hint', async () => {
    const identity = await svidFrom(ca, '/federation/endpoint');
    await withEndpoint(
      { tls: { profile: 'https_spiffe', identity }, bundle: () => ca.bundle, refreshHintSeconds: 120 },
      async (server) => {
        const answer = await httpsCall(server.address.port);
        assert.equal(answer.status, 200);
        assert.equal(answer.headers['content-type'], 'application/json');
        assert.equal(answer.headers['cache-control'], 'no-store');
        assert.equal(Number(answer.headers['content-length']), Buffer.byteLength(answer.body));
        const doc = JSON.parse(answer.body) as {
          keys: { use: string; kty: string; x5c?: string[]; kid?: string }[];
          spiffe_sequence: number;
          spiffe_refresh_hint: number;
        };
        const x509Keys = doc.keys.filter((k) => k.use === 'x509-svid');
        const jwtKeys = doc.keys.filter((k) => k.use === 'jwt-svid');
        assert.equal(x509Keys.length, 1);
        assert.equal(x509Keys[0]?.x5c?.[0], ca.active.certificate.raw.toString('base64'));
        assert.equal(jwtKeys.length, 1);
        assert.equal(jwtKeys[0]?.kid, ca.active.jwtAuthority.kid);
        assert.equal(BigInt(doc.spiffe_sequence), ca.bundle.sequence);
        assert.equal(doc.spiffe_refresh_hint, 120);
        // And it reads back as the same authorities.
        const parsed = SpiffeBundle.parse(td, answer.body);
        assert.deepEqual(
          parsed.x509Authorities.map((c) => c.fingerprint256),
          ca.bundle.x509Authorities.map((c) => c.fingerprint256),
        );
        assert.deepEqual([...parsed.jwtAuthorities.keys()], [...ca.bundle.jwtAuthorities.keys()]);
        // The presented certificate is our SVID.
        assert.equal(answer.peer?.fingerprint256, identity.certificates[0]?.fingerprint256);
      },
    );
  });

  it('writes the default refresh hint (300 s) when none is configured', async () => {
    const identity = await svidFrom(ca, '/federation/endpoint');
    await withEndpoint(
      { tls: { profile: 'https_spiffe', identity }, bundle: () => ca.bundle },
      async (server) => {
        const doc = JSON.parse((await httpsCall(server.address.port)).body) as {
          spiffe_refresh_hint: number;
        };
        assert.equal(doc.spiffe_refresh_hint, 300);
      },
    );
  });

  it('answers HEAD with the headers only, 405 (Allow: GET, HEAD) to other methods, 404 off its path', async () => {
    const identity = await svidFrom(ca, '/federation/endpoint');
    await withEndpoint(
      { tls: { profile: 'https_spiffe', identity }, bundle: () => ca.bundle, path: '/bundle.json' },
      async (server) => {
        const port = server.address.port;
        const head = await httpsCall(port, { path: '/bundle.json', method: 'HEAD' });
        assert.equal(head.status, 200);
        assert.equal(head.body, '');
        assert.ok(Number(head.headers['content-length']) > 0);
        for (const method of ['POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS']) {
          const answer = await httpsCall(port, { path: '/bundle.json', method });
          assert.equal(answer.status, 405, method);
          assert.equal(answer.headers.allow, 'GET, HEAD', method);
        }
        assert.equal((await httpsCall(port, { path: '/' })).status, 404);
        assert.equal((await httpsCall(port, { path: '/bundle.json/x' })).status, 404);
        assert.equal((await httpsCall(port, { path: '/other', method: 'POST' })).status, 404);
        // The query string is not part of the path.
        assert.equal((await httpsCall(port, { path: '/bundle.json?x=1' })).status, 200);
      },
    );
  });

  it('serves the bundle current at each request: a CA rotation shows with a higher sequence', async () => {
    const rotating = await LocalCa.create({ trustDomain: td, caTtlSeconds: 600, now: time.now });
    const identity = await svidFrom(rotating, '/federation/endpoint');
    await withEndpoint(
      { tls: { profile: 'https_spiffe', identity }, bundle: () => rotating.bundle },
      async (server) => {
        const before = SpiffeBundle.parse(td, (await httpsCall(server.address.port)).body);
        time.advance(301);
        await rotating.tick();
        const after = SpiffeBundle.parse(td, (await httpsCall(server.address.port)).body);
        assert.ok((after.sequence ?? 0n) > (before.sequence ?? 0n));
        assert.equal(after.x509Authorities.length, 2);
      },
    );
  });

  it('presents a rotated SVID from the next handshake on (setIdentity)', async () => {
    const first = await svidFrom(ca, '/federation/endpoint');
    const second = await svidFrom(ca, '/federation/endpoint');
    await withEndpoint(
      { tls: { profile: 'https_spiffe', identity: first }, bundle: () => ca.bundle },
      async (server) => {
        assert.equal(
          (await httpsCall(server.address.port)).peer?.fingerprint256,
          first.certificates[0]?.fingerprint256,
        );
        server.setIdentity(second);
        assert.equal(
          (await httpsCall(server.address.port)).peer?.fingerprint256,
          second.certificates[0]?.fingerprint256,
        );
      },
    );
  });

  it('refuses an identity whose key does not match its certificate, and keeps serving the old one', async () => {
    const good = await svidFrom(ca, '/federation/endpoint');
    const other = await svidFrom(ca, '/federation/endpoint');
    await assert.rejects(
      BundleEndpointServer.start({
        host: '127.0.0.1',
        port: 0,
        logger: silentLogger(),
        bundle: () => ca.bundle,
        tls: {
          profile: 'https_spiffe',
          identity: { certificates: good.certificates, privateKey: other.privateKey },
        },
      }),
      rejectsWith(FederationErrorCode.Endpoint),
    );
    await withEndpoint(
      { tls: { profile: 'https_spiffe', identity: good }, bundle: () => ca.bundle },
      async (server) => {
        assert.throws(
          () => server.setIdentity({ certificates: other.certificates, privateKey: good.privateKey }),
          rejectsWith(FederationErrorCode.Endpoint),
        );
        assert.equal(
          (await httpsCall(server.address.port)).peer?.fingerprint256,
          good.certificates[0]?.fingerprint256,
        );
      },
    );
  });

  it('answers 500 and logs a warning when the bundle cannot be had', async () => {
    const identity = await svidFrom(ca, '/federation/endpoint');
    const log = capturingLogger();
    await withEndpoint(
      {
        tls: { profile: 'https_spiffe', identity },
        logger: log.logger,
        bundle: () => {
          throw new Error('no CA yet');
        },
      },
      async (server) => {
        assert.equal((await httpsCall(server.address.port)).status, 500);
        assert.ok(log.lines.some((l) => l.level === 'warn' && l.code === FederationErrorCode.Endpoint));
      },
    );
  });

  it('refuses to start on a port in use, with ERR_FEDERATION_ENDPOINT', async () => {
    const identity = await svidFrom(ca, '/federation/endpoint');
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    try {
      const port = (taken.address() as { port: number }).port;
      await assert.rejects(
        BundleEndpointServer.start({
          host: '127.0.0.1',
          port,
          logger: silentLogger(),
          bundle: () => ca.bundle,
          tls: { profile: 'https_spiffe', identity },
        }),
        (err: unknown) =>
          rejectsWith(FederationErrorCode.Endpoint)(err) && /in use/.test((err as Error).message),
      );
    } finally {
      await new Promise((resolve) => taken.close(resolve));
    }
  });

  it('drops connections beyond limits.maxConnections, and says so', async () => {
    const identity = await svidFrom(ca, '/federation/endpoint');
    const log = capturingLogger();
    await withEndpoint(
      {
        tls: { profile: 'https_spiffe', identity },
        bundle: () => ca.bundle,
        logger: log.logger,
        limits: { maxConnections: 1 },
      },
      async (server) => {
        const held = connect({ host: '127.0.0.1', port: server.address.port, rejectUnauthorized: false });
        try {
          await once(held, 'secureConnect');
          await assert.rejects(httpsCall(server.address.port));
        } finally {
          held.destroy();
        }
        assert.ok(log.lines.some((l) => l.level === 'warn' && /maxConnections/.test(String(l.msg))));
      },
    );
  });

  it('never logs key material', async () => {
    const identity = await svidFrom(ca, '/federation/endpoint');
    const log = capturingLogger();
    await withEndpoint(
      { tls: { profile: 'https_spiffe', identity }, bundle: () => ca.bundle, logger: log.logger },
      async (server) => {
        await httpsCall(server.address.port);
        server.setIdentity(await svidFrom(ca, '/federation/endpoint'));
        await httpsCall(server.address.port, { method: 'POST' });
      },
    );
    assert.ok(log.lines.length >= 3);
    assert.doesNotMatch(log.text(), /PRIVATE KEY|"d":/);
  });
});

describe('BundleEndpointServer (https_web)', () => {
  let dir: string;
  let pki: WebPki;
  let ca: LocalCa;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-federation-endpoint-'));
    pki = await makeWebPki();
    ca = await LocalCa.create({ trustDomain: td });
  });
  after(() => rm(dir, { recursive: true, force: true }));

  const filesIn = (name: string) => ({
    certFile: join(dir, `${name}.crt`),
    keyFile: join(dir, `${name}.key`),
  });

  it('serves with the certificate files, verified by a Web-PKI client for 127.0.0.1', async () => {
    const files = filesIn('serve');
    const pair = await webServerCert(pki);
    await writeWebFiles(files, pair);
    await withEndpoint(
      { tls: { profile: 'https_web', ...files }, bundle: () => ca.bundle },
      async (server) => {
        const answer = await httpsCall(server.address.port, { ca: pki.caPem });
        assert.equal(answer.status, 200);
        assert.equal(answer.peer?.fingerprint256, pair.cert.fingerprint256);
        assert.throws(
          () => server.setIdentity({ certificates: [pair.cert], privateKey: {} as never }),
          rejectsWith(FederationErrorCode.Endpoint),
        );
      },
    );
  });

  it('reloads the certificate when the files change; a broken or half-replaced pair keeps the last good one', async () => {
    const files = filesIn('reload');
    const first = await webServerCert(pki);
    const second = await webServerCert(pki);
    const third = await webServerCert(pki);
    await writeWebFiles(files, first);
    const log = capturingLogger();
    await withEndpoint(
      {
        tls: { profile: 'https_web', ...files },
        bundle: () => ca.bundle,
        logger: log.logger,
        pollIntervalMs: 60_000,
      },
      async (server) => {
        const port = server.address.port;
        const served = async () => (await httpsCall(port, { ca: pki.caPem })).peer?.fingerprint256;
        assert.equal(await served(), first.cert.fingerprint256);

        await writeWebFiles(files, second);
        await server.reload();
        assert.equal(await served(), second.cert.fingerprint256);

        // Garbage in the certificate file: logged, the second certificate stays.
        await writeFile(
          files.certFile,
          '-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n',
        );
        await server.reload();
        assert.equal(await served(), second.cert.fingerprint256);
        assert.ok(log.lines.some((l) => l.level === 'warn' && l.code === FederationErrorCode.Endpoint));

        // The certificate of a renewal lands before its key: not installed until the pair matches.
        await writeFile(files.certFile, third.certPem);
        await server.reload();
        assert.equal(await served(), second.cert.fingerprint256);
        await writeFile(files.keyFile, third.keyPem);
        await server.reload();
        assert.equal(await served(), third.cert.fingerprint256);
      },
    );
    assert.doesNotMatch(log.text(), /PRIVATE KEY/);
  });

  it('notices changed files by itself (watchFile), without reload()', async () => {
    const files = filesIn('watch');
    const first = await webServerCert(pki);
    const second = await webServerCert(pki);
    await writeWebFiles(files, first);
    await withEndpoint(
      { tls: { profile: 'https_web', ...files }, bundle: () => ca.bundle, pollIntervalMs: 50 },
      async (server) => {
        await writeWebFiles(files, second);
        await eventually(
          async () =>
            (await httpsCall(server.address.port, { ca: pki.caPem })).peer?.fingerprint256 ===
            second.cert.fingerprint256,
        );
      },
    );
  });

  it('refuses to start with a missing file, a file that is not PEM, or a key that does not match', async () => {
    const files = filesIn('bad');
    const pair = await webServerCert(pki);
    const other = await webServerCert(pki);
    const start = () =>
      BundleEndpointServer.start({
        host: '127.0.0.1',
        port: 0,
        logger: silentLogger(),
        bundle: () => ca.bundle,
        tls: { profile: 'https_web', ...files },
      });
    const naming = (file: string) => (err: unknown) =>
      rejectsWith(FederationErrorCode.Endpoint)(err) && (err as Error).message.includes(file);

    await assert.rejects(start(), naming(files.certFile));
    await writeFile(files.certFile, 'hello');
    await writeFile(files.keyFile, pair.keyPem);
    await assert.rejects(start(), naming(files.certFile));
    await writeFile(files.certFile, pair.certPem);
    await writeFile(files.keyFile, 'hello');
    await assert.rejects(start(), naming(files.keyFile));
    await writeFile(files.keyFile, other.keyPem);
    await assert.rejects(start(), naming(files.keyFile));
  });
});
