import { isScalar, type Node, type Scalar, type YAMLMap } from 'yaml';
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
  readTrustDomain,
  readTrustDomainFiles,
  readWorkloadApi,
} from '../config/common.ts';
import { availableCpus } from '../config/cpus.ts';
import type { YamlReader } from '../config/yaml.ts';
import type { LogLevel } from '../observability/logger.ts';
import type { TrustDomain } from '../spiffe/id.ts';
import {
  AUDIT_OVERFLOWS,
  type AuditBufferOptions,
  type AuditOverflow,
  DEFAULT_AUDIT_BUFFER,
} from './audit.ts';
import { ProxyConfigError, ProxyErrorCode } from './errors.ts';
import { DEFAULT_LIMITS, DEFAULT_TIMEOUTS, type ProxyLimits, type ProxyTimeouts } from './limits.ts';

export interface ProxyConfig {
  readonly trustDomain: TrustDomain;
  readonly listen: HostPort;
  readonly admin: HostPort;
  readonly policyFile: string;
  readonly identity:
    | { readonly kind: 'workloadApi'; readonly socket?: string; readonly hint?: string }
    | {
        readonly kind: 'files';
        readonly certFile: string;
        readonly keyFile: string;
        readonly bundles: ReadonlyMap<string, string>;
      };
  readonly upstream: UpstreamConfig;
  /** The proxy reports not-ready when its SVID has less than this left (seconds). */
  readonly minSvidRemainingSeconds: number;
  readonly logLevel: LogLevel;
  /**
   * `workers`: processes serving the data port (`auto`, the default: one per CPU the process may use, capped by
   * the cgroup's CPU quota, see availableCpus). 1 serves
   * in the main process; more fork that many workers that share the listener, while the main process keeps the
   * identity, the policy, the upstream credential, the audit log and the admin port, and hands them over.
   */
  readonly workers: number;
  /** What clients can hold (`limits`); every key has a default. */
  readonly limits: ProxyLimits;
  /** `timeouts`; every key has a default. */
  readonly timeouts: ProxyTimeouts;
  /**
   * `audit.file`: where the audit Events go, a path or "-" for stdout (the default); `audit.bufferBytes` and
   * `audit.overflow`: how much may wait for a slow destination, and what happens beyond that.
   */
  readonly audit: { readonly file: string } & AuditBufferOptions;
}

/**
 * Where kube-apiserver is and the proxy's own credential for it: explicit files (`url` and co), the pod's
 * service account (`inCluster: true`), or a kubeconfig file. Read by `loadUpstreamCredential`.
 */
export type UpstreamConfig =
  | {
      readonly kind?: 'explicit';
      readonly url: URL;
      readonly caFile?: string;
      readonly tokenFile?: string;
      readonly clientCertFile?: string;
      readonly clientKeyFile?: string;
    }
  | { readonly kind: 'inCluster' }
  | { readonly kind: 'kubeconfig'; readonly file: string; readonly context?: string };

export const DEFAULT_LISTEN: HostPort = { host: '0.0.0.0', port: 8443 };
export const DEFAULT_ADMIN: HostPort = { host: '127.0.0.1', port: 9443 };
export const DEFAULT_MIN_SVID_REMAINING_SECONDS = 300;

export { type HostPort, ProxyConfigError, parseHostPort };

