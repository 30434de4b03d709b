/**
 * A real Kubernetes control plane on loopback for end-to-end tests: etcd v3.6.5 and kube-apiserver v1.33.13,
 * built from their published Go modules into the peer cache (dev/peers/peers.ts) on first use.
 *
 *   node dev/controlplane.ts [dir]     start one, print its URL and kubeconfigs, stop on Ctrl-C
 *
 * No kubelet, scheduler or controller-manager runs, so: pods stay Pending, service accounts get no `default`
 * account or tokens (the ServiceAccount admission plugin is off so pods can still be created), and a deleted
 * namespace stays Terminating. Use fresh names instead of deleting. dev/node.ts starts one with `node` set and
 * adds those, a kubelet and containerd: a real single-node cluster.
 *
 * Every start is a fresh cluster: new PKI, new tokens, empty etcd. Everything lives in `dir` (a new temporary
 * directory unless given): certificates, the token file, kubeconfigs, etcd's data and each child's log
 * (`etcd.log`, `kube-apiserver.log`). A temporary directory is removed by close(); one you name is left, logs
 * included. A failed start leaves the directory too, and its error names it.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes, webcrypto } from 'node:crypto';
import { createWriteStream, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { createServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { generateKeyPair, randomSerial, x509 } from '../src/agent/keys.ts';
import { PeerUnavailableError, peer } from './peers/peers.ts';

/** User name behind `adminToken` (group system:masters). */
export const ADMIN_USER = 'ksp-admin';
/** User name behind `proxyToken` (no group beyond system:authenticated; tests grant it RBAC). */
export const PROXY_USER = 'kube-svid-proxy';
/** kube-apiserver's client certificate towards kubelets (with `node`), in group system:masters. */
export const KUBELET_CLIENT_USER = 'kube-apiserver-kubelet-client';

export type ControlPlaneUser = 'admin' | 'proxy';

export interface ControlPlaneOptions {
  /** Working directory (created if missing); default a new temporary directory, removed on close(). */
  readonly dir?: string;
  /** Receives every line etcd and kube-apiserver print, prefixed `[etcd] ` / `[kube-apiserver] `. */
  readonly logger?: (line: string) => void;
  /** How long to wait for the API server to become ready; default 120 s (a cold start can be slow). */
  readonly readyTimeoutMs?: number;
  /**
   * Set up for a kubelet (dev/node.ts), node `name`: authorization Node,RBAC, the ServiceAccount and
   * NodeRestriction admission plugins, a client certificate for kube-apiserver's calls to kubelets (exec, logs,
   * port-forward; user KUBELET_CLIENT_USER in system:masters), and kubelets' serving certificates checked
   * against the cluster CA. Without it: RBAC alone, no ServiceAccount admission (no controller-manager creates
   * the accounts), no kubelet.
   */
  readonly node?: { readonly name: string };
}

/** What ControlPlane.issue() signs with the cluster CA. */
export interface CertificateRequest {
  /** Subject CN: the user name of a client certificate. */
  readonly commonName: string;
  /** Subject O: the groups of a client certificate. */
  readonly organizations?: readonly string[];
  readonly usage: 'client' | 'server';
  /** Subject alternative names of a server certificate. */
  readonly dnsNames?: readonly string[];
  readonly ipAddresses?: readonly string[];
  /** Default 30 days. */
  readonly validityMs?: number;
}

export interface IssuedCertificate {
  readonly certPem: string;
  /** PKCS#8 PEM. */
  readonly keyPem: string;
}

