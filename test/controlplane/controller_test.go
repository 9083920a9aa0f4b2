package controlplane_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/escrowproxy/escrow/controlplane/bundle"
	"github.com/escrowproxy/escrow/controlplane/controller"
	"github.com/escrowproxy/escrow/controlplane/controller/controllertest"
)

const (
	escrowNS     = "escrow-system"
	td           = "example.org"
	controllerSA = "escrow-controller"
)

// rbac is what the controller's ServiceAccount needs (the chart's ClusterRole must grant the
// same): the controller below runs as that ServiceAccount, by impersonation.
const rbac = `apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: escrow-controller}
rules:
- apiGroups: [escrow.dev]
  resources: [policies, upstreams, credentials, revocations]
  verbs: [get, list, watch]
- apiGroups: [escrow.dev]
  resources: [policies/status, upstreams/status, credentials/status, revocations/status]
  verbs: [update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: escrow-controller}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: escrow-controller}
subjects:
- {kind: ServiceAccount, name: escrow-controller, namespace: escrow-system}
`

// plane is one controller (informers + ADS server) shared by the tests of this binary, as
// `escrow controller` wires them, talking to the real API server as its ServiceAccount.
type plane struct {
	addr    string
	ca      *controllertest.CA
	metrics *controller.Metrics
	ctrl    *controller.Controller
}

var (
	planeOnce sync.Once
	shared    *plane
	planeErr  error
)

func controlPlane(t *testing.T) *plane {
	t.Helper()
	k := kube(t)
	planeOnce.Do(func() { shared, planeErr = startPlane(k.RESTConfig) })
	if planeErr != nil {
		t.Fatal(planeErr)
	}
	return shared
}