const TOP = [
  'trustDomain',
  'listen',
  'admin',
  'policyFile',
  'identity',
  'upstream',
  'readiness',
  'logLevel',
  'workers',
  'limits',
  'timeouts',
  'audit',
] as const;
/** `limits.<key>`: a positive whole number, with its largest sensible value. */
const LIMITS: Readonly<Record<keyof ProxyLimits, number>> = {
  maxConnections: 1_000_000,
  maxStreamsPerConnection: 10_000,
  maxRequestsPerIdentity: 1_000_000,
  maxLongRunningPerIdentity: 1_000_000,
  maxUpstreamSessions: 1_000,
  maxLongRunningUpstreamSessions: 1_000,
};
/** `timeouts.<key>` → the field it sets, in milliseconds, and its minimum in seconds. */
const TIMEOUTS: Readonly<Record<string, { field: keyof ProxyTimeouts; minSeconds: number }>> = {
  handshake: { field: 'handshakeMs', minSeconds: 1 },
  idle: { field: 'idleMs', minSeconds: 1 },
  responseHeaders: { field: 'responseHeadersMs', minSeconds: 1 },
  longRunningResponseHeaders: { field: 'longRunningResponseHeadersMs', minSeconds: 1 },
  shutdownDrain: { field: 'shutdownDrainMs', minSeconds: 0 },
  unauthenticated: { field: 'unauthenticatedMs', minSeconds: 1 },
};
const IDENTITY = ['workloadApi', 'files'] as const;
const FILES = ['certFile', 'keyFile', 'bundles'] as const;
const UPSTREAM = [
  'url',
  'caFile',
  'tokenFile',
  'clientCertFile',
  'clientKeyFile',
  'inCluster',
  'kubeconfig',
  'context',
] as const;
const UPSTREAM_EXPLICIT = ['caFile', 'tokenFile', 'clientCertFile', 'clientKeyFile'] as const;
const READINESS = ['minSvidRemaining'] as const;
const AUDIT = ['file', 'bufferBytes', 'overflow'] as const;
/** Most `workers`: beyond the cores of any machine this runs on, each worker is only memory and handshakes. */
const MAX_WORKERS = 64;
/** `audit.bufferBytes`: at least one large Event, at most 1 GiB. */
const MIN_AUDIT_BUFFER = 64 * 1024;
const MAX_AUDIT_BUFFER = 1024 * 1024 * 1024;
/** `audit.file` when absent: stdout, apart from the operational log on stderr. */
export const DEFAULT_AUDIT_FILE = '-';

export function parseProxyConfig(text: string, file: string): ProxyConfig {
  return parseConfig(
    text,
    file,
    'the proxy configuration',
    readTop,
    (f, problems) => new ProxyConfigError(f, problems),
  );
}

export async function loadProxyConfig(file: string): Promise<ProxyConfig> {
  return parseProxyConfig(await readConfigFile(file, ProxyErrorCode.Config), file);
}

