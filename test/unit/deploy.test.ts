/**
 * deploy/: every kustomize variant builds with the kubectl on this machine, and what it builds is what the
 * product needs: the configuration files inside the ConfigMaps (and the static pod's host files) pass the real
 * parsers, every path they name is mounted, the probes hit the admin port's /healthz and /readyz, the pods run
 * as non-root with nothing they do not need, the impersonation RBAC is `policy rbac`'s output for the shipped
 * policy, and the alerts name metrics that exist. Skipped, saying why, only when kubectl is absent (a failure
 * under CI, KSP_REQUIRE_PEERS=1).
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseAllDocuments, parse as parseYaml } from 'yaml';
import { peersRequired } from '../../dev/peers/peers.ts';
import { parseAgentConfig } from '../../src/agent/config.ts';
import { parseEntries } from '../../src/agent/entries.ts';
import { formatSelector } from '../../src/agent/selectors.ts';
import { parseClientConfig } from '../../src/client/config.ts';
import { parsePolicy } from '../../src/policy/parse.ts';
import { parseProxyConfig } from '../../src/proxy/config.ts';
import { parseWriterConfig } from '../../src/writer/config.ts';

const REPO = join(import.meta.dirname, '..', '..');
const DEPLOY = join(REPO, 'deploy');
const NAMESPACE = 'kube-svid-proxy';
const IMAGE = 'kube-svid-proxy:dev';

// biome-ignore lint/suspicious/noExplicitAny: Kubernetes objects are checked field by field below.
type Obj = any;

function kubectlMissing(): string | false {
  const found = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' });
  if (found.status === 0) return false;
  const reason = `kubectl is not on PATH (${found.error?.message ?? found.stderr.trim()})`;
  if (peersRequired()) throw new Error(reason);
  return `${reason}; set KSP_REQUIRE_PEERS=1 to make this a failure`;
}

function parseDocs(text: string): Obj[] {
  return parseAllDocuments(text)
    .map((d) => d.toJS() as Obj)
    .filter((o) => o !== null);
}

/** `kubectl kustomize DIR` (relative to deploy/), parsed. */
function build(dir: string, ...flags: string[]): Obj[] {
  return parseDocs(execFileSync('kubectl', ['kustomize', ...flags, join(DEPLOY, dir)], { encoding: 'utf8' }));
}

const find = (objs: Obj[], kind: string, name: string): Obj => {
  const found = objs.find((o) => o.kind === kind && o.metadata.name === name);
  assert.ok(found, `${kind} ${name} is missing`);
  return found;
};
/** A generated ConfigMap, whose name may carry kustomize's hash suffix. */
const configMap = (objs: Obj[], name: string): Obj => {
  const found = objs.find(
    (o) => o.kind === 'ConfigMap' && new RegExp(`^${name}(-[a-z0-9]{10})?$`).test(o.metadata.name),
  );
  assert.ok(found, `ConfigMap ${name} is missing`);
  return found;
};
const container = (spec: Obj, name: string): Obj => {
  const found = [...(spec.initContainers ?? []), ...spec.containers].find((c: Obj) => c.name === name);
  assert.ok(found, `container ${name} is missing`);
  return found;
};
/** The volume mounted in `c` at a path that holds `file`, and the path inside the volume. */
function mountOf(spec: Obj, c: Obj, file: string): { volume: Obj; readOnly: boolean } {
  const mount = (c.volumeMounts ?? []).find(
    (m: Obj) => file === m.mountPath || file.startsWith(`${m.mountPath.replace(/\/$/, '')}/`),
  );
  assert.ok(mount, `${file} is on no volume of container ${c.name}`);
  const volume = spec.volumes.find((v: Obj) => v.name === mount.name);
  assert.ok(volume, `volume ${mount.name} is missing`);
  return { volume, readOnly: mount.readOnly === true };
}

/** A container as the docs and the security review want it: non-root, read-only, no capability, no escalation. */
function assertHardened(pod: Obj, c: Obj): void {
  const sc = { ...pod.securityContext, ...c.securityContext };
  assert.equal(sc.runAsNonRoot, true, `${c.name}: runAsNonRoot`);
  assert.equal(sc.runAsUser, 65532, `${c.name}: runAsUser`);
  assert.equal(c.securityContext.allowPrivilegeEscalation, false, `${c.name}: allowPrivilegeEscalation`);
  assert.equal(c.securityContext.readOnlyRootFilesystem, true, `${c.name}: readOnlyRootFilesystem`);
  assert.deepEqual(c.securityContext.capabilities, { drop: ['ALL'] }, `${c.name}: capabilities`);
  assert.equal(pod.securityContext.seccompProfile.type, 'RuntimeDefault');
}

