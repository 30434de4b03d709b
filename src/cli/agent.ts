import { WorkloadAgent } from '../agent/agent.ts';
import { loadAgentConfig } from '../agent/config.ts';
import { createLogger } from '../observability/logger.ts';
import { holdSighup, runUntilSignal, serviceFlags } from './common.ts';

/** Runs the agent until SIGINT or SIGTERM (SIGHUP re-reads its files); resolves with the exit code. */
export async function agentCommand(args: string[]): Promise<number> {
  const flags = serviceFlags('agent', args, 'agent.yaml');
  holdSighup();
  const config = await loadAgentConfig(flags.config);
  const logger = createLogger({ level: flags.level ?? config.logLevel, name: 'kube-svid-proxy-agent' });
  const agent = await WorkloadAgent.start({ ...config, logger });
  // --log-level pins the level: a reload keeps it whatever the file says.
  const reread = async () => ({
    ...(await loadAgentConfig(flags.config)),
    ...(flags.level ? { logLevel: flags.level } : {}),
  });
  return runUntilSignal(logger, 'agent', { stop: () => agent.close(), reload: () => agent.reload(reread) });
}
