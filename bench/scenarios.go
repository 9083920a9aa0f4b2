package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var scenarioNames = []string{"plain", "intercepted", "tunnel", "policies", "sse", "newconn"}

func validScenario(s string) bool { return slices.Contains(scenarioNames, s) }

// runner owns the processes of one benchmark run.
type runner struct {
	o       options
	dir     string
	cpu     string // CPU list for proxies ("" = unpinned)
	key     string // the upstream credential escrow injects
	started time.Time

	up       *upstream
	escrow   *proc
	escrowCA *x509.CertPool
	relay    *proc // the floor: a byte relay on the proxy's core
	relayTCP string
	relayTLS string
	peers    []runningPeer
	skipped  []string // peers not run, with why
	procs    []*proc
	idle     map[string]int64 // idle RSS after start, bytes
	named    map[string]*proc // every proxy by its name in the report
	versions map[string]string
}

type runningPeer struct {
	peer
	p *proc
}

func randomKey() string {
	b := make([]byte, 24)
	rand.Read(b)
	return "sk-bench-" + hex.EncodeToString(b)
}

func (r *runner) want(s string) bool {
	only := splitList(r.o.Only)
	return len(only) == 0 || slices.Contains(only, s)
}

func (r *runner) stopAll() {
	for _, p := range r.procs {
		p.Stop()
	}
	if r.up != nil {
		r.up.Close()
	}
}

func (r *runner) args(name string) (startArgs, error) {
	d := filepath.Join(r.dir, name)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return startArgs{}, err
	}
	port, err := freePort()
	if err != nil {
		return startArgs{}, err
	}
	return startArgs{Dir: d, BinDir: r.o.BinDir, CPU: r.cpu, Port: port, Header: injectHeader, Value: injectValue}, nil
}

func (r *runner) setup(ctx context.Context) error {
	var err error
	if r.up, err = startUpstream(r.dir, r.o.BodySize, r.key); err != nil {
		return fmt.Errorf("upstream: %w", err)
	}
	r.idle = map[string]int64{}
	r.named = map[string]*proc{}
	r.versions = map[string]string{"escrow": escrowVersion(r.o.EscrowBin)}
	if r.escrow, err = r.startEscrow(ctx, "escrow", 10); err != nil {
		return err
	}
	pem, err := os.ReadFile(escrowCAFile(filepath.Join(r.dir, "escrow")))
	if err != nil {
		return err
	}
	r.escrowCA = x509.NewCertPool()
	r.escrowCA.AppendCertsFromPEM(pem)

	if r.relay, r.relayTCP, r.relayTLS, err = r.startRelay(ctx); err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	r.procs = append(r.procs, r.relay)

	wanted := splitList(r.o.Peers)
	for _, pe := range benchPeers() {
		if !slices.Contains(wanted, pe.Name) {
			continue
		}
		if ok, why := pe.Available(r.o.BinDir); !ok {
			r.skipped = append(r.skipped, fmt.Sprintf("%s: %s", pe.Name, why))
			continue
		}
		a, err := r.args(pe.Name)
		if err != nil {
			return err
		}
		p, err := pe.Start(ctx, a)
		if err != nil {
			r.skipped = append(r.skipped, fmt.Sprintf("%s: did not start: %v", pe.Name, err))
			log.Printf("%s did not start: %v", pe.Name, err)
			continue
		}
		r.procs = append(r.procs, p)
		r.peers = append(r.peers, runningPeer{peer: pe, p: p})
		r.named[pe.Name] = p
		r.versions[pe.Name] = pe.Version(r.o.BinDir)
	}
	// Idle memory is read once everything has settled, before any traffic.
	time.Sleep(time.Second)
	r.idle["escrow"] = rss(r.escrow)
	for _, rp := range r.peers {
		r.idle[rp.Name] = rss(rp.p)
	}
	return nil
}

func (r *runner) startEscrow(ctx context.Context, name string, policies int) (*proc, error) {
	a, err := r.args(name)
	if err != nil {
		return nil, err
	}
	p, err := startEscrow(ctx, a, escrowArgs{Bin: r.o.EscrowBin, Policies: policies, Up: r.up, Key: r.key})
	if err != nil {
		return nil, fmt.Errorf("escrow (%d policies): %w", policies, err)
	}
	r.procs = append(r.procs, p)
	r.named[name] = p
	return p, nil
}

