package audit

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// ErrUnavailable is Queue.Healthy's error while records cannot be written.
var ErrUnavailable = errors.New("audit: records cannot be written")

// QueueOptions configure NewQueue.
type QueueOptions struct {
	// Capacity bounds the records waiting to be written (default 8192).
	Capacity int
	// StallAfter is how long one write may block before the queue reports itself unavailable
	// (default 2s): the output is a pipe nobody reads, a full disk, a stuck log shipper.
	StallAfter time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Queue is a Sink that never blocks its caller: records wait in a bounded queue and one
// goroutine writes them to the inner sink, in order. It is how escrow fails closed on a stalled
// audit output instead of freezing: a caller that is about to serve a request first reserves
// the room for its record (Reserve); while the output is stalled or the queue is full there is
// none, and the request is refused. A reserved record is always queued; a record written
// without a reservation (a denial) is dropped, and counted, only when the queue is full.
type Queue struct {
	inner      Sink
	capacity   int
	stallAfter time.Duration
	now        func() time.Time

	mu       sync.Mutex
	cond     *sync.Cond
	q        []*Record
	reserved int // slots promised to records not written yet
	closed   bool
	done     chan struct{}

	writingSince atomic.Int64 // unix nanos the current inner write began, 0 when idle
	dropped      atomic.Uint64
}

// NewQueue starts the writer goroutine; Close stops it.
func NewQueue(inner Sink, o QueueOptions) *Queue {
	if o.Capacity <= 0 {
		o.Capacity = 8192
	}
	if o.StallAfter <= 0 {
		o.StallAfter = 2 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	q := &Queue{inner: inner, capacity: o.Capacity, stallAfter: o.StallAfter, now: o.Now, done: make(chan struct{})}
	q.cond = sync.NewCond(&q.mu)
	go q.run()
	return q
}

// Reserve promises r a place in the queue; the caller then Writes r. It returns false, and
// promises nothing, while the output is stalled or the queue is full.
func (q *Queue) Reserve(r *Record) bool {
	if q.stalled() {
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || len(q.q)+q.reserved >= q.capacity {
		return false
	}
	q.reserved++
	r.reserved = true
	return true
}

// Write queues r. It never blocks.
func (q *Queue) Write(r *Record) {
	q.mu.Lock()
	if r.reserved {
		r.reserved = false
		q.reserved--
	} else if q.closed || len(q.q)+q.reserved >= q.capacity {
		q.mu.Unlock()
		q.dropped.Add(1)
		return
	}
	q.q = append(q.q, r)
	q.mu.Unlock()
	q.cond.Signal()
}

// Healthy returns nil while records are being written, ErrUnavailable (wrapped, with the
// backlog) while the output is stalled or the queue is full.
func (q *Queue) Healthy() error {
	if q.stalled() {
		return fmt.Errorf("%w: a write has been blocked for more than %v (%d records waiting)", ErrUnavailable, q.stallAfter, q.Backlog())
	}
	q.mu.Lock()
	full := len(q.q)+q.reserved >= q.capacity
	q.mu.Unlock()
	if full {
		return fmt.Errorf("%w: the queue is full (%d records)", ErrUnavailable, q.capacity)
	}
	return nil
}

// Backlog is the number of records waiting to be written.
func (q *Queue) Backlog() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := len(q.q)
	if q.writingSince.Load() != 0 {
		n++
	}
	return n
}

// Dropped is the number of records lost because the queue was full.
func (q *Queue) Dropped() uint64 { return q.dropped.Load() }

func (q *Queue) stalled() bool {
	since := q.writingSince.Load()
	return since != 0 && q.now().Sub(time.Unix(0, since)) > q.stallAfter
}

func (q *Queue) run() {
	defer close(q.done)
	var batch []*Record
	for {
		q.mu.Lock()
		for len(q.q) == 0 && !q.closed {
			q.cond.Wait()
		}
		if len(q.q) == 0 && q.closed {
			q.mu.Unlock()
			return
		}
		batch, q.q = q.q, batch[:0]
		q.mu.Unlock()
		for i, r := range batch {
			q.writingSince.Store(q.now().UnixNano())
			q.inner.Write(r)
			q.writingSince.Store(0)
			batch[i] = nil
		}
	}
}

// Close stops taking records and waits until the queued ones are written or ctx ends; it
// returns ctx's error if records were still waiting then (the writer goroutine is left blocked
// on the output: there is nothing else to do with a stalled output at exit).
func (q *Queue) Close(ctx context.Context) error {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.cond.Broadcast()
	select {
	case <-q.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("audit: %d records not written: %w", q.Backlog(), ctx.Err())
	}
}
