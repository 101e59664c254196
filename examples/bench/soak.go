package main

import (
	"fmt"
	"io"
	"runtime"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/healthcheck"
)

// soakSample is the process's state at one time of a soak.
type soakSample struct {
	at          time.Duration
	heapMiB     float64 // live heap after a GC
	goroutines  int
	prefixIndex int // prompt blocks held by every backend's prefix index
	backends    int
	detail      string // per backend: requests since the last sample, in flight, pending, batch seen, slots
}

func sampleSoak(start time.Time, last map[string]uint64) soakSample {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	s := soakSample{at: time.Since(start).Round(time.Second), heapMiB: float64(m.HeapAlloc) / (1 << 20), goroutines: runtime.NumGoroutine()}
	now := time.Now()
	prior := aibalance.NewPool("soak").Prior()
	for _, p := range aibalance.AllPools() {
		if len(p.Members()) > 0 {
			prior = p.Prior()
		}
	}
	for _, b := range aibalance.AllBackends() {
		s.prefixIndex += b.PrefixBlocks()
		s.backends++
		st, ls := b.Stats(), b.State(now)
		hs := "-"
		if br := healthcheck.Of(b); br != nil {
			hs = fmt.Sprint(br.Status(now).State)
		}
		_, out := b.Load(now)
		ej, _, _ := b.Ejected(now)
		idle := b.Model().Predict(aibalance.LoadState{}, 2000, 100, prior, now)
		here := b.Model().Predict(ls, 2000, 100, prior, now)
		m := st.Model
		s.detail += fmt.Sprintf(" [%s +%d in %d pend %.0f run %.0f kv %.2f qw %.2fs slots %d | out %v ej %v br %s fr %.2f n %d rep %d/%d ch %d idle %.3f/%.1fms here %.3f/%.1fms | θ %.3g %.3g %.3g %.3g %.3g %.3g %.3g ; %.3g %.3g]", b.Addr(), st.Requests-last[b.Addr()], st.Inflight, ls.Pending, ls.Running, ls.KV, ls.QueueWait, b.Slots(now),
			out, ej, hs, st.FailureRate, m.Samples, m.Repairs, m.Diverged, m.Changes, idle.TTFT.Seconds(), idle.TPOT.Seconds()*1000, here.TTFT.Seconds(), here.TPOT.Seconds()*1000,
			m.TTFTBase, m.TTFTPerPending, m.TTFTPerPendingKTokens, m.TTFTPerKPrompt, m.TTFTPerKVUsage, m.TTFTPerRunning, m.TTFTPerBeyond, m.TPOTBase, m.TPOTPerRunning)
		last[b.Addr()] = st.Requests
	}
	return s
}

// runSoak runs one long measured run of policy (default ai_predictive) on cell c (warm-up,
// then measured for o.measured), sampling the heap, goroutines and the
// prefix indexes every `every`, and prints the curve and whether it grew:
// the mean of the last third of the samples against the first third.
func runSoak(o matrixOptions, c cell, policy string, every time.Duration, out io.Writer) error {
	policies, err := matrixPolicies(policy)
	if err != nil {
		return err
	}
	p := policies[0]
	if policy != "" {
		p = policies[len(policies)-1]
		for _, q := range policies {
			if q.name == policy {
				p = q
			}
		}
	}
	start := time.Now()
	var samples []soakSample
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		last := map[string]uint64{}
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				s := sampleSoak(start, last)
				samples = append(samples, s)
				if o.progress != nil {
					fmt.Fprintf(o.progress, "bench: soak %v: heap %.1f MiB, %d goroutines, prefix index %d blocks over %d backends;%s\n", s.at, s.heapMiB, s.goroutines, s.prefixIndex, s.backends, s.detail)
				}
			}
		}
	}()
	c.compare = nil
	r, err := runOnce(o, c, p, 1)
	close(stop)
	<-done
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "# Soak: %s, %s, %v measured after %v warm-up, engine speeds ×%g\n\n", c.name, p.name, o.measured, o.warmup, o.timeScale)
	fmt.Fprintf(out, "%d requests, %d errors; TTFT p50 %s p99 %s, E2E p50 %s p99 %s\n\n", r.requests, r.errors, ms(r.ttftP50), ms(r.ttftP99), ms(r.e2eP50), ms(r.e2eP99))
	fmt.Fprintln(out, "| time | heap (MiB, after GC) | goroutines | prefix index (blocks) |")
	fmt.Fprintln(out, "|---|---|---|---|")
	for _, s := range samples {
		fmt.Fprintf(out, "| %v | %.1f | %d | %d |\n", s.at, s.heapMiB, s.goroutines, s.prefixIndex)
	}
	if n := len(samples); n >= 6 {
		third := n / 3
		mean := func(ss []soakSample, f func(soakSample) float64) float64 {
			t := 0.0
			for _, s := range ss {
				t += f(s)
			}
			return t / float64(len(ss))
		}
		// the first third starts after the warm-up's growth: skip sample 0
		first, last := samples[1:1+third], samples[n-third:]
		for _, m := range []struct {
			name string
			f    func(soakSample) float64
		}{
			{"heap", func(s soakSample) float64 { return s.heapMiB }},
			{"goroutines", func(s soakSample) float64 { return float64(s.goroutines) }},
			{"prefix index", func(s soakSample) float64 { return float64(s.prefixIndex) }},
		} {
			a, b := mean(first, m.f), mean(last, m.f)
			fmt.Fprintf(out, "\n%s: first third %.1f, last third %.1f (×%.2f)", m.name, a, b, b/max(a, 1e-9))
		}
		fmt.Fprintln(out)
	}
	return nil
}