func rss(p *proc) int64 {
	u, err := readUsage(p.PID())
	if err != nil {
		return 0
	}
	return u.RSS
}

func escrowVersion(bin string) string {
	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		return "escrow (version unknown)"
	}
	return strings.TrimSpace(string(out))
}

// subject is one way of reaching the upstream in a scenario: directly or through a proxy.
type subject struct {
	Name   string
	Proc   *proc // nil: direct
	Client client
	Note   string
	Floor  bool // the byte relay: what one more process hop costs here
}

const floorName = "tcp relay (floor)"

func (r *runner) floor(tlsAddr bool) subject {
	s := subject{Name: floorName, Proc: r.relay, Floor: true,
		Note: "copies bytes on the proxy's core, nothing else: the cost of one more process hop on this machine"}
	if tlsAddr {
		s.Client = r.newClient(r.transport(nil, viaUpstreamCA, hostAPI, true), "https://"+r.relayTLS+"/v1/models", r.withKey())
	} else {
		s.Client = r.newClient(r.transport(nil, noTLS, "", true), "http://"+r.relayTCP+"/v1/models", r.withKey())
	}
	return s
}

type tlsMode int

const (
	noTLS tlsMode = iota
	viaUpstreamCA
	viaEscrowCA
)

func (r *runner) transport(proxy *proc, mode tlsMode, serverName string, keepAlive bool) *http.Transport {
	tr := &http.Transport{
		MaxIdleConnsPerHost: max(r.o.Workers, r.o.SatConns),
		DisableCompression:  true,
		DisableKeepAlives:   !keepAlive,
		IdleConnTimeout:     time.Minute,
	}
	if proxy != nil {
		tr.Proxy = http.ProxyURL(&url.URL{Scheme: "http", Host: proxy.Addr})
	}
	switch mode {
	case viaUpstreamCA:
		tr.TLSClientConfig = &tls.Config{RootCAs: r.up.Pool, ServerName: serverName}
	case viaEscrowCA:
		tr.TLSClientConfig = &tls.Config{RootCAs: r.escrowCA, ServerName: serverName}
	}
	return tr
}

func hdr(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	return h
}

func (r *runner) newClient(tr *http.Transport, u string, h http.Header) client {
	return client{HTTP: &http.Client{Transport: tr, Timeout: 30 * time.Second}, URL: u, Header: h}
}

// The agent behind escrow holds no secret: it sends a placeholder escrow replaces. Direct
// and tunnelled agents hold the real key themselves (that is what escrow takes away).
func (r *runner) withKey() http.Header {
	return hdr("Authorization", "Bearer "+r.key, expectHeader, expectAuth)
}

func (r *runner) placeholder() http.Header {
	return hdr("Authorization", "Bearer placeholder", expectHeader, expectAuth)
}

func (r *runner) peerHeader(pe peer) http.Header {
	if pe.Injects {
		return hdr(expectHeader, expectInject)
	}
	return http.Header{}
}

func port(addr string) string { return addr[strings.LastIndexByte(addr, ':')+1:] }

// plainSubjects: plain HTTP, the proxy adds the credential or header.
func (r *runner) plainSubjects(path string, esc *proc, escName string) []subject {
	subs := []subject{{Name: "direct", Client: r.newClient(r.transport(nil, noTLS, "", true), "http://"+r.up.HTTPAddr+path, r.withKey())}}
	subs = append(subs, subject{Name: escName, Proc: esc, Note: "policy + credential injection + audit record",
		Client: r.newClient(r.transport(esc, noTLS, "", true), "http://"+hostPlain+":"+port(r.up.HTTPAddr)+path, r.placeholder())})
	for _, rp := range r.peers {
		note := "adds a header"
		if !rp.Injects {
			note = "forwards only (cannot add a header)"
		}
		if rp.Note != "" {
			note += "; " + rp.Note
		}
		subs = append(subs, subject{Name: rp.Name, Proc: rp.p, Note: note,
			Client: r.newClient(r.transport(rp.p, noTLS, "", true), "http://"+r.up.HTTPAddr+path, r.peerHeader(rp.peer))})
	}
	return subs
}

