/**
 * src/agent/spire/client.ts against a real SPIRE server (v1.13.3, built by dev/peers/peers.ts, run by
 * dev/spire-server.ts): join-token attestation, server authentication against the bundle held, an agent session
 * (authorized entries, X.509 and JWT SVIDs, bundles, renewal), what the server answers to an evicted and to a
 * banned agent, a server restart, a server that is down, and the k8s_psat attestor refusing evidence (its
 * kube-apiserver is not there). test/unit/agent/spire/client.test.ts covers what a real server never sends. Without
 * Go this suite skips, saying why; with KSP_REQUIRE_PEERS=1 (CI) a missing peer fails the run instead.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject, X509Certificate } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { bundleJson, makeDevPki } from '../../certs-dev/devpki.ts';
import { peer } from '../../dev/peers/peers.ts';
import { type SpireServer, startSpireServer } from '../../dev/spire-server.ts';
import { isAgentError } from '../../src/agent/errors.ts';
import { makeCsr, SpireServerClient, SpireServerError } from '../../src/agent/spire/client.ts';
import type { MintedX509Svid, SpireSession } from '../../src/agent/spire/types.ts';
import { BundleSet, SpiffeBundle } from '../../src/spiffe/bundle.ts';
import { TrustDomain } from '../../src/spiffe/id.ts';
import { verifyJwtSvid } from '../../src/spiffe/jwtsvid.ts';
import { verifyX509Svid } from '../../src/spiffe/x509svid.ts';

// Resolved at load time so that a missing Go becomes a visible skip of the whole suite.
const spire = peer('spire-server');
const skip = 'skip' in spire ? spire.skip : false;
const binary = 'path' in spire ? spire.path : '';

const TD = 'agent.test';
const FED = 'fed.test';
const grpcStatus = { INVALID_ARGUMENT: 3, NOT_FOUND: 5, PERMISSION_DENIED: 7, UNAVAILABLE: 14 } as const;

function newKey(): { privateKey: KeyObject; publicKey: KeyObject } {
  return generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
}

const spki = (key: KeyObject): Buffer => key.export({ type: 'spki', format: 'der' });

/** Polls `check` until it returns a value; fails after `ms`. */
async function waitFor<T>(what: string, check: () => Promise<T | undefined>, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await sleep(200);
  }
}

/** Asserts that `promise` rejects with a SpireServerError of `code`, and returns it. */
async function refusal(promise: Promise<unknown>, code: string): Promise<SpireServerError> {
  const err = await promise.then(
    () => assert.fail(`expected ${code}, got a result`),
    (e: unknown) => e,
  );
  assert.ok(err instanceof SpireServerError, `expected a SpireServerError, got ${String(err)}`);
  assert.ok(isAgentError(err), 'a SpireServerError is an AgentError');
  assert.equal(err.code, code, err.message);
  return err;
}

interface Agent {
  readonly svid: MintedX509Svid;
  readonly privateKey: KeyObject;
  readonly session: SpireSession;
}

