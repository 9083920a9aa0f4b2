package credential

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/escrowproxy/escrow/config"
)

// Two delegation tokens as an agent presents them (compact JWS shape; the proxy verified them).
const (
	presentedAlice = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWFsaWNlLTAxMjM0NTY3"
	presentedBob   = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJlLWJvYi0wMTIzNDU2Nzg5"
)

// delegatedFunc is a Delegated provider.
type delegatedFunc func(ctx context.Context, args FetchArgs) (Token, error)

func (f delegatedFunc) Fetch(ctx context.Context, args FetchArgs) (Token, error) { return f(ctx, args) }
func (delegatedFunc) Delegated() bool                                            { return true }

func TestTokenExchange_TradesThePresentedTokenWithTheJWTSVIDAsActorPerRFC8693(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	const actorAud = "https://sts.example.com"
	u, ca, calls, last := oauthStandIn(t, func(r tokenRequest) (string, string) {
		f := r.form
		// RFC 8693 §2.1: subject_token and its type; actor_token and actor_token_type together.
		if f.Get("grant_type") != GrantTokenExchange || f.Get("subject_token_type") != TokenTypeJWT ||
			f.Get("actor_token_type") != TokenTypeJWT || f.Get("requested_token_type") != TokenTypeAccessToken {
			return "invalid_request", "token exchange fields"
		}
		if f.Get("subject_token") != presentedAlice {
			return "invalid_grant", "subject_token is not the presented token"
		}
		if sub, why := svids.verify(f.Get("actor_token"), actorAud); sub != subjA {
			return "invalid_grant", "actor token: " + why
		}
		return "", ""
	})
	p, err := NewProvider("onbehalf", config.Credential{TokenExchange: &config.TokenExchange{
		TokenURL: u, CAFile: ca, SubjectToken: &config.TokenSource{Delegation: &config.PresentedSubject{}},
		ActorToken:       &config.TokenSource{JWTSVID: &config.JWTSVID{Audience: actorAud}},
		SubjectTokenType: config.TokenTypeJWT, ActorTokenType: config.TokenTypeJWT, RequestedTokenType: config.TokenTypeAccessToken,
	}}, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := p.(Delegated); !ok || !d.Delegated() {
		t.Fatal("a token exchange of the presented token is not Delegated: the Manager would not key by it")
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "onbehalf", Subject: subjA, Delegation: presentedAlice})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != mintedToken || calls.Load() != 1 {
		t.Errorf("token %v after %d calls", tok, calls.Load())
	}

	// Never an exchange without the presented token.
	_, err = p.Fetch(context.Background(), FetchArgs{Name: "onbehalf", Subject: subjA})
	if err == nil || !strings.Contains(err.Error(), "no delegation token was presented") || calls.Load() != 1 {
		t.Errorf("fetch without a presented token: %v, %d calls; want a refusal and no call", err, calls.Load())
	}

	// Without actor_token, no actor fields, and no JWT-SVID source is needed at all.
	x, err := NewTokenExchange(TokenExchangeOptions{TokenURL: u, CAFile: ca, SubjectTokenPresented: true,
		SubjectTokenType: TokenTypeAccessToken}, testDeps(nil))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = x.Fetch(context.Background(), FetchArgs{Name: "x", Delegation: presentedBob})
	if f := last.Load().form; f.Get("subject_token") != presentedBob || f.Get("subject_token_type") != TokenTypeAccessToken || f.Has("actor_token") || f.Has("actor_token_type") {
		t.Errorf("form without actor_token: %v", f)
	}
}

