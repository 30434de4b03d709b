/**
 * The client mode's own identity: the proxy's Workload API identity source (the SVID and bundles held in memory
 * only, rotations followed, a withdrawn SVID never presented), plus one TLS SecureContext per SVID, made when it
 * arrives, so a new connection to a spoke costs no PEM parsing.
 */
import { createSecureContext, type SecureContext } from 'node:tls';
import type { Logger } from 'pino';
import { WorkloadIdentitySource } from '../proxy/source.ts';
import type { X509BundleSource } from '../spiffe/bundle.ts';
import type { X509Svid } from '../spiffe/x509svid.ts';
import { ClientError, ClientErrorCode } from './errors.ts';

export interface PresentedSvid {
  readonly svid: X509Svid;
  readonly context: SecureContext;
  /** SHA-256 fingerprint of the leaf: sessions opened with another one are retired. */
  readonly fingerprint: string;
  /** The leaf's notAfter, epoch milliseconds. */
  readonly expiresAt: number;
}

/** What the spokes need from the identity: the SVID to present and the bundles to verify servers with. */
export interface ClientIdentity {
  /** The SVID to present now; throws `ERR_CLIENT_NO_SVID` when there is none. */
  current(): PresentedSvid;
  readonly bundles: X509BundleSource;
}

function presented(svid: X509Svid): PresentedSvid {
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
    expiresAt: leaf.validToDate.getTime(),
  };
}

/** Follows the Workload API: every update that changes the SVID calls `onRotate`, once it is the one presented. */
export class WorkloadClientIdentity implements ClientIdentity {
  readonly source: WorkloadIdentitySource;
  #current: PresentedSvid;
  rotations = 0;

  private constructor(source: WorkloadIdentitySource, first: PresentedSvid) {
    this.source = source;
    this.#current = first;
  }

  static async create(options: {
    readonly address?: string;
    readonly hint?: string;
    readonly logger: Logger;
    readonly onRotate: (previous: PresentedSvid, next: PresentedSvid) => void;
  }): Promise<WorkloadClientIdentity> {
    const source = await WorkloadIdentitySource.create({
      ...(options.address ? { address: options.address } : {}),
      ...(options.hint ? { hint: options.hint } : {}),
      logger: options.logger,
      who: 'the client mode',
    });
    let identity: WorkloadClientIdentity;
    try {
      identity = new WorkloadClientIdentity(source, presented(source.svid()));
    } catch (err) {
      source.close();
      throw err;
    }
    source.on('update', () => {
      let svid: X509Svid;
      try {
        svid = source.svid();
      } catch {
        return; // withdrawn: current() says so from now on
      }
      const previous = identity.#current;
      if (svid.certificates[0]?.fingerprint256 === previous.fingerprint) return;
      identity.#current = presented(svid);
      identity.rotations++;
      options.onRotate(previous, identity.#current);
    });
    return identity;
  }

  /** Per request: cheap checks only (the source refuses a withdrawn SVID; an expired one is refused here). */
  current(): PresentedSvid {
    try {
      this.source.svid();
    } catch (err) {
      throw new ClientError(ClientErrorCode.NoSvid, (err as Error).message, { cause: err });
    }
    const current = this.#current;
    if (Date.now() >= current.expiresAt) {
      throw new ClientError(
        ClientErrorCode.NoSvid,
        `the X.509-SVID ${current.svid.id} expired at ${new Date(current.expiresAt).toISOString()} and the ` +
          'Workload API has sent no new one',
      );
    }
    return current;
  }

  get bundles(): X509BundleSource {
    return this.source.bundles();
  }

  close(): void {
    this.source.close();
  }
}
