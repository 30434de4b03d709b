/**
 * Our agent as a SPIRE agent (issuer: spire) against a real SPIRE server (v1.13.3, sqlite, loopback), with real
 * clients on our socket: SPIRE's own `spire-agent api fetch` and a go-spiffe v2 program (dev/peers/gospiffe).
 * Join-token attestation, entries created with SPIRE's CLI, the server's CA rotation and an entry deletion
 * reaching the caller, a server outage served from the cache, a restart of the agent from its state directory,
 * and a ban. Without Go this suite skips, saying why; with KSP_REQUIRE_PEERS=1 (CI) a missing peer fails instead.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import type { X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { pino } from 'pino';
import { peer } from '../../dev/peers/peers.ts';
import { type SpireServer, startSpireServer } from '../../dev/spire-server.ts';
import { LocalCa } from '../../src/agent/ca.ts';
import { AgentErrorCode } from '../../src/agent/errors.ts';
import { SpireAgent, type SpireAgentOptions } from '../../src/agent/spire/agent.ts';
import { BundleSet, SpiffeBundle } from '../../src/spiffe/bundle.ts';
import { TrustDomain } from '../../src/spiffe/id.ts';
import { verifyJwtSvid } from '../../src/spiffe/jwtsvid.ts';
import { parseCertificates, verifyX509Svid } from '../../src/spiffe/x509svid.ts';
import { CLI, cliEnv } from '../helpers/cli.ts';

// Never execFileSync here: the agent answers from this process's event loop.
const run = promisify(execFile);
const uid = process.getuid?.() ?? 0;

// Resolved at load time so that a missing Go becomes a visible skip of the whole suite.
const spireServerPeer = peer('spire-server');
const spireAgentPeer = peer('spire-agent');
const gospiffePeer = peer('gospiffe-probe');
const skip =
  'skip' in spireServerPeer
    ? spireServerPeer.skip
    : 'skip' in spireAgentPeer
      ? spireAgentPeer.skip
      : 'skip' in gospiffePeer
        ? gospiffePeer.skip
        : false;

const TD = TrustDomain.parse('hub.test');
const OTHER = TrustDomain.parse('other.test');
const log = pino({ level: process.env.KSP_TEST_LOG ?? 'silent' });

async function waitFor<T>(
  what: string | (() => string),
  check: () => Promise<T | undefined> | T | undefined,
  ms = 60_000,
): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value !== undefined && value !== false) return value;
    } catch (err) {
      last = err;
    }
    await sleep(250);
  }
  const said = typeof what === 'string' ? what : what();
  throw new Error(`timed out waiting for ${said}${last ? `: ${(last as Error).message}` : ''}`);
}

interface FetchedSvid {
  spiffe_id: string;
  x509_svid: string;
  x509_svid_key: string;
  bundle: string;
  hint: string;
}
interface Fetched {
  svids: FetchedSvid[];
  federated_bundles: Record<string, string>;
}

describe('our agent with a SPIRE server as its issuer (join_token, real spire-server and clients)', {
  skip,
}, () => {
  const spireAgent = 'path' in spireAgentPeer ? spireAgentPeer.path : '';
  const probe = 'path' in gospiffePeer ? gospiffePeer.path : '';
  let dir: string;
  let server: SpireServer;
  let agent: SpireAgent;
  let options: SpireAgentOptions;
  let token: string;
  let agentId: string;
  let entryId: string;
  let otherBundle: SpiffeBundle;

  const socketPath = (): string => join(dir, 'sock', 'agent.sock');

  async function fetchX509(): Promise<Fetched> {
    const { stdout } = await run(spireAgent, [
      'api',
      'fetch',
      'x509',
      '-socketPath',
      socketPath(),
      '-output',
      'json',
      '-timeout',
      '10s',
    ]);
    return JSON.parse(stdout) as Fetched;
  }

  async function serverBundle(): Promise<SpiffeBundle> {
    return SpiffeBundle.parse(TD, await server.bundleShow('spiffe'));
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-spire-agent-'));
    mkdirSync(join(dir, 'server'));
    mkdirSync(join(dir, 'sock'), { mode: 0o755 });
    server = await startSpireServer({
      binary: 'path' in spireServerPeer ? spireServerPeer.path : '',
      trustDomain: TD.name,
      dir: join(dir, 'server'),
      cacheReloadInterval: '1s',
      logLevel: 'INFO',
    });
    const other = await LocalCa.create({ trustDomain: OTHER });
    otherBundle = other.bundle;
    await server.bundleSet(OTHER.name, otherBundle.marshal(), 'spiffe');
    token = await server.createJoinToken();
    agentId = `spiffe://${TD.name}/spire/agent/join_token/${token}`;
    entryId = await server.createEntry({
      spiffeId: `spiffe://${TD.name}/workload`,
      parentId: agentId,
      selectors: [`unix:uid:${uid}`],
      hint: 'interop',
      federatesWith: [OTHER.name],
      x509SvidTtl: 30,
    });
    const bootstrap = join(dir, 'bootstrap.pem');
    writeFileSync(bootstrap, await server.bundleShow('pem'));
    options = {
      trustDomain: TD,
      socketPath: socketPath(),
      stateDir: join(dir, 'state'),
      spire: {
        serverAddress: { host: '127.0.0.1', port: server.serverPort },
        bootstrapBundle: bootstrap,
        nodeAttestor: { type: 'join_token', token },
        syncIntervalMs: 1000,
      },
      logger: log,
    };
    agent = await SpireAgent.start(options);
    await waitFor('the entry SVID', () => agent.upstream.x509For(entryId));
  });

  after(async () => {
    await agent?.close();
    await server?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('attests with the join token and serves the entry SVID: spire-agent api fetch x509 reads it', async () => {
    assert.equal(agent.upstream.status().agentId, agentId);
    const metrics = await agent.metrics.metrics();
    assert.match(metrics, /^ksp_agent_spire_entries 1$/m);
    assert.match(metrics, /^ksp_agent_spire_x509_svids 1$/m);
    assert.match(metrics, /^ksp_agent_spire_syncs_total\{result="ok"\} [1-9]/m);
    assert.match(metrics, /^ksp_agent_spire_consecutive_failures 0$/m);
    assert.doesNotMatch(metrics, /ksp_agent_ca_generation \d/, 'no CA of our own');
    const fetched = await fetchX509();
    assert.equal(fetched.svids.length, 1);
    const [svid] = fetched.svids;
    assert.equal(svid?.spiffe_id, `spiffe://${TD.name}/workload`);
    assert.equal(svid?.hint, 'interop');
    const chain = parseCertificates(Buffer.from(svid?.x509_svid ?? '', 'base64'));
    assert.equal(verifyX509Svid(chain, await serverBundle()).id.toString(), `spiffe://${TD.name}/workload`);
    const roots = parseCertificates(Buffer.from(svid?.bundle ?? '', 'base64'));
    assert.deepEqual(
      roots.map((c) => c.fingerprint256).sort(),
      (await serverBundle()).x509Authorities.map((c) => c.fingerprint256).sort(),
    );
    assert.deepEqual(Object.keys(fetched.federated_bundles), [`spiffe://${OTHER.name}`]);
    const fed = parseCertificates(
      Buffer.from(fetched.federated_bundles[`spiffe://${OTHER.name}`] ?? '', 'base64'),
    );
    assert.deepEqual(
      fed.map((c) => c.fingerprint256),
      otherBundle.x509Authorities.map((c) => c.fingerprint256),
    );
  });

  it('go-spiffe gets the SVID and verifies it against the bundle it came with', async () => {
    const { stdout } = await run(probe, ['x509', '-socket', `unix://${socketPath()}`, '-timeout', '30s']);
    const update = stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((e) => e.event === 'x509');
    assert.ok(update, stdout);
    assert.equal(update.id, `spiffe://${TD.name}/workload`);
    assert.equal(update.hint, 'interop');
    assert.equal(update.verified, true, String(update.verify_error));
    assert.deepEqual(update.trust_domains, [`spiffe://${TD.name}`, `spiffe://${OTHER.name}`]);
  });

  it('serves JWT-SVIDs the server minted: spire-agent api fetch jwt, verified with the server bundle', async () => {
    const { stdout } = await run(spireAgent, [
      'api',
      'fetch',
      'jwt',
      '-audience',
      'spoke-apiserver',
      '-socketPath',
      socketPath(),
      '-output',
      'json',
    ]);
    const [svids] = JSON.parse(stdout) as [{ svids: { spiffe_id: string; svid: string; hint: string }[] }];
    const jwt = svids.svids[0];
    assert.equal(jwt?.spiffe_id, `spiffe://${TD.name}/workload`);
    assert.equal(jwt?.hint, 'interop');
    const verified = await verifyJwtSvid(
      jwt?.svid ?? '',
      new BundleSet([await serverBundle()]),
      'spoke-apiserver',
    );
    assert.equal(verified.id.toString(), `spiffe://${TD.name}/workload`);
  });

  it("carries the server's X.509 CA rotation to the caller: the new root, then an SVID signed under it", async () => {
    const before = new Set((await serverBundle()).x509Authorities.map((c) => c.fingerprint256));
    await server.rotateX509Authority();
    const newRoot = await waitFor('the new root in the bundle the caller gets', async () => {
      const fetched = await fetchX509();
      const roots = parseCertificates(Buffer.from(fetched.svids[0]?.bundle ?? '', 'base64'));
      return roots.find((r) => !before.has(r.fingerprint256));
    });
    // SVIDs are re-minted at half-life (the entry's 30 s TTL): the next one is signed by the active, new root.
    await waitFor(
      'an SVID under the new root',
      async () => {
        const fetched = await fetchX509();
        const chain = parseCertificates(Buffer.from(fetched.svids[0]?.x509_svid ?? '', 'base64'));
        const top = chain.at(-1) as X509Certificate;
        return top.checkIssued(newRoot) && top.verify(newRoot.publicKey) ? true : undefined;
      },
      90_000,
    );
  });

  it('moves an SVID off a root the server taints, long before its half-life', async () => {
    const long = await server.createEntry({
      spiffeId: `spiffe://${TD.name}/long-lived`,
      parentId: agentId,
      selectors: [`unix:uid:${uid}`],
      hint: 'long',
      x509SvidTtl: 3600,
    });
    const first = await waitFor('the long-lived SVID', () => agent.upstream.x509For(long));
    const before = new Set((await serverBundle()).x509Authorities.map((c) => c.fingerprint256));
    await server.rotateX509Authority();
    const old = (await server.x509Authorities()).old;
    assert.ok(old, 'the authority the rotation replaced');
    await server.taintX509Authority(old.authorityId);
    const newRoot = (await serverBundle()).x509Authorities.find((c) => !before.has(c.fingerprint256));
    assert.ok(newRoot);
    // Half-life is 30 minutes away: only the taint can move it now.
    const moved = await waitFor('the long-lived SVID under the new root', () => {
      const held = agent.upstream.x509For(long);
      const top = held && parseCertificates(held.chainDer).at(-1);
      return top && held !== first && top.verify(newRoot.publicKey) ? held : undefined;
    });
    assert.equal(moved.id.toString(), `spiffe://${TD.name}/long-lived`);
    await server.deleteEntry(long);
  });

  it('carries an entry deletion to the caller', async () => {
    const second = await server.createEntry({
      spiffeId: `spiffe://${TD.name}/second`,
      parentId: agentId,
      selectors: [`unix:uid:${uid}`],
      hint: 'second',
    });
    await waitFor('two SVIDs', async () => ((await fetchX509()).svids.length === 2 ? true : undefined));
    await server.deleteEntry(second);
    await waitFor('the deleted entry gone', async () => {
      const fetched = await fetchX509();
      return fetched.svids.length === 1 && fetched.svids[0]?.spiffe_id === `spiffe://${TD.name}/workload`
        ? true
        : undefined;
    });
    assert.equal(agent.upstream.x509For(second), undefined);
  });

  it('keeps serving the cached SVID while the server is down, and resumes sync when it is back', async () => {
    const held = (await fetchX509()).svids[0]?.x509_svid;
    await server.pause();
    try {
      await agent.upstream.syncNow();
      await waitFor('a failed sync', () =>
        agent.upstream.status().consecutiveFailures > 0 ? true : undefined,
      );
      assert.equal(agent.upstream.status().lastError?.code, AgentErrorCode.Upstream);
      const during = await fetchX509();
      assert.equal(during.svids[0]?.spiffe_id, `spiffe://${TD.name}/workload`);
      assert.equal(during.svids[0]?.x509_svid, held, 'the very SVID held before the outage');
      assert.equal(agent.readiness().ready, true, 'a dark server alone does not make the agent unready');
      assert.match(
        await agent.metrics.metrics(),
        /^ksp_agent_spire_sync_errors_total\{code="ERR_AGENT_UPSTREAM"\} [1-9]/m,
      );
    } finally {
      await server.resume();
    }
    const later = await server.createEntry({
      spiffeId: `spiffe://${TD.name}/after-restart`,
      parentId: agentId,
      selectors: [`unix:uid:${uid}`],
      hint: 'after',
    });
    await waitFor('the entry created after the restart', () => agent.upstream.x509For(later));
    assert.equal(agent.upstream.status().consecutiveFailures, 0);
    await server.deleteEntry(later);
  });

  it('restarts from its state directory without the spent join token', async () => {
    await agent.close();
    agent = await SpireAgent.start({
      ...options,
      spire: { ...options.spire, nodeAttestor: { type: 'join_token' } },
    });
    await waitFor('the entry SVID after the restart', () => agent.upstream.x509For(entryId));
    assert.equal(agent.upstream.status().agentId, agentId);
    assert.equal((await fetchX509()).svids[0]?.spiffe_id, `spiffe://${TD.name}/workload`);
  });

  it('the agent command: agent.yaml with issuer: spire and --join-token; a ban exits with status 1', async () => {
    const cliToken = await server.createJoinToken();
    const cliAgentId = `spiffe://${TD.name}/spire/agent/join_token/${cliToken}`;
    const cliEntry = await server.createEntry({
      spiffeId: `spiffe://${TD.name}/from-cli`,
      parentId: cliAgentId,
      selectors: [`unix:uid:${uid}`],
    });
    const cliDir = join(dir, 'cli');
    mkdirSync(join(cliDir, 'sock'), { recursive: true, mode: 0o755 });
    const cliSocket = join(cliDir, 'sock', 'agent.sock');
    // The server's CA rotated in an earlier test: its SVID is now signed by the new root, so the bundle written
    // at the start would no longer authenticate it (ERR_AGENT_UPSTREAM_AUTH). Bootstrap with the current one.
    const bootstrap = join(cliDir, 'bootstrap.pem');
    writeFileSync(bootstrap, await server.bundleShow('pem'));
    const config = join(cliDir, 'agent.yaml');
    writeFileSync(
      config,
      [
        `trustDomain: ${TD.name}`,
        'issuer: spire',
        'spire:',
        `  serverAddress: 127.0.0.1:${server.serverPort}`,
        `  bootstrapBundle: ${bootstrap}`,
        '  nodeAttestor:',
        '    joinToken:',
        '  syncInterval: 1s',
        `socketPath: ${cliSocket}`,
        `stateDir: ${join(cliDir, 'state')}`,
        '',
      ].join('\n'),
    );
    const child = spawn(process.execPath, [CLI, 'agent', '--config', config, '--join-token', cliToken], {
      env: cliEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (d: Buffer) => {
      output += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      output += d.toString();
    });
    const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
    try {
      const fetched = await waitFor(
        `the SVID through the agent command (its output: ${output.slice(-3000)})`,
        async () => {
          const { stdout } = await run(spireAgent, [
            'api',
            'fetch',
            'x509',
            '-socketPath',
            cliSocket,
            '-output',
            'json',
          ]);
          const f = JSON.parse(stdout) as Fetched;
          return f.svids.find((v) => v.spiffe_id === `spiffe://${TD.name}/from-cli`);
        },
      );
      assert.ok(fetched);
      // The token is spent once attestation succeeded; it lives on only inside the agent's SPIFFE ID.
      assert.ok(
        !output.replaceAll(`join_token/${cliToken}`, '').includes(cliToken),
        'the join token is logged only as part of the agent ID',
      );
      assert.doesNotMatch(output, /sync with the SPIRE server failed/, 'a clean first sync');
      await server.banAgent(cliAgentId);
      const [code] = await exited;
      assert.equal(code, 1, output);
      assert.match(output, /ERR_AGENT_BANNED/);
    } finally {
      child.kill('SIGKILL');
      await server.deleteEntry(cliEntry);
    }
  });

  it('stops, and forgets its SVID, when the server bans it', async () => {
    await server.banAgent(agentId);
    const reason = await agent.stopped;
    assert.equal(reason.code, AgentErrorCode.Banned);
    assert.equal(agent.readiness().ready, false);
    assert.throws(() => readFileSync(join(dir, 'state', 'spire-agent.json')), /ENOENT/);
  });
});
