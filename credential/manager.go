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
	DefaultMaxKeysPerName = 1024
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
	// MaxKeysPerName bounds how many (Subject, Scope) keys one credential caches; past it the
	// least recently used key is dropped. Agents can present many delegation subjects, and each
	// would otherwise hold a token forever. Default DefaultMaxKeysPerName.
	MaxKeysPerName int
	// Logger receives fetch failures and rotations (names and instance IDs, never values).
	// Default: no logging.
	Logger *zap.Logger
}

// Manager caches tokens per cache key and fetches through the credential's Provider when the
// cached token is missing, expiring, expired or stale. It is safe for concurrent use.
//
// The cache key is (Name, Subject, Scope) of the Request, or Name alone for a Shared provider
// (a static secret keeps one entry per name). Keys other than (Name, "", "") are bounded
// per name by MaxKeysPerName, least recently used dropped first.
//
// Caching rules, per key:
//   - A token without expiry is served until Forget, or until its provider (if it implements
//     Staler) reports a change, checked at most every RecheckEvery. After such a change the
//     token is fetched again before it is served; if that fetch fails the old value is dropped
//     (fail closed: the secret may have been revoked) and Get returns ErrUnavailable.
//   - An expiring token is served as is until RefreshBefore of its lifetime remains. From then
//     until expiry it is still served while one background fetch replaces it. An expired token
//     is never served: Get fetches and waits, and if that fails returns ErrUnavailable.
//   - However many requests want a key, one fetch runs at a time (singleflight). Waiters whose
//     context ends return at once with ErrUnavailable; the fetch itself runs on, detached from
//     any caller's cancellation and bounded by FetchTimeout, and fills the cache for others.
//   - A failed fetch is never cached as a value. For FailureBackoff after it, Get returns the
//     same error without calling the provider (or, in the refresh window, keeps serving the
//     still-valid token without retrying).
//
// The set of credentials is swapped whole by Update; Get never takes a lock on a cache hit of
// the (Name, "", "") key, and takes none on other hits either (copy-on-write maps).
type Manager struct {
	// entries is immutable once published; Update swaps in a new map.
	entries  atomic.Pointer[map[string]*entry]
	updateMu sync.Mutex // serialises Update

	now            func() time.Time
	recheckEvery   time.Duration
	refreshBefore  float64
	failureBackoff time.Duration
	fetchTimeout   time.Duration
	maxKeys        int
	log            *zap.Logger

	bg sync.WaitGroup // background refreshes
}

// entry is one configured credential: its provider and its cached keys.
type entry struct {
	name   string
	p      Provider
	staler Staler // p as a Staler, or nil
	shared bool   // p is Shared: every caller gets the one slot below

	one slot // the key (Name, "", ""), and the only one of a Shared provider

	mu   sync.Mutex                       // serialises writers of keys
	keys atomic.Pointer[map[subKey]*slot] // copy-on-write, at most maxKeys
}

type subKey struct{ subject, scope string }

// slot caches the token of one key.
type slot struct {
	key subKey

	state      atomic.Pointer[state] // nil: nothing cached
	nextCheck  atomic.Int64          // unix nanos of the next Stale check
	refreshing atomic.Bool           // a background refresh is running
	lastUsed   atomic.Int64          // unix nanos of the latest Get, for eviction
	sf         singleflight.Group    // one fetch at a time, under the key ""

	mu  sync.Mutex // serialises writers of state against forget
	gen uint64     // bumped by forget; a fetch started under an older gen is not stored
}

// state is immutable once published.
type state struct {
	tok       Token
	has       bool      // tok is servable (subject to expiry)
	refreshAt time.Time // for expiring tokens: start refreshing from here
	failUntil time.Time // last fetch failed: don't call the provider again before this
	failErr   error     // that failure, as returned to callers
}

