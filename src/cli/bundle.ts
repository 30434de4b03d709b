/**
 * `kube-svid-proxy bundle show | list | set`: the agent's trust bundles, read from and written to its state
 * directory, so they work whether or not the agent runs (and need the same access to the directory as the agent:
 * run them as its user, e.g. with `kubectl exec`).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { CA_STATE_FILE, readPublishedBundle } from '../agent/ca-state.ts';
import { DEFAULT_STATE_DIR, loadAgentConfig } from '../agent/config.ts';
import { FEDERATION_STATUS_FILE } from '../agent/federation.ts';
import { StateDir } from '../config/statedir.ts';
import { FederationStore, type StoredBundle } from '../federation/store.ts';
import { SpiffeBundle, X509Bundle } from '../spiffe/bundle.ts';
import { KspError, SpiffeError } from '../spiffe/errors.ts';
import { TrustDomain } from '../spiffe/id.ts';
import { EXIT, err, out, UsageError } from './common.ts';
import { CliErrorCode } from './errors.ts';

const LOCATION = {
  'state-dir': { type: 'string' },
  config: { type: 'string', short: 'c' },
} as const;

/** The state directory: --state-dir, else agent.yaml's stateDir (--config), else the default. */
async function stateDirOf(values: { 'state-dir'?: string; config?: string }): Promise<string> {
  if (values['state-dir'] !== undefined && values.config !== undefined) {
    throw new UsageError('give --state-dir or --config, not both');
  }
  if (values['state-dir'] !== undefined) return values['state-dir'];
  if (values.config !== undefined)
    return (await loadAgentConfig(values.config)).stateDir ?? DEFAULT_STATE_DIR;
  return DEFAULT_STATE_DIR;
}

function format(value: string | undefined): 'spiffe' | 'pem' {
  const f = value ?? 'spiffe';
  if (f !== 'spiffe' && f !== 'pem')
    throw new UsageError(`--format must be spiffe or pem, got ${JSON.stringify(f)}`);
  return f;
}

/** Our own bundle, exactly as the agent last published it. */
async function ownBundle(dir: StateDir): Promise<SpiffeBundle> {
  const data = await dir.read(CA_STATE_FILE);
  const file = join(dir.path, CA_STATE_FILE);
  if (data === undefined) {
    throw new KspError(
      CliErrorCode.Bundle,
      `${file} does not exist: the agent has not run with this state directory yet (or it is not the agent's stateDir)`,
    );
  }
  try {
    return readPublishedBundle(data.toString('utf8'));
  } catch (cause) {
    throw new KspError(CliErrorCode.Bundle, `${file}: ${(cause as Error).message}`, { cause });
  }
}

async function show(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { ...LOCATION, format: { type: 'string' } },
  });
  if (positionals.length > 0)
    throw new UsageError(`bundle show takes no arguments, got ${positionals.join(' ')}`);
  const fmt = format(values.format);
  const bundle = await ownBundle(await StateDir.open(await stateDirOf(values), { create: false }));
  out(fmt === 'pem' ? bundle.x509Bundle.toPem() : `${bundle.marshal()}\n`);
  return EXIT.ok;
}

interface StatusEntry {
  trustDomain: string;
  url?: string;
  profile?: string;
  lastSuccess?: string;
  lastAttempt?: string;
  lastError?: { code: string; message: string; at: string };
  consecutiveFailures?: number;
}

