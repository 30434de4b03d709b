import { type DestinationStream, type Logger, type LoggerOptions, pino } from 'pino';

export type { Logger };

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export function isLogLevel(value: unknown): value is LogLevel {
  return typeof value === 'string' && (LOG_LEVELS as readonly string[]).includes(value);
}

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
