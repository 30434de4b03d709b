/**
 * A real SPIRE server (v1.13.3, the `spire-server` peer of dev/peers/peers.ts) on loopback, for tests: its own
 * CA with its keys on disk (KeyManager "disk") and a sqlite datastore, both in the given directory, the server API
 * on a free loopback port (SPIRE refuses port 0), the admin API on a UNIX socket, the join_token node attestor
 * (and k8s_psat on request), optionally a bundle endpoint (https_spiffe or https_web) and federation
 * relationships. Every helper drives SPIRE's own CLI against that socket, so what a test sees is what an operator
 * would. `pause`/`resume` (or `restart`) stop the process and bring it back on the same ports with the same
 * datastore, keys and so CA, as after an operator's restart.
 *
 *   const server = await startSpireServer({ binary: peer('spire-server').path, trustDomain: 'hub.test', dir });
 *   await server.bundleShow();              // the trust domain's SPIFFE bundle (JWK Set)
 *   await server.rotateX509Authority();     // localauthority x509 prepare + activate
 *   const token = await server.createJoinToken();
 *   await server.restart();
 *   await server.stop();
 *
 * Facts of SPIRE 1.13.3 this relies on (from its source):
 * - `bind_port` must not be 0, and the bundle endpoint port is fixed by configuration, so free ports are picked
 *   here first; a lost race (`address already in use`) restarts the server on new ports.
 * - the sqlite datastore exists only in a cgo build (the peer is built with CGO_ENABLED=1).
 * - `serving_cert_file` of the https_web profile fails to parse without `file_sync_interval`, so it is always set.
 * - With KeyManager "memory" every start makes a new CA; "disk" keeps the keys in a JSON file, and the datastore
 *   keeps the CA journal naming them, so a restart goes on with the same authorities and agents stay valid.
 * - Agents' authorized entries (GetAuthorizedEntries, BatchNewX509SVID, NewJWTSVID) come from a cache the server
 *   reloads every 5 s (`experimental.cache_reload_interval`): an entry created by the CLI reaches agents after up
 *   to that long.
 * - AttestAgent and RenewAgent are rate limited to 1 a second per client IP (`ratelimit.attestation`); the
 *   server makes a caller wait rather than refuse.
 * - Go's crypto/x509 reads SSL_CERT_FILE on Linux: pass it in `extraEnv` so that SPIRE's https_web fetcher trusts
 *   a test Web-PKI root. The https_spiffe fetcher instead trusts the bundle SPIRE holds for the endpoint SPIFFE
 *   ID's trust domain (set it first with `bundleSet`, or `federation create -trustDomainBundlePath`).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/** The profile this server's own bundle endpoint serves with. */
export type BundleEndpointProfile =
  | { readonly profile: 'https_spiffe' }
  | {
      readonly profile: 'https_web';
      /** PEM certificate chain (leaf first) and its key, e.g. from dev/certs.ts; SPIRE rereads them. */
      readonly certFile: string;
      readonly keyFile: string;
      /** How often SPIRE rereads the files (`file_sync_interval`); default 1h. */
      readonly fileSyncInterval?: string;
    };

/** A federation relationship: where to fetch a foreign trust domain's bundle, and how to authenticate it. */
export type FederationRelationship = { readonly trustDomain: string; readonly url: string } & (
  | { readonly profile: 'https_web' }
  | {
      readonly profile: 'https_spiffe';
      /** SPIFFE ID the endpoint must present; its trust domain's bundle must already be known to SPIRE. */
      readonly endpointSpiffeId: string;
    }
);

