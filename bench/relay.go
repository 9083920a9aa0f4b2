package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// The relay is the floor of the comparison: a process on the proxy's core that copies bytes
// between the agent and the upstream and does nothing else (no HTTP parsing, no TLS). What it
// adds over direct is the cost of one more process hop on this machine (cross-core wake-ups,
// two more socket pairs); a proxy's latency above the relay's is its own work.
//
// It runs as `bench relay LISTEN=UPSTREAM ...`, a re-execution of the benchmark binary, so no
// other program is needed.

const relayCmd = "relay"

func relayMain(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: bench relay LISTEN=UPSTREAM [LISTEN=UPSTREAM ...]")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	for _, a := range args {
		listen, up, ok := strings.Cut(a, "=")
		if !ok {
			return fmt.Errorf("relay: %q is not LISTEN=UPSTREAM", a)
		}
		ln, err := net.Listen("tcp", listen)
		if err != nil {
			return fmt.Errorf("relay: %w", err)
		}
		go relayServe(ln, up)
	}
	<-ctx.Done()
	return nil
}

func relayServe(ln net.Listener, upstream string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				return
			}
			defer u.Close()
			done := make(chan struct{})
			go func() {
				io.Copy(u, c)
				u.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			io.Copy(c, u)
			c.(*net.TCPConn).CloseWrite()
			<-done
		}()
	}
}

// startRelay runs the relay for the plain and TLS upstream ports; it returns the process and
// the two listen addresses.
func (r *runner) startRelay(ctx context.Context) (p *proc, plain, tls string, err error) {
	a, err := r.args("relay")
	if err != nil {
		return nil, "", "", err
	}
	port2, err := freePort()
	if err != nil {
		return nil, "", "", err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, "", "", err
	}
	plain = fmt.Sprintf("127.0.0.1:%d", a.Port)
	tls = fmt.Sprintf("127.0.0.1:%d", port2)
	p, err = startProc(ctx, "relay", plain, a, cleanEnv(), self, relayCmd, plain+"="+r.up.HTTPAddr, tls+"="+r.up.HTTPSAddr)
	return p, plain, tls, err
}
