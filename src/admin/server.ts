/**
 * The admin listener: liveness, readiness and Prometheus metrics, in plain HTTP on a port of its own.
 *
 * Why not on the data port: the data port is the TLS front door that every client's mTLS handshake and proxied
 * request (including long watches) goes through. A scrape or a kubelet probe on a separate listener never queues
 * behind, nor competes with, proxied traffic, and it answers even when the proxy has no SVID to offer a TLS client
 * (which is exactly when readiness must say so). Conversely these endpoints are never reachable through the TLS
 * front door, so no SPIFFE client can read the metrics or probe the proxy's state, and the policy never has to
 * carve out exceptions for them. It binds to 127.0.0.1 by default; expose it to the kubelet and Prometheus on
 * purpose (e.g. `host: '0.0.0.0'` inside a pod network).
 */
import { STATUS_CODES } from 'node:http';
import { type FastifyInstance, fastify, LogController } from 'fastify';
import type { Logger } from '../observability/logger.ts';

/** Whatever renders Prometheus text: the proxy's metrics or the agent's. */
export interface MetricsSource {
  readonly contentType: string;
  metrics(): Promise<string>;
}

/** One readiness condition, e.g. "svid": ok, "valid for another 41m". */
export interface ReadinessCheck {
  name: string;
  ok: boolean;
  /** For people: why it is or isn't ok. */
  detail: string;
}

export interface ReadinessReport {
  /** Normally every check's `ok`; the server answers 503 whenever this is false. */
  ready: boolean;
  checks: ReadinessCheck[];
}

export interface AdminServerOptions {
  metrics: MetricsSource;
  /** Called on every GET /readyz. If it throws, /readyz answers 503 with a single failed "readiness" check. */
  readiness: () => ReadinessReport | Promise<ReadinessReport>;
  logger: Logger;
  /** Default 127.0.0.1. */
  host?: string;
  /** 0 picks a free port; see `address.port`. */
  port: number;
}

export interface AdminServer {
  readonly address: { readonly host: string; readonly port: number };
  /** Stops listening, closes idle keep-alive connections and waits for in-flight requests. */
  close(): Promise<void>;
}

export const DEFAULT_ADMIN_HOST = '127.0.0.1';

const readinessReportSchema = {
  type: 'object',
  required: ['ready', 'checks'],
  additionalProperties: false,
  properties: {
    ready: { type: 'boolean' },
    checks: {
      type: 'array',
      items: {
        type: 'object',
        required: ['name', 'ok', 'detail'],
        additionalProperties: false,
        properties: {
          name: { type: 'string' },
          ok: { type: 'boolean' },
          detail: { type: 'string' },
        },
      },
    },
  },
} as const;

const errorSchema = {
  type: 'object',
  required: ['error', 'message'],
  properties: { error: { type: 'string' }, message: { type: 'string' } },
} as const;

/** Listens, then resolves. Rejects (with nothing left listening) if the address is taken or invalid. */
export async function createAdminServer(options: AdminServerOptions): Promise<AdminServer> {
  const { metrics, readiness, logger } = options;
  const app = fastify({
    logger: false,
    logController: new LogController({ disableRequestLogging: true }),
    // Only GETs without bodies are served; probes and scrapes are quick.
    bodyLimit: 1024,
    requestTimeout: 10_000,
    connectionTimeout: 10_000,
    // Close idle keep-alive connections (Prometheus keeps one) on close(), so the port is freed promptly.
    forceCloseConnections: 'idle',
  });
  defineRoutes(app, { metrics, readiness, logger });

  try {
    await app.listen({ host: options.host ?? DEFAULT_ADMIN_HOST, port: options.port });
  } catch (error) {
    await app.close();
    throw error;
  }
  const bound = app.server.address();
  if (bound === null || typeof bound === 'string') {
    await app.close();
    throw new Error(`admin server: unexpected listening address ${String(bound)}`);
  }
  const address = { host: bound.address, port: bound.port };
  logger.info({ host: address.host, port: address.port }, 'admin server listening');

  let closing: Promise<void> | undefined;
  return {
    address,
    close: () => {
      closing ??= app.close().then(() => logger.debug('admin server closed'));
      return closing;
    },
  };
}

function defineRoutes(
  app: FastifyInstance,
  { metrics, readiness, logger }: Pick<AdminServerOptions, 'metrics' | 'readiness' | 'logger'>,
): void {
  // One debug line per admin request, in our own log format (Fastify's logger is off).
  app.addHook('onResponse', async (request, reply) => {
    logger.debug(
      {
        method: request.method,
        url: request.url,
        statusCode: reply.statusCode,
        ms: Math.round(reply.elapsedTime * 10) / 10,
      },
      'admin request',
    );
  });

  app.setNotFoundHandler((request, reply) => {
    reply
      .code(404)
      .send({ error: 'Not Found', message: `${request.method} ${request.url} is not an admin route` });
  });

  app.setErrorHandler((error, request, reply) => {
    const statusCode = hasStatus(error) && error.statusCode >= 400 ? error.statusCode : 500;
    const message = error instanceof Error ? error.message : String(error);
    if (statusCode >= 500) logger.warn({ err: error, url: request.url }, 'admin request failed');
    reply.code(statusCode).send({ error: STATUS_CODES[statusCode] ?? 'Error', message });
  });

  app.get(
    '/healthz',
    {
      schema: {
        response: {
          200: {
            type: 'object',
            required: ['status'],
            properties: { status: { type: 'string', const: 'ok' } },
          },
        },
      },
    },
    async (_request, reply) => {
      reply.header('cache-control', 'no-store');
      return { status: 'ok' };
    },
  );

  app.get(
    '/readyz',
    { schema: { response: { 200: readinessReportSchema, 503: readinessReportSchema } } },
    async (_request, reply) => {
      let report: ReadinessReport;
      try {
        report = await readiness();
      } catch (error) {
        logger.warn({ err: error }, 'readiness check threw');
        report = {
          ready: false,
          checks: [
            { name: 'readiness', ok: false, detail: error instanceof Error ? error.message : String(error) },
          ],
        };
      }
      reply.header('cache-control', 'no-store');
      reply.code(report.ready ? 200 : 503);
      return report;
    },
  );

  app.get('/metrics', { schema: { response: { 500: errorSchema } } }, async (_request, reply) => {
    const text = await metrics.metrics();
    reply.header('cache-control', 'no-store');
    reply.type(metrics.contentType);
    return text;
  });
}

function hasStatus(error: unknown): error is { statusCode: number } {
  return (
    typeof error === 'object' &&
    error !== null &&
    'statusCode' in error &&
    typeof (error as { statusCode: unknown }).statusCode === 'number'
  );
}
