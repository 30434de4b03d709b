/**
 * WorkloadAgent.reload, what SIGHUP runs: a real agent in this process whose files are edited where its
 * directory watch cannot see them (the entries file is reached through a symlink in another directory) and whose
 * poll interval is an hour, so whatever changes is the reload's doing.
 */
// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { bundleJson, type DevPki, makeDevPki } from '../../../certs-dev/devpki.ts';
import { type AgentOptions, type AgentSettings, WorkloadAgent } from '../../../src/agent/agent.ts';
import { AgentError, AgentErrorCode } from '../../../src/agent/errors.ts';
import { createLogger } from '../../../src/observability/logger.ts';
import { TrustDomain } from '../../../src/spiffe/id.ts';

const td = TrustDomain.parse('example.org');
const HOUR_MS = 3_600_000;
const SELECTORS = new Set(['unix:uid:4242']);

interface LogLine {
  level: string;
  msg: string;
  [key: string]: unknown;
}

interface Running {
  readonly agent: WorkloadAgent;
  readonly dir: string;
  /** The real entries file (the agent reads it through conf/entries.yaml, a symlink). */
  readonly entriesData: string;
  readonly settings: AgentSettings;
  readonly logs: LogLine[];
  close(): Promise<void>;
}

function entries(path: string, extra = ''): string {
  return `entries:\n  - spiffeId: spiffe://example.org/${path}\n    selectors: ["unix:uid:4242"]\n${extra}`;
}

