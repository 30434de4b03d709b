import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { register as globalRegistry } from 'prom-client';
import { ProxyMetrics } from '../../../src/observability/metrics.ts';

/** The value of the sample `name{labels}` in a Prometheus text exposition, or undefined if absent. */
function sample(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split('\n')) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (match === null || match[1] !== name) continue;
    const found: Record<string, string> = {};
    for (const pair of (match[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      found[pair[1] ?? ''] = pair[2] ?? '';
    }
    const wanted = Object.entries(labels);
    if (Object.keys(found).length === wanted.length && wanted.every(([k, v]) => found[k] === v)) {
      return Number(match[3]);
    }
  }
  return undefined;
}

/** A clock the tests move by hand. */
function manualClock(start = Date.parse('2030-01-01T00:00:00Z')): {
  now: () => number;
  set: (ms: number) => void;
} {
  let current = start;
  return { now: () => current, set: (ms) => (current = ms) };
}

describe('ProxyMetrics', () => {
  it('exposes handshakes by result, pre-initialised at 0, and their duration', async () => {
    const metrics = new ProxyMetrics({ defaultMetrics: false });
    let text = await metrics.metrics();
    for (const result of ['ok', 'refused', 'error']) {
      assert.equal(sample(text, 'ksp_handshakes_total', { result }), 0, result);
    }
    metrics.handshake('ok', 0.0007);
    metrics.handshake('ok', 0.002);
    metrics.handshake('refused', 0.003);
    metrics.handshake('error', 2);
    text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_handshakes_total', { result: 'ok' }), 2);
    assert.equal(sample(text, 'ksp_handshakes_total', { result: 'refused' }), 1);
    assert.equal(sample(text, 'ksp_handshakes_total', { result: 'error' }), 1);
    assert.equal(sample(text, 'ksp_handshake_duration_seconds_count'), 4);
    assert.equal(sample(text, 'ksp_handshake_duration_seconds_bucket', { le: '0.0005' }), 0);
    assert.equal(sample(text, 'ksp_handshake_duration_seconds_bucket', { le: '0.001' }), 1);
    assert.equal(sample(text, 'ksp_handshake_duration_seconds_bucket', { le: '1' }), 3);
    assert.equal(sample(text, 'ksp_handshake_duration_seconds_bucket', { le: '+Inf' }), 4);
  });

  it('counts authentication failures by code', async () => {
    const metrics = new ProxyMetrics({ defaultMetrics: false });
    metrics.authFailure('ERR_X509_EXPIRED');
    metrics.authFailure('ERR_X509_EXPIRED');
    metrics.authFailure('ERR_X509_WRONG_TRUST_DOMAIN');
    metrics.authFailure('ERR_TLS_HANDSHAKE');
    const text = await metrics.metrics();
    assert.match(text, /# TYPE ksp_authentication_failures_total counter/);
    assert.equal(sample(text, 'ksp_authentication_failures_total', { code: 'ERR_X509_EXPIRED' }), 2);
    assert.equal(
      sample(text, 'ksp_authentication_failures_total', { code: 'ERR_X509_WRONG_TRUST_DOMAIN' }),
      1,
    );
    assert.equal(sample(text, 'ksp_authentication_failures_total', { code: 'ERR_TLS_HANDSHAKE' }), 1);
  });

  it('counts decisions by rule, decision and code; "" for no rule and for the code of an allow', async () => {
    const metrics = new ProxyMetrics({ defaultMetrics: false });
    metrics.decision('ci-readers', true);
    metrics.decision('ci-readers', true, 'IGNORED_ON_ALLOW');
    metrics.decision('ci-readers', false, 'ERR_POLICY_REQUEST_LIMIT');
    metrics.decision(undefined, false, 'ERR_POLICY_NO_RULE');
    metrics.decision('', false, 'ERR_POLICY_NO_RULE');
    const text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_decisions_total', { rule: 'ci-readers', decision: 'allow', code: '' }), 2);
    assert.equal(
      sample(text, 'ksp_decisions_total', {
        rule: 'ci-readers',
        decision: 'deny',
        code: 'ERR_POLICY_REQUEST_LIMIT',
      }),
      1,
    );
    assert.equal(
      sample(text, 'ksp_decisions_total', { rule: '', decision: 'deny', code: 'ERR_POLICY_NO_RULE' }),
      2,
    );
    assert.doesNotMatch(text, /IGNORED_ON_ALLOW/);
  });

  it('counts requests by status code and observes their duration', async () => {
    const metrics = new ProxyMetrics({ defaultMetrics: false });
    metrics.request(200, 0.004);
    metrics.request(200, 0.02);
    metrics.request(403, 0.001);
    metrics.request(502, 400);
    const text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_requests_total', { code: '200' }), 2);
    assert.equal(sample(text, 'ksp_requests_total', { code: '403' }), 1);
    assert.equal(sample(text, 'ksp_requests_total', { code: '502' }), 1);
    assert.equal(sample(text, 'ksp_request_duration_seconds_count'), 4);
    assert.equal(sample(text, 'ksp_request_duration_seconds_bucket', { le: '0.005' }), 2);
    assert.equal(sample(text, 'ksp_request_duration_seconds_bucket', { le: '300' }), 3);
    assert.equal(sample(text, 'ksp_request_duration_seconds_bucket', { le: '+Inf' }), 4);
  });

  it('tracks policy generation, reload errors and whether the last reload succeeded', async () => {
    const metrics = new ProxyMetrics({ defaultMetrics: false });
    let text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_policy_generation'), 0);
    assert.equal(sample(text, 'ksp_policy_last_reload_success'), 0);
    assert.equal(sample(text, 'ksp_policy_reload_errors_total'), 0);

    metrics.policyLoaded(1);
    text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_policy_generation'), 1);
    assert.equal(sample(text, 'ksp_policy_last_reload_success'), 1);

    metrics.policyReloadFailed();
    metrics.policyReloadFailed();
    text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_policy_generation'), 1, 'the previous policy stays in force');
    assert.equal(sample(text, 'ksp_policy_last_reload_success'), 0);
    assert.equal(sample(text, 'ksp_policy_reload_errors_total'), 2);

    metrics.policyLoaded(2);
    text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_policy_generation'), 2);
    assert.equal(sample(text, 'ksp_policy_last_reload_success'), 1);
    assert.equal(sample(text, 'ksp_policy_reload_errors_total'), 2);
  });

  it('tracks open connections', async () => {
    const metrics = new ProxyMetrics({ defaultMetrics: false });
    metrics.connectionOpened();
    metrics.connectionOpened();
    metrics.connectionOpened();
    metrics.connectionClosed();
    assert.equal(sample(await metrics.metrics(), 'ksp_open_connections'), 2);
  });

  it('computes the SVID expiry at scrape time from the getter', async () => {
    const clock = manualClock();
    const metrics = new ProxyMetrics({ defaultMetrics: false, now: clock.now });
    assert.equal(sample(await metrics.metrics(), 'ksp_svid_expiry_seconds'), 0, 'no getter yet');

    let expiry: Date | undefined = new Date(clock.now() + 3_600_000);
    metrics.setSvidExpiry(() => expiry);
    assert.equal(sample(await metrics.metrics(), 'ksp_svid_expiry_seconds'), 3600);

    clock.set(clock.now() + 600_000);
    assert.equal(sample(await metrics.metrics(), 'ksp_svid_expiry_seconds'), 3000, 'time passed');

    expiry = new Date(clock.now() + 7_200_000);
    assert.equal(sample(await metrics.metrics(), 'ksp_svid_expiry_seconds'), 7200, 'rotated');

    expiry = new Date(clock.now() - 30_000);
    assert.equal(sample(await metrics.metrics(), 'ksp_svid_expiry_seconds'), -30, 'expired');

    expiry = undefined;
    assert.equal(sample(await metrics.metrics(), 'ksp_svid_expiry_seconds'), 0, 'no SVID');
  });

  it('computes bundle ages at scrape time; a trust domain that leaves the map leaves the metric', async () => {
    const clock = manualClock();
    const metrics = new ProxyMetrics({ defaultMetrics: false, now: clock.now });
    assert.doesNotMatch(await metrics.metrics(), /^ksp_bundle_age_seconds\{/m, 'no getter yet');

    let bundles = new Map([
      ['example.org', new Date(clock.now() - 120_000)],
      ['other.org', new Date(clock.now() - 5_000)],
    ]);
    metrics.setBundleAges(() => bundles);
    let text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_bundle_age_seconds', { trust_domain: 'example.org' }), 120);
    assert.equal(sample(text, 'ksp_bundle_age_seconds', { trust_domain: 'other.org' }), 5);

    clock.set(clock.now() + 10_000);
    bundles = new Map([['example.org', new Date(clock.now() - 1_000)]]);
    text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_bundle_age_seconds', { trust_domain: 'example.org' }), 1);
    assert.equal(sample(text, 'ksp_bundle_age_seconds', { trust_domain: 'other.org' }), undefined);
  });

  it('a getter that throws does not fail the scrape', async () => {
    const metrics = new ProxyMetrics({ defaultMetrics: false });
    metrics.setSvidExpiry(() => {
      throw new Error('source closed');
    });
    metrics.setBundleAges(() => {
      throw new Error('source closed');
    });
    const text = await metrics.metrics();
    assert.equal(sample(text, 'ksp_svid_expiry_seconds'), 0);
    assert.doesNotMatch(text, /^ksp_bundle_age_seconds\{/m);
  });

  it('declares every metric with its type', async () => {
    const text = await new ProxyMetrics({ defaultMetrics: false }).metrics();
    const types: Record<string, string> = {
      ksp_handshakes_total: 'counter',
      ksp_handshake_duration_seconds: 'histogram',
      ksp_authentication_failures_total: 'counter',
      ksp_decisions_total: 'counter',
      ksp_requests_total: 'counter',
      ksp_request_duration_seconds: 'histogram',
      ksp_policy_generation: 'gauge',
      ksp_policy_reload_errors_total: 'counter',
      ksp_policy_last_reload_success: 'gauge',
      ksp_svid_expiry_seconds: 'gauge',
      ksp_bundle_age_seconds: 'gauge',
      ksp_open_connections: 'gauge',
    };
    for (const [name, type] of Object.entries(types)) {
      assert.match(text, new RegExp(`^# TYPE ${name} ${type}$`, 'm'), name);
    }
    assert.doesNotMatch(text, /ksp_process_|ksp_nodejs_/, 'default metrics off');
  });

  it('adds process and Node.js metrics with the ksp_ prefix by default', async () => {
    const metrics = new ProxyMetrics();
    assert.equal(metrics.contentType, 'text/plain; version=0.0.4; charset=utf-8');
    const text = await metrics.metrics();
    assert.match(text, /^ksp_process_cpu_user_seconds_total \d/m);
    assert.match(text, /^ksp_process_resident_memory_bytes \d/m);
    assert.match(text, /^ksp_nodejs_eventloop_lag_seconds \d/m);
    assert.match(text, /^ksp_nodejs_version_info\{/m);
  });

  it('two instances keep their own registries, apart from the global one', async () => {
    const first = new ProxyMetrics();
    const second = new ProxyMetrics();
    first.authFailure('ERR_X509_EXPIRED');
    first.connectionOpened();
    second.connectionOpened();
    second.connectionOpened();
    const [a, b] = await Promise.all([first.metrics(), second.metrics()]);
    assert.equal(sample(a, 'ksp_authentication_failures_total', { code: 'ERR_X509_EXPIRED' }), 1);
    assert.equal(sample(b, 'ksp_authentication_failures_total', { code: 'ERR_X509_EXPIRED' }), undefined);
    assert.equal(sample(a, 'ksp_open_connections'), 1);
    assert.equal(sample(b, 'ksp_open_connections'), 2);
    assert.notEqual(first.registry, second.registry);
    assert.equal(globalRegistry.getSingleMetric('ksp_handshakes_total'), undefined);
    assert.equal(globalRegistry.getSingleMetric('ksp_process_cpu_user_seconds_total'), undefined);
  });
});
