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
func localize(t *testing.T, cfg string, p *llmsim.Pool, listen int) string {
	for i, a := range p.Addrs() {
		cfg = strings.ReplaceAll(cfg, fmt.Sprintf("127.0.0.1:%d", 8001+i), a)
	}
	return strings.ReplaceAll(cfg, ":8080", fmt.Sprintf("127.0.0.1:%d", listen))
}

// TestQuickstartStreams starts the quickstart example in front of simulated
// engines and reads streamed completions through it as an OpenAI client.
func TestQuickstartStreams(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Speeds(1, 1, 0.6, 0.3)...)
	listen := port(t)
	cfg := localize(t, quickstart.Caddyfile, p, listen)
	tester.InitServer(globals+strings.Replace(cfg, fmt.Sprintf("127.0.0.1:%d {", listen), fmt.Sprintf("http://127.0.0.1:%d {", listen), 1), "caddyfile")
	res := drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), 24, 6, 12)
	for _, r := range res {
		if r.Tokens != 12 || r.UsageTokens != 12 || !r.Done {
			t.Fatalf("streamed %d tokens, usage %d, done %v; want 12, 12, true", r.Tokens, r.UsageTokens, r.Done)
		}
	}
	// bad input passes through to the engine and its error comes back
	r, err := llmsim.Complete(context.Background(), http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), []byte(`{"messages": [`))
	if err != nil || r.Status != 400 || r.ErrorMessage == "" {
		t.Fatalf("bad JSON through the proxy: %v %d %q", err, r.Status, r.ErrorMessage)
	}
}

// TestLongFormExample starts the long-form example (reverse_proxy +
// lb_policy ai_predictive + transport aibalance) in front of simulated engines.
func TestLongFormExample(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Speeds(1, 1, 0.6, 0.3)...)
	listen := port(t)
	raw, err := os.ReadFile("../examples/longform/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	cfg := localize(t, string(raw), p, listen)
	tester.InitServer(globals+strings.Replace(cfg, fmt.Sprintf("127.0.0.1:%d {", listen), fmt.Sprintf("http://127.0.0.1:%d {", listen), 1), "caddyfile")
	for _, r := range drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), 12, 4, 6) {
		if r.Tokens != 6 {
			t.Fatalf("streamed %d tokens, want 6", r.Tokens)
		}
	}
}

// TestJSONExample loads the pure JSON example in front of simulated engines.
func TestJSONExample(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Speeds(1, 1, 1, 1)...)
	listen := port(t)
	raw, err := os.ReadFile("../examples/json/caddy.json")
	if err != nil {
		t.Fatal(err)
	}
	cfg := localize(t, string(raw), p, listen)
	cfg = strings.Replace(cfg, `"apps": {`, `"admin": {"listen": "localhost:2999"}, "apps": {`, 1)
	tester.InitServer(cfg, "json")
	drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), 8, 4, 5)
}
