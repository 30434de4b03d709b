import assert from 'node:assert/strict';
import { join, resolve } from 'node:path';
import { describe, it } from 'node:test';
import {
  type AgentConfig,
  ConfigError,
  DEFAULT_AGENT_SOCKET,
  DEFAULT_STATE_DIR,
  loadAgentConfig,
  parseAgentConfig,
} from '../../../src/agent/config.ts';
import { ConfigReadError } from '../../../src/config/common.ts';

const root = join(import.meta.dirname, '..', '..', '..');
const FILE = '/etc/ksp/agent.yaml';
const MINIMAL = 'trustDomain: spoke.example.org\nentriesFile: entries.yaml\n';

function parse(text: string, env: NodeJS.ProcessEnv = {}): AgentConfig {
  return parseAgentConfig(text, FILE, env);
}

/** The problems of a refused config, as `line:column message`. */
function problems(text: string, env: NodeJS.ProcessEnv = {}): { at: string; message: string }[] {
  try {
    parse(text, env);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${String(err)}`);
    assert.equal(err.code, 'ERR_AGENT_CONFIG');
    assert.equal(err.file, FILE);
    return err.problems.map((p) => ({ at: `${p.line}:${p.column}`, message: p.message }));
  }
  assert.fail('the configuration was accepted');
}

/** Asserts that the config is refused with exactly one problem at `at` whose message matches `message`. */
function refuses(text: string, at: string, message: RegExp, env: NodeJS.ProcessEnv = {}): void {
  const found = problems(text, env);
  assert.equal(found.length, 1, JSON.stringify(found));
  assert.equal(found[0]?.at, at, JSON.stringify(found));
  assert.match(found[0]?.message ?? '', message);
}

describe('agent configuration', () => {
  describe('accepted files', () => {
    it('reads the sample examples/agent/agent.yaml', async () => {
      const file = join(root, 'examples', 'agent', 'agent.yaml');
      const config = await loadAgentConfig(file, {});
      assert.equal(config.trustDomain.name, 'spoke.example.org');
      assert.equal(config.entriesFile, resolve(root, 'examples', 'agent', 'entries.yaml'));
      assert.equal(config.socketPath, '/run/kube-svid-proxy/agent.sock');
      assert.equal(config.watchPollMs, 5000);
      assert.equal(config.ca?.keyType, 'ec-p256');
      assert.equal(config.ca?.ttlSeconds, 86400);
      assert.equal(config.ca?.upstream, undefined);
      assert.equal(config.svid?.keyType, 'ec-p256');
      assert.equal(config.svid?.x509TtlSeconds, 3600);
      assert.equal(config.svid?.jwtTtlSeconds, 300);
      assert.equal(config.svid?.rotationJitter, 0.1);
      assert.deepEqual(config.attestors?.unix, { discoverWorkloadPath: false, workloadSizeLimit: 0 });
      assert.equal(config.attestors?.k8s, undefined);
      assert.equal(config.federatedBundles, undefined);
      assert.equal(config.logLevel, 'info');
    });

    it('gives a minimal file (trustDomain and entriesFile) the defaults', () => {
      const config = parse(MINIMAL);
      assert.equal(config.trustDomain.name, 'spoke.example.org');
      assert.equal(config.socketPath, DEFAULT_AGENT_SOCKET);
      assert.equal(DEFAULT_AGENT_SOCKET, '/run/kube-svid-proxy/agent.sock');
      assert.equal(config.stateDir, DEFAULT_STATE_DIR);
      assert.equal(DEFAULT_STATE_DIR, '/var/lib/kube-svid-proxy/agent');
      assert.equal(config.socketMode, undefined);
      assert.equal(config.watchPollMs, undefined);
      assert.equal(config.logLevel, 'info');
      assert.deepEqual(config.ca, {});
      assert.deepEqual(config.svid, {});
      assert.deepEqual(config.attestors, { unix: {} });
    });

    it("resolves relative paths against the config file's directory and keeps absolute ones", () => {
      const config = parse(
        [
          'trustDomain: spoke.example.org',
          'entriesFile: conf/entries.yaml',
          'socketPath: ../run/agent.sock',
          'socketMode: "0660"',
          'ca:',
          '  upstream:',
          '    certFile: /pki/ca.crt',
          '    keyFile: upstream/ca.key',
          'attestors:',
          '  k8s:',
          '    nodeName: node-1',
          '    tokenPath: token',
          '    caPath: /var/run/ca.crt',
          'federation:',
          '  bundles:',
          '    hub.example.org: bundles/hub.json',
          '    other.example.org: /srv/other.json',
          '',
        ].join('\n'),
      );
      assert.equal(config.entriesFile, '/etc/ksp/conf/entries.yaml');
      assert.equal(config.socketPath, '/etc/run/agent.sock');
      assert.equal(config.socketMode, 0o660);
      assert.deepEqual(config.ca?.upstream, { certFile: '/pki/ca.crt', keyFile: '/etc/ksp/upstream/ca.key' });
      assert.equal(config.attestors?.k8s?.nodeName, 'node-1');
      assert.equal(config.attestors?.k8s?.tokenPath, '/etc/ksp/token');
      assert.equal(config.attestors?.k8s?.caPath, '/var/run/ca.crt');
      assert.deepEqual(
        [...(config.federatedBundles ?? [])],
        [
          ['hub.example.org', '/etc/ksp/bundles/hub.json'],
          ['other.example.org', '/srv/other.json'],
        ],
      );
    });

    it('takes the node name from the variable nodeNameEnv names', () => {
      const config = parse(`${MINIMAL}attestors:\n  k8s:\n    nodeNameEnv: NODE_NAME\n`, {
        NODE_NAME: 'worker-7',
      });
      assert.equal(config.attestors?.k8s?.nodeName, 'worker-7');
    });

    it('reads watchPollInterval as a duration', () => {
      assert.equal(parse(`${MINIMAL}watchPollInterval: 1h\n`).watchPollMs, 3_600_000);
      assert.equal(parse(`${MINIMAL}watchPollInterval: 90\n`).watchPollMs, 90_000);
    });

    it('accepts a short ca.ttl when svid.x509Ttl fits in a sixth of it', () => {
      const config = parse(`${MINIMAL}ca:\n  ttl: 1h\nsvid:\n  x509Ttl: 10m\n`);
      assert.equal(config.ca?.ttlSeconds, 3600);
      assert.equal(config.svid?.x509TtlSeconds, 600);
    });
  });

  describe('refused files, each problem at its line and column', () => {
    it('names an unknown top-level key and lists the allowed ones', () => {
      refuses(
        `${MINIMAL}bogus: 1\n`,
        '3:1',
        /unknown key "bogus" in the agent configuration \(allowed: .*entriesFile/,
      );
    });

    it('names an unknown nested key and lists the keys allowed there', () => {
      refuses(
        `${MINIMAL}ca:\n  ttl: 24h\n  colour: red\n`,
        '5:3',
        /unknown key "colour" in ca \(allowed: keyType, ttl, upstream\)/,
      );
      refuses(
        `${MINIMAL}attestors:\n  unix:\n    discover: true\n`,
        '5:5',
        /unknown key "discover" in attestors\.unix \(allowed: discoverWorkloadPath, workloadSizeLimit\)/,
      );
    });

    it('requires trustDomain', () => {
      refuses('entriesFile: entries.yaml\n', '1:1', /missing required key "trustDomain"/);
    });

    it('refuses a malformed trustDomain at its value', () => {
      refuses('entriesFile: e.yaml\ntrustDomain: Bad_Domain!\n', '2:14', /^trustDomain: .*Bad_Domain!/);
      refuses(
        'trustDomain: spoke.example.org/ns\nentriesFile: e.yaml\n',
        '1:14',
        /^trustDomain: .*\[a-z0-9._-\]/,
      );
    });

    it('refuses a SPIFFE ID with a path where the trust domain name belongs, rather than cutting it short', () => {
      refuses('trustDomain: spiffe://spoke.example.org/ns/x\nentriesFile: e.yaml\n', '1:14', /has a path/);
    });

    it('requires entriesFile', () => {
      refuses('trustDomain: spoke.example.org\n', '1:1', /missing required key "entriesFile"/);
    });

    it('refuses an unknown key type', () => {
      refuses(`${MINIMAL}ca:\n  keyType: dsa\n`, '4:12', /ca\.keyType "dsa" is not one of ec-p256, ec-p384/);
      refuses(`${MINIMAL}svid:\n  keyType: ed25519\n`, '4:12', /svid\.keyType "ed25519" is not one of/);
    });

    it('refuses an unknown log level', () => {
      refuses(`${MINIMAL}logLevel: loud\n`, '3:11', /logLevel "loud" is not one of .*info/);
    });

    it('refuses a watchPollInterval under 1s or over 24h', () => {
      refuses(
        `${MINIMAL}watchPollInterval: 500ms\n`,
        '3:20',
        /watchPollInterval "500ms" is shorter than the minimum of 1s/,
      );
      refuses(`${MINIMAL}watchPollInterval: 25h\n`, '3:20', /watchPollInterval must be at most 24h/);
      refuses(`${MINIMAL}watchPollInterval: soon\n`, '3:20', /watchPollInterval/);
    });

    it('refuses a socketMode that is not octal', () => {
      refuses(`${MINIMAL}socketMode: "999"\n`, '3:13', /socketMode "999" is not an octal mode/);
      refuses(`${MINIMAL}socketMode: 777\n`, '3:13', /socketMode .* must be a string, got a number/);
    });

    it('refuses a ca.ttl under 6 seconds', () => {
      refuses(
        `${MINIMAL}ca:\n  ttl: 5s\nsvid:\n  x509Ttl: 1s\n`,
        '4:8',
        /ca\.ttl "5s" is shorter than the minimum of 6s/,
      );
    });

    it('refuses an svid.x509Ttl longer than a sixth of ca.ttl, and says why', () => {
      refuses(
        `${MINIMAL}ca:\n  ttl: 6h\nsvid:\n  x509Ttl: 2h\n`,
        '6:12',
        /svid\.x509Ttl \(7200s\) exceeds a sixth of ca\.ttl \(21600s\): SVIDs signed just before a CA rotation would be cut short/,
      );
      // Against the default CA lifetime (24h) too.
      refuses(`${MINIMAL}svid:\n  x509Ttl: 5h\n`, '4:12', /exceeds a sixth of ca\.ttl \(86400s\)/);
    });

    it('refuses a ca.ttl under 6h when the default SVID lifetime (1h) applies', () => {
      refuses(`${MINIMAL}ca:\n  ttl: 1h\n`, '4:8', /ca\.ttl is under 6h: set svid\.x509Ttl/);
      // An svid section without x509Ttl leaves the default in force as well.
      refuses(`${MINIMAL}ca:\n  ttl: 1h\nsvid:\n  jwtTtl: 5m\n`, '4:8', /ca\.ttl is under 6h/);
      assert.equal(parse(`${MINIMAL}ca:\n  ttl: 6h\n`).ca?.ttlSeconds, 21600);
    });

    it('requires both certFile and keyFile in ca.upstream', () => {
      refuses(
        `${MINIMAL}ca:\n  upstream:\n    certFile: ca.crt\n`,
        '5:5',
        /ca\.upstream needs both certFile and keyFile/,
      );
    });

    it('requires nodeName or nodeNameEnv for the k8s attestor', () => {
      refuses(
        `${MINIMAL}attestors:\n  k8s:\n    kubeletUrl: https://127.0.0.1:10250\n`,
        '4:3',
        /attestors\.k8s needs nodeName, or nodeNameEnv/,
      );
    });

    it('refuses a nodeNameEnv naming a variable that is not set', () => {
      refuses(
        `${MINIMAL}attestors:\n  k8s:\n    nodeNameEnv: NODE_NAME\n`,
        '5:18',
        /environment variable NODE_NAME \(attestors\.k8s\.nodeNameEnv\) is not set/,
        { OTHER: 'x' },
      );
      refuses(`${MINIMAL}attestors:\n  k8s:\n    nodeNameEnv: NODE_NAME\n`, '5:18', /NODE_NAME/, {
        NODE_NAME: '',
      });
    });

    it('refuses federating with our own trust domain, and a malformed trust domain name', () => {
      const found = problems(
        `${MINIMAL}federation:\n  bundles:\n    hub.example.org: hub.json\n    spoke.example.org: own.json\n    "Hub!": bad.json\n`,
      );
      assert.deepEqual(
        found.map((p) => p.at),
        ['6:5', '7:5'],
      );
      assert.match(
        found[0]?.message ?? '',
        /federation\.bundles: spoke\.example\.org is our own trust domain/,
      );
      assert.match(found[1]?.message ?? '', /^federation\.bundles: .*Hub!/);
    });

    it('reports a YAML syntax error with its position', () => {
      refuses(`${MINIMAL}ca: [unclosed\n`, '4:1', /^YAML syntax: /);
      const found = problems('trustDomain: spoke.example.org\nentriesFile: e.yaml\nca: : x\n');
      assert.ok(found.length >= 1);
      assert.equal(found[0]?.at, '3:5');
      assert.match(found[0]?.message ?? '', /^YAML syntax: /);
    });

    it('reports several problems together, in file order', () => {
      const found = problems(
        ['logLevel: loud', 'trustDomain: spoke.example.org', 'bogus: 1', 'ca:', '  keyType: dsa', ''].join(
          '\n',
        ),
      );
      assert.deepEqual(
        found.map((p) => p.at),
        ['1:1', '1:11', '3:1', '5:12'],
      );
      assert.match(found[0]?.message ?? '', /missing required key "entriesFile"/);
      assert.match(found[1]?.message ?? '', /logLevel "loud"/);
      assert.match(found[2]?.message ?? '', /unknown key "bogus"/);
      assert.match(found[3]?.message ?? '', /ca\.keyType "dsa"/);
    });

    it('formats the error message as file:line:col: problem, one a line', () => {
      try {
        parse('logLevel: loud\ntrustDomain: spoke.example.org\nentriesFile: e.yaml\nbogus: 1\n');
        assert.fail('accepted');
      } catch (err) {
        assert.ok(err instanceof ConfigError);
        const lines = err.message.split('\n');
        assert.equal(lines.length, 2);
        assert.match(lines[0] ?? '', /^\/etc\/ksp\/agent\.yaml:1:11: logLevel "loud"/);
        assert.match(lines[1] ?? '', /^\/etc\/ksp\/agent\.yaml:4:1: unknown key "bogus"/);
      }
    });

    it('refuses a document that is not a map', () => {
      refuses(
        '- trustDomain: spoke.example.org\n',
        '1:1',
        /the agent configuration must be a map, got a list/,
      );
      refuses('just text\n', '1:1', /must be a map, got a string "just text"/);
      refuses('', '1:1', /must be a map, got nothing/);
    });
  });

  describe('loadAgentConfig', () => {
    it('refuses a missing file with ERR_AGENT_CONFIG naming the file', async () => {
      const file = join(root, 'examples', 'agent', 'absent.yaml');
      await assert.rejects(loadAgentConfig(file, {}), (err: unknown) => {
        assert.ok(err instanceof ConfigReadError, String(err));
        assert.equal(err.code, 'ERR_AGENT_CONFIG');
        assert.equal(err.file, file);
        assert.ok(err.message.includes(file), err.message);
        assert.match(err.message, /ENOENT/);
        return true;
      });
    });
  });
});