export interface ControlPlane {
  /** https://127.0.0.1:<port> */
  readonly url: string;
  /** The CA that signed the API server's serving certificate (PEM). */
  readonly caPem: string;
  /** Static bearer token of ADMIN_USER, in group system:masters: for test setup. */
  readonly adminToken: string;
  /** Static bearer token of PROXY_USER, with no groups: RBAC for impersonation is the tests' to grant. */
  readonly proxyToken: string;
  readonly dir: string;
  /**
   * Files in `dir`: the cluster CA's certificate and key (what a controller-manager signs CSRs with), the
   * service-account signing key and its public key.
   */
  readonly files: {
    readonly ca: string;
    readonly caKey: string;
    readonly serviceAccountKey: string;
    readonly serviceAccountPub: string;
  };
  /** Path of a kubeconfig file (in `dir`) that authenticates as the user with its token. */
  kubeconfig(user: ControlPlaneUser): string;
  /** A new key and a certificate for it signed by the cluster CA (the CA kube-apiserver trusts for clients). */
  issue(request: CertificateRequest): Promise<IssuedCertificate>;
  /** Stops both processes (SIGTERM, then SIGKILL after 5 s). Idempotent. */
  close(): Promise<void>;
}

const STOP_GRACE_MS = 5_000;
const TAIL_LINES = 40;
const SERVICE_CIDR = '10.0.0.0/24';
/** The first address of SERVICE_CIDR: the ClusterIP of the `kubernetes` service. */
const SERVICE_IP = '10.0.0.1';

const EC_P256: webcrypto.EcKeyGenParams = { name: 'ECDSA', namedCurve: 'P-256' };
const ES256: webcrypto.EcdsaParams = { name: 'ECDSA', hash: 'SHA-256' };
const DAY = 86_400_000;

/** A child process whose output goes to a log file, an optional logger, and a short in-memory tail. */
export class Child {
  readonly name: string;
  readonly process: ChildProcess;
  readonly logFile: string;
  readonly exited: Promise<void>;
  /** How it ended; undefined while it runs. */
  private exitDescription: string | undefined;
  private readonly tail: string[] = [];

  constructor(
    name: string,
    binary: string,
    args: readonly string[],
    dir: string,
    logger: ((line: string) => void) | undefined,
    env?: NodeJS.ProcessEnv,
  ) {
    this.name = name;
    this.logFile = join(dir, `${name}.log`);
    const log = createWriteStream(this.logFile);
    log.write(`$ ${binary} ${args.join(' ')}\n`);
    this.process = spawn(binary, args, {
      cwd: dir,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: env ?? process.env,
    });
    let pending = 2;
    const onLine = (line: string): void => {
      log.write(`${line}\n`);
      this.tail.push(line);
      if (this.tail.length > TAIL_LINES) this.tail.shift();
      logger?.(`[${name}] ${line}`);
    };
    const streamsDone = new Promise<void>((resolve) => {
      for (const stream of [this.process.stdout, this.process.stderr]) {
        if (stream === null) {
          pending -= 1;
          continue;
        }
        const lines = createInterface({ input: stream, crlfDelay: Number.POSITIVE_INFINITY });
        lines.on('line', onLine);
        lines.on('close', () => {
          pending -= 1;
          if (pending === 0) resolve();
        });
      }
      if (pending === 0) resolve();
    });
    const closed = new Promise<void>((resolve) => {
      this.process.on('error', (err) => {
        this.exitDescription = `could not start: ${err.message}`;
        resolve();
      });
      this.process.on('exit', (code, signal) => {
        this.exitDescription = signal === null ? `exited with code ${code}` : `was killed by ${signal}`;
        resolve();
      });
    });
    this.exited = closed.then(() => streamsDone).then(() => new Promise<void>((resolve) => log.end(resolve)));
    const { pid } = this.process;
    if (pid !== undefined) {
      const watchdog = startWatchdog(pid);
      void this.exited.then(() => watchdog.kill('SIGKILL'));
    }
  }

  get running(): boolean {
    return this.exitDescription === undefined;
  }

  /** Why it stopped, with its last lines of output. */
  failure(): Error {
    return new Error(
      `${this.name} ${this.exitDescription ?? 'is running'}; its last lines (all in ${this.logFile}):\n` +
        this.tail.map((line) => `  ${line}`).join('\n'),
    );
  }

