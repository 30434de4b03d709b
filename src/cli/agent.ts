import { parseArgs } from 'node:util';
import { WorkloadAgent } from '../agent/agent.ts';
import { loadAgentConfig } from '../config/agent.ts';
import { createLogger, isLogLevel, LOG_LEVELS } from '../observability/logger.ts';
import { EXIT, UsageError } from './common.ts';

/** Runs until SIGINT or SIGTERM; resolves with the exit code. */
export async function agentCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { config: { type: 'string', short: 'c' }, 'log-level': { type: 'string' } },
  });
  if (positionals.length > 0) throw new UsageError(`agent takes no arguments, got ${positionals.join(' ')}`);
  if (values.config === undefined)
    throw new UsageError('agent needs --config FILE (see README, "Agent configuration")');
  const level = values['log-level'];
  if (level !== undefined && !isLogLevel(level)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}`);
  }
  const config = await loadAgentConfig(values.config);
  const logger = createLogger({ level: level ?? config.logLevel, name: 'kube-svid-proxy-agent' });
  const agent = await WorkloadAgent.start({ ...config, logger });
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
  await agent.close();
  logger.info('agent stopped');
  return EXIT.ok;
}
