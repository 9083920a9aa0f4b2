package main

import (
	"slices"
	"time"
)

// latency summarises one measured phase. Percentiles use the nearest-rank method on every
// sample (no histogram buckets), so p99.9 of 15,000 samples is the 15th largest.
type latency struct {
	N      int // successful requests measured
	Errors int // failed requests (transport error or unexpected status)
	P50    time.Duration
	P90    time.Duration
	P99    time.Duration
	P999   time.Duration
	Max    time.Duration
}

// percentile returns the nearest-rank p-th percentile (0 < p <= 100) of sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	// rank = ceil(p/100 * n), 1-based. Integer arithmetic in per-mille avoids float
	// rounding at exact boundaries (p99 of 100 samples is the 99th, not the 100th).
	n := len(sorted)
	permille := int(p*10 + 0.5)
	rank := (permille*n + 999) / 1000
	if rank < 1 {
		rank = 1
	}
	if rank > n {
		rank = n
	}
	return sorted[rank-1]
}

func summarize(samples []time.Duration, errors int) latency {
	s := slices.Clone(samples)
	slices.Sort(s)
	l := latency{N: len(s), Errors: errors}
	if len(s) == 0 {
		return l
	}
	l.P50 = percentile(s, 50)
	l.P90 = percentile(s, 90)
	l.P99 = percentile(s, 99)
	l.P999 = percentile(s, 99.9)
	l.Max = s[len(s)-1]
	return l
}

// minus is the added latency of l over base at each percentile. It can be negative where
// noise exceeds the difference; the report prints it as measured.
func (l latency) minus(base latency) [4]time.Duration {
	return [4]time.Duration{l.P50 - base.P50, l.P90 - base.P90, l.P99 - base.P99, l.P999 - base.P999}
}

func (l latency) all() [4]time.Duration { return [4]time.Duration{l.P50, l.P90, l.P99, l.P999} }
