package main

// Peer proxies of the load benchmark: real forward proxies that escrow is compared against, and
// the process handling shared by all processes under test (startProc / proc).
//
// Binaries come from bench/peers/setup.sh: squid and tinyproxy from Debian packages, smokescreen
// and goproxy-basic built from the pinned tool modules under bench/peers/ into a BinDir.
//
// Fairness: every peer is configured the way its operators would run a lean forward proxy: no
// caching, no per-request access logging where the peer allows turning it off, no Via /
// X-Forwarded-For additions, keep-alive on both sides where supported, ample connection limits.
// Escrow writes an audit record per request and cannot turn that off, so leaving the peers'
// access logs off favours the peers; the report should say so.

import (
	"context"
	"debug/buildinfo"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is one process under test (a proxy), started pinned to a CPU set.
type proc struct {
	Name string // "squid", "tinyproxy", "smokescreen", "goproxy", "escrow"
	Addr string // host:port of its proxy listener
	cmd  *exec.Cmd
	log  string // path of its combined stdout+stderr file

	done    chan struct{} // closed once cmd.Wait has returned (the process is reaped)
	waitErr error         // cmd.Wait's result; read only after done is closed

	stopOnce sync.Once
	stopErr  error
}

// PID is the proxy's own process ID (taskset execs the proxy, so it is not taskset's).
func (p *proc) PID() int {
	if p == nil || p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// procStopGrace is how long Stop waits after SIGTERM before SIGKILL.
const procStopGrace = 5 * time.Second

// Stop sends SIGTERM, waits up to 5s, then SIGKILLs; it always reaps the process. It is
// idempotent (later calls return the first call's result). The error is nil when the process
// exited after SIGTERM; it is non-nil when it had to be killed, or when it had already exited
// on its own before Stop (a crash during the run), with its exit status.
func (p *proc) Stop() error {
	if p == nil || p.done == nil {
		return nil
	}
	p.stopOnce.Do(func() {
		select {
		case <-p.done:
			p.stopErr = fmt.Errorf("%s (pid %d) had exited before Stop: %v", p.Name, p.PID(), procExitString(p.waitErr))
			return
		default:
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(procStopGrace)
		defer t.Stop()
		select {
		case <-p.done:
		case <-t.C:
			_ = p.cmd.Process.Kill()
			<-p.done
			p.stopErr = fmt.Errorf("%s (pid %d) ignored SIGTERM for %v; killed", p.Name, p.PID(), procStopGrace)
		}
	})
	return p.stopErr
}

func procExitString(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// LogTail returns the last n lines of the process's combined stdout+stderr log.
func (p *proc) LogTail(n int) string {
	if p == nil || p.log == "" || n <= 0 {
		return ""
	}
	f, err := os.Open(p.log)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", p.log, err)
	}
	defer f.Close()
	const maxTail = 64 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > maxTail {
		_, _ = f.Seek(fi.Size()-maxTail, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

type startArgs struct {
	Dir    string // a scratch directory for this process (configs, logs); exists
	BinDir string // where smokescreen / goproxy-basic were built
	CPU    string // taskset CPU list, e.g. "0"; "" = no pinning
	Port   int    // port to listen on, on 127.0.0.1
	Header string // header name to inject, e.g. "X-Injected"
	Value  string // its value
}

// procReadyTimeout bounds how long startProc waits for the listener.
const procReadyTimeout = 15 * time.Second

// startProc runs argv (pinned with `taskset -c CPU` when CPU != "" and taskset exists; taskset
// execs argv, so the PID is the proxy's own), logs its stdout+stderr to Dir/<name>.log, with env
// (nil = os.Environ() minus proxy variables), and waits until addr accepts a TCP connection
// (timeout 15s or ctx). If the process exits or the wait times out, it is killed and the error
// includes LogTail(20). It refuses to start if addr already accepts connections (a leftover
// process would otherwise be measured instead).
func startProc(ctx context.Context, name, addr string, a startArgs, env []string, argv ...string) (*proc, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("start %s: empty command", name)
	}
	if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("start %s: %s is already accepting connections (a leftover process?)", name, addr)
	}
	if a.CPU != "" {
		if ts, err := exec.LookPath("taskset"); err == nil {
			argv = append([]string{ts, "-c", a.CPU}, argv...)
		}
	}
	if env == nil {
		env = procCleanEnv(os.Environ())
	}
	logPath := filepath.Join(a.Dir, name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = a.Dir
	cmd.Env = env
	cmd.Stdout = lf
	cmd.Stderr = lf
	err = cmd.Start()
	lf.Close() // the child holds its own copy
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{Name: name, Addr: addr, cmd: cmd, log: logPath,
		done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()

	fail := func(why string) (*proc, error) {
		_ = p.Stop()
		return nil, fmt.Errorf("start %s (%s): %s; log %s tail:\n%s", name, strings.Join(argv, " "), why, logPath, p.LogTail(20))
	}
	deadline := time.NewTimer(procReadyTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := net.DialTimeout("tcp", addr, 250*time.Millisecond)
		if err == nil {
			c.Close()
			select {
			case <-p.done: // something else accepted, and ours is gone
				return fail("exited (" + procExitString(p.waitErr) + ") although " + addr + " accepts")
			default:
			}
			return p, nil
		}
		select {
		case <-p.done:
			return fail("exited before listening (" + procExitString(p.waitErr) + ")")
		case <-deadline.C:
			return fail(fmt.Sprintf("%s not accepting after %v", addr, procReadyTimeout))
		case <-ctx.Done():
			return fail("canceled: " + ctx.Err().Error())
		case <-tick.C:
		}
	}
}

// procCleanEnv drops proxy settings so no peer (or escrow) chains to an outer proxy.
func procCleanEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY":
			continue
		}
		out = append(out, kv)
	}
	return out
}

// peer is one peer proxy of the benchmark.
type peer struct {
	Name      string
	Injects   bool   // whether it adds the header on plain HTTP (smokescreen cannot: false)
	Note      string // caveats for the report (e.g. no client keep-alive)
	Available func(binDir string) (ok bool, why string)
	Start     func(ctx context.Context, a startArgs) (*proc, error)
	Version   func(binDir string) string // short version string for the report, e.g. "squid 5.7"
}

// benchPeers lists the peer proxies in a fixed order: squid, tinyproxy, smokescreen, goproxy.
func benchPeers() []peer {
	return []peer{
		{
			Name:      "squid",
			Injects:   true,
			Note:      "access_log off; request_header_add applies to plain HTTP only",
			Available: peerSystemAvailable("squid", "proxy"),
			Start:     peerStartSquid,
			Version: func(string) string {
				return peerSystemVersion("squid", "-v", func(l string) string {
					if _, v, ok := strings.Cut(l, "Version "); ok {
						return "squid " + strings.TrimSpace(v)
					}
					return l
				})
			},
		},
		{
			Name:      "tinyproxy",
			Injects:   true,
			Note:      "no client keep-alive: closes the connection after every response (without Connection: close); logging off",
			Available: peerSystemAvailable("tinyproxy", ""),
			Start:     peerStartTinyproxy,
			Version: func(string) string {
				return peerSystemVersion("tinyproxy", "-v", func(l string) string { return l })
			},
		},
		{
			Name:    "smokescreen",
			Injects: false,
			Note:    "cannot add headers; logs one JSON line per request (cannot be disabled)",
			Available: func(binDir string) (bool, string) {
				return peerGoAvailable(binDir, "smokescreen")
			},
			Start: peerStartSmokescreen,
			Version: func(binDir string) string {
				return "smokescreen " + peerGoModVersion(filepath.Join(binDir, "smokescreen"), "github.com/stripe/smokescreen")
			},
		},
		{
			Name:    "goproxy",
			Injects: true,
			Note:    "minimal elazarl/goproxy program (bench/peers/goproxy); no logging",
			Available: func(binDir string) (bool, string) {
				return peerGoAvailable(binDir, "goproxy-basic")
			},
			Start: peerStartGoproxy,
			Version: func(binDir string) string {
				return "goproxy " + peerGoModVersion(filepath.Join(binDir, "goproxy-basic"), "github.com/elazarl/goproxy")
			},
		},
	}
}

// ---- helpers ------------------------------------------------------------------------------------

// peerFindBin finds a system binary, also in sbin directories a non-root PATH may lack.
func peerFindBin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"} {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or /usr/sbin (run bench/peers/setup.sh as root)", name)
}

// peerSystemAvailable reports whether a packaged binary is installed and, when running as root,
// whether the user it must drop privileges to exists.
func peerSystemAvailable(bin, rootUser string) func(string) (bool, string) {
	return func(string) (bool, string) {
		if _, err := peerFindBin(bin); err != nil {
			return false, err.Error()
		}
		if rootUser != "" && os.Geteuid() == 0 {
			if _, err := user.Lookup(rootUser); err != nil {
				return false, fmt.Sprintf("%s must run as user %q when started as root: %v", bin, rootUser, err)
			}
		}
		return true, ""
	}
}

func peerSystemVersion(bin, flag string, parse func(firstLine string) string) string {
	p, err := peerFindBin(bin)
	if err != nil {
		return bin + " (not installed)"
	}
	out, _ := exec.Command(p, flag).CombinedOutput()
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if first == "" {
		return bin + " (unknown version)"
	}
	return parse(strings.TrimSpace(first))
}

func peerGoAvailable(binDir, bin string) (bool, string) {
	p := filepath.Join(binDir, bin)
	fi, err := os.Stat(p)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0 {
		return false, fmt.Sprintf("%s not built (run bench/peers/setup.sh %s)", p, binDir)
	}
	return true, ""
}

// peerGoModVersion reads the version of module mod linked into a Go binary.
func peerGoModVersion(bin, mod string) string {
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		return "(unknown version)"
	}
	if bi.Main.Path == mod {
		return bi.Main.Version
	}
	for _, d := range bi.Deps {
		if d.Path == mod {
			if d.Replace != nil {
				return d.Version + " => " + d.Replace.Path + " " + d.Replace.Version
			}
			return d.Version
		}
	}
	return "(unknown version)"
}