export interface SpireServerOptions {
  /** Path of the built peer: `peer('spire-server')`. */
  readonly binary: string;
  /** E.g. `hub.test` (a `spiffe://` prefix is accepted). */
  readonly trustDomain: string;
  /** A directory for config, data and log; it must exist. Kept after stop (the caller removes it). */
  readonly dir: string;
  /** `ca_ttl`; SPIRE's default 24h. SPIRE prepares the next authority by itself at half of it. */
  readonly caTtl?: string;
  /** `default_x509_svid_ttl`; SPIRE's default 1h. */
  readonly x509SvidTtl?: string;
  /** `default_jwt_svid_ttl`; SPIRE's default 5m. */
  readonly jwtSvidTtl?: string;
  /** Serve this trust domain's bundle on 127.0.0.1 at a free port, at `/`. */
  readonly bundleEndpoint?: BundleEndpointProfile & {
    /** `refresh_hint` advertised in the served bundle; SPIRE's default 5m. */
    readonly refreshHint?: string;
  };
  /** `federates_with` blocks of the configuration file (relationships known before start). */
  readonly federatesWith?: readonly FederationRelationship[];
  /** Added to this process's environment, e.g. `{ SSL_CERT_FILE }` for the https_web fetcher. */
  readonly extraEnv?: NodeJS.ProcessEnv;
  /** `log_level`; default DEBUG, which logs every bundle fetch. */
  readonly logLevel?: 'DEBUG' | 'INFO' | 'WARN' | 'ERROR';
  /** How long to wait for `healthcheck` to pass; default 30 s. */
  readonly startTimeoutMs?: number;
  /**
   * `experimental.cache_reload_interval` (SPIRE's default 5s): how soon agents see entry changes. Setting it makes
   * the server log that experimental features are on.
   */
  readonly cacheReloadInterval?: string;
  /** Node attestors besides join_token (always configured). */
  readonly nodeAttestors?: {
    /** `NodeAttestor "k8s_psat"`, keyed by cluster name (the `cluster` of the agent's attestation data). */
    readonly k8sPsat?: {
      readonly clusters: Readonly<
        Record<
          string,
          {
            /** `namespace:name` of the agents' service accounts. */
            readonly serviceAccountAllowList: readonly string[];
            /** A kubeconfig for that cluster's API server (TokenReview, pods and nodes get). */
            readonly kubeConfigFile: string;
            /** The token audiences accepted; SPIRE's default is `["spire-server"]`. */
            readonly audience?: readonly string[];
          }
        >
      >;
    };
  };
}

/** What `createEntry` registers (`entry create`); a workload entry unless `parentId` is the server's ID. */
export interface EntrySpec {
  readonly spiffeId: string;
  readonly parentId: string;
  /** `type:value`, e.g. `unix:uid:1000`, at least one. */
  readonly selectors: readonly string[];
  /** Seconds. */
  readonly x509SvidTtl?: number;
  /** Seconds. */
  readonly jwtSvidTtl?: number;
  /** Trust domains (names or `spiffe://` IDs); SPIRE must already hold a bundle for each. */
  readonly federatesWith?: readonly string[];
  readonly dnsNames?: readonly string[];
  readonly hint?: string;
}

/** A failed CLI run: its exit code and both outputs. */
export class SpireCliError extends Error {
  override name = 'SpireCliError';
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;

  constructor(args: readonly string[], code: number | null, stdout: string, stderr: string) {
    super(
      `spire-server ${args.join(' ')} exited with ${code}: ${(stderr.trim() || stdout.trim()).slice(0, 2000)}`,
    );
    this.code = code;
    this.stdout = stdout;
    this.stderr = stderr;
  }
}

/** The state of an authority as `localauthority {x509,jwt} show -output json` reports it. */
export interface AuthorityState {
  readonly authorityId: string;
  /** Unix seconds. */
  readonly expiresAt: number;
}

export interface LocalAuthorities {
  readonly active?: AuthorityState;
  readonly prepared?: AuthorityState;
  readonly old?: AuthorityState;
}

