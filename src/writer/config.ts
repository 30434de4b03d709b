/**
 * `writer.yaml`: which Secrets the credential writer keeps filled, where they live, and where its SVID comes from.
 * Every problem is reported with its line and column; any problem refuses the whole file (`ERR_WRITER_CONFIG`).
 */
import type { Node, YAMLMap } from 'yaml';
import {
  type Field,
  fieldMap,
  fieldString,
  type HostPort,
  parseConfig,
  readAdminListen,
  readConfigFile,
  readLogLevel,
  readWorkloadApi,
} from '../config/common.ts';
import type { YamlReader } from '../config/yaml.ts';
import type { LogLevel } from '../observability/logger.ts';
import { readUpstream, type UpstreamConfig } from '../proxy/config.ts';
import { TrustDomain } from '../spiffe/id.ts';
import { WriterConfigError, WriterErrorCode } from './errors.ts';

/** One managed Secret. */
export type ManagedSecret =
  | {
      /** An Argo CD cluster Secret: the writer owns `tlsClientConfig.certData`, `keyData`, `caData` of `config`. */
      readonly kind: 'argocd';
      readonly namespace: string;
      readonly name: string;
      /** Whose bundle becomes `caData`: the spoke proxy's trust domain. */
      readonly trustDomain: TrustDomain;
    }
  | {
      /** A Flux kubeconfig Secret: the writer owns one key (`value` by default), a whole kubeconfig. */
      readonly kind: 'flux';
      readonly namespace: string;
      readonly name: string;
      readonly trustDomain: TrustDomain;
      /** The spoke proxy's URL, the kubeconfig's `server`. */
      readonly server: URL;
      /** `tls-server-name`, when the proxy's certificate names another host than `server`'s. */
      readonly serverName?: string;
      readonly key: string;
    };

export interface WriterConfig {
  readonly workloadApi: { readonly socket?: string; readonly hint?: string };
  readonly admin: HostPort;
  readonly logLevel: LogLevel;
  /** The kube-apiserver holding the Secrets (the hub's), and the writer's credential for it. */
  readonly kubernetes: UpstreamConfig;
  /** How often every Secret is read again and repaired if someone changed the keys the writer owns. */
  readonly resyncMs: number;
  readonly secrets: readonly ManagedSecret[];
}

export const DEFAULT_WRITER_ADMIN: HostPort = { host: '127.0.0.1', port: 9445 };
export const DEFAULT_RESYNC_MS = 300_000;
export const DEFAULT_FLUX_KEY = 'value';

const TOP = ['workloadApi', 'admin', 'logLevel', 'kubernetes', 'resync', 'secrets'] as const;
const SECRET = ['kind', 'namespace', 'name', 'trustDomain', 'server', 'serverName', 'key'] as const;
/** RFC 1123 subdomain (a Secret's name) and label (a namespace). */
const SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
/** A Secret data key. */
const DATA_KEY = /^[-._a-zA-Z0-9]+$/;

export function parseWriterConfig(text: string, file: string): WriterConfig {
  return parseConfig(
    text,
    file,
    'the writer configuration',
    readTop,
    (f, problems) => new WriterConfigError(f, problems),
  );
}

export async function loadWriterConfig(file: string): Promise<WriterConfig> {
  return parseWriterConfig(await readConfigFile(file, WriterErrorCode.Config), file);
}

function readTop(
  r: YamlReader,
  path: (value: string | undefined) => string | undefined,
): WriterConfig | undefined {
  const root = r.map(r.doc.contents as Node | null, 0, 'the writer configuration');
  if (root === undefined) return undefined;
  const f = r.fields(root, TOP, 'the writer configuration');
  const sub = (field: Field | undefined, what: string): YAMLMap | undefined => fieldMap(r, field, what);

  const wlMap = sub(f.get('workloadApi'), 'workloadApi');
  const workloadApi = wlMap ? readWorkloadApi(r, wlMap, 'workloadApi') : {};
  const admin = readAdminListen(r, sub(f.get('admin'), 'admin'), DEFAULT_WRITER_ADMIN);
  const logLevel = readLogLevel(r, f.get('logLevel'));

  const kubeField = f.get('kubernetes');
  if (kubeField === undefined) {
    r.report(r.offsetOf(root, 0), 'missing required key "kubernetes" (e.g. kubernetes: { inCluster: true })');
  }
  const kubeMap = sub(kubeField, 'kubernetes');
  const kubernetes = kubeMap && readUpstream(r, kubeMap, path, 'kubernetes');

  let resyncMs = DEFAULT_RESYNC_MS;
  const resyncField = f.get('resync');
  if (resyncField) {
    const seconds = r.duration(resyncField.value, resyncField.valueOffset, 'resync', 10);
    if (seconds !== undefined) {
      if (seconds > 24 * 3600) r.report(resyncField.valueOffset, 'resync must be at most 24h');
      else resyncMs = seconds * 1000;
    }
  }

  const secrets: ManagedSecret[] = [];
  const secretsField = f.get('secrets');
  if (secretsField === undefined) {
    r.report(
      r.offsetOf(root, 0),
      'missing required key "secrets" (e.g. secrets: [{ kind: flux, namespace: flux-system, name: spoke-a-kubeconfig, ' +
        'server: https://spoke-a.example.org:8443, trustDomain: spoke-a.example.org }])',
    );
  } else {
    const items = r.list(secretsField.value, secretsField.valueOffset, 'secrets') ?? [];
    if (items.length === 0) r.report(secretsField.valueOffset, 'secrets is empty: name at least one Secret');
    const seen = new Set<string>();
    for (const [index, item] of items.entries()) {
      const secret = readSecret(r, item.node, item.offset, `secrets[${index}]`);
      if (secret === undefined) continue;
      const id = `${secret.namespace}/${secret.name}`;
      if (seen.has(id)) r.report(item.offset, `secrets[${index}]: ${id} is listed twice`);
      seen.add(id);
      secrets.push(secret);
    }
  }
  if (r.problems.length > 0 || kubernetes === undefined) return undefined;
  return { workloadApi, admin, logLevel, kubernetes, resyncMs, secrets };
}

