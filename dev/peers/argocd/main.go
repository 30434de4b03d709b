// argocd-probe: turns an Argo CD cluster Secret into a Kubernetes client with Argo CD's own code
// (github.com/argoproj/argo-cd/v3, pinned in go.mod) and asks the server who it is.
//
//	argocd-probe [-config both|rest|raw] [-repeat N -interval D] [-timeout D] <secret.json|->
//
// The Secret is read as JSON (apiVersion v1, kind Secret, `data` base64 as in the API; `stringData` is merged over
// `data` as the API server would). It must carry the label Argo CD selects cluster Secrets by
// (argocd.argoproj.io/secret-type=cluster), else Argo CD would never see it and the probe says so.
//
// The conversion is Argo CD's, nothing of ours:
//
//   - db.SecretToCluster (util/db/cluster.go): what the application controller's cluster watch
//     (db.WatchClusters, from controller/cache) runs on every added or modified cluster Secret. The informer
//     behind db.GetCluster (util/settings/cluster_informer.go) runs secretToCluster, a copy of it that differs
//     only by also setting the cache key (ObjectMeta name/namespace).
//   - Cluster.RESTConfig() (pkg/apis/application/v1alpha1/types.go): RawRestConfig() plus SetK8SConfigDefaults
//     (Argo's own http.Transport, QPS/burst, timeouts); what the controller's cluster cache (controller/cache)
//     and the app controller build their clients from.
//   - Cluster.RawRestConfig() (same file): the plain client-go config; what the controller's sync
//     (controller/sync.go, kubectl apply) uses.
//
// With -config both (the default) each round makes a SelfSubjectReview (authentication.k8s.io/v1) and a
// GET /version (discovery's ServerVersion) through each config, and fails if the two see different identities.
// Each round prints one JSON line on stdout:
//
//	{"server":..., "name":..., "username":..., "uid":..., "groups":[...], "extra":{...}, "serverVersion":...,
//	 "via":["RESTConfig","RawRestConfig"], "certData":{"subject":..., "serial":..., "notAfter":...}}
//
// certData describes the first PEM certificate in the Secret's tlsClientConfig.certData, to tell rotations apart
// (absent when there is none; with an http:// server it is in the Secret but never presented).
//
// -repeat N re-reads the file and converts it again every round (-interval apart), building fresh configs and
// clients, as Argo CD's cluster cache does when a cluster Secret's config changes (controller/cache handleModEvent
// calls RESTConfig() again), so a rotated certificate written to the file shows in the next round. "-" (stdin) is
// read once. On error: a message on stderr (with "status <code> <reason>" when the server answered with a
// Kubernetes API error) and exit status 1; 2 for usage errors.
package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"reflect"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	apiversion "k8s.io/apimachinery/pkg/version"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/argoproj/argo-cd/v3/common"
	"github.com/argoproj/argo-cd/v3/util/db"
)

type identity struct {
	Username      string              `json:"username"`
	UID           string              `json:"uid,omitempty"`
	Groups        []string            `json:"groups"`
	Extra         map[string][]string `json:"extra"`
	ServerVersion string              `json:"serverVersion"`
}

type certInfo struct {
	Subject  string `json:"subject"`
	Serial   string `json:"serial"`
	NotAfter string `json:"notAfter"`
}

type result struct {
	Server string `json:"server"`
	Name   string `json:"name"`
	identity
	Via      []string  `json:"via"`
	CertData *certInfo `json:"certData,omitempty"`
}

func main() {
	configFlag := flag.String("config", "both", "which of Argo CD's configs to use: rest (Cluster.RESTConfig), raw (Cluster.RawRestConfig), both")
	repeat := flag.Int("repeat", 1, "rounds: re-read and re-convert the Secret each round")
	interval := flag.Duration("interval", time.Second, "pause between rounds")
	timeout := flag.Duration("timeout", 30*time.Second, "time limit of each round's requests")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: argocd-probe [-config both|rest|raw] [-repeat N -interval D] [-timeout D] <secret.json|->")
		flag.PrintDefaults()
	}
	flag.Parse()
	var via []string
	switch *configFlag {
	case "both":
		via = []string{"RESTConfig", "RawRestConfig"}
	case "rest":
		via = []string{"RESTConfig"}
	case "raw":
		via = []string{"RawRestConfig"}
	}
	if flag.NArg() != 1 || via == nil || *repeat < 1 {
		flag.Usage()
		os.Exit(2)
	}
	path := flag.Arg(0)

	var stdin []byte // "-" is read once and reused every round
	for i := 0; i < *repeat; i++ {
		if i > 0 {
			time.Sleep(*interval)
		}
		var raw []byte
		var err error
		switch {
		case path != "-":
			raw, err = os.ReadFile(path)
		case stdin == nil:
			stdin, err = io.ReadAll(os.Stdin)
			raw = stdin
		default:
			raw = stdin
		}
		if err == nil {
			var out *result
			if out, err = round(raw, via, *timeout); err == nil {
				err = json.NewEncoder(os.Stdout).Encode(out)
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "argocd-probe: round %d: %v\n", i+1, err)
			os.Exit(1)
		}
	}
}