  /** SIGTERM, then SIGKILL after `graceMs` (default 5 s); resolves once it has exited and its output is written. */
  async stop(graceMs = STOP_GRACE_MS): Promise<void> {
    if (!this.running) return this.exited;
    this.process.kill('SIGTERM');
    const timer = setTimeout(() => this.process.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  /** For the process 'exit' hook: nothing asynchronous may happen there. */
  killNow(): void {
    if (this.running) this.process.kill('SIGKILL');
  }
}

/**
 * A shell that SIGKILLs `pid` once its stdin closes, which happens however this process ends (even by
 * SIGKILL), so that a killed test run leaves no etcd or kube-apiserver behind. Does not keep Node alive.
 */
function startWatchdog(pid: number): ChildProcess {
  const dog = spawn(
    '/bin/sh',
    ['-c', 'read -r _ignored; kill -KILL "$1" 2>/dev/null', 'ksp-watchdog', `${pid}`],
    {
      stdio: ['pipe', 'ignore', 'ignore'],
    },
  );
  dog.on('error', () => {});
  if (dog.stdin instanceof Socket) dog.stdin.unref();
  dog.unref();
  return dog;
}

const live = new Set<Child>();
let exitHookInstalled = false;

/** SIGKILLs the child when this process exits, however it exits. */
export function track(child: Child): void {
  live.add(child);
  void child.exited.then(() => live.delete(child));
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const c of live) c.killNow();
  });
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => (port > 0 ? resolve(port) : reject(new Error('no port assigned'))));
    });
  });
}

/** Distinct free loopback ports (each found free; nothing else may take them before we do). */
export async function freePorts(count: number): Promise<number[]> {
  const ports = new Set<number>();
  while (ports.size < count) ports.add(await freePort());
  return [...ports];
}

function pem(cert: x509.X509Certificate): string {
  const text = cert.toString('pem').replace(/\r\n/g, '\n');
  return text.endsWith('\n') ? text : `${text}\n`;
}

async function pkcs8Pem(key: webcrypto.CryptoKey): Promise<string> {
  return `${x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', key), 'PRIVATE KEY')}\n`;
}

async function spkiPem(key: webcrypto.CryptoKey): Promise<string> {
  return `${x509.PemConverter.encode(await webcrypto.subtle.exportKey('spki', key), 'PUBLIC KEY')}\n`;
}

interface Pki {
  readonly caPem: string;
  readonly caKeyPem: string;
  readonly servingCertPem: string;
  readonly servingKeyPem: string;
  readonly saPrivatePem: string;
  readonly saPublicPem: string;
  issue(request: CertificateRequest): Promise<IssuedCertificate>;
}

async function makePki(): Promise<Pki> {
  const now = Date.now();
  const caKeys = await generateKeyPair('ec-p256');
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: 'CN=kube-svid-proxy e2e control plane CA',
    notBefore: new Date(now - DAY),
    notAfter: new Date(now + 30 * DAY),
    keys: caKeys,
    signingAlgorithm: ES256,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(caKeys.publicKey),
    ],
  });
  const issue = async (request: CertificateRequest): Promise<IssuedCertificate> => {
    const keys = await generateKeyPair('ec-p256');
    const start = Date.now();
    const names: x509.JsonGeneralName[] = [
      ...(request.dnsNames ?? []).map((value): x509.JsonGeneralName => ({ type: 'dns', value })),
      ...(request.ipAddresses ?? []).map((value): x509.JsonGeneralName => ({ type: 'ip', value })),
    ];
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: randomSerial(),
      subject: new x509.Name([
        ...(request.organizations ?? []).map((o) => ({ O: [o] })),
        { CN: [request.commonName] },
      ]),
      issuer: ca.subjectName,
      notBefore: new Date(start - DAY),
      notAfter: new Date(start + (request.validityMs ?? 30 * DAY)),
      publicKey: keys.publicKey,
      signingKey: caKeys.privateKey,
      signingAlgorithm: ES256,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([
          request.usage === 'server' ? x509.ExtendedKeyUsage.serverAuth : x509.ExtendedKeyUsage.clientAuth,
        ]),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
        await x509.AuthorityKeyIdentifierExtension.create(caKeys.publicKey),
        ...(names.length === 0 ? [] : [new x509.SubjectAlternativeNameExtension(names)]),
      ],
    });
    return { certPem: pem(cert), keyPem: await pkcs8Pem(keys.privateKey) };
  };
  const serving = await issue({
    commonName: 'kube-apiserver',
    usage: 'server',
    dnsNames: [
      'localhost',
      'kubernetes',
      'kubernetes.default',
      'kubernetes.default.svc',
      'kubernetes.default.svc.cluster.local',
    ],
    ipAddresses: ['127.0.0.1', SERVICE_IP],
  });
  const saKeys = (await webcrypto.subtle.generateKey(EC_P256, true, [
    'sign',
    'verify',
  ])) as webcrypto.CryptoKeyPair;
  return {
    caPem: pem(ca),
    caKeyPem: await pkcs8Pem(caKeys.privateKey),
    servingCertPem: serving.certPem,
    servingKeyPem: serving.keyPem,
    saPrivatePem: await pkcs8Pem(saKeys.privateKey),
    saPublicPem: await spkiPem(saKeys.publicKey),
    issue,
  };
}