func peerAddr(a startArgs) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(a.Port)) }

// peerQuoted checks that header name/value can be written into a quoted config directive.
func peerQuoted(a startArgs) error {
	if a.Header == "" || strings.ContainsAny(a.Header, " \t\r\n\":") {
		return fmt.Errorf("bad header name %q", a.Header)
	}
	if strings.ContainsAny(a.Value, "\"\\\r\n") {
		return fmt.Errorf("header value %q must not contain quotes, backslashes or newlines", a.Value)
	}
	return nil
}

// peerChownTo gives dir to a system user (squid / tinyproxy drop root privileges to it) so the
// proxy can write there. Only effective when running as root; returns the user's ids.
func peerChownTo(dir, name string) (uid, gid int, err error) {
	u, err := user.Lookup(name)
	if err != nil {
		return -1, -1, err
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid, os.Chown(dir, uid, gid)
}

func peerWriteFile(path string, b []byte) error { return os.WriteFile(path, b, 0o644) }

// ---- squid --------------------------------------------------------------------------------------

func peerStartSquid(ctx context.Context, a startArgs) (*proc, error) {
	bin, err := peerFindBin("squid")
	if err != nil {
		return nil, err
	}
	if err := peerQuoted(a); err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		// As root squid switches to cache_effective_user (Debian: proxy) right after binding, so
		// the files it writes later (cache_log, coredump_dir) must be writable by that user. If an
		// ancestor of Dir is not traversable by it, squid only warns and logs to stderr instead.
		if _, _, err := peerChownTo(a.Dir, "proxy"); err != nil {
			return nil, fmt.Errorf("squid: chown %s to proxy: %w", a.Dir, err)
		}
	}
	conf := filepath.Join(a.Dir, "squid.conf")
	if err := peerWriteFile(conf, []byte(peerSquidConf(a))); err != nil {
		return nil, err
	}
	// -N: no daemon, no fork: the PID is the single worker that serves requests (workers 1).
	// -d 1: copy important messages (startup, FATAL) to stderr, i.e. into <Dir>/squid.log.
	return startProc(ctx, "squid", peerAddr(a), a, nil, bin, "-N", "-d", "1", "-f", conf)
}

