/**
 * What the agent's and the proxy's configuration files share: relative paths, the trust domain, the log level,
 * and maps of trust domain → bundle file. Each reports problems on the reader, at the value at fault.
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import type { Node, YAMLMap } from 'yaml';
import { isLogLevel, LOG_LEVELS, type LogLevel } from '../observability/logger.ts';
import { KspError } from '../spiffe/errors.ts';
import { TrustDomain } from '../spiffe/id.ts';
import { readYaml, type YamlProblem, type YamlReader } from './yaml.ts';

/** A key's value node with the offsets of key and value, as `YamlReader.fields` returns it. */
export interface HostPort {
  readonly host: string;
  readonly port: number;
}

export function parseHostPort(text: string): HostPort | string {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(text.trim());
  if (m === null) return `"${text}" is not host:port (e.g. 0.0.0.0:8443, 127.0.0.1:9443, [::1]:8443)`;
  const port = Number(m[3]);
  if (port > 65535) return `port ${port} is out of range`;
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}

export type Field = { value: Node | null; keyOffset: number; valueOffset: number };

/** Resolves paths in a config file against the file's directory. */
export function pathResolver(file: string): (value: string | undefined) => string | undefined {
  const base = dirname(resolve(file));
  return (value) => (value === undefined ? undefined : isAbsolute(value) ? value : resolve(base, value));
}

export function fieldString(r: YamlReader, field: Field | undefined, what: string): string | undefined {
  return field && r.string(field.value, field.valueOffset, what);
}

export function fieldMap(r: YamlReader, field: Field | undefined, what: string): YAMLMap | undefined {
  return field && r.map(field.value, field.valueOffset, what);
}

/** The required `trustDomain` key: a name (or `spiffe://name`), never an ID with a path. */
export function readTrustDomain(
  r: YamlReader,
  root: YAMLMap,
  field: Field | undefined,
): TrustDomain | undefined {
  if (field === undefined) {
    r.report(r.offsetOf(root, 0), 'missing required key "trustDomain" (e.g. trustDomain: spoke.example.org)');
    return undefined;
  }
  const name = fieldString(r, field, 'trustDomain');
  if (name === undefined) return undefined;
  if (/^spiffe:\/\/[^/]*\/./.test(name)) {
    r.report(field.valueOffset, `trustDomain "${name}" has a path; write the trust domain name only`);
    return undefined;
  }
  try {
    return TrustDomain.parse(name);
  } catch (err) {
    r.report(field.valueOffset, `trustDomain: ${(err as Error).message}`);
    return undefined;
  }
}

export function readLogLevel(r: YamlReader, field: Field | undefined): LogLevel {
  const level = fieldString(r, field, 'logLevel');
  if (field === undefined || level === undefined) return 'info';
  if (isLogLevel(level)) return level;
  r.report(field.valueOffset, `logLevel "${level}" is not one of ${LOG_LEVELS.join(', ')}`);
  return 'info';
}

/** A map of trust domain name → file (`federation.bundles`, `identity.files.bundles`), paths resolved. */
export function readTrustDomainFiles(
  r: YamlReader,
  map: YAMLMap,
  what: string,
  path: (value: string | undefined) => string | undefined,
  own?: TrustDomain,
): Map<string, string> {
  const out = new Map<string, string>();
  for (const pair of map.items) {
    const keyNode = pair.key as Node | null;
    const keyOffset = r.offsetOf(keyNode, r.offsetOf(map, 0));
    const name = r.string(keyNode, keyOffset, `a ${what} key (a trust domain name)`);
    const valueNode = pair.value as Node | null;
    const file = path(r.string(valueNode, r.offsetOf(valueNode, keyOffset), 'a bundle file'));
    if (name === undefined || file === undefined) continue;
    try {
      const td = TrustDomain.parse(name);
      if (own?.equals(td)) {
        r.report(keyOffset, `${what}: ${name} is our own trust domain`);
        continue;
      }
      out.set(td.name, file);
    } catch (err) {
      r.report(keyOffset, `${what}: ${(err as Error).message}`);
    }
  }
  return out;
}

/**
 * Parses a whole configuration file: YAML with positions, then `readTop`. Any problem refuses the file, with
 * every problem listed (`makeError` gives the command's error class and code).
 */
