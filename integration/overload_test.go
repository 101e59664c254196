package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// answer is one request's result as a client saw it.
type answer struct {
	key        string // the API key it was sent with
	status     int
	took       time.Duration
	retryAfter string
	code       string
	headers    http.Header
	err        error
}

// post sends one streaming chat request of key with max_tokens and reads
// the answer whole.
func post(ctx context.Context, url, key string, maxTokens int, prio string) answer {
	body := llmsim.ChatBody("", "hello there, "+key, maxTokens, true)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(string(body)))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	if prio != "" {
		req.Header.Set("X-Priority", prio)
	}
	start := time.Now()
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return answer{key: key, err: err, took: time.Since(start)}
	}
	raw, err := io.ReadAll(res.Body)
	res.Body.Close()
	a := answer{key: key, status: res.StatusCode, took: time.Since(start), retryAfter: res.Header.Get("Retry-After"), headers: res.Header, err: err}
	if res.StatusCode != 200 {
		var e struct {
			Error struct{ Code string }
		}
		_ = json.Unmarshal(raw, &e)
		a.code = e.Error.Code
	}
	return a
}

// poolOf returns the admin view of the pool whose members include addr.
func poolOf(t *testing.T, addr string) aibalance.PoolView {
	t.Helper()
	v := adminJSON[aibalance.UpstreamsView](t, "/aibalance/upstreams")
	for _, p := range v.Pools {
		if slices.Contains(p.Members, addr) {
			return p
		}
	}
	t.Fatalf("no pool holds %s", addr)
	return aibalance.PoolView{}
}

// engineQueue samples the engines' waiting queues every 10 ms until stop
// and returns their mean total and the largest total seen.
func engineQueue(p *llmsim.Pool, stop <-chan struct{}) (mean float64, peak int) {
	var sum, n int
	for {
		select {
		case <-stop:
			if n == 0 {
				return 0, 0
			}
			return float64(sum) / float64(n), peak
		case <-time.After(10 * time.Millisecond):
		}
		w := 0
		for _, s := range p.Servers {
			w += s.Stats().Waiting
		}
		sum += w
		n++
		peak = max(peak, w)
	}
}

// closedLoop runs workers clients, each sending one request after another
// with the API key keyOf gives it, until ctx ends; a client told to retry
// waits pause first. The answers are in the order they ended.
func closedLoop(ctx context.Context, url string, workers, maxTokens int, pause time.Duration, keyOf func(worker int) string) []answer {
	var mu sync.Mutex
	var out []answer
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				a := post(rctx, url, keyOf(w), maxTokens, "")
				cancel()
				mu.Lock()
				out = append(out, a)
				mu.Unlock()
				if a.status != 200 {
					select {
					case <-ctx.Done():
					case <-time.After(pause):
					}
				}
			}
		}()
	}
	wg.Wait()
	return out
}

// lightAndHeavy gives worker 0 the key "light" and every other "heavy".
func lightAndHeavy(w int) string {
	if w == 0 {
		return "light"
	}
	return "heavy"
}

// fourUsers spreads workers over four API keys.
func fourUsers(w int) string { return fmt.Sprintf("user-%d", w%4) }

func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(int(q*float64(len(s))), len(s)-1)]
}

