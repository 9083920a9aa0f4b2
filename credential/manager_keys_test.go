package credential

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// subjectProvider mints per caller, like the OAuth2 and STS providers will: the value names the
// key it was minted for and a per-provider sequence number. It counts fetches per key.
type subjectProvider struct {
	tag     string
	release chan struct{} // when non-nil, every Fetch waits for it to be closed

	mu    sync.Mutex
	calls map[FetchArgs]int
	total atomic.Int32
}

func perSubject(release chan struct{}) *subjectProvider {
	return &subjectProvider{tag: "tok", release: release, calls: map[FetchArgs]int{}}
}

func (p *subjectProvider) Fetch(ctx context.Context, a FetchArgs) (Token, error) {
	n := p.total.Add(1)
	p.mu.Lock()
	p.calls[a]++
	p.mu.Unlock()
	if p.release != nil {
		<-p.release
	}
	return NewToken(a.Name, fmt.Sprintf("%s|%s|%s|%d", p.tag, a.Subject, a.Scope, n), time.Time{}), nil
}

func (p *subjectProvider) callsFor(a FetchArgs) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls[a]
}

const (
	subjA = "spiffe://example.org/ns/agents/sa/coder"
	subjB = "spiffe://example.org/ns/agents/sa/reviewer"
)

func get(t testing.TB, m *Manager, r Request) Token {
	t.Helper()
	tok, err := m.Get(context.Background(), r)
	if err != nil {
		t.Fatalf("Get(%+v): %v", r, err)
	}
	return tok
}

func TestManager_KeysBySubjectAndScope(t *testing.T) {
	release := make(chan struct{})
	p := perSubject(release)
	m := NewManager(map[string]Provider{"idp": p}, Options{})
	keys := []Request{
		{Name: "idp", Subject: subjA},
		{Name: "idp", Subject: subjB},
		{Name: "idp", Subject: subjA, Scope: "repo:read"},
		{Name: "idp", Scope: "repo:read"},
		{Name: "idp"},
	}
	// Many concurrent callers per key on a cold cache: one fetch per key.
	const per = 50
	got := make([][]Token, len(keys))
	var wg sync.WaitGroup
	for i, r := range keys {
		got[i] = make([]Token, per)
		for j := range per {
			wg.Go(func() { got[i][j] = get(t, m, r) })
		}
	}
	// Wait for one fetch per key to start (bounded: fewer starting is a failure, not a hang).
	for deadline := time.Now().Add(2 * time.Second); p.total.Load() < int32(len(keys)) && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	close(release)
	wg.Wait()

	seen := map[string]bool{}
	for i, r := range keys {
		args := FetchArgs{Name: r.Name, Subject: r.Subject, Scope: r.Scope}
		if c := p.callsFor(args); c != 1 {
			t.Errorf("%+v: %d fetches; want 1", args, c)
		}
		want := "tok|" + r.Subject + "|" + r.Scope + "|"
		for _, tok := range got[i] {
			if !strings.HasPrefix(tok.Value(), want) || tok.ID() != got[i][0].ID() {
				t.Fatalf("%+v: got %q; want the one token minted for this key (%s...)", r, tok.Value(), want)
			}
		}
		if seen[got[i][0].ID()] {
			t.Errorf("%+v shares a token with another key", r)
		}
		seen[got[i][0].ID()] = true
		// Cached per key: no more fetches.
		if again := get(t, m, r); again.ID() != got[i][0].ID() {
			t.Errorf("%+v: second Get returned another token", r)
		}
	}
	if n := p.total.Load(); n != int32(len(keys)) {
		t.Errorf("%d fetches in all; want %d", n, len(keys))
	}
}

