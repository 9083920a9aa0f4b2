package audit

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

func TestZapSink_WritesOneFlatJSONLinePerRecord(t *testing.T) {
	var buf bytes.Buffer
	s := NewZapSink(&buf)
	at := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	for i := 0; i < 300; i++ { // more than zap's default sampling keeps per second
		s.Write(&Record{
			Time: at, RequestID: "r1", Kind: "request", SPIFFEID: "spiffe://example.org/ns/a/sa/b",
			Attested: true, IdentitySrc: "spiffe", Method: "GET", Scheme: "https", Host: "api.example.com",
			Port: 443, Path: "/v1", Decision: Allow, Reason: "allowed", PolicyIDs: []string{"p1", "p2"},
			Mode: "enforce", Credential: "openai", CredentialID: "0123456789abcdef", UpstreamStatus: 200,
			BytesIn: 10, BytesOut: 20, PolicyDur: 3 * time.Microsecond, TotalDur: 1500 * time.Microsecond,
		})
	}
	lines := bytes.Split(bytes.TrimSpace(buf.Bytes()), []byte("\n"))
	if len(lines) != 300 {
		t.Fatalf("%d lines for 300 records: audit must not be sampled", len(lines))
	}
	var m map[string]any
	if err := json.Unmarshal(lines[0], &m); err != nil {
		t.Fatal(err)
	}
	if m["time"] != "2026-11-27T10:00:00Z" || m["log_type"] != "audit" || m["msg"] != "audit" {
		t.Errorf("envelope: %v", m)
	}
	id, _ := m["identity"].(map[string]any)
	if id["spiffe_id"] != "spiffe://example.org/ns/a/sa/b" || id["attested"] != true {
		t.Errorf("identity: %v", m["identity"])
	}
	for k, want := range map[string]any{
		"request_id": "r1", "host": "api.example.com", "port": 443.0, "decision": "allow",
		"reason": "allowed", "credential": "openai", "credential_id": "0123456789abcdef",
		"upstream_status": 200.0, "bytes_in": 10.0, "bytes_out": 20.0,
	} {
		if m[k] != want {
			t.Errorf("%s = %v, want %v", k, m[k], want)
		}
	}
	if ids, _ := m["policy_ids"].([]any); len(ids) != 2 || ids[0] != "p1" {
		t.Errorf("policy_ids = %v", m["policy_ids"])
	}
	if d, _ := m["duration_ms"].(map[string]any); d["total"] != 1.5 || d["policy"] != 0.003 {
		t.Errorf("duration_ms = %v", m["duration_ms"])
	}
}

func TestZapSink_DenialWithoutCredentialOmitsCredentialFields(t *testing.T) {
	var buf bytes.Buffer
	NewZapSink(&buf).Write(&Record{RequestID: "r2", Decision: Deny, Reason: "unknown_destination"})
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"credential", "credential_id", "upstream_status", "would_deny"} {
		if _, ok := m[k]; ok {
			t.Errorf("%s present on a record without it: %v", k, m)
		}
	}
	if ids, ok := m["policy_ids"].([]any); !ok || len(ids) != 0 {
		t.Errorf("policy_ids must be an empty list, got %v", m["policy_ids"])
	}
}