function age(from: Date, now: Date): string {
  const s = Math.max(0, Math.round((now.getTime() - from.getTime()) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

async function list(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { ...LOCATION, json: { type: 'boolean' } },
  });
  if (positionals.length > 0)
    throw new UsageError(`bundle list takes no arguments, got ${positionals.join(' ')}`);
  const dir = await StateDir.open(await stateDirOf(values), { create: false });
  const stored = await (await FederationStore.open(dir)).list();
  const statusData = await dir.read(FEDERATION_STATUS_FILE);
  const statuses = new Map<string, StatusEntry>();
  if (statusData !== undefined) {
    try {
      for (const s of JSON.parse(statusData.toString('utf8')) as StatusEntry[])
        statuses.set(s.trustDomain, s);
    } catch {
      err(
        `note: ${join(dir.path, FEDERATION_STATUS_FILE)} is not readable JSON; showing stored bundles only\n`,
      );
    }
  }
  const now = new Date();
  const names = [...new Set([...stored.map((s) => s.bundle.trustDomain.name), ...statuses.keys()])].sort();
  const rows = names.map((name) => {
    const s = stored.find((b) => b.bundle.trustDomain.name === name);
    return { name, stored: s, status: statuses.get(name) };
  });
  if (values.json) {
    out(
      `${JSON.stringify(
        rows.map(({ name, stored: s, status }) => ({
          trustDomain: name,
          ...(s ? storedJson(s) : {}),
          ...(status ? { status } : {}),
        })),
        null,
        2,
      )}\n`,
    );
    return EXIT.ok;
  }
  if (rows.length === 0) {
    out(`no federated bundles in ${dir.path}\n`);
    return EXIT.ok;
  }
  for (const { name, stored: s, status } of rows) {
    out(`${name}\n`);
    if (s) {
      out(
        `  bundle:       ${s.bundle.x509Authorities.length} X.509 and ${s.bundle.jwtBundle.authorities.size} JWT authorities, ` +
          `sequence ${s.bundle.sequence ?? 'none'}\n`,
      );
      out(
        `  source:       ${s.source}${s.url ? ` (${s.url})` : ''}, at ${s.fetchedAt.toISOString()} (${age(s.fetchedAt, now)} ago)\n`,
      );
    } else {
      out('  bundle:       none held\n');
    }
    if (status) {
      if (status.url) out(`  endpoint:     ${status.url} (${status.profile})\n`);
      out(
        `  last success: ${status.lastSuccess ? `${status.lastSuccess} (${age(new Date(status.lastSuccess), now)} ago)` : 'never'}\n`,
      );
      if (status.lastError && (status.consecutiveFailures ?? 0) > 0) {
        out(
          `  last error:   ${status.lastError.code} at ${status.lastError.at}: ${status.lastError.message} ` +
            `(${status.consecutiveFailures} failure(s) in a row)\n`,
        );
      }
    }
  }
  return EXIT.ok;
}

function storedJson(s: StoredBundle): Record<string, unknown> {
  return {
    source: s.source,
    ...(s.url ? { url: s.url } : {}),
    fetchedAt: s.fetchedAt.toISOString(),
    sequence: s.bundle.sequence?.toString(),
    x509Authorities: s.bundle.x509Authorities.length,
    jwtAuthorities: s.bundle.jwtBundle.authorities.size,
  };
}

async function set(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      ...LOCATION,
      'trust-domain': { type: 'string' },
      file: { type: 'string' },
      format: { type: 'string' },
    },
  });
  if (positionals.length > 0)
    throw new UsageError(`bundle set takes no arguments, got ${positionals.join(' ')}`);
  if (values['trust-domain'] === undefined) throw new UsageError('bundle set needs --trust-domain NAME');
  if (values.file === undefined) throw new UsageError('bundle set needs --file FILE (- for standard input)');
  let trustDomain: TrustDomain;
  try {
    trustDomain = TrustDomain.parse(values['trust-domain']);
  } catch (e) {
    throw new UsageError(`--trust-domain: ${(e as Error).message}`);
  }
  const fmt = format(values.format);
  const what = values.file === '-' ? 'standard input' : values.file;
  let data: Buffer;
  try {
    data = values.file === '-' ? await readStdin() : await readFile(values.file);
  } catch (cause) {
    throw new KspError(CliErrorCode.Bundle, `cannot read ${what}: ${(cause as Error).message}`, { cause });
  }
  let bundle: SpiffeBundle;
  try {
    bundle =
      fmt === 'spiffe'
        ? SpiffeBundle.parse(trustDomain, data.toString('utf8'))
        : new SpiffeBundle(trustDomain, { x509Authorities: X509Bundle.parse(trustDomain, data).authorities });
  } catch (cause) {
    if (cause instanceof SpiffeError) throw new KspError(cause.code, `${what}: ${cause.message}`, { cause });
    throw cause;
  }
  if (bundle.x509Authorities.length === 0) {
    throw new KspError(
      CliErrorCode.Bundle,
      `${what}: the bundle has no X.509 authority; it could authenticate nothing`,
    );
  }
  const dir = await StateDir.open(await stateDirOf(values));
  const caState = await dir.read(CA_STATE_FILE);
  if (
    caState !== undefined &&
    readPublishedBundle(caState.toString('utf8')).trustDomain.equals(trustDomain)
  ) {
    throw new KspError(
      CliErrorCode.Bundle,
      `${trustDomain.name} is this agent's own trust domain; its bundle comes from its CA`,
    );
  }
  const store = await FederationStore.open(dir);
  await store.save(trustDomain, { bundle, source: 'set', fetchedAt: new Date() });
  out(
    `set the bundle of ${trustDomain.name} (${bundle.x509Authorities.length} X.509, ${bundle.jwtBundle.authorities.size} JWT authorities) ` +
      `in ${store.path}\n`,
  );
  err('a running agent takes it on SIGHUP (kill -HUP <agent pid>), or at its next start\n');
  return EXIT.ok;
}

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

export async function bundleCommand(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  switch (sub) {
    case 'show':
      return show(rest);
    case 'list':
      return list(rest);
    case 'set':
      return set(rest);
    default:
      throw new UsageError(
        `unknown bundle subcommand ${JSON.stringify(sub ?? '')} (expected: show, list, set)`,
      );
  }
}
