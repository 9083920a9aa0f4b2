package credential

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/internal/fakeclock"
)

// counting returns a provider that issues "v1", "v2", ... (expiring after life, if non-zero)
// and the counter of its calls.
func counting(clock *fakeclock.Clock, life time.Duration) (Provider, *atomic.Int32) {
	var n atomic.Int32
	return providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
		i := n.Add(1)
		var exp time.Time
		if life > 0 {
			exp = clock.Now().Add(life)
		}
		return NewToken(args.Name, fmt.Sprintf("v%d", i), exp), nil
	}), &n
}

func mustGet(t testing.TB, m *Manager, name string) Token {
	t.Helper()
	tok, err := m.Get(context.Background(), Request{Name: name})
	if err != nil {
		t.Fatalf("Get(%q): %v", name, err)
	}
	return tok
}

func TestManager_CacheHitDoesNotFetch(t *testing.T) {
	clock := newFakeClock()
	p, calls := counting(clock, 0)
	m := NewManager(map[string]Provider{"openai": p}, Options{Now: clock.Now})
	a := mustGet(t, m, "openai")
	clock.Advance(24 * time.Hour)
	b := mustGet(t, m, "openai")
	if calls.Load() != 1 || a.ID() != b.ID() || b.Value() != "v1" {
		t.Errorf("calls=%d, tokens %v %v; want one fetch, same token", calls.Load(), a, b)
	}
}

func TestManager_ConcurrentGetsFetchOnce(t *testing.T) {
	release := make(chan struct{})
	var calls atomic.Int32
	p := providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
		calls.Add(1)
		<-release
		return NewToken(args.Name, secretValue, time.Time{}), nil
	})
	m := NewManager(map[string]Provider{"openai": p}, Options{})

	const n = 200
	var wg sync.WaitGroup
	ids := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			tok, err := m.Get(context.Background(), Request{Name: "openai"})
			ids[i], errs[i] = tok.ID(), err
		})
	}
	// Let the waiters pile up behind the one blocked fetch, then release it.
	for calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	if c := calls.Load(); c != 1 {
		t.Errorf("provider called %d times for %d concurrent Gets; want 1", c, n)
	}
	for i := range n {
		if errs[i] != nil || ids[i] != ids[0] {
			t.Fatalf("Get %d: id %s err %v; want %s", i, ids[i], errs[i], ids[0])
		}
	}
}

// TestManager_ColdStartFetchesOnce: callers that missed while a fast fetch ran, and reach the
// singleflight only after it finished, take its result instead of fetching again.
func TestManager_ColdStartFetchesOnce(t *testing.T) {
	for round := range 50 {
		var calls atomic.Int32
		p := providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
			calls.Add(1)
			return NewToken(args.Name, secretValue, time.Time{}), nil
		})
		m := NewManager(map[string]Provider{"k": p}, Options{})
		start := make(chan struct{})
		var wg sync.WaitGroup
		for range 32 {
			wg.Go(func() {
				<-start
				mustGet(t, m, "k")
			})
		}
		close(start)
		wg.Wait()
		if c := calls.Load(); c != 1 {
			t.Fatalf("round %d: %d fetches on a cold cache; want 1", round, c)
		}
	}
}

func TestManager_WaiterWhoseContextEndsReturnsPromptly(t *testing.T) {
	release := make(chan struct{})
	var calls atomic.Int32
	p := providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
		calls.Add(1)
		<-release
		if err := ctx.Err(); err != nil { // the fetch must not inherit the caller's cancellation
			return Token{}, err
		}
		return NewToken(args.Name, secretValue, time.Time{}), nil
	})
	m := NewManager(map[string]Provider{"openai": p}, Options{})

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Get(ctx, Request{Name: "openai"}); done <- err }()
	for calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.Canceled) {
			t.Errorf("error %v: want ErrUnavailable and context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Get did not return after its context was canceled")
	}
	close(release)
	tok := mustGet(t, m, "openai")
	if tok.Value() != secretValue || calls.Load() != 1 {
		t.Errorf("after release: %v, calls=%d; want the detached fetch's token and one call", tok, calls.Load())
	}
}

// k8sSecretDir lays out a directory like a Kubernetes Secret volume: key -> ..data/key,
// ..data -> ..<version>, and rotates it the way the kubelet does (new dir, atomic symlink swap).
type k8sSecretDir struct {
	t    *testing.T
	dir  string
	vers int
}

