package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/escrowproxy/escrow/policy"
)

const policyUsage = `Usage:
  escrow policy validate --dir DIR   parse DIR/*.cedar (every policy needs @id) and validate them
                                     against DIR/schema.cedarschema, or escrow's built-in schema
  escrow policy test FILE            run the test cases in FILE (YAML) against their policies
  escrow policy schema               print escrow's Cedar schema (principals, actions, context)

Run "escrow policy <subcommand> --help" for a subcommand's help.
`

const validateAbout = `Parses every *.cedar file in DIR, checks that each policy has a unique @id, and validates
every policy against DIR/schema.cedarschema, or escrow's built-in schema ("escrow policy
schema") when DIR has none. Policies that can never match a request are rejected too. Every
problem is printed with its file:line:col; the exit status is 1 if there is any.`

const testAbout = `Runs the cases in FILE (YAML) against the policy directory FILE names, and prints PASS or
FAIL for each; the exit status is 1 if a case fails or FILE is malformed (every mistake is
reported, with its case number and key). The format:

  policies: policies              # the policy directory, relative to FILE
  time: 2026-03-02T09:30:00Z      # optional: the time of cases without their own
  cases:
    - name: coder reads a repository
      principal: spiffe://example.org/ns/agents/sa/coder
      identity: {attested: true, source: spiffe, expires_in_s: 3600}   # optional
      time: 2026-03-02T09:30:00Z                                      # optional
      request: {method: GET, host: api.github.com, path: /repos/acme/app, credential: github}
      expect: allow                 # allow | deny
      policies: [coder-reads-github] # optional: the exact determining policies

docs/policy.md describes every key.`

const schemaAbout = `Prints the Cedar schema (human-readable format) of the requests escrow builds: the Workload
principal and its ServiceAccount and Namespace, the Host, Tool, Resource and Prompt resources,
the actions and the context. Policies are validated against it unless their directory has a
schema.cedarschema of its own; start one with "escrow policy schema > DIR/schema.cedarschema".`

func cmdPolicy(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, policyUsage)
		return errUsage
	}
	switch args[0] {
	case "validate":
		fs := newFlagSet("policy validate", "escrow policy validate --dir DIR", validateAbout, stdout, stderr)
		dir := fs.String("dir", "", "policy directory; required")
		if err := fs.parse(args[1:]); err != nil {
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
		against := policy.BuiltinSchemaName
		if _, err := os.Stat(filepath.Join(*dir, policy.SchemaFile)); err == nil {
			against = filepath.Join(*dir, policy.SchemaFile)
		}
		fmt.Fprintf(stdout, "ok: %d policies in %s (validated against %s)\n", n, *dir, against)
		return nil
	case "test":
		fs := newFlagSet("policy test", "escrow policy test FILE", testAbout, stdout, stderr)
		if err := fs.parse(args[1:]); err != nil {
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
		fs := newFlagSet("policy schema", "escrow policy schema", schemaAbout, stdout, stderr)
		if err := fs.parse(args[1:]); err != nil {
			return err
		}
		if fs.NArg() > 0 {
			fmt.Fprintf(stderr, "escrow policy schema: unexpected arguments %q\n", fs.Args())
			return errUsage
		}
		_, err := stdout.Write(policy.DefaultSchema())
		return err
	case "-h", "--help", "-help", "help":
		fmt.Fprint(stdout, policyUsage)
		return nil
	default:
		fmt.Fprintf(stderr, "escrow policy: unknown subcommand %q\n\n%s", args[0], policyUsage)
		return errUsage
	}
}
