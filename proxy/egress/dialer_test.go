package egress

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeResolver answers from a list of responses, one per call (the last one repeats).
type fakeResolver struct {
	mu      sync.Mutex
	answers [][]netip.Addr
	err     error
	block   bool // wait for ctx instead of answering
	calls   int
	nets    []string
}

func (r *fakeResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r.mu.Lock()
	r.calls++
	r.nets = append(r.nets, network)
	n := r.calls
	r.mu.Unlock()
	if r.block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if r.err != nil {
		return nil, r.err
	}
	i := min(n-1, len(r.answers)-1)
	return r.answers[i], nil
}

func (r *fakeResolver) Calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

// recordingDial records every address it is asked to dial; it fails for addresses in fail.
type recordingDial struct {
	mu     sync.Mutex
	dialed []string
	fail   map[string]bool
}

func (d *recordingDial) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.dialed = append(d.dialed, addr)
	d.mu.Unlock()
	if d.fail[addr] {
		return nil, &net.OpError{Op: "dial", Net: network, Err: errors.New("connection refused")}
	}
	c1, c2 := net.Pipe()
	go c2.Close()
	return c1, nil
}

func (d *recordingDial) Dialed() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.dialed...)
}

func TestDialer_ResolvedNameToPrivateIPIsDenied(t *testing.T) {
	res := &fakeResolver{answers: [][]netip.Addr{addrs("10.0.0.5")}}
	rd := &recordingDial{}
	d := NewDialer(DialerOptions{Resolver: res, Dial: rd.Dial})
	_, err := d.DialContext(context.Background(), "tcp", "evil.example:443")
	var de *DeniedError
	if !errors.As(err, &de) {
		t.Fatalf("err = %v, want *DeniedError", err)
	}
	if de.Class != ClassPrivate || de.Host != "evil.example" || de.IP != netip.MustParseAddr("10.0.0.5") {
		t.Errorf("DeniedError = %+v", de)
	}
	if got := err.Error(); got != "egress: 10.0.0.5 (private) is not allowed for host evil.example" {
		t.Errorf("message = %q", got)
	}
	if n := len(rd.Dialed()); n != 0 {
		t.Errorf("dialled %d addresses, want 0", n)
	}
}

func TestDialer_DialsTheCheckedIP(t *testing.T) {
	// A rebinding resolver: public on the first lookup, loopback afterwards.
	res := &fakeResolver{answers: [][]netip.Addr{addrs("93.184.216.34"), addrs("127.0.0.1")}}
	rd := &recordingDial{}
	d := NewDialer(DialerOptions{Resolver: res, Dial: rd.Dial})
	conn, err := d.DialContext(context.Background(), "tcp", "rebind.example:443")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if n := res.Calls(); n != 1 {
		t.Errorf("resolver called %d times, want 1", n)
	}
	if got := rd.Dialed(); len(got) != 1 || got[0] != "93.184.216.34:443" {
		t.Errorf("dialled %v, want [93.184.216.34:443]", got)
	}
	// The second dial resolves again, sees loopback, and is denied without dialling.
	_, err = d.DialContext(context.Background(), "tcp", "rebind.example:443")
	var de *DeniedError
	if !errors.As(err, &de) || de.Class != ClassLoopback {
		t.Fatalf("second dial err = %v, want loopback denial", err)
	}
	if got := rd.Dialed(); len(got) != 1 {
		t.Errorf("dialled %v after denial", got)
	}
}

func TestDialer_MixedAnswersDialOnlyAllowed(t *testing.T) {
	res := &fakeResolver{answers: [][]netip.Addr{addrs("10.0.0.7", "169.254.169.254", "2606:4700::1111", "8.8.8.8")}}
	rd := &recordingDial{fail: map[string]bool{"[2606:4700::1111]:443": true}}
	d := NewDialer(DialerOptions{Resolver: res, Dial: rd.Dial})
	conn, err := d.DialContext(context.Background(), "tcp", "mixed.example:443")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	want := []string{"[2606:4700::1111]:443", "8.8.8.8:443"}
	if got := rd.Dialed(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("dialled %v, want %v", got, want)
	}
}