// NewManager returns a Manager for the given credentials, as Update would set them.
func NewManager(providers map[string]Provider, o Options) *Manager {
	m := &Manager{
		now:            o.Now,
		recheckEvery:   o.RecheckEvery,
		refreshBefore:  o.RefreshBefore,
		failureBackoff: o.FailureBackoff,
		fetchTimeout:   o.FetchTimeout,
		maxKeys:        o.MaxKeysPerName,
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
	if m.maxKeys <= 0 {
		m.maxKeys = DefaultMaxKeysPerName
	}
	if m.log == nil {
		m.log = zap.NewNop()
	}
	empty := map[string]*entry{}
	m.entries.Store(&empty)
	m.Update(providers)
	return m
}

func (m *Manager) newEntry(name string, p Provider) *entry {
	e := &entry{name: name, p: p}
	if s, ok := p.(Staler); ok && m.recheckEvery > 0 {
		e.staler = s
	}
	if sh, ok := p.(Shared); ok {
		e.shared = sh.Shared()
	}
	keys := map[subKey]*slot{}
	e.keys.Store(&keys)
	return e
}

// Update replaces the whole set of credentials atomically: a Get sees either the old set or the
// new one. providers is copied; nil providers are skipped (Get reports them as unknown).
//
// A name whose Provider is the identical value (==) keeps its cached tokens and any fetch in
// flight. A name with another provider, or a new name, starts empty; a removed name is gone
// (Get returns ErrUnknown). A fetch in flight for a replaced or removed name still answers its
// waiters but is not stored. To keep tokens across a configuration reload, pass the previous
// Provider value again for every credential whose configuration did not change.
func (m *Manager) Update(providers map[string]Provider) {
	m.updateMu.Lock()
	defer m.updateMu.Unlock()
	old := *m.entries.Load()
	next := make(map[string]*entry, len(providers))
	for name, p := range providers {
		if p == nil {
			continue
		}
		if e := old[name]; e != nil && sameProvider(e.p, p) {
			next[name] = e
			continue
		}
		next[name] = m.newEntry(name, p)
	}
	m.entries.Store(&next)
	for name, e := range old {
		if next[name] != e {
			e.forget() // free its tokens; fetches in flight for it are not stored
		}
	}
}

// sameProvider reports a == b, and false (a change: start empty) when their dynamic type is not
// comparable, where == would panic (a func or a struct holding a map).
func sameProvider(a, b Provider) (same bool) {
	defer func() {
		if recover() != nil {
			same = false
		}
	}()
	return a == b
}

// Names returns the configured credential names, sorted.
func (m *Manager) Names() []string {
	entries := *m.entries.Load()
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Get returns the current token for r. A cache hit takes no lock, allocates nothing and makes
// no system call (except the Staler check, at most once per RecheckEvery). Errors wrap
// ErrUnknown or ErrUnavailable and name the credential.
func (m *Manager) Get(ctx context.Context, r Request) (Token, error) {
	e := (*m.entries.Load())[r.Name]
	if e == nil {
		return Token{}, &Error{Name: r.Name, Kind: ErrUnknown}
	}
	now := m.now()
	sl := &e.one
	if !e.shared && (r.Subject != "" || r.Scope != "") {
		sl = m.slotFor(e, subKey{r.Subject, r.Scope}, now)
	}
	s := sl.state.Load()
	if s != nil && s.has {
		exp := s.tok.expiresAt
		if exp.IsZero() || now.Before(s.refreshAt) {
			if e.staler == nil || !m.recheckDue(sl, now) || !e.staler.Stale(now) {
				return s.tok, nil
			}
			m.log.Info("credential changed at its source; fetching it again",
				zap.String("credential", e.name), zap.String("id", s.tok.id))
			return m.fetchWait(ctx, e, sl, s)
		}
		if now.Before(exp) {
			m.refreshInBackground(ctx, e, sl, s, now)
			return s.tok, nil
		}
		// Expired: never served. Fall through to a fetch.
	}
	if s != nil && s.failErr != nil && now.Before(s.failUntil) {
		return Token{}, s.failErr
	}
	return m.fetchWait(ctx, e, sl, s)
}

// slotFor returns the slot of key, adding it (and dropping the least recently used key when the
// name is full) if it is new, and marks it used at now.
func (m *Manager) slotFor(e *entry, key subKey, now time.Time) *slot {
	n := now.UnixNano()
	if sl := (*e.keys.Load())[key]; sl != nil {
		// Write only when it moves forward: hits in the same tick do not contend on the line.
		if sl.lastUsed.Load() < n {
			sl.lastUsed.Store(n)
		}
		return sl
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := *e.keys.Load()
	if sl := cur[key]; sl != nil {
		return sl
	}
	var victim *slot
	if len(cur) >= m.maxKeys {
		for _, s := range cur {
			if victim == nil || s.lastUsed.Load() < victim.lastUsed.Load() {
				victim = s
			}
		}
	}
	next := make(map[subKey]*slot, len(cur)+1)
	for k, s := range cur {
		if s != victim {
			next[k] = s
		}
	}
	sl := &slot{key: key}
	sl.lastUsed.Store(n)
	next[key] = sl
	e.keys.Store(&next)
	if victim != nil {
		victim.forget()
	}
	return sl
}

// recheckDue reports whether this caller should run the Staler check now; at most one caller
// per RecheckEvery wins.
func (m *Manager) recheckDue(sl *slot, now time.Time) bool {
	next := sl.nextCheck.Load()
	n := now.UnixNano()
	if n < next {
		return false
	}
	return sl.nextCheck.CompareAndSwap(next, n+int64(m.recheckEvery))
}

// fetchWait joins (or starts) the fetch for sl and waits for it or for ctx. seen is the state
// the caller found wanting.
func (m *Manager) fetchWait(ctx context.Context, e *entry, sl *slot, seen *state) (Token, error) {
	ch := sl.sf.DoChan("", func() (any, error) { return m.fetch(ctx, e, sl, seen) })
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

// refreshInBackground starts one background fetch for sl unless one is running or the last
// attempt failed less than FailureBackoff ago.
func (m *Manager) refreshInBackground(ctx context.Context, e *entry, sl *slot, s *state, now time.Time) {
	if s.failErr != nil && now.Before(s.failUntil) {
		return
	}
	if !sl.refreshing.CompareAndSwap(false, true) {
		return
	}
	ctx = context.WithoutCancel(ctx)
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		defer sl.refreshing.Store(false)
		_, _, _ = sl.sf.Do("", func() (any, error) { return m.fetch(ctx, e, sl, s) })
	}()
}

// fetch runs inside the singleflight: it calls the provider, validates the result and publishes
// the new state. Its result goes to every waiter.
//
// seen is the state the caller found wanting. If another fetch has published since (the caller
// missed, and reached the singleflight just after that fetch finished), its fresh token or its
// failure within the backoff is the answer: one provider call per key, not two.
func (m *Manager) fetch(ctx context.Context, e *entry, sl *slot, seen *state) (tok Token, err error) {
	if cur := sl.state.Load(); cur != seen && cur != nil {
		now := m.now()
		if cur.has && (cur.tok.expiresAt.IsZero() || now.Before(cur.refreshAt)) {
			return cur.tok, nil
		}
		if cur.failErr != nil && now.Before(cur.failUntil) {
			return Token{}, cur.failErr
		}
	}
	sl.mu.Lock()
	gen := sl.gen
	sl.mu.Unlock()

	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.fetchTimeout)
	defer cancel()
	tok, err = m.callProvider(fctx, e, sl)
	now := m.now()
	if err == nil {
		err = m.check(tok, now)
	}
	if err != nil {
		ferr := unavailable(e.name, err)
		m.publishFailure(sl, gen, ferr, now)
		m.log.Warn("credential fetch failed", zap.String("credential", e.name),
			zap.String("subject", sl.key.subject), zap.Error(ferr))
		return Token{}, ferr
	}
	if tok.name != e.name {
		tok = tok.withName(e.name)
	}
	ns := &state{tok: tok, has: true}
	if !tok.expiresAt.IsZero() {
		life := tok.expiresAt.Sub(now)
		ns.refreshAt = tok.expiresAt.Add(-time.Duration(float64(life) * m.refreshBefore))
	}
	old := m.publish(sl, gen, ns, now)
	switch {
	case old == nil || !old.has:
		m.log.Debug("credential fetched", zap.String("credential", e.name),
			zap.String("subject", sl.key.subject), zap.String("id", tok.id))
	case old.tok.id != tok.id:
		m.log.Info("credential rotated", zap.String("credential", e.name),
			zap.String("subject", sl.key.subject), zap.String("old_id", old.tok.id), zap.String("id", tok.id))
	}
	return tok, nil
}

// callProvider calls the provider, turning a panic into an error. Singleflight would otherwise
// re-panic on a fresh goroutine and take the process down. The panic value is not included: it
// could hold anything, the secret too.
func (m *Manager) callProvider(ctx context.Context, e *entry, sl *slot) (tok Token, err error) {
	defer func() {
		if r := recover(); r != nil {
			tok, err = Token{}, fmt.Errorf("provider panicked (%T)", r)
		}
	}()
	return e.p.Fetch(ctx, FetchArgs{Name: e.name, Subject: sl.key.subject, Scope: sl.key.scope})
}

// check validates what a provider returned.
func (m *Manager) check(tok Token, now time.Time) error {
	if err := checkToken(tok); err != nil {
		return fmt.Errorf("provider returned an unusable credential: %w", err)
	}
	if exp := tok.expiresAt; !exp.IsZero() && !now.Before(exp) {
		return fmt.Errorf("provider returned a credential that expired at %s", exp.UTC().Format(time.RFC3339))
	}
	return nil
}

// publish stores ns unless forget ran since the fetch started; it returns the state replaced.
// The Staler check restarts its interval from now.
func (m *Manager) publish(sl *slot, gen uint64, ns *state, now time.Time) *state {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.gen != gen {
		return nil
	}
	sl.nextCheck.Store(now.UnixNano() + int64(m.recheckEvery))
	return sl.state.Swap(ns)
}

// publishFailure records a failed fetch. A token that is still within its lifetime and was not
// reported stale stays servable (a failed refresh ahead of expiry); anything else is dropped.
func (m *Manager) publishFailure(sl *slot, gen uint64, ferr error, now time.Time) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.gen != gen {
		return
	}
	ns := &state{failErr: ferr}
	if m.failureBackoff > 0 {
		ns.failUntil = now.Add(m.failureBackoff)
	}
	if old := sl.state.Load(); old != nil && old.has {
		exp := old.tok.expiresAt
		if !exp.IsZero() && now.Before(exp) && !now.Before(old.refreshAt) {
			ns.tok, ns.has, ns.refreshAt = old.tok, true, old.refreshAt
		}
	}
	sl.state.Store(ns)
}

// forget drops the slot's token and remembered failure; a fetch running is not stored, and the
// next Get starts a new one rather than joining it.
func (sl *slot) forget() {
	sl.mu.Lock()
	sl.gen++
	sl.state.Store(nil)
	sl.nextCheck.Store(0)
	sl.mu.Unlock()
	sl.sf.Forget("")
}

// forget drops every key of e.
func (e *entry) forget() {
	e.mu.Lock()
	old := *e.keys.Swap(&map[subKey]*slot{})
	e.mu.Unlock()
	for _, sl := range old {
		sl.forget()
	}
	e.one.forget()
}

// Forget drops every cached token (and any remembered failure) of the credential name, for
// every subject and scope, so the next Get fetches again. A fetch already running is not
// stored; its current waiters still receive its result.
func (m *Manager) Forget(name string) {
	if e := (*m.entries.Load())[name]; e != nil {
		e.forget()
	}
}

// Warm fetches every credential once, concurrently, for Request{Name: name} (no subject: a
// static secret's one entry; a per-caller provider is warmed for the empty subject), and returns
// the failures joined, sorted by name; each names its credential and cause, never a secret. Use
// it at start-up so a broken credential is reported before the first request.
func (m *Manager) Warm(ctx context.Context) error {
	names := m.Names()
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Go(func() {
			_, errs[i] = m.Get(ctx, Request{Name: n})
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitBackground waits for background refreshes; for tests.
func (m *Manager) waitBackground() { m.bg.Wait() }
