package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
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
func chatTurns(t *testing.T, url string, conversations, turns, workers int) (sticky float64) {
	t.Helper()
	var same, later int
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
					{"role": "system", "content": fmt.Sprintf("You are assistant %d.", c)},
					{"role": "user", "content": fmt.Sprintf("conversation %d: read this and tell me about it. ", c) + strings.Repeat("A document about load balancing. ", 12)},
				}
				prev := ""
				for turn := 0; turn < turns; turn++ {
					body, _ := json.Marshal(map[string]any{"messages": msgs, "max_tokens": 8, "stream": true})
					res, err := llmsim.Complete(context.Background(), http.DefaultClient, url, body)
					mu.Lock()
					if err != nil || res.Status != 200 {
						failed++
					}
					if turn > 0 {
						later++
						if res.Backend == prev {
							same++
						}
					}
					mu.Unlock()
					prev = res.Backend
					// the user reads the answer: other users' requests
					// come in between, as in an open system
					time.Sleep(time.Duration(50+rand.IntN(250)) * time.Millisecond)
					msgs = append(msgs,
						map[string]string{"role": "assistant", "content": strings.Repeat("w ", 8)},
						map[string]string{"role": "user", "content": fmt.Sprintf("turn %d: and this one? ", turn) + strings.Repeat("Another page of the document. ", 12)})
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
	return float64(same) / float64(max(later, 1))
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
	cfg := llmsim.Config{PrefillPerToken: 400 * time.Microsecond}
	rates := map[string]float64{}
	for _, policy := range []string{"least_conn", "ai_predictive"} {
		p := pool(t, cfg, cfg, cfg, cfg)
		block := "\t\t" + upstreamHeader
		if policy == "least_conn" {
			block += "\n\t\tlb_policy least_conn"
		}
		url := aiProxy(t, tester, upstreams(p), block) + "/v1/chat/completions"
		sticky := chatTurns(t, url, 32, 6, 16)
		rates[policy] = hitRate(p)
		var served []int64
		for _, s := range p.Servers {
			served = append(served, s.Stats().Completed)
		}
		t.Logf("%s: prefix cache hit rate %.2f, %.0f%% of later turns on the previous turn's engine, requests per engine %v", policy, rates[policy], 100*sticky, served)
		if policy == "ai_predictive" {
			for i, n := range served {
				if n < 10 {
					t.Fatalf("engine %d served %d of 192 requests: affinity must stay bounded by load", i, n)
				}
			}
		}
	}
	// measured 1.4–1.5× on this machine; the 2× target is for the
	// benchmark's chat workload and is not met yet
	if rates["ai_predictive"] < 1.2*rates["least_conn"] {
		t.Fatalf("hit rate %.2f with prefix affinity, %.2f with least_conn: want at least 1.2×", rates["ai_predictive"], rates["least_conn"])
	}
}

// respond posts a Responses API request continuing prev ("" for a new
// one) and returns its status, its id and the affinity header.
func respond(t *testing.T, url, prev string, stream bool) (int, string, string) {
	t.Helper()
	req := map[string]any{"input": "and then?", "max_output_tokens": 8, "stream": stream}
	if prev != "" {
		req["previous_response_id"] = prev
	}
	body, _ := json.Marshal(req)
	res, err := http.Post(url, "application/json", strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var id string
	if stream {
		// the first event carries the response object
		if i := strings.Index(string(raw), `"id":"resp_`); i >= 0 {
			rest := string(raw[i+6:])
			id = rest[:strings.IndexByte(rest, '"')]
		}
	} else {
		var r struct{ ID string }
		_ = json.Unmarshal(raw, &r)
		id = r.ID
	}
	return res.StatusCode, id, res.Header.Get("X-Aibalance-Affinity")
}

// TestStatefulResponses: a chain of 20 Responses requests, each naming the
// previous one's id, reaches the backend that stored it every time
// (another backend answers 404: it does not know the history); when that
// backend dies the next request goes elsewhere and its answer says so.
func TestStatefulResponses(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{}, llmsim.Config{})
	// affinity none: only the learned owner keeps the chain together
	url := aiProxy(t, tester, upstreams(p), "\t\t"+upstreamHeader+"\n\t\taffinity none") + "/v1/responses"
	prev := ""
	for turn := 0; turn < 20; turn++ {
		status, id, lost := respond(t, url, prev, turn%2 == 0)
		if status != 200 || id == "" || lost != "" {
			t.Fatalf("turn %d: %d, id %q, affinity %q", turn, status, id, lost)
		}
		prev = id
	}
	var owner *llmsim.Server
	for _, s := range p.Servers {
		if st := s.Stats(); st.BadRequests != 0 {
			t.Fatalf("a backend was asked for a response it does not store (%d times)", st.BadRequests)
		}
		if s.Stats().Completed >= 19 {
			owner = s
		}
	}
	if owner == nil {
		t.Fatal("the chain was not served by one backend")
	}
	owner.Stop()
	status, _, lost := respond(t, url, prev, false)
	t.Logf("20 turns on one backend; after it died: %d, X-Aibalance-Affinity %q", status, lost)
	if lost == "" {
		t.Fatalf("the owner died: answer %d without saying the affinity was lost", status)
	}
	if status, id, _ := respond(t, url, "", false); status != 200 || id == "" {
		t.Fatalf("a new chain after the owner died: %d", status)
	}
	// an id this balancer never saw (another instance stored it): the
	// answer says the owner is unknown
	if status, _, aff := respond(t, url, "resp_stored_elsewhere", false); !strings.HasPrefix(aff, "unknown:") {
		t.Fatalf("a response id from elsewhere: %d, X-Aibalance-Affinity %q", status, aff)
	}
}
