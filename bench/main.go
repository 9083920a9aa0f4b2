// Command bench measures what escrow adds to an agent's outbound calls, side by side in one
// run with direct calls and with real forward proxies (squid, tinyproxy, smokescreen and a
// minimal goproxy), all on loopback: latency at a fixed rate (open loop, so queueing behind a
// slow response is counted), saturation throughput, resident memory and CPU per request.
//
// It is run by `make bench` (which builds escrow and the peers first); see docs/benchmarks.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

type options struct {
	Quick     bool
	EscrowBin string
	BinDir    string
	OutDir    string
	Docs      string
	Only      string

	Rate        float64
	Duration    time.Duration
	Warmup      time.Duration
	SatDuration time.Duration
	SatConns    int
	Workers     int
	Rounds      int
	BodySize    int
	NewConnRate float64

	ProxyCPU string
	LoadCPU  string
	Micro    bool
	Peers    string
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("bench: ")
	if len(os.Args) > 1 && os.Args[1] == relayCmd {
		if err := relayMain(os.Args[2:]); err != nil {
			log.Fatal(err)
		}
		return
	}
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		log.Fatal(err)
	}
	pinSelf(o)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		log.Print(err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var o options
	fs.BoolVar(&o.Quick, "quick", false, "short phases for a CI smoke run (under two minutes); results go to bench/results only")
	fs.StringVar(&o.EscrowBin, "escrow", "bin/escrow", "escrow binary under test")
	fs.StringVar(&o.BinDir, "bin", ".cache/bin", "where bench/peers/setup.sh built smokescreen and goproxy-basic")
	fs.StringVar(&o.OutDir, "out", "bench/results", "directory for the Markdown report and raw micro-benchmark output")
	fs.StringVar(&o.Docs, "docs", "", "also write the report into this Markdown file between bench markers (default: docs/benchmarks.md for a full run, none for --quick)")
	fs.StringVar(&o.Only, "only", "", "comma-separated scenarios to run: plain,intercepted,tunnel,policies,sse,newconn (default all)")
	fs.Float64Var(&o.Rate, "rate", 1000, "fixed request rate of the latency phases, requests/s")
	fs.DurationVar(&o.Duration, "duration", 12*time.Second, "measured length of each subject's fixed-rate phases, all rounds together")
	fs.DurationVar(&o.Warmup, "warmup", 500*time.Millisecond, "unmeasured fixed-rate warm-up before each round's phase")
	fs.DurationVar(&o.SatDuration, "sat-duration", 4500*time.Millisecond, "length of each subject's saturation (closed-loop) phases, all rounds together")
	fs.IntVar(&o.SatConns, "sat-conns", 32, "concurrent connections in the saturation phase")
	fs.IntVar(&o.Workers, "workers", 32, "most requests in flight in a fixed-rate phase")
	fs.IntVar(&o.Rounds, "rounds", 3, "the subjects of a scenario take turns this many times; --duration and --sat-duration are split among the rounds")
	fs.IntVar(&o.BodySize, "body", 1024, "upstream response body, bytes")
	fs.Float64Var(&o.NewConnRate, "newconn-rate", 200, "rate of the new-connection phases, requests/s")
	fs.StringVar(&o.ProxyCPU, "proxy-cpu", "0", "CPU list the proxy under test is pinned to (taskset); empty: no pinning")
	fs.StringVar(&o.LoadCPU, "load-cpu", "1", "CPU list of the load generator and upstream; empty: no pinning")
	fs.BoolVar(&o.Micro, "micro", true, "also run the Go micro-benchmarks (full runs only)")
	fs.StringVar(&o.Peers, "peers", "squid,tinyproxy,smokescreen,goproxy", "peers to compare with (those not installed are skipped and named in the report)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: bench [flags]\n\nMeasures escrow against direct calls and peer proxies on loopback. Run it with `make bench`.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0))
	}
	if o.Quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		def := func(name string, apply func()) {
			if !set[name] {
				apply()
			}
		}
		def("duration", func() { o.Duration = 1500 * time.Millisecond })
		def("warmup", func() { o.Warmup = 300 * time.Millisecond })
		def("sat-duration", func() { o.SatDuration = 1500 * time.Millisecond })
		def("newconn-rate", func() { o.NewConnRate = 100 })
		def("rounds", func() { o.Rounds = 1 })
		def("micro", func() { o.Micro = false })
	} else if o.Docs == "" {
		o.Docs = "docs/benchmarks.md"
	}
	var errs []string
	if o.Rate <= 0 || o.NewConnRate <= 0 {
		errs = append(errs, "--rate and --newconn-rate must be positive")
	}
	if o.Duration <= 0 || o.SatDuration <= 0 || o.Warmup < 0 {
		errs = append(errs, "--duration and --sat-duration must be positive, --warmup not negative")
	}
	if o.Workers < 1 || o.SatConns < 1 || o.Rounds < 1 || o.BodySize < 0 {
		errs = append(errs, "--workers, --sat-conns and --rounds must be at least 1, --body not negative")
	}
	for _, s := range splitList(o.Only) {
		if !validScenario(s) {
			errs = append(errs, fmt.Sprintf("--only: unknown scenario %q", s))
		}
	}
	if len(errs) > 0 {
		return o, errors.New(strings.Join(errs, "; "))
	}
	return o, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// pinSelf re-executes the benchmark on the load generator's CPUs, so that it and the upstream
