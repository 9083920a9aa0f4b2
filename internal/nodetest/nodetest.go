// Package nodetest prepares the Node.js clients the tests run (npm packages pinned by a
// package.json under testdata, installed once into the user's cache directory).
package nodetest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Script prepares the Node.js test client in dir (its package.json pins the npm packages; its
// client.mjs is the script) in a cache directory, installing the packages with npm the first
// time, and returns the script's path there. It skips the test, saying why, when node or npm is missing or
// too old, or when npm cannot install (no registry access).
func Script(t testing.TB, dir string) string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("skipping the Node.js client test: node is not installed")
	}
	npm, err := exec.LookPath("npm")
	if err != nil {
		t.Skip("skipping the Node.js client test: npm is not installed")
	}
	v, err := exec.Command(node, "-p", "process.versions.node").Output()
	if err != nil {
		t.Skipf("skipping the Node.js client test: node -p failed: %v", err)
	}
	var major, minor int
	if _, err := fmtSscanVersion(strings.TrimSpace(string(v)), &major, &minor); err != nil || major < 20 || (major == 20 && minor < 18) {
		t.Skipf("skipping the Node.js client test: node %s is older than 20.18 (undici 7 needs it)", strings.TrimSpace(string(v)))
	}
	pkg, err := os.ReadFile(filepath.Join(dir, "package.json"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(pkg)
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	inst := filepath.Join(cache, "escrow-test", "node-client-"+hex.EncodeToString(sum[:6]))
	if _, err := os.Stat(filepath.Join(inst, ".installed")); err != nil {
		// Install into a fresh directory and rename it into place: concurrent runs never see
		// a half-installed one.
		if err := os.MkdirAll(filepath.Dir(inst), 0o755); err != nil {
			t.Fatal(err)
		}
		tmp, err := os.MkdirTemp(filepath.Dir(inst), "install-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(tmp)
		if err := os.WriteFile(filepath.Join(tmp, "package.json"), pkg, 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, npm, "install", "--no-audit", "--no-fund", "--omit=dev", "--loglevel=error")
		cmd.Dir = tmp
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Skipf("skipping the Node.js client test: npm install failed (no registry access?): %v\n%s", err, tail(out, 2000))
		}
		if err := os.WriteFile(filepath.Join(tmp, ".installed"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, inst); err != nil && !os.IsExist(err) {
			if _, statErr := os.Stat(inst); statErr != nil {
				t.Fatal(err)
			}
		}
	}
	client, err := os.ReadFile(filepath.Join(dir, "client.mjs"))
	if err != nil {
		t.Fatal(err)
	}
	// A per-test copy next to node_modules, where Node resolves the imports from.
	csum := sha256.Sum256(client)
	name := "client-" + hex.EncodeToString(csum[:6]) + ".mjs"
	if err := os.WriteFile(filepath.Join(inst, name), client, 0o644); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(inst, name)
}

func fmtSscanVersion(v string, major, minor *int) (int, error) {
	parts := strings.SplitN(v, ".", 3)
	n := 0
	for i, p := range parts[:min(2, len(parts))] {
		x := 0
		for _, c := range p {
			if c < '0' || c > '9' {
				break
			}
			x = x*10 + int(c-'0')
		}
		if i == 0 {
			*major = x
		} else {
			*minor = x
		}
		n++
	}
	return n, nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
