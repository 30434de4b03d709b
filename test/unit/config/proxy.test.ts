import assert from 'node:assert/strict';
import { join, resolve } from 'node:path';
import { describe, it } from 'node:test';
import { isAgentError } from '../../../src/agent/errors.ts';
import { type ProxyConfigError, parseHostPort, parseProxyConfig } from '../../../src/config/proxy.ts';

const repo = resolve(import.meta.dirname, '..', '..', '..');
const sample = join(repo, 'examples', 'proxy', 'proxy.yaml');
const MIN =
  'trustDomain: spoke.example.org\npolicyFile: policy.yaml\nupstream:\n  url: https://127.0.0.1:6443\n';

function refuses(text: string, at: string, message: RegExp): void {
  assert.throws(
    () => parseProxyConfig(text, '/etc/ksp/proxy.yaml'),
    (err: unknown) => {
      assert.ok(isAgentError(err, 'ERR_PROXY_CONFIG'));
      const problems = (err as ProxyConfigError).problems;
      assert.ok(
        problems.some((p) => `${p.line}:${p.column}` === at && message.test(p.message)),
        `expected ${at} ${message}, got ${JSON.stringify(problems)}`,
      );
      return true;
    },
  );
}

describe('parseProxyConfig', () => {
  it('reads the sample configuration', async () => {
    const { readFileSync } = await import('node:fs');
    const config = parseProxyConfig(readFileSync(sample, 'utf8'), sample);
    assert.equal(config.trustDomain.name, 'spoke.example.org');
    assert.deepEqual(config.listen, { host: '0.0.0.0', port: 8443 });
    assert.deepEqual(config.admin, { host: '127.0.0.1', port: 9443 });
    assert.equal(config.policyFile, join(repo, 'examples', 'proxy', 'policy.yaml'));
    assert.deepEqual(config.identity, {
      kind: 'workloadApi',
      socket: 'unix:///run/kube-svid-proxy/agent.sock',
      hint: 'proxy',
    });
    assert.equal(config.upstream.kind === 'explicit' && config.upstream.url.href, 'https://127.0.0.1:6443/');
    assert.equal(config.minSvidRemainingSeconds, 300);
  });

  it('fills defaults for a minimal file, resolving paths against the file', () => {
    const config = parseProxyConfig(MIN, '/etc/ksp/proxy.yaml');
    assert.equal(config.policyFile, '/etc/ksp/policy.yaml');
    assert.deepEqual(config.identity, { kind: 'workloadApi' });
    assert.equal(config.logLevel, 'info');
  });

  it('refuses unknown keys, bad addresses, a shared port, and bad upstream URLs at their line and column', () => {
    refuses(`${MIN}listn: 0.0.0.0:1\n`, '5:1', /unknown key "listn"/);
    refuses(`${MIN}listen: localhost\n`, '5:9', /not host:port/);
    refuses(`${MIN}listen: 0.0.0.0:9443\nadmin: { listen: 127.0.0.1:9443 }\n`, '1:1', /same port 9443/);
    refuses(MIN.replace('https://127.0.0.1:6443', 'ftp://x'), '4:8', /must be https/);
    refuses(MIN.replace('https://127.0.0.1:6443', 'https://u:p@x'), '4:8', /credentials/);
    refuses(
      'policyFile: p.yaml\nupstream: { url: "https://x" }\n',
      '1:1',
      /missing required key "trustDomain"/,
    );
  });

  it('refuses identity files without our own trust domain bundle, and workloadApi with files', () => {
    refuses(
      `${MIN}identity:\n  files:\n    certFile: a\n    keyFile: b\n    bundles: { hub.example.org: h.json }\n`,
      '6:3',
      /no bundle for our own trust domain spoke.example.org/,
    );
    refuses(`${MIN}identity:\n  workloadApi: {}\n  files: {}\n`, '5:1', /workloadApi or files, not both/);
  });

  it('parses host:port forms, IPv6 included', () => {
    assert.deepEqual(parseHostPort('[::1]:8443'), { host: '::1', port: 8443 });
    assert.deepEqual(parseHostPort(':8443'), { host: '0.0.0.0', port: 8443 });
    assert.match(String(parseHostPort('x:70000')), /out of range/);
  });
});

