package integration

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/healthcheck"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// The failure suite: each test runs streaming load through a real Caddy
// into simulated engines while one of them misbehaves, and logs its
// figures (go test -v -run 'Cutting|Flapping|Reload' ./integration).
// Killing one of four at peak is TestKillOneOfFour, all down then one back
// TestAllDownThenOneBack, a hanging backend TestHangingBackend.

// TestCuttingBackend: one engine of three cuts half its streams mid-way.
// A cut stream cannot be retried (the client has its first tokens), so
// each one is the client's; the balancer's part is to stop sending to
// that engine: its breaker opens on the failure rate and it gets a small
// share of the rest.
func TestCuttingBackend(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{Faults: llmsim.Faults{CutRate: 0.5}}, llmsim.Config{}, llmsim.Config{})
	url := aiProxy(t, tester, upstreams(p), "") + "/v1/chat/completions"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out := runLoad(ctx, url, 6, 16, "")
	failed, cut := countFailed(out)
	bad := p.Servers[0].Stats()
	share := float64(bad.Requests) / float64(len(out))
	t.Logf("%d requests, %d failed otherwise, %d streams cut by the cutting engine; it received %d requests (%.0f%% of all, fair share 33%%) and cut %d",
		len(out), failed, cut, bad.Requests, 100*share, bad.Cut)
	if failed != 0 {
		t.Fatalf("%d requests failed other than by a cut", failed)
	}
	if share > 0.15 {
		t.Fatalf("the cutting engine still got %.0f%% of the requests", 100*share)
	}
}

// TestFlappingBackend: one engine of four goes down and up every 500 ms.
// Refused attempts are retried elsewhere, so no client sees a failure
// but the streams the engine was serving when it went down; and the
// balancer does not thrash: the flapping engine's share stays below its
// fair share while the others serve.
func TestFlappingBackend(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{}, llmsim.Config{}, llmsim.Config{})
	url := aiProxy(t, tester, upstreams(p), "") + "/v1/chat/completions"
	flap := p.Servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	flips := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			time.Sleep(500 * time.Millisecond)
			flap.Stop()
			flips++
			time.Sleep(500 * time.Millisecond)
			if err := flap.Listen(""); err != nil {
				t.Errorf("restarting: %v", err)
				return
			}
		}
	}()
	out := runLoad(ctx, url, 8, 16, "")
	wg.Wait()
	failed, cut := countFailed(out)
	mine := 0
	for _, o := range out {
		if o.backend == flap.Addr() {
			mine++
		}
	}
	b := backendOf(t, flap.Addr())
	st := b.Stats()
	state := "?"
	if br := healthcheck.Of(b); br != nil {
		state = fmt.Sprint(br.Status(time.Now()).State)
	}
	t.Logf("%d requests, %d failed, %d streams cut when the engine went down; %d down/up cycles; the flapping engine served %d (%.0f%%, fair share 25%%), refused %d attempts (retried elsewhere); breaker now %s",
		len(out), failed, cut, flips, mine, 100*float64(mine)/float64(len(out)), st.DialErrors, state)
	if failed != 0 {
		for _, o := range out {
			if o.failed() {
				t.Logf("failed: %d %v", o.status, o.err)
			}
		}
		t.Fatalf("%d requests failed", failed)
	}
	if float64(mine) > 0.25*float64(len(out)) {
		t.Fatalf("the flapping engine got %d of %d requests: more than its fair share", mine, len(out))
	}
}

// TestReloadUnderLoad: two sites in one config, in front of the same
// engines: ai_proxy, and stock Caddy's reverse_proxy (least_conn). The
// config is reloaded every second, alternating weights and a fourth
// backend, while both take streaming load. The plugin loses no more than
// stock Caddy, and its learned state survives every reload.
func TestReloadUnderLoad(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{}, llmsim.Config{}, llmsim.Config{})
	a := p.Addrs()
	ours, stock := port(t), port(t)
	config := func(i int) string {
		ups := strings.Join(a[:3], " ")
		weights := "3 1 1"
		if i%2 == 1 {
			ups, weights = strings.Join(a, " "), "1 3 1 1"
		}
		return fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\tai_proxy %s {\n\t\tweights %s\n\t}\n}\nhttp://127.0.0.1:%d {\n\treverse_proxy %s {\n\t\tlb_policy least_conn\n\t\tflush_interval -1\n\t}\n}\n",
			globals, ours, ups, weights, stock, ups)
	}
	tester.InitServer(config(0), "caddyfile")
	drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", ours), 12, 3, 8)
	samples := func() int64 {
		n := int64(0)
		for _, addr := range a[:3] {
			n += backendOf(t, addr).Stats().Model.Samples
		}
		return n
	}
	before := samples()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 7*time.Second)
	defer cancel()
	// each request on a new connection: a keep-alive connection the old
	// server closes at a reload fails a request before it reaches any
	// handler, Caddy's or ours (clients retry those; SDKs do)
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	var wg sync.WaitGroup
	var oursOut, stockOut []outcome
	wg.Add(2)
	go func() {
		defer wg.Done()
		oursOut = runLoadWith(ctx, client, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", ours), 6, 24, "")
	}()
	go func() {
		defer wg.Done()
		stockOut = runLoadWith(ctx, client, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", stock), 6, 24, "")
	}()
	reloads := 0
	var monotonic = true
	for i := 1; ctx.Err() == nil; i++ {
		time.Sleep(time.Second)
		if ctx.Err() != nil {
			break
		}
		prev := samples()
		tester.InitServer(config(i), "caddyfile")
		reloads++
		if samples() < prev {
			monotonic = false
		}
	}
	wg.Wait()
	of, oc := countFailed(oursOut)
	sf, sc := countFailed(stockOut)
	after := samples()
	t.Logf("%d reloads in 7 s; ai_proxy: %d requests, %d failed, %d cut; stock reverse_proxy: %d requests, %d failed, %d cut; learned samples %d before the load, %d after (kept: %v)",
		reloads, len(oursOut), of, oc, len(stockOut), sf, sc, before, after, monotonic)
	for name, out := range map[string][]outcome{"ai_proxy": oursOut, "stock": stockOut} {
		for _, o := range out {
			if o.failed() || o.cut {
				t.Logf("%s: failed at +%s: status %d, %v", name, o.start.Sub(start).Round(time.Millisecond), o.status, o.err)
			}
		}
	}
	// a reload can drop a request on either site at random (a connection
	// the old server accepted as it stopped): a handful either way is
	// noise, a systematic loss is not
	if of+oc > sf+sc+2 {
		t.Fatalf("ai_proxy lost %d requests to reloads, stock Caddy %d", of+oc, sf+sc)
	}
	if !monotonic || after <= before {
		t.Fatalf("learned state lost across reloads: %d samples before, %d after", before, after)
	}
	if reloads < 5 {
		t.Fatalf("only %d reloads", reloads)
	}
}
