/**
 * Real Flux controllers for the GitOps tests: source-controller and kustomize-controller (dev/peers, built from
 * their Go modules) running natively against a hub control plane, the way they run in a cluster minus the pod:
 * KUBECONFIG for the hub, RUNTIME_NAMESPACE, no leader election, loopback metrics, health and artifact addresses.
 * Their CRDs come from the controllers' own modules (config/crd/bases).
 */
import { execFile } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Child, type ControlPlane, freePorts, get, track, waitFor } from './controlplane.ts';
import { fluxCrds } from './peers/flux.ts';
import { buildPeer } from './peers/peers.ts';

const run = promisify(execFile);

export const FLUX_NAMESPACE = 'flux-system';

export interface Flux {
  readonly sourceController: Child;
  readonly kustomizeController: Child;
  close(): Promise<void>;
}

export interface StartFluxOptions {
  readonly hub: ControlPlane;
  /** Logs, artifact storage. */
  readonly dir: string;
  readonly logger?: (line: string) => void;
  /** How long each controller may take to report healthy (default 120 s). */
  readonly readyTimeoutMs?: number;
}

/** Applies the CRDs and the namespace to the hub, starts both controllers and waits until both are healthy. */
export async function startFlux(options: StartFluxOptions): Promise<Flux> {
  const { hub, dir } = options;
  mkdirSync(dir, { recursive: true });
  const kubeconfig = hub.kubeconfig('admin');
  const kubectl = (...args: string[]) => run('kubectl', [`--kubeconfig=${kubeconfig}`, ...args]);
  await kubectl('create', 'namespace', FLUX_NAMESPACE);
  for (const crd of fluxCrds()) await kubectl('apply', '--server-side', '-f', crd);
  await kubectl('wait', '--for=condition=Established', '--timeout=60s', 'crd', '--all');

  const [sourceMetrics, sourceHealth, storage, kustomizeMetrics, kustomizeHealth] = await freePorts(5);
  const env = { ...process.env, KUBECONFIG: kubeconfig, RUNTIME_NAMESPACE: FLUX_NAMESPACE };
  const common = (metrics: number | undefined, health: number | undefined) => [
    '--enable-leader-election=false',
    '--watch-all-namespaces=true',
    `--metrics-addr=127.0.0.1:${metrics}`,
    `--health-addr=127.0.0.1:${health}`,
    '--log-level=info',
    '--log-encoding=json',
  ];
  const storagePath = join(dir, 'artifacts');
  mkdirSync(storagePath, { recursive: true });
  const sourceController = new Child(
    'source-controller',
    buildPeer('flux-source-controller'),
    [
      ...common(sourceMetrics, sourceHealth),
      `--storage-path=${storagePath}`,
      `--storage-addr=127.0.0.1:${storage}`,
      `--storage-adv-addr=127.0.0.1:${storage}`,
    ],
    dir,
    options.logger,
    env,
  );
  track(sourceController);
  const kustomizeController = new Child(
    'kustomize-controller',
    buildPeer('flux-kustomize-controller'),
    common(kustomizeMetrics, kustomizeHealth),
    dir,
    options.logger,
    env,
  );
  track(kustomizeController);
  const children = [sourceController, kustomizeController];
  const stop = async (): Promise<void> => {
    for (const child of children) await child.stop();
  };
  try {
    const timeout = options.readyTimeoutMs ?? 120_000;
    for (const [name, port] of [
      ['source-controller', sourceHealth],
      ['kustomize-controller', kustomizeHealth],
    ] as const) {
      await waitFor(name, children, timeout, async () => {
        const answer = await get(`http://127.0.0.1:${port}/readyz`);
        return answer.status === 200 || `${answer.status} ${answer.body.slice(0, 200)}`;
      });
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return { sourceController, kustomizeController, close: stop };
}