func peerSquidConf(a startArgs) string {
	d := a.Dir
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("# squid peer of the escrow load benchmark (generated by bench/peers.go)")
	w("http_port 127.0.0.1:%d", a.Port)
	w("# one worker (the default): the process we start is the one that serves; no SMP coordinator")
	w("workers 1")
	w("pid_filename %s", filepath.Join(d, "squid.pid"))
	w("cache_log %s", filepath.Join(d, "squid-cache.log"))
	w("coredump_dir %s", d)
	w("# no per-request access log (escrow must write its audit record: this favours squid)")
	w("access_log none")
	w("cache_store_log none")
	w("logfile_rotate 0")
	w("# pure forwarding: no caching at all, minimal memory cache, no ICMP pinger helper process (it")
	w("# would also outlive squid), no periodic cache-digest rebuilds")
	w("cache deny all")
	w("cache_mem 8 MB")
	w("pinger_enable off")
	w("digest_generation off")
	w("# keep-alive on both sides (the defaults, stated explicitly)")
	w("client_persistent_connections on")
	w("server_persistent_connections on")
	w("# do not add Via / X-Forwarded-For: forward only what the client sent plus the injected header")
	w("via off")
	w("forwarded_for delete")
	w("# applies to plain-HTTP requests only (CONNECT tunnels are opaque)")
	w("request_header_add %s \"%s\" all", a.Header, a.Value)
	w("# loopback clients only. The packaged squid.conf also has 'http_access deny CONNECT !SSL_ports'")
	w("# (443 only); this config has no such rule, so CONNECT to any port (the upstream's arbitrary")
	w("# high TLS port) is allowed for these clients.")
	w("acl bench_clients src 127.0.0.0/8")
	w("http_access allow bench_clients")
	w("http_access deny all")
	w("# stop promptly on SIGTERM (default waits 30s for active connections)")
	w("shutdown_lifetime 0 seconds")
	return b.String()
}

