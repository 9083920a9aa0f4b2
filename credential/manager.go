package credential

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// Defaults for Options fields left zero.
const (
	DefaultRecheckEvery   = time.Second
	DefaultRefreshBefore  = 0.2
	DefaultFailureBackoff = time.Second
	DefaultFetchTimeout   = 30 * time.Second
)

// Options tunes a Manager. The zero value is usable.
type Options struct {
	// Now is the clock; default time.Now.
	Now func() time.Time
	// RecheckEvery is how often a credential whose provider implements Staler (a secret file)
	// is checked for a change at its source, per the Now clock. Default DefaultRecheckEvery;
	// negative disables the check.
	RecheckEvery time.Duration
	// RefreshBefore: an expiring token is refreshed once this fraction of its lifetime (from
	// fetch to expiry) remains. Default DefaultRefreshBefore; values outside (0, 1) mean the
	// default.
	RefreshBefore float64
	// FailureBackoff is how long a failed fetch is remembered: during it, Get answers the same
	// ErrUnavailable error at once (or keeps serving a still-valid token) instead of calling the
	// provider again, so a failing upstream is not hammered. Per the Now clock. Default
	// DefaultFailureBackoff; negative disables it.
	FailureBackoff time.Duration
	// FetchTimeout bounds each provider fetch (real time). Default DefaultFetchTimeout.
	FetchTimeout time.Duration
	// Logger receives fetch failures and rotations (names and instance IDs, never values).
	// Default: no logging.
	Logger *zap.Logger
}

// Manager caches one Token per credential name and fetches through the name's Provider when
// the cached token is missing, expiring, expired or stale. It is safe for concurrent use.
//
// Caching rules, per name:
//   - A token without expiry is served until Forget, or until its provider (if it implements
//     Staler) reports a change, checked at most every RecheckEvery. After such a change the
//     token is fetched again before it is served; if that fetch fails the old value is dropped
//     (fail closed: the secret may have been revoked) and Get returns ErrUnavailable.
//   - An expiring token is served as is until RefreshBefore of its lifetime remains. From then
//     until expiry it is still served while one background fetch replaces it. An expired token
//     is never served: Get fetches and waits, and if that fails returns ErrUnavailable.
//   - However many requests want a name, one fetch runs at a time (singleflight). Waiters whose
//     context ends return at once with ErrUnavailable; the fetch itself runs on, detached from
//     any caller's cancellation and bounded by FetchTimeout, and fills the cache for others.
//   - A failed fetch is never cached as a value. For FailureBackoff after it, Get returns the
//     same error without calling the provider (or, in the refresh window, keeps serving the
//     still-valid token without retrying).
type Manager struct {
	entries map[string]*entry // fixed at construction; read without locks
	sf      singleflight.Group

	now            func() time.Time
	recheckEvery   time.Duration
	refreshBefore  float64
	failureBackoff time.Duration
	fetchTimeout   time.Duration
	log            *zap.Logger

	bg sync.WaitGroup // background refreshes
}

type entry struct {
	name   string
	p      Provider
	staler Staler // p as a Staler, or nil

	state      atomic.Pointer[state] // nil: nothing cached
	nextCheck  atomic.Int64          // unix nanos of the next Stale check
	refreshing atomic.Bool           // a background refresh is running

	mu  sync.Mutex // serialises writers of state against Forget
	gen uint64     // bumped by Forget; a fetch started under an older gen is not stored
}

// state is immutable once published.
type state struct {
	tok       Token
	has       bool      // tok is servable (subject to expiry)
	refreshAt time.Time // for expiring tokens: start refreshing from here
	failUntil time.Time // last fetch failed: don't call the provider again before this
	failErr   error     // that failure, as returned to callers
}

