/**
 * agent.yaml's `issuer` and `spire` keys: with `issuer: spire` a SPIRE server signs everything this agent
 * serves, so the keys of the embedded CA (`entriesFile`, `ca`, SVID lifetimes, `federation`) are refused rather
 * than silently ignored.
 */
import { isScalar, type YAMLMap } from 'yaml';
import { type Field, fieldMap, fieldString, parseHostPort } from '../config/common.ts';
import type { YamlReader } from '../config/yaml.ts';
import type { NodeAttestorSettings, SpireSettings } from './spire/agent.ts';

export const ISSUERS = ['ca', 'spire'] as const;
export type Issuer = (typeof ISSUERS)[number];

/** SPIRE's agent syncs every 5 s; so do we unless `spire.syncInterval` says otherwise. */
export const DEFAULT_SYNC_INTERVAL_SECONDS = 5;
/** Where a projected service-account token for the k8s_psat attestor is mounted unless `tokenPath` says. */
export const DEFAULT_PSAT_TOKEN_PATH = '/var/run/secrets/tokens/spire-agent';
/** SPIRE's server API port. */
export const DEFAULT_SPIRE_SERVER_PORT = 8081;

const SPIRE = ['serverAddress', 'bootstrapBundle', 'nodeAttestor', 'syncInterval'] as const;
const NODE_ATTESTOR = ['joinToken', 'k8sPsat'] as const;
const PSAT = ['cluster', 'tokenPath'] as const;

/** Keys that belong to the embedded CA, refused with `issuer: spire`, and why. */
export const CA_ONLY_KEYS: readonly (readonly ['entriesFile' | 'ca' | 'federation', string])[] = [
  ['entriesFile', 'registration entries come from the SPIRE server (spire-server entry create)'],
  ['ca', 'the SPIRE server is the CA'],
  [
    'federation',
    'the SPIRE server federates (its federates_with); federated bundles reach workloads from it',
  ],
];
/** `svid` keys the server decides with `issuer: spire` (only `svid.keyType` stays ours). */
export const SERVER_DECIDES_SVID_KEYS: readonly ('x509Ttl' | 'jwtTtl' | 'rotationJitter')[] = [
  'x509Ttl',
  'jwtTtl',
  'rotationJitter',
];

/** Reads `issuer`; undefined for a value that is not one of ISSUERS (reported). */
export function readIssuer(r: YamlReader, field: Field | undefined): Issuer | undefined {
  if (field === undefined) return 'ca';
  const value = fieldString(r, field, 'issuer');
  if (value === undefined) return undefined;
  if ((ISSUERS as readonly string[]).includes(value)) return value as Issuer;
  r.report(field.valueOffset, `issuer "${value}" is not one of ${ISSUERS.join(', ')}`);
  return undefined;
}

/**
 * Reads the `spire` section. `joinToken` (the flag --join-token) wins over the file's; a join token is used once,
 * at the first attestation, and never needed again while the state directory keeps the agent SVID.
 */
