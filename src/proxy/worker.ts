/**
 * A worker of the proxy's data port (`workers` > 1): started by the main process through node:cluster, it serves
 * the shared listener with a ProxyServer of its own and takes everything else from the main process (see
 * worker-protocol.ts): the SVID and bundles, the policy text, the upstream credential, the session ticket keys and
 * whether the audit log can take more. Each change arrives as one message and applies to the next handshake or
 * request, in every worker at once. Audit Events go back to the main process, gathered for 10 ms a message.
 */
import { EventEmitter } from 'node:events';
import { createLogger, type LogLevel } from '../observability/logger.ts';
import { ProxyMetrics } from '../observability/metrics.ts';
import { parsePolicy } from '../policy/parse.ts';
import type { CompiledPolicy } from '../policy/types.ts';
import { BundleSet, SpiffeBundle } from '../spiffe/bundle.ts';
import { TrustDomain } from '../spiffe/id.ts';
import { parseCertificates, parseX509Svid, type X509Svid } from '../spiffe/x509svid.ts';
import type { AuditEvent, AuditSink } from './audit.ts';
import { Upstream } from './forward.ts';
import type { ProxyLimits, ProxyTimeouts } from './limits.ts';
import { ProxyServer } from './server.ts';
import type { IdentityHealth, IdentitySource } from './source.ts';
import type { PolicyHolder } from './trust.ts';
import type {
  FromWorker,
  IdentityMessage,
  ToWorker,
  UpstreamMessage,
  WorkerInit,
} from './worker-protocol.ts';

/** The identity the main process holds, as last sent. */
class RemoteIdentitySource extends EventEmitter implements IdentitySource {
  #svid: X509Svid | undefined;
  #withdrawn = 'no SVID received from the main process yet';
  #bundles = new BundleSet();
  #changedAt = new Map<string, Date>();
  #health: IdentityHealth = { ok: false, detail: 'starting' };

  constructor(message: IdentityMessage) {
    super();
    this.apply(message);
  }

  apply(message: IdentityMessage): void {
    this.#svid = message.svid && parseX509Svid(message.svid.chain, message.svid.key, message.svid.hint);
    this.#withdrawn = message.withdrawn ?? 'no SVID';
    this.#bundles = new BundleSet(
      message.bundles.map(([td, json]) => SpiffeBundle.parse(TrustDomain.parse(td), json)),
    );
    this.#changedAt = new Map(message.changedAt.map(([td, at]) => [td, new Date(at)]));
    this.#health = message.health;
  }

  svid(): X509Svid {
    if (this.#svid === undefined) throw new Error(this.#withdrawn);
    return this.#svid;
  }

  bundles(): BundleSet {
    return this.#bundles;
  }

  bundleChangedAt(): ReadonlyMap<string, Date> {
    return this.#changedAt;
  }

  health(): IdentityHealth {
    return this.#health;
  }

  async reload(): Promise<void> {}

  close(): void {}
}

/** Audit Events to the main process, gathered for up to 10 ms (or 64 KiB) a message. */
function ipcAuditSink(send: (message: FromWorker) => void): AuditSink & { setFull(full: boolean): void } {
  let lines = '';
  let events = 0;
  let timer: NodeJS.Timeout | undefined;
  let full = false;
  const flush = (): void => {
    clearTimeout(timer);
    timer = undefined;
    if (events === 0) return;
    send({ type: 'audit', lines, events });
    lines = '';
    events = 0;
  };
  return {
    write: (event: AuditEvent) => {
      lines += `${JSON.stringify(event)}\n`;
      events++;
      if (lines.length >= 64 * 1024) flush();
      else if (timer === undefined) {
        timer = setTimeout(flush, 10);
        timer.unref();
      }
    },
    full: () => full,
    setFull: (value) => {
      full = value;
    },
    close: flush,
  };
}

function upstreamOf(message: UpstreamMessage): Upstream {
  return new Upstream({
    ...upstreamTls(message),
    responseHeadersTimeoutMs: message.responseHeadersMs,
    longRunningHeadersTimeoutMs: message.longRunningHeadersMs,
    maxSessions: message.maxSessions,
    maxLongRunningSessions: message.maxLongRunningSessions,
  });
}

