/**
 * SpireUpstream against a stand-in SPIRE server (in-process, named StandInServer below): two local CAs play the
 * server's authorities, CSRs are signed for real, and the stand-in can fail, ban, evict and rotate on demand.
 * The real server is in test/interop/spire-agent.test.ts; this suite pins the agent's own decisions.
 */
import assert from 'node:assert/strict';
import { type KeyObject, webcrypto } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { pino } from 'pino';
import { LocalCa } from '../../../../src/agent/ca.ts';
import { AgentError, AgentErrorCode } from '../../../../src/agent/errors.ts';
import { toSigningKey, x509 } from '../../../../src/agent/keys.ts';
import type {
  MintedJwtSvid,
  MintedX509Svid,
  NodeAttestation,
  SpireEntry,
  SpireSession,
  X509SvidResult,
} from '../../../../src/agent/spire/types.ts';
import { SpireUpstream, type SpireUpstreamOptions } from '../../../../src/agent/spire/upstream.ts';
import { StateDir } from '../../../../src/config/statedir.ts';
import { SpiffeBundle } from '../../../../src/spiffe/bundle.ts';
import { SpiffeId, TrustDomain } from '../../../../src/spiffe/id.ts';
import { mintJwtSvid } from '../../../../src/spiffe/jwtsvid.ts';
import { parseCertificates, verifyX509Svid } from '../../../../src/spiffe/x509svid.ts';

const TD = TrustDomain.parse('hub.test');
const log = pino({ level: 'silent' });

/** A PKCS#10 request for the key pair (a stand-in for client.ts makeCsr, so this suite needs no gRPC). */
async function makeCsr(privateKey: KeyObject, publicKey: KeyObject): Promise<Buffer> {
  const signingKey = toSigningKey(privateKey);
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: 'O=SPIRE',
    keys: {
      privateKey: signingKey,
      publicKey: publicKey.toCryptoKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['verify']),
    },
    signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
  });
  return Buffer.from(csr.rawData);
}

async function csrKey(csr: Buffer): Promise<webcrypto.CryptoKey> {
  return new x509.Pkcs10CertificateRequest(csr).publicKey.export(webcrypto);
}

function entry(id: string, path: string, selectors: string[], extra: Partial<SpireEntry> = {}): SpireEntry {
  return {
    id,
    spiffeId: SpiffeId.parse(`spiffe://hub.test${path}`),
    parentId: SpiffeId.parse('spiffe://hub.test/spire/agent/join_token/t1'),
    selectors,
    x509SvidTtl: 0,
    jwtSvidTtl: 0,
    federatesWith: [],
    dnsNames: [],
    hint: '',
    revisionNumber: 0n,
    createdAt: 1,
    admin: false,
    downstream: false,
    ...extra,
  };
}

/** The stand-in SPIRE server. */
class StandInServer {
  readonly calls = { attest: 0, renew: 0, entries: 0, x509: 0, jwt: 0 };
  signer!: LocalCa;
  bundle!: SpiffeBundle;
  entries: SpireEntry[] = [];
  federated = new Map<string, SpiffeBundle>();
  down = false;
  banned = false;
  evicted = false;
  reattestable = false;
  agentTtlSeconds = 3600;
  tokens = new Set(['t1']);
  svidTtlSeconds = 3600;
  /** Mint JWT-SVIDs for this audience instead of the one asked for (a misbehaving server). */
  jwtAudience: string[] | undefined;
  /** Fingerprints of the roots GetBundle marks tainted. */
  tainted = new Set<string>();

  async init(): Promise<void> {
    this.signer = await LocalCa.create({ trustDomain: TD });
    this.bundle = this.signer.bundle;
  }

