import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parse } from 'yaml';
import { TrustDomain } from '../../../src/spiffe/id.ts';
import type { ManagedSecret } from '../../../src/writer/config.ts';
import { argoConfig, type Credential, fluxKubeconfig, ownedValue } from '../../../src/writer/content.ts';
import { WriterErrorCode } from '../../../src/writer/errors.ts';

// Not real certificates: content.ts only places them (the e2e test checks real ones end to end).
const CREDENTIAL: Credential = {
  chainPem: '-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n',
  keyPem: '-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n',
  caPem: '-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n',
  spiffeId: 'spiffe://hub.example.org/ns/argocd/sa/argocd-application-controller',
  expires: new Date('2026-12-01T12:00:00Z'),
};
const td = TrustDomain.parse('spoke-a.example.org');
const ARGO: ManagedSecret = { kind: 'argocd', namespace: 'argocd', name: 'cluster-spoke-a', trustDomain: td };
const FLUX: ManagedSecret & { kind: 'flux' } = {
  kind: 'flux',
  namespace: 'flux-system',
  name: 'spoke-a-kubeconfig',
  trustDomain: td,
  server: new URL('https://spoke-a.example.org:8443'),
  serverName: 'proxy.spoke-a.example.org',
  key: 'value',
};
const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('what the writer puts in a Secret', () => {
  it("sets Argo CD's tlsClientConfig cert, key and CA and keeps every other field", () => {
    const config = JSON.parse(
      argoConfig(
        ARGO,
        '{"tlsClientConfig":{"serverName":"proxy.spoke-a","certData":"old"},"proxyUrl":""}',
        CREDENTIAL,
      ),
    );
    assert.deepEqual(config, {
      proxyUrl: '',
      tlsClientConfig: {
        serverName: 'proxy.spoke-a',
        insecure: false,
        certData: b64(CREDENTIAL.chainPem),
        keyData: b64(CREDENTIAL.keyPem),
        caData: b64(CREDENTIAL.caPem),
      },
    });
    assert.deepEqual(Object.keys(JSON.parse(argoConfig(ARGO, undefined, CREDENTIAL))), ['tlsClientConfig']);
  });

  it('refuses an Argo CD config it cannot merge, or one that would authenticate otherwise', () => {
    for (const [config, why] of [
      ['{not json', /not JSON/],
      ['[]', /not a JSON object/],
      ['{"tlsClientConfig":"x"}', /tlsClientConfig is not a JSON object/],
      ['{"bearerToken":"abc"}', /bearerToken is set/],
      ['{"execProviderConfig":{"command":"x"}}', /execProviderConfig is set/],
    ] as const) {
      assert.throws(
        () => argoConfig(ARGO, config, CREDENTIAL),
        (err: Error & { code?: string }) =>
          err.code === WriterErrorCode.Secret &&
          why.test(err.message) &&
          err.message.includes('argocd/cluster-spoke-a'),
      );
    }
  });

  it('writes Flux a self-contained kubeconfig: server, CA data, tls-server-name, client certificate and key data', () => {
    const kubeconfig = parse(fluxKubeconfig(FLUX, CREDENTIAL));
    assert.equal(kubeconfig['current-context'], 'spoke-a-kubeconfig');
    assert.deepEqual(kubeconfig.clusters[0].cluster, {
      server: 'https://spoke-a.example.org:8443',
      'certificate-authority-data': b64(CREDENTIAL.caPem),
      'tls-server-name': 'proxy.spoke-a.example.org',
    });
    assert.deepEqual(kubeconfig.users[0].user, {
      'client-certificate-data': b64(CREDENTIAL.chainPem),
      'client-key-data': b64(CREDENTIAL.keyPem),
    });
  });

  it('owns one data key per Secret: config for Argo CD, the configured key for Flux', () => {
    const argo = ownedValue(
      ARGO,
      { metadata: {}, data: { name: b64('spoke-a'), config: b64('{}') } },
      CREDENTIAL,
    );
    assert.equal(argo.key, 'config');
    const flux = ownedValue({ ...FLUX, key: 'value.yaml' }, { metadata: {} }, CREDENTIAL);
    assert.equal(flux.key, 'value.yaml');
    assert.match(Buffer.from(flux.value, 'base64').toString(), /client-key-data/);
  });
});