function readTop(
  r: YamlReader,
  path: (value: string | undefined) => string | undefined,
): ProxyConfig | undefined {
  const root = r.map(r.doc.contents as Node | null, 0, 'the proxy configuration');
  if (root === undefined) return undefined;
  const f = r.fields(root, TOP, 'the proxy configuration');
  const str = (field: Field | undefined, what: string): string | undefined => fieldString(r, field, what);
  const sub = (field: Field | undefined, what: string): YAMLMap | undefined => fieldMap(r, field, what);
  const required = (field: Field | undefined, key: string, example: string): void => {
    if (field === undefined) r.report(r.offsetOf(root, 0), `missing required key "${key}" (e.g. ${example})`);
  };
  const hostPort = (field: Field | undefined, what: string, fallback: HostPort): HostPort => {
    const text = str(field, what);
    if (field === undefined || text === undefined) return fallback;
    const parsed = parseHostPort(text);
    if (typeof parsed === 'string') {
      r.report(field.valueOffset, `${what}: ${parsed}`);
      return fallback;
    }
    return parsed;
  };

  const trustDomain = readTrustDomain(r, root, f.get('trustDomain'));

  const listen = hostPort(f.get('listen'), 'listen', DEFAULT_LISTEN);
  const admin = readAdminListen(r, sub(f.get('admin'), 'admin'), DEFAULT_ADMIN);
  if (listen.port !== 0 && listen.port === admin.port) {
    r.report(
      r.offsetOf(root, 0),
      `listen and admin.listen use the same port ${listen.port}; the admin port is separate`,
    );
  }

  const policyField = f.get('policyFile');
  required(policyField, 'policyFile', 'policyFile: policy.yaml');
  const policyFile = path(str(policyField, 'policyFile'));

  let identity: ProxyConfig['identity'] = { kind: 'workloadApi' };
  const idField = f.get('identity');
  const idMap = sub(idField, 'identity');
  if (idField && idMap) {
    const i = r.fields(idMap, IDENTITY, 'identity');
    const wl = i.get('workloadApi');
    const files = i.get('files');
    if (wl && files) r.report(idField.keyOffset, 'identity takes workloadApi or files, not both');
    const wlMap = sub(wl, 'identity.workloadApi');
    if (wlMap) {
      identity = { kind: 'workloadApi', ...readWorkloadApi(r, wlMap, 'identity.workloadApi') };
    }
    const filesMap = sub(files, 'identity.files');
    if (files && filesMap) {
      const g = r.fields(filesMap, FILES, 'identity.files');
      const certFile = path(str(g.get('certFile'), 'identity.files.certFile'));
      const keyFile = path(str(g.get('keyFile'), 'identity.files.keyFile'));
      const bundlesMap = sub(g.get('bundles'), 'identity.files.bundles');
      const bundles = bundlesMap
        ? readTrustDomainFiles(r, bundlesMap, 'identity.files.bundles', path)
        : new Map<string, string>();
      if (certFile === undefined || keyFile === undefined) {
        r.report(files.keyOffset, 'identity.files needs certFile and keyFile');
      } else if (bundles.size === 0) {
        r.report(files.keyOffset, 'identity.files needs bundles: at least our own trust domain');
      } else {
        identity = { kind: 'files', certFile, keyFile, bundles };
      }
      if (trustDomain && bundles.size > 0 && !bundles.has(trustDomain.name)) {
        r.report(
          files.keyOffset,
          `identity.files.bundles has no bundle for our own trust domain ${trustDomain.name}`,
        );
      }
    }
  }

  const upField = f.get('upstream');
  required(upField, 'upstream', 'upstream: { url: https://127.0.0.1:6443 }');
  const upMap = sub(upField, 'upstream');
  const upstream = upMap && readUpstream(r, upMap, path);

  let minSvidRemainingSeconds = DEFAULT_MIN_SVID_REMAINING_SECONDS;
  const readyMap = sub(f.get('readiness'), 'readiness');
  if (readyMap) {
    const m = r.fields(readyMap, READINESS, 'readiness').get('minSvidRemaining');
    const seconds = m && r.duration(m.value, m.valueOffset, 'readiness.minSvidRemaining');
    if (seconds !== undefined) minSvidRemainingSeconds = seconds;
  }

  const logLevel = readLogLevel(r, f.get('logLevel'));

  let workers = availableCpus();
  const workersField = f.get('workers');
  if (workersField) {
    const node = workersField.value;
    const text = isScalar(node) ? (node as Scalar).value : undefined;
    if (text !== 'auto') {
      const n = r.number(
        node,
        workersField.valueOffset,
        'workers (a number of processes, or auto)',
        1,
        MAX_WORKERS,
      );
      if (n !== undefined && !Number.isInteger(n))
        r.report(workersField.valueOffset, 'workers must be a whole number of processes, or auto');
      else if (n !== undefined) workers = n;
    }
  }

  const limits = readLimits(r, sub(f.get('limits'), 'limits'), LIMITS, DEFAULT_LIMITS);
  const timeouts = readTimeouts(r, sub(f.get('timeouts'), 'timeouts'), TIMEOUTS, DEFAULT_TIMEOUTS);

  let auditFile = DEFAULT_AUDIT_FILE;
  let { bufferBytes, overflow } = DEFAULT_AUDIT_BUFFER;
  const auditMap = sub(f.get('audit'), 'audit');
  if (auditMap) {
    const a = r.fields(auditMap, AUDIT, 'audit');
    const field = a.get('file');
    const text = str(field, 'audit.file');
    if (field && text === '') r.report(field.valueOffset, 'audit.file is empty (a path, or "-" for stdout)');
    else if (text !== undefined) auditFile = text === '-' ? '-' : (path(text) ?? auditFile);
    const size = a.get('bufferBytes');
    if (size) {
      const value = r.number(
        size.value,
        size.valueOffset,
        'audit.bufferBytes',
        MIN_AUDIT_BUFFER,
        MAX_AUDIT_BUFFER,
      );
      if (value !== undefined && !Number.isInteger(value))
        r.report(size.valueOffset, 'audit.bufferBytes must be a whole number of bytes');
      else if (value !== undefined) bufferBytes = value;
    }
    const mode = a.get('overflow');
    const modeText = str(mode, 'audit.overflow');
    if (mode && modeText !== undefined) {
      if ((AUDIT_OVERFLOWS as readonly string[]).includes(modeText)) overflow = modeText as AuditOverflow;
      else
        r.report(
          mode.valueOffset,
          `audit.overflow must be one of ${AUDIT_OVERFLOWS.join(', ')} (got ${JSON.stringify(modeText)})`,
        );
    }
  }

  if (trustDomain === undefined || policyFile === undefined || upstream === undefined) return undefined;
  return {
    trustDomain,
    listen,
    admin,
    policyFile,
    identity,
    upstream,
    minSvidRemainingSeconds,
    logLevel,
    workers,
    limits,
    timeouts,
    audit: { file: auditFile, bufferBytes, overflow },
  };
}