func newK8sSecretDir(t *testing.T, value string) *k8sSecretDir {
	d := &k8sSecretDir{t: t, dir: t.TempDir()}
	d.rotate(value)
	if err := os.Symlink(filepath.Join("..data", "key"), filepath.Join(d.dir, "key")); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d *k8sSecretDir) path() string { return filepath.Join(d.dir, "key") }

func (d *k8sSecretDir) rotate(value string) {
	d.vers++
	v := fmt.Sprintf("..2026_03_01_12_00_%02d", d.vers)
	if err := os.Mkdir(filepath.Join(d.dir, v), 0o700); err != nil {
		d.t.Fatal(err)
	}
	writeFile(d.t, filepath.Join(d.dir, v, "key"), value+"\n")
	tmp := filepath.Join(d.dir, "..data_tmp")
	if err := os.Symlink(v, tmp); err != nil {
		d.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(d.dir, "..data")); err != nil {
		d.t.Fatal(err)
	}
}

func TestManager_RereadsRotatedFile(t *testing.T) {
	clock := newFakeClock()
	sd := newK8sSecretDir(t, "sk-old-value")
	m := NewManager(map[string]Provider{"openai": StaticFile(sd.path())}, Options{Now: clock.Now, RecheckEvery: 2 * time.Second})

	old := mustGet(t, m, "openai")
	if old.Value() != "sk-old-value" {
		t.Fatalf("first value %q", old.Value())
	}
	sd.rotate("sk-new-value") // same length, so only the inode tells
	clock.Advance(time.Second)
	if got := mustGet(t, m, "openai"); got.Value() != "sk-old-value" {
		t.Errorf("file re-checked before RecheckEvery: got %q", got.Value())
	}
	clock.Advance(time.Second)
	got := mustGet(t, m, "openai")
	if got.Value() != "sk-new-value" {
		t.Fatalf("after RecheckEvery: value %q, want the rotated one", got.Value())
	}
	if got.ID() == old.ID() {
		t.Errorf("rotated value kept ID %s", got.ID())
	}
	if again := mustGet(t, m, "openai"); again.ID() != got.ID() {
		t.Errorf("value changed again without a rotation")
	}
}

func TestManager_RotatedFileThatVanishesFailsClosed(t *testing.T) {
	clock := newFakeClock()
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, secretValue)
	m := NewManager(map[string]Provider{"openai": StaticFile(path)}, Options{Now: clock.Now, Rand: noJitter})
	mustGet(t, m, "openai")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	clock.Advance(DefaultRecheckEvery)
	_, err := m.Get(context.Background(), Request{Name: "openai"})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("error %v: want ErrUnavailable saying the file does not exist", err)
	}
	// Still failing within the backoff, and the old value is not served again.
	if _, err := m.Get(context.Background(), Request{Name: "openai"}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("second Get: %v, want ErrUnavailable", err)
	}
	writeFile(t, path, "sk-restored")
	clock.Advance(DefaultFailureBackoff)
	if got := mustGet(t, m, "openai"); got.Value() != "sk-restored" {
		t.Errorf("after restore: %q", got.Value())
	}
}

// countingStaler counts Stale calls and reports what it is told.
type countingStaler struct {
	Provider
	calls atomic.Int32
	stale atomic.Bool
}

func (s *countingStaler) Stale(time.Time) bool { s.calls.Add(1); return s.stale.Load() }

func TestManager_ChecksStalerAtMostEveryRecheckEvery(t *testing.T) {
	clock := newFakeClock()
	p, fetches := counting(clock, 0)
	s := &countingStaler{Provider: p}
	m := NewManager(map[string]Provider{"k": s}, Options{Now: clock.Now, RecheckEvery: 5 * time.Second})
	mustGet(t, m, "k")
	var wg sync.WaitGroup
	for range 100 {
		wg.Go(func() { mustGet(t, m, "k") })
	}
	wg.Wait()
	if c := s.calls.Load(); c != 0 {
		t.Errorf("Stale called %d times within RecheckEvery of the fetch", c)
	}
	clock.Advance(5 * time.Second)
	for range 100 {
		wg.Go(func() { mustGet(t, m, "k") })
	}
	wg.Wait()
	if c := s.calls.Load(); c != 1 {
		t.Errorf("Stale called %d times in one interval; want 1", c)
	}
	s.stale.Store(true)
	clock.Advance(5 * time.Second)
	if got := mustGet(t, m, "k"); got.Value() != "v2" || fetches.Load() != 2 {
		t.Errorf("stale source: got %q after %d fetches; want v2 after 2", got.Value(), fetches.Load())
	}
}

