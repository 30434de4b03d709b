import { parseArgs } from 'node:util';
import { isLogLevel, LOG_LEVELS, type LogLevel } from '../observability/levels.ts';
import type { Logger } from '../observability/logger.ts';

/** Exit codes: 0 success, 1 refused or failed, 2 bad usage, 3 not built yet. */
export const EXIT = { ok: 0, refused: 1, usage: 2, notBuilt: 3 } as const;

/** Bad flags or arguments: printed with a pointer to `help`, exit 2. */
export class UsageError extends Error {}

export function out(text: string): void {
  process.stdout.write(text);
}

export function err(text: string): void {
  process.stderr.write(text);
}

/** The flags every long-running command takes: `--config FILE` (required) and `--log-level LEVEL`. */
export function serviceFlags(
  command: string,
  args: string[],
  section: string,
): { config: string; level?: LogLevel } {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { config: { type: 'string', short: 'c' }, 'log-level': { type: 'string' } },
  });
  if (positionals.length > 0)
    throw new UsageError(`${command} takes no arguments, got ${positionals.join(' ')}`);
  if (values.config === undefined)
    throw new UsageError(`${command} needs --config FILE (see README, "${section}")`);
  const level = values['log-level'];
  if (level !== undefined && !isLogLevel(level)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}`);
  }
  return { config: values.config, ...(level === undefined ? {} : { level }) };
}

/** Waits for SIGINT or SIGTERM, then stops the service; resolves with the exit code. */
export async function runUntilSignal(
  logger: Logger,
  what: string,
  stop: () => Promise<void>,
): Promise<number> {
  await new Promise<void>((resolve) => {
    const onSignal = (signal: NodeJS.Signals): void => {
      logger.info({ signal }, 'stopping');
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      resolve();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
  await stop();
  logger.info(`${what} stopped`);
  return EXIT.ok;
}