func TestManager_StaticProviderSharesOneEntryAcrossSubjects(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, secretValue)
	m := NewManager(map[string]Provider{
		"file": StaticFile(path),
		"env":  StaticEnvFrom("K", func(string) (string, bool) { return secretValue, true }),
	}, Options{RecheckEvery: time.Hour})
	first := get(t, m, Request{Name: "file", Subject: subjA, Scope: "x"})
	// Had any later Get read the file again, it would fail: the file is gone.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		for _, name := range []string{"file", "env"} {
			r := Request{Name: name, Subject: fmt.Sprintf("spiffe://example.org/agent/%d", i), Scope: fmt.Sprint(i % 3)}
			if tok := get(t, m, r); tok.Value() != secretValue || (name == "file" && tok.ID() != first.ID()) {
				t.Fatalf("%+v: %v", r, tok)
			}
		}
	}
	for _, name := range []string{"file", "env"} {
		e := (*m.entries.Load())[name]
		if n := len(*e.keys.Load()); n != 0 || e.one.state.Load() == nil {
			t.Errorf("%s: %d per-subject entries; want 0 and the one shared entry", name, n)
		}
	}
}

func TestManager_SubjectEntriesAreBounded(t *testing.T) {
	clock := newFakeClock()
	p := perSubject(nil)
	m := NewManager(map[string]Provider{"idp": p}, Options{Now: clock.Now, MaxKeysPerName: 3})
	req := func(s string) Request { return Request{Name: "idp", Subject: "spiffe://example.org/" + s} }
	use := func(s string) Token { clock.Advance(time.Second); return get(t, m, req(s)) }
	s1 := use("s1")
	use("s2")
	use("s3")
	use("s1") // s2 is now the least recently used
	use("s4") // evicts s2
	e := (*m.entries.Load())["idp"]
	if n := len(*e.keys.Load()); n != 3 {
		t.Fatalf("%d entries; want the bound, 3", n)
	}
	if got := use("s1"); got.ID() != s1.ID() || p.total.Load() != 4 {
		t.Errorf("recently used s1 refetched (%d fetches)", p.total.Load())
	}
	use("s2")
	if c := p.callsFor(FetchArgs{Name: "idp", Subject: req("s2").Subject}); c != 2 {
		t.Errorf("s2 fetched %d times; want 2 (evicted as least recently used, then fetched again)", c)
	}
	// Many subjects: never more than the bound.
	for i := range 1000 {
		use(fmt.Sprint("many-", i))
		if n := len(*e.keys.Load()); n > 3 {
			t.Fatalf("after %d subjects: %d entries", i, n)
		}
	}
	// The default bound applies when unset.
	if NewManager(nil, Options{}).maxKeys != DefaultMaxKeysPerName {
		t.Errorf("default MaxKeysPerName not applied")
	}
}

func TestManager_ForgetDropsEverySubject(t *testing.T) {
	p := perSubject(nil)
	m := NewManager(map[string]Provider{"idp": p}, Options{})
	for _, r := range []Request{{Name: "idp"}, {Name: "idp", Subject: subjA}, {Name: "idp", Subject: subjB, Scope: "s"}} {
		get(t, m, r)
		m.Forget("idp")
		get(t, m, r)
		if c := p.callsFor(FetchArgs{Name: r.Name, Subject: r.Subject, Scope: r.Scope}); c != 2 {
			t.Errorf("%+v: %d fetches; want 2 (Forget dropped it)", r, c)
		}
	}
}

// seqProvider is a comparable (pointer) provider that mints "<tag>-<n>" and counts its fetches.
type seqProvider struct {
	tag     string
	n       atomic.Int32
	started chan struct{} // when non-nil, receives once per Fetch before it waits on release
	release chan struct{}
}

func (p *seqProvider) Fetch(ctx context.Context, a FetchArgs) (Token, error) {
	n := p.n.Add(1)
	if p.started != nil {
		p.started <- struct{}{}
	}
	if p.release != nil {
		<-p.release
	}
	return NewToken(a.Name, fmt.Sprintf("%s-%d", p.tag, n), time.Time{}), nil
}

