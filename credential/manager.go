package credential

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
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
	DefaultRefreshAhead   = 60 * time.Second
	DefaultFailureBackoff = time.Second
	DefaultMaxBackoff     = 30 * time.Second
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
	// RefreshAhead: an expiring token is also refreshed once less than this remains, whatever
	// its lifetime (but never earlier than half-way through it, so a short-lived token is not
	// refetched on every request). Default DefaultRefreshAhead; negative disables it.
	RefreshAhead time.Duration
	// FailureBackoff is how long a failed fetch is remembered: during it, Get answers the same
	// ErrUnavailable error at once (or keeps serving a still-valid token) instead of calling the
	// provider again, so a failing upstream is not hammered. Each consecutive failure of a key
	// doubles it, up to MaxBackoff, and it is stretched by a random factor in [1, 1.5) so that
	// many keys failing together do not retry in lockstep. Per the Now clock. Default
	// DefaultFailureBackoff; negative disables it.
	FailureBackoff time.Duration
	// MaxBackoff caps the doubled FailureBackoff (before jitter). Default DefaultMaxBackoff.
	MaxBackoff time.Duration
	// Rand returns a number in [0, 1) for the backoff jitter; default math/rand/v2's Float64.
	// Tests pin it.
	Rand func() float64
	// Observer is told about fetches, the cache's size and token expiries (metrics). Default:
	// nothing.
	Observer Observer
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

// Observer receives what the Manager measures. Its methods are called synchronously from
// fetches (never from a cache hit), so they must be cheap and safe for concurrent use. The
// proxy implements it with Prometheus metrics; credential does not import them.
type Observer interface {
	// Fetched is called once per call to a provider (one exchange with its endpoint), with the
	// provider's kind (KindOf: "oauth2", "aws", ...; a closed set), whether it succeeded and how
	// long it took. Cache hits are not fetches.
	Fetched(provider string, ok bool, d time.Duration)
	// Expires is called after a successful fetch with the credential's name (from the
	// configuration: a closed set) and the new token's expiry; the zero time for a token that
	// does not expire.
	Expires(credential string, at time.Time)
}

type nopObserver struct{}

func (nopObserver) Fetched(string, bool, time.Duration) {}
func (nopObserver) Expires(string, time.Time)           {}

// Revoker is implemented by providers whose tokens can be revoked at their issuer before they
// expire (GitHub installation tokens, Vault tokens and their leases, OAuth2 and token exchange
// access tokens when a revocation_url is configured: RFC 7009). The Manager calls Revoke
// for a token it drops (Forget, ForgetKey, ForgetSubject, an Update that removes or replaces
// the credential, eviction) and for every token it holds on Close. A token replaced by a
// refresh is not revoked: requests already sent may still be using it, and it expires soon.
// Revoke must be safe for concurrent use and must not put the secret into its error.
type Revoker interface {
	Revoke(ctx context.Context, tok Token) error
}

// Kinder is implemented by providers that name their kind ("oauth2", "aws", ...): the
// provider label of metrics and the credential_provider of audit records.
type Kinder interface {
	Kind() string
}

// KindOf returns p's kind: Kind() if p implements Kinder, else "custom".
func KindOf(p Provider) string {
	if k, ok := p.(Kinder); ok {
		return k.Kind()
	}
	return "custom"
}

// Manager caches tokens per cache key and fetches through the credential's Provider when the
// cached token is missing, expiring, expired or stale. It is safe for concurrent use.
//
// The cache key is (Name, Subject, Scope) of the Request, or Name alone for a Shared provider
// (a static secret keeps one entry per name). For a Delegated provider it is (Name, Subject,
// Scope, SHA-256 of the presented delegation token), and a Request without one is refused. Keys other than (Name, "", "") are bounded
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
	refreshAhead   time.Duration
	failureBackoff time.Duration
	maxBackoff     time.Duration
	rand           func() float64
	fetchTimeout   time.Duration
	maxKeys        int
	log            *zap.Logger
	obs            Observer

	cached atomic.Int64   // servable tokens, for Len
	bg     sync.WaitGroup // background refreshes and revocations
	closed atomic.Bool
}

