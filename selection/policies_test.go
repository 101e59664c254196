package selection

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/healthcheck"
)

func testPool(t testing.TB, n int) reverseproxy.UpstreamPool {
	pool := make(reverseproxy.UpstreamPool, n)
	for i := range pool {
		pool[i] = &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: fmt.Sprintf("%s-%d:80", t.Name(), i)}
	}
	return pool
}

func newPredictive(k int, all bool, weights ...int) *AIPredictiveSelection {
	return &AIPredictiveSelection{Choose: k, ChooseAll: all, Weights: weights, learner: learner{app: aibalance.NewApp(), pool: testPoolObj(weights)}, clock: time.Now}
}

// testPoolObj is a pool whose weights are given in the order of testPool's
// upstreams; the addresses are filled in by withWeights.
func testPoolObj(weights []int) *aibalance.Pool {
	p := aibalance.NewPool("test")
	pendingWeights[p] = weights
	return p
}

var pendingWeights = map[*aibalance.Pool][]int{}

// bindWeights gives a test policy's pool its weights by address.
func bindWeights(p *aibalance.Pool, pool reverseproxy.UpstreamPool) {
	w, ok := pendingWeights[p]
	if !ok {
		return
	}
	m := map[string]float64{}
	for i, u := range pool {
		if i < len(w) {
			m[u.Dial] = float64(w[i])
		}
	}
	p.SetWeights(m)
}

func newLeastTokens(weights ...int) *LeastTokensSelection {
	return &LeastTokensSelection{Weights: weights, learner: learner{app: aibalance.NewApp(), pool: testPoolObj(weights)}}
}

func chatRequest() *http.Request {
	return httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
		strings.NewReader(`{"messages":[{"role":"user","content":"hello"}],"max_tokens":100}`))
}

// loadUp selects n times, leaving each choice in flight, and counts choices.
func loadUp(t *testing.T, sel reverseproxy.Selector, set *aibalance.BackendSet, pool reverseproxy.UpstreamPool, n int) map[string]int {
	t.Helper()
	app := aibalance.NewApp()
	var prior aibalance.Prior
	switch p := sel.(type) {
	case *AIPredictiveSelection:
		bindWeights(p.pool, pool)
	case *LeastTokensSelection:
		bindWeights(p.pool, pool)
	}
	counts := map[string]int{}
	for i := 0; i < n; i++ {
		r := chatRequest()
		u := sel.Select(pool, r, nil)
		if u == nil {
			t.Fatal("nil selection from a healthy pool")
		}
		counts[u.Dial]++
		b := set.Get(u.Dial)
		b.Begin(app.Features(r), &prior, time.Now())
	}
	return counts
}

func TestWeightsRespectedInDistribution(t *testing.T) {
	for _, tc := range []struct {
		name string
		sel  func() (reverseproxy.Selector, *aibalance.BackendSet)
	}{
		{"ai_predictive", func() (reverseproxy.Selector, *aibalance.BackendSet) {
			p := newPredictive(2, false, 3, 1, 0)
			return p, &p.set
		}},
		{"ai_predictive choose all", func() (reverseproxy.Selector, *aibalance.BackendSet) {
			p := newPredictive(2, true, 3, 1, 0)
			return p, &p.set
		}},
		{"least_tokens", func() (reverseproxy.Selector, *aibalance.BackendSet) {
			p := newLeastTokens(3, 1, 0)
			return p, &p.set
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sel, set := tc.sel()
			defer set.Release()
			pool := testPool(t, 3)
			c := loadUp(t, sel, set, pool, 400)
			a, b, z := c[pool[0].Dial], c[pool[1].Dial], c[pool[2].Dial]
			t.Logf("weights 3:1:0 got %d:%d:%d", a, b, z)
			if z != 0 {
				t.Fatalf("weight 0 upstream chosen %d times", z)
			}
			if ratio := float64(a) / float64(b); ratio < 2.4 || ratio > 3.6 {
				t.Fatalf("weights 3:1 gave %d:%d (ratio %.2f)", a, b, ratio)
			}
		})
	}
}