func TestManager_RefreshesBeforeExpiry(t *testing.T) {
	clock := newFakeClock()
	// A 1000s token: a fifth of its lifetime (200s) remains at 800s, before the 60s rule (at
	// 940s) would apply. (With a 100s token the 60s rule refreshes at 50s, in the background,
	// so a check at 79s raced with it.)
	p, calls := counting(clock, 1000*time.Second)
	m := NewManager(map[string]Provider{"gh": p}, Options{Now: clock.Now}) // RefreshBefore 0.2: at 800s
	t0 := mustGet(t, m, "gh")
	if t0.Value() != "v1" || !t0.ExpiresAt().Equal(clock.Now().Add(1000*time.Second)) {
		t.Fatalf("first token %v %q", t0, t0.Value())
	}
	clock.Advance(799 * time.Second)
	got0 := mustGet(t, m, "gh")
	m.waitBackground()
	if got0.Value() != "v1" || calls.Load() != 1 {
		t.Fatalf("at 799s: %q after %d fetches; want v1 and no refresh yet", got0.Value(), calls.Load())
	}
	clock.Advance(2 * time.Second) // 801s: 19.9% of the lifetime remains
	if got := mustGet(t, m, "gh"); got.Value() != "v1" {
		t.Errorf("at 801s: %q; want the still-valid v1 while the refresh runs", got.Value())
	}
	m.waitBackground()
	if calls.Load() != 2 {
		t.Fatalf("at 801s: %d fetches; want a refresh ahead of expiry", calls.Load())
	}
	got := mustGet(t, m, "gh")
	if got.Value() != "v2" || got.ID() == t0.ID() {
		t.Errorf("after the refresh: %q (%s); want v2", got.Value(), got.ID())
	}
	if calls.Load() != 2 {
		t.Errorf("%d fetches; want 2", calls.Load())
	}
}

func TestManager_RefreshBeforeOption(t *testing.T) {
	clock := newFakeClock()
	p, calls := counting(clock, 100*time.Second)
	m := NewManager(map[string]Provider{"gh": p}, Options{Now: clock.Now, RefreshBefore: 0.5})
	mustGet(t, m, "gh")
	clock.Advance(49 * time.Second)
	mustGet(t, m, "gh")
	m.waitBackground()
	if calls.Load() != 1 {
		t.Fatalf("refreshed with 51%% of the lifetime left")
	}
	clock.Advance(2 * time.Second)
	mustGet(t, m, "gh")
	m.waitBackground()
	if calls.Load() != 2 {
		t.Errorf("not refreshed with 49%% of the lifetime left")
	}
}

func TestManager_NeverServesExpiredToken(t *testing.T) {
	clock := newFakeClock()
	var calls atomic.Int32
	p := providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
		if calls.Add(1) == 1 {
			return NewToken(args.Name, "v1", clock.Now().Add(100*time.Second)), nil
		}
		return Token{}, errors.New("token endpoint answered 500")
	})
	m := NewManager(map[string]Provider{"gh": p}, Options{Now: clock.Now})
	mustGet(t, m, "gh")
	clock.Advance(85 * time.Second)
	if got := mustGet(t, m, "gh"); got.Value() != "v1" {
		t.Fatalf("in the refresh window: %q", got.Value())
	}
	m.waitBackground() // the refresh fails
	clock.Advance(14*time.Second + 999*time.Millisecond)
	if got := mustGet(t, m, "gh"); got.Value() != "v1" {
		t.Errorf("1ms before expiry: %q; want v1 still served after the failed refresh", got.Value())
	}
	m.waitBackground()
	clock.Advance(time.Millisecond) // exactly at expiry
	tok, err := m.Get(context.Background(), Request{Name: "gh"})
	if !errors.Is(err, ErrUnavailable) || !tok.IsZero() {
		t.Fatalf("at expiry: %v, %v; want ErrUnavailable and no token", tok, err)
	}
	clock.Advance(time.Hour)
	if _, err := m.Get(context.Background(), Request{Name: "gh"}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("long after expiry: %v", err)
	}
}

