package policy

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	cedar "github.com/cedar-policy/cedar-go"
	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/attest"
)

// Mode says whether decisions are enforced.
type Mode string

const (
	// ModeEnforce denies what the policy denies.
	ModeEnforce Mode = "enforce"
	// ModeReport lets through what the policy would deny and says so (Decision.WouldDeny).
	ModeReport Mode = "report"
)

// ParseMode parses a mode name; "" is ModeEnforce.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case "", ModeEnforce:
		return ModeEnforce, nil
	case ModeReport:
		return ModeReport, nil
	}
	return "", fmt.Errorf("policy: unknown mode %q (want %q or %q)", s, ModeEnforce, ModeReport)
}

// Input is one outbound request to decide on.
type Input struct {
	Identity   attest.Identity
	Action     string // HTTP method ("GET", "POST", ...) or "connect" for a blind tunnel
	Scheme     string // "http" | "https"
	Host       string // lower-case host name or IP literal
	Port       int
	Path       string // request path ("" for connect)
	Credential string // the route's credential name, "" if none
	Time       time.Time
}

// Reason is the stable, machine-readable outcome of a decision.
type Reason string

const (
	ReasonAllowed     Reason = "allowed"
	ReasonDenied      Reason = "policy_denied"
	ReasonError       Reason = "policy_error"
	ReasonUnavailable Reason = "policy_unavailable"
)

// Decision is the engine's answer for one request.
type Decision struct {
	// Allow is the effective decision: true if Cedar allowed, or if the mode is report (then
	// WouldDeny is true).
	Allow bool
	// Reason is what Cedar decided, even in report mode.
	Reason Reason
	// PolicyIDs are the @id of the determining policies: the permits on allow, the forbids on
	// an explicit deny, the erroring policies on ReasonError; empty on a default deny.
	PolicyIDs []string
	Mode      Mode
	// WouldDeny is true when report mode allowed something enforce mode would deny.
	WouldDeny bool
	// Errors are evaluation errors, for logs only (never sent to the agent).
	Errors []string
}

// Options configure an Engine.
type Options struct {
	// Mode is ModeEnforce (also for "" and any unknown value) or ModeReport.
	Mode Mode
	// OnReload is called after every load attempt with "success" or "failure" (and the
	// error), so the caller can count reloads without this package importing Prometheus.
	// It is called from the goroutine that loaded (LoadDir's caller or Watch), after the
	// new set is in force, and never while a lock is held.
	OnReload func(result string, err error)
	// Logger may be nil (no logging).
	Logger *zap.Logger
	// Now is the clock used when Input.Time is zero; default time.Now.
	Now func() time.Time
}

// Engine holds the current policy set and decides on requests. It is safe for concurrent use.
type Engine struct {
	mode     Mode
	onReload func(string, error)
	log      *zap.Logger
	now      func() time.Time

	set        atomic.Pointer[compiledSet]
	loadMu     sync.Mutex // serialises loads so reloads are applied in order
	principals principalCache
	bufs       sync.Pool // *[]int32 scratch for candidate lists

	// unindexed makes Decide evaluate the full set (tests and the baseline benchmark).
	unindexed bool
}

// NewEngine returns an engine with no policy set loaded: it denies everything
// (ReasonUnavailable) until LoadDir succeeds.
func NewEngine(o Options) *Engine {
	e := &Engine{mode: ModeEnforce, onReload: o.OnReload, log: o.Logger, now: o.Now}
	if e.log == nil {
		e.log = zap.NewNop()
	}
	if e.now == nil {
		e.now = time.Now
	}
	switch o.Mode {
	case ModeReport:
		e.mode = ModeReport
	case "", ModeEnforce:
	default:
		e.log.Warn("unknown policy mode, enforcing", zap.String("mode", string(o.Mode)))
	}
	e.bufs.New = func() any { b := make([]int32, 0, 16); return &b }
	return e
}

// Mode returns the engine's effective mode.
func (e *Engine) Mode() Mode { return e.mode }

// Ready reports whether a policy set has been loaded.
func (e *Engine) Ready() bool { return e.set.Load() != nil }

// Info returns the short content hash of the loaded set and its number of policies
// ("", 0 before the first successful load).
func (e *Engine) Info() (version string, policies int) {
	s := e.set.Load()
	if s == nil {
		return "", 0
	}
	return s.version, len(s.ids)
}

// LoadDir loads dir (see the package documentation). On any error the new set is rejected
// whole, the last good one stays in force, and the error (a *LoadError listing every problem,
// or an I/O error) is returned. OnReload is called either way.
func (e *Engine) LoadDir(dir string) error {
	e.loadMu.Lock()
	src, err := readSource(dir)
	err = e.install(src, err)
	e.loadMu.Unlock()
	e.reported(err)
	return err
}

