package policy

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	cedar "github.com/cedar-policy/cedar-go"
	"go.uber.org/zap"

	"github.com/escrowproxy/escrow/attest"
)

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

	// Resource is the entity the action is on; the zero value is Host::"<Host>". MCP calls
	// name a Tool, Resource or Prompt whose parent is the host.
	Resource Resource
	// Upgrade is the protocol the request upgrades to ("websocket"), or "" (context.upgrade).
	Upgrade string
	// Caller is the calling process (context.caller), nil when unknown or not enabled.
	Caller *attest.Process
	// Delegation is the verified delegation chain (context.delegation), nil when none.
	Delegation *attest.Delegation
	// MCP is the MCP call being decided (context.mcp), nil for plain HTTP requests.
	MCP *MCPCall
}

// Resource names the entity of an MCP decision: Type is TypeTool, TypeResource or TypePrompt
// and ID is "<host>/<name or uri>"; its parent is Host::"<host>".
type Resource struct {
	Type string
	ID   string
}

// MCPCall is one JSON-RPC call to an MCP server (context.mcp).
type MCPCall struct {
	// Method is the JSON-RPC method: "tools/call", "resources/read" or "prompts/get".
	Method string
	// Name is the tool or prompt name, or the resource URI.
	Name string
	// Arguments is the call's arguments object as decoded by encoding/json with UseNumber
	// (map[string]any, []any, string, json.Number, bool, nil); nil when absent. The engine
	// converts it to a Cedar record, bounded in depth and size.
	Arguments map[string]any
}

// Reason is the stable, machine-readable outcome of a decision.
type Reason string

const (
	ReasonAllowed     Reason = "allowed"
	ReasonDenied      Reason = "policy_denied"
	ReasonError       Reason = "policy_error"
	ReasonUnavailable Reason = "policy_unavailable"
)

// Decision is the engine's answer for one request, with enforce semantics: whether a denial
// is enforced (report mode) is the caller's choice, guided by [Decision.Overridable].
type Decision struct {
	// Allow is Cedar's verdict: true only if a permit matched, no forbid matched and nothing
	// errored.
	Allow bool
	// Reason says why.
	Reason Reason
	// PolicyIDs are the @id of the determining policies: the permits on allow, the forbids on
	// an explicit deny, the erroring policies on ReasonError; empty on a default deny.
	PolicyIDs []string
	// Errors are evaluation errors, for logs only (never sent to the agent).
	Errors []string

	// final marks a ReasonError that did not come from evaluating a policy (an input the
	// engine could not build a Cedar request from: a caller bug, or MCP arguments over the
	// bounds), never overridable. A bool
	// rather than a Reason of its own, because the machine-readable reason stays policy_error
	// and two constants with one string would compare equal.
	final bool
}

// Overridable reports whether report mode may let this denial through: true for a policy
// denial (ReasonDenied) and for an error raised while evaluating the policies (ReasonError);
// false for an allowed decision (nothing to override), with no policy set loaded
// (ReasonUnavailable), and for an input the engine could not build a request from (also
// ReasonError, but a caller bug or MCP arguments over MaxArgumentsDepth/MaxArgumentsValues
// rather than a policy outcome). Report mode is about what the
// policies decide, so only their outcomes may be overridden.
func (d Decision) Overridable() bool {
	switch d.Reason {
	case ReasonDenied:
		return true
	case ReasonError:
		return !d.final
	}
	return false
}

// Options configure an Engine.
type Options struct {
	// OnReload is called after every load attempt with "success" or "failure" (and the
	// error), so the caller can count reloads without this package importing Prometheus.
	// It is called from the goroutine that loaded (the caller of Load, LoadDir or Install, or
	// Watch), after the new set is in force, and never while a lock is held.
	OnReload func(result string, err error)
	// Logger may be nil (no logging).
	Logger *zap.Logger
	// Now is the clock used when Input.Time is zero; default time.Now.
	Now func() time.Time
}

// Engine holds the current policy set and decides on requests. It is safe for concurrent use.
type Engine struct {
	onReload func(string, error)
	log      *zap.Logger
	now      func() time.Time

	set        atomic.Pointer[Set]
	loadMu     sync.Mutex // serialises loads so that they take effect in the order they were made
	principals principalCache
	bufs       sync.Pool // *[]int32 scratch for candidate lists

	// unindexed makes Decide evaluate the full set (tests and the baseline benchmark).
	unindexed bool
}

// NewEngine returns an engine with no policy set loaded: it denies everything
// (ReasonUnavailable) until a set is installed.
func NewEngine(o Options) *Engine {
	e := &Engine{onReload: o.OnReload, log: o.Logger, now: o.Now}
	if e.log == nil {
		e.log = zap.NewNop()
	}
	if e.now == nil {
		e.now = time.Now
	}
	e.bufs.New = func() any { b := make([]int32, 0, 16); return &b }
	return e
}

// Ready reports whether a policy set has been loaded.
func (e *Engine) Ready() bool { return e.set.Load() != nil }

// Info returns the version of the set in force and its number of policies ("", 0 before the
// first successful load).
func (e *Engine) Info() (version string, policies int) {
	s := e.set.Load()
	if s == nil {
		return "", 0
	}
	return s.version, len(s.ids)
}

