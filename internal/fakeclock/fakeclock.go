// Package fakeclock is the one test clock of the project: a time that moves only when a test
// moves it, safe for concurrent use, whose Now method value plugs into every Options.Now.
package fakeclock

import (
	"sync"
	"time"
)

// Clock is a settable clock. The zero value is not usable; use New.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// New returns a clock set to start.
func New(start time.Time) *Clock { return &Clock{t: start} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d and returns the new time.
func (c *Clock) Advance(d time.Duration) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
	return c.t
}

// Set moves the clock to t.
func (c *Clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}