export function readSpire(
  r: YamlReader,
  field: Field,
  path: (value: string | undefined) => string | undefined,
  joinTokenFlag: string | undefined,
): SpireSettings | undefined {
  const map = fieldMap(r, field, 'spire');
  if (map === undefined) return undefined;
  const s = r.fields(map, SPIRE, 'spire');
  const str = (f: Field | undefined, what: string): string | undefined => fieldString(r, f, what);

  let serverAddress: SpireSettings['serverAddress'] | undefined;
  const addrField = s.get('serverAddress');
  const addrText = str(addrField, 'spire.serverAddress');
  if (addrField === undefined) {
    r.report(
      field.keyOffset,
      'spire needs serverAddress (host:port of the SPIRE server API, e.g. spire-server:8081)',
    );
  } else if (addrText !== undefined) {
    const parsed = parseHostPort(
      /:\d+$/.test(addrText) ? addrText : `${addrText}:${DEFAULT_SPIRE_SERVER_PORT}`,
    );
    if (typeof parsed === 'string') r.report(addrField.valueOffset, `spire.serverAddress: ${parsed}`);
    else if (parsed.port === 0)
      r.report(addrField.valueOffset, 'spire.serverAddress: port 0 is not a server');
    else serverAddress = parsed;
  }

  const bundleField = s.get('bootstrapBundle');
  const bootstrapBundle = path(str(bundleField, 'spire.bootstrapBundle'));
  if (bundleField === undefined) {
    r.report(
      field.keyOffset,
      "spire needs bootstrapBundle: a file with the server trust domain's roots (`spire-server bundle show`), " +
        'which authenticates the server at first contact',
    );
  }

  let syncIntervalMs: number | undefined;
  const syncField = s.get('syncInterval');
  const syncSeconds =
    syncField && r.duration(syncField.value, syncField.valueOffset, 'spire.syncInterval', 1);
  if (syncField && syncSeconds !== undefined) {
    if (syncSeconds > 3600) r.report(syncField.valueOffset, 'spire.syncInterval must be at most 1h');
    else syncIntervalMs = syncSeconds * 1000;
  }

  const nodeAttestor = readNodeAttestor(r, s.get('nodeAttestor'), field, path, joinTokenFlag);
  if (serverAddress === undefined || bootstrapBundle === undefined || nodeAttestor === undefined)
    return undefined;
  return {
    serverAddress,
    bootstrapBundle,
    nodeAttestor,
    ...(syncIntervalMs !== undefined ? { syncIntervalMs } : {}),
  };
}

function readNodeAttestor(
  r: YamlReader,
  field: Field | undefined,
  spire: Field,
  path: (value: string | undefined) => string | undefined,
  joinTokenFlag: string | undefined,
): NodeAttestorSettings | undefined {
  if (field === undefined) {
    if (joinTokenFlag !== undefined) return { type: 'join_token', token: joinTokenFlag };
    r.report(spire.keyOffset, 'spire needs nodeAttestor: joinToken or k8sPsat');
    return undefined;
  }
  const map: YAMLMap | undefined = fieldMap(r, field, 'spire.nodeAttestor');
  if (map === undefined) return undefined;
  const n = r.fields(map, NODE_ATTESTOR, 'spire.nodeAttestor');
  const join = n.get('joinToken');
  const psat = n.get('k8sPsat');
  if (join !== undefined && psat !== undefined) {
    r.report(field.valueOffset, 'spire.nodeAttestor: name one attestor, joinToken or k8sPsat, not both');
    return undefined;
  }
  if (psat !== undefined) {
    if (joinTokenFlag !== undefined) {
      r.report(psat.keyOffset, '--join-token was given, but spire.nodeAttestor is k8sPsat');
      return undefined;
    }
    const m = fieldMap(r, psat, 'spire.nodeAttestor.k8sPsat');
    if (m === undefined) return undefined;
    const p = r.fields(m, PSAT, 'spire.nodeAttestor.k8sPsat');
    const clusterField = p.get('cluster');
    const cluster = fieldString(r, clusterField, 'spire.nodeAttestor.k8sPsat.cluster');
    if (clusterField === undefined) {
      r.report(
        psat.keyOffset,
        "spire.nodeAttestor.k8sPsat needs cluster: the name the server's k8s_psat attestor knows this cluster by",
      );
    }
    const tokenPath =
      path(fieldString(r, p.get('tokenPath'), 'spire.nodeAttestor.k8sPsat.tokenPath')) ??
      DEFAULT_PSAT_TOKEN_PATH;
    if (cluster === undefined || cluster === '') return undefined;
    return { type: 'k8s_psat', cluster, tokenPath };
  }
  if (join !== undefined) {
    // `joinToken:` with no value means "given with --join-token".
    const empty = join.value === null || (isScalar(join.value) && join.value.value === null);
    const token = empty ? undefined : fieldString(r, join, 'spire.nodeAttestor.joinToken');
    const chosen = joinTokenFlag ?? token;
    return chosen === undefined ? { type: 'join_token' } : { type: 'join_token', token: chosen };
  }
  r.report(field.valueOffset, 'spire.nodeAttestor: name joinToken or k8sPsat');
  return undefined;
}
