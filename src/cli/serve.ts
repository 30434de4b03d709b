import { createLogger } from '../observability/logger.ts';
import { loadProxyConfig } from '../proxy/config.ts';
import { startProxyWorkers } from '../proxy/proxy.ts';
import { holdSighup, runUntilSignal, serviceFlags } from './common.ts';

/** Runs the proxy until SIGINT or SIGTERM (drained, then stopped); SIGHUP re-reads its files. */
export async function serveCommand(args: string[]): Promise<number> {
  const flags = serviceFlags('serve', args, 'proxy.yaml');
  holdSighup();
  const config = await loadProxyConfig(flags.config);
  const logger = createLogger({ level: flags.level ?? config.logLevel, name: 'kube-svid-proxy' });
  // `workers` (default: one per CPU) processes serve the data port; with 1, this process does.
  const proxy = await startProxyWorkers(config, { logger, configFile: flags.config });
  return runUntilSignal(logger, 'proxy', { stop: () => proxy.shutdown(), reload: () => proxy.reload() });
}
