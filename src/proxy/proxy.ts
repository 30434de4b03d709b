import type { Logger } from 'pino';
import { type AdminServer, createAdminServer, type ReadinessReport } from '../admin/server.ts';
import { ProxyMetrics } from '../observability/metrics.ts';
import { watchPolicy } from '../policy/watch.ts';
import { type AuditSink, fileAuditSink } from './audit.ts';
import { loadProxyConfig, type ProxyConfig } from './config.ts';
import { loadUpstreamCredential, type UpstreamCredential } from './credential.ts';
import { ProxyError, ProxyErrorCode } from './errors.ts';
import { Upstream } from './forward.ts';
import { ProxyServer } from './server.ts';
import { type IdentitySource, StaticIdentitySource, WorkloadIdentitySource } from './source.ts';

export interface RunningProxy {
  readonly server: ProxyServer;
  readonly admin: AdminServer;
  readonly metrics: ProxyMetrics;
  /** The data port actually bound (useful with port 0). */
  readonly port: number;
  /**
   * SIGHUP: re-read every file the proxy reads (the configuration, the policy, identity files, the upstream
   * credential files). A broken file is logged and the last good value kept; configuration changes that need a
   * restart are named in the log. Never throws.
   */
  reload(): Promise<void>;
  /**
   * SIGTERM: /readyz turns unready, the proxy stops accepting, sends GOAWAY, lets in-flight requests finish up to
   * `timeouts.shutdownDrain`, closes what is left, then closes everything else. Logs each step.
   */
  shutdown(): Promise<void>;
  /** Stops at once (tests): open connections are cut. */
  close(): Promise<void>;
}

export interface StartProxyOptions {
  readonly logger: Logger;
  /** Where audit Events go (default: `audit.file` of the configuration). */
  readonly audit?: AuditSink;
  /** Re-read poll for watched files (default 5 s). */
  readonly watchPollMs?: number;
  /** How often the upstream is probed for readiness (default 10 s). */
  readonly probeIntervalMs?: number;
  readonly defaultMetrics?: boolean;
  /** The file `config` came from: re-read on reload() to report changes. */
  readonly configFile?: string;
}

/**
 * Starts the whole proxy from its configuration: identity (Workload API or files), policy (watched), upstream
 * credential (token file re-read when it rotates), the TLS front door, and the admin listener. Anything invalid
 * at start is refused; later, broken edits keep the last good value and are reported.
 */