// TestAdmissionHoldsTheQueue: twelve clients on two engines of two batch
// slots each. With admission off the surplus waits in the engines'
// queues; with it on (the default), once the balancer has learned the
// engines' batch size it waits at the balancer instead: the engines'
// queues stay shorter, and nothing fails either way.
func TestAdmissionHoldsTheQueue(t *testing.T) {
	tester := caddytest.NewTester(t)
	cfg := llmsim.Config{MaxRunning: 2}
	run := func(block string) (mean float64, peak int, out []answer, view aibalance.PoolView) {
		p := pool(t, cfg, cfg)
		url := aiProxy(t, tester, upstreams(p), "\t\tmetrics_interval 100ms\n"+block) + "/v1/chat/completions"
		drive(t, url, 8, 2, 20) // warm: the model learns the engines
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
		defer cancel()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(1500 * time.Millisecond) // measure once the batch size is learned
			mean, peak = engineQueue(p, stop)
		}()
		out = closedLoop(ctx, url, 12, 30, 50*time.Millisecond, fourUsers)
		close(stop)
		wg.Wait()
		return mean, peak, out, poolOf(t, p.Addrs()[0])
	}
	offMean, offPeak, offOut, _ := run("\t\tadmission off")
	onMean, onPeak, onOut, view := run("")
	for name, out := range map[string][]answer{"off": offOut, "on": onOut} {
		for _, a := range out {
			if a.status != 200 || a.err != nil {
				t.Fatalf("admission %s: a request failed: %d %v %s", name, a.status, a.err, a.code)
			}
		}
	}
	var onTook, offTook []time.Duration
	for _, a := range onOut {
		onTook = append(onTook, a.took)
	}
	for _, a := range offOut {
		offTook = append(offTook, a.took)
	}
	adm := view.Admission
	if adm == nil {
		t.Fatal("the pool view shows no admission queue")
	}
	t.Logf("engine queues (mean / peak, both engines): admission off %.2f / %d, on %.2f / %d; requests %d vs %d, E2E p50 %s vs %s, p99 %s vs %s; balancer queue: %d admitted after a wait (p50 %.3fs, p99 %.3fs)",
		offMean, offPeak, onMean, onPeak, len(offOut), len(onOut), quantile(offTook, 0.5).Round(time.Millisecond), quantile(onTook, 0.5).Round(time.Millisecond),
		quantile(offTook, 0.99).Round(time.Millisecond), quantile(onTook, 0.99).Round(time.Millisecond), adm.Admitted, adm.WaitP50, adm.WaitP99)
	if adm.Admitted == 0 {
		t.Fatal("no request waited at the balancer")
	}
	if onMean > offMean/2 {
		t.Fatalf("the engines' queues held %.2f requests on average with admission, %.2f without: want at most half", onMean, offMean)
	}
	if float64(len(onOut)) < 0.8*float64(len(offOut)) {
		t.Fatalf("admission cut throughput: %d requests served vs %d", len(onOut), len(offOut))
	}
}

// TestBurstFiveTimesCapacity: 80 clients against 16 batch slots, with a
// short queue: requests beyond it are answered 429 server_overloaded with
// a Retry-After at once; the admitted keep a bounded latency; goroutines
// and heap come back when the burst ends.
func TestBurstFiveTimesCapacity(t *testing.T) {
	tester := caddytest.NewTester(t)
	cfg := llmsim.Config{MaxRunning: 4}
	p := pool(t, cfg, cfg, cfg, cfg)
	url := aiProxy(t, tester, upstreams(p), "\t\tmetrics_interval 100ms\n\t\tadmission {\n\t\t\tmax_queue 16\n\t\t\tmax_wait 1s\n\t\t}") + "/v1/chat/completions"
	drive(t, url, 16, 4, 20)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	g0, h0 := runtime.NumGoroutine(), ms.HeapAlloc
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var peakG atomic.Int64
	go func() {
		for ctx.Err() == nil {
			peakG.Store(max(peakG.Load(), int64(runtime.NumGoroutine())))
			time.Sleep(20 * time.Millisecond)
		}
	}()
	out := closedLoop(ctx, url, 80, 30, 100*time.Millisecond, fourUsers)
	var ok, over int
	var took []time.Duration
	for _, a := range out {
		switch {
		case a.err == nil && a.status == 200:
			ok++
			took = append(took, a.took)
		case a.status == http.StatusTooManyRequests && a.code == "server_overloaded" && a.retryAfter != "":
			over++
		default:
			t.Fatalf("unexpected answer: %d %v %q (Retry-After %q)", a.status, a.err, a.code, a.retryAfter)
		}
	}
	view := poolOf(t, p.Addrs()[0]).Admission
	// goroutines and heap once the burst is over, the clients' idle
	// connections closed. Caddy keeps up to 32 idle connections to each
	// engine (3 goroutines each, its two and the engine's): that much may
	// stay, no more.
	const pooled = 4 * 32 * 3
	http.DefaultClient.CloseIdleConnections()
	var g1 int
	var h1 uint64
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		runtime.GC()
		runtime.ReadMemStats(&ms)
		g1, h1 = runtime.NumGoroutine(), ms.HeapAlloc
		if g1 <= g0+pooled || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("%d requests in 5 s: %d served (E2E p50 %s, p99 %s, max %s), %d answered 429 with Retry-After; queue: %d admitted after a wait (p99 %.3fs), %d overloaded, %d timed out; goroutines %d before, peak %d, %d after; heap %.1f MiB before, %.1f after",
		len(out), ok, quantile(took, 0.5).Round(time.Millisecond), quantile(took, 0.99).Round(time.Millisecond), quantile(took, 1).Round(time.Millisecond), over,
		view.Admitted, view.WaitP99, view.Overloaded, view.TimedOut, g0, peakG.Load(), g1, float64(h0)/(1<<20), float64(h1)/(1<<20))
	if g1 > g0+pooled || peakG.Load() > 2000 {
		t.Fatalf("%d goroutines after the burst (peak %d), %d before", g1, peakG.Load(), g0)
	}
	if over == 0 || ok == 0 {
		t.Fatalf("%d served, %d refused: want both", ok, over)
	}
	// the queue waits at most 1 s; one request takes about 0.3 s on a
	// full engine: 3 s covers both on a loaded machine
	if p99 := quantile(took, 0.99); p99 > 3*time.Second {
		t.Fatalf("admitted requests' E2E p99 %s: the queue did not bound their wait", p99)
	}
	if h1 > h0+64<<20 {
		t.Fatalf("heap grew from %d to %d bytes", h0, h1)
	}
}

