/**
 * Durations in config files are written as Go and Kubernetes write them: `1h`, `5m`, `90s`, `1h30m`, `500ms`.
 * A bare number is seconds. The result is in seconds (fractions allowed for `ms`).
 */
const UNIT_SECONDS: Readonly<Record<string, number>> = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 };
const PART = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/y;

export function parseDuration(input: string | number): number {
  if (typeof input === 'number') {
    if (!Number.isFinite(input) || input < 0)
      throw new RangeError(`duration ${input} must be a non-negative number of seconds`);
    return input;
  }
  const text = input.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text);
  if (text === '') throw new RangeError('duration is empty');
  let seconds = 0;
  PART.lastIndex = 0;
  while (PART.lastIndex < text.length) {
    const at = PART.lastIndex;
    const m = PART.exec(text);
    if (m === null) {
      throw new RangeError(
        `duration "${input}" is not valid at "${text.slice(at)}" (write e.g. 1h, 5m, 30s, 1h30m)`,
      );
    }
    seconds += Number(m[1]) * (UNIT_SECONDS[m[2] as string] as number);
  }
  return seconds;
}

/** Format seconds compactly for logs and CLI output: 3600 → "1h", 90 → "1m30s". */
export function formatDuration(seconds: number): string {
  if (seconds < 1) return `${Math.round(seconds * 1000)}ms`;
  let rest = Math.round(seconds);
  let out = '';
  for (const [unit, size] of [
    ['d', 86400],
    ['h', 3600],
    ['m', 60],
    ['s', 1],
  ] as const) {
    if (rest >= size) {
      out += `${Math.floor(rest / size)}${unit}`;
      rest %= size;
    }
  }
  return out;
}