func round(raw []byte, via []string, timeout time.Duration) (*result, error) {
	secret, err := readSecret(raw)
	if err != nil {
		return nil, err
	}
	cluster, err := db.SecretToCluster(secret)
	if err != nil {
		return nil, fmt.Errorf("db.SecretToCluster: %w", err)
	}
	out := &result{Server: cluster.Server, Name: cluster.Name, Via: via}
	out.CertData = describeCert(cluster.Config.CertData)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for i, name := range via {
		var config *rest.Config
		if name == "RESTConfig" {
			config, err = cluster.RESTConfig()
		} else {
			config, err = cluster.RawRestConfig()
		}
		if err != nil {
			return nil, fmt.Errorf("Cluster.%s: %w", name, err)
		}
		id, err := ask(ctx, config)
		if err != nil {
			return nil, fmt.Errorf("via Cluster.%s to %s: %w", name, cluster.Server, err)
		}
		if i == 0 {
			out.identity = *id
		} else if !reflect.DeepEqual(*id, out.identity) {
			return nil, fmt.Errorf("Cluster.%s sees %+v but Cluster.%s sees %+v", via[0], out.identity, name, *id)
		}
	}
	return out, nil
}

// readSecret decodes a v1 Secret and checks it is one Argo CD would take for a cluster.
func readSecret(raw []byte) (*corev1.Secret, error) {
	var secret corev1.Secret
	if err := json.Unmarshal(raw, &secret); err != nil {
		return nil, fmt.Errorf("reading the Secret: %w", err)
	}
	if secret.APIVersion != "v1" || secret.Kind != "Secret" {
		return nil, fmt.Errorf("not a v1 Secret (apiVersion %q, kind %q)", secret.APIVersion, secret.Kind)
	}
	if secret.Data == nil {
		secret.Data = map[string][]byte{}
	}
	for k, v := range secret.StringData {
		secret.Data[k] = []byte(v)
	}
	secret.StringData = nil
	if got := secret.Labels[common.LabelKeySecretType]; got != common.LabelValueSecretTypeCluster {
		return nil, fmt.Errorf("label %s is %q, not %q: Argo CD selects cluster Secrets by it and would ignore this one",
			common.LabelKeySecretType, got, common.LabelValueSecretTypeCluster)
	}
	return &secret, nil
}

// ask makes the SelfSubjectReview and the ServerVersion request through a client built on config.
func ask(ctx context.Context, config *rest.Config) (*identity, error) {
	clientset, err := kubernetes.NewForConfig(config)
	if err != nil {
		return nil, fmt.Errorf("kubernetes.NewForConfig: %w", err)
	}
	review, err := clientset.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("SelfSubjectReview: %s", describe(err))
	}
	// What discovery's ServerVersion() does, with the round's context (it takes none, and Argo CD's configs set no
	// client timeout unless ARGOCD_K8S_SERVER_SIDE_TIMEOUT is set).
	body, err := clientset.Discovery().RESTClient().Get().AbsPath("/version").Do(ctx).Raw()
	if err != nil {
		return nil, fmt.Errorf("GET /version: %s", describe(err))
	}
	var version apiversion.Info
	if err := json.Unmarshal(body, &version); err != nil {
		return nil, fmt.Errorf("GET /version: %w", err)
	}
	info := review.Status.UserInfo
	id := &identity{Username: info.Username, UID: info.UID, Groups: info.Groups, Extra: map[string][]string{}, ServerVersion: version.GitVersion}
	if id.Groups == nil {
		id.Groups = []string{}
	}
	for k, v := range info.Extra {
		id.Extra[k] = v
	}
	return id, nil
}

// describe says "status <code> <reason>: <message>" for an API error, else the error.
func describe(err error) string {
	var status apierrors.APIStatus
	if errors.As(err, &status) {
		s := status.Status()
		return fmt.Sprintf("status %d %s: %v", s.Code, s.Reason, err)
	}
	return err.Error()
}

// describeCert describes the first certificate of tlsClientConfig.certData; nil when there is none or it does not
// parse (the TLS handshake then says what is wrong).
func describeCert(certData []byte) *certInfo {
	block, _ := pem.Decode(certData)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil
	}
	return &certInfo{Subject: cert.Subject.String(), Serial: cert.SerialNumber.Text(16), NotAfter: cert.NotAfter.UTC().Format(time.RFC3339)}
}
