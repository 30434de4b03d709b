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
      socket: 'unix:///tmp/kube-svid-proxy/agent.sock',
      hint: 'proxy',
    });
    assert.equal(config.upstream.url.href, 'https://127.0.0.1:6443/');
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
