package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/healthcheck"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// These tests put a real Caddy with ai_proxy in front of simulated engines
// that fail the ways engines fail, and check what clients see.

// upstreamHeader makes Caddy name the backend that answered, for the
// client's Result.Backend.
const upstreamHeader = "header_down X-Upstream {http.reverse_proxy.upstream.hostport}"

// outcome is one client request of a load run.
type outcome struct {
	start   time.Time
	took    time.Duration
	status  int
	backend string
	err     error
	cut     bool // a 200 stream that broke after it began: cannot be replayed
}

func (o outcome) failed() bool { return !o.cut && (o.err != nil || o.status != 200) }

// runLoad sends streaming chat requests from workers clients until ctx
// ends (each request is bounded by 20 s) and returns what each saw.
func runLoad(ctx context.Context, url string, workers, maxTokens int, model string) []outcome {
	return runLoadWith(ctx, http.DefaultClient, url, workers, maxTokens, model)
}

// runLoadWith is runLoad with client.
func runLoadWith(ctx context.Context, client *http.Client, url string, workers, maxTokens int, model string) []outcome {
	var mu sync.Mutex
	var out []outcome
	var wg sync.WaitGroup
	var n atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := n.Add(1)
				body := llmsim.ChatBody(model, fmt.Sprintf("request %d: hello there", i), maxTokens, true)
				rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				start := time.Now()
				res, err := llmsim.Complete(rctx, client, url, body)
				cancel()
				o := outcome{start: start, took: time.Since(start), status: res.Status, backend: res.Backend, err: err}
				o.cut = err != nil && res.Status == 200
				mu.Lock()
				out = append(out, o)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

func countFailed(out []outcome) (failed, cut int) {
	for _, o := range out {
		if o.failed() {
			failed++
		}
		if o.cut {
			cut++
		}
	}
	return failed, cut
}

func backendOf(t *testing.T, addr string) *aibalance.Backend {
	t.Helper()
	b, ok := aibalance.LookupBackend(addr)
	if !ok {
		t.Fatalf("no backend %s in the store", addr)
	}
	return b
}

// TestKillOneOfFour kills one of four engines at peak load and brings it
// back: no request fails except streams already running on it, the dead
// one is avoided within a second, and once back it ramps up by slow start.
func TestKillOneOfFour(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{}, llmsim.Config{}, llmsim.Config{})
	url := aiProxy(t, tester, upstreams(p), "\t\t"+upstreamHeader+"\n\t\tslow_start 4s\n\t\tcircuit_breaker {\n\t\t\topen_duration 3s\n\t\t}") + "/v1/chat/completions"
	victim := p.Servers[3]
	addr := victim.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 13*time.Second)
	defer cancel()
	start := time.Now()
	var killedAt, backAt, closedAt, lastRefused time.Time
	var dialAtKill, dialLate uint64
	go func() {
		time.Sleep(2 * time.Second)
		b := backendOf(t, addr)
		dialAtKill = b.Stats().DialErrors
		killedAt = time.Now()
		victim.Stop()
		// watch the attempts it refuses while down
		var atOne uint64
		for seen := dialAtKill; time.Since(killedAt) < 2*time.Second; time.Sleep(5 * time.Millisecond) {
			if n := b.Stats().DialErrors; n != seen {
				seen, lastRefused = n, time.Now()
			}
			if atOne == 0 && time.Since(killedAt) >= time.Second {
				atOne = b.Stats().DialErrors
			}
		}
		dialLate = b.Stats().DialErrors - atOne // attempts from 1 s to 2 s after the kill
		if err := victim.Listen(""); err != nil {
			t.Errorf("restarting: %v", err)
		}
		backAt = time.Now()
		for ctx.Err() == nil {
			if br := healthcheck.Of(b); br != nil && br.Status(time.Now()).State == healthcheck.Closed {
				closedAt = time.Now()
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	out := runLoad(ctx, url, 8, 16, "")
	failed, cut := countFailed(out)
	avoided := "at once"
	if !lastRefused.IsZero() {
		avoided = lastRefused.Sub(killedAt).Round(time.Millisecond).String()
	}
	t.Logf("%d requests, %d failed, %d streams cut (running on the killed engine); %d attempts refused while it was down, the last %s after the kill (retried elsewhere), %d in the second second",
		len(out), failed, cut, backendOf(t, addr).Stats().DialErrors-dialAtKill, avoided, dialLate)
	if failed != 0 {
		for _, o := range out {
			if o.failed() {
				t.Logf("failed at +%s: %d %v", o.start.Sub(start).Round(time.Millisecond), o.status, o.err)
			}
		}
		t.Fatalf("%d requests failed", failed)
	}
	if dialLate != 0 {
		t.Fatalf("the dead engine still got %d attempts between 1 s and 2 s after the kill", dialLate)
	}
	if closedAt.IsZero() {
		t.Fatal("the engine came back but its breaker never closed")
	}
	// its share of the requests that started in each second after it
	// was back in service
	var shares []float64
	var line strings.Builder
	for from := closedAt; from.Add(time.Second).Before(start.Add(13 * time.Second)); from = from.Add(time.Second) {
		var mine, all int
		for _, o := range out {
			if o.start.Before(from) || !o.start.Before(from.Add(time.Second)) || o.failed() {
				continue
			}
			all++
			if o.backend == addr {
				mine++
			}
		}
		if all > 0 {
			shares = append(shares, float64(mine)/float64(all))
			fmt.Fprintf(&line, " %.2f", float64(mine)/float64(all))
		}
	}
	t.Logf("killed at +%s, back at +%s, breaker closed at +%s; its share each second since:%s",
		killedAt.Sub(start).Round(time.Millisecond), backAt.Sub(start).Round(time.Millisecond), closedAt.Sub(start).Round(time.Millisecond), line.String())
	if len(shares) < 3 {
		t.Fatalf("too few seconds after the recovery: %v", shares)
	}
	if first, last := shares[0], shares[len(shares)-1]; first >= last || last < 0.1 {
		t.Fatalf("no ramp: share %.2f in the first second, %.2f in the last", first, last)
	}
}

// limitedServer answers every POST with 429 and the Retry-After that
// retryAfter gives, and records when.
type limitedServer struct {
	addr       string
	mu         sync.Mutex
	at         []time.Time
	retryAfter func(n int) (string, time.Duration) // header, delay before answering
}

func startLimited(t *testing.T, retryAfter func(n int) (string, time.Duration)) *limitedServer {
	t.Helper()
	ls := &limitedServer{retryAfter: retryAfter}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.NotFound(w, r) // the scraper's /metrics and /v1/models: none here
			return
		}
		_, _ = io.Copy(io.Discard, r.Body)
		ls.mu.Lock()
		ls.at = append(ls.at, time.Now())
		n := len(ls.at)
		ls.mu.Unlock()
		ra, delay := ls.retryAfter(n)
		time.Sleep(delay)
		w.Header().Set("Retry-After", ra)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = io.WriteString(w, `{"error":{"message":"rate limited","type":"rate_limit_error","code":"rate_limit_exceeded"}}`)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ls.addr = ln.Addr().String()
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ls
}

func (ls *limitedServer) times() []time.Time {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return append([]time.Time(nil), ls.at...)
}

// TestRetryAfterCooldown: a backend answering 429 with Retry-After: 2 gets
// nothing for 2 s, then traffic again; its clients' requests succeed on the
// other backend.
func TestRetryAfterCooldown(t *testing.T) {
	tester := caddytest.NewTester(t)
	ls := startLimited(t, func(int) (string, time.Duration) { return "2", 0 })
	p := pool(t, llmsim.Config{})
	url := aiProxy(t, tester, ls.addr+" "+upstreams(p), "\t\tslow_start off") + "/v1/chat/completions"
	ctx, cancel := context.WithTimeout(context.Background(), 7*time.Second)
	defer cancel()
	out := runLoad(ctx, url, 4, 32, "")
	failed, _ := countFailed(out)
	at := ls.times()
	var gaps []string
	for i := 1; i < len(at); i++ {
		gaps = append(gaps, at[i].Sub(at[i-1]).Round(10*time.Millisecond).String())
	}
	t.Logf("%d requests, %d failed; the 429 backend got %d attempts, gaps %v", len(out), failed, len(at), gaps)
	if failed != 0 {
		t.Fatalf("%d requests failed", failed)
	}
	if len(at) < 2 {
		t.Fatalf("the backend got %d attempts in 7 s: want traffic again after its 2 s cooldowns", len(at))
	}
	// attempts sent together, before the first 429 came back, are one
	// burst; after a 429, nothing for 2 s
	for i := 1; i < len(at); i++ {
		if gap := at[i].Sub(at[i-1]); gap > 100*time.Millisecond && gap < 1900*time.Millisecond {
			t.Fatalf("attempt %d came %s after a Retry-After: 2", i, gap)
		}
	}
}

// TestShorterRetryAfterKeepsCooldown: a Retry-After: 1 that arrives during
// a 60 s cooldown does not end it, and while every backend cools down the
// balancer answers 429 itself, with the time left, sending nothing.
func TestShorterRetryAfterKeepsCooldown(t *testing.T) {
	tester := caddytest.NewTester(t)
	// the first request is held, then told 1 s; the second is told 60 s
	ls := startLimited(t, func(n int) (string, time.Duration) {
		if n == 1 {
			return "1", 500 * time.Millisecond
		}
		return "60", 0
	})
	url := aiProxy(t, tester, ls.addr, "") + "/v1/chat/completions"
	body := llmsim.ChatBody("", "hi", 4, false)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, _ = llmsim.Complete(context.Background(), http.DefaultClient, url, body)
	}()
	for len(ls.times()) == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	res, _ := llmsim.Complete(context.Background(), http.DefaultClient, url, body)
	if res.Status != 429 || res.RetryAfter != "60" {
		t.Fatalf("the backend's own 429 should reach the client: got %d, Retry-After %q", res.Status, res.RetryAfter)
	}
	wg.Wait() // the held request got its Retry-After: 1
	time.Sleep(1500 * time.Millisecond)
	start := time.Now()
	res, _ = llmsim.Complete(context.Background(), http.DefaultClient, url, body)
	took := time.Since(start)
	ra, _ := strconv.Atoi(res.RetryAfter)
	t.Logf("1.5 s after a Retry-After: 1 inside a 60 s cooldown: %d in %s, Retry-After %q: %s", res.Status, took.Round(time.Millisecond), res.RetryAfter, res.ErrorMessage)
	if res.Status != 429 || ra < 55 || ra > 60 {
		t.Fatalf("got %d with Retry-After %q: want the balancer's 429 with the 60 s cooldown's rest", res.Status, res.RetryAfter)
	}
	if n := len(ls.times()); n != 2 {
		t.Fatalf("the cooling backend got %d attempts, want 2", n)
	}
	// the admin view says so, with the end of the cooldown
	code, raw := adminGet(t, http.MethodGet, "/aibalance/upstreams/"+ls.addr)
	var v aibalance.UpstreamView
	if err := json.Unmarshal(raw, &v); err != nil || code != 200 {
		t.Fatalf("admin view: %d %s", code, raw)
	}
	t.Logf("admin view: state %s until +%s: %s", v.State, time.Until(v.Until).Round(time.Second), v.Reason)
	if v.State != "cooldown" || time.Until(v.Until) < 55*time.Second {
		t.Fatalf("admin view: state %q until %s", v.State, v.Until)
	}
	if took > time.Second {
		t.Fatalf("the balancer's own 429 took %s", took)
	}
}

