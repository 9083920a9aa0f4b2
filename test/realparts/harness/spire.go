package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// SPIREOptions configure StartSPIRE.
type SPIREOptions struct {
	// TrustDomain defaults to example.org.
	TrustDomain string
	// OIDCDiscovery also starts SPIRE's oidc-discovery-provider (HTTP on loopback), and sets the
	// server's jwt_issuer to its URL so JWT-SVIDs carry an "iss" that dex and MinIO can discover.
	OIDCDiscovery bool
	// LogLevel of server and agent; default INFO.
	LogLevel string
	// AgentID is the node alias the agent's join token maps to, the default parent of entries;
	// default spiffe://<TrustDomain>/agent. Set it to the ID a document's entries name as their
	// parent (e.g. spiffe://example.org/ns/spire/sa/spire-agent, SPIRE's Kubernetes quickstart).
	AgentID string
}

// SPIRE is a running SPIRE server and agent (join_token node attestation, unix workload
// attestor with path discovery), and optionally the OIDC discovery provider.
type SPIRE struct {
	TrustDomain string
	// AgentID is the node alias the agent's join token maps to: the default parent of entries.
	AgentID string
	// ServerSocket is the server API's Unix socket (for spire-server CLI commands).
	ServerSocket string
	// AgentSocket is the Workload API's Unix socket path; WorkloadAPI is its address
	// (unix:///path), as escrow's identity.spiffe.socket and go-spiffe take it.
	AgentSocket string
	WorkloadAPI string
	// BundleFile is the trust domain's bundle (PEM), as the server showed it at start.
	BundleFile string
	// IssuerURL is the OIDC discovery provider's base URL (http://127.0.0.1:P), which is also the
	// "iss" of JWT-SVIDs; DiscoveryURL and JWKSURL are below it. Empty without OIDCDiscovery.
	IssuerURL    string
	DiscoveryURL string
	JWKSURL      string

	dir                     string
	serverBin, agentBin     string
	serverPort              int
	logLevel                string
	server, agent, odp      *Process
	agentConf, agentDataDir string
	agentStarts             int
}

// StartSPIRE starts a SPIRE server and agent on loopback and waits until the agent's Workload
// API answers. No workload entries exist yet: register them with CreateEntry.
func StartSPIRE(t testing.TB, o SPIREOptions) *SPIRE {
	t.Helper()
	s := &SPIRE{
		TrustDomain: o.TrustDomain,
		serverBin:   Bin(t, "spire-server"),
		agentBin:    Bin(t, "spire-agent"),
		dir:         ShortTempDir(t),
		serverPort:  FreePort(t),
		logLevel:    o.LogLevel,
	}
	if s.TrustDomain == "" {
		s.TrustDomain = "example.org"
	}
	if s.logLevel == "" {
		s.logLevel = "INFO"
	}
	s.AgentID = o.AgentID
	if s.AgentID == "" {
		s.AgentID = "spiffe://" + s.TrustDomain + "/agent"
	}
	s.ServerSocket = filepath.Join(s.dir, "server.sock")
	s.AgentSocket = filepath.Join(s.dir, "agent.sock")
	s.WorkloadAPI = "unix://" + s.AgentSocket
	s.BundleFile = filepath.Join(s.dir, "bundle.pem")
	s.agentDataDir = filepath.Join(s.dir, "agent-data")

	var odpBin string
	var odpPort int
	jwtIssuer := ""
	if o.OIDCDiscovery {
		odpBin = Bin(t, "oidc-discovery-provider")
		odpPort = FreePort(t)
		s.IssuerURL = fmt.Sprintf("http://127.0.0.1:%d", odpPort)
		s.DiscoveryURL = s.IssuerURL + "/.well-known/openid-configuration"
		s.JWKSURL = s.IssuerURL + "/keys"
		jwtIssuer = fmt.Sprintf("jwt_issuer = %q", s.IssuerURL)
	}

	serverConf := filepath.Join(s.dir, "server.conf")
	writeFile(t, serverConf, fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port    = "%d"
  socket_path  = %q
  trust_domain = %q
  data_dir     = %q
  log_level    = %q
  %s
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type     = "sqlite3"
      connection_string = %q
    }
  }
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
}
`, s.serverPort, s.ServerSocket, s.TrustDomain, filepath.Join(s.dir, "server-data"), s.logLevel, jwtIssuer,
		filepath.Join(s.dir, "server-data", "datastore.sqlite3")))
	s.server = StartProcess(t, ProcessOptions{Name: "spire-server", Path: s.serverBin, Args: []string{"run", "-config", serverConf}})
	Eventually(t, 60*time.Second, "spire-server healthcheck", func() error {
		if s.server.Exited() {
			t.Fatalf("harness: spire-server exited (%v):\n%s", s.server.Err(), tailBytes(s.server.Output(), 8<<10))
		}
		_, err := s.serverCLI("healthcheck")
		return err
	})
	bundle := s.ServerCLI(t, "bundle", "show")
	writeFile(t, s.BundleFile, bundle)

	if o.OIDCDiscovery {
		odpConf := filepath.Join(s.dir, "odp.conf")
		writeFile(t, odpConf, fmt.Sprintf(`log_level = %q
domains = ["127.0.0.1"]
allow_insecure_scheme = true
insecure_addr = "127.0.0.1:%d"
server_api { address = %q }
`, s.logLevel, odpPort, "unix://"+s.ServerSocket))
		s.odp = StartProcess(t, ProcessOptions{Name: "oidc-discovery-provider", Path: odpBin, Args: []string{"-config", odpConf}})
		Eventually(t, 60*time.Second, "oidc-discovery-provider serves keys", func() error {
			if s.odp.Exited() {
				t.Fatalf("harness: oidc-discovery-provider exited (%v):\n%s", s.odp.Err(), s.odp.Output())
			}
			return jwksHasKeys(s.JWKSURL)
		})
	}

	s.agentConf = filepath.Join(s.dir, "agent.conf")
	writeFile(t, s.agentConf, fmt.Sprintf(`agent {
  data_dir          = %q
  log_level         = %q
  server_address    = "127.0.0.1"
  server_port       = "%d"
  socket_path       = %q
  trust_domain      = %q
  trust_bundle_path = %q
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  # On disk, so a restarted agent reuses its own SVID instead of attesting again (a join token
  # is single-use).
  KeyManager "disk" { plugin_data { directory = %q } }
  # discover_workload_path: unix:path and unix:sha256 selectors, for process-level entries.
  WorkloadAttestor "unix" { plugin_data { discover_workload_path = true } }
}
`, s.agentDataDir, s.logLevel, s.serverPort, s.AgentSocket, s.TrustDomain, s.BundleFile, filepath.Join(s.dir, "agent-keys")))
	if err := os.MkdirAll(filepath.Join(s.dir, "agent-keys"), 0o700); err != nil {
		t.Fatalf("harness: %v", err)
	}
	out := s.ServerCLI(t, "token", "generate", "-spiffeID", s.AgentID, "-ttl", "600")
	token := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out), "Token:"))
	if token == "" || strings.ContainsAny(token, " \n") {
		t.Fatalf("harness: unexpected output of spire-server token generate: %q", out)
	}
	s.startAgent(t, "-joinToken", token)
	return s
}

// Server, Agent and Discovery are the running processes (Discovery is nil without
// OIDCDiscovery; Agent changes across StopAgent/StartAgent).
func (s *SPIRE) Server() *Process    { return s.server }
func (s *SPIRE) Agent() *Process     { return s.agent }
func (s *SPIRE) Discovery() *Process { return s.odp }

func (s *SPIRE) startAgent(t testing.TB, extra ...string) {
	t.Helper()
	s.agentStarts++
	s.agent = StartProcess(t, ProcessOptions{
		Name: fmt.Sprintf("spire-agent#%d", s.agentStarts), Path: s.agentBin,
		Args: append([]string{"run", "-config", s.agentConf}, extra...),
	})
	Eventually(t, 60*time.Second, "spire-agent healthcheck", func() error {
		if s.agent.Exited() {
			t.Fatalf("harness: spire-agent exited (%v):\n%s", s.agent.Err(), tailBytes(s.agent.Output(), 8<<10))
		}
		out, err := exec.Command(s.agentBin, "healthcheck", "-socketPath", s.AgentSocket).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
}

// StopAgent stops the agent (SIGTERM): its Workload API socket goes away. Workloads keep the
// SVIDs they hold.
func (s *SPIRE) StopAgent(t testing.TB) {
	t.Helper()
	s.agent.Stop()
}

// StartAgent starts the agent again after StopAgent, with the same data and key directories: it
// reuses its own SVID (no new node attestation) and serves the same entries.
func (s *SPIRE) StartAgent(t testing.TB) {
	t.Helper()
	if !s.agent.Exited() {
		t.Fatal("harness: StartAgent while the agent runs")
	}
	s.startAgent(t)
}

// ServerCLI runs `spire-server ARGS -socketPath S` and returns its stdout; a failure fails the
// test.
func (s *SPIRE) ServerCLI(t testing.TB, args ...string) string {
	t.Helper()
	out, err := s.serverCLI(args...)
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	return out
}

func (s *SPIRE) serverCLI(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// -socketPath goes after the subcommand (and the sub-subcommand of "entry create", ...).
	n := 1
	if len(args) > 1 && !strings.HasPrefix(args[1], "-") {
		n = 2
	}
	full := append(append(append([]string{}, args[:n]...), "-socketPath", s.ServerSocket), args[n:]...)
	cmd := exec.CommandContext(ctx, s.serverBin, full...)
	cmd.Env = CleanEnv()
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("spire-server %s: %v\n%s%s", strings.Join(full, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// Entry is a workload registration entry.
type Entry struct {
	SPIFFEID string
	// Selectors such as UIDSelector(os.Getuid()), PathSelector(exe), SHA256Selector(t, exe).
	Selectors []string
	// ParentID defaults to the agent (AgentID).
	ParentID string
	// X509SVIDTTL and JWTSVIDTTL default to the server's (1h and 5m); whole seconds.
	X509SVIDTTL time.Duration
	JWTSVIDTTL  time.Duration
	// ID is set by CreateEntry.
	ID string
}

// CreateEntry registers e and returns it with its ID. The agent learns of it at its next sync
// (up to 5 seconds); WaitX509SVID waits for the SVID.
func (s *SPIRE) CreateEntry(t testing.TB, e Entry) Entry {
	t.Helper()
	if e.ParentID == "" {
		e.ParentID = s.AgentID
	}
	args := []string{"entry", "create", "-output", "json", "-parentID", e.ParentID, "-spiffeID", e.SPIFFEID}
	for _, sel := range e.Selectors {
		args = append(args, "-selector", sel)
	}
	if e.X509SVIDTTL > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(e.X509SVIDTTL/time.Second)))
	}
	if e.JWTSVIDTTL > 0 {
		args = append(args, "-jwtSVIDTTL", strconv.Itoa(int(e.JWTSVIDTTL/time.Second)))
	}
	out := s.ServerCLI(t, args...)
	var res struct {
		Results []struct {
			Status struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"status"`
			Entry struct {
				ID string `json:"id"`
			} `json:"entry"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Results) != 1 {
		t.Fatalf("harness: entry create: unexpected output (%v): %s", err, out)
	}
	r := res.Results[0]
	if r.Status.Code != 0 || r.Entry.ID == "" {
		t.Fatalf("harness: entry create %s: status %d %s", e.SPIFFEID, r.Status.Code, r.Status.Message)
	}
	e.ID = r.Entry.ID
	return e
}

// DeleteEntry removes the entry with this ID. The agent drops its SVIDs at its next sync.
func (s *SPIRE) DeleteEntry(t testing.TB, id string) {
	t.Helper()
	s.ServerCLI(t, "entry", "delete", "-entryID", id)
}

// UIDSelector matches processes running as uid.
func UIDSelector(uid int) string { return "unix:uid:" + strconv.Itoa(uid) }

// PathSelector matches processes whose executable is path.
func PathSelector(path string) string { return "unix:path:" + path }

// SHA256Selector matches processes whose executable has the sha256 of the file at path.
func SHA256Selector(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("harness: hash %s: %v", path, err)
	}
	return "unix:sha256:" + hex.EncodeToString(h.Sum(nil))
}

// WaitX509SVID waits until the Workload API serves this (test) process an X509-SVID with this
// SPIFFE ID, and returns it.
func (s *SPIRE) WaitX509SVID(t testing.TB, spiffeID string, timeout time.Duration) *x509svid.SVID {
	t.Helper()
	var got *x509svid.SVID
	Eventually(t, timeout, "X509-SVID "+spiffeID+" from the Workload API", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		svids, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr(s.WorkloadAPI))
		if err != nil {
			return err
		}
		var ids []string
		for _, sv := range svids {
			if sv.ID.String() == spiffeID {
				got = sv
				return nil
			}
			ids = append(ids, sv.ID.String())
		}
		return fmt.Errorf("served %v", ids)
	})
	return got
}

// FetchJWTSVID returns a JWT-SVID for audience from the Workload API, as this (test) process
// gets it. spiffeID selects one of several identities; "" takes the default.
func (s *SPIRE) FetchJWTSVID(t testing.TB, audience, spiffeID string) string {
	t.Helper()
	p := jwtsvid.Params{Audience: audience}
	if spiffeID != "" {
		id, err := spiffeid.FromString(spiffeID)
		if err != nil {
			t.Fatalf("harness: %v", err)
		}
		p.Subject = id
	}
	var token string
	Eventually(t, 30*time.Second, "JWT-SVID for "+audience, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sv, err := workloadapi.FetchJWTSVID(ctx, p, workloadapi.WithAddr(s.WorkloadAPI))
		if err != nil {
			return err
		}
		token = sv.Marshal()
		return nil
	})
	return token
}

func jwksHasKeys(url string) error {
	c := &http.Client{Timeout: 2 * time.Second}
	res, err := c.Get(url)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	var jwks struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, res.Status)
	}
	if err := json.NewDecoder(res.Body).Decode(&jwks); err != nil {
		return err
	}
	if len(jwks.Keys) == 0 {
		return fmt.Errorf("GET %s: no keys yet", url)
	}
	return nil
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatalf("harness: %v", err)
	}
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatalf("harness: %v", err)
	}
}
