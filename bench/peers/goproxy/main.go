// Command goproxy-basic is the benchmark's "minimal header-injecting Go proxy" peer: the smallest
// forward proxy one can write with github.com/elazarl/goproxy that adds one header to every
// plain-HTTP request. CONNECT is tunnelled by goproxy's default handler (no MITM), so the header is
// only added on plain HTTP. It logs nothing per request, like the other peers in the benchmark.
package main

import (
	"flag"
	"io"
	"log"
	"net/http"

	"github.com/elazarl/goproxy"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:18090", "listen address")
	header := flag.String("header", "X-Injected", "header to add to plain-HTTP requests")
	value := flag.String("value", "goproxy", "value of the added header")
	// net/http's default of 2 idle connections per host makes a proxy under concurrent load churn
	// upstream connections; 64 matches escrow's own upstream transport so both reuse alike.
	idle := flag.Int("idle-per-host", 64, "max idle upstream connections per host")
	flag.Parse()

	p := goproxy.NewProxyHttpServer()
	p.Verbose = false
	p.Logger = log.New(io.Discard, "", 0) // Warnf logs regardless of Verbose; keep it quiet.
	p.Tr.Proxy = nil                      // never chain to an env-configured proxy
	p.Tr.MaxIdleConns = 4 * *idle
	p.Tr.MaxIdleConnsPerHost = *idle
	p.OnRequest().DoFunc(func(r *http.Request, _ *goproxy.ProxyCtx) (*http.Request, *http.Response) {
		r.Header.Set(*header, *value)
		return r, nil
	})
	srv := &http.Server{Addr: *addr, Handler: p, ErrorLog: log.New(io.Discard, "", 0)}
	log.Fatal(srv.ListenAndServe())
}
