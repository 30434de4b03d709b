/**
 * The main process's side of `workers` > 1: forks the workers (node:cluster), hands each the current state at start
 * and every change afterwards, gathers their audit lines, metrics and usage, restarts a worker that dies, and
 * drains them all on shutdown. Each worker listens on the data port with a socket of its own (SO_REUSEPORT): the
 * kernel spreads new connections over them by their addresses, and no connection passes through this process
 * (node:cluster's default, accepting here and handing each connection over, cost about 0.5 ms of CPU each).
 *
 * Why processes and not threads: a TLS handshake and an HTTP/2 session are bound to the event loop that accepted
 * them, and a listening socket cannot be handed to a worker thread; each worker is a whole Node runtime, so one
 * that crashes takes only its own connections with it.
 */
import cluster, { type Worker } from 'node:cluster';
import { extname } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger } from 'pino';
import type { FromWorker, ToWorker, WorkerInit, WorkerUsage } from './worker-protocol.ts';

/** How long a worker may take from fork to listening. */
const START_TIMEOUT_MS = 30_000;
/** How long the main process waits for a worker's answer to a metrics or usage question. */
const ANSWER_TIMEOUT_MS = 2000;
/** A worker that dies is started again after this long, doubling up to a minute while they keep dying. */
const RESTART_BACKOFF_MS = 1000;
const MAX_RESTART_BACKOFF_MS = 60_000;

export interface WorkerPoolOptions {
  readonly count: number;
  readonly logger: Logger;
  /** The init message for worker `index`, built from the state current at the moment it starts. */
  readonly init: (index: number) => WorkerInit;
  /** Audit lines from a worker. */
  readonly onAudit: (lines: string, events: number) => void;
}

interface Slot {
  worker: Worker | undefined;
  listening: boolean;
  restarts: number;
}

export class WorkerPool {
  readonly #options: WorkerPoolOptions;
  readonly #log: Logger;
  readonly #slots: Slot[] = [];
  readonly #pending = new Map<number, (answer: FromWorker) => void>();
  #nextId = 1;
  #stopping = false;
  #port = 0;

  constructor(options: WorkerPoolOptions) {
    this.#options = options;
    this.#log = options.logger;
    // This module's own sibling, whether running from src/*.ts or dist/*.js.
    const exec = fileURLToPath(
      new URL(`./worker${extname(fileURLToPath(import.meta.url))}`, import.meta.url),
    );
    // Structured clone, not JSON: audit batches are strings of JSON, which JSON would escape a second time.
    cluster.setupPrimary({ exec, args: [], silent: false, serialization: 'advanced' });
  }

  get port(): number {
    return this.#port;
  }

  /** Workers listening now, of `count`. */
  get listening(): number {
    return this.#slots.filter((s) => s.worker !== undefined && s.listening).length;
  }

  get count(): number {
    return this.#options.count;
  }

