/**
 * End to end on the GitOps client side: real Flux controllers (source-controller and kustomize-controller, built
 * from their Go modules by dev/peers) run against a hub control plane and reconcile a spoke control plane through
 * our proxy, with no stored long-lived credential:
 *
 *   (a) through the client mode: the Kustomization's kubeconfig Secret says http://127.0.0.1:PORT and holds no
 *       credential; the client mode presents its SVID to the spoke proxy;
 *   (b) through a Secret the credential writer keeps filled with its current SVID and the spoke's bundle.
 *
 * SVIDs live two minutes here (rotated at half-life), and the run spans at least three rotations of each: every
 * reconcile forced meanwhile must succeed. The objects appear in the spoke as the mapped Kubernetes users (the
 * proxy's audit and a SelfSubjectReview say so, with spiffe.io/id); a policy edit removing the client mode's
 * rule makes the next reconcile fail with the 403 Flux reports. For Argo CD, Argo's own v3 code turns the cluster
 * Secret forms docs/operator/gitops.md documents into a client (dev/peers/argocd), against both paths.
 *
 * The hub's objects are the shipped ones: deploy/hub/gitops/examples, the writer's writer.yaml and rbac.yaml, the
 * sidecars' client.yaml, with this run's addresses in place of the documented ones.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { parseAllDocuments, parse as parseYaml, stringify } from 'yaml';
import { type ControlPlane, proxyRbac, startControlPlane } from '../../dev/controlplane.ts';
import { type Flux, startFlux } from '../../dev/flux.ts';
import { commitFiles, initRepo, startGitServer } from '../../dev/git-server.ts';
import { peer } from '../../dev/peers/peers.ts';
import { e2eSkip } from '../../dev/skip.ts';
import { type RunningClient, startClient } from '../../src/client/client.ts';
import { parseClientConfig } from '../../src/client/config.ts';
import { createLogger } from '../../src/observability/logger.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { type RunningProxy, startProxy } from '../../src/proxy/proxy.ts';
import { parseWriterConfig } from '../../src/writer/config.ts';
import { type RunningWriter, startWriter } from '../../src/writer/writer.ts';
import { startTestAgent, type TestAgent, TRUST_DOMAIN } from '../helpers/agent.ts';
import { memoryAudit } from '../helpers/proxy-fixture.ts';

const run = promisify(execFile);
const GITOPS = join(import.meta.dirname, '..', '..', 'deploy', 'hub', 'gitops');

/** The objects of deploy/hub/gitops/examples/FILE, with this run's addresses in place of the documented ones. */
// biome-ignore lint/suspicious/noExplicitAny: Kubernetes objects, checked by kube-apiserver.
function example(file: string, replace: Record<string, string>): any[] {
  let text = readFileSync(join(GITOPS, 'examples', file), 'utf8');
  for (const [from, to] of Object.entries(replace)) {
    assert.ok(text.includes(from), `${file} no longer says ${from}`);
    text = text.replaceAll(from, to);
  }
  return parseAllDocuments(text).map((d) => d.toJS());
}

async function fluxSkip(): Promise<string | false> {
  const base = await e2eSkip();
  if (base !== false) return base;
  for (const name of ['flux-source-controller', 'flux-kustomize-controller', 'argocd-probe'] as const) {
    const found = peer(name);
    if ('skip' in found) return found.skip;
  }
  return false;
}
const skip = await fluxSkip();

const uid = process.getuid?.() ?? 0;
/** The client mode beside Flux's kustomize-controller, and beside Argo CD's application controller. */
const FLUX_ID = `spiffe://${TRUST_DOMAIN}/ns/flux-system/sa/kustomize-controller`;
const ARGOCD_ID = `spiffe://${TRUST_DOMAIN}/ns/argocd/sa/argocd-application-controller`;
/** The credential writer: its SVID is what the Secrets carry. */
const WRITER_ID = `spiffe://${TRUST_DOMAIN}/ns/kube-svid-proxy/sa/credential-writer`;
const PROXY_ID = `spiffe://${TRUST_DOMAIN}/ns/kube-svid-proxy/sa/kube-svid-proxy`;
const SVID_TTL = '2m';
/** Rotations of each SVID the reconcile loop must span. */
const ROTATIONS = 3;

