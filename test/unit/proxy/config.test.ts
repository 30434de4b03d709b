import assert from 'node:assert/strict';
import { join, resolve } from 'node:path';
import { describe, it } from 'node:test';
import { type ProxyConfigError, parseHostPort, parseProxyConfig } from '../../../src/proxy/config.ts';
import { isProxyError } from '../../../src/proxy/errors.ts';
import { DEFAULT_LIMITS, DEFAULT_TIMEOUTS } from '../../../src/proxy/limits.ts';

const repo = resolve(import.meta.dirname, '..', '..', '..');
const sample = join(repo, 'examples', 'proxy', 'proxy.yaml');
const MIN =
  'trustDomain: spoke.example.org\npolicyFile: policy.yaml\nupstream:\n  url: https://127.0.0.1:6443\n';

function refuses(text: string, at: string, message: RegExp): void {
  assert.throws(
    () => parseProxyConfig(text, '/etc/ksp/proxy.yaml'),
    (err: unknown) => {
      assert.ok(isProxyError(err, 'ERR_PROXY_CONFIG'));
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

describe('parseProxyConfig: limits and timeouts', () => {
  it('uses the defaults when limits and timeouts are absent', () => {
    const config = parseProxyConfig(MIN, '/etc/ksp/proxy.yaml');
    assert.deepEqual(config.limits, DEFAULT_LIMITS);
    assert.deepEqual(config.timeouts, DEFAULT_TIMEOUTS);
  });

  it('writes audit Events to stdout by default, or to audit.file resolved against the config file', () => {
    const buffer = { bufferBytes: 8 * 1024 * 1024, overflow: 'refuse' };
    assert.deepEqual(parseProxyConfig(MIN, '/etc/ksp/proxy.yaml').audit, { file: '-', ...buffer });
    assert.deepEqual(parseProxyConfig(`${MIN}audit: { file: "-" }\n`, '/etc/ksp/proxy.yaml').audit, {
      file: '-',
      ...buffer,
    });
    assert.deepEqual(parseProxyConfig(`${MIN}audit: { file: audit.jsonl }\n`, '/etc/ksp/proxy.yaml').audit, {
      file: '/etc/ksp/audit.jsonl',
      ...buffer,
    });
    assert.throws(() => parseProxyConfig(`${MIN}audit: { path: x }\n`, '/etc/ksp/proxy.yaml'), /path/);
  });

  it('reads workers: a number of processes, or auto (the CPUs available, at least 1)', () => {
    assert.equal(parseProxyConfig(`${MIN}workers: 3\n`, '/etc/ksp/proxy.yaml').workers, 3);
    const auto = parseProxyConfig(`${MIN}workers: auto\n`, '/etc/ksp/proxy.yaml').workers;
    assert.ok(auto >= 1);
    assert.equal(parseProxyConfig(MIN, '/etc/ksp/proxy.yaml').workers, auto, 'auto is the default');
    assert.throws(
      () => parseProxyConfig(`${MIN}workers: 0\n`, '/etc/ksp/proxy.yaml'),
      /workers.*between 1 and 64/,
    );
    assert.throws(
      () => parseProxyConfig(`${MIN}workers: 1.5\n`, '/etc/ksp/proxy.yaml'),
      /workers must be a whole number of processes, or auto/,
    );
    assert.throws(
      () => parseProxyConfig(`${MIN}workers: many\n`, '/etc/ksp/proxy.yaml'),
      /workers.*must be a number/,
    );
  });

  it('reads audit.bufferBytes and audit.overflow, and names what is wrong with them', () => {
    assert.deepEqual(
      parseProxyConfig(`${MIN}audit: { bufferBytes: 1048576, overflow: drop }\n`, '/etc/ksp/proxy.yaml')
        .audit,
      { file: '-', bufferBytes: 1048576, overflow: 'drop' },
    );
    assert.throws(
      () => parseProxyConfig(`${MIN}audit: { overflow: block }\n`, '/etc/ksp/proxy.yaml'),
      /audit\.overflow must be one of refuse, drop \(got "block"\)/,
    );
    assert.throws(
      () => parseProxyConfig(`${MIN}audit: { bufferBytes: 100 }\n`, '/etc/ksp/proxy.yaml'),
      /audit\.bufferBytes must be between 65536 and 1073741824, got 100/,
    );
    assert.throws(
      () => parseProxyConfig(`${MIN}audit: { bufferBytes: 100000.5 }\n`, '/etc/ksp/proxy.yaml'),
      /audit\.bufferBytes must be a whole number of bytes/,
    );
  });

  it('accepts every limits key, and keeps the default of the keys not given', () => {
    const config = parseProxyConfig(
      `${MIN}limits:
  maxConnections: 10
  maxStreamsPerConnection: 20
  maxRequestsPerIdentity: 30
  maxLongRunningPerIdentity: 40
  maxUpstreamSessions: 5
  maxLongRunningUpstreamSessions: 6
`,
      '/etc/ksp/proxy.yaml',
    );
    assert.deepEqual(config.limits, {
      maxConnections: 10,
      maxStreamsPerConnection: 20,
      maxRequestsPerIdentity: 30,
      maxLongRunningPerIdentity: 40,
      maxUpstreamSessions: 5,
      maxLongRunningUpstreamSessions: 6,
    });
    const one = parseProxyConfig(`${MIN}limits: { maxConnections: 1 }\n`, '/etc/ksp/proxy.yaml');
    assert.deepEqual(one.limits, { ...DEFAULT_LIMITS, maxConnections: 1 });
    assert.deepEqual(one.timeouts, DEFAULT_TIMEOUTS);
  });

  it('accepts every timeouts key as a duration, in milliseconds, and a shutdownDrain of 0', () => {
    const config = parseProxyConfig(
      `${MIN}timeouts:
  handshake: 5s
  idle: 10m
  responseHeaders: 1m10s
  longRunningResponseHeaders: 1s
  shutdownDrain: 0
  unauthenticated: 2
`,
      '/etc/ksp/proxy.yaml',
    );
    assert.deepEqual(config.timeouts, {
      handshakeMs: 5_000,
      idleMs: 600_000,
      responseHeadersMs: 70_000,
      longRunningResponseHeadersMs: 1_000,
      shutdownDrainMs: 0,
      unauthenticatedMs: 2_000,
    });
    const drain = parseProxyConfig(`${MIN}timeouts: { shutdownDrain: 1500ms }\n`, '/etc/ksp/proxy.yaml');
    assert.deepEqual(drain.timeouts, { ...DEFAULT_TIMEOUTS, shutdownDrainMs: 1500 });
    assert.deepEqual(drain.limits, DEFAULT_LIMITS);
  });

  it('refuses a limit that is 0, negative, fractional, too large or not a number, at its line and column', () => {
    const limit = (value: string): string => `${MIN}limits:\n  maxConnections: ${value}\n`;
    refuses(limit('0'), '6:19', /^limits\.maxConnections must be between 1 and 1000000, got 0$/);
    refuses(limit('-3'), '6:19', /^limits\.maxConnections must be between 1 and 1000000, got -3$/);
    refuses(limit('2.5'), '6:19', /^limits\.maxConnections must be a whole number$/);
    refuses(limit('2000000'), '6:19', /must be between 1 and 1000000, got 2000000/);
    refuses(limit('ten'), '6:19', /^limits\.maxConnections must be a number, got a string "ten"$/);
    refuses(limit('"10"'), '6:19', /^limits\.maxConnections must be a number, got a string "10"$/);
    refuses(limit('[1]'), '6:19', /^limits\.maxConnections must be a number, got a list$/);
    refuses(
      `${MIN}limits:\n  maxUpstreamSessions: 1001\n`,
      '6:24',
      /^limits\.maxUpstreamSessions must be between 1 and 1000, got 1001$/,
    );
  });

  it('refuses an unknown key in limits or timeouts, naming the allowed ones', () => {
    refuses(
      `${MIN}limits:\n  maxConnection: 10\n`,
      '6:3',
      /^unknown key "maxConnection" in limits \(allowed: maxConnections, .*maxLongRunningUpstreamSessions\)$/,
    );
    refuses(
      `${MIN}timeouts:\n  drain: 3s\n`,
      '6:3',
      /^unknown key "drain" in timeouts \(allowed: handshake, .*shutdownDrain, unauthenticated\)$/,
    );
    refuses(`${MIN}limits: 10\n`, '5:9', /^limits must be a map, got a number \(10\)$/);
    refuses(`${MIN}timeouts: [1s]\n`, '5:11', /^timeouts must be a map, got a list$/);
  });

  it('refuses a timeout under its minimum, negative, or not a duration, at its line and column', () => {
    const timeout = (key: string, value: string): string => `${MIN}timeouts:\n  ${key}: ${value}\n`;
    for (const key of [
      'handshake',
      'idle',
      'responseHeaders',
      'longRunningResponseHeaders',
      'unauthenticated',
    ]) {
      const at = `6:${key.length + 5}`;
      refuses(
        timeout(key, '500ms'),
        at,
        new RegExp(`^timeouts\\.${key} "500ms" is shorter than the minimum of 1s$`),
      );
      refuses(timeout(key, '0'), at, new RegExp(`^timeouts\\.${key} "0" is shorter than the minimum of 1s$`));
    }
    refuses(
      timeout('shutdownDrain', '-1'),
      '6:18',
      /^timeouts\.shutdownDrain: duration -1 must be a non-negative number of seconds$/,
    );
    refuses(timeout('idle', '-5s'), '6:9', /^timeouts\.idle: duration "-5s" is not valid/);
    refuses(timeout('idle', 'soon'), '6:9', /^timeouts\.idle: duration "soon" is not valid at "soon"/);
    refuses(
      timeout('idle', 'true'),
      '6:9',
      /^timeouts\.idle must be a duration such as 1h, 5m or 30s, got a boolean/,
    );
  });

  it('collects every problem of limits and timeouts before refusing', () => {
    assert.throws(
      () =>
        parseProxyConfig(
          `${MIN}limits: { maxConnections: 0, maxUpstreamSessions: 1.5 }\ntimeouts: { idle: 1ms }\n`,
          '/etc/ksp/proxy.yaml',
        ),
      (err: unknown) => {
        const messages = (err as ProxyConfigError).problems.map((p) => p.message);
        assert.equal(messages.length, 3, JSON.stringify(messages));
        assert.match(
          messages.join('\n'),
          /limits\.maxConnections.*\n.*limits\.maxUpstreamSessions.*\n.*timeouts\.idle/,
        );
        return true;
      },
    );
  });
});

describe('parseProxyConfig: upstream.url is an origin', () => {
  const url = (u: string): string => MIN.replace('https://127.0.0.1:6443', u);

  it('accepts scheme, host and port, with or without the trailing slash', () => {
    for (const u of ['https://127.0.0.1:6443', 'https://127.0.0.1:6443/', 'https://[::1]:6443']) {
      const config = parseProxyConfig(url(u), '/etc/ksp/proxy.yaml');
      assert.equal(config.upstream.kind, 'explicit');
    }
  });

  it('refuses an http:// url: the credential and the impersonation headers never travel in clear', () => {
    refuses(url('http://k:80'), '4:8', /^upstream\.url "http:\/\/k:80": must be https:\/\//);
  });

  it('refuses a path, a query or a fragment at the url, naming what an origin is', () => {
    const origin = /must be an origin \(scheme, host and port; no path, query or fragment\)/;
    refuses(url('https://127.0.0.1:6443/api'), '4:8', origin);
    refuses(url('https://127.0.0.1:6443/k8s/clusters/c-1/'), '4:8', origin);
    refuses(url('https://127.0.0.1:6443?timeout=5s'), '4:8', origin);
    refuses(url('https://127.0.0.1:6443/?a=b'), '4:8', origin);
    refuses(url('"https://127.0.0.1:6443#f"'), '4:8', origin);
    refuses(url('https://127.0.0.1:6443/api'), '4:8', /^upstream\.url "https:\/\/127\.0\.0\.1:6443\/api": /);
  });
});
