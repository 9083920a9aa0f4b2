package scrub

import (
	"bufio"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"
	"time"
)

// TestBody_SSEEventsReachTheAgentBeforeTheUpstreamSendsMore runs a real streaming upstream, a
// reverse proxy that scrubs the response body as escrow does, and a client reading events. The
// upstream sends event i+1 only after the client has acknowledged event i: if the scrubber
// held any part of an event back until more data came, the stream would stall (and the
// deadlock guard below would fail the test). Events carry the secret whole, split across two
// writes, and a prefix of it that must not hold the event back.
func TestBody_SSEEventsReachTheAgentBeforeTheUpstreamSendsMore(t *testing.T) {
	s := New(secret)
	events := []struct{ writes []string }{
		{[]string{"data: hello\n\n"}},
		{[]string{"data: {\"token\":\"" + secret + "\"}\n\n"}},
		{[]string{"data: split " + secret[:9], secret[9:] + " tail\n\n"}},
		{[]string{"data: only a prefix " + secret[:20] + "\n\n"}},
		{[]string{"event: x\ndata: " + url.QueryEscape(secret) + "\n\n"}},
		{[]string{"data: ends with a prefix " + secret[:12] + "\n", "\n"}},
		{[]string{"data: [DONE]\n\n"}},
	}
	ack := make(chan int)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		f := w.(http.Flusher)
		for i, ev := range events {
			for _, wr := range ev.writes {
				fmt.Fprint(w, wr)
				f.Flush()
			}
			select {
			case got := <-ack:
				if got != i {
					t.Errorf("ack %d, want %d", got, i)
					return
				}
			case <-r.Context().Done():
				return
			}
		}
	}))
	defer upstream.Close()
	target, _ := url.Parse(upstream.URL)

	var done = make(chan BodyResult, 1)
	proxy := httptest.NewServer(&httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		FlushInterval: -1,
		ModifyResponse: func(resp *http.Response) error {
			if Scrubbable(resp.Header.Get("Content-Type")) {
				resp.Body = s.Body(resp.Body, BodyOptions{OnDone: func(r BodyResult) { done <- r }})
			}
			return nil
		},
	})
	defer proxy.Close()

	resp, err := http.Get(proxy.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	type event struct {
		i    int
		text string
		err  error
	}
	got := make(chan event)
	go func() {
		br := bufio.NewReader(resp.Body)
		for i := range events {
			var ev strings.Builder
			for !strings.HasSuffix(ev.String(), "\n\n") {
				line, err := br.ReadString('\n')
				ev.WriteString(line)
				if err != nil {
					got <- event{i, ev.String(), err}
					return
				}
			}
			got <- event{i, ev.String(), nil}
		}
	}()
	for i, want := range events {
		var ev event
		select {
		case ev = <-got:
		case <-time.After(10 * time.Second): // a deadlock guard, not a timing assertion
			t.Fatalf("event %d never arrived: held back waiting for later data", i)
		}
		if ev.err != nil || ev.i != i {
			t.Fatalf("event %d: got #%d %q %v", i, ev.i, ev.text, ev.err)
		}
		sent := strings.Join(want.writes, "")
		if len(ev.text) != len(sent) {
			t.Errorf("event %d: %q has another length than %q", i, ev.text, sent)
		}
		assertClean(t, ev.text, secret)
		if !strings.Contains(sent, secret) && !strings.Contains(sent, url.QueryEscape(secret)) && ev.text != sent {
			t.Errorf("event %d changed without a secret: %q", i, ev.text)
		}
		ack <- i
	}
	select {
	case r := <-done:
		if r.Redacted != 3 {
			t.Errorf("Redacted %d, want 3", r.Redacted)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no result reported")
	}
}