function upstreamTls(message: UpstreamMessage) {
  const authorization = message.authorization;
  return {
    url: new URL(message.url),
    ...(message.ca === undefined ? {} : { ca: message.ca }),
    ...(message.clientCert === undefined ? {} : { clientCert: message.clientCert }),
    ...(message.clientKey === undefined ? {} : { clientKey: message.clientKey }),
    authorization: () => authorization,
  };
}

async function runWorker(init: WorkerInit, send: (message: FromWorker) => void): Promise<void> {
  const log = createLogger({ level: init.logLevel as LogLevel, name: 'kube-svid-proxy' }).child({
    worker: init.index,
  });
  const source = new RemoteIdentitySource(init.identity);
  const holder: { current: CompiledPolicy; generation: number } = {
    current: parsePolicy(init.policy.text, { file: init.policy.file }),
    generation: init.policy.generation,
  };
  const policy: PolicyHolder = holder;
  const upstream = upstreamOf(init.upstream);
  const audit = ipcAuditSink(send);
  const metrics = new ProxyMetrics({ defaultMetrics: true });
  const server = new ProxyServer({
    trustDomain: TrustDomain.parse(init.trustDomain),
    source,
    policy,
    upstream,
    logger: log,
    audit,
    metrics,
    limits: init.limits as Partial<ProxyLimits>,
    timeouts: init.timeouts as Partial<ProxyTimeouts>,
    onIntermediatesLearned: (leaf, intermediates) =>
      send({ type: 'intermediates', leaf, chain: intermediates.map((c) => c.toString()).join('') }),
  });
  server.server.setTicketKeys(Buffer.from(init.ticketKeys, 'base64'));
  metrics.setUsage(() => ({ inFlight: server.usage().inFlight, upstream: upstream.usage() }));

  process.on('message', (message: ToWorker) => {
    try {
      switch (message.type) {
        case 'identity':
          source.apply(message);
          source.emit('update');
          break;
        case 'policy':
          holder.current = parsePolicy(message.text, { file: message.file });
          holder.generation = message.generation;
          server.policyChanged();
          break;
        case 'upstream':
          upstream.replaceCredential(upstreamTls(message));
          break;
        case 'ticketKeys':
          server.server.setTicketKeys(Buffer.from(message.keys, 'base64'));
          break;
        case 'intermediates':
          server.learnIntermediates(message.leaf, parseCertificates(message.chain));
          break;
        case 'auditFull':
          audit.setFull(message.full);
          break;
        case 'metrics':
          void metrics.registry
            .getMetricsAsJSON()
            .then((json) => send({ type: 'metrics', id: message.id, json }));
          break;
        case 'usage': {
          const usage = server.usage();
          send({
            type: 'usage',
            id: message.id,
            usage: { connections: usage.connections, inFlight: usage.inFlight, upstream: upstream.usage() },
          });
          break;
        }
        case 'drain':
          void server.drain(message.deadlineMs).then(async () => {
            audit.close();
            upstream.close();
            send({ type: 'drained' });
            process.disconnect();
          });
          break;
        default:
          break;
      }
    } catch (err) {
      // The main process validated what it sends; a worker that cannot apply it must not serve the old state.
      log.fatal(
        { err: { message: (err as Error).message }, message: message.type },
        'worker cannot apply an update',
      );
      process.exit(1);
    }
  });
  const address = await server.listen(init.listen.port, init.listen.host, { reusePort: true });
  send({ type: 'listening', port: address.port });
}

// Started by node:cluster: wait for the main process's init message, then serve.
if (process.send !== undefined) {
  const send = (message: FromWorker): void => {
    process.send?.(message);
  };
  // The main process going away leaves nothing to take updates from: stop at once.
  process.on('disconnect', () => process.exit(0));
  process.once('message', (message: ToWorker) => {
    if (message.type !== 'init') return;
    runWorker(message, send).catch((err: Error) => {
      send({ type: 'failed', message: err.message });
      process.exit(1);
    });
  });
}
