/**
 * The command line's own refusals, under the common `KspError` base like every component's errors.
 */
/** ERR_USAGE is not printed (a usage error prints its message and the help pointer). */
export const CliErrorCode = {
  /** Bad usage: unknown command or flag, a missing or malformed argument (exit 2). */
  Usage: 'ERR_USAGE',
  /** `credential` could not produce an ExecCredential (exit 1). */
  Credential: 'ERR_CREDENTIAL',
  /** `bundle show | set` refused: no CA state yet, our own trust domain, a bundle without X.509 authorities (exit 1). */
  Bundle: 'ERR_BUNDLE',
} as const;
export type CliErrorCode = (typeof CliErrorCode)[keyof typeof CliErrorCode];
