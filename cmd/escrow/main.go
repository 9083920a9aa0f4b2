// Command escrow is a per-pod egress proxy that keeps AI agents' credentials in escrow.
//
//	escrow proxy --config escrow.yaml    run the sidecar
//	escrow demo                          run a self-contained demonstration
//	escrow policy validate --dir D       check a policy directory (for CI)
//	escrow policy test FILE              run policy test cases (for CI)
//	escrow version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `escrow keeps AI agents' credentials in escrow: every outbound call goes through it, it
proves which workload is calling, asks a Cedar policy whether this exact call is allowed, and
only then puts the real credential on the request.

Usage:
  escrow <command> [flags]

Commands:
  proxy             run the egress proxy (the sidecar)
  demo              run a self-contained demo: proxy, a local HTTPS API, three agent calls
  webhook           run the Kubernetes admission webhook that adds escrow to pods
  policy validate   check that a policy directory parses and validates
  policy test       run policy test cases from a file
  version           print the version

Run "escrow <command> --help" for a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage marks a usage mistake: exit code 2, as flag does.
var errUsage = errors.New("usage")

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	// The first signal starts a graceful drain; restoring the default handling lets a second one
	// end the process at once.
	go func() { <-ctx.Done(); stop() }()

	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "proxy":
		err = cmdProxy(ctx, rest, stdout, stderr)
	case "demo":
		err = cmdDemo(ctx, rest, stdout, stderr)
	case "webhook":
		err = cmdWebhook(ctx, rest, stdout, stderr)
	case "policy":
		err = cmdPolicy(rest, stdout, stderr)
	case "version", "--version":
		fmt.Fprintf(stdout, "escrow %s\n", version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "escrow: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "escrow: %v\n", err)
		return 1
	}
}

// newFlagSet makes a FlagSet that reports errors instead of exiting, with a usage header.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses and maps flag errors to errUsage (flag has already printed them).
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}
