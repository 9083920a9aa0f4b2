package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// peersTestBinDir is where setup.sh builds the Go peers: $ESCROW_BENCH_BIN, else <repo>/.cache/bin.
func peersTestBinDir(t *testing.T) string {
	if d := os.Getenv("ESCROW_BENCH_BIN"); d != "" {
		return d
	}
	d, err := filepath.Abs(filepath.Join("..", ".cache", "bin"))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func peersTestFreePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// peersTestAssertGone checks that Stop reaped the process and released its port.
func peersTestAssertGone(t *testing.T, p *proc) {
	t.Helper()
	if err := syscall.Kill(p.PID(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("%s pid %d still exists after Stop (kill 0: %v)", p.Name, p.PID(), err)
	}
	if c, err := net.DialTimeout("tcp", p.Addr, time.Second); err == nil {
		c.Close()
		t.Errorf("%s: %s still accepts connections after Stop", p.Name, p.Addr)
	}
}

func TestPeers_InjectHeaderAndTunnel(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]string{} // request path -> X-Injected value the upstream saw
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.URL.Path] = r.Header.Get("X-Injected")
		mu.Unlock()
		io.WriteString(w, "plain ok")
	}))
	defer plain.Close()
	tlsUp := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "tls ok")
	}))
	defer tlsUp.Close()
	roots := x509.NewCertPool()
	roots.AddCert(tlsUp.Certificate())

	binDir := peersTestBinDir(t)
	require := os.Getenv("ESCROW_BENCH_REQUIRE_PEERS") == "1"
	for _, pe := range benchPeers() {
		t.Run(pe.Name, func(t *testing.T) {
			if ok, why := pe.Available(binDir); !ok {
				if require {
					t.Fatalf("%s unavailable (ESCROW_BENCH_REQUIRE_PEERS=1): %s", pe.Name, why)
				}
				t.Skipf("%s unavailable: %s", pe.Name, why)
			}
			t.Logf("version: %s", pe.Version(binDir))
			value := "bench-" + pe.Name
			a := startArgs{Dir: t.TempDir(), BinDir: binDir, Port: peersTestFreePort(t), Header: "X-Injected", Value: value}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			t0 := time.Now()
			p, err := pe.Start(ctx, a)
			if err != nil {
				t.Fatalf("start: %v", err)
			}
			t.Logf("%s pid %d ready on %s in %v", pe.Name, p.PID(), p.Addr, time.Since(t0).Round(time.Millisecond))
			stopped := false
			defer func() {
				if !stopped {
					p.Stop()
				}
			}()

			tr := &http.Transport{
				Proxy:           http.ProxyURL(&url.URL{Scheme: "http", Host: p.Addr}),
				TLSClientConfig: tlsUp.Client().Transport.(*http.Transport).TLSClientConfig.Clone(),
			}
			tr.TLSClientConfig.RootCAs = roots
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			get := func(u string) (int, string) {
				t.Helper()
				resp, err := client.Get(u)
				if err != nil {
					t.Fatalf("GET %s via %s: %v\nlog tail:\n%s", u, pe.Name, err, p.LogTail(20))
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, string(b)
			}

			// Plain HTTP, twice (the second may reuse the client connection where supported).
			path := "/plain-" + pe.Name
			for i := 0; i < 2; i++ {
				if code, body := get(plain.URL + path); code != 200 || body != "plain ok" {
					t.Fatalf("plain GET: %d %q", code, body)
				}
			}
			mu.Lock()
			got := seen[path]
			mu.Unlock()
			if pe.Injects && got != value {
				t.Errorf("upstream saw X-Injected %q, want %q", got, value)
			}
			if !pe.Injects && got != "" {
				t.Errorf("peer declared Injects=false but upstream saw X-Injected %q", got)
			}

			// HTTPS through CONNECT to an arbitrary high port.
			if code, body := get(tlsUp.URL + "/tls"); code != 200 || body != "tls ok" {
				t.Fatalf("CONNECT GET: %d %q", code, body)
			}

			tr.CloseIdleConnections()
			t0 = time.Now()
			if err := p.Stop(); err != nil {
				t.Errorf("Stop: %v\nlog tail:\n%s", err, p.LogTail(20))
			}
			stopped = true
			t.Logf("stopped in %v", time.Since(t0).Round(time.Millisecond))
			peersTestAssertGone(t, p)
			if err := p.Stop(); err != nil { // idempotent
				t.Errorf("second Stop: %v", err)
			}
		})
	}
}