// ---- tinyproxy ----------------------------------------------------------------------------------

func peerStartTinyproxy(ctx context.Context, a startArgs) (*proc, error) {
	bin, err := peerFindBin("tinyproxy")
	if err != nil {
		return nil, err
	}
	if err := peerQuoted(a); err != nil {
		return nil, err
	}
	userLine := ""
	if os.Geteuid() == 0 {
		// As root tinyproxy drops to User/Group after binding; Debian creates user tinyproxy.
		name := "tinyproxy"
		if _, err := user.Lookup(name); err != nil {
			name = "nobody"
		}
		uid, gid, err := peerChownTo(a.Dir, name)
		if err != nil {
			return nil, fmt.Errorf("tinyproxy: chown %s to %s: %w", a.Dir, name, err)
		}
		userLine = fmt.Sprintf("User %d\nGroup %d\n", uid, gid)
	}
	conf := filepath.Join(a.Dir, "tinyproxy.conf")
	if err := peerWriteFile(conf, []byte(userLine+peerTinyproxyConf(a))); err != nil {
		return nil, err
	}
	// -d: foreground (no fork); with no LogFile/Syslog it logs to stderr, i.e. <Dir>/tinyproxy.log.
	return startProc(ctx, "tinyproxy", peerAddr(a), a, nil, bin, "-d", "-c", conf)
}

func peerTinyproxyConf(a startArgs) string {
	return fmt.Sprintf(`# tinyproxy peer of the escrow load benchmark (generated by bench/peers.go)
Port %d
Listen 127.0.0.1
Timeout 600
# one thread per client connection; well above the benchmark's concurrency
MaxClients 1024
Allow 127.0.0.1
# added to plain-HTTP requests only (CONNECT tunnels are opaque)
AddHeader "%s" "%s"
# do not add Via (nor X-Tinyproxy, off by default): forward only what the client sent plus the header
DisableViaHeader Yes
# quietest level, to stderr: no per-request logging (escrow must audit: this favours tinyproxy)
LogLevel Critical
PidFile "%s"
# No ConnectPort lines: tinyproxy then allows CONNECT to any port (the packaged config allows
# only 443 and 563), so the upstream's arbitrary high TLS port works.
# Caveat: tinyproxy closes the client connection after every response, without announcing it with
# Connection: close (no client keep-alive: every request pays a new TCP connection).
`, a.Port, a.Header, a.Value, filepath.Join(a.Dir, "tinyproxy.pid"))
}

// ---- smokescreen --------------------------------------------------------------------------------

func peerStartSmokescreen(ctx context.Context, a startArgs) (*proc, error) {
	bin := filepath.Join(a.BinDir, "smokescreen")
	if ok, why := peerGoAvailable(a.BinDir, "smokescreen"); !ok {
		return nil, errors.New(why)
	}
	// Config file for what has no flag: reuse upstream connections like escrow does (64 idle per
	// host, 256 total; net/http's default of 2 per host would make it churn connections).
	conf := filepath.Join(a.Dir, "smokescreen.yaml")
	if err := peerWriteFile(conf, []byte("transport_max_idle_conns: 256\ntransport_max_idle_conns_per_host: 64\n")); err != nil {
		return nil, err
	}
	// Its SSRF guard denies loopback/private destinations by default: allow 127.0.0.0/8. No ACL
	// file: every destination in the allowed ranges is permitted for CONNECT and plain HTTP.
	// Smokescreen logs a JSON "CANONICAL-PROXY-DECISION" line per request to stdout at Info level
	// and has no flag or config to lower the level, so that goes into <Dir>/smokescreen.log.
	return startProc(ctx, "smokescreen", peerAddr(a), a, nil, bin,
		"--config-file", conf,
		"--listen-ip", "127.0.0.1", "--listen-port", strconv.Itoa(a.Port),
		"--allow-range", "127.0.0.0/8", "--unsafe-allow-private-ranges")
}

// ---- goproxy ------------------------------------------------------------------------------------

func peerStartGoproxy(ctx context.Context, a startArgs) (*proc, error) {
	bin := filepath.Join(a.BinDir, "goproxy-basic")
	if ok, why := peerGoAvailable(a.BinDir, "goproxy-basic"); !ok {
		return nil, errors.New(why)
	}
	if a.Header == "" {
		return nil, errors.New("goproxy: empty header name")
	}
	// bench/peers/goproxy/main.go: logging off, 64 idle upstream connections per host (as escrow).
	return startProc(ctx, "goproxy", peerAddr(a), a, nil, bin,
		"-addr", peerAddr(a), "-header", a.Header, "-value", a.Value)
}