func TestWeightedLeastConn(t *testing.T) {
	pool := testPool(t, 3)
	p := &WeightedLeastConnSelection{Weights: []int{1, 5, 2}}
	for i := 0; i < 20; i++ {
		if u := p.Select(pool, chatRequest(), nil); u != pool[1] {
			t.Fatalf("idle pool: got %v, want the heaviest upstream", u)
		}
	}
	p = &WeightedLeastConnSelection{Weights: []int{2, 2, 0}}
	seen := map[*reverseproxy.Upstream]int{}
	for i := 0; i < 200; i++ {
		seen[p.Select(pool, chatRequest(), nil)]++
	}
	if seen[pool[2]] != 0 || seen[pool[0]] < 50 || seen[pool[1]] < 50 {
		t.Fatalf("ties not broken at random or weight 0 chosen: %v", seen)
	}
}

func TestEmptyAndIneligiblePools(t *testing.T) {
	pool := testPool(t, 4)
	for _, sel := range []reverseproxy.Selector{
		newPredictive(2, false), newPredictive(2, true), newLeastTokens(), &WeightedLeastConnSelection{},
	} {
		if u := sel.Select(nil, chatRequest(), nil); u != nil {
			t.Fatalf("%T: empty pool gave %v", sel, u)
		}
	}
	// every upstream but one excluded: power-of-k must still find it, never another
	p := newPredictive(2, false, 0, 0, 1, 0)
	defer p.set.Release()
	bindWeights(p.pool, pool)
	for i := 0; i < 100; i++ {
		if u := p.Select(pool, chatRequest(), nil); u != pool[2] {
			t.Fatalf("got %v, want the only eligible upstream", u)
		}
	}
}

func TestPredictivePrefersFasterBackend(t *testing.T) {
	p := newPredictive(2, false)
	defer p.set.Release()
	pool := testPool(t, 2)
	app := p.app
	now := time.Now()
	// teach the model: upstream 1 is 3x slower than upstream 0
	for i := 0; i < 40; i++ {
		for j, slow := range []float64{1, 3} {
			b := p.set.Get(pool[j].Dial)
			f := &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 200, OutputTokens: 100}
			a := b.Begin(f, p.pool.Prior(), now)
			a.FirstToken(time.Now())
			a.End(aibalance.Outcome{Status: 200, Stream: true, TTFT: time.Duration(slow * float64(50*time.Millisecond)), E2E: time.Duration(slow * float64(time.Second)), OutputTokens: 100}, app.Lambda(), p.pool.Prior(), now)
		}
	}
	c := loadUp(t, p, &p.set, pool, 40)
	t.Logf("fast %d, slow %d", c[pool[0].Dial], c[pool[1].Dial])
	if c[pool[0].Dial] < 2*c[pool[1].Dial] {
		t.Fatalf("fast backend got %d, slow %d: want the fast one to take most", c[pool[0].Dial], c[pool[1].Dial])
	}
}

func TestPolicyCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		mod         caddyfile.Unmarshaler
		want        string // %+v of the module, or the error text
	}{
		{"predictive bare", `ai_predictive`, new(AIPredictiveSelection), "choose=0 all=false weights=[]"},
		{"predictive block", "ai_predictive {\n choose 3\n weights 3 2 1\n}", new(AIPredictiveSelection), "choose=3 all=false weights=[3 2 1]"},
		{"predictive all", "ai_predictive {\n choose all\n}", new(AIPredictiveSelection), "choose=0 all=true weights=[]"},
		{"predictive bad choose", "ai_predictive {\n choose 0\n}", new(AIPredictiveSelection), "choose: want a number from 1 to 16 or 'all', got \"0\""},
		{"predictive dup", "ai_predictive {\n choose 2\n choose 3\n}", new(AIPredictiveSelection), "choose already specified"},
		{"predictive unknown", "ai_predictive {\n bogus 1\n}", new(AIPredictiveSelection), `unrecognized ai_predictive subdirective "bogus"`},
		{"predictive args", `ai_predictive 3`, new(AIPredictiveSelection), "wrong argument count"},
		{"predictive ttft_weight", "ai_predictive {\n ttft_weight 2.5\n}", new(AIPredictiveSelection), "ttft=2.5"},
		{"predictive ttft_weight bad", "ai_predictive {\n ttft_weight -1\n}", new(AIPredictiveSelection), "ttft_weight: want a number from 0 to 1000"},
		{"predictive empty weights", "ai_predictive {\n weights\n}", new(AIPredictiveSelection), "wrong argument count"},
		{"predictive bad weight", "ai_predictive {\n weights 1 x\n}", new(AIPredictiveSelection), `invalid weight "x"`},
		{"least_tokens", `least_tokens 2 1`, new(LeastTokensSelection), "weights=[2 1]"},
		{"least_tokens negative", `least_tokens -1`, new(LeastTokensSelection), `invalid weight "-1"`},
		{"least_tokens all zero", `least_tokens 0 0`, new(LeastTokensSelection), "weights are all 0"},
		{"wlc", `weighted_least_conn 3 2 1`, new(WeightedLeastConnSelection), "weights=[3 2 1]"},
		{"wlc no weights", `weighted_least_conn`, new(WeightedLeastConnSelection), "wrong argument count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.mod.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			var got string
			switch m := tc.mod.(type) {
			case *AIPredictiveSelection:
				got = fmt.Sprintf("choose=%d all=%v weights=%v", m.Choose, m.ChooseAll, m.Weights)
				if m.TTFTWeight != nil {
					got += fmt.Sprintf(" ttft=%g", *m.TTFTWeight)
				}
			case *LeastTokensSelection:
				got = fmt.Sprintf("weights=%v", m.Weights)
			case *WeightedLeastConnSelection:
				got = fmt.Sprintf("weights=%v", m.Weights)
			}
			if err != nil {
				got = err.Error()
			}
			if !strings.Contains(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}

// TestStreamsWeighFirstToken: one backend decodes fast but its first token
// comes late (a queue); the other starts at once but decodes slowly. A
// streaming request goes to the quick starter, a non-streaming one (scored by
// completion time alone) to the fast decoder.
func TestStreamsWeighFirstToken(t *testing.T) {
	p := newPredictive(2, true)
	p.ttftWeight = DefaultTTFTWeight
	defer p.set.Release()
	pool := testPool(t, 2)
	now := time.Now()
	teachSlowFirstTokenFastDecode(p, pool, now)
	req := func(stream bool) *http.Request {
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
			strings.NewReader(fmt.Sprintf(`{"messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":%v}`, stream)))
		return r.WithContext(withVars(r))
	}
	if u := p.Select(pool, req(true), nil); u != pool[1] {
		t.Fatalf("streaming request went to %s, want the backend with the quick first token", u.Dial)
	}
	if u := p.Select(pool, req(false), nil); u != pool[0] {
		t.Fatalf("non-streaming request went to %s, want the backend that finishes first", u.Dial)
	}
}

func TestValidate(t *testing.T) {
	if err := (&WeightedLeastConnSelection{Weights: []int{0, 0}}).Validate(); err == nil {
		t.Fatal("all-zero weights accepted")
	}
	if err := (&AIPredictiveSelection{Choose: 17}).Validate(); err == nil {
		t.Fatal("choose 17 accepted")
	}
}

// BenchmarkSelect compares the policies' Select with Caddy's least_conn and
// round_robin on pools of 4, 16 and 64 upstreams, in one run.
func BenchmarkSelect(b *testing.B) {
	for _, n := range []int{4, 16, 64} {
		pool := testPool(b, n)
		pred := newPredictive(maxChoose, false) // the default choose
		pred2 := newPredictive(2, false)
		predAll := newPredictive(2, true)
		lt := newLeastTokens()
		wlc := &WeightedLeastConnSelection{}
		// as under ai_proxy (request_buffers 16MiB): Caddy replays the
		// body, so the retry guard leaves it alone
		buffered := bodyGuard{requestBuffers: 16 << 20}
		pred.body, pred2.body, predAll.body, lt.body, wlc.body = buffered, buffered, buffered, buffered, buffered
		for _, s := range []struct {
			name string
			sel  reverseproxy.Selector
		}{
			{"least_conn", new(reverseproxy.LeastConnSelection)},
			{"round_robin", new(reverseproxy.RoundRobinSelection)},
			{"ai_predictive", pred},
			{"ai_predictive_choose2", pred2},
			{"ai_predictive_all", predAll},
			{"least_tokens", lt},
			{"weighted_least_conn", wlc},
		} {
			b.Run(fmt.Sprintf("%s/%d", s.name, n), func(b *testing.B) {
				r := chatRequest()
				r = r.WithContext(withVars(r))
				s.sel.Select(pool, r, nil) // features read and cached once per request
				b.ReportAllocs()
				tried := aibalance.RequestTried(r)
				for b.Loop() {
					if s.sel.Select(pool, r, nil) == nil {
						b.Fatal("nil")
					}
					tried.Reset() // each Select is the first attempt of a request
				}
			})
		}
		pred.set.Release()
		pred2.set.Release()
		predAll.set.Release()
		lt.set.Release()
	}
}

func varsRequest() *http.Request {
	r := chatRequest()
	return r.WithContext(withVars(r))
}

// TestRetryAvoidsTriedBackends: a second Select for the same request (a
// retry) never returns a backend this request was sent to while another is
// eligible, and still returns one when none is.
func TestRetryAvoidsTriedBackends(t *testing.T) {
	pool := testPool(t, 3)
	for _, sel := range []reverseproxy.Selector{newPredictive(2, false), newPredictive(2, true), newLeastTokens(), &WeightedLeastConnSelection{Weights: []int{1, 1, 1}}} {
		for i := 0; i < 50; i++ {
			r := varsRequest()
			seen := map[string]bool{}
			for attempt := 0; attempt < 3; attempt++ {
				u := sel.Select(pool, r, nil)
				if seen[u.Dial] {
					t.Fatalf("%T: attempt %d went back to %s, tried already", sel, attempt, u.Dial)
				}
				seen[u.Dial] = true
			}
			if u := sel.Select(pool, r, nil); u == nil {
				t.Fatalf("%T: a fourth attempt found nothing; want a tried one rather than none", sel)
			}
		}
	}
}

// TestFailingBackendNotPreferred: a backend that answers every request at
// once with a 429 (a cooldown) or a 500 (its breaker opens) has nothing in
// flight, yet gets next to nothing;
// one in a Retry-After cooldown gets nothing while others are eligible.
func TestFailingBackendNotPreferred(t *testing.T) {
	for _, status := range []int{429, 500} {
		p := newPredictive(2, true)
		pool := testPool(t, 3)
		now := time.Now()
		bad := p.set.Get(pool[0].Dial)
		f := &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 100, OutputTokens: 100}
		for i := 0; i < aibalance.DefaultHealth.ConsecutiveFailures; i++ {
			a := bad.Begin(f, p.pool.Prior(), now)
			o := aibalance.Outcome{Status: status}
			if status == 429 { // the transport's default cooldown
				o.RetryAfter = time.Duration(p.pool.Health().Cooldown)
			}
			a.End(o, p.app.Lambda(), p.pool.Prior(), now)
			healthcheck.For(bad).Record(o, false, now, p.pool.Health(), nil)
		}
		c := loadUp(t, p, &p.set, pool, 60)
		t.Logf("status %d: failing %d, others %d/%d", status, c[pool[0].Dial], c[pool[1].Dial], c[pool[2].Dial])
		if c[pool[0].Dial] > 6 {
			t.Fatalf("status %d: the failing backend got %d of 60 requests", status, c[pool[0].Dial])
		}
		p.set.Release()
	}

	p := newPredictive(2, false)
	defer p.set.Release()
	pool := testPool(t, 3)
	now := time.Now()
	b := p.set.Get(pool[1].Dial)
	a := b.Begin(&aibalance.Features{}, p.pool.Prior(), now)
	a.End(aibalance.Outcome{Status: 429, RetryAfter: time.Minute}, p.app.Lambda(), p.pool.Prior(), now)
	for i := 0; i < 100; i++ {
		if u := p.Select(pool, varsRequest(), nil); u == pool[1] {
			t.Fatal("a backend in its Retry-After cooldown was chosen")
		}
	}
}

