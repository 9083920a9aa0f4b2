package credential

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"go.uber.org/zap/zapcore"
)

// idDomain and partsDomain separate instance-ID hashes from any other SHA-256 use of the same
// bytes, and a single-value token from a multi-part one.
const (
	idDomain    = "escrow/credential/instance-id/v1\x00"
	partsDomain = "escrow/credential/instance-id/v1/parts\x00"
)

// Token is one credential instance: a name, a secret (one value, or several named parts such as
// an access key id, a secret key and a session token) and an optional expiry.
//
// The secret is reachable only through Value and Part. Every way of printing or encoding a Token
// (String, GoString, Format for every fmt verb, MarshalJSON, MarshalText, zap's
// MarshalLogObject, slog's LogValue) shows only the name and the instance ID, e.g.
// "credential(name=openai id=3f2a9c1e0b7d4a51)". fmt ignores those methods for a Token held in
// an unexported struct field and prints its fields raw; the secret is therefore held behind a
// pointer to a string (the parts encoded into one string), which fmt prints as an address.
//
// The zero Token has no name and an empty value. Compare tokens by ID, not with ==.
type Token struct {
	name      string
	sec       *secret // the value, or the encoded parts when multi
	multi     bool
	id        string
	ownID     bool    // id was set by the provider (an AWS access key ID), not derived
	revoke    *secret // what a Revoker needs besides the value (a Vault token); nil if nothing
	expiresAt time.Time
}

// secret boxes the value. A pointer to a non-struct, non-container type: fmt prints such a
// pointer as an address at every depth (a pointer to a struct, map or slice it would dereference
// at top level, e.g. in "%!s(*T=&{...})" for a bad verb). Multi-part secrets are encoded into
// the one string for the same reason.
type secret string

// NewToken returns a single-value Token for the named credential. expiresAt is the zero time for
// a credential that does not expire (a static secret). NewToken does not validate value; Manager
// rejects empty values and values containing control characters (CR, LF, NUL, ...) when a
// provider returns them, and an Applier never writes such a value into a header.
func NewToken(name, value string, expiresAt time.Time) Token {
	return Token{name: name, sec: newSecret(value), id: instanceID(idDomain, name, value), expiresAt: expiresAt}
}

// NewTokenParts returns a Token whose secret has several named parts (e.g. an AWS access key id,
// secret access key and session token); Part reads them and Value returns "". parts is copied.
// The instance ID covers the name and every part (key and value). Like NewToken it does not
// validate; Manager rejects a token without parts, or with a part that is empty or contains a
// control character.
func NewTokenParts(name string, parts map[string]string, expiresAt time.Time) Token {
	enc := encodeParts(parts)
	return Token{name: name, sec: newSecret(enc), multi: true, id: instanceID(partsDomain, name, enc), expiresAt: expiresAt}
}

// withID returns t with a provider-chosen, non-secret ID (an AWS access key ID).
func (t Token) withID(id string) Token {
	t.id, t.ownID = id, true
	return t
}

// withName returns t renamed, its ID recomputed over the same secret (unless the provider chose
// it).
func (t Token) withName(name string) Token {
	if t.ownID {
		t.name = name
		return t
	}
	v, domain := t.Value(), idDomain
	if t.multi {
		v, domain = string(*t.sec), partsDomain
	}
	t.name, t.id = name, instanceID(domain, name, v)
	return t
}

// instanceID is the first 8 bytes, hex encoded, of
// SHA-256(domain || uint64be(len(name)) || name || content).
// The length prefix keeps (name, content) pairs from colliding by shifting bytes between them.
// For a multi-part token content is the parts' encoding, itself length-prefixed.
func instanceID(domain, name, content string) string {
	h := sha256.New()
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(name)))
	h.Write([]byte(domain))
	h.Write(n[:])
	h.Write([]byte(name))
	h.Write([]byte(content))
	sum := h.Sum(nil)
	return hex.EncodeToString(sum[:8])
}

// encodeParts encodes parts sorted by key as uint32be(len(key)) key uint32be(len(value)) value
// per part: unambiguous whatever bytes keys and values hold, and stable for the ID.
func encodeParts(parts map[string]string) string {
	keys := make([]string, 0, len(parts))
	n := 0
	for k, v := range parts {
		keys = append(keys, k)
		n += 8 + len(k) + len(v)
	}
	slices.Sort(keys)
	b := make([]byte, 0, n)
	for _, k := range keys {
		b = binary.BigEndian.AppendUint32(b, uint32(len(k)))
		b = append(b, k...)
		b = binary.BigEndian.AppendUint32(b, uint32(len(parts[k])))
		b = append(b, parts[k]...)
	}
	return string(b)
}

// eachPart calls f for every part of an encoded secret, in key order, until f returns false.
// It allocates nothing.
func eachPart(enc string, f func(k, v string) bool) {
	next := func() (string, bool) {
		if len(enc) < 4 {
			return "", false
		}
		n := int(uint32(enc[0])<<24 | uint32(enc[1])<<16 | uint32(enc[2])<<8 | uint32(enc[3]))
		if n > len(enc)-4 {
			return "", false
		}
		s := enc[4 : 4+n]
		enc = enc[4+n:]
		return s, true
	}
	for {
		k, ok := next()
		if !ok {
			return
		}
		v, ok := next()
		if !ok || !f(k, v) {
			return
		}
	}
}

// Value returns the secret of a single-value token ("" for a multi-part one). Use it only to
// apply the credential to a request.
func (t Token) Value() string {
	if t.sec == nil || t.multi {
		return ""
	}
	return string(*t.sec)
}

// Part returns the part named key of a multi-part token ("" when there is no such part, or for
// a single-value token). Use it only to apply the credential to a request.
func (t Token) Part(key string) string {
	if t.sec == nil || !t.multi {
		return ""
	}
	var out string
	eachPart(string(*t.sec), func(k, v string) bool {
		if k == key {
			out = v
			return false
		}
		return true
	})
	return out
}

// PartNames returns the names of a multi-part token's parts, sorted (nil for a single-value
// token). Names are not secret; Part reads the values.
func (t Token) PartNames() []string {
	if t.sec == nil || !t.multi {
		return nil
	}
	var out []string
	eachPart(string(*t.sec), func(k, _ string) bool {
		out = append(out, k)
		return true
	})
	return out
}

// MultiPart reports whether t was made by NewTokenParts.
func (t Token) MultiPart() bool { return t.multi }

func newSecret(v string) *secret {
	s := secret(v)
	return &s
}

// Name returns the credential's name from the configuration.
func (t Token) Name() string { return t.name }

// ID identifies this instance of the credential (which secret was used) without revealing it:
// 16 hex digits, stable for the same name and secret, different when the secret (any part of
// it) rotates. It is
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

// checkToken reports why tok cannot be served, without quoting any of its secret: a
// single-value token needs a usable value, a multi-part one at least one part and a usable value
// in every part.
func checkToken(tok Token) error {
	if !tok.multi {
		return checkValue(tok.Value())
	}
	var err error
	n := 0
	eachPart(string(*tok.sec), func(k, v string) bool {
		n++
		if e := checkValue(v); e != nil {
			err = fmt.Errorf("part %q: %w", k, e)
			return false
		}
		return true
	})
	if err == nil && n == 0 {
		err = fmt.Errorf("token has no parts")
	}
	return err
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