// Install puts s in force: decisions that start after Install returns use s; decisions already
// running finish with the set they started with. It logs the previous and the new version and
// calls OnReload("success"). Installing nil is a no-op (nothing is swapped, logged or
// reported): there is no way back to "no policy set", which would deny everything.
func (e *Engine) Install(s *Set) {
	if s == nil {
		return
	}
	e.loadMu.Lock()
	e.swap(s)
	e.loadMu.Unlock()
	e.reported(nil)
}

// Load compiles src and installs it. On any error the new set is rejected whole, the last good
// one stays in force, the error (a *LoadError listing every problem) is logged and returned,
// and OnReload("failure", err) is called.
func (e *Engine) Load(src Source) error {
	e.loadMu.Lock()
	s, err := Compile(src)
	if err != nil {
		e.failed(src.Origin, err)
		e.loadMu.Unlock()
		e.reported(err)
		return err
	}
	e.swap(s)
	e.loadMu.Unlock()
	e.reported(nil)
	return nil
}

// LoadDir reads dir (see [ReadDir]) and loads it (see [Engine.Load]). A directory that cannot
// be read is a failure like any other: logged, reported and returned.
func (e *Engine) LoadDir(dir string) error {
	src, err := ReadDir(dir)
	if err != nil {
		e.failed(dir, err)
		e.reported(err)
		return err
	}
	return e.Load(src)
}

// swap installs s; the caller holds loadMu.
func (e *Engine) swap(s *Set) {
	old := e.set.Swap(s)
	prev := ""
	if old != nil {
		prev = old.version
	}
	e.log.Info("policy set loaded", zap.String("origin", s.origin), zap.String("version", s.version),
		zap.String("previous_version", prev), zap.Int("policies", len(s.ids)))
}

func (e *Engine) failed(origin string, err error) {
	v, _ := e.Info()
	e.log.Error("policy reload failed; keeping the last good set", zap.String("origin", origin),
		zap.String("version", v), zap.Error(err))
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

// Watch polls dir every interval (default 5s if every <= 0) and loads it (through
// [Engine.Load]) when the content of its *.cedar files or schema changes, or when it differs
// from the set in force at the start. A change is loaded only once it has settled (seen the
// same on two consecutive polls): a file caught half-written must neither be reported as
// broken nor, worse, load as a truncated set that lost its trailing forbid. A change that
// fails to load is reported once (log and OnReload), not on every poll. Watch returns when ctx
// ends.
func (e *Engine) Watch(ctx context.Context, dir string, every time.Duration) {
	if every <= 0 {
		every = 5 * time.Second
	}
	last, pending := "", ""
	if s := e.set.Load(); s != nil {
		last = s.hash
	}
	check := func() {
		src, err := ReadDir(dir)
		state := ""
		if err != nil {
			state = "error: " + err.Error()
		} else {
			state = src.hash()
		}
		switch {
		case state == last:
			pending = ""
			return
		case state != pending:
			pending = state // wait one more poll for the change to settle
			return
		}
		last, pending = state, ""
		if err != nil {
			e.failed(dir, err)
			e.reported(err)
			return
		}
		_ = e.Load(src) // logged and reported by Load
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
		return Decision{Reason: ReasonUnavailable}
	}
	r, err := buildRequest(&e.principals, in, e.now)
	if err != nil {
		// An input we cannot build a request from is a caller bug, or MCP arguments over the
		// bounds: either way no policy was evaluated, so there is no outcome to override.
		return Decision{Reason: ReasonError, Errors: []string{err.Error()}, final: true}
	}
	if e.unindexed {
		return decisionFrom(cedar.Authorize(s.full, r, r.req))
	}
	bp := e.bufs.Get().(*[]int32)
	ss := subset{ids: s.ids, pols: s.pols, idx: s.idx.candidates(r, (*bp)[:0])}
	d := decisionFrom(cedar.Authorize(&ss, r, r.req))
	*bp = ss.idx[:0]
	e.bufs.Put(bp)
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

// MayAllow reports whether the policies in force could allow in under some context. It never
// says false for an input that Decide could allow, whatever the context (time, arguments,
// caller, ...): it is false only when no permit's scope matches in, or when a policy that
// depends on nothing but the principal, the resource and the MCP call's name (no other context)
// decides it: an unconditional or name-only forbid that matches, or only name-only permits that
// do not. The proxy uses it to filter an MCP server's tools/list: a tool for which MayAllow
// (tools/call on it) is false can never be called by this workload, so the model need not see
// it; a tool whose permit depends on its arguments stays listed, and its calls are decided one
// by one. It is false when no set is loaded or the input is malformed.
func (e *Engine) MayAllow(in Input) bool {
	s := e.set.Load()
	if s == nil {
		return false
	}
	r, err := buildRequest(&e.principals, in, e.now)
	if err != nil {
		return false
	}
	permit := false
	for _, i := range s.idx.candidates(r, nil) {
		p := s.pols[i]
		if !s.static[i] {
			// Its conditions read the context: it may or may not match another time.
			permit = permit || p.Effect() == cedar.Permit
			continue
		}
		one := subset{ids: s.ids, pols: s.pols, idx: []int32{i}}
		_, diag := cedar.Authorize(&one, r, r.req)
		matched := len(diag.Reasons) > 0
		switch {
		case len(diag.Errors) > 0:
			permit = permit || p.Effect() == cedar.Permit // unknown: stay listed
		case p.Effect() == cedar.Forbid && matched:
			return false
		case p.Effect() == cedar.Permit && matched:
			permit = true
		}
	}
	return permit
}