const POLICY_RULES = {
  flux: `  - name: flux-client-mode
    match: { id: ${FLUX_ID} }
    identity: { user: flux, groups: [gitops], extra: { spiffe.io/id: ["{id}"] } }
`,
  writer: `  - name: credential-writer
    match: { id: ${WRITER_ID} }
    identity: { user: flux-secret, groups: [gitops], extra: { spiffe.io/id: ["{id}"] } }
`,
  argocd: `  - name: argocd-client-mode
    match: { id: ${ARGOCD_ID} }
    identity: { user: argocd, groups: [gitops], extra: { spiffe.io/id: ["{id}"] } }
`,
};

/** The spoke: what the gitops group may do (RBAC decides; the proxy only proves who is asking). */
const SPOKE_RBAC = [
  ...proxyRbac(),
  { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'apps' } },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRole',
    metadata: { name: 'gitops' },
    rules: [
      {
        apiGroups: [''],
        resources: ['configmaps'],
        verbs: ['get', 'list', 'watch', 'create', 'patch', 'update', 'delete'],
      },
      { apiGroups: [''], resources: ['namespaces'], verbs: ['get', 'list'] },
    ],
  },
  {
    apiVersion: 'rbac.authorization.k8s.io/v1',
    kind: 'ClusterRoleBinding',
    metadata: { name: 'gitops' },
    roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'gitops' },
    subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'Group', name: 'gitops' }],
  },
];

interface Condition {
  type: string;
  status: string;
  reason?: string;
  message?: string;
}
interface KustomizationStatus {
  lastHandledReconcileAt?: string;
  lastAppliedRevision?: string;
  conditions?: Condition[];
}

