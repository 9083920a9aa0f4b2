package credential

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"go.uber.org/zap/zapcore"
)

// idDomain separates instance-ID hashes from any other SHA-256 use of the same bytes.
const idDomain = "escrow/credential/instance-id/v1\x00"

// Token is one credential instance: a name, a secret value and an optional expiry.
//
// The value is reachable only through Value. Every way of printing or encoding a Token
// (String, GoString, Format for every fmt verb, MarshalJSON, MarshalText, zap's
// MarshalLogObject, slog's LogValue) shows only the name and the instance ID, e.g.
// "credential(name=openai id=3f2a9c1e0b7d4a51)". fmt ignores those methods for a Token held in
// an unexported struct field and prints its fields raw; the value is therefore held behind a
// pointer to a string, which fmt prints as an address.
//
// The zero Token has no name and an empty value. Compare tokens by ID, not with ==.
type Token struct {
	name      string
	sec       *secret
	id        string
	expiresAt time.Time
}

// secret boxes the value. A pointer to a non-struct type: fmt prints such a pointer as an
// address at every depth (a pointer to a struct it would dereference at top level, e.g. in
// "%!s(*T=&{...})" for a bad verb).
type secret string

// NewToken returns a Token for the named credential. expiresAt is the zero time for a credential
// that does not expire (a static secret). NewToken does not validate value; Manager rejects
// empty values and values containing control characters (CR, LF, NUL, ...) when a provider
// returns them, and Applier never writes such a value into a header.
func NewToken(name, value string, expiresAt time.Time) Token {
	return Token{name: name, sec: newSecret(value), id: instanceID(name, value), expiresAt: expiresAt}
}

// instanceID is the first 8 bytes, hex encoded, of
// SHA-256(idDomain || uint64be(len(name)) || name || value).
// The length prefix keeps (name, value) pairs from colliding by shifting bytes between them.
func instanceID(name, value string) string {
	h := sha256.New()
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(name)))
	h.Write([]byte(idDomain))
	h.Write(n[:])
	h.Write([]byte(name))
	h.Write([]byte(value))
	sum := h.Sum(nil)
	return hex.EncodeToString(sum[:8])
}

// Value returns the secret. Use it only to apply the credential to a request.
func (t Token) Value() string {
	if t.sec == nil {
		return ""
	}
	return string(*t.sec)
}

func newSecret(v string) *secret {
	s := secret(v)
	return &s
}

// Name returns the credential's name from the configuration.
func (t Token) Name() string { return t.name }

// ID identifies this instance of the credential (which secret was used) without revealing it:
// 16 hex digits, stable for the same name and value, different when the value rotates. It is
// an unsalted truncated hash: fine for the high-entropy secrets (API keys, tokens) escrow
// handles, but it would let someone holding audit records test guesses of a low-entropy secret.
func (t Token) ID() string { return t.id }

// ExpiresAt returns when the credential expires; the zero time means it does not.
func (t Token) ExpiresAt() time.Time { return t.expiresAt }

// IsZero reports whether t is the zero Token.
func (t Token) IsZero() bool { return t.sec == nil && t.name == "" }

// String returns "credential(name=<name> id=<id>)"; never the value.
func (t Token) String() string {
	return "credential(name=" + t.name + " id=" + t.id + ")"
}

// GoString is String, so %#v does not reveal the value either.
func (t Token) GoString() string { return t.String() }

// Format writes String for every verb and flag (%v %+v %#v %s %q %x ...).
func (t Token) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(t.String())) }

// MarshalText returns String.
func (t Token) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// tokenJSON is what a Token looks like in JSON.
type tokenJSON struct {
	Name      string     `json:"name"`
	ID        string     `json:"id"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
}

// MarshalJSON returns {"name":...,"id":...} and "expires_at" when the token expires.
func (t Token) MarshalJSON() ([]byte, error) {
	j := tokenJSON{Name: t.name, ID: t.id}
	if !t.expiresAt.IsZero() {
		e := t.expiresAt.UTC()
		j.ExpiresAt = &e
	}
	return json.Marshal(j)
}

// MarshalLogObject makes zap.Any / zap.Object log the name, ID and expiry only.
func (t Token) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("name", t.name)
	enc.AddString("id", t.id)
	if !t.expiresAt.IsZero() {
		enc.AddTime("expires_at", t.expiresAt)
	}
	return nil
}

// LogValue makes log/slog log the name, ID and expiry only.
func (t Token) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("name", t.name), slog.String("id", t.id)}
	if !t.expiresAt.IsZero() {
		attrs = append(attrs, slog.Time("expires_at", t.expiresAt))
	}
	return slog.GroupValue(attrs...)
}

// checkValue reports why v cannot be used as a credential value, without quoting v. Control
// characters are refused because a CR or LF would split a header and a NUL truncates it in
// some servers; no real API key contains them.
func checkValue(v string) error {
	if v == "" {
		return fmt.Errorf("value is empty")
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c < 0x20 || c == 0x7f {
			return fmt.Errorf("value contains a control character (%s); refusing it", ctlName(c))
		}
	}
	return nil
}

func ctlName(c byte) string {
	switch c {
	case '\r':
		return "CR"
	case '\n':
		return "LF"
	case 0:
		return "NUL"
	case '\t':
		return "TAB"
	default:
		return fmt.Sprintf("0x%02x", c)
	}
}
