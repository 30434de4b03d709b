// Help text of the commands, kept apart so that `help` loads none of their code.

export const SERVE_USAGE = `  serve --config FILE [--log-level LEVEL]
        Run the proxy: SPIFFE mTLS front door (HTTP/2 and HTTP/1.1), per-request policy decisions, forwarding to
        kube-apiserver with impersonation headers, and an admin port (/healthz, /readyz, /metrics).
`;

export const AGENT_USAGE = `  agent --config FILE [--log-level LEVEL]
        Run the bundled Workload API agent: a local CA for one trust domain, caller attestation (unix, k8s),
        registration entries from a YAML file (hot reload), SVIDs rotated at half-life. Stops on SIGINT/SIGTERM.
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