func startPlane(restConfig func() (*rest.Config, error)) (*plane, error) {
	ctx := context.Background()
	if _, err := cluster.Kubectl(ctx, nil, "create", "namespace", escrowNS); err != nil {
		return nil, err
	}
	if _, err := cluster.Kubectl(ctx, []byte(rbac), "apply", "-f", "-"); err != nil {
		return nil, err
	}
	rc, err := restConfig()
	if err != nil {
		return nil, err
	}
	rc.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + escrowNS + ":" + controllerSA}
	client, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	ca, err := controllertest.NewCA(td)
	if err != nil {
		return nil, err
	}
	own, err := ca.SVID(fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, escrowNS, controllerSA))
	if err != nil {
		return nil, err
	}
	m := controller.NewMetrics(prometheus.NewRegistry())
	srv, err := controller.NewServer(controller.ServerOptions{SVIDs: own, Bundles: ca.Bundle(), Metrics: m})
	if err != nil {
		return nil, err
	}
	ctrl, err := controller.New(controller.Options{Client: client, Namespace: escrowNS, Publisher: srv, Metrics: m,
		Coalesce: 50 * time.Millisecond})
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	// Both run until the test binary exits.
	go func() { _ = srv.Serve(context.Background(), l) }()
	go func() { _ = ctrl.Run(context.Background()) }()
	deadline := time.Now().Add(30 * time.Second)
	for !ctrl.Ready() {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("controller not ready within 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return &plane{addr: l.Addr().String(), ca: ca, metrics: m, ctrl: ctrl}, nil
}

// sidecar dials the controller as the workload id, claiming node id nodeID.
func (p *plane) sidecar(t *testing.T, id, nodeID string) *controllertest.Client {
	t.Helper()
	svid, err := p.ca.SVID(id)
	if err != nil {
		t.Fatal(err)
	}
	c, err := controllertest.Dial(context.Background(), p.addr, controllertest.ClientTLS(svid, p.ca.Bundle()), nodeID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

type received struct {
	resp *discovery.DiscoveryResponse
	b    bundle.Bundle
	err  error
}

// stream reads a sidecar's responses in the background, ACKing each as a sidecar does.
type stream struct {
	c    *controllertest.Client
	ch   chan received
	last received
}

func follow(c *controllertest.Client) *stream {
	s := &stream{c: c, ch: make(chan received, 64)}
	go func() {
		for {
			r, b, err := c.Recv()
			if err == nil {
				err = c.ACK(r)
			}
			s.ch <- received{r, b, err}
			if err != nil {
				return
			}
		}
	}()
	return s
}

// await waits until a bundle satisfies cond and returns it, failing after within.
func (s *stream) await(t *testing.T, within time.Duration, what string, cond func(bundle.Bundle) bool) bundle.Bundle {
	t.Helper()
	if s.last.resp != nil && cond(s.last.b) {
		return s.last.b
	}
	timeout := time.After(within)
	for {
		select {
		case r := <-s.ch:
			if r.err != nil {
				t.Fatalf("%s: %v", what, r.err)
			}
			s.last = r
			if cond(r.b) {
				return r.b
			}
		case <-timeout:
			t.Fatalf("%s: not within %s; last bundle %+v", what, within, s.last.b)
		}
	}
}

func workload(ns, sa string) string { return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, ns, sa) }

func hasHost(b bundle.Bundle, host string, port int) bool {
	for _, u := range b.Upstreams {
		if u.Host == host && u.Port == port {
			return true
		}
	}
	return false
}

func hasRevocation(b bundle.Bundle, name string) bool {
	for _, r := range b.Revocations {
		if r.Name == name {
			return true
		}
	}
	return false
}

const within = 5 * time.Second

func TestController_ObjectChangesReachTheSidecarWithinSeconds(t *testing.T) {
	p := controlPlane(t)
	ns := namespace(t, "cp-live")
	s := follow(p.sidecar(t, workload(ns, "agent"), workload(ns, "agent")))
	s.await(t, within, "first bundle", func(bundle.Bundle) bool { return true })

	start := time.Now()
	kubectl(t, yamlDoc("Upstream", ns, "api", "host: api.example.com\ncredential: api-key"), "apply", "-f", "-")
	kubectl(t, yamlDoc("Credential", ns, "api-key", "static: {secret_ref: {name: api, key: token}}"), "apply", "-f", "-")
	b := s.await(t, within, "upstream and credential", func(b bundle.Bundle) bool {
		return hasHost(b, "api.example.com", 0) && b.Credentials["api-key"].Static != nil
	})
	t.Logf("create → sidecar: %v", time.Since(start))
	if f := b.Credentials["api-key"].Static.File; f != "/var/run/escrow-secrets/api/token" {
		t.Errorf("static file = %s", f)
	}

	kubectl(t, yamlDoc("Upstream", ns, "api", "host: api.example.com\nport: 8443\ncredential: api-key"), "apply", "-f", "-")
	s.await(t, within, "changed port", func(b bundle.Bundle) bool {
		return hasHost(b, "api.example.com", 8443) && !hasHost(b, "api.example.com", 0)
	})

	start = time.Now()
	kubectl(t, yamlDoc("Revocation", ns, "stop", fmt.Sprintf("spiffe_ids: [%q]\nreason: leaked", workload(ns, "agent"))), "apply", "-f", "-")
	b = s.await(t, within, "revocation", func(b bundle.Bundle) bool { return hasRevocation(b, ns+"/stop") })
	t.Logf("revocation → sidecar: %v", time.Since(start))
	if r := b.Revocations[len(b.Revocations)-1]; !r.Covers(workload(ns, "agent")) || r.Reason != "leaked" {
		t.Errorf("revocation = %+v", r)
	}
	kubectl(t, "", "delete", "revocation", "-n", ns, "stop")
	s.await(t, within, "revocation deleted", func(b bundle.Bundle) bool { return !hasRevocation(b, ns+"/stop") })

	kubectl(t, yamlDoc("Policy", ns, "allow", "cedar: |\n  @id(\"cp-live-allow\")\n  permit(principal in Namespace::\"cp-live\", action, resource == Host::\"api.example.com\");"), "apply", "-f", "-")
	s.await(t, within, "policy", func(b bundle.Bundle) bool { return strings.Contains(b.Policies[ns+"/allow.cedar"], "cp-live-allow") })
	eventually(t, within, "Accepted=True", func() error {
		out := kubectl(t, "", "get", "policy", "-n", ns, "allow", "-o", `jsonpath={.status.conditions[?(@.type=="Accepted")].status}`)
		if out != "True" {
			return fmt.Errorf("Accepted=%q", out)
		}
		return nil
	})

	// Another namespace's sidecar sees none of it; escrow's namespace reaches both.
	o := follow(p.sidecar(t, workload("cp-elsewhere", "agent"), workload("cp-elsewhere", "agent")))
	first := o.await(t, within, "other namespace", func(bundle.Bundle) bool { return true })
	if hasHost(first, "api.example.com", 8443) || first.Policies[ns+"/allow.cedar"] != "" {
		t.Errorf("another namespace got cp-live's objects: %+v", first)
	}
	kubectl(t, yamlDoc("Upstream", escrowNS, "cp-live-shared", "host: shared.example.com\ntunnel: true"), "apply", "-f", "-")
	t.Cleanup(func() { _ = kubectlErr(t, "", "delete", "upstream", "-n", escrowNS, "cp-live-shared") })
	s.await(t, within, "cluster-wide upstream (cp-live)", func(b bundle.Bundle) bool { return hasHost(b, "shared.example.com", 0) })
	o.await(t, within, "cluster-wide upstream (elsewhere)", func(b bundle.Bundle) bool { return hasHost(b, "shared.example.com", 0) })
}

func TestController_InvalidPolicyIsRefusedWithStatusAndNeverServed(t *testing.T) {
	p := controlPlane(t)
	ns := namespace(t, "cp-invalid")
	s := follow(p.sidecar(t, workload(ns, "agent"), workload(ns, "agent")))
	s.await(t, within, "first bundle", func(bundle.Bundle) bool { return true })

	bad := "cedar: |\n  @id(\"typo\")\n  permit(principal, action, resource)\n  when { context.methd == \"GET\" };"
	kubectl(t, yamlDoc("Policy", ns, "typo", bad), "apply", "-f", "-")
	var msg string
	eventually(t, within, "Accepted=False", func() error {
		out := kubectl(t, "", "get", "policy", "-n", ns, "typo", "-o",
			`jsonpath={.status.conditions[?(@.type=="Accepted")].status}|{.status.conditions[?(@.type=="Accepted")].reason}|{.status.conditions[?(@.type=="Accepted")].message}`)
		parts := strings.SplitN(out, "|", 3)
		if len(parts) != 3 || parts[0] != "False" {
			return fmt.Errorf("status %q", out)
		}
		if parts[1] != "Invalid" {
			return fmt.Errorf("reason %q", parts[1])
		}
		msg = parts[2]
		return nil
	})
	if !strings.HasPrefix(msg, ns+"/typo.cedar:3:") || !strings.Contains(msg, "methd") {
		t.Errorf("message %q, want %s/typo.cedar:3:<col> naming methd", msg, ns)
	}
	if out := kubectl(t, "", "get", "policies", "-n", ns); !strings.Contains(out, "False") || !strings.Contains(out, "Invalid") {
		t.Errorf("kubectl get policies:\n%s", out)
	}
	// A later valid change in the namespace is pushed; the invalid policy never is.
	kubectl(t, yamlDoc("Upstream", ns, "marker", "host: marker.example.com"), "apply", "-f", "-")
	b := s.await(t, within, "marker", func(b bundle.Bundle) bool { return hasHost(b, "marker.example.com", 0) })
	if _, ok := b.Policies[ns+"/typo.cedar"]; ok {
		t.Fatal("the invalid policy reached the sidecar")
	}

	// Fixed: accepted and served.
	good := "cedar: |\n  @id(\"typo\")\n  permit(principal, action, resource)\n  when { context.method == \"GET\" };"
	kubectl(t, yamlDoc("Policy", ns, "typo", good), "apply", "-f", "-")
	s.await(t, within, "fixed policy", func(b bundle.Bundle) bool { return b.Policies[ns+"/typo.cedar"] != "" })
	eventually(t, within, "Accepted=True", func() error {
		out := kubectl(t, "", "get", "policy", "-n", ns, "typo", "-o", `jsonpath={.status.conditions[?(@.type=="Accepted")].status}/{.status.observedGeneration}`)
		if out != "True/2" {
			return fmt.Errorf("status/observedGeneration %q", out)
		}
		return nil
	})
}

// row is the line of `kubectl get <kind> <name>` as a map from column header to cell. Cells
// are cut at the headers' positions (an empty cell is blank).
func row(t *testing.T, ns, kind, name string) map[string]string {
	t.Helper()
	out := kubectl(t, "", "get", kind, name, "-n", ns)
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("kubectl get %s %s:\n%s", kind, name, out)
	}
	head, line := lines[0], lines[1]
	var starts []int
	for i := range head {
		if head[i] != ' ' && (i == 0 || head[i-1] == ' ') {
			starts = append(starts, i)
		}
	}
	r := map[string]string{}
	for j, start := range starts {
		end := len(head)
		if j+1 < len(starts) {
			end = starts[j+1]
		}
		cell := ""
		if start < len(line) {
			cell = line[start:min(end, len(line))]
		}
		if j+1 == len(starts) && start < len(line) {
			cell = line[start:]
		}
		r[strings.TrimSpace(head[start:end])] = strings.TrimSpace(cell)
	}
	return r
}

func TestController_UpstreamNamingAMissingCredentialIsNotAcceptedUntilTheCredentialExists(t *testing.T) {
	p := controlPlane(t)
	ns := namespace(t, "cp-status")
	s := follow(p.sidecar(t, workload(ns, "agent"), workload(ns, "agent")))
	kubectl(t, yamlDoc("Upstream", ns, "api", "host: api.example.com\ncredential: api-key"), "apply", "-f", "-")
	kubectl(t, yamlDoc("Revocation", ns, "stop", fmt.Sprintf("spiffe_ids: [%q]\nreason: leaked", workload(ns, "gone"))), "apply", "-f", "-")

	eventually(t, within, "api: Accepted=False MissingCredential", func() error {
		if r := row(t, ns, "upstream", "api"); r["ACCEPTED"] != "False" || r["REASON"] != "MissingCredential" {
			return fmt.Errorf("kubectl get upstream api: %v", r)
		}
		return nil
	})
	msg := kubectl(t, "", "get", "upstream", "api", "-n", ns, "-o", `jsonpath={.status.conditions[?(@.type=="Accepted")].message}`)
	if want := `spec.credential: no Credential "api-key" is served with it (none accepted in cp-status or escrow-system)`; msg != want {
		t.Errorf("message %q, want %q", msg, want)
	}
	if b := s.await(t, within, "revocation", func(b bundle.Bundle) bool { return hasRevocation(b, ns+"/stop") }); hasHost(b, "api.example.com", 0) {
		t.Error("the upstream without its credential was served")
	}
	eventually(t, within, "stop: Accepted=True", func() error {
		if r := row(t, ns, "revocation", "stop"); r["ACCEPTED"] != "True" || r["ACCEPTED-REASON"] != "Valid" || r["REASON"] != "leaked" {
			return fmt.Errorf("kubectl get revocation stop: %v", r)
		}
		return nil
	})

	// The Credential appears: the Upstream is served, and both say Accepted=True.
	kubectl(t, yamlDoc("Credential", ns, "api-key", "static: {secret_ref: {name: api, key: token}}"), "apply", "-f", "-")
	s.await(t, within, "upstream with its credential", func(b bundle.Bundle) bool { return hasHost(b, "api.example.com", 0) })
	eventually(t, within, "api and api-key: Accepted=True Valid", func() error {
		if r := row(t, ns, "upstream", "api"); r["ACCEPTED"] != "True" || r["REASON"] != "Valid" {
			return fmt.Errorf("kubectl get upstream api: %v", r)
		}
		if r := row(t, ns, "credential", "api-key"); r["ACCEPTED"] != "True" || r["REASON"] != "Valid" || r["SECRET"] != "api" {
			return fmt.Errorf("kubectl get credential api-key: %v", r)
		}
		return nil
	})
	if og := kubectl(t, "", "get", "upstream", "api", "-n", ns, "-o", `jsonpath={.status.observedGeneration}`); og != "1" {
		t.Errorf("observedGeneration = %q", og)
	}

	// A bad Secret reference (the schema cannot see it) is refused with the key path.
	kubectl(t, yamlDoc("Credential", ns, "dotdot", "static: {secret_ref: {name: api, key: ..}}"), "apply", "-f", "-")
	eventually(t, within, "dotdot: Accepted=False BadSecretRef", func() error {
		if r := row(t, ns, "credential", "dotdot"); r["ACCEPTED"] != "False" || r["REASON"] != "BadSecretRef" {
			return fmt.Errorf("kubectl get credential dotdot: %v", r)
		}
		return nil
	})
}

func TestController_RefusesASidecarClaimingAnotherNodeID(t *testing.T) {
	p := controlPlane(t)
	ns := namespace(t, "cp-claim")
	namespace(t, "cp-victim")
	kubectl(t, yamlDoc("Upstream", "cp-victim", "secret", "host: victim.internal"), "apply", "-f", "-")
	c := p.sidecar(t, workload(ns, "agent"), workload("cp-victim", "agent"))
	_, _, err := c.Recv()
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("err = %v, want PermissionDenied", err)
	}
	if testutil.ToFloat64(p.metrics.Refused.WithLabelValues("node_id_mismatch")) < 1 {
		t.Error("refusal not counted")
	}
}

func TestController_CountsANACK(t *testing.T) {
	p := controlPlane(t)
	ns := namespace(t, "cp-nack")
	c := p.sidecar(t, workload(ns, "agent"), workload(ns, "agent"))
	r, _, err := c.Recv()
	if err != nil {
		t.Fatal(err)
	}
	before := testutil.ToFloat64(p.metrics.NACKs.WithLabelValues(controller.NACKConfig))
	if err := c.NACK(r, "", "controlplane: config: 1 error(s):\n  upstreams[0].credential: no credential named \"x\" in credentials"); err != nil {
		t.Fatal(err)
	}
	eventually(t, within, "NACK counted", func() error {
		if got := testutil.ToFloat64(p.metrics.NACKs.WithLabelValues(controller.NACKConfig)); got != before+1 {
			return fmt.Errorf("nacks{config} = %v", got)
		}
		return nil
	})
}

func controllertestDial(addr string, svid *x509svid.SVID, p *plane) (*controllertest.Client, error) {
	return controllertest.Dial(context.Background(), addr, controllertest.ClientTLS(svid, p.ca.Bundle()), svid.ID.String())
}
