package credential

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/internal/fakeclock"
)

// tokenServer is a token endpoint that mints "<subject>#<n>" tokens living `life` on the
// test's clock, counts the requests it serves per subject, can hold them until released and
// can be taken down. The counts are what reached the server: the ground truth for "one fetch
// per key".
type tokenServer struct {
	t     *testing.T
	clock *fakeclock.Clock
	life  time.Duration
	srv   *httptest.Server

	down    atomic.Bool
	hold    atomic.Pointer[chan struct{}] // when set, requests wait for it to be closed
	arrived chan string                   // subject of every request, when non-nil

	mu     sync.Mutex
	counts map[string]int
	total  int
}

func newTokenServer(t *testing.T, clock *fakeclock.Clock, life time.Duration) *tokenServer {
	ts := &tokenServer{t: t, clock: clock, life: life, counts: map[string]int{}}
	ts.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sub := r.URL.Query().Get("sub")
		ts.mu.Lock()
		ts.counts[sub]++
		ts.total++
		n := ts.total
		ts.mu.Unlock()
		if ts.arrived != nil {
			ts.arrived <- sub
		}
		if h := ts.hold.Load(); h != nil {
			<-*h
		}
		if ts.down.Load() {
			http.Error(w, `{"error":"temporarily_unavailable"}`, http.StatusServiceUnavailable)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{
			"access_token": fmt.Sprintf("%s#%d", sub, n),
			"expires_at":   ts.clock.Now().Add(ts.life).UnixNano(),
		})
	}))
	t.Cleanup(ts.srv.Close)
	return ts
}

func (ts *tokenServer) count(sub string) int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.counts[sub]
}

func (ts *tokenServer) totalCount() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.total
}

