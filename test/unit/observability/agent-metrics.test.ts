import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { AgentMetrics } from '../../../src/observability/agent-metrics.ts';

const T0 = Date.parse('2030-01-01T00:00:00Z');

function sample(text: string, name: string): string | undefined {
  return text
    .split('\n')
    .find((line) => line.startsWith(name))
    ?.slice(name.length + 1);
}

describe('AgentMetrics', () => {
  it("computes each relationship's bundle age at scrape time: it grows while no fetch succeeds", async () => {
    let now = T0;
    const metrics = new AgentMetrics({ defaultMetrics: false, now: () => now });
    const lastSuccess = new Date(T0 - 30_000);
    metrics.readRelationships(() => [
      { trustDomain: 'hub.example.org', lastSuccess, sequence: 7n, hasBundle: true },
      { trustDomain: 'new.example.org', hasBundle: false },
    ]);
    let text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_federation_bundle_age_seconds{trust_domain="hub.example.org"}'), '30');
    assert.equal(sample(text, 'ksp_federation_bundle_sequence{trust_domain="hub.example.org"}'), '7');
    assert.equal(sample(text, 'ksp_federation_bundle_present{trust_domain="new.example.org"}'), '0');
    assert.equal(
      sample(text, 'ksp_federation_bundle_age_seconds{trust_domain="new.example.org"}'),
      undefined,
      'no age before the first success',
    );
    now += 3600_000;
    text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_federation_bundle_age_seconds{trust_domain="hub.example.org"}'), '3630');
    assert.equal(
      sample(text, 'ksp_federation_last_success_timestamp_seconds{trust_domain="hub.example.org"}'),
      String(lastSuccess.getTime() / 1000),
    );
  });

  it('counts fetches by result and errors by code, every result shown from the start', async () => {
    const metrics = new AgentMetrics({ defaultMetrics: false });
    metrics.declare('hub.example.org');
    let text = await metrics.metrics();
    assert.equal(
      sample(text, 'ksp_federation_fetches_total{trust_domain="hub.example.org",result="error"}'),
      '0',
    );
    metrics.fetched('hub.example.org', 'updated');
    metrics.fetched('hub.example.org', 'error', 'ERR_FEDERATION_FETCH');
    metrics.fetched('hub.example.org', 'error', 'ERR_FEDERATION_FETCH');
    text = await metrics.metrics();
    assert.equal(
      sample(text, 'ksp_federation_fetches_total{trust_domain="hub.example.org",result="updated"}'),
      '1',
    );
    assert.equal(
      sample(
        text,
        'ksp_federation_fetch_errors_total{trust_domain="hub.example.org",code="ERR_FEDERATION_FETCH"}',
      ),
      '2',
    );
  });

  it('reports the CA that signs: generation, expiry and our bundle sequence', async () => {
    const metrics = new AgentMetrics({ defaultMetrics: false });
    metrics.readCa(() => ({ generation: 3, notAfter: new Date(T0), sequence: 12n }));
    const text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_agent_ca_generation'), '3');
    assert.equal(sample(text, 'ksp_agent_ca_expiry_timestamp_seconds'), String(T0 / 1000));
    assert.equal(sample(text, 'ksp_agent_bundle_sequence'), '12');
  });

  it('reports the SPIRE upstream with issuer: spire, and no CA series of its own', async () => {
    const metrics = new AgentMetrics({ defaultMetrics: false });
    metrics.readSpire(() => ({
      lastSync: new Date(T0),
      agentExpiresAt: new Date(T0 + 3_600_000),
      consecutiveFailures: 2,
      entries: 3,
      svids: 2,
      bundleSequence: 7n,
    }));
    metrics.spireSynced();
    metrics.spireSynced('ERR_AGENT_UPSTREAM');
    metrics.spireSynced('ERR_AGENT_UPSTREAM');
    const text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_agent_spire_last_sync_timestamp_seconds'), String(T0 / 1000));
    assert.equal(
      sample(text, 'ksp_agent_spire_agent_svid_expiry_timestamp_seconds'),
      String(T0 / 1000 + 3600),
    );
    assert.equal(sample(text, 'ksp_agent_spire_consecutive_failures'), '2');
    assert.equal(sample(text, 'ksp_agent_spire_entries'), '3');
    assert.equal(sample(text, 'ksp_agent_spire_x509_svids'), '2');
    assert.equal(sample(text, 'ksp_agent_bundle_sequence'), '7');
    assert.equal(sample(text, 'ksp_agent_spire_syncs_total{result="ok"}'), '1');
    assert.equal(sample(text, 'ksp_agent_spire_syncs_total{result="error"}'), '2');
    assert.equal(sample(text, 'ksp_agent_spire_sync_errors_total{code="ERR_AGENT_UPSTREAM"}'), '2');
    assert.doesNotMatch(text, /ksp_agent_ca_/);
  });
});