func (r *runner) directHTTPS(path string, keepAlive bool) subject {
	return subject{Name: "direct", Client: r.newClient(r.transport(nil, viaUpstreamCA, hostAPI, keepAlive), "https://"+r.up.HTTPSAddr+path, r.withKey())}
}

func (r *runner) interceptedSubject(path string, keepAlive bool) subject {
	return subject{Name: "escrow", Proc: r.escrow, Note: "agent↔escrow TLS, escrow↔upstream TLS; policy + credential + audit",
		Client: r.newClient(r.transport(r.escrow, viaEscrowCA, "", keepAlive), "https://"+hostAPI+":"+port(r.up.HTTPSAddr)+path, r.placeholder())}
}

// tunnelSubjects: CONNECT, then the agent's own TLS to the upstream through the tunnel.
func (r *runner) tunnelSubjects(path string, keepAlive bool) []subject {
	subs := []subject{r.directHTTPS(path, keepAlive),
		{Name: "escrow", Proc: r.escrow, Note: "host policy at CONNECT + audit record",
			Client: r.newClient(r.transport(r.escrow, viaUpstreamCA, "", keepAlive), "https://"+hostTunnel+":"+port(r.up.HTTPSAddr)+path, r.withKey())}}
	for _, rp := range r.peers {
		subs = append(subs, subject{Name: rp.Name, Proc: rp.p, Note: rp.Note,
			Client: r.newClient(r.transport(rp.p, viaUpstreamCA, hostAPI, keepAlive), "https://"+r.up.HTTPSAddr+path, r.withKey())})
	}
	return subs
}

// withFloor puts the relay right after direct.
func withFloor(subs []subject, floor subject) []subject {
	return append([]subject{subs[0], floor}, subs[1:]...)
}

// row is one subject's results in one scenario.
type row struct {
	Subject  string
	Note     string
	Lat      latency
	Added    [4]time.Duration
	SatRPS   float64
	SatErrs  int
	CPUPer1k float64 // CPU seconds per 1,000 requests in the fixed-rate phase
	RSS      int64   // largest resident set during the fixed-rate phase
	FirstErr string
	Direct   bool
	Floor    bool
	Measured bool // CPU and RSS are known (a process)
	Policies int
}

type scenarioResult struct {
	Name  string
	Title string
	What  string
	Rows  []row
	SSE   []sseRow
}

type sseRow struct {
	Subject string
	TTFE    latency
	Gap     latency
	Errors  int
	First   string
}

