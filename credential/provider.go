package credential

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"sync"
	"time"
)

// Provider fetches a fresh credential. Implementations must be safe for concurrent use, must
// honour ctx, and must never put the secret into an error.
type Provider interface {
	Fetch(ctx context.Context, args FetchArgs) (Token, error)
}

// FetchArgs is what a Provider is asked for. It is a struct so providers that need more (the
// caller's attest.Identity and its JWT-SVID for OAuth2 client assertions, RFC 8693 token
// exchange or STS web identity) can grow it without changing the interface.
type FetchArgs struct {
	// Name is the credential's name from the configuration; providers name their Token with it.
	Name string
}

// Staler is implemented by providers whose source can change under a token that does not
// expire (a secret file rotated by a Kubernetes Secret volume update). Manager calls Stale at
// most once per Options.RecheckEvery per credential, on the request path, so it must be cheap
// (a stat, not a read) and safe for concurrent use. It reports whether the value the most recent
// Fetch returned may no longer be current; Manager then fetches again.
type Staler interface {
	Stale(now time.Time) bool
}

// maxFileSize bounds how much of a secret file is read; a larger file is an error (a mistaken
// path, not a secret).
const maxFileSize = 64 << 10

// StaticFile returns a Provider that reads a secret from the file at path on every Fetch,
// trimming surrounding whitespace (a trailing newline). A missing, unreadable, empty or oversized
// file, or one whose value contains control characters, is an error naming the path and the
// problem. It implements Staler: the file is re-stat'ed (size, modification time and inode,
// following symlinks) and reported stale when it differs from the file last read, so a rotated
// secret (e.g. a Kubernetes Secret volume's symlink swap) is picked up without a restart.
func StaticFile(path string) Provider {
	return &fileProvider{path: path}
}

type fileProvider struct {
	path string

	mu   sync.Mutex
	last os.FileInfo // of the file the last successful Fetch read; nil before
}

func (p *fileProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	if err := ctx.Err(); err != nil {
		return Token{}, err
	}
	f, err := os.Open(p.path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Token{}, fmt.Errorf("secret file %s does not exist", p.path)
		}
		return Token{}, fmt.Errorf("secret file: %w", err)
	}
	defer f.Close()
	// Stat the open file, not the path, so the fingerprint belongs to exactly the bytes read
	// even if the path is swapped between the two calls.
	fi, err := f.Stat()
	if err != nil {
		return Token{}, fmt.Errorf("secret file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return Token{}, fmt.Errorf("secret file %s is not a regular file", p.path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return Token{}, fmt.Errorf("secret file: %w", err)
	}
	if len(b) > maxFileSize {
		return Token{}, fmt.Errorf("secret file %s is larger than %d bytes", p.path, maxFileSize)
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return Token{}, fmt.Errorf("secret file %s is empty", p.path)
	}
	if err := checkValue(v); err != nil {
		return Token{}, fmt.Errorf("secret file %s: %w", p.path, err)
	}
	p.mu.Lock()
	p.last = fi
	p.mu.Unlock()
	return NewToken(args.Name, v, time.Time{}), nil
}

// Stale reports whether the file at path is no longer the file last read: it is gone, or its
// inode, size or modification time differ.
func (p *fileProvider) Stale(time.Time) bool {
	p.mu.Lock()
	last := p.last
	p.mu.Unlock()
	if last == nil {
		return true
	}
	fi, err := os.Stat(p.path)
	if err != nil {
		return true
	}
	return !os.SameFile(fi, last) || fi.Size() != last.Size() || !fi.ModTime().Equal(last.ModTime())
}

// StaticEnv returns a Provider serving the value of the escrow process's environment variable
// name, read once now (surrounding whitespace trimmed). An unset or empty variable, or a value
// with control characters, makes every Fetch fail with an error naming the variable.
func StaticEnv(name string) Provider {
	return StaticEnvFrom(name, os.LookupEnv)
}

// StaticEnvFrom is StaticEnv with the environment lookup injected (os.LookupEnv in production).
func StaticEnvFrom(name string, lookup func(string) (string, bool)) Provider {
	v, ok := lookup(name)
	v = strings.TrimSpace(v)
	switch {
	case !ok:
		return &envProvider{err: fmt.Errorf("environment variable %s is not set", name)}
	case v == "":
		return &envProvider{err: fmt.Errorf("environment variable %s is empty", name)}
	}
	if err := checkValue(v); err != nil {
		return &envProvider{err: fmt.Errorf("environment variable %s: %w", name, err)}
	}
	return &envProvider{value: v}
}

type envProvider struct {
	value string
	err   error
}

func (p *envProvider) Fetch(ctx context.Context, args FetchArgs) (Token, error) {
	if p.err != nil {
		return Token{}, p.err
	}
	if err := ctx.Err(); err != nil {
		return Token{}, err
	}
	return NewToken(args.Name, p.value, time.Time{}), nil
}