// TestRateLimits: per key, 3 requests a minute: the fourth of a key is
// answered 429 with Retry-After and OpenAI's headers, another key is
// served; every answer carries x-ratelimit-*; the pool view counts them.
func TestRateLimits(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{})
	url := aiProxy(t, tester, upstreams(p), "\t\trate_limit {\n\t\t\trequests_per_minute 3\n\t\t\ttokens_per_minute 100000\n\t\t}") + "/v1/chat/completions"
	for i := range 4 {
		a := post(context.Background(), url, "alice", 8, "")
		rem := a.headers.Get("X-Ratelimit-Remaining-Requests")
		if i < 3 {
			if a.status != 200 || rem != fmt.Sprint(2-i) || a.headers.Get("X-Ratelimit-Limit-Tokens") != "100000" {
				t.Fatalf("request %d: %d, remaining %q, headers %v", i, a.status, rem, a.headers)
			}
			continue
		}
		t.Logf("fourth: %d %s, Retry-After %s, x-ratelimit-reset-requests %s", a.status, a.code, a.retryAfter, a.headers.Get("X-Ratelimit-Reset-Requests"))
		if a.status != http.StatusTooManyRequests || a.code != "rate_limit_exceeded" || a.retryAfter == "" || rem != "0" {
			t.Fatalf("fourth: %d %q Retry-After %q remaining %q", a.status, a.code, a.retryAfter, rem)
		}
	}
	if a := post(context.Background(), url, "bob", 8, ""); a.status != 200 {
		t.Fatalf("another key: %d %s", a.status, a.code)
	}
	// the tokens used are charged, not the estimate: a request without
	// max_tokens is charged its prompt and the default 256 output tokens
	// at admission, and given back what the engine's 128 did not use
	url2 := aiProxy(t, tester, upstreams(p), "\t\trate_limit {\n\t\t\ttokens_per_minute 600\n\t\t}") + "/v1/chat/completions"
	remaining := func() int {
		res, err := http.Post(url2, "application/json", strings.NewReader(`{"messages":[{"role":"user","content":"hi"}],"stream":true}`))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		var n int
		fmt.Sscan(res.Header.Get("X-Ratelimit-Remaining-Tokens"), &n)
		if res.StatusCode != 200 {
			t.Fatalf("token-limited request: %d", res.StatusCode)
		}
		return n
	}
	r1 := remaining()
	r2 := remaining()
	t.Logf("tokens remaining after the first request's admission %d, after the second's %d: %d charged net", r1, r2, r1-r2)
	if d := r1 - r2; d < 60 || d > 200 {
		t.Fatalf("the first request cost %d tokens net: want its prompt and the 128 tokens it used (not the 256 estimated)", d)
	}
	if v := poolOf(t, p.Addrs()[0]); v.RateLimited != 1 {
		t.Fatalf("pool view: %d rate limited, want 1", v.RateLimited)
	}
}

