/**
 * The complete local stack that `npm start` runs: the bundled agent with its CA, a real kube-apiserver and etcd
 * (built from their Go modules on first use, see dev/peers), and the proxy in front of kube-apiserver. It writes
 * a kubeconfig whose only credential is `kube-svid-proxy credential`, an exec plugin that fetches an X.509-SVID
 * from the agent each time kubectl asks: nothing secret is stored.
 *
 *   npm start            (node scripts/local-stack.ts)
 *   KUBECONFIG=<printed path> kubectl get ns
 */
import { execFile } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { stringify } from 'yaml';
import { type ControlPlane, proxyRbac, startControlPlane } from '../dev/controlplane.ts';
import { WorkloadAgent } from '../src/agent/agent.ts';
import { createLogger, type Logger } from '../src/observability/logger.ts';
import { parseProxyConfig } from '../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../src/proxy/proxy.ts';
import { TrustDomain } from '../src/spiffe/id.ts';

const run = promisify(execFile);
const CLI = join(import.meta.dirname, '..', 'src', 'cli', 'main.ts');
export const LOCAL_TRUST_DOMAIN = 'spoke.example.org';
export const LOCAL_CLIENT_ID = `spiffe://${LOCAL_TRUST_DOMAIN}/local/kubectl`;
/** The Kubernetes user the local client's SPIFFE ID maps to. */
export const LOCAL_USER = 'local-developer';

export interface LocalStack {
  readonly dir: string;
  /** The kubeconfig for kubectl: the proxy as server, the exec credential plugin as user. */
  readonly kubeconfig: string;
  readonly proxyUrl: string;
  readonly adminUrl: string;
  close(): Promise<void>;
}

/** Read-only access everywhere for the local developer, and what the proxy itself needs. */
function rbac(): string {
  const objects = [
    ...proxyRbac(),
    {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'ClusterRole',
      metadata: { name: LOCAL_USER },
      rules: [{ apiGroups: ['*'], resources: ['*'], verbs: ['get', 'list', 'watch'] }],
    },
    {
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'ClusterRoleBinding',
      metadata: { name: LOCAL_USER },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: LOCAL_USER },
      subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: LOCAL_USER }],
    },
  ];
  return objects.map((o) => stringify(o)).join('---\n');
}

/**
 * The agent's socket: in the caller's directory when one is given (tests keep everything together), else under
 * /run as in the sample configuration (root: /run, others: their runtime directory /run/user/<uid>), never in a
 * shared directory such as /tmp, which the agent refuses. Without a runtime directory, in the state directory.
 */
function localSocketPath(given: string | undefined, stateDir: string): string {
  if (given !== undefined) return join(given, 'agent', 'agent.sock');
  const runtime = process.getuid?.() === 0 ? '/run' : process.env.XDG_RUNTIME_DIR;
  return join(runtime || stateDir, 'kube-svid-proxy-local', 'agent.sock');
}

