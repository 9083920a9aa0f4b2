package config

import (
	"math/rand/v2"
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

// referenceHostPattern is ValidHostPattern as it was first written, with a regular expression:
// the hand-written label check must accept exactly the same strings.
func referenceHostPattern(h string) bool {
	label := regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	h = strings.TrimPrefix(h, "*.")
	if h == "" || len(h) > 253 {
		return false
	}
	if _, err := netip.ParseAddr(h); err == nil {
		return true
	}
	for _, l := range strings.Split(h, ".") {
		if !label.MatchString(l) {
			return false
		}
	}
	return true
}

func TestValidHostPattern_MatchesTheRegexpDefinition(t *testing.T) {
	long := strings.Repeat("a", 63)
	cases := []string{
		"", ".", "..", "a", "a.", ".a", "a..b", "api.example.com", "*.example.com", "*.", "*",
		"API.example.com", "-a.com", "a-.com", "a-b.com", "a_b.com", "xn--bcher-kva.example",
		long + ".com", long + "a.com", "127.0.0.1", "01.2.3.4", "::1", "[::1]", "fe80::1%eth0",
		"1.2.3.4.5", "256.1.1.1", "a b", "a\x00b", "ü.example", strings.Repeat("a.", 126) + "a",
		strings.Repeat("a.", 127) + "a",
	}
	for _, h := range cases {
		if got, want := ValidHostPattern(h), referenceHostPattern(h); got != want {
			t.Errorf("ValidHostPattern(%q) = %v, the regexp says %v", h, got, want)
		}
	}
	// Random strings over the characters that matter.
	const alphabet = "ab09-.:*[]%A_"
	r := rand.New(rand.NewPCG(1, 2))
	for range 20000 {
		b := make([]byte, r.IntN(12))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		h := string(b)
		if got, want := ValidHostPattern(h), referenceHostPattern(h); got != want {
			t.Fatalf("ValidHostPattern(%q) = %v, the regexp says %v", h, got, want)
		}
	}
}

func TestValidHostPattern_DoesNotAllocateForNames(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { ValidHostPattern("api.example.com") }); n != 0 {
		t.Errorf("%v allocations per call, want 0", n)
	}
}