/** Liveness on /healthz and readiness on /readyz, both on `port` (a number or the name of that port). */
function assertProbes(c: Obj, port: number): void {
  const portOf = (p: number | string): number =>
    typeof p === 'number' ? p : c.ports.find((x: Obj) => x.name === p)?.containerPort;
  assert.equal(c.livenessProbe.httpGet.path, '/healthz');
  assert.equal(c.readinessProbe.httpGet.path, '/readyz');
  assert.equal(portOf(c.livenessProbe.httpGet.port), port);
  assert.equal(portOf(c.readinessProbe.httpGet.port), port);
}

/**
 * A commented-out YAML block, uncommented: from the line `#<pad><first>` on, while lines carry the same `#<pad>`
 * after their indentation (the block's own indentation is kept).
 */
function uncomment(text: string, first: string): string {
  const lines = text.split('\n');
  const start = lines.findIndex((l) => new RegExp(`^\\s*#\\s*${first}$`).test(l));
  assert.ok(start >= 0, `no commented block "${first}"`);
  const pad = /^\s*#(\s*)/.exec(lines[start] ?? '')?.[1] ?? '';
  const out: string[] = [];
  for (const line of lines.slice(start)) {
    const m = /^(\s*)#(.*)$/.exec(line);
    if (m?.[2] === undefined || !m[2].startsWith(pad) || m[2].trim() === '') break;
    out.push(`${m[1]}${m[2].slice(pad.length)}`);
  }
  return out.join('\n');
}

const agentEnv = { NODE_NAME: 'node-1' };