describe('SpireServerClient against a real spire-server v1.13.3', { skip }, () => {
  let base: string;
  let server: SpireServer;
  let trustDomain: TrustDomain;
  let bundle: SpiffeBundle;
  let client: SpireServerClient;
  const sessions: SpireSession[] = [];

  /** Attests a new agent with a fresh join token and opens a session for it. */
  async function newAgent(): Promise<Agent> {
    const token = await server.createJoinToken();
    const { privateKey } = newKey();
    const { svid } = await client.attest(bundle, { type: 'join_token', token }, await makeCsr(privateKey));
    const session = client.session(bundle, { certificates: svid.certificates, privateKey });
    sessions.push(session);
    return { svid, privateKey, session };
  }

  before(async () => {
    // Short: the admin socket lives in here and sun_path holds 108 bytes.
    base = mkdtempSync('/tmp/ksp-sc-');
    const dir = join(base, 'server');
    mkdirSync(dir);
    server = await startSpireServer({ binary, trustDomain: TD, dir, cacheReloadInterval: '1s' });
    trustDomain = TrustDomain.parse(TD);
    bundle = SpiffeBundle.parse(trustDomain, await server.bundleShow());
    client = new SpireServerClient({
      address: { host: '127.0.0.1', port: server.serverPort },
      trustDomain,
      timeoutMs: 15_000,
    });
  });

  after(async () => {
    for (const s of sessions) s.close();
    await server?.stop();
    if (base) rmSync(base, { recursive: true, force: true });
  });

  it('attests with a join token: spiffe://<td>/spire/agent/join_token/<token>, not reattestable, for our key', async () => {
    assert.equal(client.serverId.toString(), `spiffe://${TD}/spire/server`);
    const token = await server.createJoinToken();
    const { privateKey, publicKey } = newKey();
    const { svid, reattestable } = await client.attest(
      bundle,
      { type: 'join_token', token },
      await makeCsr(privateKey, publicKey),
    );
    assert.equal(svid.id.toString(), `spiffe://${TD}/spire/agent/join_token/${token}`);
    assert.equal(reattestable, false);
    const leaf = svid.certificates[0];
    assert.ok(leaf !== undefined);
    assert.deepEqual(spki(leaf.publicKey), spki(publicKey));
    assert.equal(verifyX509Svid(svid.certificates, bundle).id.toString(), svid.id.toString());
    assert.equal(svid.expiresAt.getTime(), leaf.validToDate.getTime());
    assert.ok(svid.expiresAt.getTime() > Date.now());

    // A join token is good for one attestation.
    const again = await refusal(
      client.attest(bundle, { type: 'join_token', token }, await makeCsr(privateKey)),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
    assert.equal(again.grpcCode, grpcStatus.INVALID_ARGUMENT);
    assert.match(again.message, /join token does not exist or has already been used/);
    assert.ok(!again.message.includes(token), 'the token is not repeated in the error');
  });

  it('refuses a server its bundle does not vouch for, before the token is spent', async () => {
    const pki = await makeDevPki();
    const foreign = new SpiffeBundle(trustDomain, {
      x509Authorities: [new X509Certificate(pki.hub.rootPem)],
    });
    const token = await server.createJoinToken();
    const { privateKey } = newKey();
    const csr = await makeCsr(privateKey);
    const err = await refusal(
      client.attest(foreign, { type: 'join_token', token }, csr),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
    assert.equal(err.grpcCode, grpcStatus.UNAVAILABLE);
    assert.match(err.message, new RegExp(`presented spiffe://${TD}/spire/server`));
    assert.match(err.message, /does not chain/);

    // The right CA, but a server of another trust domain than the one expected.
    const elsewhere = TrustDomain.parse('elsewhere.test');
    const impostor = await refusal(
      new SpireServerClient({
        address: { host: '127.0.0.1', port: server.serverPort },
        trustDomain: elsewhere,
      }).attest(
        new SpiffeBundle(elsewhere, { x509Authorities: bundle.x509Authorities }),
        {
          type: 'join_token',
          token,
        },
        csr,
      ),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
    assert.match(
      impostor.message,
      new RegExp(`presented spiffe://${TD}/spire/server, expected spiffe://elsewhere.test/spire/server`),
    );

    // Neither handshake went as far as AttestAgent: the token is still good.
    const { svid } = await client.attest(bundle, { type: 'join_token', token }, csr);
    assert.equal(svid.id.toString(), `spiffe://${TD}/spire/agent/join_token/${token}`);
  });

  it('a bundle of another trust domain, or with no X.509 authority, is refused without a connection', async () => {
    const token = 'never-sent';
    const csr = await makeCsr(newKey().privateKey);
    await refusal(
      client.attest(
        SpiffeBundle.parse(TrustDomain.parse(FED), await server.bundleShow()),
        { type: 'join_token', token },
        csr,
      ),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
    await refusal(
      client.attest(new SpiffeBundle(trustDomain), { type: 'join_token', token }, csr),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
  });

  describe('an agent session', () => {
    let agent: Agent;
    let entryId: string;
    let fedRoots: string[];

    before(async () => {
      agent = await newAgent();
      const pki = await makeDevPki();
      await server.bundleSet(FED, bundleJson(pki.spoke, { sequence: 7, refreshHint: 120 }));
      fedRoots = [new X509Certificate(pki.spoke.rootPem).fingerprint256];
      entryId = await server.createEntry({
        spiffeId: `spiffe://${TD}/workload/a`,
        parentId: agent.svid.id.toString(),
        selectors: ['unix:uid:1000', 'unix:gid:2000'],
        x509SvidTtl: 900,
        jwtSvidTtl: 240,
        federatesWith: [FED],
        dnsNames: ['a.example.test'],
        hint: 'internal',
      });
    });

    it('authorizedEntries: the entry registered under the agent, every field converted', async () => {
      const entry = await waitFor('the entry to reach the agent', async () =>
        (await agent.session.authorizedEntries()).find((e) => e.id === entryId),
      );
      assert.equal(entry.spiffeId.toString(), `spiffe://${TD}/workload/a`);
      assert.equal(entry.parentId.toString(), agent.svid.id.toString());
      assert.deepEqual([...entry.selectors].sort(), ['unix:gid:2000', 'unix:uid:1000']);
      assert.equal(entry.x509SvidTtl, 900);
      assert.equal(entry.jwtSvidTtl, 240);
      assert.deepEqual(entry.federatesWith, [FED]);
      assert.deepEqual(entry.dnsNames, ['a.example.test']);
      assert.equal(entry.hint, 'internal');
      assert.equal(typeof entry.revisionNumber, 'bigint');
      assert.ok(entry.createdAt > 0 && entry.createdAt <= Date.now() / 1000 + 5);
      assert.equal(entry.admin, false);
      assert.equal(entry.downstream, false);
    });

    it('newX509Svids: an SVID per request, for the entry and the CSR key, chained to bundle(); an unknown entry is a per-item error', async () => {
      await waitFor('the entry to reach the agent', async () =>
        (await agent.session.authorizedEntries()).some((e) => e.id === entryId) ? true : undefined,
      );
      const first = newKey();
      const second = newKey();
      const results = await agent.session.newX509Svids([
        { entryId, csr: await makeCsr(first.privateKey) },
        { entryId: 'no-such-entry', csr: await makeCsr(second.privateKey) },
      ]);
      assert.equal(results.length, 2);
      const [ok, missing] = results;
      assert.ok(ok !== undefined && 'svid' in ok, JSON.stringify(ok));
      assert.equal(ok.entryId, entryId);
      assert.equal(ok.svid.id.toString(), `spiffe://${TD}/workload/a`);
      const leaf = ok.svid.certificates[0];
      assert.ok(leaf !== undefined);
      assert.deepEqual(spki(leaf.publicKey), spki(first.publicKey));
      assert.match(leaf.subjectAltName ?? '', /DNS:a\.example\.test/);
      // The entry's TTL, plus SPIRE's backdating of notBefore (10 s).
      const lifetime = (leaf.validToDate.getTime() - leaf.validFromDate.getTime()) / 1000;
      assert.ok(lifetime >= 900 && lifetime <= 960, `lifetime ${lifetime}`);
      const current = await agent.session.bundle();
      assert.equal(verifyX509Svid(ok.svid.certificates, current).id.toString(), `spiffe://${TD}/workload/a`);

      assert.ok(missing !== undefined && 'error' in missing, JSON.stringify(missing));
      assert.equal(missing.entryId, 'no-such-entry');
      assert.equal(missing.error.code, grpcStatus.NOT_FOUND);
      assert.match(missing.error.message, /not found or not authorized/);

      assert.deepEqual(await agent.session.newX509Svids([]), []);
    });

    it('newJwtSvid: a JWT-SVID verifiable with the JWT authorities of bundle()', async () => {
      await waitFor('the entry to reach the agent', async () =>
        (await agent.session.authorizedEntries()).some((e) => e.id === entryId) ? true : undefined,
      );
      const jwt = await agent.session.newJwtSvid(entryId, ['aud-1', 'aud-2']);
      assert.equal(jwt.id.toString(), `spiffe://${TD}/workload/a`);
      const current = await agent.session.bundle();
      const verified = await verifyJwtSvid(jwt.token, new BundleSet([current]), 'aud-2');
      assert.equal(verified.id.toString(), jwt.id.toString());
      assert.deepEqual([...verified.audience].sort(), ['aud-1', 'aud-2']);
      assert.equal(jwt.expiresAt.getTime(), verified.expiry.getTime());
      assert.equal(jwt.issuedAt.getTime(), verified.issuedAt?.getTime());
      // The entry's JWT TTL.
      assert.equal((jwt.expiresAt.getTime() - jwt.issuedAt.getTime()) / 1000, 240);
      // SPIRE does not repeat the entry's hint in the SVID it mints: the agent takes it from the entry.
      assert.equal(jwt.hint, '');

      const unknown = await refusal(agent.session.newJwtSvid('no-such-entry', ['aud']), 'ERR_AGENT_UPSTREAM');
      assert.equal(unknown.grpcCode, grpcStatus.NOT_FOUND);
    });

    it('bundle(): the trust domain bundle as `bundle show` has it', async () => {
      const current = await agent.session.bundle();
      const shown = SpiffeBundle.parse(trustDomain, await server.bundleShow());
      assert.equal(current.trustDomain.name, TD);
      assert.deepEqual(
        current.x509Authorities.map((c) => c.fingerprint256).sort(),
        shown.x509Authorities.map((c) => c.fingerprint256).sort(),
      );
      assert.deepEqual([...current.jwtAuthorities.keys()].sort(), [...shown.jwtAuthorities.keys()].sort());
      assert.ok(current.jwtAuthorities.size >= 1);
      assert.equal(current.sequence, shown.sequence);
      assert.equal(typeof current.refreshHint, 'number');
    });

    it('federatedBundle: undefined for a trust domain the server does not know; the bundle set for one it does', async () => {
      assert.equal(await agent.session.federatedBundle('unknown.test'), undefined);
      const fed = await agent.session.federatedBundle(FED);
      assert.ok(fed !== undefined);
      assert.equal(fed.trustDomain.name, FED);
      assert.deepEqual(
        fed.x509Authorities.map((c) => c.fingerprint256),
        fedRoots,
      );
      assert.equal(fed.sequence, 7n);
      assert.equal(fed.refreshHint, 120);
      // spiffe:// form accepted too.
      assert.equal((await agent.session.federatedBundle(`spiffe://${FED}`))?.trustDomain.name, FED);
    });

    it('deleteEntry: the entry leaves the authorized entries of the agent', async () => {
      const id = await server.createEntry({
        spiffeId: `spiffe://${TD}/workload/short-lived`,
        parentId: agent.svid.id.toString(),
        selectors: ['unix:uid:3000'],
      });
      await waitFor('the entry to reach the agent', async () =>
        (await agent.session.authorizedEntries()).some((e) => e.id === id) ? true : undefined,
      );
      await server.deleteEntry(id);
      await waitFor('the entry to leave the agent', async () =>
        (await agent.session.authorizedEntries()).some((e) => e.id === id) ? undefined : true,
      );
    });

    it('an aborted signal cancels the call and rejects with its reason', async () => {
      const controller = new AbortController();
      const reason = new Error('stop now');
      controller.abort(reason);
      await assert.rejects(agent.session.authorizedEntries(controller.signal), (e) => e === reason);
      const late = new AbortController();
      const pending = agent.session.bundle(late.signal);
      late.abort(reason);
      await assert.rejects(pending, (e) => e === reason);
    });
  });

  it('renewAgent: the same ID for the new key; once the new SVID is used the old one is refused as not active', async () => {
    const agent = await newAgent();
    const next = newKey();
    const renewed = await agent.session.renewAgent(await makeCsr(next.privateKey));
    assert.equal(renewed.id.toString(), agent.svid.id.toString());
    const leaf = renewed.certificates[0];
    assert.ok(leaf !== undefined);
    assert.deepEqual(spki(leaf.publicKey), spki(next.publicKey));
    assert.notEqual(leaf.serialNumber, agent.svid.certificates[0]?.serialNumber);
    assert.equal(verifyX509Svid(renewed.certificates, bundle).id.toString(), agent.svid.id.toString());

    const fresh = client.session(bundle, { certificates: renewed.certificates, privateKey: next.privateKey });
    sessions.push(fresh);
    await fresh.authorizedEntries();
    const stale = await refusal(agent.session.authorizedEntries(), 'ERR_AGENT_UPSTREAM');
    assert.equal(stale.grpcCode, grpcStatus.PERMISSION_DENIED);
    assert.equal(stale.denial, 'AGENT_NOT_ACTIVE');
    assert.equal(stale.reattest, true);
  });

  it('an evicted agent is refused as not attested (reattest); a banned one with ERR_AGENT_BANNED', async () => {
    const evicted = await newAgent();
    await evicted.session.authorizedEntries();
    await server.evictAgent(evicted.svid.id.toString());
    const notAttested = await refusal(evicted.session.authorizedEntries(), 'ERR_AGENT_UPSTREAM');
    assert.equal(notAttested.grpcCode, grpcStatus.PERMISSION_DENIED);
    assert.equal(notAttested.denial, 'AGENT_NOT_ATTESTED');
    assert.equal(notAttested.reattest, true);

    const banned = await newAgent();
    await banned.session.authorizedEntries();
    await server.banAgent(banned.svid.id.toString());
    const err = await refusal(banned.session.authorizedEntries(), 'ERR_AGENT_BANNED');
    assert.equal(err.grpcCode, grpcStatus.PERMISSION_DENIED);
    assert.equal(err.denial, 'AGENT_BANNED');
    assert.equal(err.reattest, false);
    await refusal(banned.session.renewAgent(await makeCsr(newKey().privateKey)), 'ERR_AGENT_BANNED');
    await refusal(banned.session.newJwtSvid('any', ['aud']), 'ERR_AGENT_BANNED');
    // GetBundle is open to any caller, banned or not.
    assert.equal((await banned.session.bundle()).trustDomain.name, TD);
  });

  it('a server that is down is ERR_AGENT_UPSTREAM (UNAVAILABLE); after a restart, same CA, the session works again', async () => {
    const agent = await newAgent();
    await agent.session.authorizedEntries();
    const roots = bundle.x509Authorities.map((c) => c.fingerprint256).sort();

    await server.pause();
    try {
      const down = await refusal(agent.session.authorizedEntries(), 'ERR_AGENT_UPSTREAM');
      assert.equal(down.grpcCode, grpcStatus.UNAVAILABLE);
      const token = 'not-sent';
      const attestDown = await refusal(
        client.attest(bundle, { type: 'join_token', token }, await makeCsr(newKey().privateKey)),
        'ERR_AGENT_UPSTREAM',
      );
      assert.equal(attestDown.grpcCode, grpcStatus.UNAVAILABLE);
    } finally {
      await server.resume();
    }

    const after = SpiffeBundle.parse(trustDomain, await server.bundleShow());
    assert.deepEqual(after.x509Authorities.map((c) => c.fingerprint256).sort(), roots);
    // The channel reconnects by itself (backoff at most 5 s); the agent is still known to the server.
    const entries = await waitFor('the session to work again', () =>
      agent.session.authorizedEntries().then(
        (e) => e,
        (err: unknown) => {
          if (err instanceof SpireServerError && err.grpcCode === grpcStatus.UNAVAILABLE) return undefined;
          throw err;
        },
      ),
    );
    assert.ok(Array.isArray(entries));
    // And a new attestation works against the restarted server, with the same bootstrap bundle.
    await newAgent();
  });
});

describe('SpireServerClient against a spire-server with the k8s_psat attestor', { skip }, () => {
  let base: string;
  let server: SpireServer;
  let client: SpireServerClient;
  let bundle: SpiffeBundle;

  before(async () => {
    base = mkdtempSync('/tmp/ksp-sk-');
    const dir = join(base, 'server');
    mkdirSync(dir);
    // A kubeconfig pointing nowhere: attestation reaches TokenReview and fails there.
    const kubeConfigFile = join(base, 'kubeconfig');
    writeFileSync(
      kubeConfigFile,
      [
        'apiVersion: v1',
        'kind: Config',
        'clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]',
        'users: [{name: u, user: {token: "unused"}}]',
        'contexts: [{name: c, context: {cluster: c, user: u}}]',
        'current-context: c',
        '',
      ].join('\n'),
    );
    server = await startSpireServer({
      binary,
      trustDomain: TD,
      dir,
      nodeAttestors: {
        k8sPsat: {
          clusters: {
            'cluster-a': {
              serviceAccountAllowList: ['spire:spire-agent'],
              kubeConfigFile,
              audience: ['spire-server'],
            },
          },
        },
      },
    });
    const trustDomain = TrustDomain.parse(TD);
    bundle = SpiffeBundle.parse(trustDomain, await server.bundleShow());
    client = new SpireServerClient({ address: { host: '127.0.0.1', port: server.serverPort }, trustDomain });
  });

  after(async () => {
    await server?.stop();
    if (base) rmSync(base, { recursive: true, force: true });
  });

  it('a cluster the server is not configured for is refused evidence; a failed TokenReview is an upstream failure', async () => {
    const csr = await makeCsr(newKey().privateKey);
    const unknown = await refusal(
      client.attest(bundle, { type: 'k8s_psat', cluster: 'cluster-b', token: 'x.y.z' }, csr),
      'ERR_AGENT_UPSTREAM_AUTH',
    );
    assert.equal(unknown.grpcCode, grpcStatus.INVALID_ARGUMENT);
    assert.match(unknown.message, /not configured for cluster "cluster-b"/);

    const review = await refusal(
      client.attest(bundle, { type: 'k8s_psat', cluster: 'cluster-a', token: 'x.y.z' }, csr),
      'ERR_AGENT_UPSTREAM',
    );
    assert.match(review.message, /TokenReview/);
  });
});
