package audit

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"testing"
	"time"
)

func TestZapSink_StopOnAPipeIsNoError(t *testing.T) {
	for _, flush := range []time.Duration{0, 50 * time.Millisecond} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan []byte)
		go func() { b, _ := io.ReadAll(r); done <- b }()
		s := NewBufferedZapSink(w, flush, nil)
		s.Write(&Record{RequestID: "r-1", Decision: Allow})
		// fsync on a pipe fails with EINVAL: every record was written, so that is no error.
		if err := s.Stop(); err != nil {
			t.Errorf("flush %v: Stop on a pipe = %v", flush, err)
		}
		w.Close()
		if b := <-done; len(b) == 0 {
			t.Errorf("flush %v: nothing written", flush)
		}
		r.Close()
	}
}

// blockingSink blocks every Write until release is closed.
type blockingSink struct {
	release chan struct{}
	mu      sync.Mutex
	got     []string
}

func (b *blockingSink) Write(r *Record) {
	<-b.release
	b.mu.Lock()
	b.got = append(b.got, r.RequestID)
	b.mu.Unlock()
}

func TestQueue_ReservesRoomAndFailsClosedWhenStalled(t *testing.T) {
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	inner := &blockingSink{release: make(chan struct{})}
	q := NewQueue(inner, QueueOptions{Capacity: 3, StallAfter: time.Second, Now: clock})

	first := &Record{RequestID: "1"}
	if !q.Reserve(first) {
		t.Fatal("Reserve on an idle queue failed")
	}
	q.Write(first) // the writer takes it and blocks on the output
	deadline := time.Now().Add(5 * time.Second)
	for q.writingSince.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if err := q.Healthy(); err != nil {
		t.Fatalf("Healthy while a write is young: %v", err)
	}
	mu.Lock()
	now = now.Add(2 * time.Second) // the write has now blocked longer than StallAfter
	mu.Unlock()
	if err := q.Healthy(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Healthy on a stalled output = %v", err)
	}
	if q.Reserve(&Record{RequestID: "2"}) {
		t.Fatal("Reserve succeeded on a stalled output")
	}
	// Unreserved records queue until the capacity, then are dropped and counted.
	for _, id := range []string{"3", "4", "5", "6"} {
		q.Write(&Record{RequestID: id})
	}
	if q.Dropped() != 1 || q.Backlog() != 4 {
		t.Errorf("dropped %d, backlog %d; want 1 and 4", q.Dropped(), q.Backlog())
	}
	close(inner.release)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := q.Close(ctx); err != nil {
		t.Fatal(err)
	}
	inner.mu.Lock()
	defer inner.mu.Unlock()
	if len(inner.got) != 4 || inner.got[0] != "1" || inner.got[3] != "5" {
		t.Errorf("written %v, want 1 3 4 5 in order", inner.got)
	}
}
