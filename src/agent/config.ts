import type { Node, YAMLMap } from 'yaml';
import {
  type Field,
  fieldMap,
  fieldString,
  type HostPort,
  parseConfig,
  parseHostPort,
  readConfigFile,
  readLogLevel,
  readTrustDomain,
} from '../config/common.ts';
import type { YamlProblem, YamlReader } from '../config/yaml.ts';
import type { LogLevel } from '../observability/logger.ts';
import type { AgentOptions } from './agent.ts';
import type { K8sAttestorOptions } from './attestors/k8s.ts';
import type { UnixAttestorOptions } from './attestors/unix.ts';
import { DEFAULT_CA_TTL_SECONDS } from './ca.ts';
import { type FederationSettings, readFederation } from './config-federation.ts';
import { CA_ONLY_KEYS, readIssuer, readSpire, SERVER_DECIDES_SVID_KEYS } from './config-spire.ts';
import { AgentErrorCode, FileProblemsError } from './errors.ts';
import { DEFAULT_X509_SVID_TTL_SECONDS } from './issuer.ts';
import { isKeyType, KEY_TYPES, type KeyType } from './keys.ts';
import type { SpireAgentSettings, SpireSettings } from './spire/agent.ts';

export const DEFAULT_AGENT_SOCKET = '/run/kube-svid-proxy/agent.sock';
/** Where the agent keeps its CA and federated bundles unless `stateDir` says otherwise. */
export const DEFAULT_STATE_DIR = '/var/lib/kube-svid-proxy/agent';

/** AgentOptions without the logger, plus the log level: the agent with its embedded CA (`issuer: ca`). */
export type AgentConfig = Omit<AgentOptions, 'logger'> & {
  readonly logLevel: LogLevel;
  readonly issuer?: 'ca';
};

/** The agent whose issuer is a SPIRE server (`issuer: spire`). */
export type SpireAgentConfig = SpireAgentSettings & { readonly logLevel: LogLevel; readonly issuer: 'spire' };

/** What agent.yaml configures: one agent or the other. */
export type AnyAgentConfig = AgentConfig | SpireAgentConfig;

/** Values from the command line that stand in for keys of the file. */
export interface AgentFlags {
  /** --join-token: the one-time token of `spire.nodeAttestor.joinToken`. */
  readonly joinToken?: string;
}

export class ConfigError extends FileProblemsError {
  constructor(file: string, problems: readonly YamlProblem[]) {
    super(AgentErrorCode.Config, file, problems);
    this.name = 'ConfigError';
  }
}

const TOP = [
  'trustDomain',
  'socketPath',
  'socketMode',
  'entriesFile',
  'stateDir',
  'watchPollInterval',
  'logLevel',
  'ca',
  'svid',
  'attestors',
  'federation',
  'admin',
  'issuer',
  'spire',
] as const;
const ADMIN = ['listen'] as const;
const CA = ['keyType', 'ttl', 'upstream'] as const;
const UPSTREAM = ['certFile', 'keyFile', 'bundleFile'] as const;
const SVID = ['keyType', 'x509Ttl', 'jwtTtl', 'rotationJitter'] as const;
const ATTESTORS = ['unix', 'k8s'] as const;
const UNIX = ['discoverWorkloadPath', 'workloadSizeLimit'] as const;
const K8S = [
  'nodeName',
  'nodeNameEnv',
  'kubeletUrl',
  'tokenPath',
  'caPath',
  'skipKubeletVerification',
  'maxPollAttempts',
  'pollInterval',
] as const;

/** Longest `watchPollInterval`: a day (fs.watch does the prompt work; the poll only catches what it missed). */
const MAX_WATCH_POLL_SECONDS = 86400;

/** The rotation schedule activates a new CA at 5/6 of the old one's life; SVIDs must fit in the last sixth. */
const SVID_FRACTION_OF_CA = 1 / 6;

/** agent.yaml of either issuer. */
export function parseAnyAgentConfig(
  text: string,
  file: string,
  env: NodeJS.ProcessEnv = process.env,
  flags: AgentFlags = {},
): AnyAgentConfig {
  return parseConfig(
    text,
    file,
    'the agent configuration',
    (r, path) => readTop(r, path, env, flags),
    (f, problems) => new ConfigError(f, problems),
  );
}

export async function loadAnyAgentConfig(
  file: string,
  env: NodeJS.ProcessEnv = process.env,
  flags: AgentFlags = {},
): Promise<AnyAgentConfig> {
  return parseAnyAgentConfig(await readConfigFile(file, AgentErrorCode.Config), file, env, flags);
}