// NewManager returns a Manager for the given credentials. providers is copied; nil providers
// are skipped (Get reports them as unknown).
func NewManager(providers map[string]Provider, o Options) *Manager {
	m := &Manager{
		entries:        make(map[string]*entry, len(providers)),
		now:            o.Now,
		recheckEvery:   o.RecheckEvery,
		refreshBefore:  o.RefreshBefore,
		failureBackoff: o.FailureBackoff,
		fetchTimeout:   o.FetchTimeout,
		log:            o.Logger,
	}
	if m.now == nil {
		m.now = time.Now
	}
	if m.recheckEvery == 0 {
		m.recheckEvery = DefaultRecheckEvery
	}
	if !(m.refreshBefore > 0 && m.refreshBefore < 1) {
		m.refreshBefore = DefaultRefreshBefore
	}
	if m.failureBackoff == 0 {
		m.failureBackoff = DefaultFailureBackoff
	}
	if m.fetchTimeout <= 0 {
		m.fetchTimeout = DefaultFetchTimeout
	}
	if m.log == nil {
		m.log = zap.NewNop()
	}
	for name, p := range providers {
		if p == nil {
			continue
		}
		e := &entry{name: name, p: p}
		if s, ok := p.(Staler); ok && m.recheckEvery > 0 {
			e.staler = s
		}
		m.entries[name] = e
	}
	return m
}

// Names returns the configured credential names, sorted.
func (m *Manager) Names() []string {
	names := make([]string, 0, len(m.entries))
	for n := range m.entries {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Get returns the current token for name. A cache hit takes no lock, allocates nothing and
// makes no system call (except the Staler check, at most once per RecheckEvery). Errors wrap
// ErrUnknown or ErrUnavailable and name the credential.
func (m *Manager) Get(ctx context.Context, name string) (Token, error) {
	e := m.entries[name]
	if e == nil {
		return Token{}, &Error{Name: name, Kind: ErrUnknown}
	}
	now := m.now()
	s := e.state.Load()
	if s != nil && s.has {
		exp := s.tok.expiresAt
		if exp.IsZero() || now.Before(s.refreshAt) {
			if e.staler == nil || !m.recheckDue(e, now) || !e.staler.Stale(now) {
				return s.tok, nil
			}
			m.log.Info("credential changed at its source; fetching it again",
				zap.String("credential", name), zap.String("id", s.tok.id))
			return m.fetchWait(ctx, e)
		}
		if now.Before(exp) {
			m.refreshInBackground(ctx, e, s, now)
			return s.tok, nil
		}
		// Expired: never served. Fall through to a fetch.
	}
	if s != nil && s.failErr != nil && now.Before(s.failUntil) {
		return Token{}, s.failErr
	}
	return m.fetchWait(ctx, e)
}

// recheckDue reports whether this caller should run the Staler check now; at most one caller
// per RecheckEvery wins.
func (m *Manager) recheckDue(e *entry, now time.Time) bool {
	next := e.nextCheck.Load()
	n := now.UnixNano()
	if n < next {
		return false
	}
	return e.nextCheck.CompareAndSwap(next, n+int64(m.recheckEvery))
}

// fetchWait joins (or starts) the fetch for e and waits for it or for ctx.
func (m *Manager) fetchWait(ctx context.Context, e *entry) (Token, error) {
	ch := m.sf.DoChan(e.name, func() (any, error) { return m.fetch(ctx, e) })
	select {
	case r := <-ch:
		if r.Err != nil {
			return Token{}, r.Err
		}
		return r.Val.(Token), nil
	case <-ctx.Done():
		return Token{}, unavailable(e.name, fmt.Errorf("gave up waiting for the fetch: %w", ctx.Err()))
	}
}

// refreshInBackground starts one background fetch for e unless one is running or the last
// attempt failed less than FailureBackoff ago.
func (m *Manager) refreshInBackground(ctx context.Context, e *entry, s *state, now time.Time) {
	if s.failErr != nil && now.Before(s.failUntil) {
		return
	}
	if !e.refreshing.CompareAndSwap(false, true) {
		return
	}
	ctx = context.WithoutCancel(ctx)
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		defer e.refreshing.Store(false)
		_, _, _ = m.sf.Do(e.name, func() (any, error) { return m.fetch(ctx, e) })
	}()
}

// fetch runs inside the singleflight: it calls the provider, validates the result and publishes
// the new state. Its result goes to every waiter.
func (m *Manager) fetch(ctx context.Context, e *entry) (tok Token, err error) {
	e.mu.Lock()
	gen := e.gen
	e.mu.Unlock()

	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.fetchTimeout)
	defer cancel()
	tok, err = m.callProvider(fctx, e)
	now := m.now()
	if err == nil {
		err = m.check(e, tok, now)
	}
	if err != nil {
		ferr := unavailable(e.name, err)
		m.publishFailure(e, gen, ferr, now)
		m.log.Warn("credential fetch failed", zap.String("credential", e.name), zap.Error(ferr))
		return Token{}, ferr
	}
	if tok.name != e.name {
		tok = NewToken(e.name, tok.Value(), tok.expiresAt)
	}
	ns := &state{tok: tok, has: true}
	if !tok.expiresAt.IsZero() {
		life := tok.expiresAt.Sub(now)
		ns.refreshAt = tok.expiresAt.Add(-time.Duration(float64(life) * m.refreshBefore))
	}
	old := m.publish(e, gen, ns, now)
	switch {
	case old == nil || !old.has:
		m.log.Debug("credential fetched", zap.String("credential", e.name), zap.String("id", tok.id))
	case old.tok.id != tok.id:
		m.log.Info("credential rotated", zap.String("credential", e.name),
			zap.String("old_id", old.tok.id), zap.String("id", tok.id))
	}
	return tok, nil
}

