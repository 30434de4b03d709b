import type { X509Certificate } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { DEFAULT_AGENT_SOCKET } from '../agent/config.ts';
import { parseDuration } from '../config/duration.ts';
import type { BundleSet } from '../spiffe/bundle.ts';
import { WorkloadApiError, WorkloadClient, type X509Context } from '../workload/client.ts';
import { WorkloadError } from '../workload/errors.ts';
import { ENDPOINT_SOCKET_ENV } from '../workload/proto.ts';
import { EXIT, err, out, UsageError } from './common.ts';

const COMMON = {
  socket: { type: 'string' },
  json: { type: 'boolean' },
  timeout: { type: 'string' },
} as const;

function client(values: { socket?: string | undefined; timeout?: string | undefined }): WorkloadClient {
  const address = values.socket ?? process.env[ENDPOINT_SOCKET_ENV] ?? `unix://${DEFAULT_AGENT_SOCKET}`;
  let timeoutMs = 5000;
  if (values.timeout !== undefined) {
    try {
      timeoutMs = parseDuration(values.timeout) * 1000;
    } catch (e) {
      throw new UsageError(`--timeout: ${(e as Error).message}`);
    }
  }
  try {
    return new WorkloadClient({ address, timeoutMs });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

const iso = (cert: X509Certificate): string => cert.validToDate.toISOString();

function pem(certs: readonly X509Certificate[]): string {
  return certs.map((c) => c.toString()).join('');
}

function bundlesJson(set: BundleSet): Record<string, unknown> {
  return Object.fromEntries(
    set.bundles().map((b) => [
      b.trustDomain.name,
      {
        x509Authorities: b.x509Authorities.map((c) => ({
          subject: c.subject.replaceAll('\n', ', '),
          notAfter: iso(c),
        })),
        jwtAuthorities: [...b.jwtAuthorities.keys()],
      },
    ]),
  );
}

function printBundles(set: BundleSet): void {
  for (const b of set.bundles()) {
    out(`bundle ${b.trustDomain.idString}\n`);
    for (const c of b.x509Authorities)
      out(`  X.509 authority  ${c.subject.replaceAll('\n', ', ')}  valid until ${iso(c)}\n`);
    for (const kid of b.jwtAuthorities.keys()) out(`  JWT authority    kid ${kid}\n`);
  }
}

async function writeX509(dir: string, ctx: X509Context): Promise<string[]> {
  await mkdir(dir, { recursive: true });
  const written: string[] = [];
  const put = async (name: string, data: string, mode = 0o644): Promise<void> => {
    const file = join(dir, name);
    await writeFile(file, data, { mode });
    written.push(file);
  };
  for (const [i, svid] of ctx.svids.entries()) {
    await put(`svid.${i}.pem`, pem(svid.certificates));
    await put(`svid.${i}.key`, svid.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(), 0o600);
    const own = ctx.bundles.getX509Bundle(svid.id.trustDomain);
    if (own) await put(`bundle.${i}.pem`, pem(own.authorities));
  }
  const ownDomains = new Set(ctx.svids.map((s) => s.id.trustDomain.name));
  for (const b of ctx.bundles.x509Bundles()) {
    if (!ownDomains.has(b.trustDomain.name))
      await put(`federated_bundle.${b.trustDomain.name}.pem`, pem(b.authorities));
  }
  return written;
}

async function fetchX509(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { ...COMMON, write: { type: 'string' } } });
  const c = client(values);
  try {
    const started = performance.now();
    const ctx = await c.fetchX509Context();
    const ms = performance.now() - started;
    const written = values.write ? await writeX509(values.write, ctx) : [];
    if (values.json) {
      out(
        `${JSON.stringify(
          {
            svids: ctx.svids.map((s) => ({
              spiffeId: s.id.toString(),
              hint: s.hint ?? '',
              notAfter: iso(s.certificates[0] as X509Certificate),
              chainLength: s.certificates.length,
            })),
            bundles: bundlesJson(ctx.bundles),
            written,
          },
          null,
          2,
        )}\n`,
      );
    } else {
      out(`received ${ctx.svids.length} X.509-SVID(s) in ${ms.toFixed(1)} ms\n`);
      for (const [i, s] of ctx.svids.entries()) {
        const leaf = s.certificates[0] as X509Certificate;
        out(`\nSVID ${i}${i === 0 ? ' (default)' : ''}\n`);
        out(`  SPIFFE ID    ${s.id}\n`);
        if (s.hint) out(`  hint         ${s.hint}\n`);
        out(`  valid from   ${leaf.validFromDate.toISOString()}\n  valid until  ${iso(leaf)}\n`);
        out(
          `  chain        ${s.certificates.length} certificate(s), issuer ${leaf.issuer.replaceAll('\n', ', ')}\n`,
        );
      }
      out('\n');
      printBundles(ctx.bundles);
      for (const file of written) out(`wrote ${file}\n`);
    }
    return EXIT.ok;
  } finally {
    c.close();
  }
}

