import { createLogger } from '../observability/logger.ts';
import { loadWriterConfig } from '../writer/config.ts';
import { startWriter } from '../writer/writer.ts';
import { holdSighup, runUntilSignal, serviceFlags } from './common.ts';

/** Runs the credential writer until SIGINT or SIGTERM. */
export async function writerCommand(args: string[]): Promise<number> {
  const flags = serviceFlags('writer', args, 'writer.yaml');
  holdSighup();
  const config = await loadWriterConfig(flags.config);
  const logger = createLogger({ level: flags.level ?? config.logLevel, name: 'kube-svid-proxy-writer' });
  const writer = await startWriter(config, { logger });
  return runUntilSignal(logger, 'writer', { stop: () => writer.close() });
}
