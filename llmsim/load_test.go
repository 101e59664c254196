package llmsim

import (
	"context"
	"math"
	"math/rand/v2"
	"net/http"
	"testing"
	"time"
)

func TestArrivals(t *testing.T) {
	for _, tc := range []struct {
		name    string
		w       Workload
		minSCV  float64 // squared coefficient of variation of the gaps
		maxSCV  float64
		meanGap float64
	}{
		{"poisson", Workload{Rate: 20}, 0.8, 1.2, 0.05},
		{"on/off", Workload{Rate: 20, BurstOn: 500 * time.Millisecond, BurstOff: time.Second}, 2, 100, 0.05},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newArrivals(tc.w, rand.New(rand.NewPCG(1, 2)))
			const n = 50000
			var sum, sq float64
			for i := 0; i < n; i++ {
				g := a.next().Seconds()
				sum += g
				sq += g * g
			}
			mean := sum / n
			scv := (sq/n - mean*mean) / (mean * mean)
			t.Logf("mean gap %.4fs, SCV %.2f", mean, scv)
			if math.Abs(mean-tc.meanGap) > 0.1*tc.meanGap {
				t.Fatalf("mean gap %.4fs, want %.4fs ±10%%", mean, tc.meanGap)
			}
			if scv < tc.minSCV || scv > tc.maxSCV {
				t.Fatalf("SCV %.2f, want %.1f..%.1f", scv, tc.minSCV, tc.maxSCV)
			}
		})
	}
}

func TestNonStreamShare(t *testing.T) {
	s := start(t, Config{})
	w := Workload{URL: s.URL() + "/v1/chat/completions", Rate: 40, Duration: time.Second, NonStream: 0.5,
		MinPrompt: 20, MaxPrompt: 40, MinOutput: 4, MaxOutput: 8, Seed: 3}
	recs := w.Run(context.Background(), 10*time.Second)
	streams, plain := 0, 0
	for _, r := range recs {
		if r.Err != nil || r.Status != http.StatusOK {
			t.Fatalf("request failed: %v %d", r.Err, r.Status)
		}
		if r.Stream {
			streams++
			continue
		}
		plain++
		if r.TTFT != r.E2E || r.Tokens != r.Output {
			t.Fatalf("non-stream record %+v: want TTFT = E2E and all tokens", r)
		}
	}
	if streams == 0 || plain == 0 {
		t.Fatalf("%d streams and %d non-streams, want both", streams, plain)
	}
	if sum := Summarize(recs, time.Second); sum.Errors != 0 || sum.TTFT.P50 == 0 {
		t.Fatalf("summary %+v", sum)
	}
}

// TestCapacityOpenLoop offers one engine its estimated capacity as Poisson
// arrivals and checks it completes about that rate.
func TestCapacityOpenLoop(t *testing.T) {
	cfg := Config{MaxRunning: 8, Speed: 2}
	w := Workload{MinPrompt: 50, MaxPrompt: 500, MinOutput: 16, MaxOutput: 64, Seed: 7, Duration: 5 * time.Second}
	mp, mo := w.MeanTokens()
	capacity := cfg.Capacity(mp, mo)
	s := start(t, cfg)
	w.URL, w.Rate = s.URL()+"/v1/chat/completions", capacity
	start := time.Now()
	recs := w.Run(context.Background(), 0)
	// completions in [1s, 5s): past the ramp-up, before the cut-off
	done := 0
	for _, r := range recs {
		end := r.Started.Add(r.E2E).Sub(start)
		if r.Err == nil && r.Status == 200 && end >= time.Second && end < 5*time.Second {
			done++
		}
	}
	got := float64(done) / 4
	t.Logf("estimated capacity %.1f req/s, completed %.1f req/s at 100%% offered load", capacity, got)
	if got < 0.75*capacity || got > 1.25*capacity {
		t.Fatalf("completed %.1f req/s at an offered %.1f req/s, want ±25%%", got, capacity)
	}
}

func TestSideTraffic(t *testing.T) {
	s := start(t, Config{})
	run := SideTraffic{BaseURL: s.URL(), Before: 3, ProbeEvery: 50 * time.Millisecond, ModelsEvery: 100 * time.Millisecond, Malformed: 3}.
		Start(context.Background(), 600*time.Millisecond)
	st := run.Wait()
	t.Logf("%+v", st)
	if st.Unexpected != 0 || st.Malformed != 3 || st.Probes < 3+5 || st.Models < 3+2 {
		t.Fatalf("side traffic %+v", st)
	}
	if got := s.Stats().BadRequests; got != 3 {
		t.Fatalf("engine saw %d bad requests, want 3", got)
	}
	// a dead gateway is unexpected
	s.Stop()
	st = SideTraffic{BaseURL: s.URL(), Before: 1}.Start(context.Background(), 0).Wait()
	if st.Unexpected != 2 {
		t.Fatalf("dead gateway: %+v", st)
	}
}