describe('agent.yaml: federation and admin', () => {
  const FULL = `${MINIMAL}admin:
  listen: 127.0.0.1:9464
federation:
  bundleEndpoint:
    listen: 0.0.0.0:8444
    profile: https_spiffe
    refreshHint: 2m
  trustDomains:
    hub.example.org:
      url: https://hub.example.org:8444/
      profile: https_spiffe
      endpointSpiffeId: spiffe://hub.example.org/spire/server
      bootstrapBundle: bundles/hub.json
    web.example.org:
      url: https://bundles.web.example.org/web.json
      profile: https_web
  bundles:
    static.example.org: bundles/static.json
`;

  it('reads the bundle endpoint, the relationships (paths resolved) and the admin listener', () => {
    const config = parse(FULL);
    assert.deepEqual(config.admin, { host: '127.0.0.1', port: 9464 });
    const endpoint = config.federation?.bundleEndpoint;
    assert.deepEqual(endpoint?.listen, { host: '0.0.0.0', port: 8444 });
    assert.equal(endpoint?.refreshHintSeconds, 120);
    assert.equal(endpoint?.path, '/');
    assert.equal(endpoint?.tls.profile, 'https_spiffe');
    assert.equal(
      endpoint?.tls.profile === 'https_spiffe' ? endpoint.tls.spiffeId.toString() : '',
      'spiffe://spoke.example.org/kube-svid-proxy/bundle-endpoint',
      'the default endpoint SPIFFE ID',
    );
    const [hub, web] = config.federation?.relationships ?? [];
    assert.equal(hub?.trustDomain.name, 'hub.example.org');
    assert.equal(hub?.profile, 'https_spiffe');
    assert.equal(hub?.profile === 'https_spiffe' ? hub.bootstrapBundle : '', '/etc/ksp/bundles/hub.json');
    assert.equal(web?.profile, 'https_web');
    assert.deepEqual(
      [...(config.federatedBundles ?? [])],
      [['static.example.org', '/etc/ksp/bundles/static.json']],
    );
  });

  it('never guesses a profile, and refuses keys of the other profile', () => {
    refuses(
      `${MINIMAL}federation:\n  trustDomains:\n    hub.example.org:\n      url: https://hub.example.org/\n`,
      '5:5',
      /needs "profile": one of https_spiffe, https_web \(it is never guessed\)/,
    );
    refuses(
      `${MINIMAL}federation:\n  trustDomains:\n    hub.example.org:\n      url: https://hub.example.org/\n      profile: https_web\n      endpointSpiffeId: spiffe://hub.example.org/x\n`,
      '8:7',
      /endpointSpiffeId belongs to profile https_spiffe, but profile is https_web/,
    );
    refuses(
      `${MINIMAL}federation:\n  trustDomains:\n    hub.example.org:\n      url: https://hub.example.org/\n      profile: https_spiffe\n`,
      '5:5',
      /needs endpointSpiffeId/,
    );
    refuses(
      `${MINIMAL}federation:\n  bundleEndpoint:\n    profile: https_web\n`,
      '4:3',
      /https_web needs certFile and keyFile/,
    );
  });

  it('refuses what cannot be a relationship: http, another trust domain, our own, two sources', () => {
    const rel = (td: string, body: string): string =>
      `${MINIMAL}federation:\n  trustDomains:\n    ${td}:\n${body}`;
    refuses(
      rel('hub.example.org', '      url: http://hub.example.org/\n      profile: https_web\n'),
      '6:12',
      /must be https:\/\//,
    );
    refuses(
      rel(
        'hub.example.org',
        '      url: https://hub.example.org/\n      profile: https_spiffe\n      endpointSpiffeId: spiffe://other.example.org/spire/server\n',
      ),
      '8:25',
      /is not in trust domain hub\.example\.org/,
    );
    refuses(
      rel('spoke.example.org', '      url: https://x.example.org/\n      profile: https_web\n'),
      '5:5',
      /our own trust domain/,
    );
    refuses(
      `${MINIMAL}federation:\n  bundles:\n    hub.example.org: hub.json\n  trustDomains:\n    hub.example.org:\n      url: https://hub.example.org/\n      profile: https_web\n`,
      '7:5',
      /also has a file in federation\.bundles; choose one source/,
    );
  });

  it('refuses an admin listener on the bundle endpoint port', () => {
    refuses(
      `${MINIMAL}admin:\n  listen: 127.0.0.1:8444\nfederation:\n  bundleEndpoint:\n    profile: https_spiffe\n`,
      '1:1',
      /admin\.listen and federation\.bundleEndpoint\.listen use the same port 8444/,
    );
  });
});