func (r *runner) scenarios(ctx context.Context) *report {
	rep := &report{o: r.o, Pinning: pinning(r.o), Skipped: r.skipped, Versions: r.versions, Idle: r.idle, Started: r.started}
	run := func(name string, f func() scenarioResult) {
		if !r.want(name) || ctx.Err() != nil {
			return
		}
		t := time.Now()
		log.Printf("scenario %s ...", name)
		s := f()
		s.Name = name
		rep.Scenarios = append(rep.Scenarios, s)
		log.Printf("scenario %s done in %s", name, time.Since(t).Round(100*time.Millisecond))
	}
	path := "/v1/models"
	run("plain", func() scenarioResult {
		return scenarioResult{Title: "Plain HTTP, credential (escrow) or header (peers) added",
			What: "`http://` through HTTP_PROXY; kept-alive agent connections.",
			Rows: r.measure(ctx, withFloor(r.plainSubjects(path, r.escrow, "escrow"), r.floor(false)), true)}
	})
	run("intercepted", func() scenarioResult {
		return scenarioResult{Title: "Intercepted HTTPS, kept-alive",
			What: "`https://` through HTTPS_PROXY; escrow terminates the agent's TLS with a leaf from its pod CA, checks policy, injects the credential and forwards over a pooled TLS connection. The peers cannot add a header to HTTPS without a TLS-intercepting setup, so only direct and escrow are compared.",
			Rows: r.measure(ctx, []subject{r.directHTTPS(path, true), r.floor(true), r.interceptedSubject(path, true)}, true)}
	})
	run("tunnel", func() scenarioResult {
		return scenarioResult{Title: "CONNECT tunnel, kept-alive inside",
			What: "`https://` through HTTPS_PROXY to a host routed as `tunnel: true`: escrow decides at CONNECT and relays bytes; the agent's own TLS runs end to end (and it holds its own key, as with every peer).",
			Rows: r.measure(ctx, withFloor(r.tunnelSubjects(path, true), r.floor(true)), true)}
	})
	run("policies", func() scenarioResult {
		res := scenarioResult{Title: "Policy set size (plain HTTP)",
			What: "The plain-HTTP scenario against escrow with 10, 1,000 and 10,000 Cedar policies."}
		subs := r.plainSubjects(path, r.escrow, "escrow, 10 policies")[:2]
		for _, n := range []int{1000, 10000} {
			name := fmt.Sprintf("escrow-%d", n)
			e, err := r.startEscrow(ctx, name, n)
			if err != nil {
				log.Print(err)
				res.Rows = append(res.Rows, row{Subject: name, FirstErr: err.Error()})
				continue
			}
			time.Sleep(500 * time.Millisecond)
			r.idle[name] = rss(e)
			subs = append(subs, r.plainSubjects(path, e, fmt.Sprintf("escrow, %s policies", thousands(n)))[1])
		}
		res.Rows = r.measure(ctx, subs, true)
		for i := range res.Rows {
			res.Rows[i].Note = ""
		}
		return res
	})
	run("sse", func() scenarioResult {
		q := "/v1/sse?events=20&interval=20ms"
		var subs []subject
		for _, s := range r.plainSubjects(q, r.escrow, "escrow") {
			s.Name = s.Name + " (http)"
			subs = append(subs, s)
		}
		d := r.directHTTPS(q, true)
		d.Name = "direct (https)"
		e := r.interceptedSubject(q, true)
		e.Name = "escrow (https, intercepted)"
		subs = append(subs, d, e)
		return scenarioResult{Title: "Server-Sent Events stream",
			What: "20 events 20 ms apart per stream (an LLM token stream's shape); time to first event from the request, and the gap between events as the agent sees it (20 ms is perfect).",
			SSE:  r.measureSSE(ctx, subs)}
	})
	run("newconn", func() scenarioResult {
		subs := []subject{r.directHTTPS(path, false), r.interceptedSubject(path, false)}
		subs[0].Name = "direct (new TLS connection)"
		subs[1].Name = "escrow, intercepted (CONNECT + TLS to escrow, leaf cached)"
		leaf := r.interceptedSubject(path, false)
		leaf.Name = "escrow, intercepted, new host each time (leaf minted)"
		var n atomic.Int64
		leaf.Client.URL = "" // set per request below
		leaf.Client.next = func() string {
			return fmt.Sprintf("https://h%d%s:%s%s", n.Add(1), leafSuffix, port(r.up.HTTPSAddr), path)
		}
		subs = append(subs, leaf)
		for _, s := range r.tunnelSubjects(path, false)[1:] {
			s.Name += " (CONNECT tunnel)"
			subs = append(subs, s)
		}
		return scenarioResult{Title: "First request on a new connection",
			What: fmt.Sprintf("Every request on a new agent connection (no keep-alive, no TLS resumption), at %s requests/s: TCP + CONNECT + TLS handshake(s) + request. The leaf row asks for a new host name every time, so escrow mints a certificate per request.", thousands(int(r.o.NewConnRate))),
			Rows: r.measureAt(ctx, subs, r.o.NewConnRate, false)}
	})
	rep.Peak = map[string]int64{}
	for name, p := range r.named {
		if u, err := readUsage(p.PID()); err == nil {
			rep.Peak[name] = u.HWM
		}
	}
	return rep
}

// measure runs each subject at the fixed rate (latency, CPU, RSS), then closed loop.
func (r *runner) measure(ctx context.Context, subs []subject, saturate bool) []row {
	return r.measureAt(ctx, subs, r.o.Rate, saturate)
}