function kubeconfigJson(url: string, caPem: string, user: string, token: string): string {
  // JSON is YAML, and kubectl reads either.
  return `${JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [
        {
          name: 'e2e',
          cluster: { server: url, 'certificate-authority-data': Buffer.from(caPem).toString('base64') },
        },
      ],
      users: [{ name: user, user: { token } }],
      contexts: [{ name: user, context: { cluster: 'e2e', user, namespace: 'default' } }],
      'current-context': user,
    },
    null,
    2,
  )}\n`;
}

export interface Response {
  readonly status: number;
  readonly body: string;
}

/** A GET with a 5 s timeout; `insecure` skips the server certificate check (health of a self-signed endpoint). */
export function get(
  url: string,
  options: { token?: string; caPem?: string; insecure?: boolean } = {},
): Promise<Response> {
  return new Promise((resolve, reject) => {
    const target = new URL(url);
    const headers = options.token === undefined ? {} : { authorization: `Bearer ${options.token}` };
    const req = (target.protocol === 'https:' ? httpsRequest : httpRequest)(
      target,
      {
        method: 'GET',
        headers,
        ca: options.caPem,
        timeout: 5_000,
        ...(options.insecure === true && { rejectUnauthorized: false }),
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          body += chunk;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`GET ${url} timed out`)));
    req.on('error', reject);
    req.end();
  });
}

/**
 * Polls until `ready` holds, failing early if any child stops and late after `timeoutMs`, with the last
 * answer (or error) in the message.
 */
export async function waitFor(
  what: string,
  children: readonly Child[],
  timeoutMs: number,
  probe: () => Promise<boolean | string>,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = 'no answer yet';
  for (;;) {
    for (const child of children) if (!child.running) throw child.failure();
    try {
      const result = await probe();
      if (result === true) return;
      if (typeof result === 'string') last = result;
    } catch (err) {
      last = err instanceof Error ? err.message : String(err);
    }
    for (const child of children) if (!child.running) throw child.failure();
    if (Date.now() > deadline) throw new Error(`${what} not ready after ${timeoutMs} ms; last: ${last}`);
    await sleep(250);
  }
}

function binary(name: 'etcd' | 'kube-apiserver'): string {
  const found = peer(name);
  if ('skip' in found) throw new PeerUnavailableError(found.skip);
  return found.path;
}