async function startAgent(
  entriesYaml: string,
  configure: (dir: string) => Promise<Partial<AgentSettings>> = async () => ({}),
): Promise<Running> {
  const dir = await mkdtemp(join(tmpdir(), 'ksp-reload-'));
  await mkdir(join(dir, 'conf'));
  await mkdir(join(dir, 'data'));
  const entriesData = join(dir, 'data', 'entries.yaml');
  await writeFile(entriesData, entriesYaml);
  await symlink(entriesData, join(dir, 'conf', 'entries.yaml'));
  const logs: LogLine[] = [];
  const logger = createLogger({
    level: 'info',
    stream: { write: (line: string) => void logs.push(JSON.parse(line) as LogLine) },
  });
  const settings: AgentSettings = {
    trustDomain: td,
    socketPath: join(dir, 'sock', 'agent.sock'),
    entriesFile: join(dir, 'conf', 'entries.yaml'),
    watchPollMs: HOUR_MS,
    ...(await configure(dir)),
  };
  const agent = await WorkloadAgent.start({ ...settings, logger } as AgentOptions);
  return {
    agent,
    dir,
    entriesData,
    settings,
    logs,
    close: async () => {
      await agent.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

const messages = (r: Running): string[] => r.logs.map((l) => l.msg);
const logged = (r: Running, msg: string): LogLine | undefined => r.logs.find((l) => l.msg === msg);
const ids = async (r: Running): Promise<string[]> =>
  (await r.agent.state(SELECTORS)).svids.map((s) => s.id.toString());
const federated = async (r: Running): Promise<string[]> =>
  (await r.agent.state(SELECTORS)).federatedBundles.map(
    (b) => new X509Certificate((b.x509Authorities[0] as X509Certificate).raw).fingerprint256,
  );
const rootOf = (pem: string): string => new X509Certificate(pem).fingerprint256;

describe('WorkloadAgent.reload (SIGHUP)', () => {
  let pki: DevPki;
  let other: DevPki;
  before(async () => {
    [pki, other] = await Promise.all([makeDevPki(), makeDevPki()]);
  });

  describe('files', () => {
    let r: Running;
    before(async () => {
      r = await startAgent(entries('before', '    federatesWith: [hub.example.org]\n'), async (dir) => {
        const hub = join(dir, 'hub.json');
        await writeFile(hub, bundleJson(pki.hub));
        return { federatedBundles: new Map([['hub.example.org', hub]]) };
      });
    });
    after(() => r?.close());

    it('re-reads the entries file at once: an edit no watch saw is in force when reload() resolves', async () => {
      assert.deepEqual(await ids(r), ['spiffe://example.org/before']);
      await writeFile(r.entriesData, entries('after', '    federatesWith: [hub.example.org]\n'));
      await r.agent.reload();
      assert.deepEqual(await ids(r), ['spiffe://example.org/after']);
      assert.equal(logged(r, 'registration entries reloaded')?.entries, 1);
    });

    it('keeps the last good entries when the edit is broken, and logs why', async () => {
      await writeFile(r.entriesData, 'entries:\n  - spiffeId: not-an-id\n');
      await r.agent.reload();
      assert.deepEqual(await ids(r), ['spiffe://example.org/after']);
      const line = logged(r, 'entries file rejected; keeping the last good entries');
      assert.equal((line?.err as { code?: string })?.code, AgentErrorCode.Entries);
      await writeFile(r.entriesData, entries('after', '    federatesWith: [hub.example.org]\n'));
    });

    it('re-reads the federated bundle files', async () => {
      assert.deepEqual(await federated(r), [rootOf(pki.hub.rootPem)]);
      await writeFile(join(r.dir, 'hub.json'), bundleJson(other.hub));
      await r.agent.reload();
      assert.deepEqual(await federated(r), [rootOf(other.hub.rootPem)]);
    });
  });

  describe('the configuration', () => {
    it('logs keys that need a restart and keeps their running values', async () => {
      const r = await startAgent(entries('a'));
      try {
        await r.agent.reload(async () => ({
          ...r.settings,
          socketPath: join(r.dir, 'elsewhere', 'agent.sock'),
          svid: { x509TtlSeconds: 600 },
          watchPollMs: 1000,
        }));
        const line = logged(
          r,
          'configuration changed in keys that need a restart; keeping their running values',
        );
        assert.deepEqual(line?.keys, ['socketPath', 'watchPollInterval', 'svid']);
        assert.equal(r.agent.server.socketPath, r.settings.socketPath);
        // Back to the running values: nothing to say.
        r.logs.length = 0;
        await r.agent.reload(async () => r.settings);
        assert.deepEqual(messages(r), []);
      } finally {
        await r.close();
      }
    });

    it('keeps everything when the configuration is refused, and still re-reads the other files', async () => {
      const r = await startAgent(entries('a'));
      try {
        await writeFile(r.entriesData, entries('b'));
        await r.agent.reload(async () => {
          throw new AgentError(AgentErrorCode.Config, '/etc/agent.yaml:3:1: unknown key "bogus"');
        });
        const line = logged(r, 'configuration rejected; keeping the running configuration');
        const err = line?.err as { code?: string; message?: string };
        assert.deepEqual(
          [err.code, err.message],
          ['ERR_AGENT_CONFIG', '/etc/agent.yaml:3:1: unknown key "bogus"'],
        );
        assert.deepEqual(await ids(r), ['spiffe://example.org/b']);
      } finally {
        await r.close();
      }
    });

    it('applies the log level, the attestors and the federated bundle files at once', async () => {
      const r = await startAgent(entries('a', '    federatesWith: [hub.example.org, other.example.org]\n'));
      try {
        const hub = join(r.dir, 'hub.json');
        const otherFile = join(r.dir, 'other.json');
        const broken = join(r.dir, 'broken.json');
        await writeFile(hub, bundleJson(pki.hub));
        await writeFile(otherFile, bundleJson({ ...other.hub, name: 'other.example.org' }));
        await writeFile(broken, '{"keys": "no"}');

        await r.agent.reload(async () => ({
          ...r.settings,
          logLevel: 'debug',
          attestors: { unix: {}, k8s: { nodeName: 'node-1' } },
          federatedBundles: new Map([
            ['hub.example.org', hub],
            ['other.example.org', otherFile],
          ]),
        }));
        const level = logged(r, 'log level changed');
        assert.deepEqual([level?.from, level?.to], ['info', 'debug']);
        assert.deepEqual(logged(r, 'attestors reconfigured')?.attestors, ['unix', 'k8s']);
        assert.deepEqual(
          (await federated(r)).sort(),
          [rootOf(pki.hub.rootPem), rootOf(other.hub.rootPem)].sort(),
        );
        assert.equal(
          logged(r, 'configuration changed in keys that need a restart; keeping their running values'),
          undefined,
        );

        // A broken new file for a followed trust domain keeps its last good bundle; a removed one is dropped; a
        // refused attestor configuration keeps the running attestors.
        r.logs.length = 0;
        await r.agent.reload(async () => ({
          ...r.settings,
          logLevel: 'debug',
          attestors: { unix: {}, k8s: { nodeName: 'node-1', kubeletUrl: 'http://127.0.0.1:10255' } },
          federatedBundles: new Map([['hub.example.org', broken]]),
        }));
        assert.deepEqual(await federated(r), [rootOf(pki.hub.rootPem)]);
        assert.ok(logged(r, 'federated trust domain removed'));
        assert.equal(
          (
            logged(r, 'new federated bundle file rejected; keeping the last good bundle')?.err as {
              code?: string;
            }
          )?.code,
          AgentErrorCode.Config,
        );
        assert.equal(
          (
            logged(r, 'attestors configuration refused; keeping the running attestors')?.err as {
              code?: string;
            }
          )?.code,
          AgentErrorCode.Config,
        );
        assert.equal(logged(r, 'log level changed'), undefined);
      } finally {
        await r.close();
      }
    });
  });

  describe('upstream CA files', () => {
    it('re-reads them: new roots are published at once; broken files keep the running upstream', async () => {
      let certFile = '';
      let keyFile = '';
      const r = await startAgent(entries('a'), async (dir) => {
        certFile = join(dir, 'upstream.crt');
        keyFile = join(dir, 'upstream.key');
        await writeFile(certFile, pki.spoke.rootPem);
        await writeFile(keyFile, pki.spoke.rootKeyPem);
        return { ca: { upstream: { certFile, keyFile } } };
      });
      const authorities = (): string[] => r.agent.ca.bundle.x509Authorities.map((c) => c.fingerprint256);
      try {
        assert.deepEqual(authorities(), [rootOf(pki.spoke.rootPem)]);
        await r.agent.reload();
        assert.equal(logged(r, 'upstream CA reloaded; the next CA generation is signed by it'), undefined);

        await writeFile(certFile, pki.hub.rootPem);
        await r.agent.reload();
        const refused = logged(r, 'upstream CA files rejected; keeping the running upstream CA');
        assert.equal((refused?.err as { code?: string })?.code, AgentErrorCode.Ca, 'the key does not match');
        assert.deepEqual(authorities(), [rootOf(pki.spoke.rootPem)]);

        await writeFile(keyFile, pki.hub.rootKeyPem);
        await r.agent.reload();
        assert.ok(logged(r, 'upstream CA reloaded; the next CA generation is signed by it'));
        assert.deepEqual(authorities(), [rootOf(pki.spoke.rootPem), rootOf(pki.hub.rootPem)]);
        assert.ok(!JSON.stringify(r.logs).includes('PRIVATE KEY'), 'no key material in the logs');
      } finally {
        await r.close();
      }
    });
  });
});
