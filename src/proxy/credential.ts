/**
 * The proxy's own credential for kube-apiserver, from one of three sources: explicit files (`upstream.url`
 * and co), the pod's service account (`upstream.inCluster: true`, as client-go's rest.InClusterConfig), or a
 * kubeconfig file (`upstream.kubeconfig`, as client-go reads one, minus what a long-running proxy must not
 * do).
 * A token file is followed and re-read when it changes (a projected service-account token rotates hourly); a
 * broken rewrite keeps the last good token. Every refusal is an ERR_PROXY_CONFIG naming the file and the key.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { type WatchedFile, watchFile } from '../config/watch.ts';
import type { Logger } from '../observability/logger.ts';
import type { UpstreamConfig } from './config.ts';
import { ProxyError, ProxyErrorCode } from './errors.ts';

/** What `Upstream` needs: where kube-apiserver is, how to trust it, and the proxy's credential. */
export interface UpstreamCredential {
  readonly url: URL;
  /** CA bundle (PEM) of the apiserver's serving certificate; the system CAs when absent. */
  readonly ca?: string;
  readonly clientCert?: string;
  readonly clientKey?: string;
  /** The Authorization header value (`Bearer …`), the current token when it comes from a file. */
  authorization(): string | undefined;
  /** Stops following a token file. Idempotent. */
  close(): void;
}

/** Where the credential comes from: `upstream` of proxy.yaml. */
export type UpstreamSpec = UpstreamConfig;

export const SERVICE_ACCOUNT_DIR = '/var/run/secrets/kubernetes.io/serviceaccount';

export interface LoadUpstreamOptions {
  /** Told when a token file rotates or a rewrite is refused. */
  readonly logger?: Logger;
  /** Re-read poll of a token file (default 5 s). */
  readonly pollIntervalMs?: number;
  /** `inCluster`: the directory holding `token` and `ca.crt` (default the service account mount). */
  readonly serviceAccountDir?: string;
  /** `inCluster`: where KUBERNETES_SERVICE_HOST and _PORT are read (default process.env). */
  readonly env?: NodeJS.ProcessEnv;
  /** The configuration key errors name (default `upstream`; the writer's is `kubernetes`). */
  readonly key?: string;
}

function fail(message: string, cause?: unknown): ProxyError {
  return new ProxyError(ProxyErrorCode.Config, message, cause === undefined ? undefined : { cause });
}

/** Reads a file named by `key`, saying which key named it when it cannot be read. */
async function readNamed(key: string, file: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    throw fail(`${key} ${file}: ${(err as Error).message}`, err);
  }
}

function checkCa(key: string, pem: string): string {
  if (!pem.includes('-----BEGIN CERTIFICATE-----')) throw fail(`${key}: no PEM CERTIFICATE block`);
  try {
    new X509Certificate(pem);
  } catch (err) {
    throw fail(`${key}: not a certificate: ${(err as Error).message}`, err);
  }
  return pem;
}

/** Checks that the client certificate parses and that the key is its own (else every request would fail). */
function checkClientPair(certKey: string, cert: string, keyKey: string, key: string): void {
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(cert);
  } catch (err) {
    throw fail(`${certKey}: not a certificate: ${(err as Error).message}`, err);
  }
  let privateKey: ReturnType<typeof createPrivateKey>;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    // OpenSSL's messages never include key bytes.
    throw fail(`${keyKey}: not a private key: ${(err as Error).message}`, err);
  }
  if (!certificate.checkPrivateKey(privateKey)) {
    throw fail(`${keyKey} does not belong to the certificate of ${certKey}`);
  }
}

/** Follows a token file: refused at start if unreadable or empty; later, bad edits keep the last token. */
async function followToken(
  key: string,
  file: string,
  options: LoadUpstreamOptions,
): Promise<WatchedFile<string>> {
  const k = options.key ?? 'upstream';
  await readNamed(key, file);
  const log = options.logger;
  try {
    return await watchFile(file, {
      parse: (text) => {
        const token = text.trim();
        if (token === '') throw new Error(`${file} is empty`);
        if (/[\r\n]/.test(token)) throw new Error(`${file} holds more than one line`);
        return token;
      },
      pollIntervalMs: options.pollIntervalMs ?? 5000,
      onChange: () => log?.info({ file }, `${k} token rotated`),
      onError: (err) =>
        log?.error({ file, err: { message: err.message } }, `${k} token file rejected; keeping the last`),
    });
  } catch (err) {
    throw fail(`${key} ${file}: ${(err as Error).message}`, err);
  }
}