// install compiles src and swaps it in; the caller holds loadMu.
func (e *Engine) install(src *source, readErr error) error {
	if readErr != nil {
		e.log.Error("policy reload failed; keeping the last good set", zap.String("version", e.version()), zap.Error(readErr))
		return readErr
	}
	set, err := compile(src)
	if err != nil {
		e.log.Error("policy reload failed; keeping the last good set", zap.String("dir", src.dir), zap.String("version", e.version()), zap.Error(err))
		return err
	}
	old := e.set.Swap(set)
	prev := ""
	if old != nil {
		prev = old.version
	}
	e.log.Info("policy set loaded", zap.String("dir", src.dir), zap.String("version", set.version),
		zap.String("previous_version", prev), zap.Int("policies", len(set.ids)))
	return nil
}

func (e *Engine) reported(err error) {
	if e.onReload == nil {
		return
	}
	if err != nil {
		e.onReload("failure", err)
	} else {
		e.onReload("success", nil)
	}
}

func (e *Engine) version() string {
	v, _ := e.Info()
	return v
}

// Watch polls dir every interval (default 5s if every <= 0) and reloads when the content of
// its *.cedar files or schema changes (or when it differs from the loaded set at the start).
// A change is loaded only once it has settled (seen the same on two consecutive polls): a file
// caught half-written must neither be reported as broken nor, worse, load as a truncated set
// that lost its trailing forbid. A change that fails to load is reported once (log and
// OnReload), not on every poll. Watch returns when ctx ends.
func (e *Engine) Watch(ctx context.Context, dir string, every time.Duration) {
	if every <= 0 {
		every = 5 * time.Second
	}
	last, pending := "", ""
	if s := e.set.Load(); s != nil {
		last = s.hash
	}
	check := func() {
		e.loadMu.Lock()
		src, err := readSource(dir)
		state := ""
		if err != nil {
			state = "error: " + err.Error()
		} else {
			state = src.hash
		}
		switch {
		case state == last:
			pending = ""
			e.loadMu.Unlock()
			return
		case state != pending:
			pending = state // wait one more poll for the change to settle
			e.loadMu.Unlock()
			return
		}
		last, pending = state, ""
		err = e.install(src, err)
		e.loadMu.Unlock()
		e.reported(err)
	}
	check()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			check()
		}
	}
}

// Decide decides on one request. It never blocks on a reload: it evaluates against the set
// in force when it starts. ctx is currently unused (evaluation is bounded and fast).
func (e *Engine) Decide(_ context.Context, in Input) Decision {
	s := e.set.Load()
	if s == nil {
		// Report mode is about policy decisions; with no policy at all we deny.
		return Decision{Reason: ReasonUnavailable, Mode: e.mode}
	}
	r, err := buildRequest(&e.principals, in, e.now)
	if err != nil {
		// An input we cannot build a request from is a caller bug: deny in every mode.
		return Decision{Reason: ReasonError, Mode: e.mode, Errors: []string{err.Error()}}
	}
	var d Decision
	if e.unindexed {
		d = decisionFrom(cedar.Authorize(s.full, r, r.req))
	} else {
		bp := e.bufs.Get().(*[]int32)
		ss := subset{ids: s.ids, pols: s.pols, idx: s.idx.candidates(r, (*bp)[:0])}
		d = decisionFrom(cedar.Authorize(&ss, r, r.req))
		*bp = ss.idx[:0]
		e.bufs.Put(bp)
	}
	d.Mode = e.mode
	if e.mode == ModeReport && !d.Allow {
		d.Allow, d.WouldDeny = true, true
	}
	return d
}

// decisionFrom maps Cedar's answer to a Decision (enforce semantics): any evaluation error
// denies, because Cedar skips an erroring policy, even a forbid.
func decisionFrom(dec cedar.Decision, diag cedar.Diagnostic) Decision {
	if len(diag.Errors) > 0 {
		d := Decision{Reason: ReasonError, PolicyIDs: make([]string, 0, len(diag.Errors)), Errors: make([]string, len(diag.Errors))}
		for i, de := range diag.Errors {
			d.Errors[i] = de.String()
			if id := string(de.PolicyID); !slices.Contains(d.PolicyIDs, id) {
				d.PolicyIDs = append(d.PolicyIDs, id)
			}
		}
		return d
	}
	d := Decision{Allow: dec == cedar.Allow, Reason: ReasonDenied}
	if d.Allow {
		d.Reason = ReasonAllowed
	}
	if len(diag.Reasons) > 0 {
		d.PolicyIDs = make([]string, len(diag.Reasons))
		for i, r := range diag.Reasons {
			d.PolicyIDs[i] = string(r.PolicyID)
		}
	}
	return d
}