/** Starts etcd and kube-apiserver on free loopback ports and waits until the API is ready. */
export async function startControlPlane(options: ControlPlaneOptions = {}): Promise<ControlPlane> {
  const etcdBinary = binary('etcd');
  const apiserverBinary = binary('kube-apiserver');
  const ownDir = options.dir === undefined;
  const dir = options.dir ?? mkdtempSync(join(tmpdir(), 'ksp-controlplane-'));
  mkdirSync(dir, { recursive: true });
  const etcdData = join(dir, 'etcd-data');
  rmSync(etcdData, { recursive: true, force: true });

  const [etcdPort, etcdPeerPort, apiPort] = await freePorts(3);
  const url = `https://127.0.0.1:${apiPort}`;
  const etcdUrl = `http://127.0.0.1:${etcdPort}`;
  const etcdPeerUrl = `http://127.0.0.1:${etcdPeerPort}`;

  const pki = await makePki();
  const adminToken = randomBytes(32).toString('base64url');
  const proxyToken = randomBytes(32).toString('base64url');
  const file = (name: string, content: string, mode = 0o600): string => {
    const path = join(dir, name);
    writeFileSync(path, content, { mode });
    return path;
  };
  const caFile = file('ca.crt', pki.caPem, 0o644);
  const caKeyFile = file('ca.key', pki.caKeyPem);
  const certFile = file('apiserver.crt', pki.servingCertPem, 0o644);
  const keyFile = file('apiserver.key', pki.servingKeyPem);
  const saKeyFile = file('service-account.key', pki.saPrivatePem);
  const saPubFile = file('service-account.pub', pki.saPublicPem, 0o644);
  // token,user,uid,"group1,group2"
  const tokenFile = file(
    'tokens.csv',
    `${adminToken},${ADMIN_USER},${ADMIN_USER},"system:masters"\n${proxyToken},${PROXY_USER},${PROXY_USER}\n`,
  );
  // Authorization and admission: RBAC alone without a node; with one, also what its kubelet needs.
  let nodeArgs = ['--authorization-mode=RBAC', '--disable-admission-plugins=ServiceAccount'];
  if (options.node !== undefined) {
    const client = await pki.issue({
      commonName: KUBELET_CLIENT_USER,
      organizations: ['system:masters'],
      usage: 'client',
    });
    nodeArgs = [
      // Node: a kubelet may read and write only what its own pods need; RBAC for everyone else.
      '--authorization-mode=Node,RBAC',
      '--enable-admission-plugins=NodeRestriction',
      // For exec, attach, logs and port-forward, which kube-apiserver forwards to the kubelet.
      `--kubelet-client-certificate=${file('apiserver-kubelet-client.crt', client.certPem, 0o644)}`,
      `--kubelet-client-key=${file('apiserver-kubelet-client.key', client.keyPem)}`,
      // The kubelets' serving certificates are signed by the cluster CA (dev/node.ts writes them).
      `--kubelet-certificate-authority=${caFile}`,
    ];
  }
  const kubeconfigs: Record<ControlPlaneUser, string> = {
    admin: file('kubeconfig-admin.json', kubeconfigJson(url, pki.caPem, ADMIN_USER, adminToken)),
    proxy: file('kubeconfig-proxy.json', kubeconfigJson(url, pki.caPem, PROXY_USER, proxyToken)),
  };

  const children: Child[] = [];
  const stopAll = async (): Promise<void> => {
    // The API server first, so it does not spend its last seconds complaining about etcd.
    for (const child of [...children].reverse()) await child.stop();
  };
  try {
    const etcd = new Child(
      'etcd',
      etcdBinary,
      [
        '--name=default',
        `--data-dir=${etcdData}`,
        `--listen-client-urls=${etcdUrl}`,
        `--advertise-client-urls=${etcdUrl}`,
        `--listen-peer-urls=${etcdPeerUrl}`,
        `--initial-advertise-peer-urls=${etcdPeerUrl}`,
        `--initial-cluster=default=${etcdPeerUrl}`,
        '--unsafe-no-fsync',
      ],
      dir,
      options.logger,
    );
    children.push(etcd);
    track(etcd);
    await waitFor('etcd', children, 30_000, async () => {
      const res = await get(`${etcdUrl}/health`);
      return res.status === 200 && res.body.includes('"health":"true"') ? true : `${res.status} ${res.body}`;
    });

    const apiserver = new Child(
      'kube-apiserver',
      apiserverBinary,
      [
        `--etcd-servers=${etcdUrl}`,
        '--bind-address=127.0.0.1',
        '--advertise-address=127.0.0.1',
        `--secure-port=${apiPort}`,
        `--cert-dir=${join(dir, 'apiserver-certs')}`,
        `--tls-cert-file=${certFile}`,
        `--tls-private-key-file=${keyFile}`,
        `--client-ca-file=${caFile}`,
        `--token-auth-file=${tokenFile}`,
        `--service-account-key-file=${saPubFile}`,
        `--service-account-signing-key-file=${saKeyFile}`,
        '--service-account-issuer=https://kubernetes.default.svc',
        `--service-cluster-ip-range=${SERVICE_CIDR}`,
        ...nodeArgs,
        '--allow-privileged=true',
        '--profiling=false',
        // The `kubernetes` service would get 127.0.0.1 as its endpoint, which validation rejects every 10 s.
        '--endpoint-reconciler-type=none',
      ],
      dir,
      options.logger,
    );
    children.push(apiserver);
    track(apiserver);
    const timeoutMs = options.readyTimeoutMs ?? 120_000;
    const started = Date.now();
    await waitFor('kube-apiserver', children, timeoutMs, async () => {
      const res = await get(`${url}/readyz`, { token: adminToken, caPem: pki.caPem });
      return res.status === 200
        ? true
        : `/readyz ${res.status}: ${res.body.trim().split('\n').slice(-3).join(' ')}`;
    });
    // /readyz covers RBAC's bootstrap policy, not the namespaces the bootstrap controllers create.
    for (const ns of ['default', 'kube-system']) {
      await waitFor(
        `namespace ${ns}`,
        children,
        Math.max(10_000, timeoutMs - (Date.now() - started)),
        async () => {
          const res = await get(`${url}/api/v1/namespaces/${ns}`, { token: adminToken, caPem: pki.caPem });
          return res.status === 200 ? true : `${res.status}`;
        },
      );
    }
  } catch (err) {
    await stopAll();
    const reason = err instanceof Error ? err.message : String(err);
    throw new Error(`control plane failed to start (files and logs kept in ${dir}): ${reason}`, {
      cause: err,
    });
  }

  let closing: Promise<void> | undefined;
  return {
    url,
    caPem: pki.caPem,
    adminToken,
    proxyToken,
    dir,
    files: { ca: caFile, caKey: caKeyFile, serviceAccountKey: saKeyFile, serviceAccountPub: saPubFile },
    kubeconfig: (user) => kubeconfigs[user],
    issue: (request) => pki.issue(request),
    close: () => {
      closing ??= stopAll().then(() => {
        if (ownDir) rmSync(dir, { recursive: true, force: true });
      });
      return closing;
    },
  };
}

