package main

import (
	"fmt"
	"io"

	"github.com/escrowproxy/escrow/policy"
)

const policyUsage = `Usage:
  escrow policy validate --dir DIR   parse DIR/*.cedar (every policy needs @id) and validate them
                                     against DIR/schema.cedarschema when present
  escrow policy test FILE            run the test cases in FILE (YAML) against their policies
  escrow policy schema               print escrow's Cedar schema (principals, actions, context)
`

func cmdPolicy(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, policyUsage)
		return errUsage
	}
	switch args[0] {
	case "validate":
		fs := newFlagSet("policy validate", "escrow policy validate --dir DIR", stderr)
		dir := fs.String("dir", "", "policy directory; required")
		if err := parseFlags(fs, args[1:]); err != nil {
			return err
		}
		if *dir == "" && fs.NArg() == 1 {
			*dir = fs.Arg(0)
		}
		if *dir == "" {
			fmt.Fprintln(stderr, "escrow policy validate: --dir is required")
			return errUsage
		}
		n, err := policy.ValidateDir(*dir)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "ok: %d policies in %s\n", n, *dir)
		return nil
	case "test":
		fs := newFlagSet("policy test", "escrow policy test FILE", stderr)
		if err := parseFlags(fs, args[1:]); err != nil {
			return err
		}
		if fs.NArg() != 1 {
			fmt.Fprintln(stderr, "escrow policy test: want exactly one test file")
			return errUsage
		}
		rep, err := policy.RunTests(fs.Arg(0))
		if err != nil {
			return err
		}
		for _, c := range rep.Cases {
			fmt.Fprintln(stdout, c.String())
		}
		fmt.Fprintf(stdout, "%d passed, %d failed\n", rep.Passed(), rep.Failed())
		if !rep.OK() {
			return fmt.Errorf("policy test: %d of %d case(s) failed", rep.Failed(), len(rep.Cases))
		}
		return nil
	case "schema":
		_, err := stdout.Write(policy.DefaultSchema())
		return err
	case "-h", "--help", "help":
		fmt.Fprint(stdout, policyUsage)
		return nil
	default:
		fmt.Fprintf(stderr, "escrow policy: unknown subcommand %q\n\n%s", args[0], policyUsage)
		return errUsage
	}
}
