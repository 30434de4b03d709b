/**
 * The client mode's own identity: the X.509-SVID and bundles from the Workload API, held in memory only. Each
 * SVID gets one TLS SecureContext, made when it arrives, so a new connection to a spoke costs no PEM parsing.
 */
import { createSecureContext, type SecureContext } from 'node:tls';
import type { Logger } from 'pino';
import type { X509BundleSource } from '../spiffe/bundle.ts';
import type { X509Svid } from '../spiffe/x509svid.ts';
import { X509Source } from '../workload/client.ts';
import { ClientError, ClientErrorCode } from './errors.ts';

export interface PresentedSvid {
  readonly svid: X509Svid;
  readonly context: SecureContext;
  /** SHA-256 fingerprint of the leaf: sessions opened with another one are retired. */
  readonly fingerprint: string;
}

/** What the spokes need from the identity: the SVID to present and the bundles to verify servers with. */
export interface ClientIdentity {
  /** The SVID to present now; throws `ERR_CLIENT_NO_SVID` when there is none. */
  current(): PresentedSvid;
  readonly bundles: X509BundleSource;
}

export function presented(svid: X509Svid): PresentedSvid {
  const leaf = svid.certificates[0];
  if (leaf === undefined) throw new ClientError(ClientErrorCode.NoSvid, 'the X.509-SVID has no certificate');
  return {
    svid,
    context: createSecureContext({
      cert: svid.certificates.map((c) => c.toString()).join(''),
      key: svid.privateKey.export({ format: 'pem', type: 'pkcs8' }),
      minVersion: 'TLSv1.2',
    }),
    fingerprint: leaf.fingerprint256,
  };
}

/**
 * Follows the Workload API: every update that changes the SVID calls `onRotate` (after the new SVID is the one
 * presented). A withdrawn SVID (PermissionDenied) is never presented again.
 */
export class WorkloadClientIdentity implements ClientIdentity {
  readonly #source: X509Source;
  readonly #hint: string | undefined;
  #current: PresentedSvid | undefined;
  rotations = 0;

  private constructor(source: X509Source, hint: string | undefined) {
    this.#source = source;
    this.#hint = hint;
  }

  static async create(options: {
    readonly address?: string;
    readonly hint?: string;
    readonly logger: Logger;
    readonly onRotate: (previous: PresentedSvid | undefined, next: PresentedSvid) => void;
    readonly startTimeoutMs?: number;
  }): Promise<WorkloadClientIdentity> {
    const source = await X509Source.create({
      ...(options.address ? { address: options.address } : {}),
      ...(options.startTimeoutMs ? { startTimeoutMs: options.startTimeoutMs } : {}),
    });
    const identity = new WorkloadClientIdentity(source, options.hint);
    const log = options.logger;
    try {
      identity.#current = presented(identity.#pick());
    } catch (err) {
      source.close();
      throw err;
    }
    source.on('update', () => {
      let next: PresentedSvid;
      try {
        next = presented(identity.#pick());
      } catch (err) {
        log.error({ err: { message: (err as Error).message } }, 'Workload API update without a usable SVID');
        return;
      }
      const previous = identity.#current;
      if (previous?.fingerprint === next.fingerprint) return;
      identity.#current = next;
      identity.rotations++;
      options.onRotate(previous, next);
    });
    source.on('withdrawn', (err) => {
      log.error(
        { code: err.code, err: { message: err.message } },
        'SVID withdrawn: no new connection to any spoke',
      );
    });
    source.on('error', (err) =>
      log.warn({ err: { message: err.message } }, 'Workload API stream failed; reconnecting'),
    );
    source.on('refused', (err) =>
      log.error({ code: err.code, err: { message: err.message } }, 'Workload API update refused'),
    );
    return identity;
  }

  #pick(): X509Svid {
    try {
      return this.#source.svid(this.#hint);
    } catch (err) {
      throw new ClientError(ClientErrorCode.NoSvid, (err as Error).message, { cause: err });
    }
  }

  current(): PresentedSvid {
    const current = this.#current;
    const withdrawn = this.#source.withdrawn;
    if (withdrawn !== undefined)
      throw new ClientError(ClientErrorCode.NoSvid, withdrawn.message, { cause: withdrawn });
    if (current === undefined) throw new ClientError(ClientErrorCode.NoSvid, 'no X.509-SVID yet');
    const expiry = current.svid.certificates[0]?.validToDate;
    if (expiry !== undefined && expiry.getTime() <= Date.now()) {
      throw new ClientError(
        ClientErrorCode.NoSvid,
        `the X.509-SVID ${current.svid.id} expired at ${expiry.toISOString()} and the Workload API ` +
          'has sent no new one',
      );
    }
    return current;
  }

  get bundles(): X509BundleSource {
    return this.#source.bundles;
  }

  close(): void {
    this.#source.close();
  }
}