export interface SpireServer {
  readonly trustDomain: string;
  /** `spiffe://<td>/spire/server`: the ID of the server's own SVID, which the https_spiffe endpoint presents. */
  readonly serverSpiffeId: string;
  /** The admin API socket, passed as `-socketPath` to every CLI command. */
  readonly socketPath: string;
  /** The server API (agents, node attestation) on 127.0.0.1. */
  readonly serverPort: number;
  /** `https://127.0.0.1:<port>` when a bundle endpoint is configured. */
  readonly bundleEndpointUrl?: string;
  readonly bundleEndpointPort?: number;
  readonly configFile: string;
  readonly logFile: string;
  /**
   * Runs `spire-server <args> -socketPath <socket>`. `args` are the subcommand words and their flags (SPIRE's CLI
   * takes no positional arguments after the subcommand, so the socket flag goes last). Rejects with a
   * SpireCliError on a non-zero exit.
   */
  cli(args: readonly string[], options?: { stdin?: string }): Promise<{ stdout: string; stderr: string }>;
  /** `bundle show -format spiffe|pem`: this trust domain's bundle, as a JWK Set (default) or PEM roots. */
  bundleShow(format?: 'spiffe' | 'pem'): Promise<string>;
  /** `bundle set -id spiffe://<td> -format spiffe|pem` (data on stdin): creates or replaces a federated bundle. */
  bundleSet(trustDomain: string, data: string, format?: 'spiffe' | 'pem'): Promise<void>;
  /** `bundle list -id spiffe://<td> -format …`: a federated bundle, or undefined when SPIRE has none. */
  federatedBundle(trustDomain: string, format?: 'spiffe' | 'pem'): Promise<string | undefined>;
  /** `bundle delete -id spiffe://<td> -mode restrict`. */
  bundleDelete(trustDomain: string): Promise<void>;
  /**
   * `federation create` at run time (stored in the datastore, unlike `federatesWith`), optionally with the
   * foreign trust domain's bundle (`-trustDomainBundlePath`, the https_spiffe bootstrap).
   */
  createFederation(
    relationship: FederationRelationship & { bundle?: string; bundleFormat?: 'spiffe' | 'pem' },
  ): Promise<void>;
  /** `federation refresh -id spiffe://<td>`: fetch now; rejects with the fetch error if it fails. */
  refreshFederation(trustDomain: string): Promise<void>;
  /** `x509 mint -spiffeID … [-ttl …] -write <tmp>`: an X509-SVID signed by the active authority. */
  mintX509(spiffeId: string, ttl?: string): Promise<{ certPem: string; keyPem: string; bundlePem: string }>;
  /** `jwt mint -spiffeID … -audience … [-ttl …]`: a JWT-SVID signed by the active JWT authority. */
  mintJwt(spiffeId: string, audience: readonly string[], ttl?: string): Promise<string>;
  /** `localauthority x509 show`. */
  x509Authorities(): Promise<LocalAuthorities>;
  /** `localauthority jwt show`. */
  jwtAuthorities(): Promise<LocalAuthorities>;
  /**
   * `localauthority x509 prepare`, then `localauthority x509 activate -authorityID <prepared>`: the new root
   * joins the bundle (sequence + 1) at prepare and signs from activation; the old root stays in the bundle.
   * Returns the new authority's ID (the subject key ID of its certificate, hex).
   */
  rotateX509Authority(): Promise<string>;
  /** The same for the JWT authority (`localauthority jwt prepare|activate`); returns the new key ID. */
  rotateJwtAuthority(): Promise<string>;
  /**
   * `localauthority x509 taint -authorityID <id>`: marks the old X.509 authority (one a rotation replaced)
   * tainted in the bundle, telling agents to move their SVIDs off it. SPIRE refuses to taint the active one.
   */
  taintX509Authority(authorityId: string): Promise<void>;
  /**
   * `token generate -output json [-spiffeID …] [-ttl …]`: a join token (one use). With `spiffeId`, SPIRE also
   * registers that ID for the agent that attests with it. `ttlSeconds` defaults to SPIRE's 600.
   */
  createJoinToken(spiffeId?: string, ttlSeconds?: number): Promise<string>;
  /** `entry create … -output json`: the new entry's ID. */
  createEntry(entry: EntrySpec): Promise<string>;
  /** `entry delete -entryID …`. */
  deleteEntry(id: string): Promise<void>;
  /** `agent ban -spiffeID …`: the agent's calls are refused from now on, and it cannot attest again. */
  banAgent(spiffeId: string): Promise<void>;
  /** `agent evict -spiffeID …`: the attested agent is forgotten; it may attest again. */
  evictAgent(spiffeId: string): Promise<void>;
  /** The last lines of the server's log. */
  logTail(lines?: number): string;
  /**
   * Stops the server's process (as `stop`) but keeps everything else: `resume` brings it back on the same ports,
   * with the same datastore and keys.
   */
  pause(): Promise<void>;
  /** Starts the server again after `pause`, resolving when healthy. */
  resume(): Promise<void>;
  /** `pause` then `resume`. */
  restart(): Promise<void>;
  /** SIGTERM to the server's process group (SIGKILL after 10 s); resolves when it has exited. */
  stop(): Promise<void>;
}