// entry is one configured credential: its provider and its cached keys.
type entry struct {
	name   string
	kind   string // KindOf(p)
	p      Provider
	rev    Revoker // p as a Revoker, or nil
	staler Staler  // p as a Staler, or nil
	shared bool    // p is Shared: every caller gets the one slot below
	deleg  bool    // p is Delegated: keys carry the presented token's digest

	one slot // the key (Name, "", ""), and the only one of a Shared provider

	mu   sync.Mutex                       // serialises writers of keys
	keys atomic.Pointer[map[subKey]*slot] // copy-on-write, at most maxKeys
	hot  atomic.Pointer[slot]             // the key used last, while it is in keys
}

// subKey is a cache key below the name. presented is the SHA-256 of the presented delegation
// token (Delegated providers only), so tokens minted for two presented tokens never mix.
type subKey struct{ subject, scope, presented string }

// lruResolution is how stale a key's last-use time may be (for eviction).
const lruResolution = int64(100 * time.Millisecond)

// slot caches the token of one key.
type slot struct {
	key subKey
	m   *Manager

	state      atomic.Pointer[state] // nil: nothing cached
	nextCheck  atomic.Int64          // unix nanos of the next Stale check
	refreshing atomic.Bool           // a background refresh is running
	lastUsed   atomic.Int64          // unix nanos of the latest Get, for eviction
	removed    atomic.Bool           // taken out of its entry's keys (never for entry.one)
	sf         singleflight.Group    // one fetch at a time, under the key ""

	mu      sync.Mutex // serialises writers of state against forget
	gen     uint64     // bumped by forget; a fetch started under an older gen is not stored
	killGen uint64     // gen of the latest kill (ForgetKey, ForgetSubject, Close)
}

// state is immutable once published.
type state struct {
	tok       Token
	has       bool      // tok is servable (subject to expiry)
	refreshAt time.Time // for expiring tokens: start refreshing from here
	failUntil time.Time // last fetch failed: don't call the provider again before this
	failErr   error     // that failure, as returned to callers
	failures  int       // consecutive failed fetches, for the backoff
}

