package credential

import (
	"context"
	"time"

	"github.com/escrowproxy/escrow/internal/fakeclock"
)

// newFakeClock is an injected clock the test moves by hand.
func newFakeClock() *fakeclock.Clock {
	return fakeclock.New(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
}

// providerFunc adapts a function to Provider.
type providerFunc func(ctx context.Context, args FetchArgs) (Token, error)

func (f providerFunc) Fetch(ctx context.Context, args FetchArgs) (Token, error) { return f(ctx, args) }

// secretValue is the secret the formatting and error tests look for.
const secretValue = "sk-live-7Hq2VERYSECRETxK9w4PzZ"

// noJitter pins the backoff jitter to its minimum (no stretch).
func noJitter() float64 { return 0 }
