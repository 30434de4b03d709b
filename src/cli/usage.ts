// Help text of the commands, kept apart so that `help` loads none of their code.

export const SERVE_USAGE = `  serve --config FILE [--log-level LEVEL]
        Run the proxy: SPIFFE mTLS front door (HTTP/2 and HTTP/1.1), per-request policy decisions, forwarding to
        kube-apiserver with impersonation headers, and an admin port (/healthz, /readyz, /metrics).
`;

export const AGENT_USAGE = `  agent --config FILE [--log-level LEVEL] [--join-token TOKEN]
        Run the bundled Workload API agent: caller attestation (unix, k8s) and SVIDs rotated at half-life, issued
        by its embedded CA from a YAML entries file (issuer: ca), or by a SPIRE server it attests to (issuer:
        spire; --join-token for the first attestation). Stops on SIGINT/SIGTERM.
`;

export const API_USAGE = `  api fetch x509 [--socket ADDR] [--write DIR] [--json] [--timeout DURATION]
        Fetch this process's X.509-SVIDs and bundles from the Workload API and print SPIFFE IDs and expiry.
        --write DIR also writes svid.N.pem (chain), svid.N.key (PKCS#8, mode 0600), bundle.N.pem and
        federated_bundle.<trust domain>.pem.
  api fetch jwt --audience AUD [--audience AUD ...] [--spiffe-id ID] [--socket ADDR] [--json]
        Fetch JWT-SVIDs for the audience(s) and print them with their SPIFFE ID and expiry.
  api fetch bundles [--socket ADDR] [--json]
        Print the X.509 and JWT bundles this process may use, per trust domain.
  api validate jwt --audience AUD --svid TOKEN [--socket ADDR] [--json]
        Ask the Workload API to validate a JWT-SVID; print its SPIFFE ID and claims, or the refusal (exit 1).
        ADDR defaults to $SPIFFE_ENDPOINT_SOCKET, else unix:///run/kube-svid-proxy/agent.sock.
`;

export const CREDENTIAL_USAGE = `  credential [--socket ADDR] [--hint HINT] [--timeout DURATION]
        kubectl exec credential plugin: print an ExecCredential (client.authentication.k8s.io/v1, or v1beta1
        when KUBERNETES_EXEC_INFO asks for it) holding this process's X.509-SVID chain and key, fetched from the
        Workload API now; it expires at the SVID's half-life, so kubectl asks again before the SVID expires.
  credential kubeconfig --server URL [--socket ADDR] [--hint HINT] [--ca-file FILE] [--name NAME]
        Print a kubeconfig whose user runs the plugin above (exec, interactiveMode Never).
`;

export const BUNDLE_USAGE = `  bundle show [--state-dir DIR | --config FILE] [--format spiffe|pem]
        Print our trust bundle as the agent last published it (the bundle endpoint serves the same keys and
        sequence, with its spiffe_refresh_hint).
  bundle list [--state-dir DIR | --config FILE] [--json]
        List the federated bundles the agent holds: source, age, sequence, and each endpoint's last success and
        last error.
  bundle set --trust-domain NAME --file FILE|- [--format spiffe|pem] [--state-dir DIR | --config FILE]
        Set a federated trust domain's bundle (first contact, or repairing an https_spiffe relationship); the
        agent takes it on SIGHUP. DIR defaults to agent.yaml's stateDir, else /var/lib/kube-svid-proxy/agent.
`;

export const GITOPS_USAGE = `  client --config FILE [--log-level LEVEL]
        Run the client mode: a local listener per spoke (loopback or Unix socket; HTTP/1.1 or h2c) forwarding to
        the spoke proxies over SPIFFE mTLS with this workload's SVID, rotated without cutting watches.
  client kubeconfig --config FILE --spoke NAME [--name NAME]
        Print a kubeconfig that reaches the spoke through the local listener (no credential in it).
  writer --config FILE [--log-level LEVEL]
        Run the credential writer: keep Argo CD cluster Secrets and Flux kubeconfig Secrets filled with the
        current SVID and the spoke's bundle, rewritten at each rotation.
`;

