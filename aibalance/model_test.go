package aibalance

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// synthetic is a backend whose true latency is linear in its load.
func synthetic(s LoadState, prompt, out int, speed float64) (ttft, e2e time.Duration) {
	t := (0.02 + 0.01*s.Pending + 0.03*s.PendingTokens/1000 + 0.05*float64(prompt)/1000) / speed
	tpot := (0.008 + 0.0005*s.Running) / speed
	return secondsToDuration(t), secondsToDuration(t + float64(out-1)*tpot)
}

func TestModelConvergesAndTracksError(t *testing.T) {
	var m Model
	var p Prior
	r := rand.New(rand.NewPCG(1, 2))
	now := time.Unix(1000, 0)
	var lastAPE float64
	for i := 0; i < 600; i++ {
		pending := float64(r.IntN(8))
		run := float64(r.IntN(16))
		s := LoadState{Inflight: pending + run, Running: run, Pending: pending, PendingTokens: pending * float64(r.IntN(3000))}
		prompt, out := 50+r.IntN(3000), 10+r.IntN(300)
		pred := m.Predict(s, prompt, out, &p, now)
		ttft, e2e := synthetic(s, prompt, out, 0.5)
		// 2% of observations are wild outliers (a GC pause, a retry storm)
		if r.IntN(50) == 0 {
			e2e *= 20
		}
		m.Observe(Observation{State: s, Stream: true, PromptTokens: prompt, OutputTokens: out, TTFT: ttft, E2E: e2e, Predicted: pred.E2E}, 1-1.0/256, &p, now)
		now = now.Add(10 * time.Millisecond)
		if i == 20 {
			lastAPE = m.Stats().MAPE
		}
	}
	st := m.Stats()
	t.Logf("after 600: MAPE %.3f (after 20: %.3f), TPOT per running %.5f (true 0.001), TTFT per 1k prompt %.4f (true 0.1)",
		st.MAPE, lastAPE, st.TPOTPerRunning, st.TTFTPerKPrompt)
	for _, tc := range []struct {
		s      LoadState
		p, out int
	}{{LoadState{Inflight: 0}, 100, 50}, {LoadState{Inflight: 15, Running: 10, Pending: 5, PendingTokens: 9000}, 2500, 300}} {
		_, want := synthetic(tc.s, tc.p, tc.out, 0.5)
		got := m.Predict(tc.s, tc.p, tc.out, &p, now).E2E
		if e := math.Abs(got.Seconds()-want.Seconds()) / want.Seconds(); e > 0.1 {
			t.Errorf("state %+v: predicted %v, true %v (%.0f%% off)", tc.s, got, want, 100*e)
		}
	}
	if st.MAPE > 0.25 || st.MAPEWindow != errWindow {
		t.Errorf("MAPE %.3f over %d predictions: want under 0.25 over %d (outliers included)", st.MAPE, st.MAPEWindow, errWindow)
	}
}

func TestModelColdStartAndStaleness(t *testing.T) {
	var m Model
	var p Prior
	now := time.Unix(1000, 0)
	idle := m.Predict(LoadState{}, 100, 100, &p, now).E2E.Seconds()
	busy := m.Predict(LoadState{Inflight: 10}, 100, 100, &p, now).E2E.Seconds()
	if idle <= 0 || busy < 5*idle {
		t.Fatalf("cold model: idle %.3fs, 10 in flight %.3fs; want a prior that grows with load", idle, busy)
	}
	// teach it that the backend is very slow, then leave it unobserved
	for i := 0; i < 50; i++ {
		m.Observe(Observation{Stream: true, OutputTokens: 100, TTFT: 5 * time.Second, E2E: 50 * time.Second}, 0.99, &p, now)
	}
	// meanwhile the rest of the pool is fast: the prior learns that
	var fast Model
	for i := 0; i < 300; i++ {
		fast.Observe(Observation{Stream: true, OutputTokens: 100, TTFT: 50 * time.Millisecond, E2E: time.Second}, 0.99, &p, now)
	}
	slow := m.Predict(LoadState{}, 100, 100, &p, now).E2E.Seconds()
	minute := m.Predict(LoadState{}, 100, 100, &p, now.Add(time.Minute)).E2E.Seconds()
	if !(minute < slow*0.6) || !(minute > slow*0.4) {
		t.Fatalf("a backend unobserved for a minute predicted %.1fs (was %.1fs): want it halfway back to the fast pool's prior", minute, slow)
	}
	later := m.Predict(LoadState{}, 100, 100, &p, now.Add(10*time.Minute)).E2E.Seconds()
	if !(later < slow*0.15) {
		t.Fatalf("a backend unobserved for 10 minutes predicted %.1fs (was %.1fs): want it nine tenths of the way back to the prior", later, slow)
	}
}