// TestTiesBrokenAtRandom: among equal scores the previous winner has no
// edge: every idle, unknown backend of a pool gets a fair share.
func TestTiesBrokenAtRandom(t *testing.T) {
	p := newPredictive(2, false)
	defer p.set.Release()
	pool := testPool(t, 4)
	seen := map[string]int{}
	for i := 0; i < 400; i++ {
		seen[p.Select(pool, varsRequest(), nil).Dial]++
	}
	for _, u := range pool {
		if seen[u.Dial] < 50 {
			t.Fatalf("ties not broken at random: %v", seen)
		}
	}
}

// TestUnobservedIsUncertain: a backend seen only idle is explored under
// load rather than locked out: the optimistic score of a state the model
// has not observed is below its point prediction.
func TestUnobservedIsUncertain(t *testing.T) {
	var m aibalance.Model
	var prior aibalance.Prior
	now := time.Now()
	for i := 0; i < 100; i++ {
		m.Observe(aibalance.Observation{Stream: true, PromptTokens: 100, OutputTokens: 50, TTFT: 30 * time.Millisecond, E2E: 530 * time.Millisecond}, 0.99, &prior, now)
	}
	seenMean, seenSD := m.Score(aibalance.LoadState{}, 100, 50, 1, &prior, now)
	busy := aibalance.LoadState{Inflight: 20, Pending: 10, PendingTokens: 5000, Running: 10}
	mean, sd := m.Score(busy, 100, 50, 1, &prior, now)
	t.Logf("idle (observed): %.3f ± %.3f; busy (never observed): %.3f ± %.3f", seenMean, seenSD, mean, sd)
	if sd/mean <= 2*seenSD/seenMean || aibalance.Optimistic(mean, sd) >= mean {
		t.Fatalf("an unobserved state is not more uncertain than an observed one")
	}
	if aibalance.Optimistic(mean, sd) < mean/2 {
		t.Fatal("the exploration bonus is not bounded")
	}
}