// provider returns a per-caller Provider that asks the server for a token for args.Subject.
func (ts *tokenServer) provider() Provider {
	return providerFunc(func(ctx context.Context, a FetchArgs) (Token, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ts.srv.URL+"/token?sub="+url.QueryEscape(a.Subject), nil)
		resp, err := ts.srv.Client().Do(req)
		if err != nil {
			return Token{}, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return Token{}, fmt.Errorf("token endpoint answered %d", resp.StatusCode)
		}
		var body struct {
			AccessToken string `json:"access_token"`
			ExpiresAt   int64  `json:"expires_at"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			return Token{}, err
		}
		return NewToken(a.Name, body.AccessToken, time.Unix(0, body.ExpiresAt)), nil
	})
}

func TestManager_ThousandConcurrentGetsOnAColdCacheMakeOneFetchPerKey(t *testing.T) {
	clock := newFakeClock()
	ts := newTokenServer(t, clock, time.Hour)
	hold := make(chan struct{})
	ts.hold.Store(&hold)
	m := NewManager(map[string]Provider{"idp": ts.provider()}, Options{Now: clock.Now})

	subjects := []string{subjA, subjB, "spiffe://example.org/ns/agents/sa/planner", "spiffe://example.org/ns/agents/sa/tester"}
	const n = 1000
	var wg sync.WaitGroup
	got := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			tok, err := m.Get(context.Background(), Request{Name: "idp", Subject: subjects[i%len(subjects)]})
			got[i], errs[i] = tok.Value(), err
		})
	}
	// Every key's one fetch is held at the server while the other callers pile up behind it.
	for ts.totalCount() < len(subjects) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	close(hold)
	wg.Wait()
	for _, s := range subjects {
		if c := ts.count(s); c != 1 {
			t.Errorf("%s: %d requests reached the token endpoint for %d concurrent Gets; want 1", s, c, n/len(subjects))
		}
	}
	for i := range n {
		if errs[i] != nil || !strings.HasPrefix(got[i], subjects[i%len(subjects)]+"#") {
			t.Fatalf("Get %d for %s: %q, %v", i, subjects[i%len(subjects)], got[i], errs[i])
		}
	}
}

func TestManager_TwoIdentitiesNeverGetEachOthersToken(t *testing.T) {
	clock := newFakeClock()
	ts := newTokenServer(t, clock, time.Hour)
	m := NewManager(map[string]Provider{"idp": ts.provider()}, Options{Now: clock.Now})
	var wg sync.WaitGroup
	var wrong atomic.Int32
	for i := range 400 {
		wg.Go(func() {
			sub := []string{subjA, subjB}[i%2]
			if i%50 == 0 {
				m.ForgetSubject(sub) // refetches interleaved with hits
			}
			tok, err := m.Get(context.Background(), Request{Name: "idp", Subject: sub})
			if errors.Is(err, errDropped) {
				return // a fetch killed by ForgetSubject: no token at all, as it should
			}
			if err != nil || !strings.HasPrefix(tok.Value(), sub+"#") {
				wrong.Add(1)
			}
		})
	}
	wg.Wait()
	if wrong.Load() != 0 {
		t.Errorf("%d Gets got no token or another identity's token", wrong.Load())
	}
}

func TestManager_RefreshesAheadOfExpiryWithoutMakingRequestsWait(t *testing.T) {
	clock := newFakeClock()
	ts := newTokenServer(t, clock, 10*time.Minute)
	m := NewManager(map[string]Provider{"idp": ts.provider()}, Options{Now: clock.Now})
	r := Request{Name: "idp", Subject: subjA}
	first := get(t, m, r)

	// With 2m01s left (more than a fifth of 10m) nothing is refreshed.
	clock.Advance(7*time.Minute + 59*time.Second)
	get(t, m, r)
	m.waitBackground()
	if c := ts.count(subjA); c != 1 {
		t.Fatalf("%d fetches with more than a fifth of the lifetime left; want 1", c)
	}

	// Inside the window: the refresh is held at the server, and requests still get the old
	// token at once, without waiting on it.
	hold := make(chan struct{})
	ts.hold.Store(&hold)
	clock.Advance(2 * time.Second)
	for range 100 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		tok, err := m.Get(ctx, r)
		cancel()
		if err != nil || tok.ID() != first.ID() {
			t.Fatalf("during the refresh: %v, %v; want the still-valid token at once", tok, err)
		}
	}
	for ts.count(subjA) < 2 {
		time.Sleep(time.Millisecond)
	}
	ts.hold.Store(nil)
	close(hold)
	m.waitBackground()
	if got := get(t, m, r); got.ID() == first.ID() || ts.count(subjA) != 2 {
		t.Errorf("after the refresh: %v after %d fetches; want a new token after exactly one refresh", got, ts.count(subjA))
	}
}

func TestManager_RefreshesWithSixtySecondsLeftWhateverTheLifetime(t *testing.T) {
	clock := newFakeClock()
	p, calls := counting(clock, 4*time.Minute) // a fifth is 48s: the 60s rule comes first
	m := NewManager(map[string]Provider{"k": p}, Options{Now: clock.Now})
	mustGet(t, m, "k")
	clock.Advance(2*time.Minute + 59*time.Second) // 61s left
	mustGet(t, m, "k")
	m.waitBackground()
	if calls.Load() != 1 {
		t.Fatalf("refreshed with 61s left")
	}
	clock.Advance(2 * time.Second) // 59s left
	mustGet(t, m, "k")
	m.waitBackground()
	if calls.Load() != 2 {
		t.Errorf("not refreshed with 59s left (%d fetches)", calls.Load())
	}

	// A token shorter than two minutes is refreshed half-way, not on every request.
	clock2 := newFakeClock()
	p2, calls2 := counting(clock2, 30*time.Second)
	m2 := NewManager(map[string]Provider{"k": p2}, Options{Now: clock2.Now})
	mustGet(t, m2, "k")
	clock2.Advance(14 * time.Second)
	mustGet(t, m2, "k")
	m2.waitBackground()
	if calls2.Load() != 1 {
		t.Errorf("30s token refreshed after 14s")
	}
	clock2.Advance(2 * time.Second)
	mustGet(t, m2, "k")
	m2.waitBackground()
	if calls2.Load() != 2 {
		t.Errorf("30s token not refreshed after 16s")
	}
}

func TestManager_OutageAfterCachingServesUntilExpiryThenFails(t *testing.T) {
	clock := newFakeClock()
	ts := newTokenServer(t, clock, 10*time.Minute)
	m := NewManager(map[string]Provider{"idp": ts.provider()}, Options{Now: clock.Now})
	r := Request{Name: "idp", Subject: subjA}
	first := get(t, m, r)
	ts.down.Store(true)
	for elapsed := 8 * time.Minute; elapsed < 10*time.Minute; elapsed += 10 * time.Second {
		clock.Set(first.ExpiresAt().Add(elapsed - 10*time.Minute))
		if tok := get(t, m, r); tok.ID() != first.ID() {
			t.Fatalf("at %v: another token %v during the outage", elapsed, tok)
		}
		m.waitBackground()
	}
	if ts.count(subjA) < 2 {
		t.Fatalf("no refresh was attempted during the outage")
	}
	clock.Set(first.ExpiresAt())
	tok, err := m.Get(context.Background(), r)
	if !errors.Is(err, ErrUnavailable) || !tok.IsZero() {
		t.Fatalf("at expiry during the outage: %v, %v; want ErrUnavailable and never the expired token", tok, err)
	}
	// Back up: the next attempt after the backoff succeeds.
	ts.down.Store(false)
	clock.Advance(DefaultMaxBackoff * 2)
	if tok := get(t, m, r); tok.ID() == first.ID() {
		t.Errorf("after recovery: the expired token again")
	}
}

func TestManager_ConsecutiveFailuresBackOffExponentiallyWithJitter(t *testing.T) {
	clock := newFakeClock()
	var calls atomic.Int32
	p := providerFunc(func(context.Context, FetchArgs) (Token, error) {
		calls.Add(1)
		return Token{}, errors.New("down")
	})
	jitter := 0.5
	m := NewManager(map[string]Provider{"k": p}, Options{
		Now: clock.Now, FailureBackoff: time.Second, MaxBackoff: 8 * time.Second,
		Rand: func() float64 { return jitter },
	})
	// Backoffs: 1s, 2s, 4s, 8s, 8s (capped), each stretched by 1 + 0.5*0.5 = 1.25.
	for i, base := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 8 * time.Second} {
		m.Get(context.Background(), Request{Name: "k"})
		if c := calls.Load(); c != int32(i+1) {
			t.Fatalf("failure %d: %d calls", i+1, c)
		}
		wait := base + base/4
		clock.Advance(wait - time.Millisecond)
		m.Get(context.Background(), Request{Name: "k"})
		if c := calls.Load(); c != int32(i+1) {
			t.Fatalf("failure %d: retried before its backoff of %v", i+1, wait)
		}
		clock.Advance(time.Millisecond)
	}
}

// revokingProvider mints per caller and records what it is asked to revoke.
type revokingProvider struct {
	*subjectProvider
	mu      sync.Mutex
	revoked []string // token values
}

func (p *revokingProvider) Revoke(ctx context.Context, tok Token) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.revoked = append(p.revoked, tok.Value())
	return nil
}

func (p *revokingProvider) revokedValues() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.revoked...)
}

func TestManager_ForgetSubjectDropsAndRevokesEveryTokenOfThatIdentity(t *testing.T) {
	gh := &revokingProvider{subjectProvider: perSubject(nil)}
	idp := perSubject(nil)
	m := NewManager(map[string]Provider{
		"github": gh, "idp": idp,
		"openai": StaticEnvFrom("K", func(string) (string, bool) { return secretValue, true }),
	}, Options{})
	aGH := get(t, m, Request{Name: "github", Subject: subjA, Scope: "contents:read"})
	get(t, m, Request{Name: "github", Subject: subjA, Scope: "issues:write"})
	bGH := get(t, m, Request{Name: "github", Subject: subjB, Scope: "contents:read"})
	get(t, m, Request{Name: "idp", Subject: subjA})
	get(t, m, Request{Name: "idp", Subject: subjB})
	get(t, m, Request{Name: "openai", Subject: subjA})

	if n := m.ForgetSubject(subjA); n != 3 {
		t.Errorf("ForgetSubject dropped %d tokens; want 3 (two github scopes, one idp)", n)
	}
	m.waitBackground()
	rev := gh.revokedValues()
	if len(rev) != 2 || !strings.Contains(strings.Join(rev, ","), aGH.Value()) {
		t.Errorf("revoked %q; want both of A's github tokens", rev)
	}
	for _, v := range rev {
		if strings.Contains(v, subjB) {
			t.Errorf("B's token %q revoked", v)
		}
	}
	// B keeps its tokens; A's are fetched again.
	if got := get(t, m, Request{Name: "github", Subject: subjB, Scope: "contents:read"}); got.ID() != bGH.ID() {
		t.Errorf("B's token was dropped")
	}
	get(t, m, Request{Name: "github", Subject: subjA, Scope: "contents:read"})
	if c := gh.callsFor(FetchArgs{Name: "github", Subject: subjA, Scope: "contents:read"}); c != 2 {
		t.Errorf("A's github token fetched %d times; want 2", c)
	}
	if c := idp.callsFor(FetchArgs{Name: "idp", Subject: subjB}); c != 1 {
		t.Errorf("B's idp token refetched")
	}
	if m.ForgetSubject("") != 0 {
		t.Errorf("ForgetSubject(\"\") dropped something")
	}
}

func TestManager_ForgetKeyDropsOneKey(t *testing.T) {
	gh := &revokingProvider{subjectProvider: perSubject(nil)}
	m := NewManager(map[string]Provider{"github": gh}, Options{})
	read := Request{Name: "github", Subject: subjA, Scope: "contents:read"}
	write := Request{Name: "github", Subject: subjA, Scope: "contents:write"}
	r1, w1 := get(t, m, read), get(t, m, write)
	m.ForgetKey(read)
	m.waitBackground()
	if rev := gh.revokedValues(); len(rev) != 1 || rev[0] != r1.Value() {
		t.Errorf("revoked %q; want only the read token", rev)
	}
	if get(t, m, read).ID() == r1.ID() || get(t, m, write).ID() != w1.ID() {
		t.Errorf("ForgetKey did not drop exactly one key")
	}
}

func TestManager_CloseRevokesEveryHeldTokenAndRefusesGets(t *testing.T) {
	gh := &revokingProvider{subjectProvider: perSubject(nil)}
	m := NewManager(map[string]Provider{"github": gh}, Options{})
	a := get(t, m, Request{Name: "github", Subject: subjA})
	b := get(t, m, Request{Name: "github", Subject: subjB})
	if err := m.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	rev := strings.Join(gh.revokedValues(), ",")
	if !strings.Contains(rev, a.Value()) || !strings.Contains(rev, b.Value()) {
		t.Errorf("revoked %q on Close; want both tokens", rev)
	}
	if _, err := m.Get(context.Background(), Request{Name: "github", Subject: subjA}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Get after Close: %v; want ErrUnavailable", err)
	}
	m.Update(map[string]Provider{"github": gh})
	if _, err := m.Get(context.Background(), Request{Name: "github", Subject: subjA}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Update after Close revived the manager: %v", err)
	}
}

// recordingObserver records what the Manager reports.
type recordingObserver struct {
	mu      sync.Mutex
	fetches map[string]int // "provider/ok"
	expires map[string]time.Time
}

func (o *recordingObserver) Fetched(p string, ok bool, d time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.fetches[fmt.Sprintf("%s/%t", p, ok)]++
}

func (o *recordingObserver) Expires(c string, at time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.expires[c] = at
}

type kindProvider struct {
	Provider
	kind string
}

func (k kindProvider) Kind() string { return k.kind }

func TestManager_ObserverCountsFetchesNotHits(t *testing.T) {
	clock := newFakeClock()
	obs := &recordingObserver{fetches: map[string]int{}, expires: map[string]time.Time{}}
	ok, _ := counting(clock, time.Hour)
	fail := providerFunc(func(context.Context, FetchArgs) (Token, error) { return Token{}, errors.New("down") })
	m := NewManager(map[string]Provider{
		"idp":    kindProvider{ok, "oauth2"},
		"broken": kindProvider{fail, "aws"},
	}, Options{Now: clock.Now, Observer: obs})
	for range 10 {
		get(t, m, Request{Name: "idp", Subject: subjA})
		get(t, m, Request{Name: "idp", Subject: subjB})
		m.Get(context.Background(), Request{Name: "broken", Subject: subjA})
	}
	obs.mu.Lock()
	if obs.fetches["oauth2/true"] != 2 || obs.fetches["aws/false"] != 1 || len(obs.fetches) != 2 {
		t.Errorf("fetches %v; want oauth2 success 2 (one per key), aws error 1 (then backoff)", obs.fetches)
	}
	if !obs.expires["idp"].Equal(clock.Now().Add(time.Hour)) {
		t.Errorf("expiry of idp: %v", obs.expires["idp"])
	}
	obs.mu.Unlock()
	if m.Len() != 2 {
		t.Errorf("Len %d; want 2 cached tokens", m.Len())
	}
	if m.Kind("idp") != "oauth2" || m.Kind("nope") != "" || KindOf(ok) != "custom" {
		t.Errorf("Kind: %q %q %q", m.Kind("idp"), m.Kind("nope"), KindOf(ok))
	}
	m.ForgetSubject(subjA)
	if m.Len() != 1 {
		t.Errorf("Len after dropping A: %d; want 1", m.Len())
	}
}

func TestManager_ForgetSubjectFailsAFetchInFlightAndRevokesItsToken(t *testing.T) {
	release := make(chan struct{})
	gh := &revokingProvider{subjectProvider: perSubject(release)}
	m := NewManager(map[string]Provider{"github": gh}, Options{})
	done := make(chan error)
	go func() {
		_, err := m.Get(context.Background(), Request{Name: "github", Subject: subjA})
		done <- err
	}()
	for gh.total.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	m.ForgetSubject(subjA) // the kill switch, while A's token is being minted
	close(release)
	if err := <-done; !errors.Is(err, ErrUnavailable) {
		t.Fatalf("the waiter got %v; want ErrUnavailable (killed while fetching)", err)
	}
	m.waitBackground()
	if rev := gh.revokedValues(); len(rev) != 1 || !strings.Contains(rev[0], subjA) {
		t.Errorf("revoked %q; want the token minted during the kill", rev)
	}
	if m.Len() != 0 {
		t.Errorf("%d tokens cached after the kill", m.Len())
	}
}