func TestManager_KeysDelegatedTokensByThePresentedToken(t *testing.T) {
	var mu sync.Mutex
	var seen []Presented
	p := delegatedFunc(func(_ context.Context, a FetchArgs) (Token, error) {
		mu.Lock()
		seen = append(seen, a.Delegation)
		mu.Unlock()
		return NewToken(a.Name, "exchanged-for-"+string(a.Delegation)[len(a.Delegation)-8:], time.Now().Add(time.Hour)), nil
	})
	var plainCalls atomic.Int32
	plain := providerFunc(func(_ context.Context, a FetchArgs) (Token, error) {
		plainCalls.Add(1)
		if a.Delegation != "" {
			t.Errorf("a provider that does not trade the presented token was given it")
		}
		return NewToken(a.Name, "client-credentials", time.Now().Add(time.Hour)), nil
	})
	m := NewManager(map[string]Provider{"x": p, "plain": plain}, Options{})
	alice := get(t, m, Request{Name: "x", Subject: subjA, Delegation: presentedAlice})
	bob := get(t, m, Request{Name: "x", Subject: subjA, Delegation: presentedBob})
	again := get(t, m, Request{Name: "x", Subject: subjA, Delegation: presentedAlice})
	if alice.Value() == bob.Value() || again.Value() != alice.Value() {
		t.Errorf("alice %q, bob %q, alice again %q: want one exchange per presented token", alice.Value(), bob.Value(), again.Value())
	}
	if len(seen) != 2 || seen[0] != presentedAlice || seen[1] != presentedBob {
		t.Errorf("provider saw %v; want alice's then bob's token, once each", seen)
	}

	// No presented token: refused before the provider is asked.
	_, err := m.Get(context.Background(), Request{Name: "x", Subject: subjA})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no delegation token") || len(seen) != 2 {
		t.Errorf("Get without a presented token: %v (%d fetches); want ErrUnavailable and no fetch", err, len(seen))
	}
	// Warm skips it rather than reporting it broken.
	if err := m.Warm(context.Background(), WarmOptions{}); err != nil {
		t.Errorf("Warm: %v", err)
	}

	// A provider that does not trade it keeps one token per caller whatever the caller presents.
	get(t, m, Request{Name: "plain", Subject: subjA, Delegation: presentedAlice})
	get(t, m, Request{Name: "plain", Subject: subjA, Delegation: presentedBob})
	if n := plainCalls.Load(); n != 1 { // for subjA (Warm without a subject skips per-caller ones)
		t.Errorf("plain provider called %d times; want 1", n)
	}

	// ForgetKey drops exactly the key of the presented token.
	m.ForgetKey(Request{Name: "x", Subject: subjA, Delegation: presentedBob})
	get(t, m, Request{Name: "x", Subject: subjA, Delegation: presentedAlice})
	get(t, m, Request{Name: "x", Subject: subjA, Delegation: presentedBob})
	if len(seen) != 3 || seen[2] != presentedBob {
		t.Errorf("after ForgetKey(bob) the provider saw %v; want bob's fetched again only", seen)
	}
}

func TestPresented_NeverPrintsTheToken(t *testing.T) {
	r := Request{Name: "x", Subject: subjA, Delegation: presentedAlice}
	a := FetchArgs{Name: "x", Subject: subjA, Delegation: presentedAlice}
	var out []string
	for _, v := range []any{r, &r, a, &a, r.Delegation} {
		for _, f := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%T %v"} {
			out = append(out, fmt.Sprintf(f, v, v))
		}
		j, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, string(j))
	}
	var sb bytes.Buffer
	slog.New(slog.NewJSONHandler(&sb, nil)).Info("x", "req", r, "args", a, "tok", r.Delegation)
	out = append(out, sb.String(), r.Delegation.String(), r.Delegation.GoString())
	core, logs := observer.New(zapcore.DebugLevel)
	zap.New(core).Info("x", zap.Any("req", r), zap.Any("args", a), zap.Any("tok", r.Delegation), zap.Stringer("s", r.Delegation))
	for _, e := range logs.All() {
		j, _ := json.Marshal(e.ContextMap())
		out = append(out, fmt.Sprint(e.ContextMap()), string(j))
	}
	for _, s := range out {
		assertNoSecrets(t, "printed request", s, presentedAlice, strings.Split(presentedAlice, ".")[2])
	}
	if !strings.Contains(r.Delegation.String(), "sha256:") || Presented("").String() != "presented-token(none)" {
		t.Errorf("fingerprint %q", r.Delegation.String())
	}
}

// TestManager_PresentedTokenNeverReachesErrorsOrLogs exchanges the presented token at an IdP
// that echoes everything it receives, and scans Get's error and every log line for it.
func TestManager_PresentedTokenNeverReachesErrorsOrLogs(t *testing.T) {
	svids := newSVIDIssuer(t, subjA)
	var fail atomic.Bool
	fail.Store(true)
	u, ca, _, _ := oauthStandIn(t, func(r tokenRequest) (string, string) {
		if fail.Load() {
			return "invalid_grant", "bad grant " + r.form.Get("subject_token") + " " + r.form.Get("actor_token")
		}
		return "", ""
	})
	p, err := NewTokenExchange(TokenExchangeOptions{TokenURL: u, CAFile: ca, SubjectTokenPresented: true,
		ActorTokenAudience: "sts"}, testDeps(svids))
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	clock := newFakeClock()
	m := NewManager(map[string]Provider{"x": p}, Options{Logger: zap.New(core), Now: clock.Now})
	r := Request{Name: "x", Subject: subjA, Delegation: presentedAlice}
	_, err = m.Get(context.Background(), r)
	if err == nil {
		t.Fatal("no error from a refusing IdP")
	}
	secrets := append(svids.issuedTokens(), presentedAlice)
	assertNoSecrets(t, "Get's error", err.Error(), secrets...)
	assertNoSecrets(t, "Get's error", fmt.Sprintf("%+v %#v", err, err), secrets...)
	fail.Store(false)
	clock.Advance(time.Minute)
	tok := get(t, m, r)
	m.ForgetKey(r)
	m.waitBackground()
	if logs.Len() < 2 {
		t.Fatalf("%d log lines; want the failure and the fetch", logs.Len())
	}
	for _, e := range logs.All() {
		line := fmt.Sprintf("%s %v", e.Message, e.ContextMap())
		assertNoSecrets(t, "log line", line, append(svids.issuedTokens(), presentedAlice, tok.Value())...)
	}
}