export async function startProxy(config: ProxyConfig, options: StartProxyOptions): Promise<RunningProxy> {
  const log = options.logger;
  const pollIntervalMs = options.watchPollMs ?? 5000;
  const metrics = new ProxyMetrics({ defaultMetrics: options.defaultMetrics ?? true });
  const closers: (() => unknown)[] = [];
  try {
    let audit = options.audit;
    if (audit === undefined) {
      let lastAuditError = 0;
      try {
        audit = fileAuditSink(config.audit.file, {
          bufferBytes: config.audit.bufferBytes,
          overflow: config.audit.overflow,
          onError: (err) => {
            // At most one line a minute: a broken destination fails every write.
            if (Date.now() - lastAuditError < 60_000) return;
            lastAuditError = Date.now();
            log.error(
              { file: config.audit.file, overflow: config.audit.overflow, err: { message: err.message } },
              config.audit.overflow === 'refuse'
                ? 'audit destination failed: requests are refused (503) until a write succeeds'
                : 'audit destination failed: audit Events are dropped (audit.overflow: drop) until a write succeeds',
            );
          },
        });
      } catch (err) {
        throw new ProxyError(ProxyErrorCode.Config, `audit.file: ${(err as Error).message}`, {
          cause: err,
        });
      }
      const sink = audit;
      closers.push(() => sink.close());
    }
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
      throw new ProxyError(ProxyErrorCode.Config, `${where}: ${(err as Error).message}`, { cause: err });
    }
    closers.push(() => source.close());
    const own = source.svid().id;
    if (!own.trustDomain.equals(config.trustDomain)) {
      throw new Error(
        `the proxy's SVID ${own} is not in the configured trust domain ${config.trustDomain.name}`,
      );
    }

    let server: ProxyServer | undefined;
    const policy = await watchPolicy(config.policyFile, {
      pollIntervalMs,
      onChange: (next) => {
        metrics.policyLoaded(policy.generation);
        server?.policyChanged();
        log.info(
          { file: config.policyFile, generation: policy.generation, trustDomains: next.trustDomains },
          'policy reloaded; open connections use it from their next request',
        );
      },
      onRecover: () => {
        metrics.policyLoaded(policy.generation);
        log.info(
          { file: config.policyFile, generation: policy.generation },
          'policy file valid again with the policy in force; nothing changed',
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

    let credential = await loadUpstreamCredential(config.upstream, { logger: log, pollIntervalMs });
    closers.push(() => credential.close());
    const upstreamTls = (c: UpstreamCredential) => ({
      url: c.url,
      ...(c.ca === undefined ? {} : { ca: c.ca }),
      ...(c.clientCert === undefined ? {} : { clientCert: c.clientCert }),
      ...(c.clientKey === undefined ? {} : { clientKey: c.clientKey }),
      authorization: () => c.authorization(),
    });
    const upstream = new Upstream({
      ...upstreamTls(credential),
      responseHeadersTimeoutMs: config.timeouts.responseHeadersMs,
      longRunningHeadersTimeoutMs: config.timeouts.longRunningResponseHeadersMs,
      maxSessions: config.limits.maxUpstreamSessions,
      maxLongRunningSessions: config.limits.maxLongRunningUpstreamSessions,
    });
    closers.push(() => upstream.close());

    server = new ProxyServer({
      trustDomain: config.trustDomain,
      source,
      policy,
      upstream,
      logger: log,
      audit,
      metrics,
      limits: config.limits,
      timeouts: config.timeouts,
    });
    const front = server;
    const address = await front.listen(config.listen.port, config.listen.host);
    closers.push(() => front.close());

    metrics.setAuditStats(() => audit.stats?.());
    metrics.setSvidExpiry(() => currentSvid(source)?.certificates[0]?.validToDate);
    metrics.setBundleAges(() => source.bundleChangedAt());
    metrics.setUsage(() => ({ inFlight: front.usage().inFlight, upstream: upstream.usage() }));

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

    // A minSvidRemaining at or above the SVID's whole lifetime would keep the proxy unready for ever.
    let warnedLifetime: number | undefined;
    const checkLifetime = (): void => {
      const leaf = currentSvid(source)?.certificates[0];
      if (leaf === undefined) return;
      const lifetime = (leaf.validToDate.getTime() - leaf.validFromDate.getTime()) / 1000;
      if (config.minSvidRemainingSeconds >= lifetime && warnedLifetime !== lifetime) {
        // Once per SVID lifetime seen, not at every rotation.
        warnedLifetime = lifetime;
        log.warn(
          { minSvidRemaining: config.minSvidRemainingSeconds, svidLifetime: lifetime },
          'readiness.minSvidRemaining is not shorter than the SVID lifetime: the proxy will never be ready; ' +
            'lower it (a third of the lifetime is a sane value)',
        );
      }
    };
    checkLifetime();
    source.on('update', checkLifetime);

    let shuttingDown = false;
    const readiness = (): ReadinessReport => {
      const svid = currentSvid(source);
      const leaf = svid?.certificates[0];
      const remaining = leaf ? (leaf.validToDate.getTime() - Date.now()) / 1000 : -1;
      const health = source.health();
      const usage = upstream.usage().ordinary;
      const usageNow = front.usage();
      const full = usage.sessions >= usage.max && usage.streams >= usage.capacity;
      const checks = [
        {
          name: 'svid',
          ok: svid !== undefined && remaining > config.minSvidRemainingSeconds,
          detail:
            svid === undefined
              ? 'no SVID to serve with'
              : `${svid.id} expires in ${Math.round(remaining)}s (needs more than ${config.minSvidRemainingSeconds}s)`,
        },
        { name: 'identitySource', ok: health.ok, detail: health.detail },
        { name: 'policy', ok: true, detail: `generation ${policy.generation} from ${config.policyFile}` },
        {
          name: 'upstream',
          ok: upstreamOk,
          detail: `${upstream.url.origin} ${upstreamOk ? 'answered' : 'did not answer'} (probed ${lastProbe})`,
        },
        {
          name: 'capacity',
          ok: !full && usageNow.connections < config.limits.maxConnections,
          detail:
            `${usageNow.connections}/${config.limits.maxConnections} connections (limits.maxConnections); ` +
            `${usage.streams} streams on ${usage.sessions}/${usage.max} upstream sessions (limits.maxUpstreamSessions)`,
        },
        {
          name: 'shutdown',
          ok: !shuttingDown,
          detail: shuttingDown ? 'draining for shutdown' : 'serving',
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
        limits: config.limits,
        timeouts: config.timeouts,
      },
      'proxy started',
    );

    const reload = async (): Promise<void> => {
      if (options.configFile !== undefined) {
        try {
          const next = await loadProxyConfig(options.configFile);
          const changed = restartKeys(config, next);
          if (changed.length > 0) {
            log.warn(
              { file: options.configFile, keys: changed },
              'configuration changed in keys that take effect only after a restart; running with the old values',
            );
          } else {
            log.info({ file: options.configFile }, 'configuration re-read: no change that needs a restart');
          }
        } catch (err) {
          log.error(
            { file: options.configFile, err: { message: (err as Error).message } },
            'configuration file rejected on reload; running with the configuration it started with',
          );
        }
      }
      await policy.reload();
      await source.reload();
      try {
        const next = await loadUpstreamCredential(config.upstream, { logger: log, pollIntervalMs });
        try {
          upstream.replaceCredential(upstreamTls(next));
        } catch (err) {
          next.close();
          throw err;
        }
        const previous = credential;
        credential = next;
        previous.close();
        log.info({ upstream: upstream.url.origin }, 'upstream credential re-read; new requests use it');
      } catch (err) {
        log.error(
          { err: { message: (err as Error).message } },
          'upstream credential rejected on reload; keeping the last good one',
        );
      }
    };

    return {
      server: front,
      admin,
      metrics,
      port: address.port,
      reload,
      shutdown: async () => {
        shuttingDown = true;
        log.info('shutting down: /readyz now answers 503');
        await front.drain(config.timeouts.shutdownDrainMs);
        for (const close of closers.reverse()) await close();
      },
      close: async () => {
        for (const close of closers.reverse()) await close();
      },
    };
  } catch (err) {
    for (const close of closers.reverse()) await close();
    throw err;
  }
}

/** The SVID the source serves, or undefined when it has none to give (withdrawn by the Workload API). */
function currentSvid(source: IdentitySource): ReturnType<IdentitySource['svid']> | undefined {
  try {
    return source.svid();
  } catch {
    return undefined;
  }
}

/** Configuration keys (as written in proxy.yaml) that differ between two loads and that only a restart applies. */
function restartKeys(a: ProxyConfig, b: ProxyConfig): string[] {
  const keys: [keyof ProxyConfig, string][] = [
    ['trustDomain', 'trustDomain'],
    ['listen', 'listen'],
    ['admin', 'admin.listen'],
    ['policyFile', 'policyFile'],
    ['identity', 'identity'],
    ['upstream', 'upstream'],
    ['minSvidRemainingSeconds', 'readiness.minSvidRemaining'],
    ['logLevel', 'logLevel'],
    ['limits', 'limits'],
    ['timeouts', 'timeouts'],
  ];
  const text = (v: unknown): string =>
    JSON.stringify(v, (_k, value) =>
      value instanceof Map ? [...value] : value instanceof URL ? value.href : value,
    ) ?? '';
  return keys.filter(([k]) => text(a[k]) !== text(b[k])).map(([, name]) => name);
}