// TestBreakerOpensAndRecovers: a backend failing 30% of its requests with
// 500 is opened (no client sees an error: each is retried), probed
// half-open, and closed again once it recovers.
func TestBreakerOpensAndRecovers(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{Faults: llmsim.Faults{ErrorRate: 0.3}}, llmsim.Config{})
	// failure_ratio 0.15: a few seconds give the sick backend a few dozen
	// attempts, whose observed error share varies around 30%
	url := aiProxy(t, tester, upstreams(p), "\t\tcircuit_breaker {\n\t\t\tfailure_ratio 0.15\n\t\t\topen_duration 1s\n\t\t\tmax_open_duration 2s\n\t\t}") + "/v1/chat/completions"
	sick := p.Servers[0]
	var seen sync.Map
	stop := make(chan struct{})
	var polled sync.WaitGroup
	polled.Add(1)
	go func() {
		defer polled.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if b, ok := aibalance.LookupBackend(sick.Addr()); ok {
				if br := healthcheck.Of(b); br != nil {
					seen.Store(br.Status(time.Now()).State, true)
				}
			}
			if _, ok := seen.Load("view"); !ok {
				// the admin view shows the open breaker and why
				var v aibalance.UpstreamView
				if code, raw := adminFetch("/aibalance/upstreams/" + sick.Addr()); code == 200 && json.Unmarshal(raw, &v) == nil && v.State == "open" {
					seen.Store("view", v.Reason)
				}
			}
		}
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		polled.Wait()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	out := runLoad(ctx, url, 6, 16, "")
	cancel()
	failed, cut := countFailed(out)
	errs := sick.Stats().Errors
	_, opened := seen.Load(healthcheck.Open)
	t.Logf("sick phase: %d requests, %d failed, %d cut; the sick backend answered %d with 500 of %d", len(out), failed, cut, errs, sick.Stats().Requests)
	if failed != 0 {
		t.Fatalf("%d requests failed: 500s must be retried on the healthy backend", failed)
	}
	if !opened {
		t.Fatal("the breaker never opened on a backend failing 30% of requests")
	}
	why, shown := seen.Load("view")
	t.Logf("admin view while open: %v", why)
	if !shown || !strings.Contains(why.(string), "answered 500") {
		t.Fatalf("the admin view never showed the open breaker with its reason (%v)", why)
	}
	sick.SetFaults(llmsim.Faults{})
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	out = runLoad(ctx, url, 6, 16, "")
	cancel()
	close(stop)
	polled.Wait()
	failed, _ = countFailed(out)
	b := backendOf(t, sick.Addr())
	st := healthcheck.Of(b).Status(time.Now())
	_, probed := seen.Load(healthcheck.HalfOpen)
	served := 0
	for _, o := range out {
		if o.status == 200 && o.err == nil && sick.Addr() != "" {
			served++
		}
	}
	t.Logf("recovered phase: %d requests, %d failed; breaker %s (%s); half-open seen %v", len(out), failed, st.State, st.Reason, probed)
	if failed != 0 || !probed || st.State != healthcheck.Closed {
		t.Fatalf("after recovery: %d failed, half-open seen %v, breaker %s", failed, probed, st.State)
	}
}