  async #sign(id: SpiffeId, csr: Buffer, ttlSeconds: number): Promise<MintedX509Svid> {
    const signed = await this.signer.signX509Svid({ id, publicKey: await csrKey(csr), ttlSeconds });
    return { id, certificates: signed.certificates, expiresAt: signed.notAfter };
  }

  #gate(): void {
    if (this.down) throw new AgentError(AgentErrorCode.Upstream, 'stand-in: unavailable');
    if (this.banned) throw new AgentError(AgentErrorCode.Banned, 'stand-in: agent is banned');
    if (this.evicted) {
      // As client.ts marks PermissionDenied AGENT_NOT_ATTESTED.
      throw Object.assign(new AgentError(AgentErrorCode.Upstream, 'stand-in: agent is not attested'), {
        reattest: true,
      });
    }
  }

  connector(): SpireUpstreamOptions['connector'] {
    return {
      attest: async (_bundle, attestation: NodeAttestation, csr) => {
        this.calls.attest++;
        if (this.down) throw new AgentError(AgentErrorCode.Upstream, 'stand-in: unavailable');
        const token = attestation.type === 'join_token' ? attestation.token : attestation.cluster;
        if (attestation.type === 'join_token' && !this.tokens.delete(token)) {
          throw new AgentError(
            AgentErrorCode.UpstreamAuth,
            'stand-in: join token does not exist or has already been used',
          );
        }
        this.evicted = false;
        const id = SpiffeId.parse(`spiffe://hub.test/spire/agent/${attestation.type}/${token}`);
        return { svid: await this.#sign(id, csr, this.agentTtlSeconds), reattestable: this.reattestable };
      },
      session: (): SpireSession => ({
        authorizedEntries: async () => {
          this.calls.entries++;
          this.#gate();
          return this.entries;
        },
        newX509Svids: async (requests): Promise<X509SvidResult[]> => {
          this.#gate();
          return Promise.all(
            requests.map(async ({ entryId, csr }) => {
              this.calls.x509++;
              const e = this.entries.find((x) => x.id === entryId);
              if (e === undefined) return { entryId, error: { code: 5, message: 'entry not found' } };
              return { entryId, svid: await this.#sign(e.spiffeId, csr, this.svidTtlSeconds) };
            }),
          );
        },
        newJwtSvid: async (entryId, audience): Promise<MintedJwtSvid> => {
          this.calls.jwt++;
          this.#gate();
          const e = this.entries.find((x) => x.id === entryId);
          if (e === undefined) throw new AgentError(AgentErrorCode.Upstream, 'stand-in: no entry');
          const minted = await mintJwtSvid({
            id: e.spiffeId,
            audience: this.jwtAudience ?? audience,
            signer: this.signer.jwtSigner().signer,
            ttlSeconds: 300,
          });
          return {
            id: e.spiffeId,
            token: minted.token,
            expiresAt: minted.expiry,
            issuedAt: minted.issuedAt ?? new Date(),
            hint: '',
          };
        },
        bundle: async () => {
          this.#gate();
          return this.bundle;
        },
        federatedBundle: async (name) => {
          this.#gate();
          return this.federated.get(name);
        },
        taintedX509Authorities: () => this.tainted,
        renewAgent: async (csr) => {
          this.calls.renew++;
          this.#gate();
          return this.#sign(
            SpiffeId.parse('spiffe://hub.test/spire/agent/join_token/t1'),
            csr,
            this.agentTtlSeconds,
          );
        },
        close: () => undefined,
      }),
    };
  }
}

