import { WorkloadAgent } from '../agent/agent.ts';
import { type AgentFlags, loadAnyAgentConfig } from '../agent/config.ts';
import { SpireAgent } from '../agent/spire/agent.ts';
import { createLogger } from '../observability/logger.ts';
import { holdSighup, runUntilSignal, serviceFlags, UsageError } from './common.ts';

/** Runs the agent until SIGINT or SIGTERM (SIGHUP re-reads its files); resolves with the exit code. */
export async function agentCommand(args: string[]): Promise<number> {
  const { joinToken, rest } = takeJoinToken(args);
  const flags = serviceFlags('agent', rest, 'agent.yaml');
  const agentFlags: AgentFlags = joinToken === undefined ? {} : { joinToken };
  holdSighup();
  const config = await loadAnyAgentConfig(flags.config, process.env, agentFlags);
  const logger = createLogger({ level: flags.level ?? config.logLevel, name: 'kube-svid-proxy-agent' });
  // --log-level pins the level: a reload keeps it whatever the file says.
  const reread = async () => ({
    ...(await loadAnyAgentConfig(flags.config, process.env, agentFlags)),
    ...(flags.level ? { logLevel: flags.level } : {}),
  });
  if (config.issuer === 'spire') {
    const agent = await SpireAgent.start({ ...config, logger });
    return runUntilSignal(logger, 'agent', {
      stop: () => agent.close(),
      reload: () =>
        agent.reload(async () => {
          const next = await reread();
          if (next.issuer !== 'spire') throw new UsageError('issuer changed to ca: that needs a restart');
          return next;
        }),
      fatal: agent.stopped,
    });
  }
  const agent = await WorkloadAgent.start({ ...config, logger });
  return runUntilSignal(logger, 'agent', {
    stop: () => agent.close(),
    reload: () =>
      agent.reload(async () => {
        const next = await reread();
        if (next.issuer === 'spire') throw new UsageError('issuer changed to spire: that needs a restart');
        return next;
      }),
  });
}

/** `--join-token T` / `--join-token=T`, taken out before the common service flags are parsed. */
function takeJoinToken(args: string[]): { joinToken?: string; rest: string[] } {
  const rest: string[] = [];
  let joinToken: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    if (arg === '--join-token') {
      const value = args[++i];
      if (value === undefined || value === '') throw new UsageError('--join-token needs a value');
      joinToken = value;
    } else if (arg.startsWith('--join-token=')) {
      joinToken = arg.slice('--join-token='.length);
      if (joinToken === '') throw new UsageError('--join-token needs a value');
    } else rest.push(arg);
  }
  return joinToken === undefined ? { rest } : { joinToken, rest };
}