function credential(
  url: URL,
  tls: { ca?: string; clientCert?: string; clientKey?: string },
  token: { file?: WatchedFile<string>; value?: string },
): UpstreamCredential {
  const { file, value } = token;
  return {
    url,
    ...(tls.ca === undefined ? {} : { ca: tls.ca }),
    ...(tls.clientCert === undefined ? {} : { clientCert: tls.clientCert }),
    ...(tls.clientKey === undefined ? {} : { clientKey: tls.clientKey }),
    authorization: () => {
      const current = file ? file.current : value;
      return current ? `Bearer ${current}` : undefined;
    },
    close: () => file?.close(),
  };
}

/**
 * Loads the proxy's upstream credential. Refuses (ERR_PROXY_CONFIG) anything unreadable, invalid or
 * unsupported, naming the file and the key; the caller must `close()` the result.
 */
export async function loadUpstreamCredential(
  spec: UpstreamSpec,
  options: LoadUpstreamOptions = {},
): Promise<UpstreamCredential> {
  const k = options.key ?? 'upstream';
  if (spec.kind === 'inCluster') return inCluster(options);
  if (spec.kind === 'kubeconfig') return fromKubeconfig(spec.file, spec.context, options);
  const ca =
    spec.caFile && checkCa(`${k}.caFile ${spec.caFile}`, await readNamed(`${k}.caFile`, spec.caFile));
  let clientCert: string | undefined;
  let clientKey: string | undefined;
  if (spec.clientCertFile !== undefined || spec.clientKeyFile !== undefined) {
    if (spec.clientCertFile === undefined || spec.clientKeyFile === undefined) {
      throw fail(`${k} needs clientCertFile and clientKeyFile together`);
    }
    clientCert = await readNamed(`${k}.clientCertFile`, spec.clientCertFile);
    clientKey = await readNamed(`${k}.clientKeyFile`, spec.clientKeyFile);
    checkClientPair(
      `${k}.clientCertFile ${spec.clientCertFile}`,
      clientCert,
      `${k}.clientKeyFile ${spec.clientKeyFile}`,
      clientKey,
    );
  }
  const file = spec.tokenFile ? await followToken(`${k}.tokenFile`, spec.tokenFile, options) : undefined;
  return credential(
    spec.url,
    {
      ...(ca ? { ca } : {}),
      ...(clientCert === undefined ? {} : { clientCert }),
      ...(clientKey === undefined ? {} : { clientKey }),
    },
    file ? { file } : {},
  );
}

/** The pod's service account, as client-go's rest.InClusterConfig finds it. */
async function inCluster(options: LoadUpstreamOptions): Promise<UpstreamCredential> {
  const k = options.key ?? 'upstream';
  const env = options.env ?? process.env;
  const host = env.KUBERNETES_SERVICE_HOST;
  const port = env.KUBERNETES_SERVICE_PORT;
  if (!host || !port) {
    throw fail(
      `${k}.inCluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set; ` +
        `is the proxy running in a pod? (use ${k}.url or ${k}.kubeconfig outside a cluster)`,
    );
  }
  let url: URL;
  try {
    url = new URL(`https://${host.includes(':') ? `[${host}]` : host}:${port}`);
  } catch (err) {
    throw fail(
      `${k}.inCluster: KUBERNETES_SERVICE_HOST=${JSON.stringify(host)} and ` +
        `KUBERNETES_SERVICE_PORT=${JSON.stringify(port)} do not make a URL: ${(err as Error).message}`,
      err,
    );
  }
  const dir = options.serviceAccountDir ?? SERVICE_ACCOUNT_DIR;
  const caFile = join(dir, 'ca.crt');
  const ca = checkCa(`${k}.inCluster: ${caFile}`, await readNamed(`${k}.inCluster: CA`, caFile));
  const file = await followToken(`${k}.inCluster: token`, join(dir, 'token'), options);
  return credential(url, { ca }, { file });
}

type Json = Record<string, unknown>;

const isObject = (value: unknown): value is Json =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