// TestAdmissionIsFair: one heavy user (11 clients) and one light user (1
// client) share two engines of two batch slots. In the engines' queues,
// first come first served, the light user waits behind the heavy user's
// backlog; in the balancer's queue, fair between API keys, it waits for
// about one turn.
func TestAdmissionIsFair(t *testing.T) {
	tester := caddytest.NewTester(t)
	cfg := llmsim.Config{MaxRunning: 2}
	run := func(block string) (light, heavy time.Duration) {
		p := pool(t, cfg, cfg)
		url := aiProxy(t, tester, upstreams(p), "\t\tmetrics_interval 100ms\n"+block) + "/v1/chat/completions"
		drive(t, url, 8, 2, 20)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var lt, ht []time.Duration
		for _, a := range closedLoop(ctx, url, 12, 30, 0, lightAndHeavy) {
			if a.status != 200 {
				t.Errorf("%s: %d %v %s", a.key, a.status, a.err, a.code)
				continue
			}
			if a.key == "light" {
				lt = append(lt, a.took)
			} else {
				ht = append(ht, a.took)
			}
		}
		// the first seconds teach the balancer the batch size: measure
		// the second half
		return quantile(lt[len(lt)/2:], 0.5), quantile(ht[len(ht)/2:], 0.5)
	}
	offLight, offHeavy := run("\t\tadmission off")
	onLight, onHeavy := run("")
	t.Logf("E2E p50, light user / heavy user: admission off %s / %s, on %s / %s",
		offLight.Round(time.Millisecond), offHeavy.Round(time.Millisecond), onLight.Round(time.Millisecond), onHeavy.Round(time.Millisecond))
	if onLight > offLight*3/4 {
		t.Fatalf("the light user's median %s with admission, %s without: want at most three quarters", onLight, offLight)
	}
}

