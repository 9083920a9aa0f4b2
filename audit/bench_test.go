package audit

import (
	"io"
	"testing"
	"time"
)

// benchRecord is a typical allowed request's record.
func benchRecord() *Record {
	return &Record{
		Time: time.Now(), RequestID: "2dd0efcd-1a2b", Kind: "request",
		SPIFFEID: "spiffe://example.org/ns/agents/sa/coder", IdentitySrc: "static",
		Method: "GET", Scheme: "https", Host: "api.example.com", Port: 443, Path: "/v1/models",
		Decision: Allow, Reason: "allowed", PolicyIDs: []string{"allow-all"}, Mode: "enforce",
		Credential: "api", CredentialID: "79da07665417e739", UpstreamStatus: 200, BytesOut: 1024,
		PolicyDur: 74 * time.Microsecond, CredentialDur: time.Microsecond,
		UpstreamDur: 591 * time.Microsecond, TotalDur: 1008 * time.Microsecond,
	}
}

// BenchmarkZapSink_Write is the cost of encoding one record (the writer discards it).
func BenchmarkZapSink_Write(b *testing.B) {
	s := NewZapSink(io.Discard)
	r := benchRecord()
	b.ReportAllocs()
	for b.Loop() {
		s.Write(r)
	}
}

// BenchmarkBufferedZapSink_Write is the sink escrow proxy uses: encoding plus buffering.
func BenchmarkBufferedZapSink_Write(b *testing.B) {
	s := NewBufferedZapSink(io.Discard, time.Second, nil)
	defer s.Stop()
	r := benchRecord()
	b.ReportAllocs()
	for b.Loop() {
		s.Write(r)
	}
}
