package proxy

import (
	"bytes"
	"errors"
	"io"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzCheckPath: checkPath never panics, and a path it accepts has none of what it refuses.
func FuzzCheckPath(f *testing.F) {
	for _, s := range []string{"/", "/v1//admin", "/a/..;/b", "/%2e", "/a\\..\\b", "/caf\u00e9", "/x\x00", "/%41"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		path, err := url.PathUnescape(raw)
		if err != nil {
			path = raw
		}
		if checkPath(path) != nil {
			return
		}
		if !utf8.ValidString(path) || strings.Contains(path, "//") || strings.Contains(path, "\x00") {
			t.Fatalf("accepted %q", path)
		}
		for seg := range strings.FieldsFuncSeq(path, func(r rune) bool { return r == '/' || r == '\\' }) {
			if s, _, _ := strings.Cut(seg, ";"); s == "." || s == ".." {
				t.Fatalf("accepted a dot segment in %q", path)
			}
		}
	})
}

// FuzzReadClientHello: any bytes give a server name, not-TLS, or EOF, never a panic, and
// every byte read is returned for relaying.
func FuzzReadClientHello(f *testing.F) {
	f.Add([]byte{0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		_, read, err := readClientHello(bytes.NewReader(in))
		if err != nil && !errors.Is(err, errNotTLS) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("unexpected error %v", err)
		}
		if !bytes.HasPrefix(in, read) {
			t.Fatalf("returned bytes that were not read")
		}
	})
}