func (r *runner) measureAt(ctx context.Context, subs []subject, rate float64, saturate bool) []row {
	// The subjects take turns, round after round, and each row pools its samples from every
	// round: a burst of noise on this shared machine then lands on all of them alike instead
	// of on whichever ran at that moment.
	type acc struct {
		samples []time.Duration
		errs    int
		first   string
		cpu     time.Duration
		n       int
		maxRSS  int64
		sat     float64
		satErrs int
	}
	accs := make([]acc, len(subs))
	rounds := max(r.o.Rounds, 1)
	for round := range rounds {
		for i, s := range subs {
			if ctx.Err() != nil {
				break
			}
			a := &accs[i]
			pid := 0
			if s.Proc != nil {
				pid = s.Proc.PID()
			}
			m := startMonitor(pid)
			res := runOpenLoop(ctx, s.Client, openLoop{Rate: rate, Duration: r.o.Duration / time.Duration(rounds), Warmup: r.o.Warmup, Workers: r.o.Workers})
			cpu, maxRSS := m.done()
			a.samples = append(a.samples, res.Samples...)
			a.errs += res.Errors
			a.n += res.ok() + res.Errors
			a.cpu += cpu
			a.maxRSS = max(a.maxRSS, maxRSS)
			if a.first == "" {
				a.first = res.FirstErr
			}
			if saturate && ctx.Err() == nil {
				rps, sres := runClosedLoop(ctx, s.Client, r.o.SatConns, r.o.SatDuration/time.Duration(rounds))
				a.sat += rps / float64(rounds)
				a.satErrs += sres.Errors
				if a.first == "" {
					a.first = sres.FirstErr
				}
			}
			if round == rounds-1 {
				if tr, ok := s.Client.HTTP.Transport.(*http.Transport); ok {
					tr.CloseIdleConnections()
				}
			}
		}
	}
	var rows []row
	for i, s := range subs {
		a := accs[i]
		rw := row{Subject: s.Name, Note: s.Note, Lat: summarize(a.samples, a.errs), FirstErr: a.first,
			Direct: s.Proc == nil, Floor: s.Floor, Measured: s.Proc != nil, RSS: a.maxRSS, SatRPS: a.sat, SatErrs: a.satErrs}
		if a.n > 0 && s.Proc != nil {
			rw.CPUPer1k = a.cpu.Seconds() / float64(a.n) * 1000
		}
		if len(rows) > 0 {
			rw.Added = rw.Lat.minus(rows[0].Lat)
		}
		log.Printf("  %-58s p50 %7s  p99 %7s  sat %8.0f/s  errors %d/%d", s.Name, us(rw.Lat.P50), us(rw.Lat.P99), rw.SatRPS, rw.Lat.Errors, rw.SatErrs)
		rows = append(rows, rw)
	}
	return rows
}

func (r *runner) measureSSE(ctx context.Context, subs []subject) []sseRow {
	streams := 8
	if !r.o.Quick {
		streams = 40
	}
	const parallel = 4
	var rows []sseRow
	for _, s := range subs {
		var mu sync.Mutex
		var ttfe, gaps []time.Duration
		errs, first := 0, ""
		// One unmeasured round first, so every path starts with its connections open.
		var warm sync.WaitGroup
		for range parallel {
			warm.Add(1)
			go func() { defer warm.Done(); readSSE(ctx, s.Client, 2) }()
		}
		warm.Wait()
		sem := make(chan struct{}, parallel)
		var wg sync.WaitGroup
		for range streams {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer func() { <-sem; wg.Done() }()
				res := readSSE(ctx, s.Client, 20)
				mu.Lock()
				defer mu.Unlock()
				if res.Err != "" {
					errs++
					if first == "" {
						first = res.Err
					}
					return
				}
				ttfe = append(ttfe, res.TTFE)
				gaps = append(gaps, res.Gaps...)
			}()
		}
		wg.Wait()
		rw := sseRow{Subject: s.Name, TTFE: summarize(ttfe, errs), Gap: summarize(gaps, 0), Errors: errs, First: first}
		log.Printf("  %-58s first event p50 %7s  gap p99 %7s  errors %d", s.Name, us(rw.TTFE.P50), us(rw.Gap.P99), errs)
		rows = append(rows, rw)
	}
	return rows
}
