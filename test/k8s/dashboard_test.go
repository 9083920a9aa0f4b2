package k8s_test

import (
	"bufio"
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
	return exp
}

// dashboardPanel is a Grafana panel (rows nest panels).
type dashboardPanel struct {
	Title   string           `json:"title"`
	Type    string           `json:"type"`
	Panels  []dashboardPanel `json:"panels"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

var (
	metricRef = regexp.MustCompile(`\b(escrow_[a-zA-Z0-9_:]+)(\{([^}]*)\})?`)
	matcher   = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)`)
	// Labels Prometheus adds at scrape time (target labels), not in escrow's exposition.
	targetLabels = map[string]bool{"namespace": true, "pod": true, "container": true, "job": true, "instance": true, "endpoint": true, "service": true}
)

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
				if !targetLabels[m[1]] && !labels[m[1]] {
					t.Errorf("%s: matches label %q on %s, which has no such label", where, m[1], name)
				}
			}
		}
	}
	var walk func([]dashboardPanel)
	panels := 0
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			walk(p.Panels)
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
	// fetches, SVID expiry, tunnels, injector activity.
	for _, m := range []string{
		"escrow_requests_total", "escrow_request_duration_seconds_bucket", "escrow_policy_reloads_total",
		"escrow_credential_fetches_total", "escrow_svid_expiry_timestamp_seconds", "escrow_tunnels_active",
		"escrow_injector_requests_total", "escrow_injector_request_duration_seconds_bucket",
	} {
		if !queried[m] {
			t.Errorf("no panel queries %s", m)
		}
	}
	t.Logf("%d panels checked against %d escrow metric families", panels, len(names))
}
