package scrub

import (
	"slices"
	"sync/atomic"
)

// Memo keeps the Scrubber of the values it was last asked for, so that a route builds one
// per credential value rather than one per request (New costs far more than scrubbing a
// small response). It is safe for concurrent use; the zero value is ready.
type Memo struct {
	last atomic.Pointer[memoEntry]
}

type memoEntry struct {
	values []string
	s      *Scrubber
}

// For returns a Scrubber for values: the previous one when values are the same as last time
// (compared in full, not by a hash or an id), else a new one that replaces it.
func (m *Memo) For(values ...string) *Scrubber {
	if e := m.last.Load(); e != nil && slices.Equal(e.values, values) {
		return e.s
	}
	e := &memoEntry{values: slices.Clone(values), s: New(values...)}
	m.last.Store(e)
	return e.s
}