/** Keys this proxy honours; the others client-go knows are refused rather than silently ignored. */
const CLUSTER_KEYS = new Set([
  'server',
  'certificate-authority',
  'certificate-authority-data',
  'disable-compression',
  'extensions',
]);
const USER_KEYS = new Set([
  'token',
  'tokenFile',
  'client-certificate',
  'client-key',
  'client-certificate-data',
  'client-key-data',
  'extensions',
]);
const USER_REFUSED: Record<string, string> = {
  exec: 'exec credential plugins are not supported; use a token, a token file or a client certificate',
  'auth-provider':
    'auth-provider plugins are not supported; use a token, a token file or a client certificate',
  username: 'basic authentication (username/password) is not supported',
  password: 'basic authentication (username/password) is not supported',
  as: 'impersonation in the kubeconfig is not supported: the proxy impersonates the SPIFFE identities itself',
  'as-uid':
    'impersonation in the kubeconfig is not supported: the proxy impersonates the SPIFFE identities itself',
  'as-groups':
    'impersonation in the kubeconfig is not supported: the proxy impersonates the SPIFFE identities itself',
  'as-user-extra':
    'impersonation in the kubeconfig is not supported: the proxy impersonates the SPIFFE identities itself',
};
const CLUSTER_REFUSED: Record<string, string> = {
  'insecure-skip-tls-verify':
    'insecure-skip-tls-verify is refused: the proxy sends its credential only to a verified ' +
    'kube-apiserver; ' +
    'give certificate-authority or certificate-authority-data',
  'tls-server-name': 'tls-server-name is not supported; the server URL must name the certificate',
  'proxy-url': 'proxy-url is not supported; the proxy connects to kube-apiserver directly',
};

/** Finds `name` in a kubeconfig list (clusters, users, contexts) and returns its inner object. */
function named(k: string, file: string, doc: Json, list: string, inner: string, name: string): Json {
  const raw = doc[list];
  if (raw !== undefined && raw !== null && !Array.isArray(raw)) {
    throw fail(`${k}.kubeconfig ${file}: ${list} must be a list`);
  }
  const items: readonly unknown[] = Array.isArray(raw) ? raw : [];
  const found = items.find((item): item is Json => isObject(item) && item.name === name);
  if (found === undefined) {
    const names = items.flatMap((item) =>
      isObject(item) && typeof item.name === 'string' ? [item.name] : [],
    );
    throw fail(
      `${k}.kubeconfig ${file}: no ${inner} named ${JSON.stringify(name)} in ${list}` +
        ` (${names.length === 0 ? 'none defined' : `defined: ${names.join(', ')}`})`,
    );
  }
  const value = found[inner] ?? {};
  if (!isObject(value)) {
    throw fail(`${k}.kubeconfig ${file}: ${list}[${JSON.stringify(name)}].${inner} must be a map`);
  }
  return value;
}

