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