export const POLICY_USAGE = `  policy check FILE
        Validate a policy file: print a one-line summary (exit 0), or every problem as FILE:LINE:COL: message
        on stderr (exit 1).
  policy explain FILE --id SPIFFE_ID [--verb VERB] [--resource GROUP/RESOURCE[/SUB]] [--namespace NS]
        [--path PATH] [--impersonate-user USER [--impersonate-group GROUP]...] [--json]
        Show which rule matches the ID (or why none does) and the Kubernetes user, groups, uid and extras it
        maps to; with --resource (or --path for a non-resource request) also whether the rule's limits allow
        the request; with --impersonate-user (the client's own Impersonate-User and Impersonate-Group) whether
        the rule's impersonate key allows that nested impersonation. Exit 0 when allowed, 1 when denied.
  policy rbac FILE [--service-account NAMESPACE/NAME]
        Print a ClusterRole and ClusterRoleBinding (YAML) letting the proxy's service account (default
        kube-system/kube-svid-proxy) impersonate exactly the users, groups, uids and extras the policy can
        produce, and what nested impersonation needs (a Role and RoleBinding per namespace of service accounts
        it allows); values that depend on a pattern's or trust domain's IDs are warned about (stderr and YAML).
`;

/** One command's help: what `<command> --help` and `help <command>` print. */
interface CommandHelp {
  /** The invocation after `kube-svid-proxy `; more than one for a command with alternative forms. */
  readonly synopsis: readonly string[];
  /** One line: what the command does. */
  readonly summary: string;
  /** Flag (with its value's name) and its meaning, default included. */
  readonly flags: readonly (readonly [string, string])[];
  /** Subcommands of a group (keys of COMMANDS), listed with their summaries. */
  readonly subcommands?: readonly string[];
  readonly examples: readonly string[];
}

const LOG_LEVEL_FLAG = [
  '    --log-level LEVEL',
  "fatal, error, warn, info, debug, trace or silent; overrides logLevel in the config file (default: the file's)",
] as const;
const SOCKET_FLAG = [
  '    --socket ADDR',
  'the Workload API, unix:///path (or unix:/path, or an absolute path); TCP is refused. Default: ' +
    '$SPIFFE_ENDPOINT_SOCKET, else unix:///run/kube-svid-proxy/agent.sock',
] as const;
const TIMEOUT_FLAG = [
  '    --timeout DURATION',
  'give up after this long, e.g. 500ms, 10s (default 5s)',
] as const;
const JSON_FLAG = ['    --json', 'print JSON instead of text (default: text)'] as const;
const HINT_FLAG = [
  '    --hint HINT',
  "use the SVID with this hint (default: the first one, the caller's default identity)",
] as const;
const NO_FLAGS: readonly (readonly [string, string])[] = [];
const STATE_DIR_FLAG = [
  '    --state-dir DIR',
  "the agent's state directory (default: agent.yaml's stateDir with --config, else /var/lib/kube-svid-proxy/agent)",
] as const;
const CONFIG_FLAG = ['-c, --config FILE', 'read the state directory from this agent.yaml'] as const;

