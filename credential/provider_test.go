package credential

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/escrowproxy/escrow/config"
)

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestStaticFile_TrimsSurroundingWhitespace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, "  \t"+secretValue+"\r\n\n")
	tok, err := StaticFile(path).Fetch(context.Background(), FetchArgs{Name: "openai"})
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value() != secretValue || tok.Name() != "openai" || !tok.ExpiresAt().IsZero() {
		t.Errorf("got %v value %q", tok, tok.Value())
	}
	if tok.ID() != NewToken("openai", secretValue, time.Time{}).ID() {
		t.Errorf("ID depends on the whitespace around the value")
	}
}

func TestStaticFile_Errors(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name, content string // content "" with noFile: do not create
		noFile        bool
		dir           bool
		want          string
	}{
		{name: "missing", noFile: true, want: "does not exist"},
		{name: "empty", content: "", want: "is empty"},
		{name: "whitespace only", content: " \n\t\n", want: "is empty"},
		{name: "inner newline", content: "sk-part1\nsk-part2\n", want: "control character (LF)"},
		{name: "inner CR", content: "sk-part1\rsk-part2", want: "control character (CR)"},
		{name: "NUL", content: "sk-part1\x00sk-part2", want: "control character (NUL)"},
		{name: "directory", dir: true, want: "not a regular file"},
		{name: "too large", content: strings.Repeat("a", maxFileSize+1), want: "larger than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_"))
			switch {
			case c.dir:
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
			case !c.noFile:
				writeFile(t, path, c.content)
			}
			_, err := StaticFile(path).Fetch(context.Background(), FetchArgs{Name: "openai"})
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("error %q: want it to contain %q and the path", err, c.want)
			}
			if strings.Contains(err.Error(), "sk-part") {
				t.Errorf("error reveals the file's content: %q", err)
			}
		})
	}
}

func TestStaticFile_StaleAfterChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, "one")
	p := StaticFile(path).(Staler)
	if !p.Stale(time.Now()) {
		t.Errorf("Stale before any Fetch = false")
	}
	if _, err := p.(Provider).Fetch(context.Background(), FetchArgs{Name: "n"}); err != nil {
		t.Fatal(err)
	}
	if p.Stale(time.Now()) {
		t.Errorf("Stale right after Fetch = true")
	}
	// Same size, same inode, new mtime.
	writeFile(t, path, "two")
	future := time.Now().Add(time.Hour)
	if err := os.Chtimes(path, future, future); err != nil {
		t.Fatal(err)
	}
	if !p.Stale(time.Now()) {
		t.Errorf("Stale after rewrite = false")
	}
	if _, err := p.(Provider).Fetch(context.Background(), FetchArgs{Name: "n"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if !p.Stale(time.Now()) {
		t.Errorf("Stale after removal = false")
	}
}

func TestStaticEnv(t *testing.T) {
	env := map[string]string{"SET": " " + secretValue + "\n", "EMPTY": "", "BLANK": "  ", "CRLF": "a\r\nb"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	for _, c := range []struct{ name, want string }{
		{"UNSET", "environment variable UNSET is not set"},
		{"EMPTY", "environment variable EMPTY is empty"},
		{"BLANK", "environment variable BLANK is empty"},
		{"CRLF", "environment variable CRLF: value contains a control character (CR)"},
	} {
		_, err := StaticEnvFrom(c.name, lookup).Fetch(context.Background(), FetchArgs{Name: "x"})
		if err == nil || err.Error() != c.want+"; refusing it" && err.Error() != c.want {
			t.Errorf("%s: error %v, want %q", c.name, err, c.want)
		}
	}
	p := StaticEnvFrom("SET", lookup)
	env["SET"] = "changed after construction"
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "openai"})
	if err != nil || tok.Value() != secretValue || tok.Name() != "openai" {
		t.Errorf("got %v %q, %v; want the value read at construction", tok, tok.Value(), err)
	}

	t.Setenv("ESCROW_TEST_CREDENTIAL", secretValue)
	tok, err = StaticEnv("ESCROW_TEST_CREDENTIAL").Fetch(context.Background(), FetchArgs{Name: "n"})
	if err != nil || tok.Value() != secretValue {
		t.Errorf("StaticEnv: %q, %v", tok.Value(), err)
	}
}

func TestNewProvider_StaticFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key")
	writeFile(t, path, secretValue+"\n")
	p, err := NewProvider("openai", config.Credential{Static: &config.Static{File: path}}, Deps{})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "openai"})
	if err != nil || tok.Value() != secretValue {
		t.Fatalf("Fetch: %v %v", tok, err)
	}
	if _, ok := p.(Staler); !ok {
		t.Errorf("file provider is not a Staler: rotation would go unseen")
	}
	assertShared(t, p)
}

func TestNewProvider_StaticEnvUsesDepsLookup(t *testing.T) {
	var asked []string
	lookup := func(k string) (string, bool) { asked = append(asked, k); return secretValue, true }
	p, err := NewProvider("openai", config.Credential{Static: &config.Static{Env: "OPENAI_API_KEY"}}, Deps{LookupEnv: lookup})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := p.Fetch(context.Background(), FetchArgs{Name: "openai"})
	if err != nil || tok.Value() != secretValue || len(asked) != 1 || asked[0] != "OPENAI_API_KEY" {
		t.Fatalf("Fetch: %v %v, lookups %q", tok, err, asked)
	}
	assertShared(t, p)
}

func TestNewProvider_StaticEnvDefaultsToProcessEnvironment(t *testing.T) {
	t.Setenv("ESCROW_TEST_NEWPROVIDER", secretValue)
	p, err := NewProvider("x", config.Credential{Static: &config.Static{Env: "ESCROW_TEST_NEWPROVIDER"}}, Deps{})
	if err != nil {
		t.Fatal(err)
	}
	if tok, err := p.Fetch(context.Background(), FetchArgs{Name: "x"}); err != nil || tok.Value() != secretValue {
		t.Errorf("Fetch: %v %v", tok, err)
	}
}

func TestNewProvider_NoProviderSet(t *testing.T) {
	for name, c := range map[string]config.Credential{
		"no provider set":                  {},
		"static: neither file nor env set": {Static: &config.Static{}},
	} {
		p, err := NewProvider("idp", c, Deps{})
		if p != nil || err == nil || err.Error() != "credential: idp: "+name {
			t.Errorf("NewProvider(%+v) = %v, %v; want the error %q", c, p, err, "credential: idp: "+name)
		}
	}
}

// assertShared checks that p keeps one cache entry per name whoever calls.
func assertShared(t *testing.T, p Provider) {
	t.Helper()
	if s, ok := p.(Shared); !ok || !s.Shared() {
		t.Errorf("%T is not Shared: it would be cached (and read) per subject", p)
	}
}
