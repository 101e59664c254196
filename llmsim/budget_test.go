package llmsim

import (
	"context"
	"math"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// stepper drives a server's engine by hand, step by step, without its
// goroutine or a clock: what the scheduler decides, not how long it takes.
type stepper struct {
	t    *testing.T
	s    *Server
	seqs []*seq
}

func newStepper(t *testing.T, cfg Config) *stepper {
	return &stepper{t: t, s: New(cfg)}
}

func (st *stepper) submit(prompt, maxTokens int) *seq {
	q := &seq{prompt: prompt, maxTokens: maxTokens, tokens: make(chan struct{}, maxTokens)}
	st.seqs = append(st.seqs, q)
	st.s.eng.submit(q)
	return q
}

// step plans and applies one step, checking the invariants of the plan.
func (st *stepper) step() stepPlan {
	st.t.Helper()
	e, cfg := st.s.eng, st.s.Config()
	p := e.plan()
	scheduled := len(p.decode)
	for _, n := range p.prefill {
		scheduled += n
	}
	running, waiting, kv := e.counts()
	if e.budget {
		if scheduled > cfg.StepTokens {
			st.t.Fatalf("step of %d tokens over the budget of %d", scheduled, cfg.StepTokens)
		}
		if kv > cfg.KVTokens {
			st.t.Fatalf("%d KV tokens held, over the cache of %d", kv, cfg.KVTokens)
		}
		// preempted sequences wait in front of the ones never admitted
		e.mu.Lock()
		fresh := false
		for _, q := range e.waiting {
			if q.resumed && fresh {
				st.t.Fatal("a preempted sequence waits behind a new one")
			}
			fresh = fresh || !q.resumed
		}
		e.mu.Unlock()
	}
	if running > cfg.MaxRunning || running+waiting > len(st.seqs) {
		st.t.Fatalf("%d running, %d waiting of %d sequences, %d slots", running, waiting, len(st.seqs), cfg.MaxRunning)
	}
	e.apply(p)
	return p
}

// drain steps until every sequence has ended (at most max steps).
func (st *stepper) drain(max int) int {
	st.t.Helper()
	for i := 0; i < max; i++ {
		if r, w, _ := st.s.eng.counts(); r == 0 && w == 0 {
			return i
		}
		st.step()
	}
	st.t.Fatalf("sequences still in the engine after %d steps", max)
	return max
}

// received counts the tokens of an ended sequence.
func received(q *seq) int {
	n := 0
	for range q.tokens {
		n++
	}
	return n
}

func TestBudgetSharesTheStep(t *testing.T) {
	st := newStepper(t, Config{Scheduler: SchedulerBudget, StepTokens: 64, MaxRunning: 8})
	for range 6 {
		st.submit(100, 5)
	}
	mixed := false
	for i := 0; i < 200; i++ {
		if r, w, _ := st.s.eng.counts(); r == 0 && w == 0 {
			break
		}
		p := st.step()
		mixed = mixed || (len(p.decode) > 0 && len(p.prefill) > 0)
	}
	if !mixed {
		t.Error("no step both decoded and prefilled")
	}
	for i, q := range st.seqs {
		if n := received(q); n != 5 {
			t.Errorf("sequence %d got %d tokens, want 5", i, n)
		}
	}
	if p := st.s.Stats().Preemptions; p != 0 {
		t.Errorf("%d preemptions with room in the KV cache", p)
	}
}

// TestBudgetPreemptsByRecompute scripts one preemption: two sequences of 10
// prompt tokens and 25 output in a 40-token KV cache fill it after ten
// decode steps; the newer is preempted with 11 tokens generated, waits for
// room, prefills its 21 tokens again and generates the remaining 14.
func TestBudgetPreemptsByRecompute(t *testing.T) {
	st := newStepper(t, Config{Scheduler: SchedulerBudget, KVTokens: 40, MaxModelLen: 8192})
	if got := st.s.Config().MaxModelLen; got != 40 {
		t.Fatalf("MaxModelLen %d, want it capped to the KV cache's 40", got)
	}
	a, b := st.submit(10, 25), st.submit(10, 25)
	var refill int
	for i := 0; i < 100 && refill == 0; i++ {
		p := st.step()
		if b.resumed {
			refill = p.prefill[b]
		}
	}
	if refill != 21 {
		t.Fatalf("the preempted sequence prefilled %d tokens again, want 21 (10 prompt + 11 generated)", refill)
	}
	st.drain(100)
	if n := st.s.Stats().Preemptions; n != 1 {
		t.Errorf("%d preemptions, want 1", n)
	}
	if !b.resumed || a.resumed {
		t.Error("preempted the older sequence, want the newer")
	}
	for name, q := range map[string]*seq{"older": a, "newer": b} {
		if n := received(q); n != 25 {
			t.Errorf("%s sequence got %d tokens, want 25", name, n)
		}
	}
}

func TestBudgetTightKVCompletesEverything(t *testing.T) {
	st := newStepper(t, Config{Scheduler: SchedulerBudget, KVTokens: 256})
	for i := range 12 {
		st.submit(20+10*i%50, 40+7*i)
	}
	st.drain(5000)
	if st.s.Stats().Preemptions == 0 {
		t.Fatal("no preemption with 12 sequences of up to 177 tokens in a 256-token KV cache")
	}
	for i, q := range st.seqs {
		if n := received(q); n != q.maxTokens {
			t.Errorf("sequence %d got %d tokens, want %d", i, n, q.maxTokens)
		}
	}
}

// TestBudgetServer runs streams through a server with a tight KV cache:
// every stream gets exactly its tokens, the preemptions show in /metrics,
// and the gauges stay within the engine's bounds.
func TestBudgetServer(t *testing.T) {
	cfg := Config{Scheduler: SchedulerBudget, KVTokens: 512, MaxRunning: 8, Speed: 4}
	s := start(t, cfg)
	const n, tokens = 12, 120
	var wg sync.WaitGroup
	results := make([]Result, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", strings.Repeat("z", 400), tokens, true))
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	busy := false
	for polling := true; polling; {
		select {
		case <-done:
			polling = false
		case <-time.After(10 * time.Millisecond):
			m := scrape(t, s)
			if m["vllm:kv_cache_usage_perc"] > 1 || m["vllm:num_requests_running"] > 8 || m["vllm:num_requests_running"]+m["vllm:num_requests_waiting"] > n {
				t.Errorf("gauges out of bounds: %v", m)
			}
			busy = busy || (m["vllm:kv_cache_usage_perc"] > 0 && m["vllm:num_requests_running"] > 0)
		}
	}
	for i := range n {
		if errs[i] != nil || results[i].Status != 200 || results[i].Tokens != tokens || results[i].UsageTokens != tokens {
			t.Errorf("request %d: %v, %+v; want %d tokens", i, errs[i], results[i], tokens)
		}
	}
	if !busy {
		t.Error("no scrape saw the engine running with KV in use")
	}
	st := s.Stats()
	m := scrape(t, s)
	t.Logf("preemptions %d, metrics %v", st.Preemptions, m)
	if st.Preemptions == 0 || m["vllm:num_preemptions_total"] != float64(st.Preemptions) {
		t.Errorf("preemptions: stats %d, /metrics %v; want the same, above 0", st.Preemptions, m["vllm:num_preemptions_total"])
	}
	if m["vllm:kv_cache_usage_perc"] != 0 || m["vllm:num_requests_running"] != 0 || m["vllm:num_requests_waiting"] != 0 {
		t.Errorf("an idle engine reports %v", m)
	}
}

// metricFamilies scrapes the engine's /metrics and parses it.
func metricFamilies(t *testing.T, s *Server) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(s.URL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// scrape returns the engine's gauges and its preemption counter.
func scrape(t *testing.T, s *Server) map[string]float64 {
	t.Helper()
	fams := metricFamilies(t, s)
	out := map[string]float64{}
	for _, name := range []string{"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_preemptions_total"} {
		fam, ok := fams[name]
		if !ok {
			t.Fatalf("metric %s missing", name)
		}
		m := fam.GetMetric()[0]
		if m.GetGauge() != nil {
			out[name] = m.GetGauge().GetValue()
		} else {
			out[name] = m.GetCounter().GetValue()
		}
	}
	return out
}

// TestDefaultEngineUnchanged pins the default engine's schedule: prefill
// chunks of PrefillChunk in slot order, no KV limit (the KV figure is every
// running sequence's prompt and output), no preemption.
func TestDefaultEngineUnchanged(t *testing.T) {
	st := newStepper(t, Config{MaxRunning: 2})
	q1, q2, q3 := st.submit(3000, 3), st.submit(100, 3), st.submit(100, 3)
	type want struct {
		prefill  map[*seq]int
		decode   int
		duration time.Duration
		kv       int
	}
	ms := time.Millisecond
	steps := []want{
		{map[*seq]int{q1: 2048}, 0, 8*ms + 2048*40*time.Microsecond, 3100},
		{map[*seq]int{q1: 952, q2: 100}, 0, 8*ms + 1052*40*time.Microsecond, 3102},
		{map[*seq]int{}, 2, 9 * ms, 3104},
		{map[*seq]int{}, 2, 9 * ms, 0}, // q1, q2 end; q3 is admitted in the next plan
		{map[*seq]int{q3: 100}, 0, 8*ms + 100*40*time.Microsecond, 101},
	}
	for i, w := range steps {
		p := st.s.eng.plan()
		if len(p.prefill) != len(w.prefill) || len(p.decode) != w.decode || p.duration != w.duration {
			t.Fatalf("step %d: prefill %v, %d decoding, %v; want %v, %d, %v", i, p.prefill, len(p.decode), p.duration, w.prefill, w.decode, w.duration)
		}
		for q, n := range w.prefill {
			if p.prefill[q] != n {
				t.Fatalf("step %d: prefill %v, want %v", i, p.prefill, w.prefill)
			}
		}
		st.s.eng.apply(p)
		if _, _, kv := st.s.eng.counts(); kv != w.kv {
			t.Fatalf("step %d: KV %d, want %d", i, kv, w.kv)
		}
	}
	st.drain(10)
	for i, q := range st.seqs {
		if n := received(q); n != 3 {
			t.Errorf("sequence %d got %d tokens, want 3", i, n)
		}
	}
	if st.s.Stats().Preemptions != 0 {
		t.Error("the default engine preempted")
	}
}

func TestBudgetCapacity(t *testing.T) {
	def := Config{}.Capacity(200, 100)
	// the formula of the default engine: 16 slots, 8 ms + 16 × 0.5 ms a step
	// and the prefill of 16 × 200/100 prompt tokens at 40 µs
	want := 16 / ((0.008 + 0.008 + 40e-6*200*16/100) * 100)
	for _, tc := range []struct {
		name string
		cfg  Config
		want float64
	}{
		{"default", Config{}, want},
		{"budget with room", Config{Scheduler: SchedulerBudget}, want},
		// 2000 / (200 + 50) = 8 sequences
		{"budget, KV-bound", Config{Scheduler: SchedulerBudget, KVTokens: 2000}, 8 / ((0.008 + 0.004 + 40e-6*200*8/100) * 100)},
		// 30 / (1 + 2) = 10 sequences
		{"budget, step-bound", Config{Scheduler: SchedulerBudget, StepTokens: 30}, 10 / ((0.008 + 0.005 + 40e-6*200*10/100) * 100)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.cfg.Capacity(200, 100)
			if math.Abs(got-tc.want) > 1e-9*tc.want {
				t.Fatalf("capacity %.6f, want %.6f", got, tc.want)
			}
		})
	}
	if math.Abs(def-want) > 1e-9 {
		t.Fatalf("default capacity %.6f, want %.6f", def, want)
	}
}

func TestSchedulerValidated(t *testing.T) {
	if _, err := Start(Config{Scheduler: "fifo"}, "127.0.0.1:0"); err == nil {
		t.Fatal("an unknown scheduler was accepted")
	}
}

func TestBudgetPrefixCache(t *testing.T) {
	s := start(t, Config{Scheduler: SchedulerBudget, KVTokens: 4096})
	prompt := strings.Repeat("The quick brown fox jumps over the lazy dog. ", 100) // ~1125 tokens
	chat(t, s, prompt, 2)
	chat(t, s, prompt, 2)
	if st := s.Stats(); st.CachedTokens < 1000 || st.CachedTokens > st.PromptTokens/2 {
		t.Fatalf("cached %d of %d prompt tokens, want the second prompt's ~1100 of 2250", st.CachedTokens, st.PromptTokens)
	}
}
