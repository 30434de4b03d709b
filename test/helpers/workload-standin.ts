/**
 * A STAND-IN Workload API: a grpc-js server on a Unix socket that plays the agent where the real agent cannot
 * produce a situation (an SVID that does not chain to its bundle, an unusable JWT bundle key, a PermissionDenied
 * at a chosen moment). Only the methods given are served. Responses are built from a real LocalCa.
 */
// Must stay first: @peculiar/x509 (used by the CA) needs the Reflect polyfill.
import 'reflect-metadata';
import { webcrypto } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import type { LocalCa } from '../../src/agent/ca.ts';
import { generateKeyPair } from '../../src/agent/keys.ts';
import { SpiffeId } from '../../src/spiffe/id.ts';
import {
  type JwtBundlesResponse,
  type JwtSvidRequest,
  type JwtSvidResponse,
  workloadApiService,
  type X509BundlesResponse,
  type X509SvidResponse,
} from '../../src/workload/proto.ts';

export type StandInStream<Res> = (call: grpc.ServerWritableStream<unknown, Res>) => void;

export interface StandInHandlers {
  readonly FetchX509SVID?: StandInStream<X509SvidResponse>;
  readonly FetchX509Bundles?: StandInStream<X509BundlesResponse>;
  readonly FetchJWTBundles?: StandInStream<JwtBundlesResponse>;
  readonly FetchJWTSVID?: (
    call: grpc.ServerUnaryCall<JwtSvidRequest, JwtSvidResponse>,
    callback: grpc.sendUnaryData<JwtSvidResponse>,
  ) => void;
}

export interface StandIn {
  /** unix:///… address for the client. */
  readonly address: string;
  stop(): Promise<void>;
}

export async function startStandIn(socketPath: string, handlers: StandInHandlers): Promise<StandIn> {
  const server = new grpc.Server();
  server.addService(workloadApiService, handlers as grpc.UntypedServiceImplementation);
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix:${socketPath}`, grpc.ServerCredentials.createInsecure(), (err) =>
      err ? reject(err) : resolve(),
    ),
  );
  return {
    address: `unix://${socketPath}`,
    stop: () => new Promise((resolve) => server.tryShutdown(() => resolve())),
  };
}

/** Ends a stand-in stream with `code`, after `message` (if any) has gone out. */
export function endStream<Res>(
  call: grpc.ServerWritableStream<unknown, Res>,
  code: grpc.status,
  message?: Res,
): void {
  const end = (): void => {
    call.emit('error', { code, details: `stand-in says ${grpc.status[code]}` });
  };
  if (message === undefined) end();
  else call.write(message, end);
}

export interface SvidResponseOptions {
  /** Lifetime of the SVID (default one hour). */
  readonly ttlSeconds?: number;
  /** The `bundle` field (default: the CA's own authorities, concatenated DER). */
  readonly bundle?: Buffer;
  readonly federatedBundles?: Record<string, Buffer>;
  /** Changes the leaf's DER before it is sent (to break its signature, say). */
  readonly tamper?: (leafDer: Buffer) => Buffer;
}

/** A valid X509SVIDResponse (as the server side of proto-loader takes it) for `spiffe://<td>/<path>`. */
export async function svidResponse(
  ca: LocalCa,
  path: string,
  options: SvidResponseOptions = {},
): Promise<X509SvidResponse> {
  const keys = await generateKeyPair('ec-p256');
  const id = SpiffeId.fromPath(ca.trustDomain, `/${path}`);
  const signed = await ca.signX509Svid({
    id,
    publicKey: keys.publicKey,
    ttlSeconds: options.ttlSeconds ?? 3600,
  });
  const [leaf, ...rest] = signed.certificates.map((c) => Buffer.from(c.raw));
  const tampered = options.tamper && leaf ? options.tamper(leaf) : leaf;
  return {
    svids: [
      {
        spiffe_id: id.toString(),
        x509_svid: Buffer.concat([tampered as Buffer, ...rest]),
        x509_svid_key: Buffer.from(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)),
        bundle: options.bundle ?? derBundle(ca),
        hint: '',
      },
    ],
    crl: [],
    federated_bundles: options.federatedBundles ?? {},
  };
}

/** The CA's X.509 authorities as the Workload API sends them: concatenated DER. */
export function derBundle(ca: LocalCa): Buffer {
  return Buffer.concat(ca.bundle.x509Authorities.map((c) => c.raw));
}

/** A JWTBundlesResponse of one trust domain whose JWK Set holds exactly `keys`. */
export function jwtBundlesResponse(trustDomainId: string, keys: readonly object[]): JwtBundlesResponse {
  return { bundles: { [trustDomainId]: Buffer.from(JSON.stringify({ keys })) } };
}
