/**
 * `npm run certs:dev [-- --out DIR]`: writes the development PKI from `devpki.ts` to disk.
 *
 * DEVELOPMENT ONLY: the CA private keys end up on disk in the clear. Never use this material in production.
 */
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { bundleJson, type DevIdentity, type DevTrustDomain, makeDevPki } from './devpki.ts';

const DEFAULT_OUT = join(import.meta.dirname, 'out');

const USAGE = `Usage: node certs-dev/generate.ts [--out DIR]

Generates the kube-svid-proxy development PKI (DEVELOPMENT ONLY: private keys are written to disk).

Options:
  -o, --out DIR   output directory (default: ${relative(process.cwd(), DEFAULT_OUT) || '.'})
  -h, --help      show this help
`;

interface OutputFile {
  readonly path: string;
  readonly contents: string;
  readonly secret: boolean;
  readonly description: string;
}

function trustDomainFiles(td: DevTrustDomain): OutputFile[] {
  const dir = td.name;
  const files: OutputFile[] = [
    {
      path: join(dir, 'root.crt.pem'),
      contents: td.rootPem,
      secret: false,
      description: `${td.name} root CA certificate`,
    },
    {
      path: join(dir, 'root.key.pem'),
      contents: td.rootKeyPem,
      secret: true,
      description: `${td.name} root CA private key`,
    },
  ];
  if (td.intermediatePem !== undefined && td.intermediateKeyPem !== undefined) {
    files.push(
      {
        path: join(dir, 'intermediate.crt.pem'),
        contents: td.intermediatePem,
        secret: false,
        description: `${td.name} intermediate CA certificate (issued by the root)`,
      },
      {
        path: join(dir, 'intermediate.key.pem'),
        contents: td.intermediateKeyPem,
        secret: true,
        description: `${td.name} intermediate CA private key`,
      },
    );
  }
  files.push(
    {
      path: join(dir, 'bundle.json'),
      contents: `${bundleJson(td)}\n`,
      secret: false,
      description: `${td.name} SPIFFE bundle (JWK Set with the root)`,
    },
    {
      path: join(dir, 'bundle.pem'),
      contents: td.rootPem,
      secret: false,
      description: `${td.name} X.509 trust bundle (root certificate PEM)`,
    },
  );
  return files;
}

function identityFiles(id: DevIdentity): OutputFile[] {
  return [
    {
      path: join('svids', `${id.file}.crt.pem`),
      contents: id.chainPem,
      secret: false,
      description: id.description,
    },
    {
      path: join('svids', `${id.file}.key.pem`),
      contents: id.keyPem,
      secret: true,
      description: `private key for ${id.file}`,
    },
  ];
}

async function writeOutput(outDir: string, file: OutputFile): Promise<void> {
  const target = join(outDir, file.path);
  const dir = resolve(target, '..');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const mode = file.secret ? 0o600 : 0o644;
  await writeFile(target, file.contents, { mode });
  // `mode` only applies when the file is created; tighten (or reset) it when overwriting an existing file.
  await chmod(target, mode);
}

async function main(argv: string[]): Promise<number> {
  let values: { out?: string; help?: boolean };
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        out: { type: 'string', short: 'o' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    process.stderr.write(`certs:dev: ${err instanceof Error ? err.message : String(err)}\n\n${USAGE}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (values.out === '') {
    process.stderr.write(`certs:dev: --out needs a directory\n\n${USAGE}`);
    return 2;
  }

  const outDir = values.out === undefined ? DEFAULT_OUT : resolve(values.out);
  const pki = await makeDevPki();
  const files = [
    ...trustDomainFiles(pki.hub),
    ...trustDomainFiles(pki.spoke),
    ...Object.values(pki.good).flatMap(identityFiles),
    ...Object.values(pki.bad).flatMap(identityFiles),
  ];

  await mkdir(outDir, { recursive: true, mode: 0o700 });
  await chmod(outDir, 0o700);
  process.stdout.write(`Writing development PKI to ${outDir} (DEVELOPMENT ONLY: private keys on disk)\n`);
  const width = Math.max(...files.map((f) => f.path.length));
  for (const file of files) {
    await writeOutput(outDir, file);
    process.stdout.write(`  ${file.path.padEnd(width)}  ${file.description}\n`);
  }
  process.stdout.write(
    `${files.length} files written. Leaf SVIDs are valid for 1 hour: re-run to refresh.\n`,
  );
  return 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`certs:dev: failed: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
}
