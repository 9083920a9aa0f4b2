package scrub

import (
	"io"
	"math"
	"mime"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
)

// DefaultLimit is how many bytes of a body are scanned when BodyOptions.Limit is 0.
const DefaultLimit = 1 << 20

// BodyOptions tune Body. The zero value scans the first DefaultLimit bytes.
type BodyOptions struct {
	// Limit is how many bytes at the start of the body are guaranteed scanned: every
	// occurrence that begins in them is replaced (the scan runs on to MaxMatchLen-1 bytes
	// past Limit so that one is found whole). The rest passes unscanned. 0 means
	// DefaultLimit; a negative Limit scans the whole body.
	Limit int64
	// OnDone, if set, is called once, when the body has been read to its end or is closed,
	// whichever comes first.
	OnDone func(BodyResult)
}

// BodyResult is what a scrubbed body reports when it is done.
type BodyResult struct {
	// Redacted is the number of occurrences found (overlapping ones count once), including
	// any in bytes still held back when the body was closed early.
	Redacted int
	// Scanned is how many bytes were scanned.
	Scanned int64
	// Unscanned is true when bytes past the scan window were passed on without a scan.
	Unscanned bool
}

// minRead is the least room a caller's buffer must leave after the held-back bytes for Body to
// read into it directly; below that it reads through a buffer of its own.
const minRead = 512

// Body returns rc scrubbed as it streams: every occurrence that begins in the first Limit
// bytes is replaced (with bytes of its own length, so the body's length does not change).
// Bytes are passed on as soon as they cannot be the start of an occurrence: only a trailing
// run of bytes that is a prefix of some searched form is held back until the next read
// decides it (or the end of the body releases it). So a streamed event ending in a line break
// is passed on at once, unless a secret begins with CR or LF. A read error other than EOF
// drops the held-back bytes (a cut-off secret is not passed on) and is returned.
//
// Scan only bodies whose type is Scrubbable and that are not compressed (Content-Encoding
// absent or identity). With a nil or inactive s, Body returns rc itself.
func (s *Scrubber) Body(rc io.ReadCloser, o BodyOptions) io.ReadCloser {
	if !s.Active() || rc == nil || rc == http.NoBody {
		return rc
	}
	limit := o.Limit
	if limit == 0 {
		limit = DefaultLimit
	}
	b := &body{s: s, rc: rc, onDone: o.OnDone, scanTo: -1}
	if limit > 0 && limit <= math.MaxInt64-int64(s.m.maxLen) {
		b.scanTo = limit + int64(s.m.maxLen) - 1
	}
	return b
}

type body struct {
	s      *Scrubber
	rc     io.ReadCloser
	onDone func(BodyResult)
	scanTo int64 // absolute offset where scanning stops; -1: never

	state    uint32 // the automaton's state after the last scanned byte
	pos      int64  // absolute offset of the first held byte
	held     []byte // scanned bytes not yet decided
	rs       runs   // spans not yet fully written out
	pend     []byte // decided bytes not yet returned (when reading through scratch)
	scratch  []byte
	err      error
	scanning bool // false once past scanTo
	started  bool

	found     atomic.Int64
	scanned   atomic.Int64
	unscanned atomic.Bool
	done      sync.Once
}

func (b *body) Read(p []byte) (int, error) {
	if !b.started {
		b.started, b.scanning = true, true
		b.held = make([]byte, 0, b.s.m.maxLen)
	}
	if len(p) == 0 {
		return 0, nil
	}
	for empty := 0; ; {
		if len(b.pend) > 0 {
			n := copy(p, b.pend)
			b.pend = b.pend[n:]
			return n, nil
		}
		if b.err != nil {
			if b.err == io.EOF && len(b.held) > 0 {
				// Nothing follows: the held bytes cannot begin an occurrence any more.
				b.pend = b.release(b.held, len(b.held), true)
				b.held = b.held[:0]
				continue
			}
			if b.err == io.EOF {
				b.finish()
			}
			return 0, b.err
		}
		if !b.scanning && len(b.held) == 0 {
			n, err := b.rc.Read(p)
			if n > 0 {
				b.unscanned.Store(true)
			}
			if err == io.EOF {
				b.err = err
				b.finish()
			}
			return n, err
		}
		work, direct := p, true
		if len(p) < len(b.held)+minRead {
			direct = false
			if b.scratch == nil {
				b.scratch = make([]byte, b.s.m.maxLen+4096)
			}
			work = b.scratch
		}
		t := copy(work, b.held)
		n, err := b.rc.Read(work[t:])
		if err != nil {
			b.err = err
		}
		out := b.decide(work[:t+n], t)
		if err != nil && err != io.EOF {
			b.held = b.held[:0] // a cut-off body: its undecided tail is not passed on
		}
		if len(out) > 0 {
			if direct {
				return len(out), nil
			}
			b.pend = out
			continue
		}
		if n == 0 && err == nil {
			if empty++; empty >= 100 {
				return 0, io.ErrNoProgress
			}
		}
	}
}

