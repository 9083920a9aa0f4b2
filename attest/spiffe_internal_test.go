package attest

import (
	"testing"
	"time"
)

func TestReconnectBackoff_Defaults(t *testing.T) {
	for _, tc := range []struct {
		in, want ReconnectBackoff
	}{
		{ReconnectBackoff{}, ReconnectBackoff{DefaultReconnectInitial, DefaultReconnectMax}},
		{ReconnectBackoff{Max: 100 * time.Millisecond}, ReconnectBackoff{100 * time.Millisecond, 100 * time.Millisecond}},
		{ReconnectBackoff{Max: 5 * time.Second}, ReconnectBackoff{DefaultReconnectInitial, 5 * time.Second}},
		{ReconnectBackoff{Initial: 5 * time.Second}, ReconnectBackoff{5 * time.Second, 5 * time.Second}},
		{ReconnectBackoff{Initial: 50 * time.Millisecond}, ReconnectBackoff{50 * time.Millisecond, DefaultReconnectMax}},
	} {
		got, err := tc.in.withDefaults()
		if err != nil || got != tc.want {
			t.Errorf("%+v.withDefaults() = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
}

// The waits grow by 1.6× from Initial, stop growing at Max, are spread by ±20%, and start over
// after Reset. The gRPC channel gets the same numbers.
func TestReconnectBackoff_GrowsToMaxWithJitterAndResets(t *testing.T) {
	cfg := ReconnectBackoff{Initial: 100 * time.Millisecond, Max: time.Second}
	s := reconnectStrategy{cfg}
	b := s.NewBackoff()
	base := []time.Duration{100, 160, 256, 409, 655, 1000, 1000, 1000, 1000, 1000}
	spread := false
	for round := 0; round < 2; round++ {
		for i, ms := range base {
			want := ms * time.Millisecond
			got := b.Next()
			lo, hi := time.Duration(float64(want)*0.8)-time.Millisecond, time.Duration(float64(want)*1.2)+time.Millisecond
			if got < lo || got > hi {
				t.Fatalf("round %d wait %d = %v, want %v ±20%%", round, i, got, want)
			}
			if got < want*95/100 || got > want*105/100 {
				spread = true
			}
		}
		b.Reset()
	}
	if !spread {
		t.Error("20 waits all within 5% of their base: no jitter")
	}
	p := s.grpc()
	if p.Backoff.BaseDelay != cfg.Initial || p.Backoff.MaxDelay != cfg.Max || p.Backoff.Multiplier != 1.6 || p.Backoff.Jitter != 0.2 {
		t.Errorf("gRPC connect backoff = %+v, want the same backoff", p.Backoff)
	}
}