func TestDialer_AllAllowedFailReturnsDialError(t *testing.T) {
	res := &fakeResolver{answers: [][]netip.Addr{addrs("10.0.0.7", "8.8.8.8")}}
	rd := &recordingDial{fail: map[string]bool{"8.8.8.8:443": true}}
	d := NewDialer(DialerOptions{Resolver: res, Dial: rd.Dial})
	_, err := d.DialContext(context.Background(), "tcp", "down.example:443")
	if err == nil || !strings.HasPrefix(err.Error(), "egress: dial down.example: ") {
		t.Fatalf("err = %v", err)
	}
	var de *DeniedError
	if errors.As(err, &de) {
		t.Errorf("a dial failure reported as a denial: %v", err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) {
		t.Errorf("cause not wrapped: %v", err)
	}
}

func TestDialer_Literals(t *testing.T) {
	res := &fakeResolver{err: errors.New("must not be called")}
	rd := &recordingDial{}
	d := NewDialer(DialerOptions{Resolver: res, Dial: rd.Dial})
	for _, tc := range []struct {
		addr  string
		class Class
	}{
		{"127.0.0.1:80", ClassLoopback},
		{"[::1]:80", ClassLoopback},
		{"[::ffff:169.254.169.254]:80", ClassMetadata},
		{"[fe80::1%eth0]:80", ClassZone},
		{"[::]:80", ClassUnspecified},
		{"0.0.0.0:80", ClassUnspecified},
	} {
		_, err := d.DialContext(context.Background(), "tcp", tc.addr)
		var de *DeniedError
		if !errors.As(err, &de) || de.Class != tc.class {
			t.Errorf("%s: err = %v, want class %s", tc.addr, err, tc.class)
		}
	}
	conn, err := d.DialContext(context.Background(), "tcp", "[::ffff:8.8.8.8]:443")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if got := rd.Dialed(); len(got) != 1 || got[0] != "8.8.8.8:443" {
		t.Errorf("dialled %v, want [8.8.8.8:443] (the unmapped checked address)", got)
	}
	if res.Calls() != 0 {
		t.Errorf("resolver called for a literal")
	}
}

func TestDialer_ResolverErrorAndTimeout(t *testing.T) {
	rd := &recordingDial{}
	boom := errors.New("servfail")
	d := NewDialer(DialerOptions{Resolver: &fakeResolver{err: boom}, Dial: rd.Dial})
	_, err := d.DialContext(context.Background(), "tcp", "x.example:443")
	if !errors.Is(err, boom) || !strings.HasPrefix(err.Error(), "egress: resolve x.example: ") {
		t.Errorf("resolver error: %v", err)
	}

	d = NewDialer(DialerOptions{Resolver: &fakeResolver{answers: [][]netip.Addr{nil}}, Dial: rd.Dial})
	if _, err := d.DialContext(context.Background(), "tcp", "empty.example:443"); err == nil || !strings.Contains(err.Error(), "no addresses") {
		t.Errorf("empty answer: %v", err)
	}

	d = NewDialer(DialerOptions{Resolver: &fakeResolver{block: true}, Dial: rd.Dial, Timeout: 50 * time.Millisecond})
	start := time.Now()
	_, err = d.DialContext(context.Background(), "tcp", "slow.example:443")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("timeout: %v", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("timeout took %v", el)
	}
	if n := len(rd.Dialed()); n != 0 {
		t.Errorf("dialled %d addresses", n)
	}
}

func TestDialer_BadInput(t *testing.T) {
	d := NewDialer(DialerOptions{Resolver: &fakeResolver{err: errors.New("no")}, Dial: (&recordingDial{}).Dial})
	for _, tc := range []struct{ network, addr string }{
		{"udp", "8.8.8.8:53"},
		{"unix", "/tmp/x"},
		{"tcp", "8.8.8.8"},
		{"tcp", ":443"},
		{"tcp", "8.8.8.8:0"},
		{"tcp", "8.8.8.8:https"},
		{"tcp", "8.8.8.8:70000"},
	} {
		_, err := d.DialContext(context.Background(), tc.network, tc.addr)
		if err == nil || !strings.HasPrefix(err.Error(), "egress: ") {
			t.Errorf("DialContext(%q, %q) = %v", tc.network, tc.addr, err)
		}
	}
}

func TestDialer_NetworkFamily(t *testing.T) {
	res := &fakeResolver{answers: [][]netip.Addr{addrs("2606:4700::1111", "8.8.8.8")}}
	rd := &recordingDial{}
	d := NewDialer(DialerOptions{Resolver: res, Dial: rd.Dial})
	conn, err := d.DialContext(context.Background(), "tcp4", "dual.example:443")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if got := rd.Dialed(); len(got) != 1 || got[0] != "8.8.8.8:443" {
		t.Errorf("tcp4 dialled %v", got)
	}
	if res.nets[0] != "ip4" {
		t.Errorf("lookup network %q, want ip4", res.nets[0])
	}
}

func TestDialer_SelfThroughName(t *testing.T) {
	rules := NewRules(RulesOptions{
		AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		Self:       []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15480")},
	})
	rd := &recordingDial{}
	d := NewDialer(DialerOptions{Rules: rules, Resolver: &fakeResolver{answers: [][]netip.Addr{addrs("127.0.0.1")}}, Dial: rd.Dial})
	_, err := d.DialContext(context.Background(), "tcp", "localhost:15480")
	var de *DeniedError
	if !errors.As(err, &de) || de.Class != ClassSelf {
		t.Fatalf("err = %v, want self", err)
	}
	conn, err := d.DialContext(context.Background(), "tcp", "localhost:8080")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
}

// TestDialer_RealLoopback dials a real listener through the default net.Dialer.
func TestDialer_RealLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skip(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	denied := NewDialer(DialerOptions{Resolver: &fakeResolver{answers: [][]netip.Addr{addrs("127.0.0.1")}}})
	if _, err := denied.DialContext(context.Background(), "tcp", ln.Addr().String()); err == nil {
		t.Fatal("loopback allowed by default rules")
	}
	d := NewDialer(DialerOptions{
		Rules:    NewRules(RulesOptions{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}),
		Resolver: &fakeResolver{answers: [][]netip.Addr{addrs("127.0.0.1")}},
	})
	conn, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort("upstream.test", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	if got := conn.RemoteAddr().String(); got != ln.Addr().String() {
		t.Errorf("remote %s, want %s", got, ln.Addr())
	}
	conn.Close()
}

func itoa(i int) string {
	return netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(i)).String()[len("0.0.0.0:"):]
}
