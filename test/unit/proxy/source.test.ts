/**
 * The proxy's identity sources: the Workload API one against the REAL agent (withdrawal, recovery) and a
 * STAND-IN Workload API where the agent cannot produce a situation (a stream that stays down while the SVID
 * expires); the file one against PEM files rewritten under it. `health()` is what readiness reports.
 */
// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { mkdtemp, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { bundleJson, type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import { LocalCa } from '../../../src/agent/ca.ts';
import { createLogger, type Logger } from '../../../src/observability/logger.ts';
import { StaticIdentitySource, WorkloadIdentitySource } from '../../../src/proxy/source.ts';
import { TrustDomain } from '../../../src/spiffe/id.ts';
import { WorkloadError, WorkloadErrorCode } from '../../../src/workload/errors.ts';
import { entryFor, startTestAgent, TRUST_DOMAIN } from '../../helpers/agent.ts';
import { endStream, startStandIn, svidResponse } from '../../helpers/workload-standin.ts';

const uid = process.getuid?.() ?? 0;
const HOUR = 3600_000;

/** A logger whose JSON lines the test can read. */
function capturingLogger(): { logger: Logger; lines: () => { msg: string; code?: string }[] } {
  const raw: string[] = [];
  const logger = createLogger({ level: 'debug', stream: { write: (line: string) => void raw.push(line) } });
  return { logger, lines: () => raw.map((l) => JSON.parse(l) as { msg: string; code?: string }) };
}