describe('SpireUpstream (stand-in SPIRE server)', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-spire-upstream-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  async function setup(
    name: string,
    tweak: (s: StandInServer) => void = () => undefined,
    extra: Partial<SpireUpstreamOptions> = {},
  ): Promise<{ server: StandInServer; stateDir: StateDir; start: () => Promise<SpireUpstream> }> {
    const server = new StandInServer();
    await server.init();
    server.entries = [entry('e1', '/web', ['unix:uid:1000'])];
    tweak(server);
    const stateDir = await StateDir.open(join(dir, name), { create: true });
    const bootstrap = server.bundle;
    const start = (): Promise<SpireUpstream> =>
      SpireUpstream.start({
        trustDomain: TD,
        connector: server.connector(),
        makeCsr,
        bootstrapBundle: bootstrap,
        attestation: async () => ({ type: 'join_token', token: 't1' }),
        stateDir,
        syncIntervalMs: 3_600_000,
        logger: log,
        ...extra,
      });
    return { server, stateDir, start };
  }

  it('attests once, serves the entry SVID signed for its own key, and resumes from the state directory', async () => {
    const { server, start } = await setup('resume');
    const up = await start();
    await up.syncNow();
    assert.equal(server.calls.attest, 1);
    assert.equal(up.ready, true);
    const [matched] = up.match(new Set(['unix:uid:1000', 'unix:gid:0']));
    assert.ok(matched);
    const svid = up.x509For(matched.entry.id);
    assert.ok(svid);
    assert.equal(svid.id.toString(), 'spiffe://hub.test/web');
    const verified = verifyX509Svid(parseCertificates(svid.chainDer), up.bundle);
    assert.equal(verified.id.toString(), 'spiffe://hub.test/web');
    assert.deepEqual(up.match(new Set(['unix:uid:1001'])), []);
    await up.close();

    // The join token is spent: a restart must not need it.
    const again = await start();
    await again.syncNow();
    assert.equal(server.calls.attest, 1, 'resumed the agent SVID instead of attesting again');
    assert.equal(again.status().agentId, 'spiffe://hub.test/spire/agent/join_token/t1');
    await again.close();
  });

  it('keeps serving what it holds while the server is down, backs off, and recovers', async () => {
    const { server, start } = await setup('down');
    const up = await start();
    await up.syncNow();
    const before = up.x509For('e1');
    server.down = true;
    await up.syncNow();
    await up.syncNow();
    assert.equal(up.status().consecutiveFailures, 2);
    assert.equal(up.status().lastError?.code, AgentErrorCode.Upstream);
    assert.equal(up.x509For('e1'), before, 'the cached SVID is still served');
    server.down = false;
    server.entries = [...server.entries, entry('e2', '/api', ['unix:uid:1000'], { createdAt: 2 })];
    await up.syncNow();
    assert.equal(up.status().consecutiveFailures, 0);
    assert.deepEqual(
      up.match(new Set(['unix:uid:1000'])).map((s) => s.entry.id),
      ['e1', 'e2'],
    );
    assert.ok(up.x509For('e2'));
    await up.close();
  });

  it('drops a deleted entry, re-mints an edited one, and tells listeners', async () => {
    const { server, start } = await setup('edit', (s) => {
      s.entries = [
        entry('e1', '/web', ['unix:uid:1000']),
        entry('e2', '/api', ['unix:uid:1000'], { createdAt: 2 }),
      ];
    });
    const up = await start();
    await up.syncNow();
    const first = up.x509For('e1');
    let changes = 0;
    up.on('change', () => changes++);
    server.entries = [entry('e1', '/web', ['unix:uid:1000'], { revisionNumber: 1n, hint: 'external' })];
    await up.syncNow();
    assert.equal(up.x509For('e2'), undefined);
    const second = up.x509For('e1');
    assert.ok(second && first && !second.chainDer.equals(first.chainDer), 'the edited entry got a new SVID');
    assert.equal(second.hint, 'external');
    assert.ok(changes >= 1);
    await up.syncNow();
    assert.equal(up.x509For('e1'), second, 'nothing changed, nothing re-minted');
    await up.close();
  });

  it('re-mints under the new root when the server rotates its CA and drops the old root', async () => {
    const { server, start } = await setup('rotate');
    const up = await start();
    await up.syncNow();
    const old = up.x509For('e1');
    const next = await LocalCa.create({ trustDomain: TD });
    // Prepared: both roots published, the old one still signing; the SVID stays.
    server.bundle = new SpiffeBundle(TD, {
      x509Authorities: [...server.bundle.x509Authorities, ...next.bundle.x509Authorities],
      jwtAuthorities: [...server.signer.bundle.jwtAuthorities].map(([kid, publicKey]) => ({
        kid,
        publicKey,
      })),
      sequence: 2n,
    });
    await up.syncNow();
    assert.equal(up.bundle.x509Authorities.length, 2);
    assert.equal(up.x509For('e1'), old);
    // Activated and the old root removed: an SVID under it is re-minted by the new signer.
    server.signer = next;
    server.bundle = new SpiffeBundle(TD, { x509Authorities: next.bundle.x509Authorities, sequence: 3n });
    await up.syncNow();
    const fresh = up.x509For('e1');
    assert.ok(fresh && fresh !== old);
    verifyX509Svid(parseCertificates(fresh.chainDer), up.bundle);
    await up.close();
  });

  it('moves SVIDs off a root the server taints, before their half-life', async () => {
    const { server, start } = await setup('taint');
    const up = await start();
    await up.syncNow();
    const old = up.x509For('e1');
    const oldRoot = server.bundle.x509Authorities[0];
    assert.ok(old && oldRoot);
    const next = await LocalCa.create({ trustDomain: TD });
    server.signer = next;
    server.bundle = new SpiffeBundle(TD, {
      x509Authorities: [oldRoot, ...next.bundle.x509Authorities],
      sequence: 2n,
    });
    await up.syncNow();
    assert.equal(up.x509For('e1'), old, 'a second root alone changes nothing');
    server.tainted = new Set([oldRoot.fingerprint256]);
    await up.syncNow();
    const fresh = up.x509For('e1');
    assert.ok(fresh && fresh !== old);
    const top = parseCertificates(fresh.chainDer).at(-1);
    assert.ok(
      top?.verify(next.bundle.x509Authorities[0]?.publicKey as KeyObject),
      'signed under the new root',
    );
    assert.equal(server.calls.renew, 0);
    await up.syncNow();
    assert.equal(up.x509For('e1'), fresh, 'no re-mint loop once off the tainted root');
    assert.equal(server.calls.renew, 1, "the agent's own SVID, under the tainted root too, was renewed");
    await up.syncNow();
    assert.equal(server.calls.renew, 1, 'and only once');
    await up.close();
  });

  it('stops and forgets its SVID when banned', async () => {
    const { server, stateDir, start } = await setup('ban');
    const up = await start();
    await up.syncNow();
    const banned = new Promise<AgentError>((resolve) => up.once('banned', resolve));
    server.banned = true;
    await up.syncNow();
    const err = await banned;
    assert.equal(err.code, AgentErrorCode.Banned);
    assert.equal(up.ready, false);
    assert.equal(up.status().banned, true);
    assert.equal(await stateDir.read('spire-agent.json'), undefined, 'the agent SVID is removed');
    const attempts = server.calls.entries;
    await up.syncNow();
    assert.equal(server.calls.entries, attempts, 'no more syncs after a ban');
    await up.close();
  });

  it('attests again when evicted, if its attestor allows it', async () => {
    const { server } = await setup('evict', (s) => {
      s.reattestable = true;
      s.tokens = new Set(['t1', 't1b']);
    });
    let token = 't1';
    const up = await SpireUpstream.start({
      trustDomain: TD,
      connector: server.connector(),
      makeCsr,
      bootstrapBundle: server.bundle,
      attestation: async () => ({ type: 'join_token', token }),
      syncIntervalMs: 3_600_000,
      logger: log,
    });
    await up.syncNow();
    assert.equal(server.calls.attest, 1);
    server.evicted = true;
    token = 't1b';
    await up.syncNow();
    assert.equal(server.calls.attest, 2);
    assert.equal(up.status().consecutiveFailures, 0);
    await up.close();
  });

  it('renews its own SVID with RenewAgent at half-life when it cannot re-attest', async () => {
    let now = Date.now();
    const { server, start } = await setup('renew', () => undefined, { now: () => new Date(now) });
    const up = await start();
    await up.syncNow();
    assert.equal(server.calls.renew, 0);
    now += 1900 * 1000;
    await up.syncNow();
    assert.equal(server.calls.renew, 1);
    assert.equal(server.calls.attest, 1);
    await up.close();
  });

  it('caches JWT-SVIDs until half-life and serves the cached one while the server fails', async () => {
    let now = Date.now();
    const { server, start } = await setup('jwt', () => undefined, { now: () => new Date(now) });
    const up = await start();
    await up.syncNow();
    const [served] = up.match(new Set(['unix:uid:1000']));
    assert.ok(served);
    const a = await up.jwtFor(served, ['kube']);
    const b = await up.jwtFor(served, ['kube']);
    assert.equal(a, b);
    assert.equal(server.calls.jwt, 1);
    now += 200 * 1000;
    server.down = true;
    const c = await up.jwtFor(served, ['kube']);
    assert.equal(c, a, 'past half-life, server down: the cached token, still valid, is served');
    server.down = false;
    const d = await up.jwtFor(served, ['kube']);
    assert.notEqual(d.token, a.token);
    await up.close();
  });

  it('asks the server once for callers wanting the same JWT-SVID at once, and refuses one for another audience', async () => {
    const { server, start } = await setup('jwt-once');
    const up = await start();
    await up.syncNow();
    const [served] = up.match(new Set(['unix:uid:1000']));
    assert.ok(served);
    const all = await Promise.all([1, 2, 3, 4].map(() => up.jwtFor(served, ['a', 'b'])));
    assert.equal(server.calls.jwt, 1);
    assert.ok(all.every((j) => j === all[0]));
    server.jwtAudience = ['someone-else'];
    await assert.rejects(up.jwtFor(served, ['c']), (err: AgentError) => {
      assert.equal(err.code, AgentErrorCode.Upstream);
      assert.match(err.message, /for the audience \["someone-else"\], not \["c"\]/);
      return true;
    });
    await up.close();
  });

  it('refuses an unusable agent SVID file in the state directory, naming it', async () => {
    const { stateDir, start } = await setup('corrupt');
    writeFileSync(join(stateDir.path, 'spire-agent.json'), '{"version":1,"chain":["AAAA"],"key":"AAAA"}', {
      mode: 0o600,
    });
    await assert.rejects(start(), (err: AgentError) => {
      assert.equal(err.code, AgentErrorCode.Upstream);
      assert.match(err.message, /spire-agent\.json: unusable .*remove it to attest again/);
      return true;
    });
  });

  it('refuses a bootstrap bundle of another trust domain', async () => {
    const server = new StandInServer();
    await server.init();
    const other = await LocalCa.create({ trustDomain: TrustDomain.parse('other.test') });
    await assert.rejects(
      SpireUpstream.start({
        trustDomain: TD,
        connector: server.connector(),
        makeCsr,
        bootstrapBundle: other.bundle,
        attestation: async () => ({ type: 'join_token', token: 't1' }),
        logger: log,
      }),
      (err: AgentError) => err.code === AgentErrorCode.Config && /other\.test/.test(err.message),
    );
  });
});