export function parseConfig<T>(
  text: string,
  file: string,
  what: string,
  readTop: (r: YamlReader, path: (value: string | undefined) => string | undefined) => T | undefined,
  makeError: (file: string, problems: readonly YamlProblem[]) => Error,
): T {
  const { reader, ok } = readYaml(text, what);
  const config = ok ? readTop(reader, pathResolver(file)) : undefined;
  if (config === undefined || reader.problems.length > 0) {
    if (reader.problems.length === 0) reader.report(0, 'the configuration is empty');
    throw makeError(file, reader.sortedProblems());
  }
  return config;
}

/**
 * An unreadable configuration file, refused with the command's stable code (`ERR_AGENT_CONFIG`,
 * `ERR_PROXY_CONFIG`). Its own class, not the agent's, so config/ stays below the commands it serves.
 */
export class ConfigReadError extends KspError {
  readonly file: string;

  constructor(code: string, file: string, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'ConfigReadError';
    this.file = file;
  }
}

/** Reads a configuration file, refusing an unreadable one with `code`, naming the file. */
export async function readConfigFile(file: string, code: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    throw new ConfigReadError(code, file, `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/** `workloadApi` (or `identity.workloadApi`): where the Workload API is, and which SVID to take. */
export function readWorkloadApi(
  r: YamlReader,
  map: YAMLMap,
  where: string,
): { readonly socket?: string; readonly hint?: string } {
  const w = r.fields(map, ['socket', 'hint'] as const, where);
  const socket = fieldString(r, w.get('socket'), `${where}.socket`);
  const hint = fieldString(r, w.get('hint'), `${where}.hint`);
  return { ...(socket ? { socket } : {}), ...(hint ? { hint } : {}) };
}

/** `admin: { listen: host:port }`, or `fallback` when absent or refused (reported). */
export function readAdminListen(r: YamlReader, map: YAMLMap | undefined, fallback: HostPort): HostPort {
  if (map === undefined) return fallback;
  const field = r.fields(map, ['listen'] as const, 'admin').get('listen');
  const text = fieldString(r, field, 'admin.listen');
  if (field === undefined || text === undefined) return fallback;
  const parsed = parseHostPort(text);
  if (typeof parsed === 'string') {
    r.report(field.valueOffset, `admin.listen: ${parsed}`);
    return fallback;
  }
  return parsed;
}

/** `limits.<key>`: whole numbers from 1 to `max[key]`, each defaulting to `defaults[key]`. */
export function readLimits<K extends string>(
  r: YamlReader,
  map: YAMLMap | undefined,
  max: Readonly<Record<K, number>>,
  defaults: Readonly<Record<K, number>>,
): Record<K, number> {
  const limits = { ...defaults } as Record<K, number>;
  if (map === undefined) return limits;
  const keys = Object.keys(max) as K[];
  const l = r.fields(map, keys, 'limits');
  for (const key of keys) {
    const field = l.get(key);
    if (field === undefined) continue;
    const value = r.number(field.value, field.valueOffset, `limits.${key}`, 1, max[key]);
    if (value === undefined) continue;
    if (!Number.isInteger(value)) r.report(field.valueOffset, `limits.${key} must be a whole number`);
    else limits[key] = value;
  }
  return limits;
}

/** A day: more than any timeout should be, and within what Node's timers hold (2^31-1 ms, 24.8 days). */
const MAX_TIMEOUT_SECONDS = 24 * 3600;

/** `timeouts.<key>`: durations from `minSeconds` to 24h, each setting `field` in milliseconds. */
export function readTimeouts<F extends string>(
  r: YamlReader,
  map: YAMLMap | undefined,
  spec: Readonly<Record<string, { field: F; minSeconds: number }>>,
  defaults: Readonly<Record<F, number>>,
): Record<F, number> {
  const timeouts = { ...defaults } as Record<F, number>;
  if (map === undefined) return timeouts;
  const t = r.fields(map, Object.keys(spec), 'timeouts');
  for (const [key, { field: name, minSeconds }] of Object.entries(spec)) {
    const field = t.get(key);
    if (field === undefined) continue;
    const seconds = r.duration(field.value, field.valueOffset, `timeouts.${key}`, minSeconds);
    if (seconds === undefined) continue;
    if (seconds > MAX_TIMEOUT_SECONDS) r.report(field.valueOffset, `timeouts.${key} must be at most 24h`);
    else timeouts[name] = seconds * 1000;
  }
  return timeouts;
}
