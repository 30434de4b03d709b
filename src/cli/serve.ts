import { parseArgs } from 'node:util';
import { loadProxyConfig } from '../config/proxy.ts';
import { createLogger, isLogLevel, LOG_LEVELS } from '../observability/logger.ts';
import { startProxy } from '../proxy/proxy.ts';
import { EXIT, UsageError } from './common.ts';

/** Runs the proxy until SIGINT or SIGTERM; resolves with the exit code. */
export async function serveCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { config: { type: 'string', short: 'c' }, 'log-level': { type: 'string' } },
  });
  if (positionals.length > 0) throw new UsageError(`serve takes no arguments, got ${positionals.join(' ')}`);
  if (values.config === undefined)
    throw new UsageError('serve needs --config FILE (see README, "Proxy configuration")');
  const level = values['log-level'];
  if (level !== undefined && !isLogLevel(level)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}`);
  }
  const config = await loadProxyConfig(values.config);
  const logger = createLogger({ level: level ?? config.logLevel, name: 'kube-svid-proxy' });
  const proxy = await startProxy(config, { logger });
  await new Promise<void>((resolve) => {
    const stop = (signal: NodeJS.Signals): void => {
      logger.info({ signal }, 'stopping');
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  await proxy.close();
  logger.info('proxy stopped');
  return EXIT.ok;
}
