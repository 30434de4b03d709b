/**
 * A minimal CRI client (the calls in cri.proto) for the test node: what `crictl pods`, `crictl ps`,
 * `crictl stop` and `crictl rmp -f` do, over containerd's socket. Debian has no cri-tools package, and teardown
 * needs the runtime to stop each pod the way the kubelet would (CNI DEL, network namespace, mounts) once the
 * kubelet itself is gone.
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const PROTO_PATH = new URL('./cri.proto', import.meta.url).pathname;

const definition = protoLoader.loadSync(PROTO_PATH, {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const RuntimeServiceClient = grpc.makeClientConstructor(
  definition['runtime.v1.RuntimeService'] as grpc.ServiceDefinition,
  'RuntimeService',
);

export interface PodSandbox {
  readonly id: string;
  readonly metadata: {
    readonly name: string;
    readonly uid: string;
    readonly namespace: string;
    readonly attempt: number;
  };
  readonly state: 'SANDBOX_READY' | 'SANDBOX_NOTREADY';
  readonly labels: Record<string, string>;
}

export interface Container {
  readonly id: string;
  readonly pod_sandbox_id: string;
  readonly metadata: { readonly name: string; readonly attempt: number };
  readonly image_ref: string;
  readonly state: 'CONTAINER_CREATED' | 'CONTAINER_RUNNING' | 'CONTAINER_EXITED' | 'CONTAINER_UNKNOWN';
  readonly labels: Record<string, string>;
}

type Callback<T> = (err: grpc.ServiceError | null, value: T) => void;
type Unary = (request: unknown, options: grpc.CallOptions, callback: Callback<unknown>) => void;

export class CriClient {
  private readonly client: grpc.Client;
  private readonly timeoutMs: number;

  /** `socket`: containerd's socket path. Each call fails after `timeoutMs` (default 60 s). */
  constructor(socket: string, timeoutMs = 60_000) {
    this.client = new RuntimeServiceClient(`unix://${socket}`, grpc.credentials.createInsecure());
    this.timeoutMs = timeoutMs;
  }

  private call<T>(method: string, request: unknown): Promise<T> {
    const fn = (this.client as unknown as Record<string, Unary>)[method];
    if (fn === undefined) throw new Error(`no CRI method ${method}`);
    return new Promise((resolve, reject) => {
      fn.call(this.client, request, { deadline: Date.now() + this.timeoutMs }, (err, value) =>
        err === null
          ? resolve(value as T)
          : reject(new Error(`CRI ${method}: ${err.details || err.message}`)),
      );
    });
  }

  async version(): Promise<{ runtime_name: string; runtime_version: string; runtime_api_version: string }> {
    return this.call('Version', { version: 'v1' });
  }

  async pods(): Promise<PodSandbox[]> {
    return (await this.call<{ items: PodSandbox[] }>('ListPodSandbox', {})).items;
  }

  async containers(podSandboxId?: string): Promise<Container[]> {
    const filter = podSandboxId === undefined ? undefined : { pod_sandbox_id: podSandboxId };
    return (await this.call<{ containers: Container[] }>('ListContainers', { filter })).containers;
  }

  /** Stops a container, SIGKILL after `timeoutSeconds` (like `crictl stop`); the kubelet starts it again. */
  async stopContainer(id: string, timeoutSeconds = 0): Promise<void> {
    await this.call('StopContainer', { container_id: id, timeout: timeoutSeconds });
  }

  /** Stops (containers killed, CNI DEL, network namespace removed) then removes a pod sandbox. */
  async removePod(id: string): Promise<void> {
    await this.call('StopPodSandbox', { pod_sandbox_id: id });
    await this.call('RemovePodSandbox', { pod_sandbox_id: id });
  }

  /** Removes every pod sandbox; returns the names of those it could not remove, with why. */
  async removeAllPods(): Promise<string[]> {
    const failed: string[] = [];
    for (const pod of await this.pods()) {
      try {
        await this.removePod(pod.id);
      } catch (err) {
        failed.push(`${pod.metadata.namespace}/${pod.metadata.name}: ${(err as Error).message}`);
      }
    }
    return failed;
  }

  close(): void {
    this.client.close();
  }
}
