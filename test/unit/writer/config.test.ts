import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { isKspError } from '../../../src/spiffe/errors.ts';
import { DEFAULT_RESYNC_MS, parseWriterConfig } from '../../../src/writer/config.ts';
import { WriterErrorCode } from '../../../src/writer/errors.ts';

const BASE = `kubernetes: { inCluster: true }
secrets:
  - kind: argocd
    namespace: argocd
    name: cluster-spoke-a
    trustDomain: spoke-a.example.org
  - kind: flux
    namespace: flux-system
    name: spoke-a-kubeconfig
    server: https://spoke-a.example.org:8443
    trustDomain: spoke-a.example.org
`;

function refusal(text: string): string {
  try {
    parseWriterConfig(text, '/etc/ksp/writer.yaml');
  } catch (err) {
    assert.ok(isKspError(err));
    assert.equal(err.code, WriterErrorCode.Config);
    return err.message;
  }
  assert.fail('accepted');
}

describe('writer.yaml', () => {
  it('takes Argo CD and Flux Secrets with defaults for the rest', () => {
    const config = parseWriterConfig(BASE, '/etc/ksp/writer.yaml');
    assert.deepEqual(config.kubernetes, { kind: 'inCluster' });
    assert.equal(config.resyncMs, DEFAULT_RESYNC_MS);
    assert.deepEqual(config.admin, { host: '127.0.0.1', port: 9445 });
    assert.equal(config.secrets[0]?.kind, 'argocd');
    const flux = config.secrets[1];
    assert.ok(flux?.kind === 'flux');
    assert.equal(flux.key, 'value');
    assert.equal(flux.server.origin, 'https://spoke-a.example.org:8443');
  });

  it('names what is wrong, under its own key', () => {
    assert.match(
      refusal(BASE.replace('kubernetes: { inCluster: true }\n', '')),
      /missing required key "kubernetes"/,
    );
    assert.match(
      refusal(BASE.replace('{ inCluster: true }', '{ url: http://hub:6443 }')),
      /kubernetes\.url .* must be https/,
    );
    assert.match(refusal(BASE.replace('kind: argocd', 'kind: helm')), /kind "helm" is not argocd or flux/);
    assert.match(
      refusal(BASE.replace('    server: https://spoke-a.example.org:8443\n', '')),
      /needs "server"/,
    );
    assert.match(
      refusal(
        BASE.replace('    name: cluster-spoke-a\n', '    name: cluster-spoke-a\n    server: https://x:1\n'),
      ),
      /server goes with kind: flux only/,
    );
    assert.match(
      refusal(
        `${BASE}  - kind: argocd\n    namespace: argocd\n    name: cluster-spoke-a\n    trustDomain: x.org\n`,
      ),
      /listed twice/,
    );
    assert.match(refusal(BASE.replace('name: spoke-a-kubeconfig', 'name: Spoke_A')), /not a Secret name/);
    assert.match(refusal(`${BASE}resync: 1s\n`), /shorter than the minimum of 10s/);
  });

  it('accepts the shipped examples/writer/writer.yaml', () => {
    const file = join(import.meta.dirname, '..', '..', '..', 'examples', 'writer', 'writer.yaml');
    const config = parseWriterConfig(readFileSync(file, 'utf8'), file);
    assert.deepEqual(config.kubernetes, { kind: 'kubeconfig', file: join(file, '..', 'hub.kubeconfig') });
  });
});
