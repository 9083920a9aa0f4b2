// Package audit defines the one record escrow writes per request (allowed or denied) and per
// tunnel at close, and its zap sink. A record names the credential and an id of the
// credential instance, never its value; the record type has no field that could hold a secret.
package audit

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Decisions: what escrow's checks (routing, request checks, identity, policy, credential,
// egress) decided.
const (
	Allow = "allow"
	Deny  = "deny"
	// WouldDeny is report mode's decision for what enforce mode would deny: it was let through.
	WouldDeny = "would_deny"
)

// Outcomes: what happened to a request that was let through (decision allow or would_deny).
const (
	OutcomeOK                  = "ok"                   // the upstream answered (any status), or the tunnel ran until closed
	OutcomeUpstreamUnavailable = "upstream_unavailable" // no connection, or it broke before or while the response was copied
	OutcomeUpstreamTimeout     = "upstream_timeout"     // no response headers within response_timeout
	OutcomeAgentClosed         = "agent_closed"         // the agent went away first
	OutcomeShuttingDown        = "shutting_down"        // cut by the end of the drain period at stop
	OutcomeBadRequest          = "bad_request"          // the agent's request body was malformed
	// OutcomeResponseUnscannable: a scrubbed route's upstream answered with a compressed body
	// escrow did not ask for; it was not passed on (502).
	OutcomeResponseUnscannable = "response_unscannable"
	// OutcomeTLSHandshakeFailed: an intercepted connection's agent did not complete TLS with
	// escrow's leaf (typically: it does not trust the pod CA) and sent no request.
	OutcomeTLSHandshakeFailed = "tls_handshake_failed"
)

// Record is one audit record.
type Record struct {
	Time      time.Time
	RequestID string
	Kind      string // "request" (plain or intercepted) or "tunnel"

	SPIFFEID    string
	Attested    bool
	IdentitySrc string

	// The calling process (identity.process), when it was found: pid, uid and executable.
	CallerPID int
	CallerUID uint32
	CallerExe string

	// The verified delegation chain the caller presented, if any: the subject it acts for, the
	// actors (nearest first) and the token's id (its jti or a hash prefix, never the token).
	DelegationSubject string
	DelegationActors  []string
	DelegationTokenID string

	Method  string
	Upgrade string // the protocol a request upgrades to ("websocket"), or ""
	Scheme  string
	Host    string
	Port    int
	Path    string
	SNI     string // the TLS server name a tunnel's ClientHello named

	Decision  string // Allow, Deny or WouldDeny
	Reason    string // stable machine-readable reason of the decision
	Outcome   string // what happened after an Allow or WouldDeny (Outcome...); "" for a Deny
	PolicyIDs []string
	Mode      string // enforce | report
	WouldDeny bool   // report mode allowed what enforce would deny
	// Revocation names the revocation that denied the request (reason revoked), or "".
	Revocation string

	Credential   string // configured name
	CredentialID string // instance id (short hash), never the value
	// CredentialProvider is the credential's provider kind (static, oauth2, aws, ...).
	CredentialProvider string

	Status         int // the HTTP status the agent received (0: none, e.g. a tunnel or an agent that left)
	UpstreamStatus int
	// Redacted counts the occurrences of the injected credential escrow replaced in the
	// response (headers, trailers and scanned body); never the value.
	Redacted int

	// MCP holds the JSON-RPC calls of a POST to an MCP server, in body order.
	MCP      []MCPCall
	BytesIn  int64 // from the agent (request body, or tunnel agent->upstream)
	BytesOut int64 // to the agent (response body, or tunnel upstream->agent)

	PolicyDur     time.Duration
	CredentialDur time.Duration
	UpstreamDur   time.Duration
	TotalDur      time.Duration

	reserved bool // Queue.Reserve promised this record a place
}