// TestFullBackendLosesToFreeSlot: a backend three times faster whose batch
// is known full (its engine showed a queue behind an unchanged batch of 4,
// and 4 are in flight) loses a stream to a slower backend with a free
// slot, though it would finish it sooner: waiting for a slot is the
// first-token tail. One request fewer and it wins again.
func TestFullBackendLosesToFreeSlot(t *testing.T) {
	p := newPredictive(2, true)
	defer p.set.Release()
	pool := testPool(t, 2)
	now := time.Now()
	f := func() *aibalance.Features {
		return &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 200, OutputTokens: 100}
	}
	for i := 0; i < 40; i++ {
		for j, slow := range []float64{1, 3} {
			a := p.set.Get(pool[j].Dial).Begin(f(), p.pool.Prior(), now)
			a.FirstToken(now)
			a.End(aibalance.Outcome{Status: 200, Stream: true, TTFT: time.Duration(slow * float64(50*time.Millisecond)), E2E: time.Duration(slow * float64(time.Second)), OutputTokens: 100}, p.app.Lambda(), p.pool.Prior(), now)
		}
	}
	fast := p.set.Get(pool[0].Dial)
	for i := 0; i < 2; i++ {
		fast.SetEngine(aibalance.EngineMetrics{Waiting: 2, Running: 4, HasWaiting: true, HasRunning: true, At: now.Add(time.Duration(i) * time.Second)}, 5*time.Second)
	}
	if got := fast.Capacity(now.Add(time.Second)); got != 4 {
		t.Fatalf("capacity %d after two scrapes of a queue behind a batch of 4, want 4", got)
	}
	var attempts []aibalance.Attempt
	for i := 0; i < 4; i++ {
		a := fast.Begin(f(), p.pool.Prior(), now)
		a.FirstToken(now)
		attempts = append(attempts, a)
	}
	// the engine now shows our 4 running and no queue
	fast.SetEngine(aibalance.EngineMetrics{Running: 4, HasWaiting: true, HasRunning: true, At: now.Add(time.Second)}, 5*time.Second)
	p.clock = func() time.Time { return now.Add(time.Second) }
	req := func() *http.Request {
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
			strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":true}`))
		return r.WithContext(withVars(r))
	}
	if u := p.Select(pool, req(), nil); u != pool[1] {
		t.Fatalf("with the fast backend's 4 slots taken, a stream went to %s: want the slow backend's free slot", u.Dial)
	}
	attempts[0].End(aibalance.Outcome{Status: 200, Stream: true, TTFT: 50 * time.Millisecond, E2E: time.Second, OutputTokens: 100}, p.app.Lambda(), p.pool.Prior(), now.Add(time.Second))
	if u := p.Select(pool, req(), nil); u != pool[0] {
		t.Fatalf("with a slot free on the fast backend, a stream went to %s", u.Dial)
	}
}

