// Package integration runs a real Caddy (in process, through caddytest) with
// the plugin in front of simulated LLM engines.
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
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/aibalance/caddy-aibalance"
	"github.com/aibalance/caddy-aibalance/internal/harness"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

const globals = `{
	admin localhost:2999
	skip_install_trust
	http_port 9080
	https_port 9443
	grace_period 1s
	log {
		level ERROR
	}
}
`

func port(t *testing.T) int {
	t.Helper()
	p, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func pool(t *testing.T, cfgs ...llmsim.Config) *llmsim.Pool {
	t.Helper()
	p, err := llmsim.StartPool(cfgs...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// drive sends n streaming chat requests from `workers` concurrent clients
// and fails the test on any error.
func drive(t *testing.T, url string, n, workers, maxTokens int) []llmsim.Result {
	t.Helper()
	var mu sync.Mutex
	var out []llmsim.Result
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				body := llmsim.ChatBody("", fmt.Sprintf("request %d: %s", i, strings.Repeat("tell me more ", 40)), maxTokens, true)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				res, err := llmsim.Complete(ctx, http.DefaultClient, url, body)
				cancel()
				mu.Lock()
				if err != nil || res.Status != 200 {
					t.Errorf("request %d: %v status %d %s", i, err, res.Status, res.ErrorMessage)
				}
				out = append(out, res)
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < n; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	return out
}

func upstreams(p *llmsim.Pool) string { return strings.Join(p.Addrs(), " ") }

// aiProxy loads a config with one site, on a fresh loopback port, that runs
// `ai_proxy <upstreams>` (with block, if not empty, as its block), and
// returns the site's base URL.
func aiProxy(t *testing.T, tester *caddytest.Tester, upstreams, block string) string {
	t.Helper()
	listen := port(t)
	if block != "" {
		block = " {\n" + block + "\n\t}"
	}
	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\tai_proxy %s%s\n}", globals, listen, upstreams, block), "caddyfile")
	return fmt.Sprintf("http://127.0.0.1:%d", listen)
}
