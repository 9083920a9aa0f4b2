package proxy

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
)

// conns is the lifecycle of the connections escrow relays outside net/http's own tracking:
// blind tunnels and upgraded (WebSocket) connections. Shutdown stops new ones, waits for the
// open ones to finish, and closes what is left when the drain period ends.
type conns struct {
	mu      sync.Mutex          // guards open and orders closing against track
	open    map[net.Conn]string // → the SPIFFE ID the relay was authorized for
	active  sync.WaitGroup      // one per tracked relay, released after its audit record is written
	closing atomic.Bool
	forced  atomic.Bool // the drain period ended: connections still open were closed
}

func newConns() *conns { return &conns{open: map[net.Conn]string{}} }

// track registers the connections of one relay, authorized for the SPIFFE ID id. It returns
// false, having closed them, when shutdown has begun. After true the caller must untrack the
// connections and, once its audit record is written, call release.
func (c *conns) track(id string, cs ...net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing.Load() {
		for _, x := range cs {
			_ = x.Close()
		}
		return false
	}
	c.active.Add(1)
	for _, x := range cs {
		c.open[x] = id
	}
	return true
}

// closeWhere closes the open connections whose identity revoked reports true (a revocation
// ends the tunnels and WebSockets already open, not only new requests) and returns how many.
func (c *conns) closeWhere(revoked func(id string) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for x, id := range c.open {
		if revoked(id) {
			_ = x.Close()
			n++
		}
	}
	return n
}

// untrack closes the connections and forgets them.
func (c *conns) untrack(cs ...net.Conn) {
	c.mu.Lock()
	for _, x := range cs {
		_ = x.Close()
		delete(c.open, x)
	}
	c.mu.Unlock()
}

// release ends one relay tracked with track; shutdown waits for every release.
func (c *conns) release() { c.active.Done() }

// shuttingDown reports whether shutdown has begun.
func (c *conns) shuttingDown() bool { return c.closing.Load() }

// beginShutdown refuses new relays from now on.
func (c *conns) beginShutdown() {
	c.mu.Lock()
	c.closing.Store(true)
	c.mu.Unlock()
}

// drain waits for every relay to be released; when ctx ends first it closes the open
// connections (their relays then end) and still waits for the releases, so every audit record
// is written before drain returns. It reports whether connections had to be closed.
func (c *conns) drain(ctx context.Context) (forced bool) {
	done := make(chan struct{})
	go func() { c.active.Wait(); close(done) }()
	select {
	case <-done:
		return false
	case <-ctx.Done():
	}
	c.forced.Store(true)
	c.mu.Lock()
	for x := range c.open {
		_ = x.Close()
	}
	c.mu.Unlock()
	<-done
	return true
}
