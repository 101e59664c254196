package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// slowShare runs the same workload through policy and returns the share of
// requests the slow backend (the last one) served.
func slowShare(t *testing.T, tester *caddytest.Tester, policy string) float64 {
	p := pool(t, llmsim.Config{Speed: 1}, llmsim.Config{Speed: 1.0 / 3})
	listen := port(t)
	tester.InitServer(fmt.Sprintf(`%s
http://127.0.0.1:%d {
	reverse_proxy %s {
		lb_policy %s
		transport aibalance
		flush_interval -1
	}
}`, globals, listen, upstreams(p), policy), "caddyfile")
	drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), 120, 8, 24)
	fast, slow := p.Servers[0].Stats().Completed, p.Servers[1].Stats().Completed
	share := float64(slow) / float64(fast+slow)
	t.Logf("%s: fast %d, slow %d (%.0f%%)", policy, fast, slow, 100*share)
	return share
}

func TestSlowBackendGetsLessTraffic(t *testing.T) {
	tester := caddytest.NewTester(t)
	rr := slowShare(t, tester, "round_robin")
	ai := slowShare(t, tester, "ai_predictive")
	if ai > rr-0.15 {
		t.Fatalf("3x slower backend served %.0f%% under ai_predictive and %.0f%% under round_robin: want clearly less", 100*ai, 100*rr)
	}
}

func TestUnavailableUpstreamsSkipped(t *testing.T) {
	tester := caddytest.NewTester(t)
	// the second engine is still "starting": its /health answers 503
	p := pool(t, llmsim.Config{}, llmsim.Config{Faults: llmsim.Faults{StartupDelay: 1 << 40}}, llmsim.Config{})
	listen := port(t)
	for _, policy := range []string{"ai_predictive", "least_tokens", "weighted_least_conn 1 5 1"} {
		tester.InitServer(fmt.Sprintf(`%s
http://127.0.0.1:%d {
	reverse_proxy %s {
		lb_policy %s
		transport aibalance
		health_uri /health
		health_interval 50ms
		health_passes 1
		health_fails 1
	}
}`, globals, listen, upstreams(p), policy), "caddyfile")
		waitFor(t, func() bool { return p.Servers[1].Stats().Requests == 0 && healthChecked(p) })
		// the probes counted may be the old config's: a new config's
		// upstreams start healthy until its own checker ran
		time.Sleep(200 * time.Millisecond)
		before := p.Servers[1].Stats().Requests
		drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), 30, 4, 4)
		if got := p.Servers[1].Stats().Requests - before; got != 0 {
			t.Fatalf("%s: the unhealthy upstream got %d requests", policy, got)
		}
	}
}

func TestTransportMeasures(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{})
	listen := port(t)
	tester.InitServer(fmt.Sprintf(`%s
http://127.0.0.1:%d {
	reverse_proxy %s {
		transport aibalance
		request_buffers 1MiB
		health_uri /health
		health_interval 50ms
	}
}`, globals, listen, upstreams(p)), "caddyfile")
	res := drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), 20, 4, 9)
	for _, r := range res {
		if r.Tokens != 9 {
			t.Fatalf("client got %d tokens through the proxy, want 9", r.Tokens)
		}
	}
	b, ok := aibalance.LookupBackend(p.Addrs()[0])
	if !ok {
		t.Fatal("no store entry for the upstream")
	}
	st := b.Stats()
	t.Logf("store: %+v", st)
	// health checks ran all along but are not user traffic
	if st.Requests != 20 || st.Status2xx != 20 || st.OutputTokens != 180 || st.Inflight != 0 || st.InflightTokens != 0 {
		t.Fatalf("store counted %d requests, %d 2xx, %d output tokens, %d/%d in flight; want 20, 20, 180, 0/0",
			st.Requests, st.Status2xx, st.OutputTokens, st.Inflight, st.InflightTokens)
	}
	if st.Model.Samples != 20 {
		t.Fatalf("model trained on %d samples, want 20", st.Model.Samples)
	}
}
