import { type DestinationStream, type Logger, type LoggerOptions, pino } from 'pino';
import type { LogLevel } from './levels.ts';

export { isLogLevel, LOG_LEVELS, type LogLevel } from './levels.ts';
export type { Logger };

/**
 * JSON lines on stderr (stdout stays free for command output). Secrets are never passed to the logger; the
 * redaction list is a second line of defence should a key, token or SVID ever reach a log call by mistake.
 */
export function createLogger(
  options: { level?: LogLevel; name?: string; destination?: number; stream?: DestinationStream } = {},
): Logger {
  const config: LoggerOptions = {
    level: options.level ?? 'info',
    base: { name: options.name ?? 'kube-svid-proxy' },
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: {
      paths: [
        'token',
        'svid',
        'key',
        'privateKey',
        'authorization',
        '*.token',
        '*.privateKey',
        '*.authorization',
      ],
      censor: '[redacted]',
    },
    formatters: { level: (label) => ({ level: label }) },
  };
  return pino(config, options.stream ?? pino.destination({ fd: options.destination ?? 2, sync: true }));
}

/** A logger that discards everything (library default, unit tests). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
