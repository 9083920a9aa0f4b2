// Package controlplane_test checks escrow's control plane against a real kube-apiserver (with
// etcd), started once for the whole test binary by test/kubeharness: the CRDs of the chart are
// applied with kubectl, and objects are created, changed and deleted as an operator would.
//
// The API server's binaries come from test/k8s/tools.sh (ESCROW_K8S_TOOLS); with the variable
// unset every test here skips, so `go test ./...` needs none of them.
package controlplane_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/test/kubeharness"
)

var (
	cluster  *kubeharness.Cluster
	startErr error
	repoRoot string
)

func TestMain(m *testing.M) {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	cluster, startErr = kubeharness.Start(ctx)
	if startErr == nil {
		_, startErr = cluster.Kubectl(ctx, nil, "apply", "-f", filepath.Join(repoRoot, "charts", "escrow", "crds"))
		if startErr == nil {
			startErr = waitEstablished(ctx)
		}
	}
	cancel()
	code := m.Run()
	if cluster != nil {
		cluster.Stop()
	}
	os.Exit(code)
}

// waitEstablished waits until the API server serves every CRD of the chart.
func waitEstablished(ctx context.Context) error {
	_, err := cluster.Kubectl(ctx, nil, "wait", "--for=condition=Established", "--timeout=60s",
		"crd/policies.escrow.dev", "crd/upstreams.escrow.dev", "crd/credentials.escrow.dev", "crd/revocations.escrow.dev")
	return err
}

// kube returns the shared cluster, skipping the test when the tools are not available.
func kube(t testing.TB) *kubeharness.Cluster {
	t.Helper()
	if errors.Is(startErr, kubeharness.ErrNoTools) {
		t.Skip(startErr)
	}
	if startErr != nil {
		msg := startErr.Error()
		if cluster != nil {
			msg += "\n" + cluster.Logs(4096)
		}
		t.Fatal(msg)
	}
	return cluster
}

func kubectl(t testing.TB, stdin string, args ...string) string {
	t.Helper()
	var in []byte
	if stdin != "" {
		in = []byte(stdin)
	}
	out, err := kube(t).Kubectl(context.Background(), in, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func kubectlErr(t testing.TB, stdin string, args ...string) error {
	t.Helper()
	_, err := kube(t).Kubectl(context.Background(), []byte(stdin), args...)
	return err
}

// namespace creates a fresh namespace for one test.
func namespace(t testing.TB, name string) string {
	t.Helper()
	kubectl(t, "", "create", "namespace", name)
	return name
}

func eventually(t testing.TB, within time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func yamlDoc(kind, ns, name, spec string) string {
	return fmt.Sprintf("apiVersion: escrow.dev/v1alpha1\nkind: %s\nmetadata: {name: %s, namespace: %s}\nspec:\n%s\n",
		kind, name, ns, indent(spec))
}

func indent(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = "  " + l
	}
	return strings.Join(lines, "\n")
}