// never compete with the proxy under test for a core. The Go runtime then sizes GOMAXPROCS to
// the pinned set, as it does for the proxy.
func pinSelf(o options) {
	if o.LoadCPU == "" || o.ProxyCPU == "" || os.Getenv("ESCROW_BENCH_PINNED") != "" || runtime.NumCPU() < 2 {
		return
	}
	taskset, err := exec.LookPath("taskset")
	if err != nil {
		return
	}
	self, err := os.Executable()
	if err != nil {
		return
	}
	env := append(os.Environ(), "ESCROW_BENCH_PINNED="+o.LoadCPU)
	args := append([]string{"taskset", "-c", o.LoadCPU, self}, os.Args[1:]...)
	if err := syscall.Exec(taskset, args, env); err != nil {
		log.Printf("not pinned: %v", err)
	}
}

// pinning describes how the run was pinned, for the report.
func pinning(o options) string {
	if os.Getenv("ESCROW_BENCH_PINNED") == "" {
		return "not pinned (one CPU, or taskset missing): proxy, load generator and upstream share the cores"
	}
	return fmt.Sprintf("proxy under test on CPU %s; load generator and upstream on CPU %s", o.ProxyCPU, o.LoadCPU)
}

func quietLog() *log.Logger { return log.New(io.Discard, "", 0) }

func run(ctx context.Context, o options) error {
	if _, err := os.Stat(o.EscrowBin); err != nil {
		return fmt.Errorf("escrow binary: %w (run `make build` or `make bench`)", err)
	}
	// Processes run in their own scratch directories: resolve paths first.
	var err error
	if o.EscrowBin, err = filepath.Abs(o.EscrowBin); err != nil {
		return err
	}
	if o.BinDir, err = filepath.Abs(o.BinDir); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "escrow-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cpu := o.ProxyCPU
	if os.Getenv("ESCROW_BENCH_PINNED") == "" {
		cpu = ""
	}
	r := &runner{o: o, dir: dir, cpu: cpu, key: randomKey(), started: time.Now()}
	defer r.stopAll()
	if err := r.setup(ctx); err != nil {
		return err
	}
	rep := r.scenarios(ctx)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if o.Micro {
		rep.Micro, rep.MicroRaw, rep.MicroErr = runMicro(ctx)
	}
	rep.Elapsed = time.Since(r.started)
	return r.write(rep)
}

func (r *runner) write(rep *report) error {
	md := rep.markdown()
	if err := os.MkdirAll(r.o.OutDir, 0o755); err != nil {
		return err
	}
	mode := "full"
	if r.o.Quick {
		mode = "quick"
	}
	stamp := r.started.UTC().Format("20060102-150405")
	out := filepath.Join(r.o.OutDir, stamp+"-"+mode+".md")
	if err := os.WriteFile(out, []byte(md), 0o644); err != nil {
		return err
	}
	if rep.MicroRaw != "" {
		if err := os.WriteFile(filepath.Join(r.o.OutDir, stamp+"-micro.txt"), []byte(rep.MicroRaw), 0o644); err != nil {
			return err
		}
	}
	fmt.Println(md)
	fmt.Printf("report: %s\n", out)
	if r.o.Docs != "" {
		if err := updateDocs(r.o.Docs, md); err != nil {
			return err
		}
		fmt.Printf("updated: %s\n", r.o.Docs)
	}
	if bad := rep.escrowFailures(); len(bad) > 0 {
		return fmt.Errorf("escrow or direct requests failed: %s", strings.Join(bad, "; "))
	}
	return nil
}
