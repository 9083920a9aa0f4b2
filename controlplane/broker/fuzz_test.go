package broker

import (
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"
)

// FuzzDecode: any message decodes or fails without panicking; what decodes checks and encodes
// back to itself; a response's error never quotes its value.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"credential":"github"}`,
		`{"credential":"github","scope":"repo:read"}`,
		`{"value":"ghs_0123456789abcdef","expires_at":"2026-03-01T12:00:00Z"}`,
		`{"parts":{"a":"b"},"expires_at":"2026-03-01T12:00:00.5+02:00"}`,
		`{"value":"ghs_0123456789abcdef","expires_at":"ghs_0123456789abcdef"}`,
		`{"credential":"x","extra":1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		st := &structpb.Struct{}
		if protojson.Unmarshal(data, st) != nil {
			return
		}
		if r, err := DecodeRequest(st); err == nil {
			if r.Check() != nil {
				t.Fatalf("decoded an unchecked request %+v", r)
			}
			again := roundTrip(t, r, DecodeRequest)
			if again != r {
				t.Fatalf("round trip: %+v != %+v", again, r)
			}
		}
		r, err := DecodeResponse(st)
		if err != nil {
			if v, ok := st.GetFields()["value"].GetKind().(*structpb.Value_StringValue); ok && len(v.StringValue) >= 8 && strings.Contains(err.Error(), v.StringValue) {
				t.Fatalf("the error quotes the value: %v", err)
			}
			return
		}
		again := roundTrip(t, r, DecodeResponse)
		if !again.ExpiresAt.Equal(r.ExpiresAt) || again.Value != r.Value || !reflect.DeepEqual(again.Parts, r.Parts) {
			t.Fatalf("round trip: %+v != %+v", again, r)
		}
	})
}

func roundTrip[T any](t *testing.T, v T, dec func(*structpb.Struct) (T, error)) T {
	st, err := encode(v)
	if err != nil {
		t.Fatalf("encode %+v: %v", v, err)
	}
	out, err := dec(st)
	if err != nil {
		t.Fatalf("decode of an encoded %+v: %v", v, err)
	}
	return out
}