/** sun_path is 108 bytes on Linux, terminating NUL included. */
const MAX_SOCKET_PATH = 107;
const CLI_TIMEOUT_MS = 30_000;

function trustDomainName(input: string): string {
  const name = input.startsWith('spiffe://') ? input.slice('spiffe://'.length).split('/')[0] : input;
  if (name === undefined || name === '' || name.includes('/'))
    throw new Error(`not a trust domain: ${input}`);
  return name;
}

const hcl = (value: string): string => JSON.stringify(value);

/** Free loopback TCP ports, held open together so that they differ, then released. */
async function freePorts(count: number): Promise<number[]> {
  const servers: Server[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const server = createServer();
      servers.push(server);
      server.listen(0, '127.0.0.1');
      await once(server, 'listening');
    }
    return servers.map((s) => {
      const address = s.address();
      if (address === null || typeof address === 'string') throw new Error('no TCP address');
      return address.port;
    });
  } finally {
    await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  }
}

function federatesWithBlock(r: FederationRelationship): string {
  const profile =
    r.profile === 'https_web'
      ? '      bundle_endpoint_profile "https_web" {}'
      : `      bundle_endpoint_profile "https_spiffe" {\n        endpoint_spiffe_id = ${hcl(r.endpointSpiffeId)}\n      }`;
  return [
    `    federates_with ${hcl(trustDomainName(r.trustDomain))} {`,
    `      bundle_endpoint_url = ${hcl(r.url)}`,
    profile,
    '    }',
  ].join('\n');
}

function bundleEndpointBlock(e: NonNullable<SpireServerOptions['bundleEndpoint']>, port: number): string {
  const profile =
    e.profile === 'https_spiffe'
      ? '      profile "https_spiffe" {}'
      : [
          '      profile "https_web" {',
          '        serving_cert_file {',
          `          cert_file_path = ${hcl(e.certFile)}`,
          `          key_file_path = ${hcl(e.keyFile)}`,
          `          file_sync_interval = ${hcl(e.fileSyncInterval ?? '1h')}`,
          '        }',
          '      }',
        ].join('\n');
  return [
    '    bundle_endpoint {',
    '      address = "127.0.0.1"',
    `      port = ${port}`,
    ...(e.refreshHint === undefined ? [] : [`      refresh_hint = ${hcl(e.refreshHint)}`]),
    profile,
    '    }',
  ].join('\n');
}

/** The configuration file (HCL). Exported for tests of the harness and for reading. */
export function serverConfig(
  o: SpireServerOptions,
  paths: { dataDir: string; socketPath: string },
  ports: { server: number; bundleEndpoint?: number },
): string {
  const optional = (key: string, value: string | undefined): string[] =>
    value === undefined ? [] : [`  ${key} = ${hcl(value)}`];
  const federation: string[] = [];
  if (o.bundleEndpoint !== undefined || (o.federatesWith ?? []).length > 0) {
    federation.push('  federation {');
    if (o.bundleEndpoint !== undefined) {
      if (ports.bundleEndpoint === undefined) throw new Error('bundle endpoint without a port');
      federation.push(bundleEndpointBlock(o.bundleEndpoint, ports.bundleEndpoint));
    }
    for (const r of o.federatesWith ?? []) federation.push(federatesWithBlock(r));
    federation.push('  }');
  }
  const k8sPsat = o.nodeAttestors?.k8sPsat;
  const nodeAttestors =
    k8sPsat === undefined
      ? []
      : [
          '  NodeAttestor "k8s_psat" {',
          '    plugin_data {',
          '      clusters = {',
          ...Object.entries(k8sPsat.clusters).flatMap(([name, c]) => [
            `        ${hcl(name)} = {`,
            `          service_account_allow_list = [${c.serviceAccountAllowList.map(hcl).join(', ')}]`,
            `          kube_config_file = ${hcl(c.kubeConfigFile)}`,
            ...(c.audience === undefined ? [] : [`          audience = [${c.audience.map(hcl).join(', ')}]`]),
            '        }',
          ]),
          '      }',
          '    }',
          '  }',
        ];
  return `${[
    'server {',
    '  bind_address = "127.0.0.1"',
    `  bind_port = "${ports.server}"`,
    `  socket_path = ${hcl(paths.socketPath)}`,
    `  trust_domain = ${hcl(trustDomainName(o.trustDomain))}`,
    `  data_dir = ${hcl(paths.dataDir)}`,
    `  log_level = ${hcl(o.logLevel ?? 'DEBUG')}`,
    ...optional('ca_ttl', o.caTtl),
    ...optional('default_x509_svid_ttl', o.x509SvidTtl),
    ...optional('default_jwt_svid_ttl', o.jwtSvidTtl),
    ...federation,
    ...(o.cacheReloadInterval === undefined
      ? []
      : ['  experimental {', `    cache_reload_interval = ${hcl(o.cacheReloadInterval)}`, '  }']),
    '}',
    '',
    'plugins {',
    '  DataStore "sql" {',
    '    plugin_data {',
    '      database_type = "sqlite3"',
    `      connection_string = ${hcl(join(paths.dataDir, 'datastore.sqlite3'))}`,
    '    }',
    '  }',
    '  KeyManager "disk" {',
    '    plugin_data {',
    `      keys_path = ${hcl(join(paths.dataDir, 'keys.json'))}`,
    '    }',
    '  }',
    '  NodeAttestor "join_token" {',
    '    plugin_data {}',
    '  }',
    ...nodeAttestors,
    '}',
  ].join('\n')}\n`;
}

function tail(file: string, lines = 40): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

function run(
  binary: string,
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  stdin?: string,
): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(binary, args, { env, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), CLI_TIMEOUT_MS);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve({ stdout, stderr });
      else reject(new SpireCliError(args, code, stdout, stderr));
    });
    // A command that does not read its input may exit first: EPIPE then is no error of ours.
    child.stdin.on('error', () => undefined);
    child.stdin.end(stdin ?? '');
  });
}

interface AuthorityStateJson {
  authority_id?: string;
  expires_at?: string | number;
}

function authorityState(json: AuthorityStateJson | null | undefined): AuthorityState | undefined {
  if (json === null || json === undefined || !json.authority_id) return undefined;
  return { authorityId: json.authority_id, expiresAt: Number(json.expires_at ?? 0) };
}

function isNotFound(err: unknown): boolean {
  return err instanceof SpireCliError && /code = NotFound/.test(`${err.stderr}\n${err.stdout}`);
}

/**
 * Starts the server and resolves once `spire-server healthcheck` passes. On failure the process group is
 * killed and the error carries the tail of the server's log.
 */
export async function startSpireServer(o: SpireServerOptions): Promise<SpireServer> {
  const trustDomain = trustDomainName(o.trustDomain);
  const dataDir = join(o.dir, 'data');
  mkdirSync(dataDir, { recursive: true });
  let socketDir: string | undefined;
  let socketPath = join(o.dir, 'api.sock');
  if (Buffer.byteLength(socketPath) > MAX_SOCKET_PATH) {
    socketDir = mkdtempSync('/tmp/spire-');
    socketPath = join(socketDir, 'api.sock');
  }
  const configFile = join(o.dir, 'server.conf');
  const logFile = join(o.dir, 'spire-server.log');
  const env: NodeJS.ProcessEnv = { ...process.env, ...o.extraEnv };
  const timeoutMs = o.startTimeoutMs ?? 30_000;

  const health = (): Promise<boolean> =>
    run(o.binary, ['healthcheck', '-socketPath', socketPath], env).then(
      () => true,
      () => false,
    );

  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let ports: { server: number; bundleEndpoint?: number } = { server: 0 };
  const killGroup = (signal: NodeJS.Signals): void => {
    if (child?.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
    try {
      process.kill(-child.pid, signal);
    } catch {
      // already gone
    }
  };
  // If the test process dies without stop(), the detached server must not outlive it.
  const onExit = (): void => killGroup('SIGKILL');
  process.once('exit', onExit);

  const stopChild = async (): Promise<void> => {
    if (child !== undefined && child.exitCode === null && child.signalCode === null) {
      killGroup('SIGTERM');
      const timer = setTimeout(() => killGroup('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
  };
  const cleanup = async (): Promise<void> => {
    await stopChild();
    process.removeListener('exit', onExit);
    if (socketDir !== undefined) rmSync(socketDir, { recursive: true, force: true });
  };

  /**
   * Spawns the server with the configuration file as it is and waits until it is healthy. Resolves to undefined
   * then, or to why it did not start (the process stopped, the log's tail kept in `log`).
   */
  const launch = async (logFlags: 'w' | 'a'): Promise<{ reason: string; log: string } | undefined> => {
    const logFd = openSync(logFile, logFlags);
    let running: ChildProcess;
    try {
      running = spawn(o.binary, ['run', '-config', configFile], {
        cwd: o.dir,
        env,
        detached: true,
        stdio: ['ignore', logFd, logFd],
      });
    } finally {
      closeSync(logFd);
    }
    child = running;
    let hasExited = false;
    exited = new Promise<void>((resolve) => {
      running.once('exit', () => {
        hasExited = true;
        resolve();
      });
      running.once('error', () => {
        hasExited = true;
        resolve();
      });
    });

    const deadline = Date.now() + timeoutMs;
    while (!hasExited && Date.now() < deadline) {
      if (await health()) return undefined;
      await sleep(200);
    }
    const log = tail(logFile);
    await stopChild();
    return {
      reason: hasExited
        ? `exited (${running.exitCode ?? running.signalCode})`
        : `was not healthy after ${timeoutMs} ms`,
      log,
    };
  };

  for (let attempt = 1; ; attempt++) {
    const [server, bundleEndpoint] = await freePorts(o.bundleEndpoint === undefined ? 1 : 2);
    if (server === undefined) throw new Error('no free port');
    ports = bundleEndpoint === undefined ? { server } : { server, bundleEndpoint };
    writeFileSync(configFile, serverConfig(o, { dataDir, socketPath }, ports));
    // A fresh datastore and keys each attempt: a failed start may have written a CA journal.
    rmSync(dataDir, { recursive: true, force: true });
    mkdirSync(dataDir, { recursive: true });
    const failed = await launch('w');
    if (failed === undefined) break;
    if (/address already in use/.test(failed.log) && attempt < 3) continue;
    await cleanup();
    throw new Error(
      `spire-server for ${trustDomain} ${failed.reason} during startup; config ${configFile}; log tail:\n${failed.log}`,
    );
  }

  const socketArgs = ['-socketPath', socketPath];
  const cli = (args: readonly string[], options: { stdin?: string } = {}) =>
    run(o.binary, [...args, ...socketArgs], env, options.stdin);
  const id = (td: string): string => `spiffe://${trustDomainName(td)}`;

  const authorities = async (kind: 'x509' | 'jwt'): Promise<LocalAuthorities> => {
    const { stdout } = await cli(['localauthority', kind, 'show', '-output', 'json']);
    const json = JSON.parse(stdout) as Record<string, AuthorityStateJson | null>;
    const result: { active?: AuthorityState; prepared?: AuthorityState; old?: AuthorityState } = {};
    const active = authorityState(json.active);
    const prepared = authorityState(json.prepared);
    const old = authorityState(json.old);
    if (active !== undefined) result.active = active;
    if (prepared !== undefined) result.prepared = prepared;
    if (old !== undefined) result.old = old;
    return result;
  };

  const rotate = async (kind: 'x509' | 'jwt'): Promise<string> => {
    const { stdout } = await cli(['localauthority', kind, 'prepare', '-output', 'json']);
    const prepared = authorityState(
      (JSON.parse(stdout) as { prepared_authority?: AuthorityStateJson }).prepared_authority,
    );
    if (prepared === undefined)
      throw new Error(`localauthority ${kind} prepare returned no authority: ${stdout}`);
    await cli(['localauthority', kind, 'activate', '-authorityID', prepared.authorityId, '-output', 'json']);
    return prepared.authorityId;
  };

  const bundleEndpointPort = ports.bundleEndpoint;
  let stopped: Promise<void> | undefined;

  const pause = async (): Promise<void> => {
    if (stopped !== undefined) throw new Error('spire-server was stopped');
    await stopChild();
  };
  const resume = async (): Promise<void> => {
    if (stopped !== undefined) throw new Error('spire-server was stopped');
    if (child !== undefined && child.exitCode === null && child.signalCode === null)
      throw new Error('spire-server is running: pause it first');
    // The same configuration file, so the same ports; the datastore and keys are kept.
    const failed = await launch('a');
    if (failed !== undefined) {
      throw new Error(
        `spire-server for ${trustDomain} ${failed.reason} when started again; config ${configFile}; log tail:\n${failed.log}`,
      );
    }
  };

  return {
    trustDomain,
    serverSpiffeId: `spiffe://${trustDomain}/spire/server`,
    socketPath,
    serverPort: ports.server,
    ...(bundleEndpointPort === undefined
      ? {}
      : { bundleEndpointPort, bundleEndpointUrl: `https://127.0.0.1:${bundleEndpointPort}` }),
    configFile,
    logFile,
    cli,

    async bundleShow(format = 'spiffe') {
      return (await cli(['bundle', 'show', '-format', format])).stdout;
    },

    async bundleSet(td, data, format = 'spiffe') {
      await cli(['bundle', 'set', '-id', id(td), '-format', format], { stdin: data });
    },

    async federatedBundle(td, format = 'spiffe') {
      try {
        return (await cli(['bundle', 'list', '-id', id(td), '-format', format])).stdout;
      } catch (err) {
        if (isNotFound(err)) return undefined;
        throw err;
      }
    },

    async bundleDelete(td) {
      await cli(['bundle', 'delete', '-id', id(td), '-mode', 'restrict']);
    },

    async createFederation(r) {
      const args = [
        'federation',
        'create',
        '-trustDomain',
        trustDomainName(r.trustDomain),
        '-bundleEndpointURL',
        r.url,
        '-bundleEndpointProfile',
        r.profile,
        ...(r.profile === 'https_spiffe' ? ['-endpointSpiffeID', r.endpointSpiffeId] : []),
      ];
      if (r.bundle === undefined) {
        await cli(args);
        return;
      }
      const scratch = mkdtempSync(join(o.dir, 'federation-'));
      try {
        const path = join(scratch, 'bundle');
        writeFileSync(path, r.bundle);
        await cli([
          ...args,
          '-trustDomainBundlePath',
          path,
          '-trustDomainBundleFormat',
          r.bundleFormat ?? 'spiffe',
        ]);
      } finally {
        rmSync(scratch, { recursive: true, force: true });
      }
    },

    async refreshFederation(td) {
      await cli(['federation', 'refresh', '-id', id(td)]);
    },

    async mintX509(spiffeId, ttl) {
      const out = mkdtempSync(join(o.dir, 'mint-'));
      try {
        await cli(['x509', 'mint', '-spiffeID', spiffeId, ...(ttl ? ['-ttl', ttl] : []), '-write', out]);
        return {
          certPem: readFileSync(join(out, 'svid.pem'), 'utf8'),
          keyPem: readFileSync(join(out, 'key.pem'), 'utf8'),
          bundlePem: readFileSync(join(out, 'bundle.pem'), 'utf8'),
        };
      } finally {
        rmSync(out, { recursive: true, force: true });
      }
    },

    async mintJwt(spiffeId, audience, ttl) {
      const { stdout } = await cli([
        'jwt',
        'mint',
        '-spiffeID',
        spiffeId,
        ...audience.flatMap((a) => ['-audience', a]),
        ...(ttl ? ['-ttl', ttl] : []),
      ]);
      return stdout.trim();
    },

    x509Authorities: () => authorities('x509'),
    jwtAuthorities: () => authorities('jwt'),
    rotateX509Authority: () => rotate('x509'),
    taintX509Authority: async (authorityId: string) => {
      await cli(['localauthority', 'x509', 'taint', '-authorityID', authorityId, '-output', 'json']);
    },
    rotateJwtAuthority: () => rotate('jwt'),
    async createJoinToken(spiffeId, ttlSeconds) {
      const { stdout } = await cli([
        'token',
        'generate',
        '-output',
        'json',
        ...(spiffeId === undefined ? [] : ['-spiffeID', spiffeId]),
        ...(ttlSeconds === undefined ? [] : ['-ttl', String(ttlSeconds)]),
      ]);
      const value = (JSON.parse(stdout) as { value?: string }).value;
      if (!value) throw new Error(`token generate returned no token: ${stdout}`);
      return value;
    },

    async createEntry(e) {
      const { stdout } = await cli([
        'entry',
        'create',
        '-output',
        'json',
        '-spiffeID',
        e.spiffeId,
        '-parentID',
        e.parentId,
        ...e.selectors.flatMap((s) => ['-selector', s]),
        ...(e.x509SvidTtl === undefined ? [] : ['-x509SVIDTTL', String(e.x509SvidTtl)]),
        ...(e.jwtSvidTtl === undefined ? [] : ['-jwtSVIDTTL', String(e.jwtSvidTtl)]),
        ...(e.federatesWith ?? []).flatMap((td) => ['-federatesWith', id(td)]),
        ...(e.dnsNames ?? []).flatMap((d) => ['-dns', d]),
        ...(e.hint === undefined ? [] : ['-hint', e.hint]),
      ]);
      const result = (
        JSON.parse(stdout) as {
          results?: { status?: { code?: number; message?: string }; entry?: { id?: string } }[];
        }
      ).results?.[0];
      if (!result?.entry?.id || (result.status?.code ?? 0) !== 0)
        throw new Error(`entry create did not create the entry: ${stdout}`);
      return result.entry.id;
    },

    async deleteEntry(entryId) {
      await cli(['entry', 'delete', '-entryID', entryId]);
    },

    async banAgent(spiffeId) {
      await cli(['agent', 'ban', '-spiffeID', spiffeId]);
    },

    async evictAgent(spiffeId) {
      await cli(['agent', 'evict', '-spiffeID', spiffeId]);
    },

    logTail: (lines) => tail(logFile, lines),
    pause,
    resume,
    async restart() {
      await pause();
      await resume();
    },

    stop() {
      stopped ??= cleanup();
      return stopped;
    },
  };
}