// TestHangingBackend: a backend that accepts requests and never answers
// holds none beyond the first-byte timeout: each completes elsewhere
// within that plus one attempt, and the breaker then takes it out.
func TestHangingBackend(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{Faults: llmsim.Faults{HangRate: 1}}, llmsim.Config{}, llmsim.Config{})
	url := aiProxy(t, tester, upstreams(p), "\t\tfirst_byte_timeout 1s") + "/v1/chat/completions"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out := runLoad(ctx, url, 4, 16, "")
	failed, _ := countFailed(out)
	var slowest time.Duration
	for _, o := range out {
		slowest = max(slowest, o.took)
	}
	hung := p.Servers[0].Stats().Hung
	t.Logf("%d requests, %d failed, slowest %s; the hanging backend held %d attempts", len(out), failed, slowest.Round(time.Millisecond), hung)
	if failed != 0 {
		t.Fatalf("%d requests failed", failed)
	}
	if slowest > 2500*time.Millisecond {
		t.Fatalf("a request took %s: want at most the 1 s first-byte timeout plus one attempt", slowest)
	}
	if hung > 8 {
		t.Fatalf("the hanging backend held %d attempts: its breaker should have opened", hung)
	}
}

// TestModelAwareRouting: two models on disjoint backends, read from their
// /v1/models: each model's requests land only on its backends, an unknown
// model gets an OpenAI-style 404 at once, and a request larger than one
// backend's context goes to the other.
func TestModelAwareRouting(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t,
		llmsim.Config{Model: "model-a", MaxModelLen: 8192},
		llmsim.Config{Model: "model-a", MaxModelLen: 1024},
		llmsim.Config{Model: "model-b"},
		llmsim.Config{Model: "model-b"},
	)
	base := aiProxy(t, tester, upstreams(p), "")
	url := base + "/v1/chat/completions"
	waitFor(t, func() bool {
		for _, a := range p.Addrs() {
			if b, ok := aibalance.LookupBackend(a); !ok || b.Models() == nil {
				return false
			}
		}
		return true
	})
	for _, model := range []string{"model-a", "model-b"} {
		for i := 0; i < 20; i++ {
			res, err := llmsim.Complete(context.Background(), http.DefaultClient, url, llmsim.ChatBody(model, "hello", 8, i%2 == 0))
			if err != nil || res.Status != 200 {
				t.Fatalf("%s request %d: %d %v %s", model, i, res.Status, err, res.ErrorMessage)
			}
		}
	}
	for i, s := range p.Servers {
		if st := s.Stats(); st.BadRequests != 0 {
			t.Fatalf("backend %d (%s) answered %d requests for a model it does not serve", i, s.Config().Model, st.BadRequests)
		}
	}
	a, b := p.Servers[0].Stats().Completed+p.Servers[1].Stats().Completed, p.Servers[2].Stats().Completed+p.Servers[3].Stats().Completed
	t.Logf("model-a backends served %d, model-b backends %d", a, b)
	if a != 20 || b != 20 {
		t.Fatalf("model-a backends served %d, model-b backends %d: want 20 each", a, b)
	}

	// the pool's model list is the union of its backends'
	resp, err := http.Get(base + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Data []struct {
			ID          string `json:"id"`
			MaxModelLen int    `json:"max_model_len"`
		}
	}
	err = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	t.Logf("GET /v1/models through the proxy: %+v", list.Data)
	if err != nil || len(list.Data) != 2 || list.Data[0].ID != "model-a" || list.Data[0].MaxModelLen != 8192 || list.Data[1].ID != "model-b" {
		t.Fatalf("GET /v1/models: %v %+v, want model-a (8192) and model-b", err, list.Data)
	}

	start := time.Now()
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(string(llmsim.ChatBody("no-such-model", "hello", 8, false))))
	req.Header.Set("Content-Type", "application/json")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	took := time.Since(start)
	var e struct {
		Error struct {
			Message, Type, Code string
		}
	}
	_ = json.Unmarshal(raw, &e)
	t.Logf("unknown model: %d in %s: %s", resp.StatusCode, took.Round(time.Millisecond), raw)
	if resp.StatusCode != 404 || e.Error.Code != "model_not_found" || !strings.Contains(e.Error.Message, "model-a, model-b") || took > time.Second {
		t.Fatalf("unknown model: got %d %s in %s", resp.StatusCode, raw, took)
	}

	before := p.Servers[1].Stats().Requests
	long := strings.Repeat("a long document ", 750) // about 3000 tokens
	for i := 0; i < 10; i++ {
		res, err := llmsim.Complete(context.Background(), http.DefaultClient, url, llmsim.ChatBody("model-a", long, 8, true))
		if err != nil || res.Status != 200 {
			t.Fatalf("long request %d: %d %v %s", i, res.Status, err, res.ErrorMessage)
		}
	}
	if got := p.Servers[1].Stats().Requests - before; got != 0 {
		t.Fatalf("the 1024-token backend got %d requests of about 3000 tokens", got)
	}
}