func TestManager_FailedFetchIsUnavailable(t *testing.T) {
	cause := errors.New("token endpoint answered 500")
	p := providerFunc(func(context.Context, FetchArgs) (Token, error) { return Token{}, cause })
	m := NewManager(map[string]Provider{
		"internal": p,
		"openai":   StaticFile(filepath.Join(t.TempDir(), "missing")),
		"env":      StaticEnvFrom("OPENAI_KEY", func(string) (string, bool) { return "", false }),
	}, Options{})
	for name, want := range map[string]string{
		"internal": "token endpoint answered 500",
		"openai":   "does not exist",
		"env":      "environment variable OPENAI_KEY is not set",
	} {
		tok, err := m.Get(context.Background(), Request{Name: name})
		if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnknown) || !tok.IsZero() {
			t.Errorf("%s: %v, %v; want ErrUnavailable", name, tok, err)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, `credential "`+name+`"`) || !strings.Contains(msg, want) {
			t.Errorf("%s: message %q should name the credential and say %q", name, msg, want)
		}
		var ce *Error
		if !errors.As(err, &ce) || ce.Name != name {
			t.Errorf("%s: not an *Error for the credential: %#v", name, err)
		}
	}
	if _, err := m.Get(context.Background(), Request{Name: "internal"}); !errors.Is(err, cause) {
		t.Errorf("cause not wrapped: %v", err)
	}
}

func TestManager_FailedFetchBacksOffAndIsNotCached(t *testing.T) {
	clock := newFakeClock()
	var calls atomic.Int32
	var fail atomic.Bool
	fail.Store(true)
	p := providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
		calls.Add(1)
		if fail.Load() {
			return Token{}, errors.New("down")
		}
		return NewToken(args.Name, secretValue, time.Time{}), nil
	})
	m := NewManager(map[string]Provider{"k": p}, Options{Now: clock.Now, Rand: noJitter})
	for range 5 {
		if _, err := m.Get(context.Background(), Request{Name: "k"}); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Get: %v", err)
		}
	}
	if calls.Load() != 1 {
		t.Errorf("%d provider calls within the backoff; want 1", calls.Load())
	}
	clock.Advance(DefaultFailureBackoff - time.Millisecond)
	m.Get(context.Background(), Request{Name: "k"})
	if calls.Load() != 1 {
		t.Errorf("provider called again before the backoff ended")
	}
	fail.Store(false)
	clock.Advance(time.Millisecond)
	if tok := mustGet(t, m, "k"); tok.Value() != secretValue || calls.Load() != 2 {
		t.Errorf("after the backoff: %v, %d calls", tok, calls.Load())
	}
}

func TestManager_RefusesUnusableValues(t *testing.T) {
	clock := newFakeClock()
	for name, tok := range map[string]Token{
		"crlf":    NewToken("k", "sk-abc\r\nX-Injected: 1", time.Time{}),
		"lf":      NewToken("k", "sk-abc\nmore", time.Time{}),
		"nul":     NewToken("k", "sk-abc\x00", time.Time{}),
		"empty":   NewToken("k", "", time.Time{}),
		"zero":    {},
		"expired": NewToken("k", "sk-abc", clock.Now()),
	} {
		p := providerFunc(func(context.Context, FetchArgs) (Token, error) { return tok, nil })
		m := NewManager(map[string]Provider{"k": p}, Options{Now: clock.Now})
		got, err := m.Get(context.Background(), Request{Name: "k"})
		if !errors.Is(err, ErrUnavailable) || !got.IsZero() {
			t.Errorf("%s: %v, %v; want ErrUnavailable", name, got, err)
			continue
		}
		if strings.Contains(err.Error(), "sk-abc") || strings.Contains(err.Error(), "X-Injected") {
			t.Errorf("%s: error reveals the value: %v", name, err)
		}
	}
}

func TestManager_ProviderPanicIsUnavailable(t *testing.T) {
	p := providerFunc(func(context.Context, FetchArgs) (Token, error) { panic("oops " + secretValue) })
	m := NewManager(map[string]Provider{"k": p}, Options{})
	_, err := m.Get(context.Background(), Request{Name: "k"})
	if !errors.Is(err, ErrUnavailable) || strings.Contains(err.Error(), secretValue) {
		t.Errorf("error %v: want ErrUnavailable without the panic value", err)
	}
}

