/**
 * `kube-svid-proxy credential`: a client-go exec credential plugin. kubectl (or any client-go program) runs
 * it when it needs a client certificate; it fetches this process's X.509-SVID from the Workload API at that
 * moment and prints an ExecCredential whose expiry is the SVID's half-life, so the client asks again well
 * before the certificate expires. `credential kubeconfig` prints a kubeconfig that runs it.
 */
import type { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { extname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { DEFAULT_AGENT_SOCKET } from '../agent/config.ts';
import { parseDuration } from '../config/duration.ts';
import { KspError } from '../spiffe/errors.ts';
import type { X509Svid } from '../spiffe/x509svid.ts';
import { WorkloadApiError, WorkloadClient } from '../workload/client.ts';
import { ENDPOINT_SOCKET_ENV, parseEndpointAddress } from '../workload/proto.ts';
import { EXIT, err, out, UsageError } from './common.ts';
import { CliErrorCode } from './errors.ts';

export const EXEC_CREDENTIAL_V1 = 'client.authentication.k8s.io/v1';
export const EXEC_CREDENTIAL_V1BETA1 = 'client.authentication.k8s.io/v1beta1';
export const EXEC_INFO_ENV = 'KUBERNETES_EXEC_INFO';

type ExecCredentialVersion = typeof EXEC_CREDENTIAL_V1 | typeof EXEC_CREDENTIAL_V1BETA1;

/** A refusal printed on stderr with exit 1 (never carrying key material). */
class CredentialError extends KspError {
  constructor(message: string) {
    super(CliErrorCode.Credential, message);
    this.name = 'CredentialError';
  }
}

/** The Workload API address: the flag, else $SPIFFE_ENDPOINT_SOCKET, else the bundled agent's default. */
function address(socket: string | undefined): string {
  const value = socket ?? process.env[ENDPOINT_SOCKET_ENV] ?? `unix://${DEFAULT_AGENT_SOCKET}`;
  try {
    return `unix://${parseEndpointAddress(value)}`;
  } catch (e) {
    throw new UsageError(`--socket: ${(e as Error).message}`);
  }
}

/**
 * The ExecCredential version to answer with: what client-go asked for in KUBERNETES_EXEC_INFO (v1 or
 * v1beta1), v1 when it is absent. `spec.interactive` is irrelevant: the plugin never prompts.
 */
export function requestedVersion(info: string | undefined): ExecCredentialVersion {
  if (info === undefined || info.trim() === '') return EXEC_CREDENTIAL_V1;
  let parsed: unknown;
  try {
    parsed = JSON.parse(info);
  } catch {
    throw new CredentialError(`${EXEC_INFO_ENV} is not JSON`);
  }
  const apiVersion =
    typeof parsed === 'object' && parsed !== null && 'apiVersion' in parsed ? parsed.apiVersion : undefined;
  if (apiVersion === undefined || apiVersion === EXEC_CREDENTIAL_V1) return EXEC_CREDENTIAL_V1;
  if (apiVersion === EXEC_CREDENTIAL_V1BETA1) return EXEC_CREDENTIAL_V1BETA1;
  throw new CredentialError(
    `${EXEC_INFO_ENV} asks for apiVersion ${JSON.stringify(apiVersion)}; ` +
      `this plugin answers ${EXEC_CREDENTIAL_V1} or ${EXEC_CREDENTIAL_V1BETA1}`,
  );
}

/**
 * When the client should ask again: the leaf's half-life, or, past it (the agent has not rotated yet),
 * halfway through what is left. Whole seconds, always before notAfter.
 */
export function refreshAt(leaf: X509Certificate, now = Date.now()): Date {
  const from = leaf.validFromDate.getTime();
  const to = leaf.validToDate.getTime();
  if (to <= now) {
    throw new CredentialError(
      `the Workload API returned an X.509-SVID that expired at ${rfc3339(leaf.validToDate)}`,
    );
  }
  const half = from + (to - from) / 2;
  const at = half > now ? half : now + (to - now) / 2;
  return new Date(Math.floor(at / 1000) * 1000);
}

/** RFC 3339 in UTC without fractional seconds, as Kubernetes writes times. */
function rfc3339(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/** The ExecCredential object client-go reads from the plugin's stdout. */
export function execCredential(
  svid: X509Svid,
  apiVersion: ExecCredentialVersion,
  now = Date.now(),
): Record<string, unknown> {
  const leaf = svid.certificates[0];
  if (leaf === undefined)
    throw new CredentialError('the Workload API returned an X.509-SVID without certificates');
  return {
    apiVersion,
    kind: 'ExecCredential',
    status: {
      expirationTimestamp: rfc3339(refreshAt(leaf, now)),
      clientCertificateData: svid.certificates.map((c) => c.toString()).join(''),
      clientKeyData: svid.privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(),
    },
  };
}

async function credential(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { socket: { type: 'string' }, hint: { type: 'string' }, timeout: { type: 'string' } },
  });
  let timeoutMs = 5000;
  if (values.timeout !== undefined) {
    try {
      timeoutMs = parseDuration(values.timeout) * 1000;
    } catch (e) {
      throw new UsageError(`--timeout: ${(e as Error).message}`);
    }
  }
  const apiVersion = requestedVersion(process.env[EXEC_INFO_ENV]);
  const client = new WorkloadClient({ address: address(values.socket), timeoutMs });
  let svid: X509Svid | undefined;
  try {
    const ctx = await client.fetchX509Context();
    svid = values.hint === undefined ? ctx.svids[0] : ctx.svids.find((s) => s.hint === values.hint);
    if (svid === undefined) {
      const have = ctx.svids.map((s) => `${s.id}${s.hint ? ` (hint ${s.hint})` : ''}`).join(', ');
      throw new CredentialError(
        `no X.509-SVID with hint ${JSON.stringify(values.hint)}; this process has ${have}`,
      );
    }
  } finally {
    client.close();
  }
  out(`${JSON.stringify(execCredential(svid, apiVersion), null, 2)}\n`);
  return EXIT.ok;
}

/** The CLI entry a kubeconfig should run: main.ts from a checkout, main.js from the built package. */
function cliEntry(): string {
  return fileURLToPath(new URL(`./main${extname(fileURLToPath(import.meta.url))}`, import.meta.url));
}

async function kubeconfig(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      server: { type: 'string' },
      socket: { type: 'string' },
      hint: { type: 'string' },
      'ca-file': { type: 'string' },
      name: { type: 'string' },
    },
  });
  if (values.server === undefined) throw new UsageError('credential kubeconfig needs --server URL');
  let server: URL;
  try {
    server = new URL(values.server);
  } catch {
    throw new UsageError(`--server is not a URL: ${JSON.stringify(values.server)}`);
  }
  if (server.protocol !== 'https:')
    throw new UsageError('--server must be https:// (a client certificate needs TLS)');
  const name = values.name ?? 'kube-svid-proxy';
  if (name === '') throw new UsageError('--name is empty');
  const cluster: Record<string, string> = { server: values.server };
  if (values['ca-file'] !== undefined) {
    const file = values['ca-file'];
    let pem: string;
    try {
      pem = await readFile(file, 'utf8');
    } catch (e) {
      throw new CredentialError(`--ca-file ${file}: ${(e as Error).message}`);
    }
    if (!pem.includes('-----BEGIN CERTIFICATE-----')) {
      throw new CredentialError(`--ca-file ${file}: no PEM CERTIFICATE block`);
    }
    cluster['certificate-authority-data'] = Buffer.from(pem).toString('base64');
  }
  const pluginArgs = [
    cliEntry(),
    'credential',
    '--socket',
    address(values.socket),
    ...(values.hint === undefined ? [] : ['--hint', values.hint]),
  ];
  const config = {
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name, cluster }],
    users: [
      {
        name,
        user: {
          exec: {
            apiVersion: EXEC_CREDENTIAL_V1,
            command: process.execPath,
            args: pluginArgs,
            provideClusterInfo: false,
            interactiveMode: 'Never',
          },
        },
      },
    ],
    contexts: [{ name, context: { cluster: name, user: name } }],
    'current-context': name,
  };
  out(stringify(config, { lineWidth: 0 }));
  return EXIT.ok;
}

export async function credentialCommand(args: string[]): Promise<number> {
  try {
    if (args[0] === 'kubeconfig') return await kubeconfig(args.slice(1));
    return await credential(args);
  } catch (e) {
    if (e instanceof WorkloadApiError || e instanceof CredentialError) {
      err(`kube-svid-proxy credential: ${e.message}\n`);
      return EXIT.refused;
    }
    throw e;
  }
}