// TestAllDownThenOneBack: with every backend down clients get a clear
// error at once (JSON, with Retry-After), and service resumes when one
// comes back.
func TestAllDownThenOneBack(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{})
	url := aiProxy(t, tester, upstreams(p), "\t\tcircuit_breaker {\n\t\t\topen_duration 300ms\n\t\t\tmax_open_duration 1s\n\t\t}") + "/v1/chat/completions"
	drive(t, url, 10, 2, 8)
	p.Servers[0].Stop()
	p.Servers[1].Stop()
	for i := 0; i < 5; i++ {
		start := time.Now()
		req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(string(llmsim.ChatBody("", "hello", 8, true))))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		took := time.Since(start)
		var e struct {
			Error struct{ Message, Code string }
		}
		if i == 0 {
			t.Logf("all down: %d in %s, Retry-After %q: %s", resp.StatusCode, took.Round(time.Millisecond), resp.Header.Get("Retry-After"), raw)
		}
		if resp.StatusCode < 500 || json.Unmarshal(raw, &e) != nil || e.Error.Message == "" || resp.Header.Get("Retry-After") == "" || took > 2*time.Second {
			t.Fatalf("all down, request %d: %d in %s, Retry-After %q, body %q: want a JSON error with Retry-After, at once", i, resp.StatusCode, took, resp.Header.Get("Retry-After"), raw)
		}
	}
	if err := p.Servers[1].Listen(""); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	var ok bool
	for time.Since(back) < 10*time.Second {
		res, err := llmsim.Complete(context.Background(), http.DefaultClient, url, llmsim.ChatBody("", "hello", 8, true))
		if err == nil && res.Status == 200 {
			ok = true
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("one backend back: served again after %s", time.Since(back).Round(time.Millisecond))
	if !ok {
		t.Fatal("no request succeeded within 10 s of a backend coming back")
	}
	drive(t, url, 10, 2, 8)
}

// adminFetch is adminGet for goroutines that must not end the test: it
// reports a failed request as status 0.
func adminFetch(path string) (int, []byte) {
	req, _ := http.NewRequest(http.MethodGet, "http://localhost:2999"+path, nil)
	req.Header.Set("Origin", "http://localhost:2999")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, b
}
