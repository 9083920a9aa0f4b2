package strictyaml

import (
	"slices"
	"strings"
)

// Unknown is a key a mapping may not have.
type Unknown struct {
	Key   string
	Meant string // the known key it is a near miss of, or ""
}

// UnknownKeys returns the keys of m that are not in known, sorted, each with the known key it
// is a near miss of (Nearest).
func UnknownKeys(m map[string]any, known []string) []Unknown {
	var out []Unknown
	for k := range m {
		if !slices.Contains(known, k) {
			out = append(out, Unknown{Key: k, Meant: Nearest(k, known)})
		}
	}
	slices.SortFunc(out, func(a, b Unknown) int { return strings.Compare(a.Key, b.Key) })
	return out
}

// Nearest returns the candidate at most two edits from s (the typo case), or "". Case is
// ignored first, so that Listen finds listen; among equally near candidates the one spelt
// closest wins, then the first in sort order, so the answer does not depend on the order of
// candidates.
func Nearest(s string, candidates []string) string {
	best, bestFold, bestExact := "", 3, 0
	ls := strings.ToLower(s)
	for _, c := range candidates {
		lc := strings.ToLower(c)
		if len(ls)-len(lc) > 2 || len(lc)-len(ls) > 2 {
			continue // at least that many edits, and not worth measuring
		}
		fold := editDistance(ls, lc)
		if fold > 2 {
			continue
		}
		exact := editDistance(s, c)
		if fold < bestFold || fold == bestFold && (exact < bestExact || exact == bestExact && c < best) {
			best, bestFold, bestExact = c, fold, exact
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