function readSecret(
  r: YamlReader,
  node: Node | null,
  offset: number,
  where: string,
): ManagedSecret | undefined {
  const map = r.map(node, offset, where);
  if (map === undefined) return undefined;
  const s = r.fields(map, SECRET, where);
  const before = r.problems.length;
  const required = (key: (typeof SECRET)[number], example: string): string | undefined => {
    const field = s.get(key);
    if (field === undefined) {
      r.report(offset, `${where} needs "${key}" (e.g. ${key}: ${example})`);
      return undefined;
    }
    return fieldString(r, field, `${where}.${key}`);
  };
  const kind = required('kind', 'flux');
  if (kind !== undefined && kind !== 'argocd' && kind !== 'flux') {
    r.report(s.get('kind')?.valueOffset ?? offset, `${where}.kind "${kind}" is not argocd or flux`);
  }
  const namespace = required('namespace', 'flux-system');
  if (namespace !== undefined && !LABEL.test(namespace)) {
    r.report(
      s.get('namespace')?.valueOffset ?? offset,
      `${where}.namespace "${namespace}" is not a namespace name`,
    );
  }
  const name = required('name', 'spoke-a-kubeconfig');
  if (name !== undefined && (!SUBDOMAIN.test(name) || name.length > 253)) {
    r.report(s.get('name')?.valueOffset ?? offset, `${where}.name "${name}" is not a Secret name`);
  }
  const label = name === undefined ? where : `${where} (${namespace}/${name})`;
  const tdText = required('trustDomain', 'spoke-a.example.org');
  let trustDomain: TrustDomain | undefined;
  if (tdText !== undefined) {
    try {
      trustDomain = TrustDomain.parse(tdText);
    } catch (err) {
      r.report(
        s.get('trustDomain')?.valueOffset ?? offset,
        `${label}.trustDomain: ${(err as Error).message}`,
      );
    }
  }
  const onlyFlux = (key: 'server' | 'serverName' | 'key'): void => {
    const field = s.get(key);
    if (field && kind === 'argocd') {
      r.report(
        field.keyOffset,
        `${label}.${key} goes with kind: flux only (an Argo CD cluster Secret keeps its own server and name)`,
      );
    }
  };
  onlyFlux('server');
  onlyFlux('serverName');
  onlyFlux('key');
  if (kind === 'argocd') {
    if (
      r.problems.length > before ||
      namespace === undefined ||
      name === undefined ||
      trustDomain === undefined
    ) {
      return undefined;
    }
    return { kind, namespace, name, trustDomain };
  }
  const serverText = required('server', 'https://spoke-a.example.org:8443');
  let server: URL | undefined;
  if (serverText !== undefined) {
    try {
      server = new URL(serverText);
      if (server.protocol !== 'https:')
        throw new Error('must be https:// (the spoke proxy speaks mTLS only)');
      if (
        server.pathname !== '/' ||
        server.search !== '' ||
        server.hash !== '' ||
        server.username ||
        server.password
      ) {
        throw new Error('must be an origin (scheme, host and port)');
      }
    } catch (err) {
      r.report(
        s.get('server')?.valueOffset ?? offset,
        `${label}.server "${serverText}": ${(err as Error).message}`,
      );
      server = undefined;
    }
  }
  const serverNameField = s.get('serverName');
  const serverName = fieldString(r, serverNameField, `${label}.serverName`);
  if (serverNameField && serverName === '')
    r.report(serverNameField.valueOffset, `${label}.serverName is empty`);
  const keyField = s.get('key');
  const key = fieldString(r, keyField, `${label}.key`) ?? DEFAULT_FLUX_KEY;
  if (keyField && !DATA_KEY.test(key))
    r.report(keyField.valueOffset, `${label}.key "${key}" is not a Secret data key`);
  if (
    r.problems.length > before ||
    kind !== 'flux' ||
    namespace === undefined ||
    name === undefined ||
    trustDomain === undefined ||
    server === undefined
  ) {
    return undefined;
  }
  return { kind, namespace, name, trustDomain, server, key, ...(serverName ? { serverName } : {}) };
}