func TestManager_UnknownCredential(t *testing.T) {
	m := NewManager(map[string]Provider{"k": StaticEnvFrom("X", func(string) (string, bool) { return "v", true })}, Options{})
	_, err := m.Get(context.Background(), Request{Name: "nope"})
	if !errors.Is(err, ErrUnknown) || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("error %v: want ErrUnknown naming the credential", err)
	}
	m.Forget("nope") // no panic
}

func TestManager_ForgetDropsCachedValue(t *testing.T) {
	clock := newFakeClock()
	p, calls := counting(clock, 0)
	m := NewManager(map[string]Provider{"k": p}, Options{Now: clock.Now})
	if got := mustGet(t, m, "k"); got.Value() != "v1" {
		t.Fatal(got.Value())
	}
	m.Forget("k")
	if got := mustGet(t, m, "k"); got.Value() != "v2" || calls.Load() != 2 {
		t.Errorf("after Forget: %q, %d calls; want a new fetch", got.Value(), calls.Load())
	}
}

func TestManager_ForgetDiscardsFetchInFlight(t *testing.T) {
	release := make(chan struct{})
	var calls atomic.Int32
	p := providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
		i := calls.Add(1)
		if i == 1 {
			<-release
		}
		return NewToken(args.Name, fmt.Sprintf("v%d", i), time.Time{}), nil
	})
	m := NewManager(map[string]Provider{"k": p}, Options{})
	done := make(chan Token)
	go func() { tok, _ := m.Get(context.Background(), Request{Name: "k"}); done <- tok }()
	for calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	m.Forget("k") // revoked while v1 is being fetched
	close(release)
	<-done
	if got := mustGet(t, m, "k"); got.Value() != "v2" {
		t.Errorf("after Forget during a fetch: %q; want a fresh fetch, not the pre-Forget result", got.Value())
	}
}

func TestManager_WarmReportsEveryFailingCredential(t *testing.T) {
	var okCalls atomic.Int32
	ok := providerFunc(func(ctx context.Context, args FetchArgs) (Token, error) {
		okCalls.Add(1)
		return NewToken(args.Name, secretValue, time.Time{}), nil
	})
	m := NewManager(map[string]Provider{
		"good":  ok,
		"zfile": StaticFile(filepath.Join(t.TempDir(), "missing")),
		"aenv":  StaticEnvFrom("UNSET_VAR", func(string) (string, bool) { return "", false }),
	}, Options{})
	err := m.Warm(context.Background(), WarmOptions{Subject: subjA})
	if err == nil {
		t.Fatal("Warm: no error")
	}
	msg := err.Error()
	ia, iz := strings.Index(msg, `credential "aenv"`), strings.Index(msg, `credential "zfile"`)
	if ia < 0 || iz < 0 || ia > iz || strings.Contains(msg, `"good"`) || strings.Contains(msg, secretValue) {
		t.Errorf("Warm error %q: want both failures, sorted by name, and nothing else", msg)
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("Warm error does not match ErrUnavailable")
	}
	get(t, m, Request{Name: "good", Subject: subjA})
	if okCalls.Load() != 1 {
		t.Errorf("Warm did not fill the cache: %d calls", okCalls.Load())
	}
	if err := NewManager(map[string]Provider{"good": ok}, Options{}).Warm(context.Background(), WarmOptions{Subject: subjA}); err != nil {
		t.Errorf("Warm with good credentials: %v", err)
	}
}

// recorder is a provider that records what it was asked to mint; shared makes it Shared.
type recorder struct {
	shared bool
	mu     sync.Mutex
	asked  []FetchArgs
}

func (p *recorder) Fetch(_ context.Context, a FetchArgs) (Token, error) {
	p.mu.Lock()
	p.asked = append(p.asked, a)
	n := len(p.asked)
	p.mu.Unlock()
	return NewToken(a.Name, fmt.Sprintf("%s-token-%d", a.Name, n), time.Now().Add(time.Hour)), nil
}

func (p *recorder) Shared() bool { return p.shared }

func (p *recorder) fetches() []FetchArgs {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.asked)
}

