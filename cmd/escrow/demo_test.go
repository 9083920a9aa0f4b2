package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets a test run this binary as the escrow command: with ESCROW_TEST_RUN_MAIN=1 the
// test binary is `escrow` (its arguments after "--"), so a test can signal a real process.
func TestMain(m *testing.M) {
	if os.Getenv("ESCROW_TEST_RUN_MAIN") == "1" {
		args := os.Args[1:]
		for i, a := range args {
			if a == "--" {
				args = args[i+1:]
				break
			}
		}
		os.Exit(run(args, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// escrowProcess starts this test binary as `escrow args...` with TMPDIR set to tmp.
func escrowProcess(t *testing.T, tmp string, args ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$", "--"}, args...)...)
	cmd.Env = append(os.Environ(), "ESCROW_TEST_RUN_MAIN=1", "TMPDIR="+tmp)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd, bufio.NewScanner(out)
}

// Ctrl-C on `escrow demo --keep-running` stops it and removes the temporary directory it made
// (which holds the demo's secret and CA key).
func TestDemo_KeepRunningRemovesItsTempDirOnCtrlC(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the proxy and an HTTPS API in a child process")
	}
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			tmp := t.TempDir()
			cmd, out := escrowProcess(t, tmp, "demo", "--keep-running")
			running := make(chan string, 1)
			go func() {
				defer close(running)
				for out.Scan() {
					// The last line of the "escrow is running" message names the config file.
					if cfg, ok := strings.CutPrefix(out.Text(), "config: "); ok {
						running <- cfg
						for out.Scan() { // keep draining: the demo prints audit records
						}
					}
				}
			}()
			var cfg string
			select {
			case c, ok := <-running:
				if !ok {
					t.Fatal("the demo ended before it said it was running")
				}
				cfg = c
			case <-time.After(60 * time.Second):
				t.Fatal("the demo did not start within 60s")
			}
			dir := filepath.Dir(cfg)
			if filepath.Dir(dir) != tmp || !strings.HasPrefix(filepath.Base(dir), "escrow-demo-") {
				t.Fatalf("config %s is not in a temporary directory under %s", cfg, tmp)
			}
			if _, err := os.Stat(filepath.Join(dir, "secrets")); err != nil {
				t.Fatalf("the demo's directory is not there while it runs: %v", err)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("escrow demo exited with %v after %s", err, sig)
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("escrow demo did not stop within 30s of %s", sig)
			}
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				entries, _ := os.ReadDir(dir)
				t.Fatalf("%s is still there after %s (stat: %v, entries %v)", dir, sig, err, entries)
			}
		})
	}
}
