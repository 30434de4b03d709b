import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import {
  DEFAULT_CLIENT_LIMITS,
  DEFAULT_CLIENT_TIMEOUTS,
  isLoopback,
  parseClientConfig,
  parseLocalListen,
} from '../../../src/client/config.ts';
import { ClientErrorCode } from '../../../src/client/errors.ts';
import { isKspError } from '../../../src/spiffe/errors.ts';

const SPOKE = `spokes:
  - name: spoke-a
    listen: 127.0.0.1:7443
    server: https://spoke-a.example.org:8443
    trustDomain: spoke-a.example.org
`;

function refusal(text: string): string {
  try {
    parseClientConfig(text, '/etc/ksp/client.yaml');
  } catch (err) {
    assert.ok(isKspError(err));
    assert.equal(err.code, ClientErrorCode.Config);
    return err.message;
  }
  assert.fail('accepted');
}

describe('client.yaml', () => {
  it('takes one spoke with defaults for everything else', () => {
    const config = parseClientConfig(SPOKE, '/etc/ksp/client.yaml');
    assert.deepEqual(config.limits, DEFAULT_CLIENT_LIMITS);
    assert.deepEqual(config.timeouts, DEFAULT_CLIENT_TIMEOUTS);
    assert.deepEqual(config.admin, { host: '127.0.0.1', port: 9444 });
    const [spoke] = config.spokes;
    assert.equal(spoke?.name, 'spoke-a');
    assert.deepEqual(spoke?.listen, { kind: 'tcp', host: '127.0.0.1', port: 7443 });
    assert.equal(spoke?.server.origin, 'https://spoke-a.example.org:8443');
    assert.equal(spoke?.serverName, 'spoke-a.example.org', 'SNI defaults to the DNS name of server');
    assert.equal(spoke?.serverAuthorization.kind, 'trustDomain');
  });

  it('takes several spokes, a Unix socket, an exact serverId, limits and timeouts', () => {
    const config = parseClientConfig(
      `${SPOKE}  - name: spoke-b
    listen: unix:///run/ksp-client/spoke-b.sock
    server: https://10.0.0.7:8443
    serverId: spiffe://spoke-b.example.org/ns/kube-svid-proxy/sa/kube-svid-proxy
    serverName: proxy.spoke-b.example.org
limits: { maxConnections: 64, maxSessionsPerSpoke: 2 }
timeouts: { connect: 3s, idle: 1m, requestHeaders: 20s, shutdownDrain: 0s }
workloadApi: { socket: unix:///run/spire/agent.sock, hint: gitops }
logLevel: debug
`,
      '/etc/ksp/client.yaml',
    );
    const b = config.spokes[1];
    assert.deepEqual(b?.listen, { kind: 'unix', path: '/run/ksp-client/spoke-b.sock' });
    assert.equal(b?.serverName, 'proxy.spoke-b.example.org');
    assert.equal(
      b?.serverAuthorization.kind === 'id' && b.serverAuthorization.id.toString(),
      'spiffe://spoke-b.example.org/ns/kube-svid-proxy/sa/kube-svid-proxy',
    );
    assert.deepEqual(config.limits, { maxConnections: 64, maxSessionsPerSpoke: 2 });
    assert.deepEqual(config.timeouts, {
      connectMs: 3000,
      idleMs: 60_000,
      requestHeadersMs: 20_000,
      shutdownDrainMs: 0,
    });
    assert.deepEqual(config.workloadApi, { socket: 'unix:///run/spire/agent.sock', hint: 'gitops' });
  });

  it('listens on loopback or a Unix socket only: anyone reaching it acts with the SVID', () => {
    assert.ok(
      isLoopback('127.0.0.1') && isLoopback('127.8.0.1') && isLoopback('::1') && isLoopback('localhost'),
    );
    assert.ok(!isLoopback('0.0.0.0') && !isLoopback('10.0.0.1') && !isLoopback('::'));
    assert.match(String(parseLocalListen('0.0.0.0:7443')), /not a loopback address/);
    assert.match(String(parseLocalListen('unix:relative.sock')), /absolute path/);
    assert.match(
      refusal(SPOKE.replace('127.0.0.1:7443', '0.0.0.0:7443')),
      /client\.yaml:3:13: .*not a loopback address/,
    );
  });

  it('refuses a spoke the client could not authorize, or could read two ways', () => {
    assert.match(
      refusal(SPOKE.replace('    trustDomain: spoke-a.example.org\n', '')),
      /needs serverId .* or trustDomain/,
    );
    assert.match(
      refusal(`${SPOKE}    serverId: spiffe://spoke-a.example.org/proxy\n`),
      /takes serverId or trustDomain, not both/,
    );
    assert.match(
      refusal(SPOKE.replace('https://spoke-a.example.org:8443', 'http://spoke-a:8443')),
      /must be https/,
    );
    assert.match(
      refusal(SPOKE.replace('spoke-a.example.org:8443', 'spoke-a.example.org:8443/api')),
      /must be an origin/,
    );
    assert.match(
      refusal(`${SPOKE}${SPOKE.replace('spokes:\n', '').replace('7443', '7444')}`),
      /the name "spoke-a" is taken/,
    );
    assert.match(
      refusal(`${SPOKE}${SPOKE.replace('spokes:\n', '').replace('spoke-a\n', 'spoke-b\n')}`),
      /listen 127\.0\.0\.1:7443 is taken/,
    );
    assert.match(refusal(SPOKE.replace('name: spoke-a', 'name: Spoke_A')), /not a DNS label/);
    assert.match(refusal('spokes: []\n'), /spokes is empty/);
    assert.match(refusal(`${SPOKE}bogus: 1\n`), /unknown key "bogus"/);
    assert.match(refusal(`${SPOKE}limits: { maxSessionsPerSpoke: 0 }\n`), /limits\.maxSessionsPerSpoke/);
  });

  it('accepts the shipped examples/client/client.yaml', () => {
    const file = join(import.meta.dirname, '..', '..', '..', 'examples', 'client', 'client.yaml');
    assert.equal(parseClientConfig(readFileSync(file, 'utf8'), file).spokes[0]?.name, 'local');
  });
});