// TestUnprovenSlotLosesToSeenBatch: with no engine metrics a backend that
// has run at most 2 streams at once gets one more as a probe of a slot it
// has not shown, but not a second while the probe waits for its first
// token: that stream goes to the slow backend's proven slot. Once an
// engine of the pool showed a batch of 4, the fast one is assumed alike
// and keeps streams up to 4.
func TestUnprovenSlotLosesToSeenBatch(t *testing.T) {
	p := newPredictive(3, true)
	defer p.set.Release()
	pool := testPool(t, 3)
	now := time.Now()
	f := func() *aibalance.Features {
		return &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 200, OutputTokens: 100}
	}
	done := aibalance.Outcome{Status: 200, Stream: true, TTFT: 50 * time.Millisecond, E2E: time.Second, OutputTokens: 100}
	for i := 0; i < 40; i++ {
		for j, slow := range []float64{1, 3, 6} {
			b := p.set.Get(pool[j].Dial)
			var as []aibalance.Attempt
			for k := 0; k < 2-j/2; k++ { // fast and slow ran 2 at once, the third 1
				a := b.Begin(f(), p.pool.Prior(), now)
				a.FirstToken(now)
				as = append(as, a)
			}
			for _, a := range as {
				o := done
				o.TTFT, o.E2E = time.Duration(slow*float64(o.TTFT)), time.Duration(slow*float64(o.E2E))
				a.End(o, p.app.Lambda(), p.pool.Prior(), now)
			}
		}
	}
	fast := p.set.Get(pool[0].Dial)
	if got := fast.BatchSeen(); got != 2 {
		t.Fatalf("batch seen %d, want 2", got)
	}
	req := func() *http.Request {
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
			strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":true}`))
		return r.WithContext(withVars(r))
	}
	p.clock = func() time.Time { return now }
	stream := func(b *aibalance.Backend) {
		a := b.Begin(f(), p.pool.Prior(), now)
		a.FirstToken(now)
	}
	stream(fast)
	stream(fast)
	if u := p.Select(pool, req(), nil); u != pool[0] {
		t.Fatalf("with the fast backend's 2 seen slots taken, a probe of a third went to %s, want the fast backend", u.Dial)
	}
	fast.Begin(f(), p.pool.Prior(), now) // the probe, waiting for its first token
	if u := p.Select(pool, req(), nil); u != pool[1] {
		t.Fatalf("while the fast backend's probe waits, a stream went to %s, want the slow backend's seen slot", u.Dial)
	}
	// the third engine reports a batch of 4 with a queue behind it
	third := p.set.Get(pool[2].Dial)
	for i := 0; i < 2; i++ {
		third.SetEngine(aibalance.EngineMetrics{Waiting: 2, Running: 4, HasWaiting: true, HasRunning: true, At: now.Add(time.Duration(i-1) * time.Second)}, 5*time.Second)
	}
	if got := third.Capacity(now); got != 4 {
		t.Fatalf("capacity %d after two scrapes of a queue behind a batch of 4, want 4", got)
	}
	if u := p.Select(pool, req(), nil); u != pool[0] {
		t.Fatalf("with a batch of 4 known in the pool, a fourth stream went to %s, want the fast backend", u.Dial)
	}
	fast.Begin(f(), p.pool.Prior(), now)
	if u := p.Select(pool, req(), nil); u != pool[1] {
		t.Fatalf("with 4 streams on the fast backend, a fifth went to %s, want the slow backend", u.Dial)
	}
}