/** Polls `check` until it holds ("eventually"), with a generous timeout. */
async function until(check: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

describe('WorkloadIdentitySource', () => {
  it('on a withdrawal: emits update, svid() throws ERR_WORKLOAD_SVID_WITHDRAWN, health() says why; recovers', async () => {
    const t = await startTestAgent(`entries:\n${entryFor(uid, 'proxy')}`);
    const { logger, lines } = capturingLogger();
    const identity = await WorkloadIdentitySource.create({ address: t.address, logger });
    const id = `spiffe://${TRUST_DOMAIN}/proxy`;
    let updates = 0;
    const seen: unknown[] = [];
    identity.on('update', () => updates++);
    // What ProxyServer's update handler does: read the SVID. Its exception must not take the process down.
    identity.on('update', () => seen.push(identity.svid()));
    try {
      const healthy = identity.health();
      assert.equal(healthy.ok, true, healthy.detail);
      assert.match(
        healthy.detail,
        new RegExp(`^${id} from the Workload API, valid until \\d{4}-.*; the Workload API stream is up$`),
      );

      t.writeEntries(`entries:\n${entryFor(uid + 1, 'someone-else')}`);
      await until(() => updates > 0 && !identity.health().ok, 'the withdrawal');
      assert.throws(
        () => identity.svid(),
        (err: unknown) => {
          assert.ok(err instanceof WorkloadError, String(err));
          assert.equal(err.code, WorkloadErrorCode.SvidWithdrawn);
          return true;
        },
      );
      const withdrawn = identity.health();
      assert.match(
        withdrawn.detail,
        new RegExp(`^the Workload API withdrew ${id} at \\d{4}-\\S+ \\(PERMISSION_DENIED: `),
      );
      const logged = lines();
      assert.ok(
        logged.some((l) => l.code === WorkloadErrorCode.SvidWithdrawn),
        'the withdrawal is logged with its code',
      );
      assert.ok(
        logged.some((l) => l.msg === 'an identity update listener failed'),
        'the throwing listener is logged',
      );

      const before = updates;
      t.writeEntries(`entries:\n${entryFor(uid, 'proxy')}`);
      await until(() => updates > before && identity.health().ok, 'SVIDs issued again');
      assert.equal(identity.svid().id.toString(), id);
    } finally {
      identity.close();
      await t.close();
    }
  });

  it('is healthy on the last SVID while the stream fails, and unhealthy once that SVID has expired', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ksp-source-'));
    const ca = await LocalCa.create({ trustDomain: TrustDomain.parse(TRUST_DOMAIN) });
    const message = await svidResponse(ca, 'proxy');
    let calls = 0;
    const standIn = await startStandIn(join(dir, 'down.sock'), {
      FetchX509SVID: (call) => {
        calls++;
        endStream(call, grpc.status.UNAVAILABLE, calls === 1 ? message : undefined);
      },
    });
    const identity = await WorkloadIdentitySource.create({
      address: standIn.address,
      logger: capturingLogger().logger,
    });
    try {
      await until(() => identity.health().detail.includes('failing'), 'the failing stream');
      const failing = identity.health();
      assert.equal(failing.ok, true, failing.detail);
      assert.match(
        failing.detail,
        /; the Workload API stream has been failing since \d{4}-\S+ \(UNAVAILABLE: .*\), keeping the last SVID$/,
      );
      const later = identity.health(new Date(Date.now() + 2 * HOUR));
      assert.equal(later.ok, false);
      assert.match(
        later.detail,
        /^the SVID spiffe:\/\/example\.org\/proxy expired at \d{4}-\S+; the Workload API stream has been failing since /,
      );
    } finally {
      identity.close();
      ca.close();
      await standIn.stop();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('StaticIdentitySource', () => {
  let pki: DevPki;
  let dir: string;
  before(async () => {
    pki = await makeDevPki();
    dir = await mkdtemp(join(tmpdir(), 'ksp-static-source-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  async function start(name: string) {
    const certFile = join(dir, `${name}.crt`);
    const keyFile = join(dir, `${name}.key`);
    const spokeFile = join(dir, `${name}-spoke.pem`);
    const hubFile = join(dir, `${name}-hub.json`);
    await writeFile(certFile, pki.good.proxyServer.chainPem);
    await writeFile(keyFile, pki.good.proxyServer.keyPem);
    await writeFile(spokeFile, pki.spoke.rootPem);
    await writeFile(hubFile, bundleJson(pki.hub));
    const files = {
      certFile,
      keyFile,
      bundles: new Map([
        ['spoke.example.org', spokeFile],
        ['hub.example.org', hubFile],
      ]),
    };
    // A long poll: the test re-reads with reload(), as SIGHUP does.
    const source = await StaticIdentitySource.create(files, capturingLogger().logger, 3_600_000);
    return { source, certFile, keyFile, spokeFile, hubFile };
  }

  it('is healthy with valid files, and its detail names them', async () => {
    const { source, certFile, keyFile, spokeFile, hubFile } = await start('ok');
    try {
      const health = source.health();
      assert.equal(health.ok, true, health.detail);
      assert.equal(
        health.detail,
        `${pki.good.proxyServer.spiffeId} from ${certFile} and ${keyFile}, valid until ` +
          `${source.svid().certificates[0]?.validToDate.toISOString()}; ` +
          `bundles from spoke.example.org=${spokeFile}, hub.example.org=${hubFile}`,
      );
      const expired = source.health(new Date(Date.now() + 20 * 365 * 24 * HOUR));
      assert.equal(expired.ok, false);
      assert.match(
        expired.detail,
        new RegExp(`^the SVID ${pki.good.proxyServer.spiffeId} from ${certFile} expired at `),
      );
    } finally {
      source.close();
    }
  });

  it('is unhealthy while a bundle file is refused or missing, naming it, and healthy again once it is fixed', async () => {
    const { source, spokeFile } = await start('bundle');
    try {
      await writeFile(spokeFile, `${pki.spoke.rootPem}garbage`);
      await source.reload();
      let health = source.health();
      assert.equal(health.ok, false);
      assert.match(health.detail, new RegExp(`^refused since \\d{4}-\\S+: ${spokeFile}: `));
      assert.match(health.detail, /data after the last PEM block \(1\) at byte \d+/);
      assert.equal(
        source.bundles().getX509Bundle(TrustDomain.parse('spoke.example.org'))?.authorities.length,
        1,
      );

      await writeFile(spokeFile, pki.spoke.rootPem);
      await source.reload();
      assert.equal(source.health().ok, true, source.health().detail);

      await unlink(spokeFile);
      await source.reload();
      health = source.health();
      assert.equal(health.ok, false);
      assert.match(health.detail, new RegExp(`${spokeFile}: cannot read the file`));
      await writeFile(spokeFile, pki.spoke.rootPem);
      await source.reload();
      assert.equal(source.health().ok, true, source.health().detail);
    } finally {
      source.close();
    }
  });

  it('keeps the last good SVID for a key that does not match, and says so until the pair is whole again', async () => {
    const { source, certFile, keyFile } = await start('pair');
    let updates = 0;
    source.on('update', () => updates++);
    try {
      await writeFile(keyFile, pki.good.clientArgocd.keyPem);
      await source.reload();
      const health = source.health();
      assert.equal(health.ok, false);
      assert.match(
        health.detail,
        new RegExp(
          `^SVID files ${certFile} and ${keyFile} refused since \\d{4}-\\S+ \\(.*does not match.*\\); ` +
            `keeping the last good SVID ${pki.good.proxyServer.spiffeId}$`,
        ),
      );
      assert.equal(source.svid().id.toString(), pki.good.proxyServer.spiffeId);
      assert.doesNotMatch(health.detail, /PRIVATE KEY/);

      await writeFile(keyFile, pki.good.proxyServer.keyPem);
      await source.reload();
      assert.equal(source.health().ok, true, source.health().detail);
      assert.equal(updates, 0, 'the same SVID again is no update');

      await writeFile(certFile, pki.good.clientSpoke.chainPem);
      await writeFile(keyFile, pki.good.clientSpoke.keyPem);
      await source.reload();
      assert.equal(source.svid().id.toString(), pki.good.clientSpoke.spiffeId);
      assert.ok(updates >= 1);
      assert.equal(source.health().ok, true, source.health().detail);
    } finally {
      source.close();
    }
  });
});