/** Every command and subcommand, by its words: `help api fetch jwt` looks up "api fetch jwt". */
export const COMMANDS: Readonly<Record<string, CommandHelp>> = {
  svid: {
    synopsis: ['svid verify CHAIN --bundle TRUST_DOMAIN=FILE [...]'],
    summary: 'Work with X.509-SVIDs offline.',
    flags: NO_FLAGS,
    subcommands: ['svid verify'],
    examples: ['kube-svid-proxy svid verify leaf.pem --bundle example.org=bundle.json'],
  },
  'svid verify': {
    synopsis: ['svid verify CHAIN --bundle TRUST_DOMAIN=FILE [--bundle TRUST_DOMAIN=FILE ...] [--at TIME]'],
    summary:
      'Verify an X.509-SVID chain as the proxy would: print its SPIFFE ID, or the code of the rule it breaks (exit 1).',
    flags: [
      ['    CHAIN', 'the SVID, PEM or DER, leaf first and intermediates after; required'],
      [
        '    --bundle TD=FILE',
        'the bundle of trust domain TD, SPIFFE bundle JSON or PEM CA certificates; repeat per trust domain; ' +
          'at least one',
      ],
      ['    --at TIME', 'verify at this ISO 8601 time, e.g. 2026-12-01T00:00:00Z (default: now)'],
    ],
    examples: [
      'kube-svid-proxy svid verify client.crt.pem --bundle hub.example.org=hub/bundle.json \\\n' +
        '    --bundle spoke.example.org=spoke/bundle.pem',
    ],
  },
  serve: {
    synopsis: ['serve --config FILE [--log-level LEVEL]'],
    summary:
      'Run the proxy: the SPIFFE mTLS front door for kube-apiserver, its policy, and the admin port; ' +
      'SIGHUP re-reads its files, SIGTERM drains and stops.',
    flags: [['-c, --config FILE', 'the proxy configuration (YAML); required'], LOG_LEVEL_FLAG],
    examples: ['kube-svid-proxy serve --config examples/proxy/proxy.yaml'],
  },
  agent: {
    synopsis: ['agent --config FILE [--log-level LEVEL] [--join-token TOKEN]'],
    summary:
      'Run the bundled Workload API agent: caller attestation and SVIDs from its embedded CA (issuer: ca) or ' +
      'from a SPIRE server (issuer: spire); SIGHUP re-reads its files, SIGINT/SIGTERM stops it.',
    flags: [
      ['-c, --config FILE', 'the agent configuration (YAML); required'],
      LOG_LEVEL_FLAG,
      [
        '--join-token TOKEN',
        'issuer: spire: the one-time join token (spire-server token generate) for the first attestation; ' +
          'overrides spire.nodeAttestor.joinToken',
      ],
    ],
    examples: [
      'kube-svid-proxy agent --config examples/agent/agent.yaml',
      'kube-svid-proxy agent --config examples/agent/agent-spire.yaml --join-token "$(cat token)"',
    ],
  },
  api: {
    synopsis: ['api fetch x509|jwt|bundles [flags]', 'api validate jwt [flags]'],
    summary: "Ask the Workload API as this process, exactly as a workload would (ours or SPIRE's agent).",
    flags: NO_FLAGS,
    subcommands: ['api fetch x509', 'api fetch jwt', 'api fetch bundles', 'api validate jwt'],
    examples: ['kube-svid-proxy api fetch x509 --socket unix:///run/kube-svid-proxy/agent.sock'],
  },
  'api fetch': {
    synopsis: ['api fetch x509|jwt|bundles [flags]'],
    summary: 'Fetch X.509-SVIDs, JWT-SVIDs or bundles from the Workload API.',
    flags: NO_FLAGS,
    subcommands: ['api fetch x509', 'api fetch jwt', 'api fetch bundles'],
    examples: ['kube-svid-proxy api fetch bundles --json'],
  },
  'api fetch x509': {
    synopsis: ['api fetch x509 [--socket ADDR] [--write DIR] [--json] [--timeout DURATION]'],
    summary: "Fetch this process's X.509-SVIDs and bundles; print each SPIFFE ID, hint, validity and issuer.",
    flags: [
      SOCKET_FLAG,
      [
        '    --write DIR',
        'also write svid.N.pem (chain), svid.N.key (PKCS#8, mode 0600), bundle.N.pem and ' +
          'federated_bundle.<trust domain>.pem into DIR (default: write nothing)',
      ],
      JSON_FLAG,
      TIMEOUT_FLAG,
    ],
    examples: ['kube-svid-proxy api fetch x509 --write /tmp/svid'],
  },
  'api fetch jwt': {
    synopsis: [
      'api fetch jwt --audience AUD [--audience AUD ...] [--spiffe-id ID] [--socket ADDR] [--json] [--timeout DURATION]',
    ],
    summary: 'Fetch JWT-SVIDs for the audience(s); print each token with its SPIFFE ID, audience and expiry.',
    flags: [
      ['    --audience AUD', 'an audience to mint the token for; repeatable; at least one required'],
      [
        '    --spiffe-id ID',
        "only this one of the caller's identities (default: every identity the caller has)",
      ],
      SOCKET_FLAG,
      JSON_FLAG,
      TIMEOUT_FLAG,
    ],
    examples: ['kube-svid-proxy api fetch jwt --audience spoke-apiserver --json'],
  },
  'api fetch bundles': {
    synopsis: ['api fetch bundles [--socket ADDR] [--json] [--timeout DURATION]'],
    summary: 'Print the X.509 and JWT bundles this process may use, per trust domain.',
    flags: [SOCKET_FLAG, JSON_FLAG, TIMEOUT_FLAG],
    examples: ['kube-svid-proxy api fetch bundles --json'],
  },
  'api validate': {
    synopsis: ['api validate jwt --audience AUD --svid TOKEN [flags]'],
    summary: 'Ask the Workload API to validate a credential.',
    flags: NO_FLAGS,
    subcommands: ['api validate jwt'],
    examples: ['kube-svid-proxy api validate jwt --audience spoke-apiserver --svid "$TOKEN"'],
  },
  'api validate jwt': {
    synopsis: ['api validate jwt --audience AUD --svid TOKEN [--socket ADDR] [--json] [--timeout DURATION]'],
    summary:
      'Have the Workload API validate a JWT-SVID; print "valid: <SPIFFE ID>" and its claims, or the refusal (exit 1).',
    flags: [
      ['    --audience AUD', 'the audience the token must carry; required'],
      ['    --svid TOKEN', 'the JWT-SVID to check; required'],
      SOCKET_FLAG,
      JSON_FLAG,
      TIMEOUT_FLAG,
    ],
    examples: ['kube-svid-proxy api validate jwt --audience spoke-apiserver --svid "$TOKEN"'],
  },
  credential: {
    synopsis: [
      'credential [--socket ADDR] [--hint HINT] [--timeout DURATION]',
      'credential kubeconfig [flags]',
    ],
    summary:
      "kubectl exec credential plugin: print an ExecCredential holding this process's X.509-SVID and key, " +
      "fetched now, expiring at the SVID's half-life.",
    flags: [SOCKET_FLAG, HINT_FLAG, TIMEOUT_FLAG],
    subcommands: ['credential kubeconfig'],
    examples: ['kube-svid-proxy credential --socket unix:///run/kube-svid-proxy/agent.sock'],
  },
  'credential kubeconfig': {
    synopsis: [
      'credential kubeconfig --server URL [--socket ADDR] [--hint HINT] [--ca-file FILE] [--name NAME]',
    ],
    summary:
      'Print a kubeconfig whose user runs `credential` (exec, interactiveMode Never) against the proxy.',
    flags: [
      ['    --server URL', 'the proxy, https://host:port; required'],
      [
        '    --socket ADDR',
        "the Workload API, written into the plugin's arguments. Default: $SPIFFE_ENDPOINT_SOCKET, else " +
          'unix:///run/kube-svid-proxy/agent.sock',
      ],
      HINT_FLAG,
      [
        '    --ca-file FILE',
        "PEM CA certificates for the proxy's serving SVID, embedded as certificate-authority-data " +
          '(default: the system CAs)',
      ],
      ['    --name NAME', 'the name of the cluster, user and context (default kube-svid-proxy)'],
    ],
    examples: [
      'kube-svid-proxy credential kubeconfig --server https://spoke.example.org:8443 \\\n' +
        '    --ca-file /tmp/svid/bundle.0.pem --name spoke > spoke.kubeconfig',
    ],
  },
  bundle: {
    synopsis: ['bundle show|list|set [flags]'],
    summary:
      "Show our trust bundle, list federated bundles with their age and last error, or set a federated trust domain's bundle.",
    flags: NO_FLAGS,
    subcommands: ['bundle show', 'bundle list', 'bundle set'],
    examples: ['kube-svid-proxy bundle show --config /etc/kube-svid-proxy/agent.yaml > spoke-bundle.json'],
  },
  'bundle show': {
    synopsis: ['bundle show [--state-dir DIR | --config FILE] [--format spiffe|pem]'],
    summary:
      'Print our trust bundle as the agent last published it: SPIFFE bundle JSON (with spiffe_sequence), or PEM CA certificates.',
    flags: [STATE_DIR_FLAG, CONFIG_FLAG, ['    --format FORMAT', 'spiffe (default) or pem']],
    examples: [
      'kube-svid-proxy bundle show --config /etc/kube-svid-proxy/agent.yaml > spoke.example.org.json',
      'kube-svid-proxy bundle show --state-dir /var/lib/kube-svid-proxy/agent --format pem',
    ],
  },
  'bundle list': {
    synopsis: ['bundle list [--state-dir DIR | --config FILE] [--json]'],
    summary:
      'List the federated bundles in the state directory: authorities, sequence, source and age, and for each ' +
      'endpoint the agent polls its last success and last error (as the agent last wrote them).',
    flags: [STATE_DIR_FLAG, CONFIG_FLAG, JSON_FLAG],
    examples: ['kube-svid-proxy bundle list --config /etc/kube-svid-proxy/agent.yaml'],
  },
  'bundle set': {
    synopsis: [
      'bundle set --trust-domain NAME --file FILE|- [--format spiffe|pem] [--state-dir DIR | --config FILE]',
    ],
    summary:
      'Set a federated trust domain\'s bundle in the state directory (source "set"). A running agent takes it on ' +
      'SIGHUP: for a trust domain it polls, it replaces the held bundle (how an https_spiffe relationship is ' +
      'bootstrapped or repaired); for any other, it becomes a static federated bundle.',
    flags: [
      ['    --trust-domain NAME', 'the federated trust domain; required (never our own)'],
      ['    --file FILE', 'the bundle, or - for standard input; required'],
      [
        '    --format FORMAT',
        'spiffe (SPIFFE bundle JSON, default) or pem (CA certificates only, no JWT keys)',
      ],
      STATE_DIR_FLAG,
      CONFIG_FLAG,
    ],
    examples: [
      'kube-svid-proxy bundle set --trust-domain hub.example.org --file hub.example.org.json \\\n' +
        '    --config /etc/kube-svid-proxy/agent.yaml && kill -HUP "$(pidof kube-svid-proxy)"',
    ],
  },
  policy: {
    synopsis: ['policy check|explain|rbac FILE [flags]'],
    summary: 'Check a policy file, explain its decision for an ID, or derive the RBAC the proxy needs.',
    flags: NO_FLAGS,
    subcommands: ['policy check', 'policy explain', 'policy rbac'],
    examples: ['kube-svid-proxy policy check policy.yaml'],
  },
  'policy check': {
    synopsis: ['policy check FILE'],
    summary:
      'Validate a policy file: a one-line summary (exit 0), or every problem as FILE:LINE:COL: message on stderr (exit 1).',
    flags: [['    FILE', 'the policy file (YAML); required']],
    examples: ['kube-svid-proxy policy check policy.yaml'],
  },
  'policy explain': {
    synopsis: [
      'policy explain FILE --id SPIFFE_ID [--verb VERB] [--resource GROUP/RESOURCE[/SUB]] [--namespace NS]\n' +
        '    [--path PATH] [--impersonate-user USER [--impersonate-group GROUP]...] [--json]',
    ],
    summary:
      'Show which rule matches the ID, the identity it maps to, and whether a described request is allowed ' +
      '(exit 0 allowed, 1 denied).',
    flags: [
      ['    FILE', 'the policy file (YAML); required'],
      ['    --id SPIFFE_ID', "the client's SPIFFE ID; required"],
      [
        '    --verb VERB',
        "the request's Kubernetes verb, e.g. get, list, create (default get); needs --resource or --path",
      ],
      [
        '    --resource GROUP/RESOURCE[/SUB]',
        'the resource requested, as in limits.resources: pods, pods/log, apps/deployments ' +
          '(default: no request, only the identity)',
      ],
      ['    --namespace NS', "the request's namespace (default: cluster-scoped)"],
      ['    --path PATH', "a non-resource request's path, e.g. /healthz (instead of --resource)"],
      [
        '    --impersonate-user USER',
        "the client's own Impersonate-User: is this nested impersonation allowed? (default: none)",
      ],
      [
        '    --impersonate-group GROUP',
        "the client's Impersonate-Group; repeatable; needs --impersonate-user",
      ],
      ['    --json', 'print the decision as JSON (default: text)'],
    ],
    examples: [
      'kube-svid-proxy policy explain policy.yaml --id spiffe://hub.example.org/ns/argocd/sa/controller \\\n' +
        '    --verb list --resource apps/deployments --namespace team-a',
    ],
  },
  'policy rbac': {
    synopsis: ['policy rbac FILE [--service-account NAMESPACE/NAME]'],
    summary:
      'Print the ClusterRole and ClusterRoleBinding (YAML) that let the proxy impersonate exactly what the policy can produce.',
    flags: [
      ['    FILE', 'the policy file (YAML); required'],
      [
        '    --service-account NAMESPACE/NAME',
        "the proxy's service account (default kube-system/kube-svid-proxy)",
      ],
    ],
    examples: ['kube-svid-proxy policy rbac policy.yaml --service-account proxy/front | kubectl apply -f -'],
  },
  help: {
    synopsis: ['help [COMMAND [SUBCOMMAND ...]]'],
    summary: 'Print the list of commands, or the usage of one command (the same as COMMAND --help).',
    flags: [['    COMMAND', 'the command to describe, e.g. serve or api fetch jwt (default: list them all)']],
    examples: ['kube-svid-proxy help api fetch jwt'],
  },
  version: {
    synopsis: ['version'],
    summary: 'Print the version of kube-svid-proxy.',
    flags: NO_FLAGS,
    examples: ['kube-svid-proxy version'],
  },
  client: {
    synopsis: [
      'client --config FILE [--log-level LEVEL]',
      'client kubeconfig --config FILE --spoke NAME [--name NAME]',
    ],
    summary:
      'Run the client mode: one local listener per spoke (loopback or a Unix socket, plain HTTP/1.1 or h2c) whose ' +
      "requests go to that spoke proxy over SPIFFE mTLS with this workload's SVID, held in memory and rotated " +
      'without cutting watches; admin port with /healthz, /readyz, /metrics. SIGTERM drains and stops.',
    flags: [['-c, --config FILE', 'the client configuration (YAML); required'], LOG_LEVEL_FLAG],
    subcommands: ['client kubeconfig'],
    examples: ['kube-svid-proxy client --config examples/client/client.yaml'],
  },
  'client kubeconfig': {
    synopsis: ['client kubeconfig --config FILE --spoke NAME [--name NAME]'],
    summary:
      "Print a self-contained kubeconfig that reaches the spoke through the client mode's local listener " +
      '(server http://127.0.0.1:PORT, no credential: the client mode authenticates), e.g. the value of a Flux ' +
      'kubeconfig Secret.',
    flags: [
      ['-c, --config FILE', 'the client configuration (YAML); required'],
      ['    --spoke NAME', 'the spoke (its name in spokes); required'],
      ['    --name NAME', 'the cluster, user and context name in the kubeconfig (default: the spoke name)'],
    ],
    examples: ['kube-svid-proxy client kubeconfig --config client.yaml --spoke spoke-a > spoke-a.kubeconfig'],
  },
  writer: {
    synopsis: ['writer --config FILE [--log-level LEVEL]'],
    summary:
      'Run the credential writer: keep Argo CD cluster Secrets and Flux kubeconfig Secrets filled with this ' +
      "workload's current X.509-SVID and the spoke's bundle, rewritten at every rotation and bundle change, " +
      'touching only the keys it owns; admin port with /healthz, /readyz, /metrics.',
    flags: [['-c, --config FILE', 'the writer configuration (YAML); required'], LOG_LEVEL_FLAG],
    examples: ['kube-svid-proxy writer --config examples/writer/writer.yaml'],
  },
};