// Warm fetches what the first request will reuse and nothing else. A per-caller credential is
// cached per subject, so a fetch for no subject (what Warm used to do) minted a token that no
// request ever used, and that an issuer may refuse for want of a subject.
func TestManager_WarmFetchesExactlyWhatTheFirstRequestReuses(t *testing.T) {
	t.Run("without a subject", func(t *testing.T) {
		shared, perCaller := &recorder{shared: true}, &recorder{}
		var delegCalls atomic.Int32
		deleg := delegatedFunc(func(_ context.Context, a FetchArgs) (Token, error) {
			delegCalls.Add(1)
			return NewToken(a.Name, "exchanged", time.Now().Add(time.Hour)), nil
		})
		m := NewManager(map[string]Provider{"static": shared, "idp": perCaller, "onbehalf": deleg}, Options{})
		if err := m.Warm(context.Background(), WarmOptions{}); err != nil {
			t.Fatalf("Warm: %v", err)
		}
		if got := shared.fetches(); len(got) != 1 || got[0] != (FetchArgs{Name: "static"}) {
			t.Fatalf("shared credential fetched %+v by Warm; want once, for no subject", got)
		}
		if got := perCaller.fetches(); len(got) != 0 {
			t.Fatalf("per-caller credential fetched %+v by Warm without a subject; want no fetch", got)
		}
		if delegCalls.Load() != 0 {
			t.Fatal("a delegated credential was fetched by Warm")
		}
		// The first request reuses the shared token and fetches its own per-caller one.
		get(t, m, Request{Name: "static", Subject: subjA})
		get(t, m, Request{Name: "idp", Subject: subjA})
		if n := len(shared.fetches()); n != 1 {
			t.Errorf("shared credential fetched %d times after the first request; want 1 (Warm's, reused)", n)
		}
		if got := perCaller.fetches(); len(got) != 1 || got[0].Subject != subjA {
			t.Errorf("per-caller fetches %+v; want one, for the request's subject", got)
		}
	})
	t.Run("for the workload's own subject", func(t *testing.T) {
		shared, perCaller := &recorder{shared: true}, &recorder{}
		m := NewManager(map[string]Provider{"static": shared, "idp": perCaller}, Options{})
		if err := m.Warm(context.Background(), WarmOptions{Subject: subjA}); err != nil {
			t.Fatalf("Warm: %v", err)
		}
		if got := perCaller.fetches(); len(got) != 1 || got[0] != (FetchArgs{Name: "idp", Subject: subjA}) {
			t.Fatalf("per-caller credential fetched %+v by Warm; want once, for %s", got, subjA)
		}
		// What the proxy asks for a request made as that subject: the warmed tokens, no fetch.
		warmed := get(t, m, Request{Name: "idp", Subject: subjA})
		get(t, m, Request{Name: "static", Subject: subjA})
		if n, ns := len(perCaller.fetches()), len(shared.fetches()); n != 1 || ns != 1 {
			t.Errorf("after the first request: %d per-caller and %d shared fetches; want 1 and 1 (Warm's, reused)", n, ns)
		}
		if warmed.Value() != "idp-token-1" {
			t.Errorf("the first request got %q; want Warm's token", warmed.Value())
		}
	})
}

func TestManager_GetHitDoesNotAllocate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, secretValue)
	m := NewManager(map[string]Provider{
		"env":  StaticEnvFrom("K", func(string) (string, bool) { return secretValue, true }),
		"file": StaticFile(path),
	}, Options{RecheckEvery: time.Hour})
	ctx := context.Background()
	m.Update(map[string]Provider{"env": (*m.entries.Load())["env"].p, "file": (*m.entries.Load())["file"].p, "idp": perSubject(nil)})
	for _, r := range []Request{
		{Name: "env"},
		{Name: "file"},
		{Name: "env", Subject: subjA, Scope: "s"}, // a static provider ignores the caller
		{Name: "idp", Subject: subjA, Scope: "s"}, // a per-caller provider's entry
	} {
		if _, err := m.Get(ctx, r); err != nil {
			t.Fatal(err)
		}
		if a := testing.AllocsPerRun(1000, func() { m.Get(ctx, r) }); a != 0 {
			t.Errorf("%+v: %v allocations per cache hit; want 0", r, a)
		}
	}
}
