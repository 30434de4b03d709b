/**
 * The few calls the writer makes to kube-apiserver: read a Secret, replace it (optimistic concurrency on its
 * resourceVersion). No watch, no cache: a handful of Secrets, written at each rotation.
 */
import https from 'node:https';
import type { UpstreamCredential } from '../proxy/credential.ts';
import type { SecretObject } from './content.ts';
import { WriterError, WriterErrorCode } from './errors.ts';

export const FIELD_MANAGER = 'kube-svid-proxy-writer';
const TIMEOUT_MS = 30_000;
const MAX_BODY = 4 * 1024 * 1024;

export class KubeStatusError extends WriterError {
  readonly status: number;

  constructor(status: number, message: string) {
    super(WriterErrorCode.Kubernetes, message);
    this.name = 'KubeStatusError';
    this.status = status;
  }
}

export class SecretsApi {
  readonly #credential: UpstreamCredential;
  readonly #agent: https.Agent;

  constructor(credential: UpstreamCredential) {
    this.#credential = credential;
    this.#agent = new https.Agent({
      keepAlive: true,
      maxSockets: 4,
      ...(credential.ca ? { ca: credential.ca } : {}),
      ...(credential.clientCert ? { cert: credential.clientCert, key: credential.clientKey } : {}),
    });
  }

  get(namespace: string, name: string): Promise<SecretObject> {
    return this.#call('GET', namespace, name);
  }

  /** Replaces the Secret; 409 (someone wrote it meanwhile) surfaces as a KubeStatusError with status 409. */
  put(namespace: string, name: string, object: SecretObject): Promise<SecretObject> {
    return this.#call('PUT', namespace, name, object);
  }

  close(): void {
    this.#agent.destroy();
    this.#credential.close();
  }

  #call(method: 'GET' | 'PUT', namespace: string, name: string, body?: SecretObject): Promise<SecretObject> {
    const url = this.#credential.url;
    const path =
      `/api/v1/namespaces/${encodeURIComponent(namespace)}/secrets/${encodeURIComponent(name)}` +
      (method === 'PUT' ? `?fieldManager=${FIELD_MANAGER}` : '');
    const what = `${method} Secret ${namespace}/${name}`;
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const authorization = this.#credential.authorization();
    return new Promise((resolve, reject) => {
      const req = https.request(
        {
          host: url.hostname.replace(/^\[|\]$/g, ''),
          port: url.port === '' ? 443 : Number(url.port),
          method,
          path,
          agent: this.#agent,
          timeout: TIMEOUT_MS,
          headers: {
            accept: 'application/json',
            'user-agent': 'kube-svid-proxy-writer',
            ...(authorization ? { authorization } : {}),
            ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}),
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          let size = 0;
          res.on('data', (chunk: Buffer) => {
            size += chunk.length;
            if (size > MAX_BODY) req.destroy(new Error(`answer above ${MAX_BODY} bytes`));
            else chunks.push(chunk);
          });
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            const status = res.statusCode ?? 0;
            if (status >= 200 && status < 300) {
              try {
                resolve(JSON.parse(text) as SecretObject);
              } catch (err) {
                reject(
                  new WriterError(WriterErrorCode.Kubernetes, `${what}: the answer is not JSON`, {
                    cause: err,
                  }),
                );
              }
              return;
            }
            let message = text.slice(0, 300);
            try {
              message = (JSON.parse(text) as { message?: string }).message ?? message;
            } catch {
              // Not a Status: the raw start of the body says enough.
            }
            reject(new KubeStatusError(status, `${what}: status ${status}: ${message}`));
          });
        },
      );
      req.on('timeout', () => req.destroy(new Error(`no answer within ${TIMEOUT_MS / 1000}s`)));
      req.on('error', (err: NodeJS.ErrnoException) =>
        reject(
          new WriterError(
            WriterErrorCode.Kubernetes,
            `${what}: ${err.code ? `${err.code}: ` : ''}${err.message}`,
            { cause: err },
          ),
        ),
      );
      req.end(payload);
    });
  }
}
