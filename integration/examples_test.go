package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/examples/quickstart"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// localize points an example at the simulated pool and a free port.
func localize(cfg string, p *llmsim.Pool, listen int) string {
	for i, a := range p.Addrs() {
		cfg = strings.ReplaceAll(cfg, fmt.Sprintf("127.0.0.1:%d", 8001+i), a)
	}
	return strings.ReplaceAll(cfg, ":8080", fmt.Sprintf("127.0.0.1:%d", listen))
}

// startExample runs an example config in front of a heterogeneous simulated
// pool and returns its chat completions URL. Caddyfile sites get the test's
// global options and plain HTTP; JSON gets the test's admin address.
func startExample(t *testing.T, cfg, adapter string) string {
	t.Helper()
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Speeds(1, 1, 0.6, 0.3)...)
	listen := port(t)
	cfg = localize(cfg, p, listen)
	site := fmt.Sprintf("127.0.0.1:%d", listen)
	if adapter == "caddyfile" {
		cfg = globals + strings.Replace(cfg, site+" {", "http://"+site+" {", 1)
	} else {
		cfg = strings.Replace(cfg, `"apps": {`, `"admin": {"listen": "localhost:2999"}, "apps": {`, 1)
	}
	tester.InitServer(cfg, adapter)
	return "http://" + site + "/v1/chat/completions"
}

func readExample(t *testing.T, path string) string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

// TestQuickstartStreams starts the quickstart example in front of simulated
// engines and reads streamed completions through it as an OpenAI client.
func TestQuickstartStreams(t *testing.T) {
	url := startExample(t, quickstart.Caddyfile, "caddyfile")
	for _, r := range drive(t, url, 24, 6, 12) {
		if r.Tokens != 12 || r.UsageTokens != 12 || !r.Done {
			t.Fatalf("streamed %d tokens, usage %d, done %v; want 12, 12, true", r.Tokens, r.UsageTokens, r.Done)
		}
	}
	// bad input passes through to the engine and its error comes back
	r, err := llmsim.Complete(context.Background(), http.DefaultClient, url, []byte(`{"messages": [`))
	if err != nil || r.Status != 400 || r.ErrorMessage == "" {
		t.Fatalf("bad JSON through the proxy: %v %d %q", err, r.Status, r.ErrorMessage)
	}
}

// TestLongFormExample starts the long-form example (reverse_proxy +
// lb_policy ai_predictive + transport aibalance).
func TestLongFormExample(t *testing.T) {
	url := startExample(t, readExample(t, "../examples/longform/Caddyfile"), "caddyfile")
	for _, r := range drive(t, url, 12, 4, 6) {
		if r.Tokens != 6 {
			t.Fatalf("streamed %d tokens, want 6", r.Tokens)
		}
	}
}

// TestJSONExample loads the pure JSON example.
func TestJSONExample(t *testing.T) {
	url := startExample(t, readExample(t, "../examples/json/caddy.json"), "json")
	drive(t, url, 8, 4, 5)
}

// TestAIProxyFailsOver: one engine of the pool is down (connections refused).
// ai_proxy's defaults (dial errors retried, passive health checks) serve
// every request from the others.
func TestAIProxyFailsOver(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Speeds(1, 1, 1)...)
	p.Servers[0].Stop()
	listen := port(t)
	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\tai_proxy %s\n}", globals, listen, upstreams(p)), "caddyfile")
	drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), 30, 6, 4)
	st := 0
	for _, s := range p.Servers[1:] {
		st += int(s.Stats().Completed)
	}
	if st != 30 {
		t.Fatalf("the live engines completed %d of 30 requests", st)
	}
}
