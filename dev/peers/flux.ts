/**
 * The CustomResourceDefinitions of the Flux controller peers (dev/peers/peers.ts), for a test control plane to
 * apply before it starts them: the YAML files each controller module ships in `config/crd/bases/`, read from the
 * Go module cache at exactly the version the wrapper module pins, so CRDs and binaries cannot drift apart.
 *
 *   for (const file of fluxCrds()) await kubectl(['apply', '--server-side', '-f', file]);
 *
 * The CRDs are in the controller module, not in its `/api` module (which holds the Go types only). The module
 * is in GOMODCACHE once its peer was built (`peer('flux-source-controller')`); before that, or after
 * `go clean -modcache`, fluxCrds() throws saying so.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { PEERS } from './peers.ts';

const CONTROLLERS = ['flux-source-controller', 'flux-kustomize-controller'] as const;

/** `go list -m -json <module>` in the wrapper module: where the module cache holds the pinned version. */
function moduleDir(wrapperDir: string, module: string): string {
  let output: string;
  try {
    output = execFileSync('go', ['list', '-m', '-json', module], {
      cwd: wrapperDir,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        GOTOOLCHAIN: 'local',
        // readonly: listing must never rewrite the pinned go.mod/go.sum, nor download anything new by resolving.
        GOFLAGS: `${process.env.GOFLAGS ?? ''} -mod=readonly`.trim(),
      },
    });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer | string }).stderr?.toString().trim();
    throw new Error(
      `go list -m -json ${module} in ${wrapperDir} failed: ${stderr || (err as Error).message}`,
    );
  }
  const info = JSON.parse(output) as {
    Path: string;
    Version?: string;
    Dir?: string;
    Error?: { Err: string };
  };
  if (info.Error !== undefined) throw new Error(`go list -m ${module}: ${info.Error.Err}`);
  // Dir is absent when the module is required but not downloaded yet.
  if (info.Dir === undefined || !existsSync(info.Dir)) {
    throw new Error(
      `${module}@${info.Version ?? '?'} is not in the Go module cache; build its peer first ` +
        `(node dev/peers/peers.ts ${CONTROLLERS.join(' ')})`,
    );
  }
  return info.Dir;
}

/**
 * Absolute paths of the CRD YAML files of source-controller (GitRepository, OCIRepository, HelmRepository,
 * HelmChart, Bucket, ExternalArtifact) and kustomize-controller (Kustomization), sorted per module. Throws when a
 * module is not in the cache or ships no CRDs.
 */
export function fluxCrds(): string[] {
  const files: string[] = [];
  for (const name of CONTROLLERS) {
    const spec = PEERS[name];
    const dir = join(moduleDir(join(import.meta.dirname, spec.dir), spec.pkg), 'config', 'crd', 'bases');
    const yamls = existsSync(dir) ? readdirSync(dir).filter((file) => /\.ya?ml$/.test(file)) : [];
    if (yamls.length === 0) throw new Error(`${spec.description}: no CRD YAML files in ${dir}`);
    files.push(...yamls.sort().map((file) => join(dir, file)));
  }
  return files;
}

if (import.meta.main) {
  for (const file of fluxCrds()) process.stdout.write(`${file}\n`);
}