func TestManager_UpdateKeepsUnchangedProviders(t *testing.T) {
	a, b, c := &seqProvider{tag: "a"}, &seqProvider{tag: "b"}, &seqProvider{tag: "c"}
	m := NewManager(map[string]Provider{"a": a, "b": b}, Options{})
	ta := get(t, m, Request{Name: "a"})
	tb := get(t, m, Request{Name: "b", Subject: subjA})
	m.Update(map[string]Provider{"a": a, "b": b, "c": c})
	if got := get(t, m, Request{Name: "a"}); got.ID() != ta.ID() || a.n.Load() != 1 {
		t.Errorf("a: %q after %d fetches; want the cached token", got.Value(), a.n.Load())
	}
	if got := get(t, m, Request{Name: "b", Subject: subjA}); got.ID() != tb.ID() || b.n.Load() != 1 {
		t.Errorf("b: %q after %d fetches; want the cached per-subject token", got.Value(), b.n.Load())
	}
	if got := get(t, m, Request{Name: "c"}); got.Value() != "c-1" {
		t.Errorf("new name c: %q", got.Value())
	}
	if got := m.Names(); strings.Join(got, ",") != "a,b,c" {
		t.Errorf("Names() = %v", got)
	}
}

func TestManager_UpdateDropsRemovedAndChanged(t *testing.T) {
	a1, a2, b := &seqProvider{tag: "a1"}, &seqProvider{tag: "a2"}, &seqProvider{tag: "b"}
	m := NewManager(map[string]Provider{"a": a1, "b": b}, Options{})
	get(t, m, Request{Name: "a"})
	get(t, m, Request{Name: "b", Subject: subjA})
	oldA, oldB := (*m.entries.Load())["a"], (*m.entries.Load())["b"]
	m.Update(map[string]Provider{"a": a2})
	// The replaced and removed entries let go of their tokens at once.
	if oldA.one.state.Load() != nil || len(*oldB.keys.Load()) != 0 {
		t.Errorf("a replaced or removed credential still holds its tokens")
	}
	if got := get(t, m, Request{Name: "a"}); got.Value() != "a2-1" {
		t.Errorf("changed provider: %q; want a fresh token from the new provider", got.Value())
	}
	if _, err := m.Get(context.Background(), Request{Name: "b"}); !errors.Is(err, ErrUnknown) {
		t.Errorf("removed name: %v; want ErrUnknown", err)
	}
	// Re-adding the same provider value after a removal starts empty.
	m.Update(map[string]Provider{"a": a2, "b": b})
	if got := get(t, m, Request{Name: "b"}); got.Value() != "b-2" {
		t.Errorf("re-added name: %q; want a new fetch", got.Value())
	}
	// Providers that cannot be compared (funcs) count as changed, and Update does not panic.
	fp := providerFunc(func(ctx context.Context, a FetchArgs) (Token, error) { return NewToken(a.Name, "f", time.Time{}), nil })
	m.Update(map[string]Provider{"f": fp})
	get(t, m, Request{Name: "f"})
	m.Update(map[string]Provider{"f": fp, "nil": nil})
	if _, err := m.Get(context.Background(), Request{Name: "nil"}); !errors.Is(err, ErrUnknown) {
		t.Errorf("nil provider: %v; want ErrUnknown", err)
	}
}

func TestManager_UpdateDiscardsFetchInFlight(t *testing.T) {
	for _, tc := range []struct {
		name string
		next func(old *seqProvider) map[string]Provider
	}{
		{"removed then re-added", func(old *seqProvider) map[string]Provider { return map[string]Provider{"k": old} }},
		{"changed", func(*seqProvider) map[string]Provider { return map[string]Provider{"k": &seqProvider{tag: "new"}} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old := &seqProvider{tag: "old", started: make(chan struct{}, 1), release: make(chan struct{})}
			m := NewManager(map[string]Provider{"k": old}, Options{})
			done := make(chan Token)
			go func() { tok, _ := m.Get(context.Background(), Request{Name: "k"}); done <- tok }()
			<-old.started
			if tc.name == "removed then re-added" {
				m.Update(nil)
			}
			next := tc.next(old)
			m.Update(next)
			old.started = nil
			close(old.release)
			if tok := <-done; tok.Value() != "old-1" {
				t.Errorf("the waiter got %q; want the in-flight fetch's result", tok.Value())
			}
			got := get(t, m, Request{Name: "k"})
			if got.Value() == "old-1" {
				t.Errorf("the in-flight fetch of the replaced entry was stored")
			}
		})
	}
}