/**
 * The longest run of leading words of `args` that names a command ("api fetch jwt" for
 * `api fetch jwt --audience a`), or undefined when the first word names none.
 */
export function commandPath(args: readonly string[]): string | undefined {
  let path: string | undefined;
  for (const word of args) {
    const next = path === undefined ? word : `${path} ${word}`;
    if (!Object.hasOwn(COMMANDS, next)) break;
    path = next;
  }
  return path;
}

/** The usage of one command: synopsis, what it does, its flags with meanings and defaults, an example. */
export function commandUsage(path: string): string {
  const help = COMMANDS[path];
  if (help === undefined) throw new Error(`no help for ${path}`);
  const lines = help.synopsis.map((s, i) => `${i === 0 ? 'Usage:' : '      '} kube-svid-proxy ${s}`);
  lines.push('', ...wrap(help.summary, 0));
  if (help.subcommands !== undefined) {
    lines.push('', 'Commands:');
    const width = Math.max(...help.subcommands.map((s) => s.length));
    for (const sub of help.subcommands) {
      const summary = wrap(COMMANDS[sub]?.summary ?? '', width + 4);
      lines.push(`  ${sub.padEnd(width)}  ${summary.join(`\n${' '.repeat(width + 4)}`)}`);
    }
    lines.push('', `Run 'kube-svid-proxy help ${path} COMMAND' for a command's flags.`);
  }
  const all = [...help.flags, ['-h, --help', 'print this help and exit'] as const];
  const width = Math.max(...all.map(([flag]) => flag.length));
  const row = (name: string, meaning: string): string =>
    `  ${name.padEnd(width)}  ${wrap(meaning, width + 4).join(`\n${' '.repeat(width + 4)}`)}`;
  const positionals = all.filter(([flag]) => !flag.trimStart().startsWith('-'));
  if (positionals.length > 0) lines.push('', 'Arguments:');
  for (const [name, meaning] of positionals) lines.push(row(name.trimStart(), meaning));
  lines.push('', 'Flags:');
  for (const [flag, meaning] of all) if (flag.trimStart().startsWith('-')) lines.push(row(flag, meaning));
  lines.push('', help.examples.length === 1 ? 'Example:' : 'Examples:');
  for (const example of help.examples) lines.push(`  ${example}`);
  return `${lines.join('\n')}\n`;
}

/** Breaks text into lines that fit 110 columns after `indent` columns. */
function wrap(text: string, indent: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(' ')) {
    if (line !== '' && indent + line.length + 1 + word.length > 110) {
      lines.push(line);
      line = word;
    } else line = line === '' ? word : `${line} ${word}`;
  }
  lines.push(line);
  return lines;
}