  /** Starts every worker; resolves with the shared port once all listen, rejects if one cannot start. */
  async start(): Promise<number> {
    for (let index = 0; index < this.#options.count; index++) {
      this.#slots.push({ worker: undefined, listening: false, restarts: 0 });
    }
    // The first worker binds the port (a free one for port 0), the others bind the same one beside it.
    this.#port = await this.#fork(0);
    await Promise.all(this.#slots.slice(1).map((_, index) => this.#fork(index + 1)));
    this.#log.info({ workers: this.#options.count, port: this.#port }, 'workers listening on the data port');
    return this.#port;
  }

  #fork(index: number): Promise<number> {
    const slot = this.#slots[index] as Slot;
    const worker = cluster.fork({ KSP_WORKER_INDEX: String(index) });
    slot.worker = worker;
    slot.listening = false;
    return new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        worker.kill();
        reject(new Error(`worker ${index} did not start listening within ${START_TIMEOUT_MS / 1000}s`));
      }, START_TIMEOUT_MS);
      worker.on('message', (message: FromWorker) => {
        switch (message.type) {
          case 'listening':
            clearTimeout(timer);
            slot.listening = true;
            resolve(message.port);
            break;
          case 'failed':
            clearTimeout(timer);
            reject(new Error(`worker ${index}: ${message.message}`));
            break;
          case 'audit':
            this.#options.onAudit(message.lines, message.events);
            break;
          case 'intermediates':
            // The other workers learn them too, so the client's next session resumes on any of them.
            for (const other of this.#slots) {
              if (other !== slot && other.worker?.isConnected()) other.worker.send(message);
            }
            break;
          case 'metrics':
          case 'usage':
            this.#pending.get(message.id)?.(message);
            break;
          default:
            break;
        }
      });
      worker.once('online', () => worker.send(this.#options.init(index)));
      worker.once('exit', (code, signal) => {
        clearTimeout(timer);
        slot.listening = false;
        slot.worker = undefined;
        if (this.#stopping) return;
        const delay = Math.min(RESTART_BACKOFF_MS * 2 ** slot.restarts, MAX_RESTART_BACKOFF_MS);
        slot.restarts++;
        this.#log.error(
          { worker: index, code, signal, restartInSeconds: delay / 1000 },
          'worker exited: its connections are gone; starting a new one',
        );
        setTimeout(() => {
          if (this.#stopping) return;
          this.#fork(index).then(
            () => this.#log.info({ worker: index }, 'worker started again and listening'),
            (err: Error) =>
              this.#log.error({ worker: index, err: { message: err.message } }, 'worker restart failed'),
          );
        }, delay).unref();
        reject(new Error(`worker ${index} exited (code ${code}, signal ${signal}) before listening`));
      });
    });
  }

  /** Sends a change to every worker (a worker starting later gets it in its init message). */
  broadcast(message: ToWorker): void {
    for (const slot of this.#slots) {
      if (slot.worker?.isConnected()) slot.worker.send(message);
    }
  }

  /** Asks every listening worker; a worker that does not answer in time is left out. */
  async #ask<T extends FromWorker>(make: (id: number) => ToWorker): Promise<T[]> {
    const asked = this.#slots.filter((s) => s.worker?.isConnected() && s.listening);
    const answers = await Promise.all(
      asked.map(
        (slot) =>
          new Promise<T | undefined>((resolve) => {
            const id = this.#nextId++;
            const timer = setTimeout(() => {
              this.#pending.delete(id);
              resolve(undefined);
            }, ANSWER_TIMEOUT_MS);
            this.#pending.set(id, (answer) => {
              clearTimeout(timer);
              this.#pending.delete(id);
              resolve(answer as T);
            });
            slot.worker?.send(make(id));
          }),
      ),
    );
    return answers.filter((a) => a !== undefined) as T[];
  }

  /** Each worker's metrics, as prom-client's `getMetricsAsJSON()`. */
  async metrics(): Promise<unknown[]> {
    const answers = await this.#ask<Extract<FromWorker, { type: 'metrics' }>>((id) => ({
      type: 'metrics',
      id,
    }));
    return answers.map((a) => a.json);
  }

  async usage(): Promise<WorkerUsage[]> {
    const answers = await this.#ask<Extract<FromWorker, { type: 'usage' }>>((id) => ({ type: 'usage', id }));
    return answers.map((a) => a.usage);
  }

  /** Graceful stop: every worker drains (GOAWAY, in-flight requests finish) within `deadlineMs`, then exits. */
  async drain(deadlineMs: number): Promise<void> {
    this.#stopping = true;
    const exits = this.#slots.map((slot) => {
      const worker = slot.worker;
      if (worker === undefined) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          worker.kill('SIGKILL');
          resolve();
        }, deadlineMs + 5000);
        worker.once('exit', () => {
          clearTimeout(timer);
          resolve();
        });
        if (worker.isConnected()) worker.send({ type: 'drain', deadlineMs });
        else worker.kill();
      });
    });
    await Promise.all(exits);
  }

  /** Stops at once. */
  async close(): Promise<void> {
    this.#stopping = true;
    await Promise.all(
      this.#slots.map((slot) => {
        const worker = slot.worker;
        if (worker === undefined) return Promise.resolve();
        return new Promise<void>((resolve) => {
          worker.once('exit', () => resolve());
          worker.kill('SIGKILL');
        });
      }),
    );
  }
}
