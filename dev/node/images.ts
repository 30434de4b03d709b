/**
 * The test node's images, built here because no registry is reachable: each is written as an OCI image archive
 * (an OCI layout in a tar, as `ctr -n k8s.io images import` takes it) and cached outside the repository.
 *
 *   ksp.local/pause:dev     our static pause program (dev/peers/pause), containerd's sandbox image
 *   ksp.local/busybox:dev   Debian's busybox-static with a symlink per applet (sh, sleep, cat, echo, nc, …)
 *   kube-svid-proxy:dev     the product (deploy/image/build.ts; containerd: docker.io/library/kube-svid-proxy:dev)
 *
 *   node dev/node/images.ts [--product]     write the archives and print their paths
 *
 * Pods name them with `imagePullPolicy: Never` (or IfNotPresent): nothing is ever pulled.
 */
import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { buildImage, reproducibleTar } from '../../deploy/image/build.ts';
import { PeerUnavailableError, peer } from '../peers/peers.ts';
import { HOST } from './setup.ts';

const run = promisify(execFile);

export const PAUSE_IMAGE = 'ksp.local/pause:dev';
export const BUSYBOX_IMAGE = 'ksp.local/busybox:dev';
/** What the deploy/ manifests name (kube-svid-proxy:dev), as containerd stores it. */
export const PRODUCT_IMAGE = 'docker.io/library/kube-svid-proxy:dev';

/** Bump when what this file writes changes, so archives written by an older version are not reused. */
const FORMAT_VERSION = '1';

export function nodeCacheDir(): string {
  const base =
    process.env.KSP_CACHE_DIR ??
    join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'kube-svid-proxy');
  return join(base, 'node');
}

const sha256 = (data: string | Uint8Array): string => createHash('sha256').update(data).digest('hex');
const json = (value: unknown): Buffer => Buffer.from(JSON.stringify(value));

/** A file system entry of a layer. */
type Entry =
  | { readonly path: string; readonly mode: number; readonly source: string }
  | { readonly path: string; readonly mode: number; readonly text: string }
  | { readonly path: string; readonly mode: number; readonly dir: true }
  | { readonly path: string; readonly symlink: string };

interface ImageSpec {
  /** Full reference, e.g. ksp.local/busybox:dev. */
  readonly name: string;
  readonly entries: readonly Entry[];
  readonly config: Record<string, unknown>;
}

/**
 * Writes a one-layer image as an OCI archive (uncompressed layer, sorted entries, file times 0, root-owned:
 * equal inputs give equal digests) to `archive`.
 */