func BenchmarkPredict(b *testing.B) {
	var m Model
	var p Prior
	now := time.Now()
	for i := 0; i < 50; i++ {
		m.Observe(Observation{State: LoadState{Inflight: float64(i % 7)}, Stream: true, PromptTokens: 500, OutputTokens: 100, TTFT: 50 * time.Millisecond, E2E: time.Second}, 0.99, &p, now)
	}
	b.ReportAllocs()
	for b.Loop() {
		_, _ = m.PredictSeconds(LoadState{Inflight: 3, InflightTokens: 4000}, 500, &p, now)
	}
}

// TestModelFollowsASpeedChange: a backend that turns 3× slower is
// re-learned within a few dozen observations, not over its whole memory.
func TestModelFollowsASpeedChange(t *testing.T) {
	var m Model
	var p Prior
	r := rand.New(rand.NewPCG(3, 4))
	now := time.Unix(1000, 0)
	obs := func(speed float64) {
		pending := float64(r.IntN(4))
		run := float64(r.IntN(12))
		s := LoadState{Inflight: pending + run, Running: run, Pending: pending, PendingTokens: pending * 500}
		prompt, out := 100+r.IntN(400), 20+r.IntN(200)
		ttft, e2e := synthetic(s, prompt, out, speed)
		m.Observe(Observation{State: s, Stream: true, PromptTokens: prompt, OutputTokens: out, TTFT: ttft, E2E: e2e}, 1-1.0/256, &p, now)
		now = now.Add(10 * time.Millisecond)
	}
	for i := 0; i < 400; i++ {
		obs(1)
	}
	for i := 0; i < 40; i++ {
		obs(1.0 / 3)
	}
	s := LoadState{Inflight: 6, Running: 5, Pending: 1, PendingTokens: 300}
	_, want := synthetic(s, 300, 100, 1.0/3)
	got := m.Predict(s, 300, 100, &p, now).E2E
	t.Logf("40 observations after a 3× slowdown: predicted %v, true %v; %d changes detected", got, want, m.Stats().Changes)
	if e := math.Abs(got.Seconds()-want.Seconds()) / want.Seconds(); e > 0.25 {
		t.Fatalf("predicted %v, true %v (%.0f%% off) 40 observations after the change", got, want, 100*e)
	}
}

// TestPriorLearnsFromWholeAnswers: a pool that only sees non-streaming
// answers moves both parts of its prior, the per-token time included.
func TestPriorLearnsFromWholeAnswers(t *testing.T) {
	var prior Prior
	var m Model
	_, tpot0 := prior.values()
	now := time.Unix(0, 0)
	for i := 0; i < 400; i++ {
		// 200 output tokens at 5 ms each, 50 ms to the first: 1.05 s
		m.Observe(Observation{PromptTokens: 500, OutputTokens: 201, E2E: 1050 * time.Millisecond}, 0.99, &prior, now)
	}
	_, tpot := prior.values()
	if tpot >= tpot0/2 {
		t.Fatalf("prior TPOT %v after 400 whole answers at 5 ms a token; it started at %v", tpot, tpot0)
	}
}

