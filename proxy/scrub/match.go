package scrub

import "slices"

// matcher is an Aho–Corasick automaton. It finds every occurrence of every pattern, ASCII
// case-insensitively, in one pass, and its state carries across chunks: the state after a
// chunk says exactly how many trailing bytes could still be the start of a match (its depth),
// which is what a streaming scan must hold back and nothing more.
//
// The shallow states (depth < denseDepth), where ordinary text spends nearly all its time,
// are a dense DFA over byte classes: one table lookup per byte. Deeper states, reached only
// while the text follows a pattern for several bytes, keep their few children and a failure
// link: a long credential (an 800-byte session token, a 2 KiB JWT) then costs memory in
// proportion to its forms' length, not that times the alphabet.
//
// Why an automaton rather than one strings.Index per pattern: a secret yields a dozen or more
// patterns, the body arrives in chunks, and the hold-back must be exact so that streamed
// events are not delayed; BenchmarkMatcher compares both.
type matcher struct {
	class [256]uint8 // byte → class; 0 is every byte (after folding) that no pattern contains
	// start[b]: b begins some pattern. In the start state the scan skips other bytes in a
	// loop without the table's dependency chain, which is where ordinary text spends its time.
	start  [256]bool
	nclass uint32
	// delta[s+c] is the next state of dense state s on class c, with matchFlag set when the
	// next state ends a match. A state value below sparseBase is a dense state's row offset
	// (index*nclass); from sparseBase on it is sparseBase+index-ndense.
	delta      []uint32
	sparseBase uint32
	ndense     uint32
	depth      []int32  // by state index: length of the state's string
	out        []int32  // by state index: longest match that ends in this state (0: none)
	fail       []uint32 // by state index: failure link (an index)
	kidStart   []uint32 // by state index: its children are kids[kidStart[i]:kidStart[i+1]]
	kids       []edge
	maxLen     int // longest pattern
}

type edge struct {
	class uint8
	to    uint32 // index
}

const (
	matchFlag  = 1 << 31
	denseDepth = 6
)

// fold maps ASCII upper case to lower case: patterns and input are compared folded.
func fold(b byte) byte {
	if 'A' <= b && b <= 'Z' {
		return b + 'a' - 'A'
	}
	return b
}

// newMatcher compiles patterns (already folded, non-empty, deduplicated). A match is any
// occurrence of a pattern or of a prefix of one at least minPrefix bytes long. It returns nil
// for no patterns.
func newMatcher(patterns []string, minPrefix int) *matcher {
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

	// The trie, from the sorted patterns: each node is a distinct prefix, and a pattern
	// shares its predecessor's nodes up to their common prefix. Nodes are numbered in the
	// order they are made (depth first); flat arrays, no slice per node.
	sorted := slices.Clone(patterns)
	slices.Sort(sorted)
	var (
		ndepth  = []int32{0}
		nend    = []bool{false}
		nparent = []uint32{0}
		nclassO = []uint8{0}
		path    = []uint32{0} // path[d]: the node of the current pattern's prefix of length d
		prev    string
	)
	for _, p := range sorted {
		common := 0
		for common < len(p) && common < len(prev) && p[common] == prev[common] {
			common++
		}
		path = path[:common+1]
		for d := common; d < len(p); d++ {
			path = append(path, uint32(len(ndepth)))
			ndepth = append(ndepth, int32(d+1))
			nend = append(nend, false)
			nparent = append(nparent, path[d])
			nclassO = append(nclassO, classOfFolded[p[d]])
		}
		nend[path[len(p)]] = true
		prev = p
	}
	count := len(ndepth)
	// Children grouped by parent (counting sort), then breadth-first order, which numbers
	// the states so that the dense (shallow) ones come first.
	childStart := make([]uint32, count+1)
	for nd := 1; nd < count; nd++ {
		childStart[nparent[nd]+1]++
	}
	for i := 1; i <= count; i++ {
		childStart[i] += childStart[i-1]
	}
	children := make([]uint32, count)
	fill := slices.Clone(childStart[:count])
	for nd := 1; nd < count; nd++ {
		children[fill[nparent[nd]]] = uint32(nd)
		fill[nparent[nd]]++
	}
	order := make([]uint32, 1, count) // order[i] is the node of index i
	for i := 0; i < len(order); i++ {
		order = append(order, children[childStart[order[i]]:childStart[order[i]+1]]...)
	}
	index := make([]uint32, count)
	for i, nd := range order {
		index[nd] = uint32(i)
	}
	m.depth = make([]int32, count)
	m.out = make([]int32, count)
	m.fail = make([]uint32, count)
	m.kidStart = make([]uint32, count+1)
	m.kids = make([]edge, 0, count-1)
	isEnd := make([]bool, count)
	for i, nd := range order {
		m.depth[i] = ndepth[nd]
		isEnd[i] = nend[nd]
		m.kidStart[i] = uint32(len(m.kids))
		for _, c := range children[childStart[nd]:childStart[nd+1]] {
			m.kids = append(m.kids, edge{nclassO[c], index[c]})
		}
		if ndepth[nd] < denseDepth {
			m.ndense = uint32(i + 1)
		}
	}
	m.kidStart[count] = uint32(len(m.kids))
	m.sparseBase = m.ndense * n

	// Failure links and outputs in breadth-first order: a state's failure link is shallower,
	// so it is complete before the state is reached.
	for i := 0; i < count; i++ {
		self := int32(0)
		if d := m.depth[i]; d >= int32(minPrefix) || isEnd[i] {
			self = d
		}
		if i > 0 {
			self = max(self, m.out[m.fail[i]])
		}
		m.out[i] = self
		for _, e := range m.kids[m.kidStart[i]:m.kidStart[i+1]] {
			if i == 0 {
				m.fail[e.to] = 0
				continue
			}
			m.fail[e.to] = m.next(m.fail[i], e.class)
		}
	}

	// The dense rows, also in breadth-first order: a missing transition is the failure
	// link's, whose row is already filled.
	m.delta = make([]uint32, m.ndense*n)
	for i := uint32(0); i < m.ndense; i++ {
		row := m.delta[i*n : (i+1)*n]
		if i > 0 {
			copy(row, m.delta[m.fail[i]*n:(m.fail[i]+1)*n])
		}
		for _, e := range m.kids[m.kidStart[i]:m.kidStart[i+1]] {
			row[e.class] = m.encode(e.to)
		}
	}
	for b := 0; b < 256; b++ {
		m.start[b] = m.delta[m.class[b]]&^matchFlag != 0
	}
	return m
}

