#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { isAgentError } from '../agent/errors.ts';
import { ConfigReadError } from '../config/common.ts';
import { isProxyError } from '../proxy/errors.ts';
import { KspError } from '../spiffe/errors.ts';
import {
  BundleSet,
  parseCertificates,
  SpiffeBundle,
  SpiffeError,
  TrustDomain,
  verifyX509Svid,
  X509Bundle,
} from '../spiffe/index.ts';
import { EXIT, UsageError } from './common.ts';
import {
  AGENT_USAGE,
  API_USAGE,
  BUNDLE_USAGE,
  CREDENTIAL_USAGE,
  commandPath,
  commandUsage,
  GITOPS_USAGE,
  POLICY_USAGE,
  SERVE_USAGE,
} from './usage.ts';

const USAGE = `kube-svid-proxy: SPIFFE mTLS front door for kube-apiserver

Usage: kube-svid-proxy <command> [flags]

Commands:
  svid verify CHAIN --bundle TD=FILE [--bundle TD=FILE ...] [--at TIME]
        Verify an X.509-SVID chain (PEM or DER, leaf first) against the bundle of the trust domain its
        leaf claims. FILE is a SPIFFE bundle (JSON) or PEM CA certificates. Prints the SPIFFE ID, or the
        error code of the rule the SVID breaks (exit 1).
${SERVE_USAGE}${AGENT_USAGE}${API_USAGE}${BUNDLE_USAGE}${CREDENTIAL_USAGE}${GITOPS_USAGE}${POLICY_USAGE}  version       Print the version.
  help          Print this help.

Run 'kube-svid-proxy help COMMAND' (or 'kube-svid-proxy COMMAND --help') for a command's flags, their
defaults, and an example.
`;

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  return pkg.version;
}

function readBundle(spec: string): SpiffeBundle {
  const eq = spec.indexOf('=');
  if (eq <= 0 || eq === spec.length - 1) {
    throw new UsageError(`--bundle expects TRUST_DOMAIN=FILE, got ${JSON.stringify(spec)}`);
  }
  const trustDomain = TrustDomain.parse(spec.slice(0, eq));
  const file = spec.slice(eq + 1);
  const data = readFileSync(file);
  const text = data.toString('utf8').trimStart();
  if (text.startsWith('{')) {
    return SpiffeBundle.parse(trustDomain, text, {
      onIgnoredKey: (i, why) => process.stderr.write(`note: ${file}: keys[${i}] ignored: ${why}\n`),
    });
  }
  return new SpiffeBundle(trustDomain, { x509Authorities: X509Bundle.parse(trustDomain, data).authorities });
}

function svidVerify(args: string[]): number {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { bundle: { type: 'string', multiple: true }, at: { type: 'string' } },
  });
  if (positionals.length !== 1) throw new UsageError('svid verify takes exactly one CHAIN file');
  if (values.bundle === undefined || values.bundle.length === 0) {
    throw new UsageError('svid verify needs at least one --bundle TRUST_DOMAIN=FILE');
  }
  const at = values.at === undefined ? new Date() : new Date(values.at);
  if (Number.isNaN(at.getTime())) throw new UsageError(`--at is not a date: ${JSON.stringify(values.at)}`);
  const bundles = new BundleSet(values.bundle.map(readBundle));
  const chain = parseCertificates(readFileSync(positionals[0] as string));
  const { id, verifiedChain } = verifyX509Svid(chain, bundles, at);
  const leaf = verifiedChain[0];
  process.stdout.write(`OK ${id}\n`);
  process.stdout.write(`  trust domain: ${id.trustDomain}\n`);
  if (leaf !== undefined) process.stdout.write(`  expires:      ${leaf.validToDate.toISOString()}\n`);
  process.stdout.write(
    `  path:         ${verifiedChain.length} certificates, ending at ${verifiedChain.at(-1)?.subject.replaceAll('\n', ', ')}\n`,
  );
  return EXIT.ok;
}

