package credential

import (
	"context"
	"net/http"
	"path/filepath"
	"testing"
	"time"
)

func BenchmarkManagerGet_Hit(b *testing.B) {
	m := NewManager(map[string]Provider{
		"openai": StaticEnvFrom("K", func(string) (string, bool) { return secretValue, true }),
	}, Options{})
	ctx := context.Background()
	mustGet(b, m, "openai")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Get(ctx, Request{Name: "openai"}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkManagerGet_HitFile is a hit on a file-backed credential: one os.Stat per second.
func BenchmarkManagerGet_HitFile(b *testing.B) {
	path := filepath.Join(b.TempDir(), "key")
	writeFile(b, path, secretValue)
	m := NewManager(map[string]Provider{"openai": StaticFile(path)}, Options{})
	ctx := context.Background()
	if _, err := m.Get(ctx, Request{Name: "openai"}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Get(ctx, Request{Name: "openai"}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkManagerGet_HitParallel(b *testing.B) {
	m := NewManager(map[string]Provider{
		"openai": StaticEnvFrom("K", func(string) (string, bool) { return secretValue, true }),
	}, Options{})
	ctx := context.Background()
	if _, err := m.Get(ctx, Request{Name: "openai"}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := m.Get(ctx, Request{Name: "openai"}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkManagerGet_HitSubject is a hit on a per-caller provider's (Subject, Scope) entry.
func BenchmarkManagerGet_HitSubject(b *testing.B) {
	m := NewManager(map[string]Provider{"idp": perSubject(nil)}, Options{})
	ctx := context.Background()
	r := Request{Name: "idp", Subject: "spiffe://example.org/ns/agents/sa/coder", Scope: "read"}
	if _, err := m.Get(ctx, r); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Get(ctx, r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkApply_Header(b *testing.B) {
	a := mustApplier(b, bearer)
	tok := NewToken("openai", secretValue, time.Time{})
	r, _ := http.NewRequest(http.MethodPost, "https://api.openai.com/v1/chat/completions", nil)
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Accept", "text/event-stream")
	r.Header.Set("User-Agent", "agent/1.0")
	r.Header.Set("X-Request-Id", "0f3c")
	agent := []string{"Bearer agent-fake"}
	b.ReportAllocs()
	for b.Loop() {
		r.Header["Authorization"] = agent // what the agent sent
		if err := a.Apply(r, tok); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkApply_Query(b *testing.B) {
	a := mustApplier(b, queryK)
	tok := NewToken("maps", secretValue, time.Time{})
	r, _ := http.NewRequest(http.MethodGet, "https://maps.example.com/geo?address=1600+Amphitheatre&key=agent&lang=en", nil)
	raw := r.URL.RawQuery
	b.ReportAllocs()
	for b.Loop() {
		r.URL.RawQuery = raw
		if err := a.Apply(r, tok); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkManagerGet_HitEphemeral is a hit on an expiring per-caller token (OAuth2, STS, ...):
// compare with BenchmarkManagerGet_Hit, a static secret's hit, in the same run.
func BenchmarkManagerGet_HitEphemeral(b *testing.B) {
	exp := time.Now().Add(time.Hour)
	p := providerFunc(func(ctx context.Context, a FetchArgs) (Token, error) {
		return NewToken(a.Name, secretValue, exp), nil
	})
	m := NewManager(map[string]Provider{"idp": p}, Options{})
	ctx := context.Background()
	r := Request{Name: "idp", Subject: "spiffe://example.org/ns/agents/sa/coder"}
	if _, err := m.Get(ctx, r); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Get(ctx, r); err != nil {
			b.Fatal(err)
		}
	}
}