// TestAdmissionNonStreaming: non-streaming requests show no first token,
// so the balancer cannot observe their waits; the engines' metrics (a
// queue behind a full batch on consecutive scrapes) tell it the pool is
// full, and a burst is answered 429 past a short queue instead of piling
// into the engines.
func TestAdmissionNonStreaming(t *testing.T) {
	tester := caddytest.NewTester(t)
	cfg := llmsim.Config{MaxRunning: 2}
	p := pool(t, cfg, cfg)
	url := aiProxy(t, tester, upstreams(p), "\t\tmetrics_interval 100ms\n\t\tadmission {\n\t\t\tmax_queue 4\n\t\t\tmax_wait 1s\n\t\t}") + "/v1/chat/completions"
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	var mu sync.Mutex
	codes := map[int]int{}
	var peak int
	var wg sync.WaitGroup
	for range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				res, err := http.Post(url, "application/json", strings.NewReader(string(llmsim.ChatBody("", "hello", 20, false))))
				if err != nil {
					t.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				mu.Lock()
				codes[res.StatusCode]++
				w := 0
				for _, s := range p.Servers {
					w += s.Stats().Waiting
				}
				peak = max(peak, w)
				mu.Unlock()
				if res.StatusCode != 200 {
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("answers %v; engines' queues peaked at %d (24 clients, 4 batch slots)", codes, peak)
	if codes[http.StatusTooManyRequests] == 0 || codes[200] == 0 || len(codes) != 2 {
		t.Fatalf("answers %v: want 200s and 429s only", codes)
	}
}

// TestOverloadShedsUnderDefaults: ai_proxy with its defaults, two engines
// of 2 slots (about 4.4 requests a second at 100 output tokens), offered
// five times that for 8 seconds, open loop — a fifth of it Anthropic
// Messages. The pool serves what it can with an admitted E2E p99 within
// 15 s, and answers the rest at once: 429 server_overloaded with
// Retry-After for the OpenAI API, 529 overloaded_error for /v1/messages,
// never after waiting out the queue's bound.
func TestOverloadShedsUnderDefaults(t *testing.T) {
	if testing.Short() {
		t.Skip("20 s of overload")
	}
	tester := caddytest.NewTester(t)
	cfg := llmsim.Config{MaxRunning: 2}
	p := pool(t, cfg, cfg)
	base := aiProxy(t, tester, upstreams(p), "")
	capacity := 2 * cfg.Capacity(10, 100)
	rate := 5 * capacity
	type result struct {
		messages bool
		status   int
		took     time.Duration
		retry    string
		kind     string
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	results := make(chan result, 1024)
	n := int(rate * 8)
	start := time.Now()
	for i := 0; i < n; i++ {
		time.Sleep(time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))))
		wg.Add(1)
		go func(messages bool) {
			defer wg.Done()
			url, body := base+"/v1/chat/completions", string(llmsim.ChatBody("", "hello there", 100, true))
			if messages {
				url, body = base+"/v1/messages", `{"model":"sim-llama-8b","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hello there"}]}`
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("anthropic-version", "2023-06-01")
			t0 := time.Now()
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				results <- result{messages: messages, status: -1, kind: err.Error()}
				return
			}
			raw, _ := io.ReadAll(res.Body)
			res.Body.Close()
			r := result{messages: messages, status: res.StatusCode, took: time.Since(t0), retry: res.Header.Get("Retry-After")}
			var e struct {
				Error struct{ Type, Code string }
			}
			_ = json.Unmarshal(raw, &e)
			r.kind = e.Error.Code
			if messages {
				r.kind = e.Error.Type
			}
			results <- r
		}(i%5 == 4)
	}
	wg.Wait()
	close(results)
	var served, shed, shedMessages int
	var took, shedTook []time.Duration
	for r := range results {
		switch {
		case r.status == 200:
			served++
			took = append(took, r.took)
		case !r.messages && r.status == http.StatusTooManyRequests && r.kind == "server_overloaded" && r.retry != "":
			shed++
			shedTook = append(shedTook, r.took)
		case r.messages && r.status == 529 && r.kind == "overloaded_error" && r.retry != "":
			shed++
			shedMessages++
			shedTook = append(shedTook, r.took)
		default:
			t.Errorf("unexpected answer (messages %v): %d %q, Retry-After %q after %v", r.messages, r.status, r.kind, r.retry, r.took)
		}
	}
	view := poolOf(t, p.Addrs()[0]).Admission
	t.Logf("%d requests at %.1f/s (5× a capacity of %.1f/s): %d served, E2E p50 %v p99 %v; %d shed (%d of them Messages, 529), answered in p50 %v p99 %v; queue: %d admitted after a wait (p99 %.2fs), %d overloaded, %d timed out",
		n, rate, capacity, served, quantile(took, 0.5).Round(time.Millisecond), quantile(took, 0.99).Round(time.Millisecond),
		shed, shedMessages, quantile(shedTook, 0.5).Round(time.Millisecond), quantile(shedTook, 0.99).Round(time.Millisecond),
		view.Admitted, view.WaitP99, view.Overloaded, view.TimedOut)
	if served == 0 || shed < n/3 || shedMessages == 0 {
		t.Fatalf("%d served, %d shed (%d Messages) of %d: want the pool's capacity served and most of the rest shed", served, shed, shedMessages, n)
	}
	if p99 := quantile(took, 0.99); p99 > 15*time.Second {
		t.Fatalf("admitted E2E p99 %v, want at most 15 s", p99)
	}
	// shed at once: not after waiting out max_wait (10 s)
	if p99 := quantile(shedTook, 0.99); p99 > 2*time.Second {
		t.Fatalf("shed requests answered in p99 %v: they waited", p99)
	}
}