// callProvider calls the provider, turning a panic into an error. Singleflight would otherwise
// re-panic on a fresh goroutine and take the process down. The panic value is not included: it
// could hold anything, the secret too.
func (m *Manager) callProvider(ctx context.Context, e *entry) (tok Token, err error) {
	defer func() {
		if r := recover(); r != nil {
			tok, err = Token{}, fmt.Errorf("provider panicked (%T)", r)
		}
	}()
	return e.p.Fetch(ctx, FetchArgs{Name: e.name})
}

// check validates what a provider returned.
func (m *Manager) check(e *entry, tok Token, now time.Time) error {
	if err := checkValue(tok.Value()); err != nil {
		return fmt.Errorf("provider returned an unusable credential: %w", err)
	}
	if exp := tok.expiresAt; !exp.IsZero() && !now.Before(exp) {
		return fmt.Errorf("provider returned a credential that expired at %s", exp.UTC().Format(time.RFC3339))
	}
	return nil
}

// publish stores ns unless Forget ran since the fetch started; it returns the state replaced.
// The Staler check restarts its interval from now.
func (m *Manager) publish(e *entry, gen uint64, ns *state, now time.Time) *state {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gen != gen {
		return nil
	}
	e.nextCheck.Store(now.UnixNano() + int64(m.recheckEvery))
	return e.state.Swap(ns)
}

// publishFailure records a failed fetch. A token that is still within its lifetime and was not
// reported stale stays servable (a failed refresh ahead of expiry); anything else is dropped.
func (m *Manager) publishFailure(e *entry, gen uint64, ferr error, now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gen != gen {
		return
	}
	ns := &state{failErr: ferr}
	if m.failureBackoff > 0 {
		ns.failUntil = now.Add(m.failureBackoff)
	}
	if old := e.state.Load(); old != nil && old.has {
		exp := old.tok.expiresAt
		if !exp.IsZero() && now.Before(exp) && !now.Before(old.refreshAt) {
			ns.tok, ns.has, ns.refreshAt = old.tok, true, old.refreshAt
		}
	}
	e.state.Store(ns)
}

// Forget drops the cached token (and any remembered failure) for name, so the next Get fetches
// again. A fetch already running is not stored; its current waiters still receive its result.
func (m *Manager) Forget(name string) {
	e := m.entries[name]
	if e == nil {
		return
	}
	e.mu.Lock()
	e.gen++
	e.state.Store(nil)
	e.nextCheck.Store(0)
	e.mu.Unlock()
	m.sf.Forget(name)
}

// Warm fetches every credential once, concurrently, and returns the failures joined, sorted by
// name; each names its credential and cause, never a secret. Use it at start-up so a broken
// credential is reported before the first request.
func (m *Manager) Warm(ctx context.Context) error {
	names := m.Names()
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Go(func() {
			_, errs[i] = m.Get(ctx, n)
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitBackground waits for background refreshes; for tests.
func (m *Manager) waitBackground() { m.bg.Wait() }