async function fetchJwt(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { ...COMMON, audience: { type: 'string', multiple: true }, 'spiffe-id': { type: 'string' } },
  });
  if (!values.audience || values.audience.length === 0)
    throw new UsageError('api fetch jwt needs --audience');
  const c = client(values);
  try {
    const svids = await c.fetchJwtSvids(values.audience, values['spiffe-id']);
    if (values.json) {
      const list = svids.map((s) => ({
        spiffeId: s.id.toString(),
        hint: s.hint ?? '',
        expiry: s.expiry.toISOString(),
        audience: s.audience,
        token: s.token,
      }));
      out(`${JSON.stringify(list, null, 2)}\n`);
    } else {
      for (const s of svids) {
        out(`SPIFFE ID  ${s.id}\n`);
        if (s.hint) out(`hint       ${s.hint}\n`);
        out(
          `audience   ${s.audience.join(', ')}\nexpires    ${s.expiry.toISOString()}\ntoken\n  ${s.token}\n\n`,
        );
      }
    }
    return EXIT.ok;
  } finally {
    c.close();
  }
}

async function fetchBundles(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: COMMON });
  const c = client(values);
  try {
    const [x509, jwt] = await Promise.all([
      c.fetchX509Bundles(),
      c.fetchJwtBundles({
        onIgnoredKey: (td, index, why) => err(`note: JWT bundle of ${td}: keys[${index}] ignored: ${why}\n`),
      }),
    ]);
    if (values.json) {
      out(`${JSON.stringify({ x509: bundlesJson(x509), jwt: bundlesJson(jwt) }, null, 2)}\n`);
    } else {
      printBundles(x509);
      printBundles(jwt);
    }
    return EXIT.ok;
  } finally {
    c.close();
  }
}

async function validateJwt(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { ...COMMON, audience: { type: 'string' }, svid: { type: 'string' } },
  });
  if (!values.audience) throw new UsageError('api validate jwt needs --audience');
  if (!values.svid) throw new UsageError('api validate jwt needs --svid TOKEN');
  const c = client(values);
  try {
    const { id, claims } = await c.validateJwtSvid(values.svid, values.audience);
    if (values.json) out(`${JSON.stringify({ spiffeId: id.toString(), claims }, null, 2)}\n`);
    else out(`valid: ${id}\nclaims: ${JSON.stringify(claims)}\n`);
    return EXIT.ok;
  } finally {
    c.close();
  }
}

export async function apiCommand(args: string[]): Promise<number> {
  const [verb, what, ...rest] = args;
  try {
    if (verb === 'fetch' && what === 'x509') return await fetchX509(rest);
    if (verb === 'fetch' && what === 'jwt') return await fetchJwt(rest);
    if (verb === 'fetch' && what === 'bundles') return await fetchBundles(rest);
    if (verb === 'validate' && what === 'jwt') return await validateJwt(rest);
  } catch (e) {
    if (e instanceof WorkloadApiError) {
      err(`kube-svid-proxy api: ${e.message}\n`);
      return EXIT.refused;
    }
    if (e instanceof WorkloadError) {
      err(`kube-svid-proxy api: ${e.code}: ${e.message}\n`);
      return EXIT.refused;
    }
    throw e;
  }
  throw new UsageError(
    `unknown api subcommand ${JSON.stringify([verb, what].filter(Boolean).join(' '))} ` +
      '(expected: fetch x509 | fetch jwt | fetch bundles | validate jwt)',
  );
}
