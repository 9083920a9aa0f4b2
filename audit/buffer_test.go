package audit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"
)

// lockedBuffer is a bytes.Buffer the flush goroutine and the test can share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) lines() [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Split(bytes.TrimSpace(bytes.Clone(l.b.Bytes())), []byte("\n"))
}

func (l *lockedBuffer) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Len()
}

// tickClock is a zapcore.Clock whose ticker fires only when the test sends on ch.
type tickClock struct{ ch chan time.Time }

func (c tickClock) Now() time.Time { return time.Now() }

// NewTicker returns a ticker that was not started by the time package; Stop on it is a no-op.
func (c tickClock) NewTicker(time.Duration) *time.Ticker { return &time.Ticker{C: c.ch} }

func TestBufferedZapSink_HoldsRecordsUntilTheFlushTick(t *testing.T) {
	var out lockedBuffer
	clock := tickClock{ch: make(chan time.Time)}
	s := NewBufferedZapSink(&out, 100*time.Millisecond, clock)
	defer s.Stop()
	s.Write(&Record{RequestID: "r1", Decision: Allow, Reason: "allowed"})
	if n := out.len(); n != 0 {
		t.Fatalf("%d bytes written before the flush interval: records should be buffered", n)
	}
	clock.ch <- time.Now() // the interval has passed
	deadline := time.Now().Add(5 * time.Second)
	for out.len() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the record was not written after the flush tick")
		}
		time.Sleep(time.Millisecond)
	}
	var m map[string]any
	if err := json.Unmarshal(out.lines()[0], &m); err != nil || m["request_id"] != "r1" {
		t.Errorf("flushed line %q: %v", out.lines()[0], err)
	}
}

func TestBufferedZapSink_StopWritesEveryRecord(t *testing.T) {
	var out lockedBuffer
	s := NewBufferedZapSink(&out, time.Second, tickClock{ch: make(chan time.Time)}) // never ticks
	const n = 500                                                                   // more than one 64 KiB buffer
	for i := range n {
		s.Write(&Record{RequestID: fmt.Sprintf("r%d", i), Decision: Allow, Reason: "allowed", Path: "/v1/" + string(bytes.Repeat([]byte("x"), 200))})
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	lines := out.lines()
	if len(lines) != n {
		t.Fatalf("%d records written after Stop, want %d", len(lines), n)
	}
	for i, l := range lines {
		var m map[string]any
		if err := json.Unmarshal(l, &m); err != nil || m["request_id"] != fmt.Sprintf("r%d", i) {
			t.Fatalf("line %d = %q (%v): records must be whole and in order", i, l, err)
		}
	}
}

func TestBufferedZapSink_ZeroIntervalWritesAtOnce(t *testing.T) {
	var out lockedBuffer
	s := NewBufferedZapSink(&out, 0, nil)
	s.Write(&Record{RequestID: "r1", Decision: Deny, Reason: "policy_denied"})
	if out.len() == 0 {
		t.Error("flush interval 0: the record should be written as it is made")
	}
	if err := s.Stop(); err != nil {
		t.Error(err)
	}
}