if (import.meta.main) {
  const started = Date.now();
  const cp = await startControlPlane({ dir: process.argv[2] });
  process.stdout.write(
    `control plane ready in ${((Date.now() - started) / 1000).toFixed(1)} s at ${cp.url}\n` +
      `  admin: kubectl --kubeconfig ${cp.kubeconfig('admin')} get ns\n` +
      `  proxy: kubectl --kubeconfig ${cp.kubeconfig('proxy')} auth whoami\n` +
      `  files and logs: ${cp.dir}\n` +
      'Ctrl-C stops it.\n',
  );
  const stop = (): void => {
    void cp.close().then(() => process.exit(0));
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

/**
 * What the proxy's user needs in this cluster: impersonate the users, groups and service accounts it forwards
 * (and the `spiffe.io/id` extra, which RBAC names exactly: `userextras/*` would not match), and create
 * SubjectAccessReviews for nested impersonation. Real deployments generate a tighter one with `policy rbac`.
 */
export function proxyRbac(): Record<string, unknown>[] {
  return [
    {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'ClusterRole',
      metadata: { name: 'kube-svid-proxy' },
      rules: [
        { apiGroups: [''], resources: ['users', 'groups', 'serviceaccounts'], verbs: ['impersonate'] },
        {
          apiGroups: ['authentication.k8s.io'],
          resources: ['userextras/spiffe.io/id'],
          verbs: ['impersonate'],
        },
        { apiGroups: ['authorization.k8s.io'], resources: ['subjectaccessreviews'], verbs: ['create'] },
      ],
    },
    {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'ClusterRoleBinding',
      metadata: { name: 'kube-svid-proxy' },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'kube-svid-proxy' },
      subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: PROXY_USER }],
    },
  ];
}
