package credential

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Parts of a multi-part token the formatting tests look for, beside secretValue.
const (
	secretKeyID   = "AKIAVERYSECRETKEYID42"
	secretSession = "FwoGZXIvYXdzVERYSECRETSESSIONtoken"
)

func multiPart(exp time.Time) Token {
	return NewTokenParts("s3", map[string]string{
		"access_key_id": secretKeyID, "secret_access_key": secretValue, "session_token": secretSession,
	}, exp)
}

func TestToken_FormattingNeverRevealsValue(t *testing.T) {
	exp := time.Date(2026, 3, 1, 13, 0, 0, 0, time.UTC)
	for _, tok := range []Token{
		NewToken("openai", secretValue, time.Time{}),
		NewToken("github", secretValue, exp),
		multiPart(time.Time{}),
		multiPart(exp),
	} {
		ptr := &tok
		type exported struct{ T Token }
		type unexported struct{ t Token }
		type withPtr struct{ p *Token }

		outputs := map[string]string{}
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T %v", "%10.3v", "%-20s"} {
			outputs["value "+verb] = fmt.Sprintf(verb, tok)
			outputs["pointer "+verb] = fmt.Sprintf(verb, ptr)
			outputs["exported field "+verb] = fmt.Sprintf(verb, exported{tok})
			outputs["unexported field "+verb] = fmt.Sprintf(verb, unexported{tok})
			outputs["unexported pointer field "+verb] = fmt.Sprintf(verb, withPtr{ptr})
			outputs["slice "+verb] = fmt.Sprintf(verb, []Token{tok})
			outputs["map "+verb] = fmt.Sprintf(verb, map[string]Token{"k": tok})
			outputs["any slice "+verb] = fmt.Sprintf(verb, []any{tok, ptr})
		}
		outputs["Sprint"] = fmt.Sprint(tok, ptr)
		outputs["Sprintln"] = fmt.Sprintln(tok, ptr)
		outputs["String"] = tok.String()
		outputs["GoString"] = tok.GoString()

		err := fmt.Errorf("apply %v to request: %w", tok, errors.New("boom"))
		outputs["error"] = err.Error()
		outputs["wrapped error"] = fmt.Errorf("outer: %w", err).Error()
		outputs["error %+v"] = fmt.Sprintf("%+v", err)

		for name, v := range map[string]any{"value": tok, "pointer": ptr, "exported field": exported{tok}, "map key": map[Token]int{tok: 1}} {
			b, err := json.Marshal(v)
			if err != nil {
				t.Fatalf("json.Marshal(%s): %v", name, err)
			}
			outputs["json "+name] = string(b)
		}
		txt, _ := tok.MarshalText()
		outputs["MarshalText"] = string(txt)

		for _, enc := range []zapcore.Encoder{
			zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()),
			zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig()),
		} {
			var buf bytes.Buffer
			log := zap.New(zapcore.NewCore(enc, zapcore.AddSync(&buf), zapcore.DebugLevel))
			log.Info("msg "+tok.String(),
				zap.Any("any", tok), zap.Any("anyptr", ptr), zap.Stringer("stringer", tok),
				zap.Reflect("reflect", tok), zap.Object("object", tok),
				zap.Any("struct", exported{tok}), zap.Error(err))
			outputs["zap"] = buf.String()
		}

		var sbuf bytes.Buffer
		slog.New(slog.NewJSONHandler(&sbuf, nil)).Info("m", "tok", tok, "ptr", ptr)
		slog.New(slog.NewTextHandler(&sbuf, nil)).Info("m", "tok", tok, "ptr", ptr)
		outputs["slog"] = sbuf.String()

		for name, out := range outputs {
			for _, sec := range []string{secretValue, secretKeyID, secretSession} {
				if strings.Contains(out, sec) || strings.Contains(out, sec[:12]) {
					t.Errorf("%s reveals the secret: %s", name, out)
				}
			}
		}
		for _, name := range []string{"value %v", "pointer %+v", "exported field %v", "String", "json value", "zap", "slog"} {
			if !strings.Contains(outputs[name], tok.ID()) {
				t.Errorf("%s does not show the instance id %s: %s", name, tok.ID(), outputs[name])
			}
		}
		if got, want := tok.String(), "credential(name="+tok.Name()+" id="+tok.ID()+")"; got != want {
			t.Errorf("String = %q, want %q", got, want)
		}
		if tok.MultiPart() {
			if tok.Value() != "" || tok.Part("secret_access_key") != secretValue || tok.Part("access_key_id") != secretKeyID ||
				tok.Part("session_token") != secretSession || tok.Part("nope") != "" {
				t.Errorf("parts not returned as given")
			}
		} else if tok.Value() != secretValue || tok.Part("secret_access_key") != "" {
			t.Errorf("Value = %q, want the secret", tok.Value())
		}
	}
}

