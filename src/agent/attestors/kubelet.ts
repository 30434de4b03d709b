/**
 * The kubelet HTTPS client: `GET /pods` on the kubelet's secure port with the service account token, read
 * afresh for every request so rotation works; the token never appears in a message.
 */
import { readFile } from 'node:fs/promises';
import { request } from 'node:https';
import { checkServerIdentity, type PeerCertificate } from 'node:tls';
import { AgentError, AgentErrorCode } from '../errors.ts';

export interface KubeletClientOptions {
  /** The `/pods` URL of the kubelet (see `kubeletPodsUrl`). */
  readonly podsUrl: URL;
  /** This node's name, which the kubelet's serving certificate must name (or the host of `podsUrl`). */
  readonly nodeName: string;
  readonly tokenPath: string;
  /** PEM of the kubelet CA(s); takes precedence over `caPath`. */
  readonly kubeletCa: string | undefined;
  readonly caPath: string;
  readonly skipVerification: boolean;
  readonly requestTimeoutMs: number;
  readonly maxResponseBytes: number;
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted === true) {
    throw new AgentError(AgentErrorCode.Kubelet, 'k8s attestation aborted', { cause: signal.reason });
  }
}

/** The `/pods` URL under a kubelet base URL; throws `ERR_AGENT_CONFIG` unless it is a credential-free https URL. */
export function kubeletPodsUrl(base: string): URL {
  let url: URL;
  try {
    // Appended, not resolved, so a base with a path (an API server node proxy) keeps it.
    url = new URL(`${base.replace(/\/+$/, '')}/pods`);
  } catch (err) {
    throw new AgentError(AgentErrorCode.Config, `k8s attestor: kubeletUrl "${base}" is not a URL`, {
      cause: err,
    });
  }
  if (url.protocol !== 'https:') {
    throw new AgentError(AgentErrorCode.Config, `k8s attestor: kubeletUrl "${base}" is not https`);
  }
  if (url.username !== '' || url.password !== '') {
    throw new AgentError(AgentErrorCode.Config, 'k8s attestor: kubeletUrl must not carry credentials');
  }
  return url;
}

export class KubeletClient {
  readonly #podsUrl: URL;
  readonly #nodeName: string;
  readonly #tokenPath: string;
  readonly #kubeletCa: string | undefined;
  readonly #caPath: string;
  readonly #skipVerification: boolean;
  readonly #requestTimeoutMs: number;
  readonly #maxResponseBytes: number;

  constructor(options: KubeletClientOptions) {
    this.#podsUrl = options.podsUrl;
    this.#nodeName = options.nodeName;
    this.#tokenPath = options.tokenPath;
    this.#kubeletCa = options.kubeletCa;
    this.#caPath = options.caPath;
    this.#skipVerification = options.skipVerification;
    this.#requestTimeoutMs = options.requestTimeoutMs;
    this.#maxResponseBytes = options.maxResponseBytes;
  }

  async #readToken(): Promise<string> {
    try {
      return (await readFile(this.#tokenPath, 'utf8')).trim();
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Kubelet,
        `cannot read the kubelet token file ${this.#tokenPath}: ${describe(err)}`,
        { cause: err },
      );
    }
  }

  async #readCa(): Promise<string | undefined> {
    if (this.#skipVerification) {
      return undefined;
    }
    if (this.#kubeletCa !== undefined) {
      return this.#kubeletCa;
    }
    try {
      return await readFile(this.#caPath, 'utf8');
    } catch (err) {
      throw new AgentError(
        AgentErrorCode.Kubelet,
        `cannot read the kubelet CA file ${this.#caPath}: ${describe(err)}`,
        { cause: err },
      );
    }
  }

  /**
   * The kubelet's certificate must name this node (kubelet serving certificates carry the node name) or the
   * host the agent dialled. Chain verification against the CA happens before this is called.
   */
  #checkIdentity = (host: string, cert: PeerCertificate): Error | undefined => {
    const asNode = checkServerIdentity(this.#nodeName, cert);
    if (asNode === undefined || checkServerIdentity(host, cert) === undefined) {
      return undefined;
    }
    return asNode;
  };

  /** The body of the kubelet's `GET /pods` answer. Throws `ERR_AGENT_KUBELET`, with the token redacted. */
  async fetchPods(signal: AbortSignal | undefined): Promise<string> {
    throwIfAborted(signal);
    const [token, ca] = await Promise.all([this.#readToken(), this.#readCa()]);
    const origin = this.#podsUrl.origin;
    const redact = (text: string): string => (token === '' ? text : text.replaceAll(token, '[REDACTED]'));
    const failure = (message: string, cause?: unknown): AgentError =>
      new AgentError(AgentErrorCode.Kubelet, redact(`kubelet at ${origin}: ${message}`), { cause });

    const headers: Record<string, string> = { Accept: 'application/json' };
    if (token !== '') {
      headers.Authorization = `Bearer ${token}`;
    }
    const maxBytes = this.#maxResponseBytes;

    return new Promise<string>((resolve, reject) => {
      const req = request(this.#podsUrl, {
        method: 'GET',
        headers,
        agent: false,
        timeout: this.#requestTimeoutMs,
        signal,
        ca,
        rejectUnauthorized: !this.#skipVerification,
        checkServerIdentity: this.#checkIdentity,
      });
      req.on('timeout', () => {
        req.destroy(new Error(`no answer within ${this.#requestTimeoutMs} ms`));
      });
      req.on('error', (err) => {
        if (signal?.aborted === true) {
          reject(failure('request aborted', signal.reason));
        } else {
          reject(failure(`request failed: ${describe(err)}`, err));
        }
      });
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > maxBytes) {
            reject(failure(`pod list is larger than ${maxBytes} bytes`));
            req.destroy();
            return;
          }
          chunks.push(chunk);
        });
        res.on('error', (err) => {
          reject(failure(`reading the pod list failed: ${describe(err)}`, err));
        });
        res.on('end', () => {
          const body = Buffer.concat(chunks).toString('utf8');
          if (res.statusCode !== 200) {
            const excerpt = body.trim().slice(0, 200);
            reject(
              failure(
                `GET /pods answered ${res.statusCode ?? '?'} ${res.statusMessage ?? ''}`.trimEnd() +
                  (excerpt === '' ? '' : `: ${excerpt}`),
              ),
            );
            return;
          }
          resolve(body);
        });
      });
      req.end();
    });
  }
}
