/**
 * `client.yaml`: what `kube-svid-proxy client` listens on and which spoke proxies it reaches. Every problem is
 * reported with its line and column, and any problem refuses the whole file (`ERR_CLIENT_CONFIG`).
 */
import { isIP } from 'node:net';
import type { Node, YAMLMap } from 'yaml';
import {
  type Field,
  fieldMap,
  fieldString,
  type HostPort,
  parseConfig,
  parseHostPort,
  readAdminListen,
  readConfigFile,
  readLimits,
  readLogLevel,
  readTimeouts,
  readWorkloadApi,
} from '../config/common.ts';
import type { YamlReader } from '../config/yaml.ts';
import type { LogLevel } from '../observability/logger.ts';
import { SpiffeId, TrustDomain } from '../spiffe/id.ts';
import { ClientConfigError, ClientErrorCode } from './errors.ts';

/** Where a spoke's local listener is: loopback TCP, or a Unix socket (mode 0600). */
export type LocalListen =
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number }
  | { readonly kind: 'unix'; readonly path: string };

export interface SpokeConfig {
  /** A DNS label naming the spoke in logs, metrics and `client kubeconfig`. */
  readonly name: string;
  readonly listen: LocalListen;
  /** The spoke proxy's origin (https, no path). */
  readonly server: URL;
  /** Who the spoke's server must be: exactly this SPIFFE ID, or any ID of this trust domain. */
  readonly serverAuthorization:
    | { readonly kind: 'id'; readonly id: SpiffeId }
    | { readonly kind: 'trustDomain'; readonly trustDomain: TrustDomain };
  /** TLS SNI sent to the spoke: `serverName`, else the server's host when it is a DNS name, else none. */
  readonly serverName?: string;
}

export interface ClientLimits {
  /** Local connections open at once on one spoke's listener; past it a new connection is closed at once. */
  readonly maxConnections: number;
  /** HTTP/2 sessions to one spoke proxy; a new one opens when the open ones are full (503 past them). */
  readonly maxSessionsPerSpoke: number;
}

export interface ClientTimeouts {
  /** TCP connect plus TLS handshake to a spoke (504 after). */
  readonly connectMs: number;
  /** A local connection with nothing in flight is closed after this long. */
  readonly idleMs: number;
  /** How long a local caller may take to send a request's headers. */
  readonly requestHeadersMs: number;
  /** On SIGTERM: how long requests in flight (watches included) may go on before what is left is closed. */
  readonly shutdownDrainMs: number;
}

export interface ClientConfig {
  readonly workloadApi: { readonly socket?: string; readonly hint?: string };
  readonly admin: HostPort;
  readonly logLevel: LogLevel;
  readonly limits: ClientLimits;
  readonly timeouts: ClientTimeouts;
  readonly spokes: readonly SpokeConfig[];
}

export const DEFAULT_CLIENT_ADMIN: HostPort = { host: '127.0.0.1', port: 9444 };

export const DEFAULT_CLIENT_LIMITS: ClientLimits = { maxConnections: 1024, maxSessionsPerSpoke: 8 };

export const DEFAULT_CLIENT_TIMEOUTS: ClientTimeouts = {
  connectMs: 10_000,
  idleMs: 300_000,
  requestHeadersMs: 60_000,
  shutdownDrainMs: 10_000,
};

const TOP = ['workloadApi', 'admin', 'logLevel', 'limits', 'timeouts', 'spokes'] as const;
const SPOKE = ['name', 'listen', 'server', 'serverId', 'trustDomain', 'serverName'] as const;
const LIMITS: Readonly<Record<keyof ClientLimits, number>> = {
  maxConnections: 100_000,
  maxSessionsPerSpoke: 64,
};
const TIMEOUTS: Readonly<Record<string, { field: keyof ClientTimeouts; minSeconds: number }>> = {
  connect: { field: 'connectMs', minSeconds: 1 },
  idle: { field: 'idleMs', minSeconds: 1 },
  requestHeaders: { field: 'requestHeadersMs', minSeconds: 1 },
  shutdownDrain: { field: 'shutdownDrainMs', minSeconds: 0 },
};
const SPOKE_NAME = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

