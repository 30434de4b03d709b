/**
 * agent.yaml's `federation` section: the bundle endpoint we serve, the trust domains whose endpoints we fetch,
 * and static bundle files. Every relationship names its profile and everything that profile needs; nothing is
 * inferred from anything else (an endpoint SPIFFE ID is never derived from the URL, a profile never from the
 * keys present), and a key that belongs to the other profile is refused rather than ignored.
 */
import type { Node, YAMLMap } from 'yaml';
import {
  type Field,
  fieldMap,
  fieldString,
  type HostPort,
  parseHostPort,
  readTrustDomainFiles,
} from '../config/common.ts';
import type { YamlReader } from '../config/yaml.ts';
import { SpiffeId, TrustDomain } from '../spiffe/id.ts';

export const BUNDLE_PROFILES = ['https_spiffe', 'https_web'] as const;
export type BundleProfile = (typeof BUNDLE_PROFILES)[number];

/**
 * Where the bundle endpoint listens unless `federation.bundleEndpoint.listen` says otherwise: 8444, beside the
 * proxy's data port 8443, since the agent and the proxy often share a node's network namespace.
 */
export const DEFAULT_BUNDLE_ENDPOINT_LISTEN: HostPort = { host: '0.0.0.0', port: 8444 };
/** `spiffe_refresh_hint` we publish unless `refreshHint` says otherwise (as SPIRE's default). */
export const DEFAULT_REFRESH_HINT_SECONDS = 300;
/** The path of our https_spiffe endpoint's SVID, under our trust domain, unless `spiffeId` says otherwise. */
export const DEFAULT_BUNDLE_ENDPOINT_PATH = '/kube-svid-proxy/bundle-endpoint';

export interface BundleEndpointSettings {
  readonly listen: HostPort;
  /** The URL path served; other paths are 404. */
  readonly path: string;
  readonly refreshHintSeconds: number;
  readonly tls:
    | { readonly profile: 'https_spiffe'; readonly spiffeId: SpiffeId }
    | { readonly profile: 'https_web'; readonly certFile: string; readonly keyFile: string };
}

export type RelationshipSettings = { readonly trustDomain: TrustDomain; readonly url: string } & (
  | { readonly profile: 'https_web'; readonly caFile?: string }
  | {
      readonly profile: 'https_spiffe';
      readonly endpointSpiffeId: SpiffeId;
      readonly bootstrapBundle?: string;
    }
);

export interface FederationSettings {
  readonly bundleEndpoint?: BundleEndpointSettings;
  /** Trust domains whose bundle endpoints we poll, in file order. */
  readonly relationships: readonly RelationshipSettings[];
  /** Static federated bundles: trust domain → SPIFFE bundle JSON file, watched. */
  readonly bundleFiles: ReadonlyMap<string, string>;
}

const FEDERATION = ['bundleEndpoint', 'trustDomains', 'bundles'] as const;
const ENDPOINT = ['listen', 'path', 'refreshHint', 'profile', 'spiffeId', 'certFile', 'keyFile'] as const;
const RELATIONSHIP = ['url', 'profile', 'endpointSpiffeId', 'bootstrapBundle', 'caFile'] as const;
const ONLY: Record<string, BundleProfile> = {
  spiffeId: 'https_spiffe',
  endpointSpiffeId: 'https_spiffe',
  bootstrapBundle: 'https_spiffe',
  certFile: 'https_web',
  keyFile: 'https_web',
  caFile: 'https_web',
};