/** `--help` or `-h` anywhere before a `--` asks for help, whatever else the command line holds. */
function asksForHelp(argv: readonly string[]): boolean {
  const end = argv.indexOf('--');
  return (end === -1 ? argv : argv.slice(0, end)).some((a) => a === '--help' || a === '-h');
}

/** `help [COMMAND [SUBCOMMAND ...]]`: the command list, or one command's usage (as `COMMAND --help` prints it). */
function help(words: string[]): number {
  if (words.length === 0) {
    process.stdout.write(USAGE);
    return EXIT.ok;
  }
  const path = commandPath(words);
  if (path === undefined || path.split(' ').length !== words.length) {
    throw new UsageError(`help: unknown command ${JSON.stringify(words.join(' '))}`);
  }
  process.stdout.write(commandUsage(path));
  return EXIT.ok;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  const path = commandPath(argv);
  try {
    if (command !== undefined && asksForHelp(argv)) {
      // Help is answered before any flag is parsed or file read: `serve --config /nonexistent --help` is help.
      if (command === '--help' || command === '-h') return help([]);
      if (path === undefined) throw new UsageError(`unknown command ${JSON.stringify(command)}`);
      process.stdout.write(commandUsage(path));
      return EXIT.ok;
    }
    switch (command) {
      case undefined:
        process.stdout.write(USAGE);
        return EXIT.usage;
      case 'help':
        return help(rest);
      case 'version':
      case '--version':
        process.stdout.write(`kube-svid-proxy ${version()}\n`);
        return EXIT.ok;
      case 'serve':
        return await (await import('./serve.ts')).serveCommand(rest);
      case 'agent':
        // Loaded on demand: gRPC and the CA code are heavy, and most commands need neither.
        return await (await import('./agent.ts')).agentCommand(rest);
      case 'api':
        return await (await import('./api.ts')).apiCommand(rest);
      case 'credential':
        return await (await import('./credential.ts')).credentialCommand(rest);
      case 'policy':
        return await (await import('./policy.ts')).policyCommand(rest);
      case 'client':
        return await (await import('./client.ts')).clientCommand(rest);
      case 'writer':
        return await (await import('./writer.ts')).writerCommand(rest);
      case 'bundle':
        return await (await import('./bundle.ts')).bundleCommand(rest);
      case 'svid':
        if (rest[0] === 'verify') return svidVerify(rest.slice(1));
        throw new UsageError(`unknown svid subcommand ${JSON.stringify(rest[0] ?? '')} (expected: verify)`);
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (e) {
    if (
      e instanceof UsageError ||
      (e instanceof TypeError && 'code' in e && String(e.code).startsWith('ERR_PARSE_ARGS'))
    ) {
      // The pointer names the deepest command the words reach: `api fetch jwt --bogus` points at its own help.
      const pointer = path === undefined || path === 'help' ? 'help' : `${path} --help`;
      process.stderr.write(`kube-svid-proxy: ${e.message}\nRun 'kube-svid-proxy ${pointer}' for usage.\n`);
      return EXIT.usage;
    }
    if (e instanceof SpiffeError) {
      process.stderr.write(`REFUSED ${e.code}: ${e.message}\n`);
      return EXIT.refused;
    }
    if (isAgentError(e) || isProxyError(e) || e instanceof ConfigReadError || e instanceof KspError) {
      // Multi-line messages (file:line:col problems) start on their own line, so each line begins with the file.
      process.stderr.write(
        `kube-svid-proxy: ${e.code}:${e.message.includes('\n') ? '\n' : ' '}${e.message}\n`,
      );
      return EXIT.refused;
    }
    const err = e as NodeJS.ErrnoException;
    process.stderr.write(`kube-svid-proxy: ${err.code === undefined ? '' : `${err.code}: `}${err.message}\n`);
    return EXIT.refused;
  }
}

process.exitCode = await main(process.argv.slice(2));
