package credential

import (
	"context"
	"sync"
	"time"
)

// fakeClock is an injected clock the test moves by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// providerFunc adapts a function to Provider.
type providerFunc func(ctx context.Context, args FetchArgs) (Token, error)

func (f providerFunc) Fetch(ctx context.Context, args FetchArgs) (Token, error) { return f(ctx, args) }

// secretValue is the secret the formatting and error tests look for.
const secretValue = "sk-live-7Hq2VERYSECRETxK9w4PzZ"