// NewManager returns a Manager for the given credentials, as Update would set them.
func NewManager(providers map[string]Provider, o Options) *Manager {
	m := &Manager{
		now:            o.Now,
		recheckEvery:   o.RecheckEvery,
		refreshBefore:  o.RefreshBefore,
		refreshAhead:   o.RefreshAhead,
		failureBackoff: o.FailureBackoff,
		maxBackoff:     o.MaxBackoff,
		rand:           o.Rand,
		fetchTimeout:   o.FetchTimeout,
		maxKeys:        o.MaxKeysPerName,
		log:            o.Logger,
		obs:            o.Observer,
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
	if m.refreshAhead == 0 {
		m.refreshAhead = DefaultRefreshAhead
	}
	if m.failureBackoff == 0 {
		m.failureBackoff = DefaultFailureBackoff
	}
	if m.maxBackoff <= 0 {
		m.maxBackoff = DefaultMaxBackoff
	}
	if m.rand == nil {
		m.rand = rand.Float64
	}
	if m.obs == nil {
		m.obs = nopObserver{}
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
	e := &entry{name: name, kind: KindOf(p), p: p}
	e.one.m = m
	if r, ok := p.(Revoker); ok {
		e.rev = r
	}
	if s, ok := p.(Staler); ok && m.recheckEvery > 0 {
		e.staler = s
	}
	if sh, ok := p.(Shared); ok {
		e.shared = sh.Shared()
	}
	if dl, ok := p.(Delegated); ok && !e.shared {
		e.deleg = dl.Delegated()
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
// waiters and is not stored. To keep tokens across a configuration reload, pass the previous
// Provider value again for every credential whose configuration did not change.
func (m *Manager) Update(providers map[string]Provider) {
	if m.closed.Load() {
		return
	}
	m.update(providers)
}

func (m *Manager) update(providers map[string]Provider) {
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
			m.revoke(e, e.forget()) // free its tokens; fetches in flight for it are not stored
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
		if m.closed.Load() {
			return Token{}, unavailable(r.Name, errClosed)
		}
		return Token{}, &Error{Name: r.Name, Kind: ErrUnknown}
	}
	now := m.now()
	sl := &e.one
	switch {
	case e.deleg:
		if r.Delegation == "" {
			return Token{}, unavailable(r.Name, errNoDelegation)
		}
		sl = m.slotFor(e, subKey{r.Subject, r.Scope, r.Delegation.key()}, now)
	case !e.shared && (r.Subject != "" || r.Scope != ""):
		sl = m.slotFor(e, subKey{r.Subject, r.Scope, ""}, now)
	}
	pres := r.Delegation
	if !e.deleg {
		pres = "" // a provider sees exactly the key its token is cached under
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
			return m.fetchWait(ctx, e, sl, s, pres)
		}
		if now.Before(exp) {
			m.refreshInBackground(ctx, e, sl, s, now, pres)
			return s.tok, nil
		}
		// Expired: never served. Fall through to a fetch.
	}
	if s != nil && s.failErr != nil && now.Before(s.failUntil) {
		return Token{}, s.failErr
	}
	return m.fetchWait(ctx, e, sl, s, pres)
}

// slotFor returns the slot of key, adding it (and dropping the least recently used key when the
// name is full) if it is new, and marks it used at now.
func (m *Manager) slotFor(e *entry, key subKey, now time.Time) *slot {
	n := now.UnixNano()
	// A sidecar serves one workload, mostly: the key used last is checked before the map.
	sl := e.hot.Load()
	if sl == nil || sl.key != key || sl.removed.Load() {
		if sl = (*e.keys.Load())[key]; sl != nil && e.hot.Load() != sl {
			e.hot.Store(sl)
		}
	}
	if sl != nil {
		// Write only when it moved on by lruResolution: hits in between neither write nor
		// contend on the cache line, and eviction needs no finer order.
		if sl.lastUsed.Load()+lruResolution <= n {
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
	sl = &slot{key: key, m: m}
	sl.lastUsed.Store(n)
	next[key] = sl
	e.keys.Store(&next)
	if victim != nil {
		victim.removed.Store(true)
		if tok, ok := victim.forget(); ok {
			m.revoke(e, []Token{tok})
		}
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
// pres is the presented token of a Delegated provider's key ("" otherwise): every caller that
// reaches sl's singleflight presented the same one, since its digest is in the key.
func (m *Manager) fetchWait(ctx context.Context, e *entry, sl *slot, seen *state, pres Presented) (Token, error) {
	ch := sl.sf.DoChan("", func() (any, error) { return m.fetch(ctx, e, sl, seen, pres) })
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
func (m *Manager) refreshInBackground(ctx context.Context, e *entry, sl *slot, s *state, now time.Time, pres Presented) {
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
		_, _, _ = sl.sf.Do("", func() (any, error) { return m.fetch(ctx, e, sl, s, pres) })
	}()
}

// fetch runs inside the singleflight: it calls the provider, validates the result and publishes
// the new state. Its result goes to every waiter.
//
// seen is the state the caller found wanting. If another fetch has published since (the caller
// missed, and reached the singleflight just after that fetch finished), its fresh token or its
// failure within the backoff is the answer: one provider call per key, not two.
func (m *Manager) fetch(ctx context.Context, e *entry, sl *slot, seen *state, pres Presented) (tok Token, err error) {
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
	start := time.Now()
	tok, err = m.callProvider(fctx, e, sl, pres)
	m.obs.Fetched(e.kind, err == nil, time.Since(start))
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
		ns.refreshAt = m.refreshAt(now, tok.expiresAt)
	}
	old, stored := m.publish(sl, gen, ns, now)
	if !stored {
		sl.mu.Lock()
		killed := sl.killGen > gen
		sl.mu.Unlock()
		if killed {
			// Killed (ForgetKey, ForgetSubject, Close) while it was being fetched: its waiters
			// get no token (fail closed) and it is revoked like any other dropped token.
			m.revoke(e, []Token{tok})
			return Token{}, unavailable(e.name, errDropped)
		}
		// Dropped by Forget, Update or eviction: its waiters still get it; nobody else will.
		return tok, nil
	}
	m.obs.Expires(e.name, tok.expiresAt)
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
func (m *Manager) callProvider(ctx context.Context, e *entry, sl *slot, pres Presented) (tok Token, err error) {
	defer func() {
		if r := recover(); r != nil {
			tok, err = Token{}, fmt.Errorf("provider panicked (%T)", r)
		}
	}()
	return e.p.Fetch(ctx, FetchArgs{Name: e.name, Subject: sl.key.subject, Scope: sl.key.scope, Delegation: pres})
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

// refreshAt is when a token fetched at now and expiring at exp starts being refreshed: once
// RefreshBefore of its lifetime, or RefreshAhead, remains, whichever comes first, but not
// before half its lifetime has passed.
func (m *Manager) refreshAt(now, exp time.Time) time.Time {
	life := exp.Sub(now)
	ahead := time.Duration(float64(life) * m.refreshBefore)
	if m.refreshAhead > ahead {
		ahead = min(m.refreshAhead, life/2)
	}
	return exp.Add(-ahead)
}

// backoff is how long to wait after the failures-th consecutive failure: FailureBackoff
// doubled per failure up to MaxBackoff, stretched by a random factor in [1, 1.5).
func (m *Manager) backoff(failures int) time.Duration {
	d := m.failureBackoff
	for i := 1; i < failures && d < m.maxBackoff; i++ {
		d *= 2
	}
	d = min(d, max(m.maxBackoff, m.failureBackoff))
	return d + time.Duration(m.rand()*float64(d)/2)
}

// publish stores ns unless forget ran since the fetch started; it returns the state replaced
// and whether ns was stored. The Staler check restarts its interval from now.
func (m *Manager) publish(sl *slot, gen uint64, ns *state, now time.Time) (*state, bool) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.gen != gen {
		return nil, false
	}
	sl.nextCheck.Store(now.UnixNano() + int64(m.recheckEvery))
	old := sl.state.Swap(ns)
	sl.counted(old, ns)
	return old, true
}

// counted keeps Manager.cached in step with a state change of sl (under sl.mu).
func (sl *slot) counted(old, ns *state) {
	was, is := old != nil && old.has, ns != nil && ns.has
	if was == is || sl.m == nil {
		return
	}
	if was {
		sl.m.cached.Add(-1)
	} else {
		sl.m.cached.Add(1)
	}
}

// Len returns the number of servable tokens cached, over every credential and key (the
// escrow_credential_cache_entries gauge: read it at scrape time).
func (m *Manager) Len() int { return int(m.cached.Load()) }

// publishFailure records a failed fetch. A token that is still within its lifetime and was not
// reported stale stays servable (a failed refresh ahead of expiry); anything else is dropped.
func (m *Manager) publishFailure(sl *slot, gen uint64, ferr error, now time.Time) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.gen != gen {
		return
	}
	old := sl.state.Load()
	ns := &state{failErr: ferr, failures: 1}
	if old != nil && old.failErr != nil {
		ns.failures = old.failures + 1
	}
	if m.failureBackoff > 0 {
		ns.failUntil = now.Add(m.backoff(ns.failures))
	}
	if old != nil && old.has {
		exp := old.tok.expiresAt
		if !exp.IsZero() && now.Before(exp) && !now.Before(old.refreshAt) {
			ns.tok, ns.has, ns.refreshAt = old.tok, true, old.refreshAt
		}
	}
	sl.state.Store(ns)
	sl.counted(old, ns)
}

// forget drops the slot's token and remembered failure; a fetch running is not stored, and the
// next Get starts a new one rather than joining it. It returns the token dropped, if any.
func (sl *slot) forget() (Token, bool) { return sl.drop(false) }

// kill is forget for a revocation: a fetch running also answers its waiters with an error.
func (sl *slot) kill() (Token, bool) { return sl.drop(true) }

func (sl *slot) drop(kill bool) (Token, bool) {
	sl.mu.Lock()
	sl.gen++
	if kill {
		sl.killGen = sl.gen
	}
	old := sl.state.Swap(nil)
	sl.counted(old, nil)
	sl.nextCheck.Store(0)
	sl.mu.Unlock()
	sl.sf.Forget("")
	if old != nil && old.has {
		return old.tok, true
	}
	return Token{}, false
}

// forget drops every key of e and returns the tokens dropped.
func (e *entry) forget() []Token {
	e.mu.Lock()
	old := *e.keys.Swap(&map[subKey]*slot{})
	for _, sl := range old {
		sl.removed.Store(true)
	}
	e.mu.Unlock()
	var toks []Token
	for _, sl := range old {
		if tok, ok := sl.forget(); ok {
			toks = append(toks, tok)
		}
	}
	if tok, ok := e.one.forget(); ok {
		toks = append(toks, tok)
	}
	return toks
}

// killWhere drops the keys of e for which drop reports true, failing fetches in flight for
// them, and returns their tokens.
func (e *entry) killWhere(drop func(subKey) bool) []Token {
	e.mu.Lock()
	cur := *e.keys.Load()
	next := make(map[subKey]*slot, len(cur))
	var gone []*slot
	for k, sl := range cur {
		if drop(k) {
			sl.removed.Store(true)
			gone = append(gone, sl)
		} else {
			next[k] = sl
		}
	}
	if len(gone) > 0 {
		e.keys.Store(&next)
	}
	e.mu.Unlock()
	var toks []Token
	for _, sl := range gone {
		if tok, ok := sl.kill(); ok {
			toks = append(toks, tok)
		}
	}
	if drop(e.one.key) {
		if tok, ok := e.one.kill(); ok {
			toks = append(toks, tok)
		}
	}
	return toks
}

// revoke revokes toks at e's issuer in the background, if its provider is a Revoker. Failures
// are logged (by token ID) and otherwise ignored: the token expires on its own.
func (m *Manager) revoke(e *entry, toks []Token) {
	if e.rev == nil || len(toks) == 0 {
		return
	}
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		for _, tok := range toks {
			ctx, cancel := context.WithTimeout(context.Background(), m.fetchTimeout)
			err := e.rev.Revoke(ctx, tok)
			cancel()
			if err != nil {
				m.log.Warn("credential revocation failed; it stays valid until it expires",
					zap.String("credential", e.name), zap.String("id", tok.id), zap.Error(err))
				continue
			}
			m.log.Info("credential revoked", zap.String("credential", e.name), zap.String("id", tok.id))
		}
	}()
}

// Forget drops every cached token (and any remembered failure) of the credential name, for
// every subject and scope, so the next Get fetches again; tokens whose provider can revoke
// them are revoked at their issuer (in the background). A fetch already running is not
// stored; its current waiters still receive its result. To fail those too (a kill switch), use
// ForgetKey or ForgetSubject.
func (m *Manager) Forget(name string) {
	if e := (*m.entries.Load())[name]; e != nil {
		m.revoke(e, e.forget())
	}
}

// ForgetKey drops the one cached token of r's key (Name, Subject, Scope; or Name alone for a
// Shared provider), revoking it like Forget. A fetch running for the key answers its waiters
// with ErrUnavailable, and its token is revoked.
func (m *Manager) ForgetKey(r Request) {
	e := (*m.entries.Load())[r.Name]
	if e == nil {
		return
	}
	k := subKey{r.Subject, r.Scope, ""}
	switch {
	case e.shared:
		k = subKey{}
	case e.deleg:
		k.presented = r.Delegation.key()
	}
	m.revoke(e, e.killWhere(func(x subKey) bool { return x == k }))
}

// ForgetSubject drops every cached token minted for the SPIFFE ID subject, of every credential
// and scope, at once (the kill switch for one workload), revoking them like Forget. Shared
// providers' tokens do not belong to any subject and are kept. An empty subject drops nothing.
// Fetches running for the subject answer their waiters with ErrUnavailable, and their tokens
// are revoked. It returns how many cached tokens were dropped.
func (m *Manager) ForgetSubject(subject string) int {
	if subject == "" {
		return 0
	}
	n := 0
	for _, e := range *m.entries.Load() {
		if e.shared {
			continue
		}
		toks := e.killWhere(func(k subKey) bool { return k.subject == subject })
		n += len(toks)
		m.revoke(e, toks)
	}
	return n
}

// Close drops every credential and cached token, revokes those whose provider can revoke them,
// and waits (up to ctx) for background refreshes and the revocations. Afterwards Get returns
// ErrUnavailable. Close is for shutdown; it is safe to call more than once.
func (m *Manager) Close(ctx context.Context) error {
	m.closed.Store(true)
	for _, e := range *m.entries.Load() {
		m.revoke(e, e.killWhere(func(subKey) bool { return true }))
	}
	m.update(nil)
	done := make(chan struct{})
	go func() { m.bg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("credential: close: revocations still running: %w", ctx.Err())
	}
}

// Kind returns the provider kind of the credential name (KindOf), or "" if there is none.
func (m *Manager) Kind(name string) string {
	if e := (*m.entries.Load())[name]; e != nil {
		return e.kind
	}
	return ""
}

// WarmOptions says for whom Warm fetches. It is a struct so it can grow.
type WarmOptions struct {
	// Subject is the SPIFFE ID the coming requests will carry: in a sidecar, its own
	// workload's, which every request is made as. Per-caller credentials are fetched for it;
	// "" (not known yet) skips them.
	Subject string
}

// Warm fetches, concurrently, exactly the tokens the first requests will reuse, and returns the
// failures joined, sorted by name; each names its credential and cause, never a secret. Use it
// at start-up so a broken credential is reported before the first request.
//
//   - A Shared credential (a static secret) is fetched once: every caller gets that entry.
//   - A per-caller credential is fetched for o.Subject, the key a request carrying that subject
//     uses. Without a subject it is skipped: a token minted for no subject would be cached
//     under a key no request uses (and may be refused upstream for want of one).
//   - A Delegated credential, minted only for a token the caller presents, is skipped.
func (m *Manager) Warm(ctx context.Context, o WarmOptions) error {
	entries := *m.entries.Load()
	names := m.Names()
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		e := entries[n]
		r := Request{Name: n}
		switch {
		case e == nil || e.deleg:
			continue
		case !e.shared:
			if o.Subject == "" {
				continue
			}
			r.Subject = o.Subject
		}
		wg.Go(func() {
			_, errs[i] = m.Get(ctx, r)
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

var (
	errClosed  = errors.New("the credential manager is closed")
	errDropped = errors.New("the credential was dropped while it was being fetched")
	// errNoDelegation: the credential trades the delegation token the caller presents, and
	// this request presented none.
	errNoDelegation = errors.New("no delegation token was presented, and this credential exchanges it")
)

// waitBackground waits for background refreshes and revocations; for tests.
func (m *Manager) waitBackground() { m.bg.Wait() }
