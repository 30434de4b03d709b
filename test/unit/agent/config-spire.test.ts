import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import {
  type AnyAgentConfig,
  ConfigError,
  loadAnyAgentConfig,
  parseAgentConfig,
  parseAnyAgentConfig,
} from '../../../src/agent/config.ts';
import { DEFAULT_PSAT_TOKEN_PATH } from '../../../src/agent/config-spire.ts';

const root = join(import.meta.dirname, '..', '..', '..');
const FILE = '/etc/ksp/agent.yaml';
const SPIRE = `trustDomain: example.org
issuer: spire
spire:
  serverAddress: spire-server:8081
  bootstrapBundle: bundle.pem
  nodeAttestor:
    joinToken: abc
`;

function parse(text: string, joinToken?: string): AnyAgentConfig {
  return parseAnyAgentConfig(text, FILE, {}, joinToken === undefined ? {} : { joinToken });
}

function problems(text: string, joinToken?: string): string[] {
  try {
    parse(text, joinToken);
  } catch (err) {
    assert.ok(err instanceof ConfigError, String(err));
    assert.equal(err.code, 'ERR_AGENT_CONFIG');
    return err.problems.map((p) => `${p.line}:${p.column} ${p.message}`);
  }
  assert.fail('accepted');
}

describe('agent configuration, issuer: spire', () => {
  it('reads the sample examples/agent/agent-spire.yaml', async () => {
    const config = await loadAnyAgentConfig(join(root, 'examples', 'agent', 'agent-spire.yaml'), {});
    assert.equal(config.issuer, 'spire');
    if (config.issuer !== 'spire') return;
    assert.deepEqual(config.spire.serverAddress, { host: 'spire-server.spire.svc', port: 8081 });
    assert.equal(config.spire.bootstrapBundle, '/etc/kube-svid-proxy/spire-bundle.pem');
    assert.deepEqual(config.spire.nodeAttestor, {
      type: 'k8s_psat',
      cluster: 'spoke-1',
      tokenPath: '/var/run/secrets/tokens/spire-agent',
    });
    assert.equal(config.spire.syncIntervalMs, 5000);
    assert.deepEqual(config.admin, { host: '127.0.0.1', port: 9464 });
  });

  it('reads a join token from the file, and --join-token wins', () => {
    const a = parse(SPIRE);
    assert.ok(a.issuer === 'spire');
    assert.deepEqual(a.spire.nodeAttestor, { type: 'join_token', token: 'abc' });
    assert.equal(a.spire.bootstrapBundle, '/etc/ksp/bundle.pem', 'relative to the file');
    const b = parse(SPIRE, 'from-flag');
    assert.ok(b.issuer === 'spire');
    assert.deepEqual(b.spire.nodeAttestor, { type: 'join_token', token: 'from-flag' });
    const c = parse(SPIRE.replace('    joinToken: abc\n', '    joinToken:\n'));
    assert.ok(c.issuer === 'spire');
    assert.deepEqual(c.spire.nodeAttestor, { type: 'join_token' });
  });

  it('defaults the port to 8081 and the k8s_psat token path', () => {
    const config = parse(
      SPIRE.replace('spire-server:8081', 'spire-server').replace(
        '    joinToken: abc\n',
        '    k8sPsat:\n      cluster: c1\n',
      ),
    );
    assert.ok(config.issuer === 'spire');
    assert.deepEqual(config.spire.serverAddress, { host: 'spire-server', port: 8081 });
    assert.deepEqual(config.spire.nodeAttestor, {
      type: 'k8s_psat',
      cluster: 'c1',
      tokenPath: DEFAULT_PSAT_TOKEN_PATH,
    });
  });

  it('refuses the embedded CA keys, each with its reason', () => {
    const found = problems(
      `${SPIRE}entriesFile: e.yaml\nca:\n  ttl: 24h\nsvid:\n  x509Ttl: 1h\n  keyType: ec-p256\nfederation:\n  bundles: {}\n`,
    );
    assert.equal(found.length, 4, found.join('\n'));
    assert.match(
      found.join('\n'),
      /entriesFile does not apply with issuer: spire: registration entries come from the SPIRE server/,
    );
    assert.match(found.join('\n'), /ca does not apply with issuer: spire/);
    assert.match(
      found.join('\n'),
      /svid\.x509Ttl does not apply with issuer: spire: the SPIRE server decides it/,
    );
    assert.match(found.join('\n'), /federation does not apply with issuer: spire/);
  });

  it('refuses a spire section without issuer: spire, and the reverse', () => {
    assert.match(
      problems('trustDomain: a.test\nentriesFile: e.yaml\nspire:\n  serverAddress: x:1\n').join('\n'),
      /a spire section needs issuer: spire/,
    );
    assert.match(
      problems('trustDomain: a.test\nissuer: spire\n').join('\n'),
      /issuer: spire needs a spire section/,
    );
    assert.match(
      problems('trustDomain: a.test\nissuer: vault\nentriesFile: e.yaml\n').join('\n'),
      /issuer "vault" is not one of ca, spire/,
    );
  });

  it('refuses a spire section missing what it needs, or naming two attestors', () => {
    const found = problems('trustDomain: a.test\nissuer: spire\nspire:\n  syncInterval: 2h\n').join('\n');
    assert.match(found, /spire needs serverAddress/);
    assert.match(found, /spire needs bootstrapBundle/);
    assert.match(found, /spire needs nodeAttestor/);
    assert.match(found, /spire.syncInterval must be at most 1h/);
    assert.match(
      problems(
        SPIRE.replace('    joinToken: abc\n', '    joinToken: abc\n    k8sPsat:\n      cluster: c\n'),
      ).join('\n'),
      /name one attestor, joinToken or k8sPsat, not both/,
    );
    assert.match(
      problems(SPIRE.replace('    joinToken: abc\n', '    k8sPsat:\n      tokenPath: /t\n')).join('\n'),
      /k8sPsat needs cluster/,
    );
    assert.match(
      problems(SPIRE.replace('    joinToken: abc\n', '    k8sPsat:\n      cluster: c\n'), 't').join('\n'),
      /--join-token was given, but spire.nodeAttestor is k8sPsat/,
    );
  });

  it('refuses --join-token for the embedded CA, and parseAgentConfig refuses issuer: spire', () => {
    assert.match(
      problems('trustDomain: a.test\nentriesFile: e.yaml\n', 't').join('\n'),
      /--join-token is for issuer: spire/,
    );
    assert.throws(() => parseAgentConfig(SPIRE, FILE, {}), /issuer: spire configures the SPIRE-backed agent/);
  });
});