func TestPeers_StartProcFailsFast(t *testing.T) {
	a := startArgs{Dir: t.TempDir(), Port: peersTestFreePort(t)}
	addr := fmt.Sprintf("127.0.0.1:%d", a.Port)
	t0 := time.Now()
	p, err := startProc(context.Background(), "dies", addr, a, nil, "sh", "-c", "echo marker-about-to-fail >&2; exit 3")
	if err == nil {
		p.Stop()
		t.Fatal("startProc succeeded for a command that exits")
	}
	if d := time.Since(t0); d > 3*time.Second {
		t.Errorf("failure took %v", d)
	}
	if !strings.Contains(err.Error(), "marker-about-to-fail") || !strings.Contains(err.Error(), "exit status 3") {
		t.Errorf("error lacks log tail or status: %v", err)
	}

	// `false` writes nothing: still a prompt error.
	if _, err := startProc(context.Background(), "false", addr, a, nil, "false"); err == nil ||
		!strings.Contains(err.Error(), "exited before listening") {
		t.Errorf("false: %v", err)
	}

	// Something already listening on addr is refused (it would be measured instead).
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := startProc(context.Background(), "dup", addr, a, nil, "sleep", "5"); err == nil ||
		!strings.Contains(err.Error(), "already accepting") {
		t.Errorf("busy addr: %v", err)
	}
}

// TestPeersHelperProcess is not a real test: startProc runs the test binary in this mode as a
// stand-in proxy that listens on $PEERS_HELPER_ADDR.
func TestPeersHelperProcess(t *testing.T) {
	addr := os.Getenv("PEERS_HELPER_ADDR")
	if addr == "" {
		t.Skip("helper process only")
	}
	if os.Getenv("PEERS_HELPER_IGNORE_TERM") == "1" {
		signal.Ignore(syscall.SIGTERM)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Fprintln(os.Stderr, "helper listening on", addr)
	for {
		c, err := l.Accept()
		if err != nil {
			os.Exit(0)
		}
		c.Close()
	}
}

func peersTestHelper(t *testing.T, cpu string, ignoreTerm bool) *proc {
	t.Helper()
	a := startArgs{Dir: t.TempDir(), CPU: cpu, Port: peersTestFreePort(t)}
	addr := fmt.Sprintf("127.0.0.1:%d", a.Port)
	env := append(procCleanEnv(os.Environ()), "PEERS_HELPER_ADDR="+addr)
	if ignoreTerm {
		env = append(env, "PEERS_HELPER_IGNORE_TERM=1")
	}
	p, err := startProc(context.Background(), "helper", addr, a, env, os.Args[0], "-test.run=^TestPeersHelperProcess$")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPeers_StartProcPinnedPIDAndStop(t *testing.T) {
	if _, err := exec.LookPath("taskset"); err != nil {
		t.Skip("taskset not installed")
	}
	p := peersTestHelper(t, "0", false)
	defer p.Stop()
	// taskset execs the command: the PID must be the helper's own, pinned to CPU 0.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID()))
	if err != nil {
		t.Fatal(err)
	}
	var name, cpus string
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "Name:"); ok {
			name = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(l, "Cpus_allowed_list:"); ok {
			cpus = strings.TrimSpace(v)
		}
	}
	if name == "taskset" || cpus != "0" {
		t.Errorf("pid %d: Name %q Cpus_allowed_list %q; want the helper itself on CPU 0", p.PID(), name, cpus)
	}
	if !strings.Contains(p.LogTail(5), "helper listening") {
		t.Errorf("log tail: %q", p.LogTail(5))
	}
	if err := p.Stop(); err != nil {
		t.Errorf("Stop: %v", err)
	}
	peersTestAssertGone(t, p)
}

func TestPeers_StopKillsAfterGrace(t *testing.T) {
	if testing.Short() {
		t.Skip("waits the 5s SIGTERM grace")
	}
	p := peersTestHelper(t, "", true)
	t0 := time.Now()
	err := p.Stop()
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Stop of a SIGTERM-ignoring process: %v", err)
	}
	if d := time.Since(t0); d < procStopGrace || d > procStopGrace+3*time.Second {
		t.Errorf("Stop took %v", d)
	}
	peersTestAssertGone(t, p)
	if err2 := p.Stop(); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("second Stop: %v, want %v", err2, err)
	}
}