func TestToken_IDIdentifiesInstanceWithoutValue(t *testing.T) {
	a := NewToken("openai", secretValue, time.Time{})
	if len(a.ID()) != 16 || strings.Trim(a.ID(), "0123456789abcdef") != "" {
		t.Fatalf("ID %q: want 16 lower-case hex digits", a.ID())
	}
	if b := NewToken("openai", secretValue, time.Now()); b.ID() != a.ID() {
		t.Errorf("same name and value gave different IDs: %s, %s", a.ID(), b.ID())
	}
	if b := NewToken("openai", secretValue+"x", time.Time{}); b.ID() == a.ID() {
		t.Errorf("rotated value kept the ID %s", a.ID())
	}
	if b := NewToken("github", secretValue, time.Time{}); b.ID() == a.ID() {
		t.Errorf("another credential with the same value got the same ID %s", a.ID())
	}
	// Length prefix: bytes moved between name and value must change the ID.
	if x, y := NewToken("ab", "c", time.Time{}), NewToken("a", "bc", time.Time{}); x.ID() == y.ID() {
		t.Errorf("(ab,c) and (a,bc) share ID %s", x.ID())
	}
	// Domain separation: not a plain prefix of SHA-256(name+value).
	if a.ID() == instanceIDNoDomain("openai", secretValue) {
		t.Errorf("ID is not domain-separated")
	}
	if strings.Contains(a.ID(), secretValue[:4]) {
		t.Errorf("ID contains part of the value")
	}
}

func TestToken_MultiPartIDCoversEveryPart(t *testing.T) {
	base := map[string]string{"access_key_id": "AKID", "secret_access_key": "sk", "session_token": "st"}
	a := NewTokenParts("s3", base, time.Time{})
	if len(a.ID()) != 16 || strings.Trim(a.ID(), "0123456789abcdef") != "" {
		t.Fatalf("ID %q: want 16 lower-case hex digits", a.ID())
	}
	// Map order does not matter; the expiry does not either.
	for range 20 {
		if b := NewTokenParts("s3", map[string]string{"session_token": "st", "secret_access_key": "sk", "access_key_id": "AKID"}, time.Now()); b.ID() != a.ID() {
			t.Fatalf("same parts gave different IDs")
		}
	}
	for name, parts := range map[string]map[string]string{
		"key id rotated":  {"access_key_id": "AKID2", "secret_access_key": "sk", "session_token": "st"},
		"secret rotated":  {"access_key_id": "AKID", "secret_access_key": "sk2", "session_token": "st"},
		"session rotated": {"access_key_id": "AKID", "secret_access_key": "sk", "session_token": "st2"},
		"part dropped":    {"access_key_id": "AKID", "secret_access_key": "sk"},
		"bytes shifted":   {"access_key_id": "AKIDs", "secret_access_key": "k", "session_token": "st"},
		"key renamed":     {"access_key": "AKID", "secret_access_key": "sk", "session_token": "st"},
	} {
		if b := NewTokenParts("s3", parts, time.Time{}); b.ID() == a.ID() {
			t.Errorf("%s: ID unchanged", name)
		}
	}
	if b := NewTokenParts("other", base, time.Time{}); b.ID() == a.ID() {
		t.Errorf("another credential with the same parts got the same ID")
	}
	// A single value never shares an ID with a one-part token holding it.
	if NewToken("n", "v", time.Time{}).ID() == NewTokenParts("n", map[string]string{"": "v"}, time.Time{}).ID() {
		t.Errorf("single and multi-part IDs are not separated")
	}
	// Renaming (as the Manager does) keeps the parts and recomputes the ID.
	if r := a.withName("s3b"); r.ID() != NewTokenParts("s3b", base, time.Time{}).ID() || r.Part("session_token") != "st" {
		t.Errorf("withName lost parts or computed another ID")
	}
	if r := NewToken("x", "v", time.Time{}).withName("y"); r.ID() != NewToken("y", "v", time.Time{}).ID() || r.Value() != "v" {
		t.Errorf("withName on a single value")
	}
}

func TestToken_PartDoesNotAllocate(t *testing.T) {
	tok := multiPart(time.Time{})
	if a := testing.AllocsPerRun(1000, func() { _ = tok.Part("session_token") }); a != 0 {
		t.Errorf("Part: %v allocations; want 0", a)
	}
}

func TestToken_ZeroValue(t *testing.T) {
	var z Token
	if !z.IsZero() || z.Value() != "" || z.Part("k") != "" || z.MultiPart() || z.ID() != "" || !z.ExpiresAt().IsZero() {
		t.Errorf("zero Token: %v IsZero=%v", z, z.IsZero())
	}
	if NewToken("n", "v", time.Time{}).IsZero() {
		t.Errorf("NewToken(...).IsZero() = true")
	}
}

func TestToken_JSONShape(t *testing.T) {
	exp := time.Date(2026, 3, 1, 13, 0, 0, 0, time.UTC)
	b, err := json.Marshal(NewToken("github", secretValue, exp))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]string
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got["name"] != "github" || len(got["id"]) != 16 || got["expires_at"] != "2026-03-01T13:00:00Z" || len(got) != 3 {
		t.Errorf("JSON = %s", b)
	}
}

func instanceIDNoDomain(name, value string) string {
	sum := sha256Sum([]byte(name + value))
	return fmt.Sprintf("%x", sum[:8])
}

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }
