/**
 * What a test needs around a proxy it starts: the files it reads (written from the dev PKI into a temporary
 * directory), the proxy.yaml that names them, an HTTP/2 STAND-IN for kube-apiserver, a client's TLS options,
 * and a bounded poll.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type tls from 'node:tls';
import { bundleJson, type DevPki } from '../../certs-dev/devpki.ts';
import type { AuditEvent, AuditSink } from '../../src/proxy/audit.ts';

/** The proxy's files in a fresh temporary directory; names are relative to it, as proxy.yaml gives them. */
export interface ProxyFiles {
  readonly dir: string;
  /** `<dir>/proxy.yaml`: where a config is read from, so that the names in it resolve against `dir`. */
  readonly configFile: string;
  /** Trust domain → bundle file. */
  readonly bundles: Readonly<Record<string, string>>;
  /** The roots that verify the upstream, when written. */
  readonly caFile?: string;
  /** The proxy's bearer token for the upstream, when written. */
  readonly tokenFile?: string;
  /** Writes `name` in the directory; returns its path. */
  write(name: string, text: string): string;
  remove(): void;
}

export interface ProxyFilesOptions {
  /** policy.yaml; not written when absent. */
  readonly policy?: string;
  /** The token file's text (with its newline); not written when absent. */
  readonly token?: string;
  /** PEM roots for upstream.caFile (ca.pem); not written when absent. */
  readonly upstreamCa?: string;
  /** Trust the hub's bundle as well as the spoke's (default true). */
  readonly hubBundle?: boolean;
}

/**
 * Writes the serving SVID (the spoke's proxy.crt and proxy.key), the bundles, and what `options` gives, into a
 * new directory named after `prefix`.
 */
export function writeProxyFiles(prefix: string, pki: DevPki, options: ProxyFilesOptions = {}): ProxyFiles {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const write = (name: string, text: string): string => {
    const file = join(dir, name);
    writeFileSync(file, text);
    return file;
  };
  write('proxy.crt', pki.good.proxyServer.chainPem);
  write('proxy.key', pki.good.proxyServer.keyPem);
  write('spoke.json', bundleJson(pki.spoke));
  const bundles: Record<string, string> = { [pki.spoke.name]: 'spoke.json' };
  if (options.hubBundle ?? true) {
    write('hub.json', bundleJson(pki.hub));
    bundles[pki.hub.name] = 'hub.json';
  }
  if (options.upstreamCa !== undefined) write('ca.pem', options.upstreamCa);
  if (options.token !== undefined) write('token', options.token);
  if (options.policy !== undefined) write('policy.yaml', options.policy);
  return {
    dir,
    configFile: join(dir, 'proxy.yaml'),
    bundles,
    ...(options.upstreamCa !== undefined ? { caFile: 'ca.pem' } : {}),
    ...(options.token !== undefined ? { tokenFile: 'token' } : {}),
    write,
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

export interface ProxyConfigOptions {
  /** upstream.url; upstream.caFile is given only for an https: one. */
  readonly upstreamUrl: string;
  readonly listen?: string;
  /** Default policy.yaml. */
  readonly policyFile?: string;
  /** Default: the token `files` wrote. */
  readonly tokenFile?: string;
  /** More top-level YAML, appended as given (limits, timeouts, readiness…). */
  readonly extra?: string;
}

/**
 * proxy.yaml for the files of `files`: trust domain spoke.example.org, both ports on loopback (`listen` port 0
 * unless given), SVID and bundles from identity.files, then `extra`. Seven lines before `extra`.
 */
export function proxyConfigYaml(files: ProxyFiles, options: ProxyConfigOptions): string {
  const bundles = Object.entries(files.bundles)
    .map(([domain, file]) => `${domain}: ${file}`)
    .join(', ');
  const caFile = options.upstreamUrl.startsWith('https:') ? files.caFile : undefined;
  const tokenFile = options.tokenFile ?? files.tokenFile;
  const upstream = [
    `url: "${options.upstreamUrl}"`,
    ...(caFile ? [`caFile: ${caFile}`] : []),
    ...(tokenFile ? [`tokenFile: ${tokenFile}`] : []),
  ].join(', ');
  return `trustDomain: spoke.example.org
listen: ${options.listen ?? '127.0.0.1:0'}
admin: { listen: 127.0.0.1:0 }
policyFile: ${options.policyFile ?? 'policy.yaml'}
identity:
  files: { certFile: proxy.crt, keyFile: proxy.key, bundles: { ${bundles} } }
upstream: { ${upstream} }
${options.extra ?? ''}`;
}

/** A client's TLS options toward the proxy: the spoke root verifies it as `localhost`; `who` is the client SVID. */
export function clientTls(
  pki: DevPki,
  who?: { readonly chainPem: string; readonly keyPem: string },
): Pick<tls.ConnectionOptions, 'ca' | 'servername' | 'cert' | 'key'> {
  return {
    ca: pki.spoke.rootPem,
    servername: 'localhost',
    ...(who ? { cert: who.chainPem, key: who.keyPem } : {}),
  };
}

/** A listening HTTP/2 STAND-IN for kube-apiserver. */
export interface Http2StandIn {
  readonly server: http2.Http2SecureServer;
  readonly port: number;
  /** Every session the proxy opened to it, in order (closed ones too). */
  readonly sessions: readonly http2.ServerHttp2Session[];
  /** Destroys every session, and with them the streams it holds open (watches). */
  destroySessions(): void;
  /** Destroys the sessions, then closes the listener. */
  close(): Promise<void>;
}

/**
 * Starts an HTTP/2 STAND-IN for kube-apiserver on loopback. It serves with the spoke's proxy SVID (IP SAN
 * 127.0.0.1), so a proxy given the spoke root as upstream.caFile trusts it; `onRequest` answers.
 */
export async function listenHttp2StandIn(
  pki: DevPki,
  options: http2.SecureServerOptions,
  onRequest: (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void,
): Promise<Http2StandIn> {
  const server = http2.createSecureServer(
    { cert: pki.good.proxyServer.chainPem, key: pki.good.proxyServer.keyPem, ...options },
    onRequest,
  );
  const sessions: http2.ServerHttp2Session[] = [];
  server.on('session', (session) => sessions.push(session));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const destroySessions = (): void => {
    for (const session of sessions) session.destroy();
  };
  return {
    server,
    port: (server.address() as AddressInfo).port,
    sessions,
    destroySessions,
    close: async () => {
      destroySessions();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A request's status and whole body; a 200 watch (`watch=true`) resolves once its headers arrive. */
export function requestStatus(
  session: http2.ClientHttp2Session,
  path: string,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ':path': path });
    let status = 0;
    let body = '';
    stream.setEncoding('utf8');
    stream.on('error', reject);
    stream.on('response', (headers) => {
      status = Number(headers[':status']);
      if (status === 200 && path.includes('watch=true')) resolve({ status, body });
    });
    stream.on('data', (d: string) => {
      body += d;
    });
    stream.on('end', () => resolve({ status, body }));
    stream.on('close', () => resolve({ status, body }));
  });
}

/** Polls `check` until it holds; the deadline only bounds a hung test and is not a timing assertion. */
export async function until(
  what: string,
  check: () => boolean | Promise<boolean>,
  ms = 15_000,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Repeats `attempt` until `done` accepts its result or `tries` run out, and returns the last result (the caller
 * asserts on it, so a failure shows what was last seen). Not a timing assertion.
 */
export async function pollFor<T>(
  attempt: () => Promise<T>,
  done: (value: T) => boolean,
  tries = 100,
): Promise<T> {
  let last = await attempt();
  for (let i = 0; i < tries && !done(last); i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    last = await attempt();
  }
  return last;
}

/** An audit sink that keeps the Events in memory, for `startProxy({ audit })` or a ProxyServer. */
export function memoryAudit(): { readonly sink: AuditSink; readonly events: AuditEvent[] } {
  const events: AuditEvent[] = [];
  return {
    events,
    sink: {
      // Through JSON, as the file sink writes them: what a test reads is what an operator's tools would.
      write: (event) => void events.push(JSON.parse(JSON.stringify(event)) as AuditEvent),
      close: () => {},
    },
  };
}