/** A kubeconfig, read as client-go reads one: the named (or current) context, its cluster and its user. */
async function fromKubeconfig(
  file: string,
  contextName: string | undefined,
  options: LoadUpstreamOptions,
): Promise<UpstreamCredential> {
  const k = options.key ?? 'upstream';
  const text = await readNamed(`${k}.kubeconfig`, file);
  let doc: unknown;
  try {
    doc = parseYaml(text, { prettyErrors: false });
  } catch (err) {
    throw fail(`${k}.kubeconfig ${file}: not YAML: ${(err as Error).message.split('\n')[0]}`, err);
  }
  if (!isObject(doc)) throw fail(`${k}.kubeconfig ${file}: not a kubeconfig (expected a map)`);
  const where = (key: string): string => `${k}.kubeconfig ${file}: ${key}`;
  const base = dirname(resolve(file));
  const relative = (path: string): string => (isAbsolute(path) ? path : resolve(base, path));

  let name = contextName;
  if (name === undefined) {
    const current = doc['current-context'];
    if (typeof current !== 'string' || current === '') {
      throw fail(`${where('current-context')} is not set; set it or give upstream.context`);
    }
    name = current;
  }
  const context = named(k, file, doc, 'contexts', 'context', name);
  const clusterName = context.cluster;
  const userName = context.user;
  const ctxKey = `contexts[${JSON.stringify(name)}].context`;
  if (typeof clusterName !== 'string' || clusterName === '')
    throw fail(`${where(`${ctxKey}.cluster`)} is not set`);
  const cluster = named(k, file, doc, 'clusters', 'cluster', clusterName);
  const user =
    typeof userName === 'string' && userName !== '' ? named(k, file, doc, 'users', 'user', userName) : {};
  const clusterKey = `clusters[${JSON.stringify(clusterName)}].cluster`;
  const userKey = `users[${JSON.stringify(userName)}].user`;

  for (const key of Object.keys(cluster)) {
    const refused = CLUSTER_REFUSED[key];
    if (refused !== undefined && cluster[key] !== false && cluster[key] !== null && cluster[key] !== '') {
      throw fail(`${where(`${clusterKey}.${key}`)}: ${refused}`);
    }
    if (refused === undefined && !CLUSTER_KEYS.has(key))
      throw fail(
        `${where(`${clusterKey}.${key}`)}: unknown key (supported: ${[...CLUSTER_KEYS].join(', ')})`,
      );
  }
  for (const key of Object.keys(user)) {
    const refused = USER_REFUSED[key];
    if (refused !== undefined && user[key] !== null && user[key] !== '') {
      throw fail(`${where(`${userKey}.${key}`)}: ${refused}`);
    }
    if (refused === undefined && !USER_KEYS.has(key))
      throw fail(`${where(`${userKey}.${key}`)}: unknown key (supported: ${[...USER_KEYS].join(', ')})`);
  }

  const string = (obj: Json, objKey: string, key: string): string | undefined => {
    const value = obj[key];
    if (value === undefined || value === null || value === '') return undefined;
    if (typeof value !== 'string') throw fail(`${where(`${objKey}.${key}`)} must be a string`);
    return value;
  };
  const base64 = (objKey: string, key: string, value: string): string => {
    const compact = value.replace(/\s+/g, '');
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(compact) || compact.length % 4 !== 0) {
      throw fail(`${where(`${objKey}.${key}`)} is not base64`);
    }
    const decoded = Buffer.from(compact, 'base64').toString('utf8');
    if (!decoded.includes('-----BEGIN ')) throw fail(`${where(`${objKey}.${key}`)} is not base64 of PEM`);
    return decoded;
  };
  /** A PEM from `key` (a file, relative to the kubeconfig) or `key-data` (base64), never both. */
  const pem = async (
    obj: Json,
    objKey: string,
    key: string,
  ): Promise<{ pem: string; at: string } | undefined> => {
    const path = string(obj, objKey, key);
    const data = string(obj, objKey, `${key}-data`);
    if (path !== undefined && data !== undefined) {
      throw fail(`${where(objKey)}: ${key} and ${key}-data are both set; give one`);
    }
    if (data !== undefined)
      return { pem: base64(objKey, `${key}-data`, data), at: where(`${objKey}.${key}-data`) };
    if (path === undefined) return undefined;
    const full = relative(path);
    return {
      pem: await readNamed(where(`${objKey}.${key}`), full),
      at: `${where(`${objKey}.${key}`)} ${full}`,
    };
  };

  const server = string(cluster, clusterKey, 'server');
  if (server === undefined) throw fail(`${where(`${clusterKey}.server`)} is not set`);
  let url: URL;
  try {
    url = new URL(server);
  } catch (err) {
    throw fail(`${where(`${clusterKey}.server`)} ${JSON.stringify(server)} is not a URL`, err);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw fail(`${where(`${clusterKey}.server`)} ${JSON.stringify(server)} must be https://`);
  }
  if (url.username || url.password) throw fail(`${where(`${clusterKey}.server`)} must not carry credentials`);
  if (url.pathname !== '/' || url.search !== '') {
    throw fail(
      `${where(`${clusterKey}.server`)} ${JSON.stringify(server)} has a path; ` +
        'a kube-apiserver behind a path prefix is not supported',
    );
  }

  const caPem = await pem(cluster, clusterKey, 'certificate-authority');
  const ca = caPem && checkCa(caPem.at, caPem.pem);
  const cert = await pem(user, userKey, 'client-certificate');
  const key = await pem(user, userKey, 'client-key');
  if ((cert === undefined) !== (key === undefined)) {
    throw fail(`${where(userKey)}: client-certificate and client-key go together; one is missing`);
  }
  if (cert && key) checkClientPair(cert.at, cert.pem, key.at, key.pem);

  // As client-go: a token file, when given, is the token source (re-read); else the inline token.
  const tokenFile = string(user, userKey, 'tokenFile');
  const token = string(user, userKey, 'token');
  const watched = tokenFile
    ? await followToken(where(`${userKey}.tokenFile`), relative(tokenFile), options)
    : undefined;
  return credential(
    url,
    {
      ...(ca ? { ca } : {}),
      ...(cert && key ? { clientCert: cert.pem, clientKey: key.pem } : {}),
    },
    watched ? { file: watched } : token ? { value: token.trim() } : {},
  );
}
