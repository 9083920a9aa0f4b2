package scrub

import "slices"

// matcher is an Aho–Corasick automaton compiled to a dense DFA over byte classes. It finds
// every occurrence of every pattern, ASCII case-insensitively, in one pass with one table
// lookup per byte, and its state carries across chunks: the state after a chunk says exactly
// how many trailing bytes could still be the start of a match (its depth), which is what a
// streaming scan must hold back and nothing more.
//
// Why a DFA rather than one strings.Index per pattern: a secret yields a dozen or more
// patterns, the body arrives in chunks, and the hold-back must be exact so that streamed
// events are not delayed; the benchmarks compare both (BenchmarkMatcher_*).
type matcher struct {
	class  [256]uint8 // byte → class; 0 is every byte (after folding) that no pattern contains
	nclass uint32
	// delta[s+c] is the next state of state s (a premultiplied row offset, s = index*nclass)
	// on class c, with matchFlag set when the next state ends at least one pattern.
	delta  []uint32
	depth  []int32 // by state index: length of the state's string
	out    []int32 // by state index: longest pattern that ends in this state (0: none)
	maxLen int     // longest pattern
}

const matchFlag = 1 << 31

// fold maps ASCII upper case to lower case: patterns and input are compared folded.
func fold(b byte) byte {
	if 'A' <= b && b <= 'Z' {
		return b + 'a' - 'A'
	}
	return b
}

// newMatcher compiles patterns (already folded, non-empty, deduplicated). It returns nil for
// no patterns.
func newMatcher(patterns []string) *matcher {
	if len(patterns) == 0 {
		return nil
	}
	m := &matcher{}
	var seen [256]bool
	for _, p := range patterns {
		for i := 0; i < len(p); i++ {
			seen[p[i]] = true
		}
		m.maxLen = max(m.maxLen, len(p))
	}
	var classOfFolded [256]uint8
	n := uint32(1)
	for b := 0; b < 256; b++ {
		if seen[b] {
			classOfFolded[b] = uint8(n)
			n++
		}
	}
	m.nclass = n
	for b := 0; b < 256; b++ {
		m.class[b] = classOfFolded[fold(byte(b))]
	}

	// The trie: rows of nclass entries; 0 means no child (the root is never a child). Its
	// states are the distinct prefixes: in sorted order, each pattern adds those longer than
	// its common prefix with the one before.
	sorted := slices.Clone(patterns)
	slices.Sort(sorted)
	states := 1
	for i, p := range sorted {
		common := 0
		if i > 0 {
			prev := sorted[i-1]
			for common < len(p) && common < len(prev) && p[common] == prev[common] {
				common++
			}
		}
		states += len(p) - common
	}
	m.delta = make([]uint32, n, states*int(n))
	m.depth = make([]int32, 1, states)
	m.out = make([]int32, 1, states)
	for _, p := range patterns {
		s := uint32(0)
		for i := 0; i < len(p); i++ {
			c := uint32(classOfFolded[p[i]])
			next := m.delta[s+c]
			if next == 0 {
				next = uint32(len(m.delta))
				m.delta = m.delta[:len(m.delta)+int(n)]
				m.depth = append(m.depth, int32(i+1))
				m.out = append(m.out, 0)
				m.delta[s+c] = next
			}
			s = next
		}
		m.out[s/n] = int32(len(p))
	}

	// Failure links in breadth-first order turn the trie into the DFA. A row is rewritten only
	// when its state is dequeued, so while it waits its non-zero entries are trie children.
	fail := make([]uint32, len(m.depth))
	queue := make([]uint32, 0, len(m.depth))
	for c := uint32(0); c < n; c++ {
		if child := m.delta[c]; child != 0 {
			queue = append(queue, child)
		}
	}
	for len(queue) > 0 {
		s := queue[0]
		queue = queue[1:]
		fs := fail[s/n]
		m.out[s/n] = max(m.out[s/n], m.out[fs/n])
		for c := uint32(0); c < n; c++ {
			if child := m.delta[s+c]; child != 0 {
				fail[child/n] = m.delta[fs+c] &^ matchFlag
				queue = append(queue, child)
			} else {
				m.delta[s+c] = m.delta[fs+c] &^ matchFlag
			}
		}
	}
	for i, t := range m.delta {
		if m.out[t/n] > 0 {
			m.delta[i] = t | matchFlag
		}
	}
	return m
}

// holdBack is how many trailing bytes scanned so far could begin a match: the depth of state s.
func (m *matcher) holdBack(s uint32) int { return int(m.depth[s/m.nclass]) }

// scan feeds b (whose first byte is at absolute offset pos) through the automaton from state s,
// adds every match to rs, and returns the state after b.
func (m *matcher) scan(s uint32, b []byte, pos int64, rs *runs) uint32 {
	delta, class, nc := m.delta, &m.class, m.nclass
	for i, c := range b {
		v := delta[s+uint32(class[c])]
		s = v &^ matchFlag
		if v&matchFlag != 0 {
			end := pos + int64(i) + 1
			rs.add(end-int64(m.out[s/nc]), end)
		}
	}
	return s
}

// scanString is scan for a string, from the start state.
func (m *matcher) scanString(str string, rs *runs) {
	delta, class, nc := m.delta, &m.class, m.nclass
	s := uint32(0)
	for i := 0; i < len(str); i++ {
		v := delta[s+uint32(class[str[i]])]
		s = v &^ matchFlag
		if v&matchFlag != 0 {
			end := int64(i) + 1
			rs.add(end-int64(m.out[s/nc]), end)
		}
	}
}

// run is a redacted span [start, end) of absolute offsets: the union of overlapping matches.
type run struct{ start, end int64 }

// runs are the spans not yet written out, in order. Matches are reported in order of their
// end, so a new match can only overlap the last runs.
type runs struct {
	list  []run
	found int // runs created minus runs merged: the number of distinct redactions
}

func (rs *runs) add(start, end int64) {
	for len(rs.list) > 0 {
		last := rs.list[len(rs.list)-1]
		if last.end <= start {
			break
		}
		// Overlapping (not merely adjacent): one span, one marker.
		start = min(start, last.start)
		end = max(end, last.end)
		rs.list = rs.list[:len(rs.list)-1]
		rs.found--
	}
	rs.list = append(rs.list, run{start, end})
	rs.found++
}
