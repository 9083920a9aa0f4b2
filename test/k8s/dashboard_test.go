package k8s_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/controlplane/broker"
	"github.com/escrowproxy/escrow/credential"
)

// exposition maps each sample name in a /metrics answer (e.g. escrow_requests_total,
// escrow_request_duration_seconds_bucket) to the label names its samples carry.
type exposition map[string]map[string]bool

var sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s`)
var labelName = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="`)

func parseExposition(t testing.TB, r io.Reader, into exposition) {
	t.Helper()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		m := sampleLine.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("unparseable /metrics line: %q", l)
		}
		if into[m[1]] == nil {
			into[m[1]] = map[string]bool{}
		}
		for _, lm := range labelName.FindAllStringSubmatch(m[3], -1) {
			into[m[1]][lm[1]] = true
		}
	}
}

func scrape(t testing.TB, c *http.Client, url string, into exposition) {
	t.Helper()
	res, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("GET %s: %d", url, res.StatusCode)
	}
	parseExposition(t, res.Body, into)
}

// escrowMetrics collects what escrow really exports: a demo run (allowed and denied requests
// with a credential), a proxy with a SPIFFE identity (the SVID expiry gauge exists only then),
// and the webhook after one admission request.
func escrowMetrics(t *testing.T) exposition {
	t.Helper()
	bin := escrow(t)
	exp := exposition{}
	plain := &http.Client{Timeout: 5 * time.Second}

	// 1. The demo: three calls through the proxy, then it keeps running.
	demo := start(t, bin, "demo", "--keep-running", "--dir", t.TempDir())
	metricsURL := regexp.MustCompile(`curl (http://127\.0\.0\.1:[0-9]+/metrics)`)
	var url string
	eventually(t, 60*time.Second, "escrow demo prints its metrics URL after the calls", func() error {
		if demo.exited() {
			t.Fatalf("demo exited:\n%s", demo.output())
		}
		m := metricsURL.FindStringSubmatch(demo.output())
		if m == nil {
			return fmt.Errorf("not yet")
		}
		url = m[1]
		return nil
	})
	scrape(t, plain, url, exp)
	demo.stop()

	// 2. A proxy whose identity is the SPIFFE Workload API (unreachable here: the gauge is 0).
	dir := t.TempDir()
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	if err := os.MkdirAll(filepath.Join(dir, "policies"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "policies", "p.cedar"), []byte(`@id("x") forbid (principal, action, resource);`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("listen: 127.0.0.1:%d\nadmin: %s\nidentity: {spiffe: {socket: unix://%s/agent.sock}}\nca_dir: %s/ca\npolicy: {dir: %s/policies}\n",
		freePort(t), admin, dir, dir, dir)
	if err := os.WriteFile(filepath.Join(dir, "escrow.yaml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	p := start(t, bin, "proxy", "--config", filepath.Join(dir, "escrow.yaml"))
	eventually(t, 20*time.Second, "escrow proxy admin", func() error {
		if p.exited() {
			t.Fatalf("escrow proxy exited:\n%s", p.output())
		}
		res, err := plain.Get("http://" + admin + "/healthz")
		if err != nil {
			return err
		}
		res.Body.Close()
		return nil
	})
	scrape(t, plain, "http://"+admin+"/metrics", exp)
	p.stop()

	// 3. The webhook, after one admission request.
	w := startWebhook(t, render(t))
	w.review(t, "agents", []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"agents"},"spec":{"containers":[{"name":"app","image":"busybox:1.36"}]}}`))
	scrape(t, w.client, "https://"+w.addr+"/metrics", exp)
	w.proc.stop()

	// 4. The control plane: a real `escrow controller` on a real kube-apiserver, after it
	// rejected a Policy, served a real `escrow proxy` (which ACKed its first bundle and NACKed
	// one it could not compile), refused a stream and answered a broker mint; and that
	// sidecar's xDS metrics.
	controlPlaneMetrics(t, plain, exp)
	return exp
}

// controlPlaneMetrics makes a real controller produce every labelled series the dashboard's
// control plane row uses (a counter vector has no sample before its first label values), then
// scrapes it and its sidecar into exp.
func controlPlaneMetrics(t *testing.T, plain *http.Client, exp exposition) {
	t.Helper()
	c := startCluster(t)
	c.kubectl(t, nil, "apply", "-f", filepath.Join(chartDir, "crds"))
	c.kubectl(t, nil, "wait", "--for=condition=Established", "--timeout=60s", "crd/policies.escrow.dev",
		"crd/upstreams.escrow.dev", "crd/credentials.escrow.dev", "crd/revocations.escrow.dev")
	c.kubectl(t, nil, "create", "namespace", "agents")
	ctl := startController(t, c.kubeconfig)
	applyInvalidPolicy(t, c) // rejected_objects{kind}, status_writes_total{result}
	sidecarAdmin := ctl.startSidecar(t)

	// A NACK (nacks_total{reason}, and the sidecar's updates_total{result="nack"}): a Policy
	// whose @id is also one of the sidecar's own policies (the chart's default) is valid on its
	// own, so the controller serves it, but the sidecar cannot compile the two together.
	c.kubectl(t, []byte(`apiVersion: escrow.dev/v1alpha1
kind: Policy
metadata: {name: clash, namespace: agents}
spec:
  cedar: |
    @id("never-delete")
    forbid (principal, action == Action::"DELETE", resource);
`), "apply", "-f", "-")

	// A mint of a Credential that does not exist (broker_mints_total{credential,result}), over
	// the connection of a raw ADS stream of another workload of namespace agents.
	other := "spiffe://example.org/ns/agents/sa/other"
	cl := ctl.dial(t, other, other)
	if _, _, err := cl.Recv(); err != nil {
		t.Fatal(err)
	}
	if _, err := broker.NewClient(cl.Conn).Mint(context.Background(), credential.BrokerRequest{Name: "no-such-credential"}); err == nil {
		t.Fatal("the controller minted a token for a Credential that does not exist")
	}
	// A stream whose node ID is not its SVID's (refused_streams_total{reason}).
	if _, _, err := ctl.dial(t, other, "spiffe://example.org/ns/agents/sa/someone-else").Recv(); err == nil {
		t.Fatal("the controller served a stream whose node ID is not its SVID's")
	}

	has := func(url string, want ...string) func() error {
		return func() error {
			res, err := plain.Get(url)
			if err != nil {
				return err
			}
			defer res.Body.Close()
			body, _ := io.ReadAll(res.Body)
			var lines []string
			for _, w := range want {
				m := regexp.MustCompile(`(?m)^` + w + `$`).Find(body)
				if m == nil {
					return fmt.Errorf("no line matching %s", w)
				}
				lines = append(lines, string(m))
			}
			t.Logf("%s: %s", url, strings.Join(lines, ", "))
			return nil
		}
	}
	eventually(t, 15*time.Second, "the controller's /metrics counts the streams, the ACK, the NACK, the refusal and the mint",
		has("http://"+ctl.admin+"/metrics", `escrow_controller_nacks_total\{reason="[a-z]+"\} [1-9][0-9]*`,
			`escrow_controller_refused_streams_total\{reason="node_id_mismatch"\} 1`,
			`escrow_controller_broker_mints_total\{credential="",result="not_found"\} 1`,
			`escrow_controller_connected_sidecars 2`, `escrow_controller_push_latency_seconds_count [1-9][0-9]*`))
	eventually(t, 15*time.Second, "the sidecar's /metrics counts its NACK",
		has("http://"+sidecarAdmin+"/metrics", `escrow_xds_updates_total\{result="nack"\} [1-9][0-9]*`, `escrow_xds_applied_info\{version="[0-9a-f]+"\} 1`))
	scrape(t, plain, "http://"+ctl.admin+"/metrics", exp)
	scrape(t, plain, "http://"+sidecarAdmin+"/metrics", exp)
}

// dashboardPanel is a Grafana panel (rows nest panels).
type dashboardPanel struct {
	ID      int                      `json:"id"`
	Title   string                   `json:"title"`
	Type    string                   `json:"type"`
	GridPos struct{ H, W, X, Y int } `json:"gridPos"`
	Panels  []dashboardPanel         `json:"panels"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

var (
	metricRef = regexp.MustCompile(`\b(escrow_[a-zA-Z0-9_:]+)(\{([^}]*)\})?`)
	matcher   = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)`)
	// Labels Prometheus adds at scrape time (target labels), not in escrow's exposition.
	targetLabels = map[string]bool{"namespace": true, "pod": true, "container": true, "job": true, "instance": true, "endpoint": true, "service": true}
	// Label lists of aggregations and vector matching: sum by (reason), unless on (namespace, version).
	grouping = regexp.MustCompile(`\b(by|without|on|ignoring)\s*\(([^)]*)\)`)
	// label_replace(v, "dst", "replacement", "src", "regex"): src must exist on v's metric.
	labelReplace = regexp.MustCompile(`label_replace\(\s*(escrow_[a-zA-Z0-9_:]+)[^,]*,\s*"[^"]*",\s*"[^"]*",\s*"([^"]*)"`)
)

// hasLabel reports whether a series of a metric exporting labels has label name once Prometheus
// scraped it: its own labels, the target's, "le" of a histogram's buckets, and exported_<name>
// (Prometheus's name for a label of the metric that collides with a target label, unless the
// scrape honors the metric's labels).
func hasLabel(metric string, labels map[string]bool, name string) bool {
	if own, ok := strings.CutPrefix(name, "exported_"); ok && targetLabels[own] {
		return labels[own]
	}
	return labels[name] || targetLabels[name] || (name == "le" && strings.HasSuffix(metric, "_bucket"))
}

func TestDashboardQueriesOnlyMetricsEscrowExports(t *testing.T) {
	tool(t, "helm")
	raw, err := os.ReadFile(filepath.Join(chartDir, "files", "dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title      string           `json:"title"`
		UID        string           `json:"uid"`
		Panels     []dashboardPanel `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard.json does not parse: %v", err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Errorf("dashboard needs a title and a uid")
	}

	// The chart ships exactly this file.
	for _, cm := range find(render(t), "ConfigMap") {
		if cm.Metadata.Labels["grafana_dashboard"] == "1" {
			var c struct {
				Data map[string]string `json:"data"`
			}
			cm.into(t, &c)
			if strings.TrimSpace(c.Data["escrow.json"]) != strings.TrimSpace(string(raw)) {
				t.Errorf("the dashboard ConfigMap differs from files/dashboard.json")
			}
		}
	}

	exp := escrowMetrics(t)
	var names []string
	for n := range exp {
		if strings.HasPrefix(n, "escrow_") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	t.Logf("escrow exports: %s", strings.Join(names, " "))

	queried := map[string]bool{}
	check := func(where, expr string) {
		refs := metricRef.FindAllStringSubmatch(expr, -1)
		for _, r := range refs {
			name := r[1]
			queried[name] = true
			labels, ok := exp[name]
			if !ok {
				t.Errorf("%s: queries %s, which escrow does not export", where, name)
				continue
			}
			for _, m := range matcher.FindAllStringSubmatch(r[3], -1) {
				if !hasLabel(name, labels, m[1]) {
					t.Errorf("%s: matches label %q on %s, which has no such label", where, m[1], name)
				}
			}
			// A label an aggregation or a vector match names must be on every metric of the
			// query (a typo there gives one empty series, not an error, in Prometheus).
			for _, g := range grouping.FindAllStringSubmatch(expr, -1) {
				for l := range strings.SplitSeq(g[2], ",") {
					if l = strings.TrimSpace(l); l != "" && !hasLabel(name, labels, l) {
						t.Errorf("%s: %s (%s) names label %q, which %s has not", where, g[1], g[2], l, name)
					}
				}
			}
		}
		for _, m := range labelReplace.FindAllStringSubmatch(expr, -1) {
			if labels, ok := exp[m[1]]; ok && !hasLabel(m[1], labels, m[2]) {
				t.Errorf("%s: label_replace reads label %q, which %s has not", where, m[2], m[1])
			}
		}
	}
	var walk func([]dashboardPanel)
	panels := 0
	ids := map[int]string{}
	var placed []dashboardPanel
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			walk(p.Panels)
			if other, dup := ids[p.ID]; dup || p.ID == 0 {
				t.Errorf("panel %q: id %d is missing or also %q's", p.Title, p.ID, other)
			}
			ids[p.ID] = p.Title
			g := p.GridPos
			if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
				t.Errorf("panel %q: gridPos %+v is not within the 24 columns", p.Title, g)
			}
			for _, q := range placed {
				o := q.GridPos
				if g.X < o.X+o.W && o.X < g.X+g.W && g.Y < o.Y+o.H && o.Y < g.Y+g.H {
					t.Errorf("panels %q and %q overlap: %+v, %+v", p.Title, q.Title, g, o)
				}
			}
			placed = append(placed, p)
			if p.Type == "row" {
				continue
			}
			panels++
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				if !metricRef.MatchString(tg.Expr) {
					t.Errorf("panel %q: query %q names no escrow metric", p.Title, tg.Expr)
				}
				check(fmt.Sprintf("panel %q", p.Title), tg.Expr)
			}
		}
	}
	walk(dash.Panels)
	for _, v := range dash.Templating.List {
		check("variable "+v.Name, v.Definition)
	}

	// The panels the chart promises: decisions and reasons, latency, policy reloads, credential
	// fetches, SVID expiry, tunnels, injector activity, the control plane.
	for _, m := range []string{
		"escrow_requests_total", "escrow_request_duration_seconds_bucket", "escrow_policy_reloads_total",
		"escrow_credential_fetches_total", "escrow_svid_expiry_timestamp_seconds", "escrow_tunnels_active",
		"escrow_injector_requests_total", "escrow_injector_request_duration_seconds_bucket",
		// The control plane: is every sidecar connected and on its namespace's bundle, are
		// NACKs happening, is brokering failing.
		"escrow_xds_applied_info", "escrow_xds_connected", "escrow_controller_bundle_version_info",
		"escrow_controller_connected_sidecars", "escrow_controller_pushes_total", "escrow_controller_nacks_total",
		"escrow_controller_push_latency_seconds_bucket", "escrow_controller_broker_mints_total",
		"escrow_controller_refused_streams_total", "escrow_controller_rejected_objects",
	} {
		if !queried[m] {
			t.Errorf("no panel queries %s", m)
		}
	}
	t.Logf("%d panels checked against %d escrow metric families", panels, len(names))
}
