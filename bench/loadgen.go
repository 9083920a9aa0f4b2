package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// client is how the load generator reaches one URL: an agent's HTTP client with its proxy
// (HTTP_PROXY/HTTPS_PROXY semantics through http.Transport.Proxy) and trust roots.
type client struct {
	HTTP   *http.Client
	URL    string
	Header http.Header   // sent on every request (e.g. what the upstream should check)
	next   func() string // when set, the URL of each request (a new host each time)
}

// openLoop is a fixed-rate run: request i is due at start + i/Rate whatever happened to the
// requests before it. A request that could not be sent on time because every worker was busy
// counts its latency from that due time, so a slow response delays the requests behind it
// and they count the wait, which is what an agent sees; a closed loop would hide it
// (coordinated omission).
type openLoop struct {
	Rate     float64       // requests per second
	Duration time.Duration // measured part
	Warmup   time.Duration // run at the same rate first, not measured
	Workers  int           // upper bound on requests in flight (and connections)
}

type runResult struct {
	Samples  []time.Duration
	Errors   int
	FirstErr string
	Elapsed  time.Duration
}

func (r runResult) ok() int { return len(r.Samples) }

// do sends one request and reads the whole body. It returns a description of a failure.
func (c client) do(ctx context.Context) string {
	u := c.URL
	if c.next != nil {
		u = c.next()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err.Error()
	}
	for k, v := range c.Header {
		req.Header[k] = v
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err.Error()
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("status %d (%s)", resp.StatusCode, resp.Header.Get("X-Escrow-Reason"))
	}
	if err != nil {
		return "body: " + err.Error()
	}
	return ""
}

func runOpenLoop(ctx context.Context, c client, o openLoop) runResult {
	if o.Warmup > 0 {
		_ = fixedRate(ctx, c, o.Rate, o.Warmup, o.Workers)
	}
	return fixedRate(ctx, c, o.Rate, o.Duration, o.Workers)
}

func fixedRate(ctx context.Context, c client, rate float64, d time.Duration, workers int) runResult {
	total := int64(rate * d.Seconds())
	interval := time.Duration(float64(time.Second) / rate)
	start := time.Now().Add(5 * time.Millisecond)
	var next atomic.Int64
	var mu sync.Mutex
	var res runResult
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, total/int64(workers)+16)
			errs, first := 0, ""
			for ctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= total {
					break
				}
				due := start.Add(time.Duration(i) * interval)
				from := due
				if w := time.Until(due); w > 0 {
					// This worker was idle when the request fell due: any delay past due
					// is the timer's (Go's can fire up to about a millisecond late), not
					// queueing, so the latency counts from the actual send. A request
					// that fell due while every worker was busy counts from its due time.
					time.Sleep(w)
					from = time.Now()
				}
				if msg := c.do(ctx); msg != "" {
					errs++
					if first == "" {
						first = msg
					}
					continue
				}
				local = append(local, time.Since(from))
			}
			mu.Lock()
			res.Samples = append(res.Samples, local...)
			res.Errors += errs
			if res.FirstErr == "" {
				res.FirstErr = first
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	return res
}

// closedLoop runs Conns workers back to back for Duration: the saturation throughput.
func runClosedLoop(ctx context.Context, c client, conns int, d time.Duration) (rps float64, res runResult) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var okN, errN atomic.Int64
	var first atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				msg := c.do(ctx)
				if ctx.Err() != nil {
					return // cut off by the deadline: neither success nor failure
				}
				if msg != "" {
					errN.Add(1)
					first.CompareAndSwap(nil, msg)
					continue
				}
				okN.Add(1)
			}
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	res.Errors = int(errN.Load())
	if v, _ := first.Load().(string); v != "" {
		res.FirstErr = v
	}
	return float64(okN.Load()) / res.Elapsed.Seconds(), res
}

// sseResult is one Server-Sent Events stream: time to the first event from the request, and
// the gaps between events as the agent received them.
type sseResult struct {
	TTFE time.Duration
	Gaps []time.Duration
	Err  string
}

// readSSE opens the stream and times each "data:" line's arrival.
func readSSE(ctx context.Context, c client, events int) sseResult {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.URL, nil)
	if err != nil {
		return sseResult{Err: err.Error()}
	}
	for k, v := range c.Header {
		req.Header[k] = v
	}
	start := time.Now()
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return sseResult{Err: err.Error()}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return sseResult{Err: fmt.Sprintf("status %d", resp.StatusCode)}
	}
	var r sseResult
	br := bufio.NewReader(resp.Body)
	last := start
	seen := 0
	for seen < events {
		line, err := br.ReadString('\n')
		if err != nil {
			r.Err = fmt.Sprintf("after %d events: %v", seen, err)
			return r
		}
		if !strings.HasPrefix(line, "data:") {
			continue
		}
		now := time.Now()
		if seen == 0 {
			r.TTFE = now.Sub(start)
		} else {
			r.Gaps = append(r.Gaps, now.Sub(last))
		}
		last = now
		seen++
	}
	return r
}