describe('parseProxyConfig: upstream from the service account or a kubeconfig', () => {
  const HEAD = 'trustDomain: spoke.example.org\npolicyFile: policy.yaml\nupstream:\n';

  it('reads upstream.inCluster: true', () => {
    const config = parseProxyConfig(`${HEAD}  inCluster: true\n`, '/etc/ksp/proxy.yaml');
    assert.deepEqual(config.upstream, { kind: 'inCluster' });
  });

  it('reads upstream.kubeconfig (resolved against the config file) and upstream.context', () => {
    const bare = parseProxyConfig(`${HEAD}  kubeconfig: kube/config\n`, '/etc/ksp/proxy.yaml');
    assert.deepEqual(bare.upstream, { kind: 'kubeconfig', file: '/etc/ksp/kube/config' });
    const named = parseProxyConfig(
      `${HEAD}  kubeconfig: /root/.kube/config\n  context: spoke\n`,
      '/etc/ksp/proxy.yaml',
    );
    assert.deepEqual(named.upstream, { kind: 'kubeconfig', file: '/root/.kube/config', context: 'spoke' });
  });

  it('keeps the explicit form, marked as such', () => {
    const config = parseProxyConfig(
      `${HEAD}  url: https://127.0.0.1:6443\n  tokenFile: t\n`,
      '/etc/ksp/p.yaml',
    );
    assert.equal(config.upstream.kind, 'explicit');
    assert.ok(config.upstream.kind === 'explicit' && config.upstream.tokenFile === '/etc/ksp/t');
  });

  it('refuses url, inCluster and kubeconfig together, at the later key', () => {
    refuses(
      `${HEAD}  url: https://x:6443\n  inCluster: true\n`,
      '5:3',
      /upstream\.inCluster conflicts with upstream\.url/,
    );
    refuses(
      `${HEAD}  inCluster: true\n  kubeconfig: k\n`,
      '5:3',
      /upstream\.kubeconfig conflicts with upstream\.inCluster/,
    );
  });

  it('refuses the explicit keys with inCluster or kubeconfig, and context without kubeconfig', () => {
    refuses(
      `${HEAD}  inCluster: true\n  caFile: ca.crt\n`,
      '5:3',
      /upstream\.caFile goes with upstream\.url only; with upstream\.inCluster, the service account gives/,
    );
    refuses(
      `${HEAD}  kubeconfig: k\n  tokenFile: t\n`,
      '5:3',
      /upstream\.tokenFile goes with upstream\.url only; with upstream\.kubeconfig, the kubeconfig gives/,
    );
    refuses(
      `${HEAD}  inCluster: true\n  context: c\n`,
      '5:3',
      /upstream\.context goes with upstream\.kubeconfig only/,
    );
    refuses(`${HEAD}  url: https://x:6443\n  context: c\n`, '5:3', /upstream\.context goes with/);
  });

  it('refuses an upstream with none of them, inCluster that is not a boolean, and an empty context', () => {
    refuses(`${HEAD}  inCluster: false\n`, '4:3', /upstream needs url, inCluster: true or kubeconfig/);
    refuses(`${HEAD}  caFile: ca.crt\n`, '4:3', /upstream needs url, inCluster: true or kubeconfig/);
    refuses(`${HEAD}  inCluster: "yes"\n`, '4:14', /upstream\.inCluster must be true or false/);
    refuses(`${HEAD}  kubeconfig: k\n  context: ""\n`, '5:12', /upstream\.context is empty/);
    refuses(`${HEAD}  kubeconfig: [a]\n`, '4:15', /upstream\.kubeconfig must be a string/);
  });
});