// MarshalLogObject writes the record without reflection.
func (r *Record) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("request_id", r.RequestID)
	enc.AddString("kind", r.Kind)
	_ = enc.AddObject("identity", (*recordIdentity)(r))
	if r.CallerPID != 0 {
		_ = enc.AddObject("caller", (*recordCaller)(r))
	}
	if r.DelegationSubject != "" {
		_ = enc.AddObject("delegation", (*recordDelegation)(r))
	}
	if r.Method != "" {
		enc.AddString("method", r.Method)
	}
	if r.Upgrade != "" {
		enc.AddString("upgrade", r.Upgrade)
	}
	enc.AddString("scheme", r.Scheme)
	enc.AddString("host", r.Host)
	enc.AddInt("port", r.Port)
	if r.Path != "" {
		enc.AddString("path", r.Path)
	}
	if r.SNI != "" {
		enc.AddString("sni", r.SNI)
	}
	enc.AddString("decision", r.Decision)
	enc.AddString("reason", r.Reason)
	if r.Outcome != "" {
		enc.AddString("outcome", r.Outcome)
	}
	_ = enc.AddArray("policy_ids", (*recordPolicyIDs)(r))
	if r.Mode != "" {
		enc.AddString("mode", r.Mode)
	}
	if r.WouldDeny {
		enc.AddBool("would_deny", true)
	}
	if r.Revocation != "" {
		enc.AddString("revocation", r.Revocation)
	}
	if r.Credential != "" {
		enc.AddString("credential", r.Credential)
		if r.CredentialProvider != "" {
			enc.AddString("credential_provider", r.CredentialProvider)
		}
		if r.CredentialID != "" {
			enc.AddString("credential_id", r.CredentialID)
		}
	}
	if r.Status != 0 {
		enc.AddInt("status", r.Status)
	}
	if r.UpstreamStatus != 0 {
		enc.AddInt("upstream_status", r.UpstreamStatus)
	}
	if r.Redacted > 0 {
		enc.AddInt("redacted", r.Redacted)
	}
	if len(r.MCP) > 0 {
		_ = enc.AddArray("mcp", mcpCalls(r.MCP))
	}
	enc.AddInt64("bytes_in", r.BytesIn)
	enc.AddInt64("bytes_out", r.BytesOut)
	_ = enc.AddObject("duration_ms", (*recordDurations)(r))
	return nil
}

// The nested parts of a record are views of it (named types, not closures), so encoding a
// record allocates nothing for them.
type (
	recordCaller     Record
	recordDelegation Record
	recordIdentity   Record
	recordPolicyIDs  Record
	recordDurations  Record
)

func (r *recordIdentity) MarshalLogObject(e zapcore.ObjectEncoder) error {
	e.AddString("spiffe_id", r.SPIFFEID)
	e.AddBool("attested", r.Attested)
	if r.IdentitySrc != "" {
		e.AddString("source", r.IdentitySrc)
	}
	return nil
}

func (r *recordCaller) MarshalLogObject(e zapcore.ObjectEncoder) error {
	e.AddInt("pid", r.CallerPID)
	e.AddUint32("uid", r.CallerUID)
	e.AddString("exe", r.CallerExe)
	return nil
}

func (r *recordDelegation) MarshalLogObject(e zapcore.ObjectEncoder) error {
	e.AddString("subject", r.DelegationSubject)
	_ = e.AddArray("actors", zapcore.ArrayMarshalerFunc(func(a zapcore.ArrayEncoder) error {
		for _, s := range r.DelegationActors {
			a.AppendString(s)
		}
		return nil
	}))
	e.AddString("token_id", r.DelegationTokenID)
	return nil
}

func (r *recordPolicyIDs) MarshalLogArray(a zapcore.ArrayEncoder) error {
	for _, id := range r.PolicyIDs {
		a.AppendString(id)
	}
	return nil
}