export async function startLocalStack(
  options: { dir?: string; logger?: Logger; port?: number } = {},
): Promise<LocalStack> {
  const dir =
    options.dir ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'kube-svid-proxy', 'local');
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const log = options.logger ?? createLogger({ level: 'info', name: 'kube-svid-proxy-local' });
  const closers: (() => Promise<unknown> | unknown)[] = [];
  const close = async (): Promise<void> => {
    for (const c of closers.splice(0).reverse()) await c();
  };
  try {
    const uid = process.getuid?.() ?? 0;
    const entries = join(dir, 'entries.yaml');
    writeFileSync(
      entries,
      stringify({
        entries: [
          {
            spiffeId: `spiffe://${LOCAL_TRUST_DOMAIN}/kube-svid-proxy`,
            selectors: [`unix:uid:${uid}`],
            dnsNames: ['localhost'],
            hint: 'proxy',
          },
          { spiffeId: LOCAL_CLIENT_ID, selectors: [`unix:uid:${uid}`], hint: 'client' },
        ],
      }),
    );
    const socketPath = localSocketPath(options.dir, dir);
    const agent = await WorkloadAgent.start({
      trustDomain: TrustDomain.parse(LOCAL_TRUST_DOMAIN),
      socketPath,
      entriesFile: entries,
      // Kept between runs, as in production: the second `npm start` resumes the same CA.
      stateDir: join(dir, 'agent-state'),
      logger: log.child({ component: 'agent' }),
    });
    closers.push(() => agent.close());

    log.info('starting etcd and kube-apiserver (the first run builds them from their Go modules: minutes)');
    const cp: ControlPlane = await startControlPlane({ dir: join(dir, 'control-plane') });
    closers.push(() => cp.close());
    const rbacFile = join(dir, 'rbac.yaml');
    writeFileSync(rbacFile, rbac());
    await run('kubectl', [`--kubeconfig=${cp.kubeconfig('admin')}`, 'apply', '-f', rbacFile]);

    writeFileSync(join(dir, 'apiserver-ca.pem'), cp.caPem);
    writeFileSync(join(dir, 'proxy-token'), `${cp.proxyToken}\n`, { mode: 0o600 });
    writeFileSync(
      join(dir, 'policy.yaml'),
      stringify({
        rules: [
          {
            name: 'local-kubectl',
            match: { id: LOCAL_CLIENT_ID },
            identity: { user: LOCAL_USER, extra: { 'spiffe.io/id': ['{id}'] } },
          },
        ],
      }),
    );
    const proxy: RunningProxy = await startProxy(
      parseProxyConfig(
        stringify({
          trustDomain: LOCAL_TRUST_DOMAIN,
          listen: `127.0.0.1:${options.port ?? 0}`,
          admin: { listen: '127.0.0.1:0' },
          policyFile: 'policy.yaml',
          identity: { workloadApi: { socket: `unix://${socketPath}`, hint: 'proxy' } },
          upstream: { url: cp.url, caFile: 'apiserver-ca.pem', tokenFile: 'proxy-token' },
        }),
        join(dir, 'proxy.yaml'),
      ),
      { logger: log.child({ component: 'proxy' }) },
    );
    closers.push(() => proxy.close());

    const caFile = join(dir, 'spoke-ca.pem');
    writeFileSync(caFile, agent.ca.bundle.x509Authorities.map((c) => c.toString()).join(''));
    const proxyUrl = `https://localhost:${proxy.port}`;
    const { stdout } = await run(process.execPath, [
      CLI,
      'credential',
      'kubeconfig',
      '--server',
      proxyUrl,
      '--socket',
      `unix://${socketPath}`,
      '--hint',
      'client',
      '--ca-file',
      caFile,
      '--name',
      'kube-svid-proxy-local',
    ]);
    const kubeconfig = join(dir, 'kubeconfig');
    writeFileSync(kubeconfig, stdout);
    return {
      dir,
      kubeconfig,
      proxyUrl,
      adminUrl: `http://127.0.0.1:${proxy.admin.address.port}`,
      close,
    };
  } catch (err) {
    await close();
    throw err;
  }
}

if (import.meta.main) {
  const log = createLogger({ level: 'info', name: 'kube-svid-proxy-local' });
  const stack = await startLocalStack({ logger: log });
  process.stdout.write(
    `\nkube-svid-proxy local stack is up: agent, kube-apiserver, and the proxy at ${stack.proxyUrl}\n\n` +
      `  export KUBECONFIG=${stack.kubeconfig}\n` +
      '  kubectl get ns\n\n' +
      `kubectl authenticates with a fresh SVID from the agent on every run (no stored credential).\n` +
      `Readiness and metrics: ${stack.adminUrl}/readyz, ${stack.adminUrl}/metrics. Ctrl-C stops everything.\n`,
  );
  const stop = async (): Promise<void> => {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    await stack.close();
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}
