package scrub

import (
	"sync"
	"testing"
)

func TestMemo_BuildsOncePerValuesAndFollowsARotation(t *testing.T) {
	var m Memo
	a := m.For(secret, "second-value")
	if m.For(secret, "second-value") != a {
		t.Fatal("same values: want the same Scrubber")
	}
	b := m.For("rotated-token-value")
	if b == a {
		t.Fatal("new values: want a new Scrubber")
	}
	if out, n := b.String("x rotated-token-value"); n != 1 || out == "x rotated-token-value" {
		t.Fatalf("the new Scrubber must search the new value: %q", out)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				if _, n := m.For(secret).String(secret); n != 1 {
					t.Error("not found")
				}
			}
		})
	}
	wg.Wait()
}