// TestModelStaysSaneOverLongRuns: 200000 observations of an engine whose
// first-token time has a knee at its batch limit (no linear term fits it),
// with 5% noise and outliers, streams and whole answers mixed, through
// alternating minutes of a full batch — pending, running, KV and the batch
// limit moving together — and of light load: the regime of a long soak,
// where rounding in the covariance update had let it lose its symmetry and
// the fit ran off (a fast engine predicted at hours, then starved). The
// fit must stay finite, its covariance symmetric, and its predictions of
// each phase's states within a factor of two.
func TestModelStaysSaneOverLongRuns(t *testing.T) {
	var m Model
	var p Prior
	r := rand.New(rand.NewPCG(7, 9))
	now := time.Unix(1000, 0)
	state := func(busy bool) (LoadState, int, int) {
		load := float64(r.IntN(4))
		if busy {
			load = 10 + float64(r.IntN(14))
		}
		run := min(load, 16)
		pending := max(load-16, 0) + float64(r.IntN(2))
		s := LoadState{Inflight: load, Running: run, Pending: pending, PendingTokens: pending * float64(500+r.IntN(3000)), KV: min(run/16+0.05*r.Float64(), 1), Beyond: max(load+1-16, 0)}
		return s, 200 + r.IntN(6000), 20 + r.IntN(300)
	}
	truth := func(s LoadState, prompt, out int) (time.Duration, time.Duration) {
		ttft, e2e := synthetic(s, prompt, out, 5)
		knee := time.Duration(s.Beyond * s.Beyond * float64(8*time.Millisecond))
		noise := 1 + 0.05*r.NormFloat64()
		if r.IntN(100) == 0 {
			noise *= 10
		}
		return time.Duration(float64(ttft+knee) * noise), time.Duration(float64(e2e+knee) * noise)
	}
	for phase := 0; phase < 20; phase++ {
		busy := phase%2 == 0
		for i := 0; i < 10000; i++ {
			s, prompt, out := state(busy)
			ttft, e2e := truth(s, prompt, out)
			m.Observe(Observation{State: s, Stream: r.IntN(4) > 0, PromptTokens: prompt, OutputTokens: out, TTFT: ttft, E2E: e2e}, 1-1.0/512, &p, now)
			now = now.Add(20 * time.Millisecond)
		}
		worst := 0.0
		for i := 0; i < 200; i++ {
			s, prompt, out := state(busy)
			ttft, e2e := synthetic(s, prompt, out, 5)
			want := e2e + time.Duration(s.Beyond*s.Beyond*float64(8*time.Millisecond))
			_ = ttft
			got := m.Predict(s, prompt, out, &p, now).E2E
			worst = max(worst, math.Abs(math.Log(got.Seconds()/want.Seconds())))
		}
		st := m.Stats()
		if testing.Verbose() || worst > math.Ln2 {
			t.Logf("phase %d (busy %v): worst error ×%.2f, repairs %d, diverged %d, θ ttft %.4g %.4g %.4g %.4g %.4g %.4g %.4g tpot %.4g %.4g",
				phase, busy, math.Exp(worst), st.Repairs, st.Diverged, st.TTFTBase, st.TTFTPerPending, st.TTFTPerPendingKTokens, st.TTFTPerKPrompt, st.TTFTPerKVUsage, st.TTFTPerRunning, st.TTFTPerBeyond, st.TPOTBase, st.TPOTPerRunning)
		}
		m.mu.Lock()
		for i := range modelDims {
			for j := range modelDims {
				if m.r.p[i][j] != m.r.p[j][i] {
					t.Fatalf("phase %d: covariance not symmetric at %d,%d: %g vs %g", phase, i, j, m.r.p[i][j], m.r.p[j][i])
				}
			}
		}
		m.mu.Unlock()
		if worst > math.Ln2 || math.IsNaN(worst) {
			t.Fatalf("phase %d: a prediction off by ×%.1f", phase, math.Exp(worst))
		}
	}
}