describe('GitOps controllers reach a spoke through the proxy: real Flux, client mode and credential writer', {
  skip,
  timeout: 1_200_000,
}, () => {
  let hub: ControlPlane;
  let spoke: ControlPlane;
  let agent: TestAgent;
  let proxy: RunningProxy;
  let fluxClient: RunningClient;
  let argoClient: RunningClient;
  let writer: RunningWriter;
  let writerYaml: string;
  let flux: Flux;
  let git: Awaited<ReturnType<typeof startGitServer>>;
  let dir: string;
  let policyFile: string;
  const audit = memoryAudit();
  const logs: string[] = [];

  const kubectl = (cp: ControlPlane, ...args: string[]) =>
    run('kubectl', [`--kubeconfig=${cp.kubeconfig('admin')}`, ...args], { maxBuffer: 16 * 1024 * 1024 });
  const applyTo = async (cp: ControlPlane, name: string, objects: readonly unknown[]): Promise<void> => {
    const file = join(dir, name);
    writeFileSync(file, objects.map((o) => stringify(o)).join('---\n'));
    await kubectl(cp, 'apply', '-f', file);
  };
  const kustomization = async (name: string): Promise<KustomizationStatus> => {
    const { stdout } = await kubectl(hub, 'get', 'kustomization', name, '-n', 'flux-system', '-o', 'json');
    return (JSON.parse(stdout) as { status?: KustomizationStatus }).status ?? {};
  };
  const ready = (status: KustomizationStatus): Condition | undefined =>
    status.conditions?.find((c) => c.type === 'Ready');
  /** Asks Flux to reconcile now and waits for that reconcile's outcome. */
  const reconcile = async (name: string): Promise<KustomizationStatus> => {
    const token = new Date().toISOString();
    await kubectl(
      hub,
      'annotate',
      '--overwrite',
      'kustomization',
      name,
      '-n',
      'flux-system',
      `reconcile.fluxcd.io/requestedAt=${token}`,
    );
    for (let i = 0; i < 240; i++) {
      const status = await kustomization(name);
      const condition = ready(status);
      if (
        status.lastHandledReconcileAt === token &&
        condition !== undefined &&
        condition.status !== 'Unknown'
      ) {
        return status;
      }
      await sleep(250);
    }
    throw new Error(
      `${name}: no reconcile outcome for ${token}; status: ${JSON.stringify(await kustomization(name))}`,
    );
  };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'ksp-gitops-'));
    const logger = createLogger({ level: 'info', stream: { write: (line: string) => void logs.push(line) } });
    [hub, spoke] = await Promise.all([startControlPlane(), startControlPlane()]);
    await applyTo(spoke, 'spoke-rbac.yaml', SPOKE_RBAC);

    agent = await startTestAgent(
      `entries:
  - spiffeId: ${PROXY_ID}
    selectors: ["unix:uid:${uid}"]
    hint: proxy
    dnsNames: [localhost]
    x509SvidTtl: ${SVID_TTL}
  - spiffeId: ${FLUX_ID}
    selectors: ["unix:uid:${uid}"]
    hint: flux
    x509SvidTtl: ${SVID_TTL}
  - spiffeId: ${ARGOCD_ID}
    selectors: ["unix:uid:${uid}"]
    hint: argocd
    x509SvidTtl: ${SVID_TTL}
  - spiffeId: ${WRITER_ID}
    selectors: ["unix:uid:${uid}"]
    hint: writer
    x509SvidTtl: ${SVID_TTL}
`,
      { svid: { rotationJitter: 0 } },
    );

    // The spoke proxy, in front of the spoke's kube-apiserver.
    policyFile = join(dir, 'policy.yaml');
    writeFileSync(policyFile, `rules:\n${POLICY_RULES.flux}${POLICY_RULES.writer}${POLICY_RULES.argocd}`);
    writeFileSync(join(dir, 'spoke-ca.pem'), spoke.caPem);
    writeFileSync(join(dir, 'proxy-token'), `${spoke.proxyToken}\n`);
    proxy = await startProxy(
      parseProxyConfig(
        `trustDomain: ${TRUST_DOMAIN}
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
policyFile: policy.yaml
identity: { workloadApi: { socket: ${agent.address}, hint: proxy } }
upstream: { url: "${spoke.url}", caFile: spoke-ca.pem, tokenFile: proxy-token }
readiness: { minSvidRemaining: 1s }
`,
        join(dir, 'proxy.yaml'),
      ),
      { logger, audit: audit.sink, defaultMetrics: false, probeIntervalMs: 60_000, watchPollMs: 500 },
    );
    const spokeUrl = `https://localhost:${proxy.port}`;

    // (a) The client mode, as the sidecar of kustomize-controller (and of Argo CD's controller, for the probe).
    const clientFor = (hint: 'flux' | 'argocd') => {
      // The sidecar's client.yaml as shipped, pointed at this run's agent, proxy and ports.
      const config = parseYaml(readFileSync(join(GITOPS, hint, 'client.yaml'), 'utf8'));
      config.workloadApi = { socket: agent.address, hint };
      config.admin = { listen: '127.0.0.1:0' };
      config.spokes[0] = { ...config.spokes[0], listen: '127.0.0.1:0', server: spokeUrl, serverId: PROXY_ID };
      return startClient(parseClientConfig(stringify(config), join(dir, `client-${hint}.yaml`)), {
        logger,
        defaultMetrics: false,
      });
    };
    fluxClient = await clientFor('flux');
    argoClient = await clientFor('argocd');
    const clientUrl = (client: RunningClient): string =>
      client.listeners[0]?.url ?? assert.fail('no listener');

    // The hub: Flux's namespace and CRDs, the Secrets, the writer's least-privilege RBAC.
    flux = await startFlux({ hub, dir: join(dir, 'flux'), logger: (line) => logs.push(line) });
    await applyTo(hub, 'hub-namespaces.yaml', [
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'argocd' } },
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'kube-svid-proxy' } },
    ]);
    // The Secrets as docs/operator/gitops.md shows them, with this run's addresses, and the writer's RBAC as
    // shipped (get and update on exactly its two Secrets).
    await applyTo(hub, 'hub-gitops.yaml', [
      ...example('flux-client-mode.yaml', { 'http://127.0.0.1:7443': clientUrl(fluxClient) }).filter(
        (o) => o.kind === 'Secret',
      ),
      ...example('flux-writer.yaml', {}).filter((o) => o.kind === 'Secret'),
      ...example('argocd-writer.yaml', { 'https://spoke.example.org:8443': spokeUrl }),
      ...parseAllDocuments(readFileSync(join(GITOPS, 'writer', 'rbac.yaml'), 'utf8')).map((d) => d.toJS()),
    ]);

    // (b) The credential writer, with a service-account token of the hub bound by that RBAC alone.
    const { stdout: token } = await kubectl(
      hub,
      'create',
      'token',
      'credential-writer',
      '-n',
      'kube-svid-proxy',
      '--duration=2h',
    );
    writeFileSync(join(dir, 'writer-token'), token);
    writeFileSync(join(dir, 'hub-ca.pem'), hub.caPem);
    const writerConfig = parseYaml(readFileSync(join(GITOPS, 'writer', 'writer.yaml'), 'utf8'));
    writerConfig.workloadApi = { socket: agent.address, hint: 'writer' };
    writerConfig.admin = { listen: '127.0.0.1:0' };
    writerConfig.kubernetes = { url: hub.url, caFile: 'hub-ca.pem', tokenFile: 'writer-token' };
    for (const secret of writerConfig.secrets) {
      secret.trustDomain = TRUST_DOMAIN;
      if (secret.server) secret.server = spokeUrl;
    }
    writerYaml = stringify(writerConfig);
    writer = await startWriter(parseWriterConfig(writerYaml, join(dir, 'writer.yaml')), {
      logger,
      defaultMetrics: false,
    });

    // The Git repository Flux reconciles from, on loopback smart HTTP.
    git = await startGitServer({ root: join(dir, 'git') });
    await initRepo(join(dir, 'git'), 'spoke', {
      'via-client/configmap.yaml': configMap('via-client', '0'),
      'via-secret/configmap.yaml': configMap('via-secret', '0'),
    });
    await applyTo(hub, 'flux-objects.yaml', [
      ...example('flux-source.yaml', {
        'https://git.example.org/platform/spoke-manifests.git': `${git.url}/spoke.git`,
        'interval: 1m': 'interval: 10s',
      }),
      ...example('flux-client-mode.yaml', {}).filter((o) => o.kind === 'Kustomization'),
      ...example('flux-writer.yaml', {}).filter((o) => o.kind === 'Kustomization'),
    ]);
  });

  after(async () => {
    await flux?.close();
    await writer?.close();
    await fluxClient?.close();
    await argoClient?.close();
    await proxy?.close();
    await git?.close();
    await agent?.close();
    await hub?.close();
    await spoke?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const spokeConfigMap = async (name: string) => {
    const { stdout } = await kubectl(
      spoke,
      'get',
      'configmap',
      name,
      '-n',
      'apps',
      '-o',
      'json',
      '--show-managed-fields',
    );
    return JSON.parse(stdout) as {
      data: Record<string, string>;
      metadata: { managedFields: { manager: string; operation: string }[] };
    };
  };

  it(`reconciles through the client mode and through the writer's Secret on every try across ${ROTATIONS} SVID rotations`, async () => {
    let round = 0;
    let reconciles = 0;
    const writerStart = writer.status()[0]?.expires?.getTime();
    const clientStart = fluxClient.rotations;
    let writerRotations = 0;
    let lastWriterExpiry = writerStart;
    while (fluxClient.rotations < clientStart + ROTATIONS || writerRotations < ROTATIONS) {
      round++;
      await commitFiles(
        join(dir, 'git'),
        'spoke',
        {
          'via-client/configmap.yaml': configMap('via-client', String(round)),
          'via-secret/configmap.yaml': configMap('via-secret', String(round)),
        },
        `round ${round}`,
      );
      await kubectl(
        hub,
        'annotate',
        '--overwrite',
        'gitrepository',
        'spoke-manifests',
        '-n',
        'flux-system',
        `reconcile.fluxcd.io/requestedAt=${Date.now()}`,
      );
      for (const name of ['spoke-a-via-client', 'spoke-a-via-secret']) {
        let status = await reconcile(name);
        // The GitRepository may not have fetched this round's commit yet: the reconcile succeeds on the last
        // revision; the next one takes the new commit.
        for (
          let i = 0;
          i < 20 && (await spokeConfigMap(name.replace('spoke-a-', ''))).data.round !== String(round);
          i++
        ) {
          assert.equal(ready(status)?.status, 'True', `${name} round ${round}: ${ready(status)?.message}`);
          status = await reconcile(name);
        }
        assert.equal(ready(status)?.status, 'True', `${name} round ${round}: ${ready(status)?.message}`);
        reconciles++;
        assert.equal((await spokeConfigMap(name.replace('spoke-a-', ''))).data.round, String(round));
      }
      const expiry = writer.status()[0]?.expires?.getTime();
      if (expiry !== undefined && expiry !== lastWriterExpiry) {
        writerRotations++;
        lastWriterExpiry = expiry;
      }
      await sleep(5_000);
    }
    process.stdout.write(
      `# gitops: ${reconciles} successful reconciles in ${round} rounds; client mode SVID rotations ` +
        `${fluxClient.rotations - clientStart}, writer Secret rewrites for new SVIDs ${writerRotations}\n`,
    );
    assert.ok(fluxClient.rotations - clientStart >= ROTATIONS);
    assert.ok(writerRotations >= ROTATIONS);
  });

  it('created the objects in the spoke as the mapped users, as the audit and a SelfSubjectReview show', async () => {
    for (const [name, user, id] of [
      ['via-client', 'flux', FLUX_ID],
      ['via-secret', 'flux-secret', WRITER_ID],
    ] as const) {
      const cm = await spokeConfigMap(name);
      assert.ok(
        cm.metadata.managedFields.some(
          (f) => f.manager === 'kustomize-controller' && f.operation === 'Apply',
        ),
        JSON.stringify(cm.metadata.managedFields),
      );
      const applied = audit.events.filter(
        (e) =>
          e.verb === 'patch' &&
          e.requestURI.includes(`/configmaps/${name}`) &&
          !e.requestURI.includes('dryRun'),
      );
      assert.ok(applied.length > 0, `no audited apply of ${name}`);
      for (const e of applied) {
        assert.equal(e.user.username, id);
        assert.equal(e.impersonatedUser?.username, user);
      }
    }
    const whoami = async (kubeconfig: string) => {
      const file = join(dir, 'whoami.kubeconfig');
      writeFileSync(file, kubeconfig);
      const { stdout } = await run('kubectl', [`--kubeconfig=${file}`, 'auth', 'whoami', '-o', 'json']);
      return (
        JSON.parse(stdout) as { status: { userInfo: { username: string; extra?: Record<string, string[]> } } }
      ).status.userInfo;
    };
    const secretValue = async (namespace: string, name: string, key: string): Promise<string> => {
      const { stdout } = await kubectl(
        hub,
        'get',
        'secret',
        name,
        '-n',
        namespace,
        '-o',
        `jsonpath={.data.${key}}`,
      );
      return Buffer.from(stdout, 'base64').toString('utf8');
    };
    const viaClient = await whoami(await secretValue('flux-system', 'spoke-a-client-mode', 'value'));
    assert.equal(viaClient.username, 'flux');
    assert.deepEqual(viaClient.extra?.['spiffe.io/id'], [FLUX_ID]);
    const viaSecret = await whoami(await secretValue('flux-system', 'spoke-a-kubeconfig', 'value'));
    assert.equal(viaSecret.username, 'flux-secret');
    assert.deepEqual(viaSecret.extra?.['spiffe.io/id'], [WRITER_ID]);
  });

  it("turns both Argo CD cluster Secret forms into a working client with Argo CD's own code", async () => {
    const probe = peer('argocd-probe');
    assert.ok('path' in probe);
    const { stdout: written } = await kubectl(
      hub,
      'get',
      'secret',
      'cluster-spoke-a',
      '-n',
      'argocd',
      '-o',
      'json',
    );
    const secretFile = join(dir, 'argocd-writer-secret.json');
    writeFileSync(secretFile, written);
    const viaWriter = JSON.parse((await run(probe.path, [secretFile])).stdout) as {
      username: string;
      extra: Record<string, string[]>;
    };
    assert.equal(viaWriter.username, 'flux-secret');
    assert.deepEqual(viaWriter.extra['spiffe.io/id'], [WRITER_ID]);
    const [form] = example('argocd-client-mode.yaml', {
      'http://127.0.0.1:7443': argoClient.listeners[0]?.url ?? assert.fail('no listener'),
    });
    // As kube-apiserver stores it: stringData becomes base64 data.
    const clientModeSecret = {
      ...form,
      stringData: undefined,
      data: Object.fromEntries(
        Object.entries(form.stringData as Record<string, string>).map(([k, v]) => [
          k,
          Buffer.from(v).toString('base64'),
        ]),
      ),
    };
    const clientFile = join(dir, 'argocd-client-secret.json');
    writeFileSync(clientFile, JSON.stringify(clientModeSecret));
    const viaClient = JSON.parse((await run(probe.path, [clientFile])).stdout) as {
      username: string;
      extra: Record<string, string[]>;
    };
    assert.equal(viaClient.username, 'argocd');
    assert.deepEqual(viaClient.extra['spiffe.io/id'], [ARGOCD_ID]);
  });

  it('a restarted writer finds its Secrets current and rewrites nothing; what it does not own stays as edited', async () => {
    // A rotation during the restart would rightly be written: restart with most of a half-life ahead.
    const held = (): number => writer.status()[1]?.expires?.getTime() ?? 0;
    const expires = held();
    if (expires - Date.now() < 75_000) {
      for (let i = 0; i < 900 && held() === expires; i++) await sleep(100);
      assert.notEqual(held(), expires, 'no rotation reached the Secret');
      await sleep(2000);
    }
    // Someone else's edits: a label, a data key Argo CD reads (project), and a config field of their own.
    const { stdout } = await kubectl(hub, 'get', 'secret', 'cluster-spoke-a', '-n', 'argocd', '-o', 'json');
    const secret = JSON.parse(stdout) as { data: Record<string, string> };
    const config = JSON.parse(Buffer.from(secret.data.config ?? '', 'base64').toString()) as {
      tlsClientConfig: Record<string, unknown>;
    };
    config.tlsClientConfig.serverName = 'localhost';
    await kubectl(hub, 'label', 'secret', 'cluster-spoke-a', '-n', 'argocd', 'team=platform');
    await kubectl(
      hub,
      'patch',
      'secret',
      'cluster-spoke-a',
      '-n',
      'argocd',
      '--type=merge',
      '-p',
      JSON.stringify({
        data: {
          project: Buffer.from('spokes').toString('base64'),
          config: Buffer.from(JSON.stringify(config)).toString('base64'),
        },
      }),
    );
    const written = (await kubectl(hub, 'get', 'secret', 'cluster-spoke-a', '-n', 'argocd', '-o', 'json'))
      .stdout;
    const before = JSON.parse(written) as { metadata: { resourceVersion: string } };

    await writer.close();
    writer = await startWriter(parseWriterConfig(writerYaml, join(dir, 'writer.yaml')), {
      logger: createLogger({ level: 'info', stream: { write: (line: string) => void logs.push(line) } }),
      defaultMetrics: false,
    });
    for (let i = 0; i < 100 && writer.status().some((s) => s.rounds === 0); i++) await sleep(100);
    assert.deepEqual(
      writer.status().map((s) => [s.secret, s.rounds, s.lastError]),
      [
        ['flux-system/spoke-a-kubeconfig', 1, undefined],
        ['argocd/cluster-spoke-a', 1, undefined],
      ],
    );
    const metrics = await (await fetch(`http://127.0.0.1:${writer.admin.address.port}/metrics`)).text();
    assert.match(metrics, /ksp_writer_syncs_total\{secret="argocd\/cluster-spoke-a",result="unchanged"\} 1/);
    assert.doesNotMatch(metrics, /result="written"/);
    const after = JSON.parse(
      (await kubectl(hub, 'get', 'secret', 'cluster-spoke-a', '-n', 'argocd', '-o', 'json')).stdout,
    ) as {
      metadata: { resourceVersion: string; labels: Record<string, string> };
      data: Record<string, string>;
    };
    assert.equal(after.metadata.resourceVersion, before.metadata.resourceVersion);
    assert.equal(after.metadata.labels.team, 'platform');
    assert.equal(Buffer.from(after.data.project ?? '', 'base64').toString(), 'spokes');
    // Argo CD's code still makes a client of it, now verifying the proxy as "localhost" (serverName, theirs).
    const probe = peer('argocd-probe');
    assert.ok('path' in probe);
    const file = join(dir, 'argocd-after-restart.json');
    writeFileSync(file, JSON.stringify(after));
    assert.equal(
      (JSON.parse((await run(probe.path, [file])).stdout) as { username: string }).username,
      'flux-secret',
    );
  });

  it('stops the next reconcile with a 403 the controller reports once the policy loses the rule', async () => {
    writeFileSync(policyFile, `rules:\n${POLICY_RULES.writer}${POLICY_RULES.argocd}`);
    let status = await reconcile('spoke-a-via-client');
    for (let i = 0; i < 20 && ready(status)?.status === 'True'; i++) {
      await sleep(500);
      status = await reconcile('spoke-a-via-client');
    }
    const condition = ready(status);
    assert.equal(condition?.status, 'False');
    assert.match(condition?.message ?? '', /forbidden|403/i);
    process.stdout.write(
      `# gitops: after the policy edit Flux reports: ${condition?.message?.slice(0, 300)}\n`,
    );
    // The writer's path keeps working: the edit removed only the client mode's rule.
    assert.equal(ready(await reconcile('spoke-a-via-secret'))?.status, 'True');
  });
});

function configMap(name: string, round: string): string {
  return stringify({
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: { name, namespace: 'apps' },
    data: { round },
  });
}
