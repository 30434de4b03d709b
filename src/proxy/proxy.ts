import type { Logger } from 'pino';
import { type AdminServer, createAdminServer, type ReadinessReport } from '../admin/server.ts';
import { AgentError, AgentErrorCode } from '../agent/errors.ts';
import type { ProxyConfig } from '../config/proxy.ts';
import { ProxyMetrics } from '../observability/metrics.ts';
import { watchPolicy } from '../policy/watch.ts';
import { loadUpstreamCredential } from './credential.ts';
import { Upstream } from './forward.ts';
import { ProxyServer } from './server.ts';
import { type IdentitySource, StaticIdentitySource, WorkloadIdentitySource } from './source.ts';

export interface RunningProxy {
  readonly server: ProxyServer;
  readonly admin: AdminServer;
  readonly metrics: ProxyMetrics;
  /** The data port actually bound (useful with port 0). */
  readonly port: number;
  close(): Promise<void>;
}

export interface StartProxyOptions {
  readonly logger: Logger;
  /** Where audit lines go (default: the logger, with `audit: true`). */
  readonly audit?: Logger;
  /** Re-read poll for watched files (default 5 s). */
  readonly watchPollMs?: number;
  /** How often the upstream is probed for readiness (default 10 s). */
  readonly probeIntervalMs?: number;
  readonly defaultMetrics?: boolean;
}

/**
 * Starts the whole proxy from its configuration: identity (Workload API or files), policy (watched), upstream
 * credential (token file re-read when it rotates), the TLS front door, and the admin listener. Anything invalid
 * at start is refused; later, broken edits keep the last good value and are reported.
 */
export async function startProxy(config: ProxyConfig, options: StartProxyOptions): Promise<RunningProxy> {
  const log = options.logger;
  const audit = options.audit ?? log.child({ audit: true });
  const pollIntervalMs = options.watchPollMs ?? 5000;
  const metrics = new ProxyMetrics({ defaultMetrics: options.defaultMetrics ?? true });
  const closers: (() => unknown)[] = [];
  try {
    let source: IdentitySource;
    try {
      source =
        config.identity.kind === 'files'
          ? await StaticIdentitySource.create(config.identity, log, pollIntervalMs)
          : await WorkloadIdentitySource.create({
              logger: log,
              ...(config.identity.socket ? { address: config.identity.socket } : {}),
              ...(config.identity.hint ? { hint: config.identity.hint } : {}),
            });
    } catch (err) {
      const where = config.identity.kind === 'files' ? 'identity.files' : 'identity.workloadApi';
      throw new AgentError(AgentErrorCode.ProxyConfig, `${where}: ${(err as Error).message}`, { cause: err });
    }
    closers.push(() => source.close());
    const own = source.svid().id;
    if (!own.trustDomain.equals(config.trustDomain)) {
      throw new Error(
        `the proxy's SVID ${own} is not in the configured trust domain ${config.trustDomain.name}`,
      );
    }

    const policy = await watchPolicy(config.policyFile, {
      pollIntervalMs,
      onChange: (next) => {
        metrics.policyLoaded(policy.generation);
        log.info(
          { file: config.policyFile, generation: policy.generation, trustDomains: next.trustDomains },
          'policy reloaded; open connections use it from their next request',
        );
      },
      onError: (err) => {
        metrics.policyReloadFailed();
        log.error(
          { file: config.policyFile, err: { message: err.message } },
          'policy file rejected; keeping the last good policy',
        );
      },
    });
    closers.push(() => policy.close());
    metrics.policyLoaded(policy.generation);

    const credential = await loadUpstreamCredential(config.upstream, { logger: log, pollIntervalMs });
    closers.push(() => credential.close());
    const upstream = new Upstream(credential);
    closers.push(() => upstream.close());

    const server = new ProxyServer({
      trustDomain: config.trustDomain,
      source,
      policy,
      upstream,
      logger: log,
      audit,
      metrics,
    });
    const address = await server.listen(config.listen.port, config.listen.host);
    closers.push(() => server.close());

    metrics.setSvidExpiry(() => source.svid().certificates[0]?.validToDate);
    metrics.setBundleAges(() => source.bundleChangedAt());

    let upstreamOk = false;
    let lastProbe = 'not probed yet';
    const probe = async (): Promise<void> => {
      upstreamOk = await upstream.probe();
      lastProbe = new Date().toISOString();
    };
    await probe();
    const probeTimer = setInterval(() => void probe(), options.probeIntervalMs ?? 10_000);
    probeTimer.unref();
    closers.push(() => clearInterval(probeTimer));

    const readiness = (): ReadinessReport => {
      const leaf = source.svid().certificates[0];
      const remaining = leaf ? (leaf.validToDate.getTime() - Date.now()) / 1000 : -1;
      const checks = [
        {
          name: 'svid',
          ok: remaining > config.minSvidRemainingSeconds,
          detail: `${source.svid().id} expires in ${Math.round(remaining)}s (needs more than ${config.minSvidRemainingSeconds}s)`,
        },
        { name: 'policy', ok: true, detail: `generation ${policy.generation} from ${config.policyFile}` },
        {
          name: 'upstream',
          ok: upstreamOk,
          detail: `${upstream.url.origin} ${upstreamOk ? 'answered' : 'did not answer'} (probed ${lastProbe})`,
        },
      ];
      return { ready: checks.every((c) => c.ok), checks };
    };
    const admin = await createAdminServer({
      metrics,
      readiness,
      logger: log,
      host: config.admin.host,
      port: config.admin.port,
    });
    closers.push(() => admin.close());
    log.info(
      {
        spiffeId: own.toString(),
        listen: `${config.listen.host}:${address.port}`,
        admin: admin.address,
        upstream: upstream.url.origin,
      },
      'proxy started',
    );
    return {
      server,
      admin,
      metrics,
      port: address.port,
      close: async () => {
        for (const close of closers.reverse()) await close();
      },
    };
  } catch (err) {
    for (const close of closers.reverse()) await close();
    throw err;
  }
}