/** agent.yaml of the embedded-CA agent; a file with `issuer: spire` is refused. */
export function parseAgentConfig(
  text: string,
  file: string,
  env: NodeJS.ProcessEnv = process.env,
): AgentConfig {
  const config = parseAnyAgentConfig(text, file, env);
  if (config.issuer === 'spire') {
    throw new ConfigError(file, [
      { line: 1, column: 1, message: 'issuer: spire configures the SPIRE-backed agent, not the embedded CA' },
    ]);
  }
  return config;
}

export async function loadAgentConfig(
  file: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<AgentConfig> {
  return parseAgentConfig(await readConfigFile(file, AgentErrorCode.Config), file, env);
}

function readTop(
  r: YamlReader,
  path: (value: string | undefined) => string | undefined,
  env: NodeJS.ProcessEnv,
  flags: AgentFlags,
): AnyAgentConfig | undefined {
  const root = r.map(r.doc.contents as Node | null, 0, 'the agent configuration');
  if (root === undefined) return undefined;
  const f = r.fields(root, TOP, 'the agent configuration');
  const str = (field: Field | undefined, what: string): string | undefined => fieldString(r, field, what);

  const trustDomain = readTrustDomain(r, root, f.get('trustDomain'));
  const issuerField = f.get('issuer');
  const issuer = readIssuer(r, issuerField);
  const spireField = f.get('spire');
  let spire: SpireSettings | undefined;
  if (issuer === 'spire') {
    if (spireField === undefined) {
      r.report(
        issuerField?.keyOffset ?? 0,
        'issuer: spire needs a spire section (serverAddress, bootstrapBundle, nodeAttestor)',
      );
    } else spire = readSpire(r, spireField, path, flags.joinToken);
    for (const [key, why] of CA_ONLY_KEYS) {
      const field = f.get(key);
      if (field) r.report(field.keyOffset, `${key} does not apply with issuer: spire: ${why}`);
    }
  } else if (spireField !== undefined) {
    r.report(
      spireField.keyOffset,
      'a spire section needs issuer: spire (the embedded CA is the issuer otherwise)',
    );
  } else if (flags.joinToken !== undefined) {
    r.report(
      issuerField?.keyOffset ?? 0,
      '--join-token is for issuer: spire (a join token attests to a SPIRE server)',
    );
  }
  const entriesField = f.get('entriesFile');
  if (entriesField === undefined && issuer !== 'spire')
    r.report(r.offsetOf(root, 0), 'missing required key "entriesFile"');
  const entriesFile = path(str(entriesField, 'entriesFile'));
  const socketPath = path(str(f.get('socketPath'), 'socketPath')) ?? DEFAULT_AGENT_SOCKET;
  const stateDir = path(str(f.get('stateDir'), 'stateDir (a directory path)')) ?? DEFAULT_STATE_DIR;

  let socketMode: number | undefined;
  const modeField = f.get('socketMode');
  const modeText = str(modeField, 'socketMode (an octal string such as "0777")');
  if (modeField && modeText !== undefined) {
    if (/^0?[0-7]{3}$/.test(modeText)) socketMode = Number.parseInt(modeText, 8);
    else
      r.report(
        modeField.valueOffset,
        `socketMode "${modeText}" is not an octal mode such as "0777" or "0660"`,
      );
  }

  let watchPollMs: number | undefined;
  const pollField = f.get('watchPollInterval');
  const pollSeconds = pollField && r.duration(pollField.value, pollField.valueOffset, 'watchPollInterval', 1);
  if (pollField && pollSeconds !== undefined) {
    if (pollSeconds > MAX_WATCH_POLL_SECONDS) {
      r.report(pollField.valueOffset, 'watchPollInterval must be at most 24h');
    } else {
      watchPollMs = pollSeconds * 1000;
    }
  }

  const logLevel = readLogLevel(r, f.get('logLevel'));

  const keyType = (field: Field | undefined, what: string): KeyType | undefined => {
    const value = str(field, what);
    if (field === undefined || value === undefined) return undefined;
    if (isKeyType(value)) return value;
    r.report(field.valueOffset, `${what} "${value}" is not one of ${KEY_TYPES.join(', ')}`);
    return undefined;
  };
  const sub = (field: Field | undefined, what: string): YAMLMap | undefined => fieldMap(r, field, what);

  // ca
  let ca: AgentConfig['ca'] = {};
  let caTtlOffset = 0;
  const caMap = sub(f.get('ca'), 'ca');
  if (caMap) {
    const c = r.fields(caMap, CA, 'ca');
    const ttlField = c.get('ttl');
    caTtlOffset = ttlField?.valueOffset ?? r.offsetOf(caMap, 0);
    const ttlSeconds = ttlField && r.duration(ttlField.value, ttlField.valueOffset, 'ca.ttl', 6);
    let upstream: { certFile: string; keyFile: string; bundleFile?: string } | undefined;
    const upMap = sub(c.get('upstream'), 'ca.upstream');
    if (upMap) {
      const u = r.fields(upMap, UPSTREAM, 'ca.upstream');
      const certFile = path(str(u.get('certFile'), 'ca.upstream.certFile'));
      const keyFile = path(str(u.get('keyFile'), 'ca.upstream.keyFile'));
      const bundleFile = path(str(u.get('bundleFile'), 'ca.upstream.bundleFile'));
      if (certFile === undefined || keyFile === undefined) {
        r.report(r.offsetOf(upMap, 0), 'ca.upstream needs both certFile and keyFile');
      } else {
        upstream = { certFile, keyFile, ...(bundleFile ? { bundleFile } : {}) };
      }
    }
    const kt = keyType(c.get('keyType'), 'ca.keyType');
    ca = {
      ...(kt ? { keyType: kt } : {}),
      ...(ttlSeconds ? { ttlSeconds } : {}),
      ...(upstream ? { upstream } : {}),
    };
  }

  // svid
  let svid: AgentConfig['svid'] = {};
  const caTtl = ca.ttlSeconds ?? DEFAULT_CA_TTL_SECONDS;
  const svidMap = sub(f.get('svid'), 'svid');
  let x509TtlGiven = false;
  if (svidMap) {
    const s = r.fields(svidMap, SVID, 'svid');
    if (issuer === 'spire') {
      for (const key of SERVER_DECIDES_SVID_KEYS) {
        const field = s.get(key);
        if (field)
          r.report(
            field.keyOffset,
            `svid.${key} does not apply with issuer: spire: the SPIRE server decides it (the entry's ttl, or its default)`,
          );
      }
    }
    const x = s.get('x509Ttl');
    x509TtlGiven = x !== undefined;
    const j = s.get('jwtTtl');
    const jit = s.get('rotationJitter');
    const x509TtlSeconds = x && r.duration(x.value, x.valueOffset, 'svid.x509Ttl', 1);
    const jwtTtlSeconds = j && r.duration(j.value, j.valueOffset, 'svid.jwtTtl', 1);
    const rotationJitter = jit && r.number(jit.value, jit.valueOffset, 'svid.rotationJitter', 0, 0.5);
    const kt = keyType(s.get('keyType'), 'svid.keyType');
    if (x && x509TtlSeconds !== undefined && x509TtlSeconds > caTtl * SVID_FRACTION_OF_CA) {
      r.report(
        x.valueOffset,
        `svid.x509Ttl (${x509TtlSeconds}s) exceeds a sixth of ca.ttl (${caTtl}s): SVIDs signed just before a CA ` +
          'rotation would be cut short; raise ca.ttl or lower svid.x509Ttl',
      );
    }
    svid = {
      ...(kt ? { keyType: kt } : {}),
      ...(x509TtlSeconds ? { x509TtlSeconds } : {}),
      ...(jwtTtlSeconds ? { jwtTtlSeconds } : {}),
      ...(rotationJitter !== undefined ? { rotationJitter } : {}),
    };
  }
  // Without svid.x509Ttl the default SVID lifetime applies, and it too must fit in a sixth of ca.ttl.
  if (issuer !== 'spire' && !x509TtlGiven && caTtl * SVID_FRACTION_OF_CA < DEFAULT_X509_SVID_TTL_SECONDS) {
    r.report(caTtlOffset, 'ca.ttl is under 6h: set svid.x509Ttl to at most a sixth of it');
  }

  // attestors
  let unix: UnixAttestorOptions = {};
  let k8s: K8sAttestorOptions | undefined;
  const attMap = sub(f.get('attestors'), 'attestors');
  if (attMap) {
    const a = r.fields(attMap, ATTESTORS, 'attestors');
    const unixMap = sub(a.get('unix'), 'attestors.unix');
    if (unixMap) {
      const u = r.fields(unixMap, UNIX, 'attestors.unix');
      const d = u.get('discoverWorkloadPath');
      const l = u.get('workloadSizeLimit');
      const discover = d && r.boolean(d.value, d.valueOffset, 'attestors.unix.discoverWorkloadPath');
      const limit = l && r.number(l.value, l.valueOffset, 'attestors.unix.workloadSizeLimit', 0);
      unix = {
        ...(discover !== undefined ? { discoverWorkloadPath: discover } : {}),
        ...(limit !== undefined ? { workloadSizeLimit: limit } : {}),
      };
    }
    const k8sField = a.get('k8s');
    const k8sMap = sub(k8sField, 'attestors.k8s');
    if (k8sField && k8sMap) {
      const k = r.fields(k8sMap, K8S, 'attestors.k8s');
      let nodeName = str(k.get('nodeName'), 'attestors.k8s.nodeName');
      const envField = k.get('nodeNameEnv');
      const envName = str(envField, 'attestors.k8s.nodeNameEnv');
      if (envField && envName !== undefined) {
        nodeName = env[envName];
        if (!nodeName)
          r.report(
            envField.valueOffset,
            `environment variable ${envName} (attestors.k8s.nodeNameEnv) is not set`,
          );
      }
      if (k.get('nodeName') === undefined && envField === undefined) {
        r.report(
          k8sField.keyOffset,
          'attestors.k8s needs nodeName, or nodeNameEnv naming a variable that holds it',
        );
      }
      const skip = k.get('skipKubeletVerification');
      const polls = k.get('maxPollAttempts');
      const interval = k.get('pollInterval');
      const skipValue =
        skip && r.boolean(skip.value, skip.valueOffset, 'attestors.k8s.skipKubeletVerification');
      const pollsValue =
        polls && r.number(polls.value, polls.valueOffset, 'attestors.k8s.maxPollAttempts', 1, 1000);
      const intervalSeconds =
        interval && r.duration(interval.value, interval.valueOffset, 'attestors.k8s.pollInterval');
      const kubeletUrl = str(k.get('kubeletUrl'), 'attestors.k8s.kubeletUrl');
      const tokenPath = path(str(k.get('tokenPath'), 'attestors.k8s.tokenPath'));
      const caPath = path(str(k.get('caPath'), 'attestors.k8s.caPath'));
      if (nodeName) {
        k8s = {
          nodeName,
          ...(kubeletUrl ? { kubeletUrl } : {}),
          ...(tokenPath ? { tokenPath } : {}),
          ...(caPath ? { caPath } : {}),
          ...(skipValue !== undefined ? { skipKubeletVerification: skipValue } : {}),
          ...(pollsValue !== undefined ? { maxPollAttempts: pollsValue } : {}),
          ...(intervalSeconds !== undefined ? { pollIntervalMs: intervalSeconds * 1000 } : {}),
        };
      }
    }
  }

  // federation
  let federation: FederationSettings | undefined;
  const fedMap = sub(f.get('federation'), 'federation');
  if (fedMap) federation = readFederation(r, fedMap, path, trustDomain);
  const federatedBundles = federation?.bundleFiles ?? new Map<string, string>();

  // admin
  let admin: HostPort | undefined;
  const adminField = f.get('admin');
  const adminMap = sub(adminField, 'admin');
  if (adminField && adminMap) {
    const listenField = r.fields(adminMap, ADMIN, 'admin').get('listen');
    const text = str(listenField, 'admin.listen');
    if (listenField === undefined)
      r.report(adminField.keyOffset, 'admin needs "listen" (e.g. 127.0.0.1:9464)');
    else if (text !== undefined) {
      const parsed = parseHostPort(text);
      if (typeof parsed === 'string') r.report(listenField.valueOffset, `admin.listen: ${parsed}`);
      else admin = parsed;
    }
  }
  const endpointPort = federation?.bundleEndpoint?.listen.port;
  if (admin && endpointPort !== undefined && endpointPort !== 0 && admin.port === endpointPort) {
    r.report(
      r.offsetOf(root, 0),
      `admin.listen and federation.bundleEndpoint.listen use the same port ${admin.port}`,
    );
  }

  if (issuer === 'spire') {
    if (trustDomain === undefined || spire === undefined) return undefined;
    return {
      issuer: 'spire',
      trustDomain,
      socketPath,
      ...(socketMode !== undefined ? { socketMode } : {}),
      stateDir,
      logLevel,
      spire,
      ...(svid.keyType ? { svid: { keyType: svid.keyType } } : {}),
      attestors: { unix, ...(k8s ? { k8s } : {}) },
      ...(admin ? { admin } : {}),
    };
  }
  if (trustDomain === undefined || entriesFile === undefined || issuer === undefined) return undefined;
  return {
    trustDomain,
    socketPath,
    ...(socketMode !== undefined ? { socketMode } : {}),
    entriesFile,
    stateDir,
    ...(watchPollMs !== undefined ? { watchPollMs } : {}),
    logLevel,
    ca,
    svid,
    attestors: { unix, ...(k8s ? { k8s } : {}) },
    ...(federatedBundles.size > 0 ? { federatedBundles } : {}),
    ...(federation && (federation.bundleEndpoint || federation.relationships.length > 0)
      ? {
          federation: {
            ...(federation.bundleEndpoint ? { bundleEndpoint: federation.bundleEndpoint } : {}),
            relationships: federation.relationships,
          },
        }
      : {}),
    ...(admin ? { admin } : {}),
  };
}
