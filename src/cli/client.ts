import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { startClient } from '../client/client.ts';
import { loadClientConfig } from '../client/config.ts';
import { createLogger } from '../observability/logger.ts';
import { EXIT, holdSighup, out, runUntilSignal, serviceFlags, UsageError } from './common.ts';

/** `client kubeconfig`: a kubeconfig for one spoke's local listener; no credential, the client mode has it. */
async function kubeconfig(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { config: { type: 'string', short: 'c' }, spoke: { type: 'string' }, name: { type: 'string' } },
  });
  if (positionals.length > 0)
    throw new UsageError(`client kubeconfig takes no arguments, got ${positionals.join(' ')}`);
  if (values.config === undefined) throw new UsageError('client kubeconfig needs --config FILE');
  if (values.spoke === undefined) throw new UsageError('client kubeconfig needs --spoke NAME');
  const config = await loadClientConfig(values.config);
  const spoke = config.spokes.find((s) => s.name === values.spoke);
  if (spoke === undefined) {
    throw new UsageError(
      `no spoke named ${JSON.stringify(values.spoke)} in ${values.config} (it has ${config.spokes.map((s) => s.name).join(', ')})`,
    );
  }
  if (spoke.listen.kind === 'unix') {
    throw new UsageError(
      `spoke ${spoke.name} listens on a Unix socket; client-go reaches only http(s):// servers, so give it ` +
        'a loopback listen address for a kubeconfig',
    );
  }
  if (spoke.listen.port === 0)
    throw new UsageError(`spoke ${spoke.name} listens on port 0: a kubeconfig needs a fixed port`);
  const name = values.name ?? spoke.name;
  const host = spoke.listen.host.includes(':') ? `[${spoke.listen.host}]` : spoke.listen.host;
  const doc = {
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name, cluster: { server: `http://${host}:${spoke.listen.port}` } }],
    users: [{ name, user: {} }],
    contexts: [{ name, context: { cluster: name, user: name } }],
    'current-context': name,
  };
  out(stringify(doc, { lineWidth: 0 }));
  return EXIT.ok;
}

/** Runs the client mode until SIGINT or SIGTERM (drained, then stopped). */
export async function clientCommand(args: string[]): Promise<number> {
  if (args[0] === 'kubeconfig') return kubeconfig(args.slice(1));
  const flags = serviceFlags('client', args, 'client.yaml');
  holdSighup();
  const config = await loadClientConfig(flags.config);
  const logger = createLogger({ level: flags.level ?? config.logLevel, name: 'kube-svid-proxy-client' });
  const client = await startClient(config, { logger });
  return runUntilSignal(logger, 'client', { stop: () => client.shutdown() });
}