// TestUnprovenRankedBySlotWait: when every backend is beyond the batch it
// has shown (a burst before any limit is known), a stream goes to the one
// whose slot would free soonest were that batch all it has: 12 streams
// waiting behind a batch of 2 on the fast backend (1 s per request) wait
// longer than one behind the slow backend's (3 s per request).
func TestUnprovenRankedBySlotWait(t *testing.T) {
	p := newPredictive(2, true)
	defer p.set.Release()
	pool := testPool(t, 2)
	now := time.Now()
	f := func() *aibalance.Features {
		return &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 200, OutputTokens: 100}
	}
	teachStreamsInPairs(p, pool, now, f, 1, 3)
	p.clock = func() time.Time { return now }
	load := func(b *aibalance.Backend, waiting int) {
		for k := 0; k < 2; k++ {
			a := b.Begin(f(), p.pool.Prior(), now)
			a.FirstToken(now)
		}
		for k := 0; k < waiting; k++ {
			b.Begin(f(), p.pool.Prior(), now)
		}
	}
	load(p.set.Get(pool[0].Dial), 12)
	load(p.set.Get(pool[1].Dial), 1)
	r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
		strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":true}`))
	if u := p.Select(pool, r.WithContext(withVars(r)), nil); u != pool[1] {
		t.Fatalf("with 12 streams waiting behind the fast backend's batch of 2 and 1 behind the slow one's, a stream went to %s, want the slow backend", u.Dial)
	}
}

// TestBeyondPoolCapacityWaitsAsFull: a backend whose own capacity is
// unknown, beyond the batch of 4 another engine of the pool showed full,
// is as full as that engine, not ahead of it: a stream goes to whichever
// slot frees first, the engine's that showed its batch (3 ahead of a batch
// of 4 at 1 s a request) before the other's (9 ahead), whether that other
// is 3 times slower or as fast (then the guessed wait alone decides).
func TestBeyondPoolCapacityWaitsAsFull(t *testing.T) {
	for _, slower := range []float64{3, 1} {
		p := newPredictive(2, true)
		pool := testPool(t, 2)
		now := time.Now()
		f := func() *aibalance.Features {
			return &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 200, OutputTokens: 100}
		}
		teachStreamsInPairs(p, pool, now, f, 1, slower)
		p.clock = func() time.Time { return now }
		shown, other := p.set.Get(pool[0].Dial), p.set.Get(pool[1].Dial)
		for i := 0; i < 2; i++ {
			shown.SetEngine(aibalance.EngineMetrics{Waiting: 2, Running: 4, HasWaiting: true, HasRunning: true, At: now.Add(time.Duration(i-1) * time.Second)}, 5*time.Second)
		}
		if got := shown.Capacity(now); got != 4 {
			t.Fatalf("capacity %d after two scrapes of a queue behind a batch of 4, want 4", got)
		}
		if other.Capacity(now) != 0 {
			t.Fatalf("the other backend has a capacity before any was shown")
		}
		for k := 0; k < 2; k++ {
			a := other.Begin(f(), p.pool.Prior(), now)
			a.FirstToken(now)
		}
		for k := 0; k < 10; k++ {
			other.Begin(f(), p.pool.Prior(), now)
		}
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
			strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":true}`))
		if u := p.Select(pool, r.WithContext(withVars(r)), nil); u != pool[0] {
			t.Errorf("%gx slower: with the batch of 4 shown full and 2 waiting, and 12 streams on the other backend beyond that capacity, a stream went to %s, want the backend that showed its batch", slower, u.Dial)
		}
		p.set.Release()
	}
}