export function readFederation(
  r: YamlReader,
  map: YAMLMap,
  path: (value: string | undefined) => string | undefined,
  own: TrustDomain | undefined,
): FederationSettings {
  const str = (field: Field | undefined, what: string): string | undefined => fieldString(r, field, what);
  const f = r.fields(map, FEDERATION, 'federation');

  const profileOf = (
    fields: Map<string, Field>,
    what: string,
    fallbackOffset: number,
  ): BundleProfile | undefined => {
    const field = fields.get('profile');
    if (field === undefined) {
      r.report(
        fallbackOffset,
        `${what} needs "profile": one of ${BUNDLE_PROFILES.join(', ')} (it is never guessed)`,
      );
      return undefined;
    }
    const value = str(field, `${what}.profile`);
    if (value === undefined) return undefined;
    if ((BUNDLE_PROFILES as readonly string[]).includes(value)) {
      const profile = value as BundleProfile;
      for (const [key, only] of Object.entries(ONLY)) {
        const misplaced = fields.get(key);
        if (misplaced !== undefined && only !== profile) {
          r.report(
            misplaced.keyOffset,
            `${what}.${key} belongs to profile ${only}, but profile is ${profile}`,
          );
        }
      }
      return profile;
    }
    r.report(field.valueOffset, `${what}.profile "${value}" is not one of ${BUNDLE_PROFILES.join(', ')}`);
    return undefined;
  };

  const spiffeIdIn = (
    field: Field | undefined,
    what: string,
    trustDomain: TrustDomain | undefined,
  ): SpiffeId | undefined => {
    const text = str(field, what);
    if (field === undefined || text === undefined) return undefined;
    try {
      const id = SpiffeId.parse(text);
      if (trustDomain !== undefined && !id.trustDomain.equals(trustDomain)) {
        r.report(field.valueOffset, `${what} ${text} is not in trust domain ${trustDomain.name}`);
        return undefined;
      }
      return id;
    } catch (err) {
      r.report(field.valueOffset, `${what}: ${(err as Error).message}`);
      return undefined;
    }
  };

  // bundleEndpoint
  let bundleEndpoint: BundleEndpointSettings | undefined;
  const endpointField = f.get('bundleEndpoint');
  const endpointMap = fieldMap(r, endpointField, 'federation.bundleEndpoint');
  if (endpointField && endpointMap) {
    const what = 'federation.bundleEndpoint';
    const e = r.fields(endpointMap, ENDPOINT, what);
    let listen = DEFAULT_BUNDLE_ENDPOINT_LISTEN;
    const listenField = e.get('listen');
    const listenText = str(listenField, `${what}.listen`);
    if (listenField && listenText !== undefined) {
      const parsed = parseHostPort(listenText);
      if (typeof parsed === 'string') r.report(listenField.valueOffset, `${what}.listen: ${parsed}`);
      else listen = parsed;
    }
    const pathField = e.get('path');
    const urlPath = str(pathField, `${what}.path`) ?? '/';
    if (pathField && !/^\/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$/.test(urlPath)) {
      r.report(
        pathField.valueOffset,
        `${what}.path "${urlPath}" is not an absolute URL path such as "/" or "/bundle"`,
      );
    }
    const hintField = e.get('refreshHint');
    const hint = hintField && r.duration(hintField.value, hintField.valueOffset, `${what}.refreshHint`, 1);
    const profile = profileOf(e, what, endpointField.keyOffset);
    let tls: BundleEndpointSettings['tls'] | undefined;
    if (profile === 'https_spiffe') {
      const spiffeId =
        spiffeIdIn(e.get('spiffeId'), `${what}.spiffeId`, own) ??
        (e.get('spiffeId') === undefined && own
          ? SpiffeId.fromPath(own, DEFAULT_BUNDLE_ENDPOINT_PATH)
          : undefined);
      if (spiffeId) tls = { profile, spiffeId };
    } else if (profile === 'https_web') {
      const certFile = path(str(e.get('certFile'), `${what}.certFile`));
      const keyFile = path(str(e.get('keyFile'), `${what}.keyFile`));
      if (certFile === undefined || keyFile === undefined) {
        r.report(
          endpointField.keyOffset,
          `${what} with profile https_web needs certFile and keyFile (a Web-PKI certificate and its key)`,
        );
      } else {
        tls = { profile, certFile, keyFile };
      }
    }
    if (tls) {
      bundleEndpoint = {
        listen,
        path: urlPath,
        refreshHintSeconds: hint ?? DEFAULT_REFRESH_HINT_SECONDS,
        tls,
      };
    }
  }

  // static bundle files
  let bundleFiles = new Map<string, string>();
  const bundlesMap = fieldMap(r, f.get('bundles'), 'federation.bundles');
  if (bundlesMap) bundleFiles = readTrustDomainFiles(r, bundlesMap, 'federation.bundles', path, own);

  // trustDomains: relationships
  const relationships: RelationshipSettings[] = [];
  const tdsMap = fieldMap(r, f.get('trustDomains'), 'federation.trustDomains');
  for (const pair of tdsMap?.items ?? []) {
    const keyNode = pair.key as Node | null;
    const keyOffset = r.offsetOf(keyNode, r.offsetOf(tdsMap as YAMLMap, 0));
    const name = r.string(keyNode, keyOffset, 'a federation.trustDomains key (a trust domain name)');
    if (name === undefined) continue;
    let trustDomain: TrustDomain;
    try {
      trustDomain = TrustDomain.parse(name);
    } catch (err) {
      r.report(keyOffset, `federation.trustDomains: ${(err as Error).message}`);
      continue;
    }
    const what = `federation.trustDomains.${trustDomain.name}`;
    if (own?.equals(trustDomain)) {
      r.report(keyOffset, `${what}: that is our own trust domain`);
      continue;
    }
    if (bundleFiles.has(trustDomain.name)) {
      r.report(
        keyOffset,
        `${what}: the trust domain also has a file in federation.bundles; choose one source`,
      );
      continue;
    }
    const valueNode = pair.value as Node | null;
    const rel = r.map(valueNode, r.offsetOf(valueNode, keyOffset), what);
    if (rel === undefined) continue;
    const fields = r.fields(rel, RELATIONSHIP, what);
    const urlField = fields.get('url');
    const url = str(urlField, `${what}.url`);
    if (urlField === undefined)
      r.report(keyOffset, `${what} needs "url": the peer's bundle endpoint (https://…)`);
    else if (url !== undefined) {
      const problem = urlProblem(url);
      if (problem) r.report(urlField.valueOffset, `${what}.url ${problem}`);
    }
    const profile = profileOf(fields, what, keyOffset);
    if (url === undefined || urlProblem(url) !== undefined) continue;
    if (profile === 'https_web') {
      const caFile = path(str(fields.get('caFile'), `${what}.caFile`));
      relationships.push({ trustDomain, url, profile, ...(caFile ? { caFile } : {}) });
    } else if (profile === 'https_spiffe') {
      const idField = fields.get('endpointSpiffeId');
      if (idField === undefined) {
        r.report(
          keyOffset,
          `${what} with profile https_spiffe needs endpointSpiffeId (the SPIFFE ID the endpoint's certificate must carry)`,
        );
        continue;
      }
      const endpointSpiffeId = spiffeIdIn(idField, `${what}.endpointSpiffeId`, trustDomain);
      const bootstrapBundle = path(str(fields.get('bootstrapBundle'), `${what}.bootstrapBundle`));
      if (endpointSpiffeId) {
        relationships.push({
          trustDomain,
          url,
          profile,
          endpointSpiffeId,
          ...(bootstrapBundle ? { bootstrapBundle } : {}),
        });
      }
    }
  }

  return { ...(bundleEndpoint ? { bundleEndpoint } : {}), relationships, bundleFiles };
}

/** Why `text` cannot be a bundle endpoint URL, or undefined when it can. */
function urlProblem(text: string): string | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return `"${text}" is not a URL`;
  }
  if (url.protocol !== 'https:') return `"${text}" must be https:// (both profiles are TLS)`;
  if (url.username !== '' || url.password !== '') return `"${text}" must not carry credentials`;
  if (url.hash !== '') return `"${text}" must not have a #fragment`;
  return undefined;
}
