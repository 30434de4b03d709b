// Help text of the commands, kept apart so that `help` loads none of their code.

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