// TestSLOHeadersRankFirst: with ttft_weight 0 a stream goes to the backend
// that finishes first (800 ms to its first token); a client's
// X-SLO-TTFT-Ms of 200 sends it to the one predicted to meet that (20 ms
// first token, slower decode), and a target nobody meets changes nothing.
func TestSLOHeadersRankFirst(t *testing.T) {
	p := newPredictive(2, true)
	p.ttftWeight = 0
	defer p.set.Release()
	pool := testPool(t, 2)
	now := time.Now()
	teachSlowFirstTokenFastDecode(p, pool, now)
	req := func(header, v string) *http.Request {
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
			strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":true}`))
		if header != "" {
			r.Header.Set(header, v)
		}
		return r.WithContext(withVars(r))
	}
	for _, tc := range []struct {
		header, v string
		want      *reverseproxy.Upstream
	}{
		{"", "", pool[0]},
		{aibalance.SLOTTFTHeader, "200", pool[1]},
		{aibalance.SLOTTFTHeader, "5", pool[0]},
		{aibalance.SLOTTFTHeader, "bogus", pool[0]},
		{aibalance.SLOE2EHeader, "2000", pool[0]},
	} {
		if u := p.Select(pool, req(tc.header, tc.v), nil); u != tc.want {
			t.Errorf("%s: %q: went to %s, want %s", tc.header, tc.v, u.Dial, tc.want.Dial)
		}
	}
}

// teachStreamsInPairs trains pool[j] on 40 rounds of two streams at once
// (so it has shown a batch of 2), each taking slow[j] times 50 ms to its
// first token and 1 s in all.
func teachStreamsInPairs(p *AIPredictiveSelection, pool reverseproxy.UpstreamPool, now time.Time, f func() *aibalance.Features, slow ...float64) {
	for i := 0; i < 40; i++ {
		for j, x := range slow {
			b := p.set.Get(pool[j].Dial)
			as := []aibalance.Attempt{b.Begin(f(), p.pool.Prior(), now), b.Begin(f(), p.pool.Prior(), now)}
			for k := range as {
				as[k].FirstToken(now)
			}
			for _, a := range as {
				a.End(aibalance.Outcome{Status: 200, Stream: true, TTFT: time.Duration(x * float64(50*time.Millisecond)), E2E: time.Duration(x * float64(time.Second)), OutputTokens: 100}, p.app.Lambda(), p.pool.Prior(), now)
			}
		}
	}
}

// teachSlowFirstTokenFastDecode teaches p that pool[0] gives its first
// token in 800 ms and decodes at 10 ms a token, pool[1] in 20 ms and at
// 25 ms: pool[0] finishes 100 tokens first, pool[1] starts first.
func teachSlowFirstTokenFastDecode(p *AIPredictiveSelection, pool reverseproxy.UpstreamPool, now time.Time) {
	for i := 0; i < 40; i++ {
		for j, o := range []aibalance.Outcome{
			{Status: 200, Stream: true, TTFT: 800 * time.Millisecond, E2E: 800*time.Millisecond + 99*10*time.Millisecond, OutputTokens: 100},
			{Status: 200, Stream: true, TTFT: 20 * time.Millisecond, E2E: 20*time.Millisecond + 99*25*time.Millisecond, OutputTokens: 100},
		} {
			a := p.set.Get(pool[j].Dial).Begin(&aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 100, OutputTokens: 100}, p.pool.Prior(), now)
			a.FirstToken(now)
			a.End(o, p.app.Lambda(), p.pool.Prior(), now)
		}
	}
}