// TestModelIsMonotoneInLoad: an engine whose first-token time does not
// depend on its running batch at all, only on a knee past its batch limit,
// observed with noise: an unconstrained fit gives the batch a negative
// weight about half the time (and pending requests one when the knee takes
// their share), so a busier backend is predicted faster. No learned load
// coefficient may be negative, and more load never predicts less time.
func TestModelIsMonotoneInLoad(t *testing.T) {
	for seed := uint64(1); seed <= 8; seed++ {
		var m Model
		var p Prior
		r := rand.New(rand.NewPCG(seed, 17))
		now := time.Unix(1000, 0)
		for i := 0; i < 3000; i++ {
			load := float64(r.IntN(24))
			run := min(load, 12)
			pending := max(load-12, 0)
			s := LoadState{Inflight: load, Running: run, Pending: pending, PendingTokens: pending * 800, KV: run / 12, Beyond: max(load+1-12, 0)}
			prompt, out := 200+r.IntN(2000), 20+r.IntN(200)
			ttft := 0.03 + 0.02*float64(prompt)/1000 + 0.004*s.Beyond*s.Beyond
			ttft *= 1 + 0.1*r.NormFloat64()
			tpot := 0.01 * (1 + 0.1*r.NormFloat64())
			e2e := ttft + float64(out-1)*tpot
			m.Observe(Observation{State: s, Stream: true, PromptTokens: prompt, OutputTokens: out, TTFT: secondsToDuration(ttft), E2E: secondsToDuration(e2e)}, 1-1.0/256, &p, now)
			now = now.Add(10 * time.Millisecond)
		}
		st := m.Stats()
		for name, v := range map[string]float64{"pending": st.TTFTPerPending, "pending tokens": st.TTFTPerPendingKTokens, "prompt": st.TTFTPerKPrompt,
			"kv": st.TTFTPerKVUsage, "running": st.TTFTPerRunning, "beyond": st.TTFTPerBeyond, "tpot running": st.TPOTPerRunning} {
			if v < 0 {
				t.Errorf("seed %d: learned %s coefficient %g < 0", seed, name, v)
			}
		}
		prev := time.Duration(0)
		for load := 0.0; load < 30; load++ {
			run := min(load, 12)
			pending := max(load-12, 0)
			s := LoadState{Inflight: load, Running: run, Pending: pending, PendingTokens: pending * 800, KV: run / 12, Beyond: max(load+1-12, 0)}
			got := m.Predict(s, 1000, 100, &p, now).E2E
			if got < prev {
				t.Fatalf("seed %d: load %v predicted %v, less than %v at one request fewer", seed, load, got, prev)
			}
			prev = got
		}
	}
}

// TestModelFollowsSlowdownAndRecovery: a backend that turns 5× slower and
// back is re-learned each way from the few observations a balancer sees in
// five seconds of light traffic to it (a dozen or two).
func TestModelFollowsSlowdownAndRecovery(t *testing.T) {
	var m Model
	var p Prior
	r := rand.New(rand.NewPCG(5, 6))
	now := time.Unix(1000, 0)
	obs := func(speed float64, n int) {
		for i := 0; i < n; i++ {
			pending := float64(r.IntN(3))
			run := float64(r.IntN(8))
			s := LoadState{Inflight: pending + run, Running: run, Pending: pending, PendingTokens: pending * 500}
			prompt, out := 100+r.IntN(400), 20+r.IntN(200)
			ttft, e2e := synthetic(s, prompt, out, speed)
			m.Observe(Observation{State: s, Stream: true, PromptTokens: prompt, OutputTokens: out, TTFT: ttft, E2E: e2e}, 1-1.0/256, &p, now)
			now = now.Add(250 * time.Millisecond)
		}
	}
	check := func(when string, speed float64) {
		s := LoadState{Inflight: 4, Running: 3, Pending: 1, PendingTokens: 300}
		_, want := synthetic(s, 300, 100, speed)
		got := m.Predict(s, 300, 100, &p, now).E2E
		t.Logf("%s: predicted %v, true %v", when, got, want)
		if e := math.Abs(math.Log(got.Seconds() / want.Seconds())); e > math.Log(1.3) {
			t.Errorf("%s: predicted %v, true %v", when, got, want)
		}
	}
	obs(1, 400)
	check("before", 1)
	obs(0.2, 20)
	check("20 observations after a 5× slowdown", 0.2)
	obs(0.2, 400)
	obs(1, 20)
	check("20 observations after recovering from a long slowdown", 1)
}