/** `upstream`: exactly one of `url` (with its files), `inCluster: true`, or `kubeconfig` (with `context`). */
export function readUpstream(
  r: YamlReader,
  upMap: YAMLMap,
  path: (value: string | undefined) => string | undefined,
  k = 'upstream',
): UpstreamConfig | undefined {
  const u = r.fields(upMap, UPSTREAM, k);
  const str = (field: Field | undefined, what: string): string | undefined => fieldString(r, field, what);
  const urlField = u.get('url');
  const inClusterField = u.get('inCluster');
  const kubeconfigField = u.get('kubeconfig');
  const contextField = u.get('context');
  const inCluster =
    inClusterField && r.boolean(inClusterField.value, inClusterField.valueOffset, `${k}.inCluster`);

  const modes: { key: 'url' | 'inCluster' | 'kubeconfig'; field: Field }[] = [];
  if (urlField) modes.push({ key: 'url', field: urlField });
  if (inClusterField && inCluster === true) modes.push({ key: 'inCluster', field: inClusterField });
  if (kubeconfigField) modes.push({ key: 'kubeconfig', field: kubeconfigField });
  const [first, ...others] = modes;
  if (first === undefined) {
    // A non-boolean inCluster was reported already.
    if (inClusterField === undefined || inCluster === false) {
      r.report(
        r.offsetOf(upMap, 0),
        `${k} needs url, inCluster: true or kubeconfig (e.g. ${k}: { url: https://127.0.0.1:6443 })`,
      );
    }
    return undefined;
  }
  for (const other of others) {
    r.report(
      other.field.keyOffset,
      `${k}.${other.key} conflicts with ${k}.${first.key}: ` +
        `${k} takes one of url, inCluster: true or kubeconfig`,
    );
  }
  if (others.length > 0) return undefined;

  if (first.key !== 'url') {
    const source = first.key === 'inCluster' ? 'the service account' : 'the kubeconfig';
    for (const key of UPSTREAM_EXPLICIT) {
      const field = u.get(key);
      if (field) {
        r.report(
          field.keyOffset,
          `${k}.${key} goes with ${k}.url only; ` +
            `with ${k}.${first.key}, ${source} gives the CA and the credential`,
        );
      }
    }
  }
  if (contextField && first.key !== 'kubeconfig') {
    r.report(contextField.keyOffset, `${k}.context goes with ${k}.kubeconfig only`);
  }

  if (first.key === 'inCluster') return { kind: 'inCluster' };
  if (first.key === 'kubeconfig') {
    const file = path(str(first.field, `${k}.kubeconfig`));
    const context = str(contextField, `${k}.context`);
    if (contextField && context === '') r.report(contextField.valueOffset, `${k}.context is empty`);
    if (file === undefined) return undefined;
    return { kind: 'kubeconfig', file, ...(context ? { context } : {}) };
  }

  const urlText = str(first.field, `${k}.url`);
  let url: URL | undefined;
  if (urlText !== undefined) {
    try {
      url = new URL(urlText);
      if (url.protocol !== 'https:') {
        throw new Error(
          'must be https://: the proxy sends its credential and the impersonation headers, never in clear',
        );
      }
      if (url.username || url.password) throw new Error('must not carry credentials');
      if (url.pathname !== '/' || url.search !== '' || url.hash !== '') {
        throw new Error('must be an origin (scheme, host and port; no path, query or fragment)');
      }
    } catch (err) {
      r.report(first.field.valueOffset, `${k}.url "${urlText}": ${(err as Error).message}`);
      url = undefined;
    }
  }
  const caFile = path(str(u.get('caFile'), `${k}.caFile`));
  const tokenFile = path(str(u.get('tokenFile'), `${k}.tokenFile`));
  const clientCertFile = path(str(u.get('clientCertFile'), `${k}.clientCertFile`));
  const clientKeyFile = path(str(u.get('clientKeyFile'), `${k}.clientKeyFile`));
  if ((clientCertFile === undefined) !== (clientKeyFile === undefined)) {
    r.report(r.offsetOf(upMap, 0), `${k} needs clientCertFile and clientKeyFile together`);
  }
  if (url === undefined) return undefined;
  return {
    kind: 'explicit',
    url,
    ...(caFile ? { caFile } : {}),
    ...(tokenFile ? { tokenFile } : {}),
    ...(clientCertFile ? { clientCertFile } : {}),
    ...(clientKeyFile ? { clientKeyFile } : {}),
  };
}
