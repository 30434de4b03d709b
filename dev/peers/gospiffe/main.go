// Command gospiffe-probe is a small go-spiffe client used by kube-svid-proxy's interop tests.
// It talks to a Workload API socket exactly as a real Go workload would and prints one JSON
// object per line, so the Node test can assert what go-spiffe saw.
//
//	gospiffe-probe x509 -socket unix:///path [-updates N]
//	gospiffe-probe jwt -socket unix:///path -audience AUD
//	gospiffe-probe verify -svid chain.pem -bundle bundle.json -trust-domain TD
package main

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func emit(v map[string]any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(b))
}

func fail(format string, args ...any) {
	emit(map[string]any{"event": "fatal", "error": fmt.Sprintf(format, args...)})
	os.Exit(1)
}

// watcher prints every X.509 context go-spiffe delivers, and every watch error (a reconnect shows up here).
type watcher struct {
	updates chan *workloadapi.X509Context
}

func (w *watcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w.updates <- c }

func (w *watcher) OnX509ContextWatchError(err error) {
	emit(map[string]any{"event": "watch-error", "error": err.Error()})
}

func describe(c *workloadapi.X509Context) map[string]any {
	svid := c.DefaultSVID()
	// The SVID must verify against the bundle the same update delivered.
	_, _, verr := x509svid.Verify(svid.Certificates, c.Bundles)
	tds := []string{}
	for _, b := range c.Bundles.Bundles() {
		tds = append(tds, b.TrustDomain().IDString())
	}
	sort.Strings(tds)
	ids := []string{}
	for _, s := range c.SVIDs {
		ids = append(ids, s.ID.String())
	}
	sum := sha256.Sum256(svid.Certificates[0].Raw)
	out := map[string]any{
		"event":         "x509",
		"id":            svid.ID.String(),
		"ids":           ids,
		"hint":          svid.Hint,
		"leaf_sha256":   hex.EncodeToString(sum[:]),
		"not_after":     svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339),
		"issuer":        svid.Certificates[len(svid.Certificates)-1].Issuer.String(),
		"trust_domains": tds,
		"verified":      verr == nil,
	}
	if verr != nil {
		out["verify_error"] = verr.Error()
	}
	return out
}

func runX509(socket string, updates int, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(socket))
	if err != nil {
		fail("new client: %v", err)
	}
	defer client.Close()

	w := &watcher{updates: make(chan *workloadapi.X509Context, 16)}
	done := make(chan error, 1)
	go func() { done <- client.WatchX509Context(ctx, w) }()
	for seen := 0; seen < updates; seen++ {
		select {
		case c := <-w.updates:
			emit(describe(c))
		case err := <-done:
			fail("watch ended: %v", err)
		case <-ctx.Done():
			fail("timed out after %d of %d updates", seen, updates)
		}
	}
	emit(map[string]any{"event": "done"})
}

func runJWT(socket, audience string, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(socket))
	if err != nil {
		fail("new client: %v", err)
	}
	defer client.Close()

	svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		fail("fetch JWT-SVID: %v", err)
	}
	emit(map[string]any{"event": "jwt", "id": svid.ID.String(), "audience": svid.Audience,
		"expiry": svid.Expiry.UTC().Format(time.RFC3339), "hint": svid.Hint})

	// Validate twice: locally against the JWT bundles, and remotely through ValidateJWTSVID.
	bundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		fail("fetch JWT bundles: %v", err)
	}
	local, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{audience})
	if err != nil {
		fail("local validation: %v", err)
	}
	emit(map[string]any{"event": "jwt-local-valid", "id": local.ID.String()})

	remote, err := client.ValidateJWTSVID(ctx, svid.Marshal(), audience)
	if err != nil {
		fail("ValidateJWTSVID: %v", err)
	}
	emit(map[string]any{"event": "jwt-remote-valid", "id": remote.ID.String()})

	if _, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "someone-else"); err == nil {
		fail("ValidateJWTSVID accepted a token for another audience")
	} else {
		emit(map[string]any{"event": "jwt-wrong-audience-refused", "error": err.Error()})
	}
	td, _ := spiffeid.TrustDomainFromString(svid.ID.TrustDomain().String())
	if _, err := bundles.GetJWTBundleForTrustDomain(td); err != nil {
		fail("no JWT bundle for %s: %v", td, err)
	}
	emit(map[string]any{"event": "done"})
}

// runVerify checks an X.509-SVID chain (PEM, leaf first) against a SPIFFE bundle document (JSON), both parsed by
// go-spiffe itself: what a Go peer would conclude from a bundle it was handed.
func runVerify(svidPath, bundlePath, trustDomain string) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		fail("trust domain: %v", err)
	}
	bundle, err := spiffebundle.Load(td, bundlePath)
	if err != nil {
		fail("load bundle: %v", err)
	}
	data, err := os.ReadFile(svidPath)
	if err != nil {
		fail("read svid: %v", err)
	}
	var certs []*x509.Certificate
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			fail("parse certificate: %v", err)
		}
		certs = append(certs, cert)
	}
	id, chains, err := x509svid.Verify(certs, bundle)
	if err != nil {
		emit(map[string]any{"event": "refused", "error": err.Error(),
			"x509_authorities": len(bundle.X509Authorities())})
		os.Exit(1)
	}
	emit(map[string]any{"event": "verified", "id": id.String(), "chain_length": len(chains[0]),
		"x509_authorities": len(bundle.X509Authorities())})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gospiffe-probe x509|jwt -socket unix:///path [flags] | verify -svid F -bundle F -trust-domain TD")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	socket := fs.String("socket", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "Workload API address, unix:///path")
	updates := fs.Int("updates", 1, "x509: number of X.509 context updates to wait for")
	audience := fs.String("audience", "kube-svid-proxy", "jwt: audience to request")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	svidPath := fs.String("svid", "", "verify: the X.509-SVID chain, PEM")
	bundlePath := fs.String("bundle", "", "verify: the SPIFFE bundle document, JSON")
	trustDomain := fs.String("trust-domain", "", "verify: the trust domain the bundle is for")
	_ = fs.Parse(os.Args[2:])
	switch os.Args[1] {
	case "x509":
		runX509(*socket, *updates, *timeout)
	case "jwt":
		runJWT(*socket, *audience, *timeout)
	case "verify":
		runVerify(*svidPath, *bundlePath, *trustDomain)
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q\n", os.Args[1])
		os.Exit(2)
	}
}