function writeArchive(spec: ImageSpec, archive: string): void {
  const work = mkdtempSync(join(tmpdir(), 'ksp-node-image-'));
  try {
    const root = join(work, 'rootfs');
    mkdirSync(root);
    for (const e of [...spec.entries].sort((a, b) => (a.path < b.path ? -1 : 1))) {
      const target = join(root, e.path);
      mkdirSync(dirname(target), { recursive: true });
      if ('symlink' in e) symlinkSync(e.symlink, target);
      else if ('dir' in e) mkdirSync(target, { recursive: true });
      else writeFileSync(target, 'source' in e ? readFileSync(e.source) : e.text);
      if (!('symlink' in e)) chmodSync(target, e.mode);
    }
    const tops = [...new Set(spec.entries.map((e) => e.path.split('/')[0] ?? ''))].sort();
    const layer = join(work, 'layer.tar');
    execFileSync('tar', ['--create', `--file=${layer}`, ...reproducibleTar(0), '-C', root, ...tops], {
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const layerBytes = readFileSync(layer);
    const layerDigest = `sha256:${sha256(layerBytes)}`;
    const config = json({
      architecture: 'amd64',
      os: 'linux',
      config: spec.config,
      rootfs: { type: 'layers', diff_ids: [layerDigest] },
      history: [{ created_by: 'dev/node/images.ts' }],
    });
    const configDigest = `sha256:${sha256(config)}`;
    const manifest = json({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: {
        mediaType: 'application/vnd.oci.image.config.v1+json',
        digest: configDigest,
        size: config.length,
      },
      layers: [
        { mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: layerDigest, size: layerBytes.length },
      ],
    });
    const manifestDigest = `sha256:${sha256(manifest)}`;
    const index = json({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          digest: manifestDigest,
          size: manifest.length,
          platform: { architecture: 'amd64', os: 'linux' },
          annotations: {
            // What `ctr images import` names the image (it would prefix a bare ref.name with "import-<date>").
            'io.containerd.image.name': spec.name,
            'org.opencontainers.image.ref.name': spec.name.slice(spec.name.lastIndexOf(':') + 1),
          },
        },
      ],
    });
    const layout = join(work, 'layout');
    const blobs = join(layout, 'blobs', 'sha256');
    mkdirSync(blobs, { recursive: true });
    writeFileSync(join(layout, 'oci-layout'), json({ imageLayoutVersion: '1.0.0' }));
    writeFileSync(join(layout, 'index.json'), index);
    writeFileSync(join(blobs, configDigest.slice(7)), config);
    writeFileSync(join(blobs, manifestDigest.slice(7)), manifest);
    renameSync(layer, join(blobs, layerDigest.slice(7)));
    mkdirSync(dirname(archive), { recursive: true });
    const partial = `${archive}.${process.pid}.partial`;
    execFileSync(
      'tar',
      [
        '--create',
        `--file=${partial}`,
        ...reproducibleTar(0),
        '-C',
        layout,
        'oci-layout',
        'index.json',
        'blobs',
      ],
      { stdio: ['ignore', 'ignore', 'inherit'] },
    );
    renameSync(partial, archive);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** The archive for `spec`, written unless a cached one with the same inputs exists. */
function cachedArchive(label: string, spec: ImageSpec): string {
  const hash = createHash('sha256')
    .update(FORMAT_VERSION)
    .update(spec.name)
    .update(JSON.stringify(spec.config));
  for (const e of spec.entries) {
    hash.update(JSON.stringify(e));
    if ('source' in e) hash.update(readFileSync(e.source));
  }
  const archive = join(nodeCacheDir(), 'images', `${label}-${hash.digest('hex').slice(0, 16)}.oci.tar`);
  if (!existsSync(archive)) writeArchive(spec, archive);
  return archive;
}

function peerBinary(name: 'pause'): string {
  const found = peer(name);
  if ('skip' in found) throw new PeerUnavailableError(found.skip);
  return found.path;
}

const PASSWD = 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n';
const GROUP = 'root:x:0:\nnogroup:x:65534:\n';

/** ksp.local/pause:dev: /pause alone, run as 65535 like Kubernetes' own pause image. */
export function pauseArchive(): string {
  return cachedArchive('pause', {
    name: PAUSE_IMAGE,
    entries: [{ path: 'pause', mode: 0o755, source: peerBinary('pause') }],
    config: { User: '65535:65535', Entrypoint: ['/pause'], WorkingDir: '/' },
  });
}

/** ksp.local/busybox:dev: Debian's static busybox as /bin/busybox and every applet it lists as a symlink. */
export function busyboxArchive(): string {
  const applets = execFileSync(HOST.busybox, ['--list'], { encoding: 'utf8' })
    .split('\n')
    .filter((name) => /^[\w.[\]-]+$/.test(name) && name !== 'busybox');
  const entries: Entry[] = [
    { path: 'bin/busybox', mode: 0o755, source: HOST.busybox },
    ...applets.map((name): Entry => ({ path: `bin/${name}`, symlink: 'busybox' })),
    // For `#!/usr/bin/env sh` scripts.
    { path: 'usr/bin/env', symlink: '../../bin/busybox' },
    { path: 'etc/passwd', mode: 0o644, text: PASSWD },
    { path: 'etc/group', mode: 0o644, text: GROUP },
    { path: 'root', mode: 0o700, dir: true },
    { path: 'tmp', mode: 0o1777, dir: true },
    ...['dev', 'proc', 'sys', 'etc', 'var', 'run'].map((path): Entry => ({ path, mode: 0o755, dir: true })),
  ];
  return cachedArchive('busybox', {
    name: BUSYBOX_IMAGE,
    entries,
    config: { Env: ['PATH=/bin:/usr/bin'], Cmd: ['sh'], WorkingDir: '/' },
  });
}

/**
 * The product's image (deploy/image/build.ts: `npm run build`, then the archive; its layers are cached), written
 * into the node's cache so that it does not race with `npm run image` or the image test over the default path.
 */
export async function productArchive(
  options: { build?: boolean; log?: (line: string) => void } = {},
): Promise<string> {
  const image = await buildImage({
    out: join(nodeCacheDir(), 'images', 'kube-svid-proxy.oci.tar'),
    build: options.build ?? true,
    log: options.log ?? (() => {}),
  });
  return image.archive;
}

/** Imports an archive into containerd's `k8s.io` namespace (the kubelet's), unpacked for its snapshotter. */
export async function importArchive(containerdSocket: string, archive: string): Promise<void> {
  if (!statSync(archive).isFile()) throw new Error(`${archive} is not a file`);
  await run(HOST.ctr, ['--address', containerdSocket, '--namespace', 'k8s.io', 'images', 'import', archive], {
    maxBuffer: 16 * 1024 * 1024,
  });
}

if (import.meta.main) {
  process.stdout.write(`${PAUSE_IMAGE}\t${pauseArchive()}\n`);
  process.stdout.write(`${BUSYBOX_IMAGE}\t${busyboxArchive()}\n`);
  if (process.argv.includes('--product'))
    process.stdout.write(
      `${PRODUCT_IMAGE}\t${await productArchive({ log: (l) => process.stderr.write(`${l}\n`) })}\n`,
    );
}
