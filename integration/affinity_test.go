package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/llmsim"
)

// chatTurns runs conversations against url: each has its own long opening
// (a system prompt and a first question), then turns whose history grows,
// every turn sending the whole history, as chat clients do. workers
// conversations run at once, each turn after the previous answer.
func chatTurns(t *testing.T, url string, conversations, turns, workers int) {
	t.Helper()
	jobs := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range jobs {
				msgs := []map[string]string{
					{"role": "system", "content": fmt.Sprintf("You are assistant %d. ", c) + strings.Repeat("Follow the house style guide closely. ", 60)},
					{"role": "user", "content": fmt.Sprintf("conversation %d: tell me about load balancing", c)},
				}
				for turn := 0; turn < turns; turn++ {
					body, _ := json.Marshal(map[string]any{"messages": msgs, "max_tokens": 8, "stream": true})
					res, err := llmsim.Complete(context.Background(), http.DefaultClient, url, body)
					if err != nil || res.Status != 200 {
						mu.Lock()
						failed++
						mu.Unlock()
					}
					msgs = append(msgs,
						map[string]string{"role": "assistant", "content": strings.Repeat("w ", 8)},
						map[string]string{"role": "user", "content": fmt.Sprintf("turn %d: and then?", turn)})
				}
			}
		}()
	}
	for c := 0; c < conversations; c++ {
		jobs <- c
	}
	close(jobs)
	wg.Wait()
	if failed > 0 {
		t.Fatalf("%d chat requests failed", failed)
	}
}

// hitRate is the share of the prompt tokens the pool's engines found in
// their prefix caches.
func hitRate(p *llmsim.Pool) float64 {
	var cached, prompt int64
	for _, s := range p.Servers {
		st := s.Stats()
		cached += st.CachedTokens
		prompt += st.PromptTokens
	}
	if prompt == 0 {
		return 0
	}
	return float64(cached) / float64(prompt)
}

// TestPrefixAffinityHitRate: multi-turn conversations through ai_proxy
// (prefix affinity, the default) find their history in the engines' prefix
// caches far more often than under Caddy's least_conn, and no engine is
// left idle.
func TestPrefixAffinityHitRate(t *testing.T) {
	tester := caddytest.NewTester(t)
	cfg := llmsim.Config{CacheBlocks: 400, PrefillPerToken: 400 * time.Microsecond}
	rates := map[string]float64{}
	for _, policy := range []string{"least_conn", "ai_predictive"} {
		p := pool(t, cfg, cfg, cfg, cfg)
		block := ""
		if policy == "least_conn" {
			block = "\t\tlb_policy least_conn"
		}
		url := aiProxy(t, tester, upstreams(p), block) + "/v1/chat/completions"
		chatTurns(t, url, 32, 6, 16)
		rates[policy] = hitRate(p)
		var served []int64
		for _, s := range p.Servers {
			served = append(served, s.Stats().Completed)
		}
		t.Logf("%s: prefix cache hit rate %.2f, requests per engine %v", policy, rates[policy], served)
		if policy == "ai_predictive" {
			for i, n := range served {
				if n < 10 {
					t.Fatalf("engine %d served %d of 192 requests: affinity must stay bounded by load", i, n)
				}
			}
		}
	}
	if rates["ai_predictive"] < 1.5*rates["least_conn"] {
		t.Fatalf("hit rate %.2f with prefix affinity, %.2f with least_conn: want at least 1.5×", rates["ai_predictive"], rates["least_conn"])
	}
}

var _ = bytes.NewReader