func (r *recordDurations) MarshalLogObject(e zapcore.ObjectEncoder) error {
	e.AddFloat64("policy", ms(r.PolicyDur))
	e.AddFloat64("credential", ms(r.CredentialDur))
	e.AddFloat64("upstream", ms(r.UpstreamDur))
	e.AddFloat64("total", ms(r.TotalDur))
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Sink receives records.
type Sink interface {
	Write(r *Record)
}

// ZapSink writes each record as one JSON line, sampling off (every decision is kept).
type ZapSink struct {
	l   *zap.Logger
	buf *zapcore.BufferedWriteSyncer // nil when records are written as they are made
}

// NewZapSink builds a JSON logger on w (os.Stdout when nil), with sampling disabled; every
// record is written as it is made.
func NewZapSink(w io.Writer) *ZapSink { return NewBufferedZapSink(w, 0, nil) }

// bufferSize bounds what a buffered sink holds: at about 600 bytes a record, a write per ~100
// records at most, and little memory.
const bufferSize = 64 << 10

// NewBufferedZapSink is NewZapSink with records batched into few writes: a record waits at
// most flush (or until 64 KiB are pending) before it is written. flush <= 0 writes each record
// at once. Writing each record as it is made costs a write system call per request, a
// measurable share of what escrow spends on one; the price is that records still buffered are
// lost if the process dies without Stop (SIGKILL, OOM kill, crash). clock may be nil (the
// system clock); tests pass one whose ticker they drive.
func NewBufferedZapSink(w io.Writer, flush time.Duration, clock zapcore.Clock) *ZapSink {
	if w == nil {
		w = os.Stdout
	}
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	ws := zapcore.AddSync(w)
	s := &ZapSink{}
	if flush > 0 {
		s.buf = &zapcore.BufferedWriteSyncer{WS: ws, Size: bufferSize, FlushInterval: flush, Clock: clock}
		ws = s.buf
	}
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), ws, zapcore.InfoLevel)
	s.l = zap.New(core).With(zap.String("log_type", "audit"))
	return s
}

// Stop writes every buffered record and stops the flush timer. Call it once the last record
// has been written (after the proxy has drained).
func (s *ZapSink) Stop() error {
	var err error
	if s.buf == nil {
		err = s.l.Sync()
	} else {
		err = s.buf.Stop()
	}
	if unsyncable(err) {
		// A pipe or a terminal cannot be synced: every record was written, nothing is lost.
		return nil
	}
	return err
}

// unsyncable reports the error fsync gives for a file that cannot be synced (a pipe, a
// terminal, a socket), which is no failure to write.
func unsyncable(err error) bool {
	var pe *os.PathError
	return errors.As(err, &pe) && pe.Op == "sync" &&
		(errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.ENOTTY))
}

// NewZapSinkFromLogger wraps an existing logger (tests use zaptest/observer).
func NewZapSinkFromLogger(l *zap.Logger) *ZapSink { return &ZapSink{l: l} }

// Write logs r at info level under the message "audit".
func (s *ZapSink) Write(r *Record) {
	if ce := s.l.Check(zapcore.InfoLevel, "audit"); ce != nil {
		ce.Time = r.Time
		ce.Write(zap.Inline(r))
	}
}

// Sync flushes buffered output.
func (s *ZapSink) Sync() error { return s.l.Sync() }

// SinkFunc adapts a function to Sink.
type SinkFunc func(*Record)

// Write calls f(r).
func (f SinkFunc) Write(r *Record) { f(r) }

// MCPCall is one JSON-RPC message of a POST to an MCP server. It never holds the arguments
// unless the configuration asks for them (audit.mcp_arguments): they may carry data.
type MCPCall struct {
	Method string
	// Tool is the tool or prompt name, or the resource URI, of a decided call.
	Tool string
	// JSONRPCID is the id as sent, in JSON (a number, or a string with its quotes).
	JSONRPCID string
	// Session is the Mcp-Session-Id header.
	Session string
	// ArgumentsSHA256 is the hex sha256 of the arguments as sent.
	ArgumentsSHA256 string
	// Arguments is the arguments' JSON as sent, only with audit.mcp_arguments; else "".
	Arguments string
}

type mcpCalls []MCPCall

func (m mcpCalls) MarshalLogArray(e zapcore.ArrayEncoder) error {
	for i := range m {
		_ = e.AppendObject(&m[i])
	}
	return nil
}

// MarshalLogObject writes one call; the arguments, when kept, as JSON (not a quoted string).
func (c *MCPCall) MarshalLogObject(e zapcore.ObjectEncoder) error {
	e.AddString("method", c.Method)
	if c.Tool != "" {
		e.AddString("tool", c.Tool)
	}
	if c.JSONRPCID != "" {
		e.AddString("jsonrpc_id", c.JSONRPCID)
	}
	if c.Session != "" {
		e.AddString("session", c.Session)
	}
	if c.ArgumentsSHA256 != "" {
		e.AddString("arguments_sha256", c.ArgumentsSHA256)
	}
	if c.Arguments != "" {
		_ = e.AddReflected("arguments", json.RawMessage(c.Arguments))
	}
	return nil
}