// next is the transition from state index i on class c, by children and failure links
// (used while building, before the dense rows exist).
func (m *matcher) next(i uint32, c uint8) uint32 {
	for {
		for _, e := range m.kids[m.kidStart[i]:m.kidStart[i+1]] {
			if e.class == c {
				return e.to
			}
		}
		if i == 0 {
			return 0
		}
		i = m.fail[i]
	}
}

// encode turns a state index into its state value, flagged when it ends a match.
func (m *matcher) encode(i uint32) uint32 {
	v := m.sparseBase + i - m.ndense
	if i < m.ndense {
		v = i * m.nclass
	}
	if m.out[i] > 0 {
		v |= matchFlag
	}
	return v
}

// indexOf turns a state value (without the flag) into its index.
func (m *matcher) indexOf(s uint32) uint32 {
	if s < m.sparseBase {
		return s / m.nclass
	}
	return s - m.sparseBase + m.ndense
}

// sparseStep is the transition from sparse state value s on class c.
func (m *matcher) sparseStep(s uint32, c uint8) uint32 {
	i := s - m.sparseBase + m.ndense
	for i >= m.ndense {
		for _, e := range m.kids[m.kidStart[i]:m.kidStart[i+1]] {
			if e.class == c {
				return m.encode(e.to)
			}
		}
		i = m.fail[i]
	}
	return m.delta[i*m.nclass+uint32(c)]
}

// holdBack is how many trailing bytes scanned so far could begin a match: the depth of state s.
func (m *matcher) holdBack(s uint32) int { return int(m.depth[m.indexOf(s)]) }

// scan feeds b (whose first byte is at absolute offset pos) through the automaton from state s,
// adds every match to rs, and returns the state after b.
func (m *matcher) scan(s uint32, b []byte, pos int64, rs *runs) uint32 {
	delta, class, start, base := m.delta, &m.class, &m.start, m.sparseBase
	for i := 0; i < len(b); i++ {
		if s == 0 {
			for i < len(b) && !start[b[i]] {
				i++
			}
			if i == len(b) {
				break
			}
		}
		var v uint32
		if s < base {
			v = delta[s+uint32(class[b[i]])]
		} else {
			v = m.sparseStep(s, class[b[i]])
		}
		s = v &^ matchFlag
		if v&matchFlag != 0 {
			end := pos + int64(i) + 1
			rs.add(end-int64(m.out[m.indexOf(s)]), end)
		}
	}
	return s
}

// scanString is scan for a string, from the start state.
func (m *matcher) scanString(str string, rs *runs) {
	delta, class, start, base := m.delta, &m.class, &m.start, m.sparseBase
	s := uint32(0)
	for i := 0; i < len(str); i++ {
		if s == 0 {
			for i < len(str) && !start[str[i]] {
				i++
			}
			if i == len(str) {
				break
			}
		}
		var v uint32
		if s < base {
			v = delta[s+uint32(class[str[i]])]
		} else {
			v = m.sparseStep(s, class[str[i]])
		}
		s = v &^ matchFlag
		if v&matchFlag != 0 {
			end := int64(i) + 1
			rs.add(end-int64(m.out[m.indexOf(s)]), end)
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
