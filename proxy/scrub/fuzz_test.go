package scrub

import (
	"math/rand/v2"
	"testing"
)

// FuzzScrub: for any values and any input within the scan limit, streamed in any chunking,
// the output never contains any searched form of any value, has the input's length, equals
// what String makes of the whole input, and nothing panics.
func FuzzScrub(f *testing.F) {
	f.Add(secret, "", "a "+secret+" b", uint64(1))
	f.Add("abcdefg[", "hunter2hunter2", "abcdefgabcdefg[ hunter2hunter", uint64(2))
	f.Add("redacted****", "escrow:redacted", "[escrow:redacted****]", uint64(3))
	f.Add("abcabcab", "", "abcabcabcabcabcab", uint64(4))
	f.Add("user:pa55w0rd!", "pa55w0rd!", "Basic dXNlcjpwYTU1dzByZCE=", uint64(5))
	f.Fuzz(func(t *testing.T, v1, v2, in string, seed uint64) {
		s := New(v1, v2)
		values := []string{v1, v2}
		whole, n := s.String(in)
		if len(whole) != len(in) || (n == 0) != (whole == in) {
			t.Fatalf("String: %d replacements, %q → %q", n, in, whole)
		}
		r := rand.New(rand.NewPCG(seed, seed>>1))
		var sizes, reads []int
		for range 20 {
			sizes = append(sizes, 1+r.IntN(64))
			reads = append(reads, 1+r.IntN(1024))
		}
		got, err := readAll(t, s.Body(&chunkReader{data: []byte(in), sizes: sizes}, BodyOptions{Limit: int64(len(in)) + 1}), reads...)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != whole {
			t.Fatalf("Body %q, String %q", got, whole)
		}
		if s.Weak() {
			return // no delimiter byte free: only guaranteed not to panic
		}
		assertClean(t, whole, values...)
		h := map[string][]string{"Location": {in}}
		s.Header(h)
		for _, v := range h["Location"] {
			assertClean(t, v, values...)
		}
	})
}