// decide scans w[t:] (w[:t] are the held bytes, already scanned), redacts what is decided and
// returns it (a prefix of w); what may still begin an occurrence is kept in b.held.
func (b *body) decide(w []byte, t int) []byte {
	fresh := w[t:]
	start := b.pos + int64(t) // absolute offset of fresh[0]
	if b.scanning {
		scan := fresh
		if b.scanTo >= 0 && start+int64(len(fresh)) >= b.scanTo {
			scan = fresh[:b.scanTo-start]
			b.scanning = false
			if len(scan) < len(fresh) {
				b.unscanned.Store(true)
			}
		}
		before := b.rs.found
		b.state = b.s.m.scan(b.state, scan, start, &b.rs)
		b.found.Add(int64(b.rs.found - before))
		b.scanned.Add(int64(len(scan)))
	} else if len(fresh) > 0 {
		b.unscanned.Store(true)
	}
	decided := len(w)
	if b.scanning {
		decided -= b.s.m.holdBack(b.state)
	}
	out := b.release(w, decided, !b.scanning)
	b.held = append(b.held[:0], w[decided:]...)
	return out
}

// release redacts w[:n] (w[0] at offset b.pos) and advances past it; all means every run is
// complete (no more scanning).
func (b *body) release(w []byte, n int, all bool) []byte {
	out := w[:n]
	b.s.redact(out, b.pos, b.rs.list)
	b.pos += int64(n)
	keep := b.rs.list[:0]
	for _, r := range b.rs.list {
		if !all && r.end > b.pos {
			keep = append(keep, r)
		}
	}
	b.rs.list = keep
	return out
}

func (b *body) finish() {
	b.done.Do(func() {
		if b.onDone != nil {
			b.onDone(BodyResult{
				Redacted:  int(b.found.Load()),
				Scanned:   b.scanned.Load(),
				Unscanned: b.unscanned.Load(),
			})
		}
	})
}

// Close closes the underlying body and reports, if it has not reported yet.
func (b *body) Close() error {
	err := b.rc.Close()
	b.finish()
	return err
}

// Scrubbable reports whether a body of this Content-Type is text that is scanned: text/*, JSON
// and XML (including +json and +xml types), JavaScript, form data, NDJSON, YAML, GraphQL and
// event streams. A missing Content-Type counts as scrubbable (an error page often has none);
// images, audio, video, archives, octet streams, PDF, protobuf and the like are not. The
// charset must be ASCII-compatible (UTF-8, Latin-1...): a UTF-16 body is not searched in its
// own encoding.
func Scrubbable(contentType string) bool {
	if strings.TrimSpace(contentType) == "" {
		return true
	}
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		mt, _, _ = strings.Cut(strings.ToLower(contentType), ";")
		mt = strings.TrimSpace(mt)
	}
	if strings.HasPrefix(mt, "text/") || strings.HasSuffix(mt, "+json") || strings.HasSuffix(mt, "+xml") {
		return true
	}
	switch mt {
	case "application/json", "application/xml", "application/javascript", "application/x-javascript",
		"application/ecmascript", "application/x-www-form-urlencoded", "application/x-ndjson",
		"application/ndjson", "application/jsonl", "application/json-seq", "application/jsonlines",
		"application/yaml", "application/x-yaml", "application/graphql", "application/graphql-response+json",
		"application/sql", "application/toml", "application/x-sh", "message/http":
		return true
	}
	return false
}

// Plan says whether a response body will be scanned and, when not, why.
type Plan struct {
	Scan bool
	// Reason is empty when Scan is true, else one of ReasonEncoded or ReasonType.
	Reason string
}

// Stable reasons for a body that is not scanned.
const (
	// ReasonEncoded: the body has a Content-Encoding other than identity (gzip, br, ...);
	// its bytes cannot be searched. The caller should have asked for identity (see
	// PrepareRequest) and should refuse such a response rather than pass it unscanned.
	ReasonEncoded = "content_encoded"
	// ReasonType: the Content-Type is not text-like (see Scrubbable).
	ReasonType = "content_type"
)

// PlanBody decides, from a response's headers, whether its body is scanned.
func PlanBody(h http.Header) Plan {
	for _, v := range h.Values("Content-Encoding") {
		for _, c := range strings.Split(v, ",") {
			if c = strings.TrimSpace(c); c != "" && !strings.EqualFold(c, "identity") {
				return Plan{Reason: ReasonEncoded}
			}
		}
	}
	if !Scrubbable(h.Get("Content-Type")) {
		return Plan{Reason: ReasonType}
	}
	return Plan{Scan: true}
}

// PrepareRequest makes the upstream's answer to an outgoing request scannable: it asks for
// identity encoding (an absent Accept-Encoding would mean any coding is acceptable) and removes
// Range and If-Range, so the answer is the whole representation and a secret cannot be
// fetched in pieces that are each too short to be recognised (a server may always answer a
// ranged request in full, so clients handle that).
func PrepareRequest(h http.Header) {
	h.Set("Accept-Encoding", "identity")
	h.Del("Range")
	h.Del("If-Range")
}
