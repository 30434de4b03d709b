/**
 * The client mode as a whole: the SVID from the Workload API, one listener and one upstream per spoke, the
 * admin listener (health, readiness, metrics). `kube-svid-proxy client` runs it until SIGTERM.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { type AdminServer, createAdminServer, type ReadinessReport } from '../admin/server.ts';
import { ClientMetrics } from '../observability/client-metrics.ts';
import { RateLimitedLog } from '../proxy/limits.ts';
import type { ClientConfig } from './config.ts';
import { ClientError, ClientErrorCode } from './errors.ts';
import { type ClientIdentity, WorkloadClientIdentity } from './identity.ts';
import { SpokeListener } from './listener.ts';
import { SpokeUpstream } from './spoke.ts';

export interface RunningClient {
  readonly listeners: readonly SpokeListener[];
  readonly admin: AdminServer;
  readonly metrics: ClientMetrics;
  readonly identity: ClientIdentity;
  /** SVID changes seen since start. */
  readonly rotations: number;
  /**
   * SIGTERM: readiness turns false, the listeners stop accepting, idle connections close, requests in flight
   * (watches, tunnels) get `timeouts.shutdownDrain` to end; then everything is closed.
   */
  shutdown(): Promise<void>;
  /** Stops at once (tests). */
  close(): Promise<void>;
}

export interface StartClientOptions {
  readonly logger: Logger;
  readonly defaultMetrics?: boolean;
}

export async function startClient(config: ClientConfig, options: StartClientOptions): Promise<RunningClient> {
  const log = options.logger;
  const metrics = new ClientMetrics({ defaultMetrics: options.defaultMetrics ?? true });
  const quiet = new RateLimitedLog(log);
  const spokes: SpokeUpstream[] = [];
  let identity: WorkloadClientIdentity;
  try {
    identity = await WorkloadClientIdentity.create({
      ...(config.workloadApi.socket ? { address: config.workloadApi.socket } : {}),
      ...(config.workloadApi.hint ? { hint: config.workloadApi.hint } : {}),
      logger: log,
      onRotate: (previous, next) => {
        metrics.rotated();
        log.info(
          {
            spiffeId: next.svid.id.toString(),
            expires: next.svid.certificates[0]?.validToDate.toISOString(),
            previousExpires: previous.svid.certificates[0]?.validToDate.toISOString(),
          },
          'new X.509-SVID: new requests present it; open watches and tunnels carry on',
        );
        for (const spoke of spokes) spoke.retire();
      },
    });
  } catch (err) {
    throw new ClientError(ClientErrorCode.NoSvid, `workloadApi: ${(err as Error).message}`, { cause: err });
  }
  const listeners: SpokeListener[] = [];
  let admin: AdminServer | undefined;
  try {
    for (const spokeConfig of config.spokes) {
      const spoke = new SpokeUpstream({
        config: spokeConfig,
        identity,
        limits: config.limits,
        timeouts: config.timeouts,
        logger: log,
        quiet,
        events: { connect: (result) => metrics.connect(spokeConfig.name, result) },
      });
      spokes.push(spoke);
      const listener = new SpokeListener({
        spoke,
        limits: config.limits,
        timeouts: config.timeouts,
        metrics,
        logger: log,
        quiet,
      });
      try {
        await listener.listen();
      } catch (err) {
        throw new ClientError(
          ClientErrorCode.Config,
          `spokes (${spokeConfig.name}): cannot listen: ${(err as Error).message}`,
          { cause: err },
        );
      }
      listeners.push(listener);
      const allowed = spokeConfig.serverAuthorization;
      log.info(
        {
          spoke: spokeConfig.name,
          listen: listener.address,
          server: spokeConfig.server.origin,
          ...(allowed.kind === 'id'
            ? { serverId: allowed.id.toString() }
            : { trustDomain: allowed.trustDomain.name }),
        },
        'spoke listener ready',
      );
    }
    let stopping = false;
    metrics.read(() => {
      let svidExpiry: Date | undefined;
      try {
        svidExpiry = identity.current().svid.certificates[0]?.validToDate;
      } catch {
        svidExpiry = undefined;
      }
      return {
        ...(svidExpiry ? { svidExpiry } : {}),
        spokes: listeners.map((l) => ({
          name: l.spoke.config.name,
          connections: l.connections,
          sessions: l.spoke.sessions,
          tunnels: l.spoke.tunnels,
        })),
      };
    });
    admin = await createAdminServer({
      metrics,
      logger: log,
      host: config.admin.host,
      port: config.admin.port,
      readiness: (): ReadinessReport => {
        const checks = [{ name: 'svid', ...identity.source.health() }];
        checks.push({
          name: 'listeners',
          ok: !stopping,
          detail: stopping
            ? 'shutting down'
            : listeners.map((l) => `${l.spoke.config.name} on ${l.address}`).join(', '),
        });
        return { ready: checks.every((c) => c.ok), checks };
      },
    });
    const adminServer = admin;
    const closeAll = async (): Promise<void> => {
      for (const listener of listeners) listener.close();
      for (const spoke of spokes) spoke.close();
      identity.close();
      await adminServer.close();
    };
    let closing: Promise<void> | undefined;
    return {
      listeners,
      admin: adminServer,
      metrics,
      identity,
      get rotations() {
        return identity.rotations;
      },
      shutdown: () => {
        closing ??= (async () => {
          stopping = true;
          for (const listener of listeners) listener.drain();
          for (const spoke of spokes) spoke.shutdown();
          const deadline = Date.now() + config.timeouts.shutdownDrainMs;
          log.info(
            { deadlineSeconds: config.timeouts.shutdownDrainMs / 1000 },
            'draining: listeners closed, requests in flight may finish',
          );
          while (Date.now() < deadline && listeners.some((l) => l.busy || l.spoke.busy)) await sleep(100);
          if (listeners.some((l) => l.busy || l.spoke.busy)) {
            log.warn('drain deadline reached (timeouts.shutdownDrain): closing what is left');
          }
          await closeAll();
        })();
        return closing;
      },
      close: () => {
        closing ??= closeAll();
        return closing;
      },
    };
  } catch (err) {
    for (const listener of listeners) listener.close();
    for (const spoke of spokes) spoke.close();
    identity.close();
    await admin?.close();
    throw err;
  }
}
