/**
 * Real peers for interop tests, built from their published Go modules into a cache outside the repository.
 *
 *   node dev/peers/peers.ts [name...]     build (or reuse) and print the binaries' paths
 *
 * The cache is $KSP_CACHE_DIR, else $XDG_CACHE_HOME/kube-svid-proxy, else ~/.cache/kube-svid-proxy. A binary is
 * keyed by a hash of the module files that pin it, so changing a pin rebuilds it and nothing else does.
 * Tests call `peer(name)`: when Go is absent the test is skipped, saying why, unless KSP_REQUIRE_PEERS=1 (set by
 * CI), which turns the skip into a failure.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

interface PeerSpec {
  /** Go module directory (under dev/peers) whose go.mod/go.sum pin the versions. */
  readonly dir: string;
  /** Package to build, relative to the module. */
  readonly pkg: string;
  /** Files whose content decides the cache key. */
  readonly files: readonly string[];
  readonly description: string;
  /** `go build -ldflags`, e.g. version stamps a release build sets; part of the cache key. */
  readonly ldflags?: string;
  /** Environment the build needs whatever the caller's (e.g. `CGO_ENABLED=1`); part of the cache key. */
  readonly env?: Readonly<Record<string, string>>;
}

/**
 * What Kubernetes' release build stamps (hack/lib/version.sh); without it /version says v0.0.0-master+$Format:%H$,
 * which `kubectl version` and other clients cannot parse, and the kubelet reports that version for its node. Keep
 * in step with dev/peers/kube/go.mod.
 */
const KUBE_LDFLAGS = ['k8s.io/component-base/version', 'k8s.io/client-go/pkg/version']
  .flatMap((pkg) => [
    `-X ${pkg}.gitVersion=v1.33.13`,
    `-X ${pkg}.gitMajor=1`,
    `-X ${pkg}.gitMinor=33`,
    `-X ${pkg}.gitCommit=`,
    `-X ${pkg}.gitTreeState=clean`,
    `-X ${pkg}.buildDate=2026-06-11T16:59:07Z`,
  ])
  .join(' ');

export const PEERS = {
  'spire-agent': {
    dir: 'spire',
    pkg: 'github.com/spiffe/spire/cmd/spire-agent',
    files: ['go.mod', 'go.sum'],
    description: 'SPIRE agent CLI v1.13.3 (api fetch / api validate)',
  },
  'spire-server': {
    dir: 'spire',
    pkg: 'github.com/spiffe/spire/cmd/spire-server',
    files: ['go.mod', 'go.sum'],
    description: 'SPIRE server v1.13.3 (federation interop)',
    // Its sqlite datastore (mattn/go-sqlite3) exists only in a cgo build: without cgo the server starts and then
    // refuses `database_type = "sqlite3"`. So a C compiler is needed, and CGO_ENABLED=0 in the caller's
    // environment must not leak into this build.
    env: { CGO_ENABLED: '1' },
  },
  'gospiffe-probe': {
    dir: 'gospiffe',
    pkg: '.',
    files: ['go.mod', 'go.sum', 'main.go'],
    description: 'our go-spiffe v2.9.0 client program',
  },
  'kube-apiserver': {
    dir: 'kube',
    pkg: 'k8s.io/kubernetes/cmd/kube-apiserver',
    files: ['go.mod', 'go.sum'],
    description: 'kube-apiserver v1.33.13 (staging modules v0.33.13)',
    ldflags: KUBE_LDFLAGS,
  },
  // The rest of the test node (dev/node.ts), from the same wrapper module, version and stamps.
  'kube-controller-manager': {
    dir: 'kube',
    pkg: 'k8s.io/kubernetes/cmd/kube-controller-manager',
    files: ['go.mod', 'go.sum'],
    description: 'kube-controller-manager v1.33.13',
    ldflags: KUBE_LDFLAGS,
  },
  'kube-scheduler': {
    dir: 'kube',
    pkg: 'k8s.io/kubernetes/cmd/kube-scheduler',
    files: ['go.mod', 'go.sum'],
    description: 'kube-scheduler v1.33.13',
    ldflags: KUBE_LDFLAGS,
  },
  kubelet: {
    dir: 'kube',
    pkg: 'k8s.io/kubernetes/cmd/kubelet',
    files: ['go.mod', 'go.sum'],
    description: 'kubelet v1.33.13',
    ldflags: KUBE_LDFLAGS,
  },
  pause: {
    dir: 'pause',
    pkg: '.',
    files: ['go.mod', 'main.go'],
    description: "the test node's sandbox (pause) program, ours",
    // Static: it is the only file of the image ksp.local/pause (dev/node/images.ts).
    ldflags: '-s -w',
    env: { CGO_ENABLED: '0' },
  },
  etcd: {
    dir: 'etcd',
    pkg: 'go.etcd.io/etcd/server/v3',
    files: ['go.mod', 'go.sum'],
    description: 'etcd server v3.6.5',
  },
  // Flux controllers run natively against a test kube-apiserver (their CRDs: dev/peers/flux.ts). Built as their
  // release images build them (Dockerfile: CGO_ENABLED=0 go build -trimpath), so no C compiler is needed.
  'flux-source-controller': {
    dir: 'flux-source',
    pkg: 'github.com/fluxcd/source-controller',
    files: ['go.mod', 'go.sum'],
    description: 'Flux source-controller v1.9.6 (github.com/fluxcd/pkg/artifact v0.18.0, see its go.mod)',
    env: { CGO_ENABLED: '0' },
  },
  'flux-kustomize-controller': {
    dir: 'flux-kustomize',
    pkg: 'github.com/fluxcd/kustomize-controller',
    files: ['go.mod', 'go.sum'],
    description: 'Flux kustomize-controller v1.9.6',
    env: { CGO_ENABLED: '0' },
  },
  // Argo CD's own conversion of a cluster Secret into a client (its v3 module), for the GitOps tests.
  'argocd-probe': {
    dir: 'argocd',
    pkg: '.',
    files: ['go.mod', 'go.sum', 'main.go'],
    description: 'our Argo CD v3.5.3 cluster Secret probe (db.SecretToCluster, Cluster.RESTConfig)',
    env: { CGO_ENABLED: '0' },
  },
  // Ghostunnel, an L4 TLS proxy with client-certificate access control, a contender in bench/compare.ts. v1.8.4
  // with github.com/landlock-lsm/go-landlock replaced: the checksum database refuses the pseudo-version it pins
  // (see its go.mod). Stamped as its Makefile does. With cgo, as its release images build it: v1.8.4 does not
  // compile without (its PKCS#11 stub for !cgo has the wrong signature), so a C compiler is needed.
  ghostunnel: {
    dir: 'ghostunnel',
    pkg: 'github.com/ghostunnel/ghostunnel',
    files: ['go.mod', 'go.sum'],
    description: 'Ghostunnel v1.8.4',
    ldflags: '-X main.version=v1.8.4',
    env: { CGO_ENABLED: '1' },
  },
} as const satisfies Record<string, PeerSpec>;