// TestManager_GetDuringUpdate hammers Get while Update swaps sets. A name present in every set
// never errors, and every token comes from a provider of the old or the new set.
func TestManager_GetDuringUpdate(t *testing.T) {
	keep := &seqProvider{tag: "keep"}
	swapA, swapB := perSubject(nil), perSubject(nil)
	swapA.tag, swapB.tag = "A", "B"
	sets := []map[string]Provider{
		{"keep": keep, "swap": swapA, "flaky": &seqProvider{tag: "flaky"}},
		{"keep": keep, "swap": swapB},
		{"keep": keep, "swap": swapA},
	}
	m := NewManager(sets[0], Options{MaxKeysPerName: 4})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var gets atomic.Int64
	for g := range 8 {
		wg.Go(func() {
			ctx := context.Background()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				// keep's 3 subjects fit its bound of 4; swap's 6 do not, so it also evicts.
				tok, err := m.Get(ctx, Request{Name: "keep", Subject: fmt.Sprintf("spiffe://example.org/agent/%d", (g+i)%3)})
				if err != nil || !strings.HasPrefix(tok.Value(), "keep-") {
					t.Errorf("keep: %q, %v", tok.Value(), err)
					return
				}
				subject := fmt.Sprintf("spiffe://example.org/agent/%d", (g+i)%6)
				tok, err = m.Get(ctx, Request{Name: "swap", Subject: subject})
				if err != nil || !(strings.HasPrefix(tok.Value(), "A|"+subject+"|") || strings.HasPrefix(tok.Value(), "B|"+subject+"|")) {
					t.Errorf("swap: %q, %v", tok.Value(), err)
					return
				}
				if _, err := m.Get(ctx, Request{Name: "flaky"}); err != nil && !errors.Is(err, ErrUnknown) {
					t.Errorf("flaky: %v", err)
					return
				}
				if i%16 == 0 {
					m.Forget("swap")
				}
				gets.Add(1)
			}
		})
	}
	for i := range 2000 {
		m.Update(sets[i%len(sets)])
		if i%100 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	close(stop)
	wg.Wait()
	if gets.Load() == 0 {
		t.Fatal("no Get ran during the updates")
	}
	if keep.n.Load() != 3 {
		t.Errorf("keep was fetched %d times for 3 subjects; an unchanged provider keeps its tokens across updates", keep.n.Load())
	}
}

func TestManager_MultiPartTokens(t *testing.T) {
	parts := map[string]string{"access_key_id": "AKIDEXAMPLE", "secret_access_key": secretValue, "session_token": "FwoGZXIvYXdzEXAMPLE"}
	for name, c := range map[string]struct {
		parts map[string]string
		ok    bool
	}{
		"good":       {parts, true},
		"no parts":   {map[string]string{}, false},
		"empty part": {map[string]string{"access_key_id": "AKID", "secret_access_key": ""}, false},
		"CRLF part":  {map[string]string{"access_key_id": "AKID", "secret_access_key": "sk-abc\r\nX-Injected: 1"}, false},
	} {
		p := providerFunc(func(context.Context, FetchArgs) (Token, error) {
			return NewTokenParts("provider's own name", c.parts, time.Time{}), nil
		})
		m := NewManager(map[string]Provider{"s3": p}, Options{})
		tok, err := m.Get(context.Background(), Request{Name: "s3", Subject: subjA})
		if !c.ok {
			if !errors.Is(err, ErrUnavailable) || strings.Contains(err.Error(), "sk-abc") || strings.Contains(err.Error(), "AKID") {
				t.Errorf("%s: %v; want ErrUnavailable without any part", name, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := NewTokenParts("s3", parts, time.Time{})
		if tok.Name() != "s3" || tok.ID() != want.ID() || tok.Part("secret_access_key") != secretValue ||
			tok.Part("session_token") != parts["session_token"] || tok.Value() != "" {
			t.Errorf("%s: %v parts lost or misnamed in the Manager", name, tok)
		}
	}
}
