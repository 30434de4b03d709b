import { parseArgs } from 'node:util';
import { isLogLevel, LOG_LEVELS, type LogLevel } from '../observability/levels.ts';
import type { Logger } from '../observability/logger.ts';
import { KspError } from '../spiffe/errors.ts';
import { CliErrorCode } from './errors.ts';

/** Exit codes: 0 success, 1 refused or failed, 2 bad usage. */
export const EXIT = { ok: 0, refused: 1, usage: 2 } as const;

/** Bad flags or arguments: printed with a pointer to `help`, exit 2. */
export class UsageError extends KspError {
  constructor(message: string) {
    super(CliErrorCode.Usage, message);
    this.name = 'UsageError';
  }
}

/**
 * Writes to stdout. A reader that went away (`api fetch x509 | head`) is not a failure: the process ends quietly
 * with status 0, as the writer of a pipe should, instead of dying on an unhandled EPIPE with a stack trace.
 */
export function out(text: string): void {
  if (process.stdout.listenerCount('error') === 0) {
    process.stdout.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code !== 'EPIPE') throw e;
      process.exit(EXIT.ok);
    });
  }
  process.stdout.write(text);
}

/** Writes to stderr. A reader that went away loses the text, and nothing else: the exit status stays. */
export function err(text: string): void {
  if (process.stderr.listenerCount('error') === 0) {
    process.stderr.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code !== 'EPIPE') throw e;
    });
  }
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
    throw new UsageError(`${command} needs --config FILE (see docs/operator/configuration.md, "${section}")`);
  const level = values['log-level'];
  if (level !== undefined && !isLogLevel(level)) {
    throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}`);
  }
  return { config: values.config, ...(level === undefined ? {} : { level }) };
}

/**
 * For a service, SIGHUP means "reload", never Node's default "exit": call this before loading anything, and
 * the signal is ignored until runUntilSignal takes it over (and again once the service is stopping).
 */
export function holdSighup(): void {
  if (!process.listeners('SIGHUP').includes(ignoreHup)) process.on('SIGHUP', ignoreHup);
}

function ignoreHup(): void {
  process.stderr.write('SIGHUP while starting or stopping: ignored\n');
}

/** What a long-running command does on signals. */
export interface SignalHandlers {
  /** SIGINT/SIGTERM: stop the service (drain, then close). Called once; a second signal forces exit. */
  readonly stop: () => Promise<void>;
  /** SIGHUP: re-read every file the service reads. Must not throw for a bad file (keep the last good). */
  readonly reload?: () => Promise<void>;
  /** Resolves when the service stopped being able to serve on its own (a SPIRE server banned the agent). */
  readonly fatal?: Promise<Error>;
}

/**
 * Waits for SIGINT or SIGTERM, then stops the service; resolves with the exit code. SIGHUP re-reads the
 * service's files and never exits (without a `reload`, it is logged and ignored). A second SIGINT/SIGTERM while
 * stopping exits at once with status 1.
 */
export async function runUntilSignal(
  logger: Logger,
  what: string,
  handlers: SignalHandlers,
): Promise<number> {
  const onHup = (): void => {
    if (handlers.reload === undefined) {
      logger.warn({ signal: 'SIGHUP' }, `${what}: nothing to reload; SIGHUP ignored`);
      return;
    }
    logger.info({ signal: 'SIGHUP' }, `${what}: reloading every file it reads`);
    handlers.reload().then(
      () => logger.info({ signal: 'SIGHUP' }, `${what}: reload done`),
      (e: Error) => logger.error({ signal: 'SIGHUP', err: { message: e.message } }, `${what}: reload failed`),
    );
  };
  process.on('SIGHUP', onHup);
  process.off('SIGHUP', ignoreHup);
  let onSignal: ((s: NodeJS.Signals) => void) | undefined;
  const stopped = await Promise.race([
    new Promise<{ signal: NodeJS.Signals }>((resolve) => {
      onSignal = (s: NodeJS.Signals): void => resolve({ signal: s });
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
    }),
    ...(handlers.fatal ? [handlers.fatal.then((error) => ({ error }))] : []),
  ]);
  if (onSignal) {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  if ('signal' in stopped) logger.info({ signal: stopped.signal }, `${what}: stopping`);
  else {
    const e = stopped.error as Error & { code?: string };
    logger.error({ err: { code: e.code, message: e.message } }, `${what}: cannot go on; stopping`);
  }
  // A reload has nothing to do on a service that is stopping.
  process.off('SIGHUP', onHup);
  holdSighup();
  const force = (s: NodeJS.Signals): void => {
    logger.warn({ signal: s }, `${what}: second signal while stopping; exiting now`);
    process.exit(EXIT.refused);
  };
  process.once('SIGINT', force);
  process.once('SIGTERM', force);
  try {
    await handlers.stop();
  } finally {
    process.off('SIGINT', force);
    process.off('SIGTERM', force);
  }
  logger.info(`${what} stopped`);
  const code = 'signal' in stopped ? EXIT.ok : EXIT.refused;
  // Everything was closed; a handle something forgot (a client socket, a timer) must not keep a stopped service
  // alive. Logs are written synchronously, so nothing is lost by exiting.
  setTimeout(() => {
    logger.warn(`${what}: handles still open 2s after stopping; exiting anyway`);
    process.exit(code);
  }, 2000).unref();
  return code;
}
