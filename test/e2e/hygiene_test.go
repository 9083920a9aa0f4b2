package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
)

// recorder keeps everything the suite saw: each client's output, headers and bodies, every
// audit and ops line escrow wrote, every /metrics and /readyz answer. Secret hygiene is checked
// against it.
type recorder struct {
	mu    sync.Mutex
	items []seenItem
	// parent also gets every item (the run-wide recorder).
	parent *recorder
}

type seenItem struct {
	what string
	data string
}

// everything is the run-wide recorder, checked once more after all tests.
var everything = &recorder{}

func newRecorder() *recorder { return &recorder{parent: everything} }

func (r *recorder) add(what string, data []byte) {
	if len(data) == 0 {
		return
	}
	for ; r != nil; r = r.parent {
		r.mu.Lock()
		r.items = append(r.items, seenItem{what, string(data)})
		r.mu.Unlock()
	}
}

// secrets are every secret value configured in this run, by name: escrow holds them, nobody
// else may ever see them.
var secrets = struct {
	mu sync.Mutex
	m  map[string]string
}{m: map[string]string{}}

// newSecret makes a random secret, registered for the hygiene check.
func newSecret(name string) string {
	v := "sk-" + strings.ReplaceAll(name, " ", "-") + "-" + randomHex(20)
	secrets.mu.Lock()
	secrets.m[name] = v
	secrets.mu.Unlock()
	return v
}

// secretNeedles are the secret values and pieces of them: a leak of half a secret is a leak.
func secretNeedles() map[string]string {
	secrets.mu.Lock()
	defer secrets.mu.Unlock()
	n := map[string]string{}
	for name, s := range secrets.m {
		n[s] = name
		// The random part, in halves (the "sk-<name>-" prefix alone is not secret).
		i := strings.LastIndex(s, "-") + 1
		r := s[i:]
		n[r[:len(r)/2]] = name + " (first half)"
		n[r[len(r)/2:]] = name + " (second half)"
	}
	return n
}

// findSecrets lists every place a configured secret (or half of one) appears.
func (r *recorder) findSecrets() []string {
	r.mu.Lock()
	items := append([]seenItem(nil), r.items...)
	r.mu.Unlock()
	var hits []string
	needles := secretNeedles()
	for _, it := range items {
		for needle, name := range needles {
			if i := strings.Index(it.data, needle); i >= 0 {
				lo, hi := max(0, i-60), min(len(it.data), i+len(needle)+60)
				ctx := strings.ReplaceAll(it.data[lo:hi], needle, "<"+strings.ToUpper(name)+">")
				hits = append(hits, fmt.Sprintf("%s in %s: …%s…", name, it.what, ctx))
			}
		}
	}
	return hits
}

func (r *recorder) count() (items, bytes int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, it := range r.items {
		bytes += len(it.data)
	}
	return len(r.items), bytes
}

// checkSecretHygiene is the last step of every group: after escrow has stopped, nothing any
// client, log line, audit record or metrics scrape of the group carried may contain a secret.
func checkSecretHygiene(t *testing.T, r *recorder) {
	t.Helper()
	t.Run("no_configured_secret_appears_in_any_response_header_body_log_audit_record_or_metric", func(t *testing.T) {
		items, bytes := r.count()
		if items == 0 {
			t.Fatal("nothing was recorded: the hygiene check would be vacuous")
		}
		for _, h := range r.findSecrets() {
			t.Error("SECRET LEAK: " + h)
		}
		t.Logf("searched %d recorded outputs (%d bytes) for %d secrets", items, bytes, len(secretNeedles())/3)
	})
}

// TestSecretHygieneCheckFindsAPlantedSecret keeps the hygiene check honest: it must find a whole
// secret and half of one, and nothing in clean text.
func TestSecretHygieneCheckFindsAPlantedSecret(t *testing.T) {
	r := &recorder{} // not linked to the run-wide recorder
	r.add("clean", []byte(`{"credential":"api-key","credential_id":"0123abcd"}`))
	if hits := r.findSecrets(); len(hits) != 0 {
		t.Fatalf("false positives: %v", hits)
	}
	half := envSecret[len(envSecret)-10:]
	r.add("planted", []byte("Authorization: Bearer "+fileSecret))
	r.add("planted half", []byte("token=..."+half))
	hits := r.findSecrets()
	if len(hits) < 2 {
		t.Fatalf("found %d hit(s) %v, want the whole file secret and the tail of the env secret", len(hits), hits)
	}
	for _, h := range hits {
		if strings.Contains(h, fileSecret) || strings.Contains(h, half) {
			t.Errorf("a hit report repeats the secret: %s", h)
		}
	}
}