/** True for addresses only this host reaches: 127.0.0.0/8, ::1, localhost. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}

/** A spoke's `listen`: `host:port` on loopback, or `unix:///absolute/path`. A string names what is wrong. */
export function parseLocalListen(text: string): LocalListen | string {
  if (text.startsWith('unix:')) {
    const path = text.startsWith('unix://') ? text.slice('unix://'.length) : text.slice('unix:'.length);
    if (!path.startsWith('/')) return `"${text}": a Unix socket needs an absolute path (unix:///run/x.sock)`;
    return { kind: 'unix', path };
  }
  const parsed = parseHostPort(text);
  if (typeof parsed === 'string') return `${parsed}, or unix:///path/to.sock`;
  if (!isLoopback(parsed.host)) {
    return (
      `"${text}" is not a loopback address: whoever reaches this listener acts with this workload's SPIFFE ID, ` +
      'so it listens on 127.0.0.1, [::1] or a Unix socket only'
    );
  }
  return { kind: 'tcp', host: parsed.host, port: parsed.port };
}

export function parseClientConfig(text: string, file: string): ClientConfig {
  return parseConfig(
    text,
    file,
    'the client configuration',
    readTop,
    (f, problems) => new ClientConfigError(f, problems),
  );
}

export async function loadClientConfig(file: string): Promise<ClientConfig> {
  return parseClientConfig(await readConfigFile(file, ClientErrorCode.Config), file);
}

function readTop(r: YamlReader): ClientConfig | undefined {
  const root = r.map(r.doc.contents as Node | null, 0, 'the client configuration');
  if (root === undefined) return undefined;
  const f = r.fields(root, TOP, 'the client configuration');
  const sub = (field: Field | undefined, what: string): YAMLMap | undefined => fieldMap(r, field, what);

  const wlMap = sub(f.get('workloadApi'), 'workloadApi');
  const workloadApi = wlMap ? readWorkloadApi(r, wlMap, 'workloadApi') : {};
  const admin = readAdminListen(r, sub(f.get('admin'), 'admin'), DEFAULT_CLIENT_ADMIN);
  const logLevel = readLogLevel(r, f.get('logLevel'));
  const limits = readLimits(r, sub(f.get('limits'), 'limits'), LIMITS, DEFAULT_CLIENT_LIMITS);
  const timeouts = readTimeouts(r, sub(f.get('timeouts'), 'timeouts'), TIMEOUTS, DEFAULT_CLIENT_TIMEOUTS);

  const spokes: SpokeConfig[] = [];
  const spokesField = f.get('spokes');
  if (spokesField === undefined) {
    r.report(
      r.offsetOf(root, 0),
      'missing required key "spokes" (e.g. spokes: [{ name: spoke-a, listen: 127.0.0.1:7443, ' +
        'server: https://spoke-a.example.org:8443, trustDomain: spoke-a.example.org }])',
    );
  } else {
    const items = r.list(spokesField.value, spokesField.valueOffset, 'spokes') ?? [];
    if (items.length === 0)
      r.report(spokesField.valueOffset, 'spokes is empty: name at least one spoke proxy');
    const names = new Set<string>();
    const listens = new Set<string>();
    for (const [index, item] of items.entries()) {
      const spoke = readSpoke(r, item.node, item.offset, `spokes[${index}]`);
      if (spoke === undefined) continue;
      const listenKey =
        spoke.listen.kind === 'unix' ? spoke.listen.path : `${spoke.listen.host}:${spoke.listen.port}`;
      if (names.has(spoke.name)) r.report(item.offset, `spokes[${index}]: the name "${spoke.name}" is taken`);
      else if (spoke.listen.kind === 'tcp' && spoke.listen.port !== 0 && listens.has(listenKey)) {
        r.report(
          item.offset,
          `spokes[${index}] (${spoke.name}): listen ${listenKey} is taken by another spoke`,
        );
      } else if (spoke.listen.kind === 'unix' && listens.has(listenKey)) {
        r.report(
          item.offset,
          `spokes[${index}] (${spoke.name}): listen ${listenKey} is taken by another spoke`,
        );
      }
      names.add(spoke.name);
      listens.add(listenKey);
      spokes.push(spoke);
    }
  }

  if (r.problems.length > 0) return undefined;
  return {
    workloadApi,
    admin,
    logLevel,
    limits,
    timeouts,
    spokes,
  };
}

