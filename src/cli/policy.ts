/** `kube-svid-proxy policy check | explain | rbac`: the policy file, offline. */
import { parseArgs } from 'node:util';
import { PolicyError } from '../policy/errors.ts';
import { describedNested, describedRequest, explain, formatExplanation } from '../policy/explain.ts';
import type { Policy } from '../policy/model.ts';
import { loadPolicyFile } from '../policy/parse.ts';
import { DEFAULT_SERVICE_ACCOUNT, rbacManifests, type ServiceAccountRef } from '../policy/rbac.ts';
import { SpiffeError } from '../spiffe/errors.ts';
import { SpiffeId } from '../spiffe/id.ts';
import { EXIT, err, out, UsageError } from './common.ts';

function onePolicyFile(command: string, positionals: string[]): string {
  if (positionals.length !== 1) throw new UsageError(`policy ${command} takes exactly one policy FILE`);
  return positionals[0] as string;
}

function summary(policy: Policy): string {
  const c = policy.counts();
  const n = policy.rules.length;
  const domains = policy.trustDomains.length === 0 ? 'none' : policy.trustDomains.join(', ');
  return `OK: ${n} rule${n === 1 ? '' : 's'} (${c.id} exact, ${c.pattern} pattern, ${c.trustDomain} trust domain); trust domains: ${domains}\n`;
}

async function check(args: string[]): Promise<number> {
  const { positionals } = parseArgs({ args, allowPositionals: true, options: {} });
  const policy = await loadPolicyFile(onePolicyFile('check', positionals));
  out(summary(policy));
  return EXIT.ok;
}

function parseId(text: string | undefined): SpiffeId {
  if (text === undefined) throw new UsageError('policy explain needs --id spiffe://…');
  try {
    return SpiffeId.parse(text);
  } catch (e) {
    if (e instanceof SpiffeError) throw new UsageError(`--id: ${e.message} (${e.code})`);
    throw e;
  }
}

async function explainCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      id: { type: 'string' },
      verb: { type: 'string' },
      resource: { type: 'string' },
      namespace: { type: 'string' },
      path: { type: 'string' },
      'impersonate-user': { type: 'string' },
      'impersonate-group': { type: 'string', multiple: true },
      json: { type: 'boolean' },
    },
  });
  const file = onePolicyFile('explain', positionals);
  const id = parseId(values.id);
  const request = describedRequest(values);
  if (typeof request === 'string') throw new UsageError(request);
  const nested = describedNested({
    impersonateUser: values['impersonate-user'],
    impersonateGroups: values['impersonate-group'],
  });
  if (typeof nested === 'string') throw new UsageError(nested);
  const policy = await loadPolicyFile(file);
  const e = explain(policy, id, request, nested);
  if (values.json) out(`${JSON.stringify(e, null, 2)}\n`);
  else out(formatExplanation(e, file));
  return e.allowed ? EXIT.ok : EXIT.refused;
}

function parseServiceAccount(text: string | undefined): ServiceAccountRef {
  if (text === undefined) return DEFAULT_SERVICE_ACCOUNT;
  const parts = text.split('/');
  const [namespace, name] = parts;
  const label = /^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$/;
  const subdomain = /^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$/;
  if (
    parts.length !== 2 ||
    namespace === undefined ||
    name === undefined ||
    !label.test(namespace) ||
    !subdomain.test(name) ||
    name.length > 253
  ) {
    throw new UsageError(
      `--service-account expects NAMESPACE/NAME (a namespace and a service account name), got ${JSON.stringify(text)}`,
    );
  }
  return { namespace, name };
}

async function rbac(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { 'service-account': { type: 'string' } },
  });
  const file = onePolicyFile('rbac', positionals);
  const serviceAccount = parseServiceAccount(values['service-account']);
  const policy = await loadPolicyFile(file);
  const manifests = rbacManifests(policy, serviceAccount);
  out(manifests.yaml);
  for (const w of manifests.warnings) err(`warning: ${w}\n`);
  return EXIT.ok;
}

export async function policyCommand(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  try {
    switch (sub) {
      case 'check':
        return await check(rest);
      case 'explain':
        return await explainCommand(rest);
      case 'rbac':
        return await rbac(rest);
      default:
        throw new UsageError(
          `unknown policy subcommand ${JSON.stringify(sub ?? '')} (expected: check, explain or rbac)`,
        );
    }
  } catch (e) {
    if (e instanceof PolicyError) {
      // One problem a line, each starting with file:line:col, so editors and CI annotate them.
      err(`${e.message}\n`);
      return EXIT.refused;
    }
    throw e;
  }
}