export type PeerName = keyof typeof PEERS;

const here = import.meta.dirname;

export function cacheDir(): string {
  const base =
    process.env.KSP_CACHE_DIR ??
    join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'kube-svid-proxy');
  return join(base, 'peers');
}

function goBinary(): string | undefined {
  const found = spawnSync('go', ['version'], { encoding: 'utf8' });
  return found.status === 0 ? 'go' : undefined;
}

/** Builds the peer if it is not cached yet; returns the binary's path. Throws if Go is missing or the build fails. */
export function buildPeer(name: PeerName): string {
  const spec: PeerSpec = PEERS[name];
  const moduleDir = join(here, spec.dir);
  const hash = createHash('sha256');
  for (const file of spec.files) hash.update(file).update(readFileSync(join(moduleDir, file)));
  if (spec.ldflags !== undefined) hash.update('-ldflags').update(spec.ldflags);
  for (const [key, value] of Object.entries(spec.env ?? {})) hash.update(`env ${key}=${value}`);
  const dir = join(cacheDir(), `${name}-${hash.digest('hex').slice(0, 16)}`);
  const binary = join(dir, name);
  if (existsSync(binary)) return binary;
  if (goBinary() === undefined)
    throw new PeerUnavailableError(`Go is not installed, so ${spec.description} cannot be built`);
  mkdirSync(dir, { recursive: true });
  // Build beside the final name and rename: parallel test files may build the same peer at once.
  const partial = `${binary}.${process.pid}.partial`;
  process.stderr.write(`building ${name} (${spec.description}) into ${dir} ...\n`);
  const ldflags = spec.ldflags === undefined ? [] : ['-ldflags', spec.ldflags];
  execFileSync('go', ['build', '-trimpath', ...ldflags, '-o', partial, spec.pkg], {
    cwd: moduleDir,
    stdio: ['ignore', 'inherit', 'inherit'],
    env: {
      ...process.env,
      GOTOOLCHAIN: 'local',
      GOFLAGS: `${process.env.GOFLAGS ?? ''} -mod=readonly`.trim(),
      ...spec.env,
    },
  });
  renameSync(partial, binary);
  return binary;
}

export class PeerUnavailableError extends Error {
  override name = 'PeerUnavailableError';
}

/** True when a missing peer must fail the run instead of skipping (CI). */
export function peersRequired(): boolean {
  return process.env.KSP_REQUIRE_PEERS === '1';
}

/**
 * For tests: the peer's path, or a skip reason when Go is absent and peers are not required.
 * A build failure is never a skip.
 */
export function peer(name: PeerName): { path: string } | { skip: string } {
  try {
    return { path: buildPeer(name) };
  } catch (err) {
    if (err instanceof PeerUnavailableError && !peersRequired()) {
      return { skip: `${err.message}; set KSP_REQUIRE_PEERS=1 to make this a failure` };
    }
    throw err;
  }
}

if (import.meta.main) {
  const names = (process.argv.length > 2 ? process.argv.slice(2) : Object.keys(PEERS)) as PeerName[];
  for (const name of names) {
    if (!(name in PEERS)) {
      process.stderr.write(`unknown peer ${name}; known: ${Object.keys(PEERS).join(', ')}\n`);
      process.exit(2);
    }
    process.stdout.write(`${name}\t${buildPeer(name)}\n`);
  }
}