function readSpoke(r: YamlReader, node: Node | null, offset: number, where: string): SpokeConfig | undefined {
  const map = r.map(node, offset, where);
  if (map === undefined) return undefined;
  const s = r.fields(map, SPOKE, where);
  const before = r.problems.length;
  const need = (key: (typeof SPOKE)[number], example: string): Field | undefined => {
    const field = s.get(key);
    if (field === undefined) r.report(offset, `${where} needs "${key}" (e.g. ${key}: ${example})`);
    return field;
  };
  const nameField = need('name', 'spoke-a');
  const name = fieldString(r, nameField, `${where}.name`);
  if (nameField && name !== undefined && !SPOKE_NAME.test(name)) {
    r.report(
      nameField.valueOffset,
      `${where}.name "${name}" is not a DNS label (a-z, 0-9 and "-", at most 63)`,
    );
  }
  const label = name === undefined ? where : `${where} (${name})`;

  const listenField = need('listen', '127.0.0.1:7443');
  const listenText = fieldString(r, listenField, `${label}.listen`);
  let listen: LocalListen | undefined;
  if (listenField && listenText !== undefined) {
    const parsed = parseLocalListen(listenText);
    if (typeof parsed === 'string') r.report(listenField.valueOffset, `${label}.listen: ${parsed}`);
    else listen = parsed;
  }

  const serverField = need('server', 'https://spoke-a.example.org:8443');
  const serverText = fieldString(r, serverField, `${label}.server`);
  let server: URL | undefined;
  if (serverField && serverText !== undefined) {
    try {
      server = new URL(serverText);
      if (server.protocol !== 'https:')
        throw new Error('must be https:// (the spoke proxy speaks mTLS only)');
      if (server.username || server.password) throw new Error('must not carry credentials');
      if (server.pathname !== '/' || server.search !== '' || server.hash !== '') {
        throw new Error('must be an origin (scheme, host and port; no path, query or fragment)');
      }
    } catch (err) {
      r.report(serverField.valueOffset, `${label}.server "${serverText}": ${(err as Error).message}`);
      server = undefined;
    }
  }

  const idField = s.get('serverId');
  const tdField = s.get('trustDomain');
  let serverAuthorization: SpokeConfig['serverAuthorization'] | undefined;
  if (idField && tdField) {
    r.report(tdField.keyOffset, `${label} takes serverId or trustDomain, not both`);
  } else if (idField) {
    const text = fieldString(r, idField, `${label}.serverId`);
    if (text !== undefined) {
      try {
        serverAuthorization = { kind: 'id', id: SpiffeId.parse(text) };
      } catch (err) {
        r.report(idField.valueOffset, `${label}.serverId: ${(err as Error).message}`);
      }
    }
  } else if (tdField) {
    const text = fieldString(r, tdField, `${label}.trustDomain`);
    if (text !== undefined) {
      if (/^spiffe:\/\/[^/]*\/./.test(text)) {
        r.report(
          tdField.valueOffset,
          `${label}.trustDomain "${text}" has a path; use serverId for one SPIFFE ID`,
        );
      } else {
        try {
          serverAuthorization = { kind: 'trustDomain', trustDomain: TrustDomain.parse(text) };
        } catch (err) {
          r.report(tdField.valueOffset, `${label}.trustDomain: ${(err as Error).message}`);
        }
      }
    }
  } else {
    r.report(
      offset,
      `${label} needs serverId (the spoke proxy's SPIFFE ID) or trustDomain (any ID of the spoke's trust ` +
        'domain): the client never sends its identity to a server it has not authorized',
    );
  }

  const serverNameField = s.get('serverName');
  let serverName = fieldString(r, serverNameField, `${label}.serverName`);
  if (serverNameField && serverName === '')
    r.report(serverNameField.valueOffset, `${label}.serverName is empty`);
  if (
    serverName === undefined &&
    server !== undefined &&
    isIP(server.hostname.replace(/^\[|\]$/g, '')) === 0
  ) {
    serverName = server.hostname;
  }

  if (
    r.problems.length > before ||
    name === undefined ||
    listen === undefined ||
    server === undefined ||
    serverAuthorization === undefined
  ) {
    return undefined;
  }
  return { name, listen, server, serverAuthorization, ...(serverName ? { serverName } : {}) };
}