describe('deploy/ (kustomize)', () => {
  const skip = kubectlMissing();
  let spoke: Obj[];
  let withProxy: Obj[];
  let hub: Obj[];
  let monitoring: Obj[];
  let scratch: string;

  before(() => {
    if (skip !== false) return;
    spoke = build('spoke');
    withProxy = build('spoke/proxy');
    hub = build('hub');
    monitoring = build('monitoring');
    scratch = mkdtempSync(join(tmpdir(), 'ksp-deploy-'));
  });
  after(() => {
    if (scratch !== undefined) rmSync(scratch, { recursive: true, force: true });
  });

  /** Builds an overlay of `base` (relative to deploy/) written in a scratch directory. */
  const overlay = (base: string, extra: Record<string, unknown>): Obj[] => {
    const dir = mkdtempSync(join(scratch, 'overlay-'));
    const rel = (p: string): string => relative(dir, join(DEPLOY, p));
    const patches = ((extra.patches as string[] | undefined) ?? []).map((p) => ({ path: rel(p) }));
    writeFileSync(
      join(dir, 'kustomization.yaml'),
      JSON.stringify({ resources: [rel(base)], ...extra, ...(patches.length > 0 && { patches }) }),
    );
    return parseDocs(
      execFileSync('kubectl', ['kustomize', '--load-restrictor', 'LoadRestrictionsNone', dir], {
        encoding: 'utf8',
      }),
    );
  };

  it('builds every variant; the spoke needs no CRD, and every namespaced object is in kube-svid-proxy', (t) => {
    if (skip !== false) return t.skip(skip);
    for (const objs of [spoke, withProxy, hub]) {
      assert.ok(objs.every((o) => !String(o.apiVersion).startsWith('monitoring.coreos.com/')));
      for (const o of objs) {
        if (['Namespace', 'ClusterRole', 'ClusterRoleBinding'].includes(o.kind)) continue;
        assert.equal(o.metadata.namespace, NAMESPACE, `${o.kind} ${o.metadata.name}`);
      }
      const ns = find(objs, 'Namespace', NAMESPACE);
      // The agent's hostPID, hostNetwork and hostPath are only allowed at the privileged level.
      assert.equal(ns.metadata.labels['pod-security.kubernetes.io/enforce'], 'privileged');
    }
    assert.deepEqual(monitoring.map((o) => o.kind).sort(), [
      'PrometheusRule',
      'Service',
      'Service',
      'ServiceMonitor',
    ]);
  });

  it("runs the agent with the host's pids and network, its socket and state on the host, as uid 65532", (t) => {
    if (skip !== false) return t.skip(skip);
    for (const objs of [spoke, hub]) {
      const ds = find(objs, 'DaemonSet', 'kube-svid-proxy-agent');
      const pod = ds.spec.template.spec;
      assert.equal(pod.hostPID, true, 'hostPID: SO_PEERCRED pids and /proc of other pods');
      assert.equal(pod.hostNetwork, true, 'hostNetwork: the kubelet on 127.0.0.1');
      assert.equal(pod.automountServiceAccountToken, false);
      assert.deepEqual(pod.tolerations, [{ operator: 'Exists' }]);
      const agent = container(pod, 'agent');
      assertHardened(pod, agent);
      assert.deepEqual(agent.args.slice(0, 2), ['agent', '--config']);
      assert.equal(
        agent.env.find((e: Obj) => e.name === 'NODE_NAME').valueFrom.fieldRef.fieldPath,
        'spec.nodeName',
      );

      const cm = configMap(objs, 'kube-svid-proxy-agent');
      const configPath = agent.args[2];
      assert.equal(mountOf(pod, agent, configPath).volume.configMap.name, cm.metadata.name);
      const config = parseAgentConfig(cm.data['agent.yaml'], configPath, agentEnv);

      // The socket directory and the state directory: host paths, the socket's directory created if missing.
      assert.equal(config.socketPath, '/run/kube-svid-proxy/agent.sock');
      const socketVolume = mountOf(pod, agent, config.socketPath).volume;
      assert.deepEqual(socketVolume.hostPath, { path: '/run/kube-svid-proxy', type: 'DirectoryOrCreate' });
      const stateVolume = mountOf(pod, agent, config.stateDir ?? '').volume;
      assert.deepEqual(stateVolume.hostPath, { path: '/var/lib/kube-svid-proxy', type: 'DirectoryOrCreate' });
      assert.equal(config.stateDir, '/var/lib/kube-svid-proxy/agent');

      // The entries file: its own ConfigMap, without a hash suffix (edits reach running agents).
      const entriesMount = mountOf(pod, agent, config.entriesFile);
      assert.equal(entriesMount.volume.configMap.name, 'kube-svid-proxy-agent-entries');
      const entries = find(objs, 'ConfigMap', 'kube-svid-proxy-agent-entries');
      parseEntries(entries.data['entries.yaml'], {
        file: config.entriesFile,
        trustDomain: config.trustDomain,
      });

      // The k8s attestor: the node name from the downward API, the kubelet on loopback, a projected token.
      const k8s = config.attestors?.k8s;
      assert.ok(k8s);
      assert.equal(k8s.nodeName, 'node-1');
      assert.equal(k8s.kubeletUrl, 'https://127.0.0.1:10250');
      const credentials = mountOf(pod, agent, k8s.tokenPath ?? '');
      assert.equal(credentials.readOnly, true);
      assert.ok(
        credentials.volume.projected.sources.some((s: Obj) => s.serviceAccountToken?.path === 'token'),
      );
      assert.equal(mountOf(pod, agent, k8s.caPath ?? '').volume, credentials.volume);

      // Probes on the admin listener.
      assert.ok(config.admin, 'admin.listen is set');
      assertProbes(agent, config.admin.port);

      // The init container hands the directories to the agent's uid, with CHOWN alone.
      const init = container(pod, 'prepare-host-directories');
      assert.deepEqual(init.securityContext.capabilities, { drop: ['ALL'], add: ['CHOWN'] });
      assert.equal(init.securityContext.allowPrivilegeEscalation, false);
      assert.equal(init.securityContext.readOnlyRootFilesystem, true);
      assert.equal(
        init.env.find((e: Obj) => e.name === 'AGENT_UID').value,
        String(agent.securityContext.runAsUser),
      );
      assert.equal(
        init.env.find((e: Obj) => e.name === 'AGENT_GID').value,
        String(agent.securityContext.runAsGroup),
      );
      assert.equal(mountOf(pod, init, '/run/kube-svid-proxy').volume, socketVolume);
      assert.equal(mountOf(pod, init, '/var/lib/kube-svid-proxy/agent').volume, stateVolume);
      assert.equal(
        init.volumeMounts.length,
        2,
        'the init container sees the two directories and nothing else',
      );

      // The agent reads pods through its kubelet, nothing else.
      const role = find(objs, 'ClusterRole', 'kube-svid-proxy-agent');
      assert.deepEqual(role.rules, [{ apiGroups: [''], resources: ['nodes/pods'], verbs: ['get'] }]);
      const binding = find(objs, 'ClusterRoleBinding', 'kube-svid-proxy-agent');
      assert.deepEqual(binding.subjects, [
        { kind: 'ServiceAccount', name: 'kube-svid-proxy-agent', namespace: NAMESPACE },
      ]);
      assert.equal(find(objs, 'ServiceAccount', 'kube-svid-proxy-agent').automountServiceAccountToken, false);
    }
  });

  it('ships agent.yaml examples in comments and patches that the parser and kustomize accept', (t) => {
    if (skip !== false) return t.skip(skip);
    const spokeAgent = readFileSync(join(DEPLOY, 'spoke/common/agent.yaml'), 'utf8');
    const federation = parseAgentConfig(
      `${spokeAgent}\n${uncomment(spokeAgent, 'federation:')}\n`,
      'agent.yaml',
      agentEnv,
    );
    assert.equal(federation.federation?.bundleEndpoint?.tls.profile, 'https_spiffe');
    assert.equal(federation.federation?.relationships.length, 1);
    const upstreamPatch = readFileSync(join(DEPLOY, 'spoke/common/patches/upstream-ca.yaml'), 'utf8');
    const upstream = parseAgentConfig(
      `${spokeAgent}\n${uncomment(upstreamPatch, 'ca:')}\n`,
      'agent.yaml',
      agentEnv,
    );
    assert.equal(upstream.ca?.upstream?.certFile, '/etc/kube-svid-proxy/upstream/ca.crt');
    const hubAgent = readFileSync(join(DEPLOY, 'hub/agent.yaml'), 'utf8');
    const hubFederation = parseAgentConfig(
      hubAgent.replace(/^ {2}# trustDomains:[\s\S]*$/m, uncomment(hubAgent, 'trustDomains:')),
      'agent.yaml',
      agentEnv,
    );
    assert.equal(hubFederation.federation?.relationships.length, 1);

    const patched = overlay('spoke', {
      patches: [
        'spoke/common/patches/kubelet-nodes-proxy.yaml',
        'spoke/common/patches/federation-bootstrap.yaml',
        'spoke/common/patches/upstream-ca.yaml',
      ],
    });
    const pod = find(patched, 'DaemonSet', 'kube-svid-proxy-agent').spec.template.spec;
    const agent = container(pod, 'agent');
    assert.equal(
      mountOf(pod, agent, '/etc/kube-svid-proxy/bootstrap/hub.example.org.json').volume.configMap.name,
      'kube-svid-proxy-bootstrap',
    );
    assert.equal(
      mountOf(pod, agent, '/etc/kube-svid-proxy/upstream/ca.key').volume.secret.secretName,
      'kube-svid-proxy-upstream-ca',
    );
    assert.deepEqual(find(patched, 'ClusterRole', 'kube-svid-proxy-agent').rules[0].resources, [
      'nodes/pods',
      'nodes/proxy',
    ]);
    const hubPatched = overlay('hub', { patches: ['hub/patches/federation-bootstrap.yaml'] });
    const hubPod = find(hubPatched, 'DaemonSet', 'kube-svid-proxy-agent').spec.template.spec;
    assert.ok(hubPod.volumes.some((v: Obj) => v.configMap?.name === 'kube-svid-proxy-bootstrap'));
  });

  it('runs the proxy Deployment non-root on its service account, its files mounted, probed on the admin port', (t) => {
    if (skip !== false) return t.skip(skip);
    const deployment = find(withProxy, 'Deployment', 'kube-svid-proxy');
    const pod = deployment.spec.template.spec;
    assert.equal(pod.serviceAccountName, 'kube-svid-proxy');
    assert.equal(pod.automountServiceAccountToken, true, 'upstream.inCluster reads the pod token');
    assert.equal(find(withProxy, 'ServiceAccount', 'kube-svid-proxy').automountServiceAccountToken, false);
    assert.equal(pod.hostNetwork, undefined);
    const proxy = container(pod, 'proxy');
    assertHardened(pod, proxy);
    assert.deepEqual(proxy.args.slice(0, 2), ['serve', '--config']);
    const configPath = proxy.args[2];
    const cm = configMap(withProxy, 'kube-svid-proxy');
    assert.equal(mountOf(pod, proxy, configPath).volume.configMap.name, cm.metadata.name);
    const config = parseProxyConfig(cm.data['proxy.yaml'], configPath);
    assert.equal(config.upstream.kind, 'inCluster');
    assertProbes(proxy, config.admin.port);
    assert.equal(config.admin.host, '0.0.0.0', 'the kubelet probes the pod IP');
    assert.equal(proxy.ports.find((p: Obj) => p.name === 'https').containerPort, config.listen.port);

    // The policy: its ConfigMap without a hash suffix, so the proxy picks up edits; it parses.
    const policyMount = mountOf(pod, proxy, config.policyFile);
    assert.equal(policyMount.volume.configMap.name, 'kube-svid-proxy-policy');
    const policy = find(withProxy, 'ConfigMap', 'kube-svid-proxy-policy');
    parsePolicy(policy.data['policy.yaml'], { file: config.policyFile });

    // The agent's socket: the host directory the agent made, read-only.
    assert.equal(config.identity.kind, 'workloadApi');
    const socket = config.identity.kind === 'workloadApi' ? (config.identity.socket ?? '') : '';
    const socketMount = mountOf(pod, proxy, socket.replace(/^unix:\/\//, ''));
    assert.deepEqual(socketMount.volume.hostPath, { path: '/run/kube-svid-proxy', type: 'Directory' });
    assert.equal(socketMount.readOnly, true);

    // The drain fits in the grace period.
    assert.ok(
      pod.terminationGracePeriodSeconds >
        proxy.lifecycle.preStop.sleep.seconds + config.timeouts.shutdownDrainMs / 1000,
    );

    // The Service and the PodDisruptionBudget select these pods.
    const labels = deployment.spec.template.metadata.labels;
    const selects = (selector: Record<string, string>): boolean =>
      Object.entries(selector).every(([k, v]) => labels[k] === v);
    const service = find(withProxy, 'Service', 'kube-svid-proxy');
    assert.ok(selects(service.spec.selector));
    assert.equal(service.spec.ports[0].targetPort, 'https');
    const pdb = find(withProxy, 'PodDisruptionBudget', 'kube-svid-proxy');
    assert.ok(selects(pdb.spec.selector.matchLabels));
    assert.ok(pdb.spec.minAvailable < deployment.spec.replicas);
  });

  it('ships a static pod: valid YAML, host network, files from the host, probed on the admin port', () => {
    const dir = join(DEPLOY, 'spoke', 'static-pod');
    const docs = parseDocs(readFileSync(join(dir, 'kube-svid-proxy.yaml'), 'utf8'));
    assert.equal(docs.length, 1);
    const pod = docs[0];
    assert.equal(pod.apiVersion, 'v1');
    assert.equal(pod.kind, 'Pod');
    assert.equal(pod.metadata.namespace, NAMESPACE);
    assert.equal(pod.spec.hostNetwork, true);
    assert.equal(pod.spec.serviceAccountName, undefined, 'a static pod cannot use a service account');
    assert.ok(
      pod.spec.volumes.every((v: Obj) => v.hostPath !== undefined),
      'a static pod has only host files',
    );
    const proxy = container(pod.spec, 'proxy');
    assertHardened(pod.spec, proxy);
    assert.equal(proxy.image, IMAGE);
    const configPath = proxy.args[2];
    assert.equal(configPath, '/etc/kube-svid-proxy/proxy.yaml');
    const config = parseProxyConfig(readFileSync(join(dir, 'proxy.yaml'), 'utf8'), configPath);
    assertProbes(proxy, config.admin.port);
    assert.equal(proxy.livenessProbe.httpGet.host, '127.0.0.1');
    const onHost = (file: string): Obj => mountOf(pod.spec, proxy, file).volume.hostPath;
    assert.equal(onHost(configPath).path, '/etc/kube-svid-proxy');
    assert.equal(onHost(config.policyFile).path, '/etc/kube-svid-proxy');
    assert.equal(config.upstream.kind ?? 'explicit', 'explicit');
    if (config.upstream.kind === undefined || config.upstream.kind === 'explicit') {
      assert.equal(config.upstream.tokenFile, '/etc/kube-svid-proxy/upstream/token');
      assert.equal(onHost(config.upstream.caFile ?? '').path, '/etc/kubernetes/pki/ca.crt');
    }
    const socket = config.identity.kind === 'workloadApi' ? (config.identity.socket ?? '') : '';
    assert.equal(onHost(socket.replace(/^unix:\/\//, '')).path, '/run/kube-svid-proxy');
    assert.ok(mountOf(pod.spec, proxy, '/etc/kube-svid-proxy/policy.yaml').readOnly);
    // The host's policy file is a copy of the shipped one, which must parse.
    parsePolicy(readFileSync(join(DEPLOY, 'spoke/common/policy.yaml'), 'utf8'), { file: 'policy.yaml' });
  });

  it("gives the proxy, in both forms, the agent's entry for its SPIFFE ID", (t) => {
    if (skip !== false) return t.skip(skip);
    const entries = parseYaml(
      find(spoke, 'ConfigMap', 'kube-svid-proxy-agent-entries').data['entries.yaml'],
    ) as {
      entries: { spiffeId: string; selectors: string[]; hint?: string }[];
    };
    const proxyEntry = entries.entries.find((e) => e.hint === 'proxy');
    assert.ok(proxyEntry);
    const staticPod = parseYaml(readFileSync(join(DEPLOY, 'spoke/static-pod/kube-svid-proxy.yaml'), 'utf8'));
    const deployment = find(withProxy, 'Deployment', 'kube-svid-proxy');
    const forms: [string, string, Record<string, string>][] = [
      ['static pod', staticPod.metadata.namespace, staticPod.metadata.labels],
      ['Deployment', deployment.metadata.namespace, deployment.spec.template.metadata.labels],
    ];
    for (const [what, namespace, labels] of forms) {
      for (const selector of proxyEntry.selectors) {
        const match = /^k8s:([a-z-]+):(.*)$/.exec(selector);
        const kind = match?.[1];
        const rest = match?.[2] ?? '';
        if (kind === 'ns') assert.equal(namespace, rest, `${what}: ${selector}`);
        else if (kind === 'pod-label') {
          const colon = rest.lastIndexOf(':');
          assert.equal(labels[rest.slice(0, colon)], rest.slice(colon + 1), `${what}: ${selector}`);
        } else assert.fail(`${what}: selector ${selector} is not checked here`);
      }
    }
    for (const path of ['spoke/proxy/proxy.yaml', 'spoke/static-pod/proxy.yaml']) {
      const config = parseProxyConfig(readFileSync(join(DEPLOY, path), 'utf8'), join(DEPLOY, path));
      assert.equal(config.identity.kind === 'workloadApi' && config.identity.hint, proxyEntry.hint, path);
      assert.equal(`spiffe://${config.trustDomain.name}/kube-svid-proxy`, proxyEntry.spiffeId, path);
    }
  });

  it('carries the impersonation RBAC that `policy rbac` prints for the shipped policy, bound to the proxy', (t) => {
    const printed = execFileSync(
      process.execPath,
      [
        'src/cli/main.ts',
        'policy',
        'rbac',
        'deploy/spoke/common/policy.yaml',
        '--service-account',
        `${NAMESPACE}/kube-svid-proxy`,
      ],
      { cwd: REPO, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] },
    );
    assert.equal(
      readFileSync(join(DEPLOY, 'spoke/common/impersonation-rbac.yaml'), 'utf8'),
      printed,
      'deploy/spoke/common/impersonation-rbac.yaml is out of step with policy.yaml: run npm run deploy:rbac and review it',
    );
    if (skip !== false) return t.skip(skip);
    const expected = parseDocs(printed);
    for (const objs of [spoke, withProxy]) {
      for (const want of expected) assert.deepEqual(find(objs, want.kind, want.metadata.name), want);
    }
    assert.deepEqual(find(spoke, 'ClusterRoleBinding', 'kube-svid-proxy-impersonate').subjects, [
      { kind: 'ServiceAccount', name: 'kube-svid-proxy', namespace: NAMESPACE },
    ]);
  });

  it('uses kube-svid-proxy:dev (IfNotPresent) everywhere, and one images entry moves every container', (t) => {
    if (skip !== false) return t.skip(skip);
    const containers = (objs: Obj[]): Obj[] =>
      objs
        .filter((o) => ['DaemonSet', 'Deployment'].includes(o.kind))
        .flatMap((o) => [...(o.spec.template.spec.initContainers ?? []), ...o.spec.template.spec.containers]);
    for (const objs of [spoke, withProxy, hub]) {
      for (const c of containers(objs)) {
        assert.equal(c.image, IMAGE, c.name);
        assert.equal(c.imagePullPolicy, 'IfNotPresent', c.name);
      }
    }
    const moved = overlay('spoke/proxy', {
      images: [{ name: 'kube-svid-proxy', newName: 'registry.example.com/kube-svid-proxy', newTag: '1.2.3' }],
    });
    const images = containers(moved).map((c) => c.image);
    assert.equal(images.length, 3);
    assert.ok(
      images.every((i) => i === 'registry.example.com/kube-svid-proxy:1.2.3'),
      images.join(', '),
    );
  });

  it('alerts on metrics the proxy and the agent export, and scrapes both admin ports', (t) => {
    if (skip !== false) return t.skip(skip);
    const documented = readFileSync(join(REPO, 'docs/operator/admin.md'), 'utf8');
    const rule = find(monitoring, 'PrometheusRule', 'kube-svid-proxy');
    const alerts = rule.spec.groups.flatMap((g: Obj) => g.rules);
    const names = alerts.map((a: Obj) => a.alert);
    for (const wanted of [
      'KubeSvidProxySvidExpiring',
      'KubeSvidProxyPolicyReloadFailed',
      'KubeSvidProxyNotReady',
      'KubeSvidProxyUpstreamErrors',
      'KubeSvidProxyAuthenticationFailures',
      'KubeSvidProxyPolicyDenials',
      'KubeSvidProxyLimitRefusals',
      'KubeSvidProxyAgentCaExpiring',
      'KubeSvidProxyFederationBundleAge',
      'KubeSvidProxyFederationBundleMissing',
      'KubeSvidProxyFederationFetchErrors',
    ]) {
      assert.ok(names.includes(wanted), `alert ${wanted} is missing`);
    }
    for (const a of alerts) {
      assert.ok(['critical', 'warning', 'info'].includes(a.labels.severity), a.alert);
      assert.ok(a.annotations.summary, a.alert);
      for (const [metric] of String(a.expr).matchAll(/\bksp_[a-z0-9_]+/g)) {
        assert.ok(
          documented.includes(`\`${metric}\``),
          `${a.alert}: ${metric} is not in docs/operator/admin.md`,
        );
      }
    }
    // Scrape targets: a `metrics` port on the proxy's and the agent's admin ports.
    const monitor = find(monitoring, 'ServiceMonitor', 'kube-svid-proxy');
    assert.deepEqual(
      monitor.spec.endpoints.map((e: Obj) => e.port),
      ['metrics'],
    );
    const port = (name: string): number =>
      find(monitoring, 'Service', name).spec.ports.find((p: Obj) => p.name === 'metrics').port;
    const spokeAgent = configMap(spoke, 'kube-svid-proxy-agent').data['agent.yaml'];
    assert.equal(
      port('kube-svid-proxy-agent-metrics'),
      parseAgentConfig(spokeAgent, 'agent.yaml', agentEnv).admin?.port,
    );
    const proxyYaml = configMap(withProxy, 'kube-svid-proxy').data['proxy.yaml'];
    assert.equal(port('kube-svid-proxy-metrics'), parseProxyConfig(proxyYaml, 'proxy.yaml').admin.port);
  });

  it('ships the GitOps client side: sidecar components for Flux and Argo CD, and the writer with RBAC on exactly its Secrets', (t) => {
    if (skip !== false) return t.skip(skip);
    // The components patch the controllers of the kustomization that includes them: stand-ins here, named as
    // Flux and Argo CD name theirs.
    const stub = (kind: string, name: string, namespace: string): Obj => ({
      apiVersion: 'apps/v1',
      kind,
      metadata: { name, namespace },
      spec: {
        selector: { matchLabels: { app: name } },
        template: {
          metadata: { labels: { app: name } },
          spec: { containers: [{ name: 'manager', image: 'x' }] },
        },
      },
    });
    for (const [component, kind, name, namespace] of [
      ['flux', 'Deployment', 'kustomize-controller', 'flux-system'],
      ['argocd', 'StatefulSet', 'argocd-application-controller', 'argocd'],
    ] as const) {
      const dir = mkdtempSync(join(scratch, `${component}-`));
      writeFileSync(join(dir, 'controller.yaml'), JSON.stringify(stub(kind, name, namespace)));
      writeFileSync(
        join(dir, 'kustomization.yaml'),
        JSON.stringify({
          resources: ['controller.yaml'],
          components: [relative(dir, join(DEPLOY, 'hub', 'gitops', component))],
        }),
      );
      const objs = parseDocs(
        execFileSync('kubectl', ['kustomize', '--load-restrictor', 'LoadRestrictionsNone', dir], {
          encoding: 'utf8',
        }),
      );
      const pod = find(objs, kind, name).spec.template.spec;
      const sidecar = container(pod, 'kube-svid-proxy-client');
      assert.deepEqual(sidecar.args.slice(0, 2), ['client', '--config']);
      assert.equal(sidecar.image, IMAGE);
      assert.equal(sidecar.securityContext.runAsNonRoot, true);
      assert.equal(sidecar.securityContext.readOnlyRootFilesystem, true);
      assert.deepEqual(sidecar.securityContext.capabilities, { drop: ['ALL'] });
      const clientYaml = configMap(objs, `kube-svid-proxy-client-${component}`);
      assert.equal(clientYaml.metadata.namespace, namespace);
      const config = parseClientConfig(clientYaml.data['client.yaml'], 'client.yaml');
      assert.equal(mountOf(pod, sidecar, sidecar.args[2]).volume.configMap.name, clientYaml.metadata.name);
      assert.equal(mountOf(pod, sidecar, '/run/kube-svid-proxy/agent.sock').readOnly, true);
      assertProbes(sidecar, config.admin.port);
      // The kubelet probes from the node: the pod's address, never a host of its own (127.0.0.1 is the node's).
      assert.equal(sidecar.livenessProbe.httpGet.host, undefined);
      assert.equal(config.admin.host, '0.0.0.0');
      // The example Secrets name the listener the sidecar opens.
      const listen = config.spokes[0]?.listen;
      assert.ok(listen?.kind === 'tcp');
      const example = readFileSync(
        join(DEPLOY, 'hub', 'gitops', 'examples', `${component}-client-mode.yaml`),
        'utf8',
      );
      assert.ok(example.includes(`http://${listen.host}:${listen.port}`), `${component}-client-mode.yaml`);
    }

    const writer = build('hub/gitops/writer');
    const deployment = find(writer, 'Deployment', 'credential-writer');
    const pod = deployment.spec.template.spec;
    const c = container(pod, 'writer');
    assertHardened(pod, c);
    assert.equal(pod.serviceAccountName, 'credential-writer');
    const writerYaml = configMap(writer, 'kube-svid-proxy-writer');
    const config = parseWriterConfig(writerYaml.data['writer.yaml'], 'writer.yaml');
    assertProbes(c, config.admin.port);
    assert.equal(mountOf(pod, c, c.args[2]).volume.configMap.name, writerYaml.metadata.name);
    assert.deepEqual(config.kubernetes, { kind: 'inCluster' });
    // Exactly get and update on exactly the Secrets writer.yaml names, bound to the writer's service account.
    const roles = writer.filter((o) => o.kind === 'Role');
    const granted = roles.flatMap((r) =>
      r.rules.flatMap((rule: Obj) =>
        rule.resourceNames.map(
          (n: string) => `${r.metadata.namespace}/${n}:${rule.verbs.join(',')}:${rule.resources}`,
        ),
      ),
    );
    assert.deepEqual(
      granted.sort(),
      config.secrets.map((s) => `${s.namespace}/${s.name}:get,update:secrets`).sort(),
    );
    for (const binding of writer.filter((o) => o.kind === 'RoleBinding')) {
      assert.deepEqual(binding.subjects, [
        { kind: 'ServiceAccount', name: 'credential-writer', namespace: NAMESPACE },
      ]);
    }
    assert.ok(writer.every((o) => o.kind !== 'ClusterRole' && o.kind !== 'ClusterRoleBinding'));
    // The hub's agent gives the writer its SVID; the spokes' policy maps it.
    const hubAgent = parseAgentConfig(
      configMap(hub, 'kube-svid-proxy-agent').data['agent.yaml'],
      'agent.yaml',
      agentEnv,
    );
    const entries = parseEntries(
      find(hub, 'ConfigMap', 'kube-svid-proxy-agent-entries').data['entries.yaml'],
      {
        file: 'entries.yaml',
        trustDomain: hubAgent.trustDomain,
      },
    );
    const entry = entries.entries.find((e) =>
      String(e.spiffeId).endsWith('/ns/kube-svid-proxy/sa/credential-writer'),
    );
    assert.ok(entry, 'no hub entry for the credential writer');
    assert.deepEqual(entry.selectors.map(formatSelector).sort(), [
      'k8s:ns:kube-svid-proxy',
      'k8s:sa:credential-writer',
    ]);
    const policy = readFileSync(join(DEPLOY, 'spoke', 'common', 'policy.yaml'), 'utf8');
    parsePolicy(policy, { file: 'policy.yaml' });
    assert.ok(
      policy.includes(`id: ${entry.spiffeId}`),
      "the spokes' policy does not map the writer's SPIFFE ID",
    );
  });
});
