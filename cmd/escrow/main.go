// Command escrow is a per-pod egress proxy that keeps AI agents' credentials in escrow.
//
//	escrow proxy --config escrow.yaml    run the sidecar
//	escrow demo                          run a self-contained demonstration
//	escrow policy validate --dir D       check a policy directory (for CI)
//	escrow policy test FILE              run policy test cases (for CI)
//	escrow policy schema                 print the Cedar schema
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
	"strings"
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
  controller        run the control plane: serve policy and config to every sidecar over xDS
  policy validate   check that a policy directory parses and validates against the schema
  policy test       run policy test cases from a file
  policy schema     print escrow's Cedar schema (principals, actions, context)
  version           print the version

Run "escrow <command> --help" for a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func cmdVersion(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "escrow version", "Prints escrow's version.", stdout, stderr)
	if err := fs.parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "escrow version: unexpected arguments %q\n", fs.Args())
		return errUsage
	}
	fmt.Fprintf(stdout, "escrow %s\n", version)
	return nil
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
	case "controller":
		err = cmdController(ctx, rest, stdout, stderr)
	case "policy":
		err = cmdPolicy(rest, stdout, stderr)
	case "version", "--version":
		err = cmdVersion(rest, stdout, stderr)
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

// flagSet is a command's flags plus what its --help prints.
type flagSet struct {
	*flag.FlagSet
	synopsis, about string
	stdout, stderr  io.Writer
}

// newFlagSet makes a FlagSet that reports errors instead of exiting. --help prints the
// synopsis, about (what the command does; may be empty) and the flags to stdout and exits 0;
// a flag error prints them to stderr (exit 2).
func newFlagSet(name, synopsis, about string, stdout, stderr io.Writer) *flagSet {
	fs := &flagSet{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), synopsis: synopsis, about: about, stdout: stdout, stderr: stderr}
	fs.SetOutput(stderr)
	fs.FlagSet.Usage = func() { fs.printUsage(stderr) }
	return fs
}

// Usage prints the command's help to stderr (after a usage mistake).
func (fs *flagSet) Usage() { fs.printUsage(fs.stderr) }

func (fs *flagSet) printUsage(w io.Writer) {
	fmt.Fprintf(w, "Usage: %s\n", fs.synopsis)
	if fs.about != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimRight(fs.about, "\n"))
	}
	hasFlags := false
	fs.VisitAll(func(*flag.Flag) { hasFlags = true })
	if hasFlags {
		fmt.Fprint(w, "\nFlags:\n")
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(fs.stderr)
	}
}

// parse parses args. --help (-h, -help, anywhere before "--") prints the help to stdout and
// returns flag.ErrHelp (exit 0); a flag error returns errUsage (flag has printed it).
func (fs *flagSet) parse(args []string) error {
	if wantsHelp(args) {
		fs.printUsage(fs.stdout)
		return flag.ErrHelp
	}
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	return nil
}

func wantsHelp(args []string) bool {
	for _, a := range args {
		switch a {
		case "--":
			return false
		case "-h", "-help", "--help":
			return true
		}
	}
	return false
}
