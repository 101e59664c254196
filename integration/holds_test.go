package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// sideTraffic sends what a deployment sends through the gateway besides
// LLM work: readiness probes, model listings, a metrics scrape, a bad POST.
func sideTraffic(t *testing.T, base string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		for _, path := range []string{"/health", "/v1/models", "/metrics"} {
			res, err := http.Get(base + path)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
		res, err := http.Post(base+"/v1/chat/completions", "application/json", strings.NewReader(`{"messages": [`))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
}

// TestSideTrafficDoesNotPoison: probes and model listings sent through the
// proxy before and during the load teach the model nothing, and the fast
// backends still get at least their capacity share.
func TestSideTrafficDoesNotPoison(t *testing.T) {
	tester := caddytest.NewTester(t)
	speeds := []float64{1, 1, 0.6, 0.3}
	p := pool(t, llmsim.Speeds(speeds...)...)
	base := aiProxy(t, tester, upstreams(p), "")
	sideTraffic(t, base, 3)
	for _, a := range p.Addrs() {
		b, _ := aibalance.LookupBackend(a)
		if st := b.Stats(); st.Model.Samples != 0 {
			t.Fatalf("%s learned from side traffic: %+v", a, st.Model)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
				sideTraffic(t, base, 1)
			}
		}
	}()
	drive(t, base+"/v1/chat/completions", 240, 16, 48)
	close(stop)
	wg.Wait()
	var total int64
	done := make([]int64, len(speeds))
	for i, s := range p.Servers {
		done[i] = s.Stats().Completed
		total += done[i]
	}
	t.Logf("completed per backend (speeds %v): %v", speeds, done)
	for i := 0; i < 2; i++ { // the full-speed ones: capacity share 1/2.9 each
		if share := float64(done[i]) / float64(total); share < 0.5/2.9 {
			t.Fatalf("full-speed backend %d got %.0f%% of the traffic: starved", i, 100*share)
		}
	}
}

// TestFailingBackendsAvoided: one backend answers every request with 429 +
// Retry-After: 5, another cuts every stream half-way. Through ai_proxy no
// request fails before its first byte, the 429 backend is left alone for
// its cooldown, and the cutting one is taken out after its first failures
// (a cut stream cannot be retried: the client sees it).
func TestFailingBackendsAvoided(t *testing.T) {
	tester := caddytest.NewTester(t)
	var rejected atomic.Int64
	limited := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		if r.Method == http.MethodPost { // not the engine-metrics scraper's GET /metrics
			rejected.Add(1)
		}
		w.Header().Set("Retry-After", "5")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = io.WriteString(w, `{"error":{"message":"rate limited","type":"rate_limit_error"}}`)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = limited.Serve(ln) }()
	t.Cleanup(func() { _ = limited.Close() })
	p := pool(t, llmsim.Config{}, llmsim.Config{Faults: llmsim.Faults{CutRate: 1}}, llmsim.Config{})
	url := aiProxy(t, tester, ln.Addr().String()+" "+upstreams(p), "") + "/v1/chat/completions"
	var mu sync.Mutex
	var failed, cut int
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				body := llmsim.ChatBody("", fmt.Sprintf("request %d: hello", i), 8, true)
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				res, err := llmsim.Complete(ctx, http.DefaultClient, url, body)
				cancel()
				mu.Lock()
				switch {
				case err != nil && res.Status == 200:
					cut++ // cut after the first byte: cannot be replayed
				case err != nil || res.Status != 200:
					failed++
				}
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < 200; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	cutter := p.Servers[1].Stats().Requests
	t.Logf("200 requests from 8 clients: %d failed, %d cut; the 429 backend got %d attempts, the cutting one %d", failed, cut, rejected.Load(), cutter)
	if failed != 0 {
		t.Fatalf("%d of 200 requests failed", failed)
	}
	if rejected.Load() > 3 {
		t.Fatalf("the backend in a 5 s Retry-After cooldown got %d attempts", rejected.Load())
	}
	if cut > 4 {
		t.Fatalf("the backend that cuts every stream cut %d of 200 streams", cut)
	}
	b, _ := aibalance.LookupBackend(p.Addrs()[1])
	if st := b.Stats(); st.FailureRate < 0.5 {
		t.Fatalf("the cutting backend's failure rate is %.2f", st.FailureRate)
	}
}

// TestLateFairShare: a backend that got no concurrent traffic early (one
// request at a time) still reaches its fair share when the load rises:
// what the balancer has not observed is uncertain, not full.
func TestLateFairShare(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{})
	url := aiProxy(t, tester, upstreams(p), "") + "/v1/chat/completions"
	drive(t, url, 20, 1, 16)
	before := []int64{p.Servers[0].Stats().Completed, p.Servers[1].Stats().Completed}
	drive(t, url, 200, 24, 32)
	a := p.Servers[0].Stats().Completed - before[0]
	b := p.Servers[1].Stats().Completed - before[1]
	t.Logf("sequential phase %v; concurrent phase %d / %d", before, a, b)
	if share := float64(min(a, b)) / float64(a+b); share < 0.3 {
		t.Fatalf("equal backends under load got %d and %d: one is locked out", a, b)
	}
}

// TestDialErrorRetryKeepsBody: under another policy the transport does not
// read a body Caddy did not buffer, so a retry after a dial error sends it
// whole (a 100 KB prompt, beyond the 64 KiB peek).
func TestDialErrorRetryKeepsBody(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{MaxModelLen: 1 << 20})
	dead := fmt.Sprintf("127.0.0.1:%d", port(t))
	listen := port(t)
	tester.InitServer(fmt.Sprintf(`%s
http://127.0.0.1:%d {
	reverse_proxy %s %s {
		lb_policy first
		lb_retries 1
		fail_duration 10s
		transport aibalance
	}
}`, globals, listen, dead, upstreams(p)), "caddyfile")
	body := llmsim.ChatBody("", strings.Repeat("long prompt ", 100_000/12), 4, true)
	res, err := llmsim.Complete(context.Background(), http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), body)
	if err != nil || res.Status != 200 {
		t.Fatalf("after a dial error the retry got %d %q (%v): body lost", res.Status, res.ErrorMessage, err)
	}
}

// TestUpgradePassesThrough: a 101 Switching Protocols answer (WebSocket,
// the OpenAI Realtime API) keeps a writable body through transport aibalance.
func TestUpgradePassesThrough(t *testing.T) {
	tester := caddytest.NewTester(t)
	echo := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "want an upgrade", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		_ = brw.Flush()
		line, _ := brw.ReadString('\n')
		_, _ = brw.WriteString("echo " + line)
		_ = brw.Flush()
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = echo.Serve(ln) }()
	t.Cleanup(func() { _ = echo.Close() })
	base := aiProxy(t, tester, ln.Addr().String(), "")
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade answer %v, %v", res, err)
	}
	fmt.Fprintf(conn, "ping\n")
	got, err := br.ReadString('\n')
	if err != nil || got != "echo ping\n" {
		t.Fatalf("through the upgraded connection got %q, %v", got, err)
	}
}
