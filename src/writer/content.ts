/**
 * What the writer puts in a managed Secret, as pure functions of the Secret read and the credential: only the
 * keys it owns change, everything else in the Secret (labels, other data keys, other `config` fields) stays.
 */
import { X509Certificate } from 'node:crypto';
import { stringify } from 'yaml';
import type { ManagedSecret } from './config.ts';
import { WriterError, WriterErrorCode } from './errors.ts';

/** The credential one Secret gets: the SVID chain and key, and the spoke trust domain's CA certificates. */
export interface Credential {
  /** PEM, leaf first. */
  readonly chainPem: string;
  /** PKCS#8 PEM. */
  readonly keyPem: string;
  /** PEM: the X.509 authorities of the spoke's trust domain. */
  readonly caPem: string;
  readonly spiffeId: string;
  readonly expires: Date;
}

/** Annotations the writer owns on each Secret: what it wrote, for people and for `kubectl get -o yaml`. */
export const ANNOTATIONS = {
  spiffeId: 'kube-svid-proxy.spiffe.io/spiffe-id',
  expires: 'kube-svid-proxy.spiffe.io/svid-expires',
  written: 'kube-svid-proxy.spiffe.io/written-at',
} as const;

/** The parts of a Secret the writer reads and writes. */
export interface SecretObject {
  apiVersion?: string;
  kind?: string;
  metadata: {
    name?: string;
    namespace?: string;
    resourceVersion?: string;
    annotations?: Record<string, string>;
    managedFields?: unknown;
    [key: string]: unknown;
  };
  data?: Record<string, string>;
  [key: string]: unknown;
}

const b64 = (text: string): string => Buffer.from(text, 'utf8').toString('base64');

function secretError(secret: ManagedSecret, message: string, cause?: unknown): WriterError {
  return new WriterError(
    WriterErrorCode.Secret,
    `Secret ${secret.namespace}/${secret.name}: ${message}`,
    cause === undefined ? undefined : { cause },
  );
}

/**
 * Argo CD: `config` is JSON (v1alpha1.ClusterConfig). The writer sets `tlsClientConfig.certData`, `keyData` and
 * `caData` (base64 of PEM, as Go encodes []byte) and keeps every other field, `serverName` included.
 */
export function argoConfig(
  secret: ManagedSecret,
  current: string | undefined,
  credential: Credential,
): string {
  let config: Record<string, unknown> = {};
  if (current !== undefined && current.trim() !== '') {
    let parsed: unknown;
    try {
      parsed = JSON.parse(current);
    } catch (err) {
      throw secretError(
        secret,
        `data.config is not JSON (${(err as Error).message}); Argo CD could not read it either`,
        err,
      );
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      throw secretError(secret, 'data.config is not a JSON object');
    }
    config = parsed as Record<string, unknown>;
  }
  const tls = config.tlsClientConfig;
  if (tls !== undefined && (typeof tls !== 'object' || tls === null || Array.isArray(tls))) {
    throw secretError(secret, 'data.config.tlsClientConfig is not a JSON object');
  }
  for (const refused of ['bearerToken', 'username', 'password', 'execProviderConfig', 'awsAuthConfig']) {
    if (config[refused] !== undefined) {
      throw secretError(
        secret,
        `data.config.${refused} is set: Argo CD would authenticate with it, not with the SVID; remove it`,
      );
    }
  }
  const next = {
    ...config,
    tlsClientConfig: {
      ...(tls as Record<string, unknown> | undefined),
      insecure: false,
      certData: b64(credential.chainPem),
      keyData: b64(credential.keyPem),
      caData: b64(credential.caPem),
    },
  };
  return JSON.stringify(next);
}

/** Flux: a whole, self-contained kubeconfig (no file paths), under the configured key. */
export function fluxKubeconfig(secret: ManagedSecret & { kind: 'flux' }, credential: Credential): string {
  const name = secret.name;
  return stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [
        {
          name,
          cluster: {
            server: secret.server.origin,
            'certificate-authority-data': b64(credential.caPem),
            ...(secret.serverName ? { 'tls-server-name': secret.serverName } : {}),
          },
        },
      ],
      users: [
        {
          name,
          user: {
            'client-certificate-data': b64(credential.chainPem),
            'client-key-data': b64(credential.keyPem),
          },
        },
      ],
      contexts: [{ name, context: { cluster: name, user: name } }],
      'current-context': name,
    },
    { lineWidth: 0 },
  );
}

/** The data value (base64) the writer owns, for this credential. */
export function ownedValue(
  secret: ManagedSecret,
  object: SecretObject,
  credential: Credential,
): { key: string; value: string } {
  if (secret.kind === 'flux') return { key: secret.key, value: b64(fluxKubeconfig(secret, credential)) };
  const current = object.data?.config;
  const decoded = current === undefined ? undefined : Buffer.from(current, 'base64').toString('utf8');
  return { key: 'config', value: b64(argoConfig(secret, decoded, credential)) };
}

/**
 * The leaf certificate the Secret holds now (what a reader of it presents), or undefined when it holds none the
 * writer can read: tells whether the Secret is up to date without comparing key bytes.
 */
export function writtenLeaf(secret: ManagedSecret, object: SecretObject): X509Certificate | undefined {
  try {
    if (secret.kind === 'flux') {
      const text = Buffer.from(object.data?.[secret.key] ?? '', 'base64').toString('utf8');
      const m = /client-certificate-data:\s*(\S+)/.exec(text);
      return m?.[1] ? new X509Certificate(Buffer.from(m[1], 'base64')) : undefined;
    }
    const config = JSON.parse(Buffer.from(object.data?.config ?? '', 'base64').toString('utf8')) as {
      tlsClientConfig?: { certData?: string };
    };
    const cert = config.tlsClientConfig?.certData;
    return cert ? new X509Certificate(Buffer.from(cert, 'base64')) : undefined;
  } catch {
    return undefined;
  }
}
