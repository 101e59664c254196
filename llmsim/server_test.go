package llmsim

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func start(t *testing.T, cfg Config) *Server {
	t.Helper()
	s, err := Start(cfg, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

func chat(t *testing.T, s *Server, content string, maxTokens int) Result {
	t.Helper()
	res, err := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", content, maxTokens, true))
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != 200 {
		t.Fatalf("status %d: %s", res.Status, res.ErrorMessage)
	}
	return res
}

// meanE2E runs n concurrent requests and returns their mean completion time.
func meanE2E(t *testing.T, s *Server, n, tokens int) time.Duration {
	t.Helper()
	var mu sync.Mutex
	var sum time.Duration
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", strings.Repeat("x", 400), tokens, true))
			if err != nil || res.Status != 200 {
				t.Errorf("request: %v %d", err, res.Status)
				return
			}
			mu.Lock()
			sum += res.E2E
			mu.Unlock()
		}()
	}
	wg.Wait()
	return sum / time.Duration(n)
}

func TestLatencyGrowsWithLoad(t *testing.T) {
	s := start(t, Config{MaxRunning: 4})
	light := meanE2E(t, s, 1, 20)
	heavy := meanE2E(t, s, 12, 20) // 4 slots: most requests queue
	t.Logf("mean E2E: 1 request %v, 12 concurrent %v", light, heavy)
	if heavy < 2*light {
		t.Fatalf("12 concurrent requests on 4 slots took %v on average, want at least twice the single request's %v", heavy, light)
	}
}

func TestPrefixCacheHit(t *testing.T) {
	s := start(t, Config{PrefillPerToken: 200 * time.Microsecond})
	prompt := strings.Repeat("The quick brown fox jumps over the lazy dog. ", 200) // ~2250 tokens
	first := chat(t, s, prompt, 2)
	hitsBefore := s.Stats().CachedTokens
	second := chat(t, s, prompt, 2)
	st := s.Stats()
	t.Logf("TTFT cold %v, warm %v; cached tokens %d of %d", first.TTFT, second.TTFT, st.CachedTokens, st.PromptTokens)
	if st.CachedTokens <= hitsBefore {
		t.Fatalf("cached tokens did not rise: %d then %d", hitsBefore, st.CachedTokens)
	}
	if second.TTFT >= first.TTFT/2 {
		t.Fatalf("warm TTFT %v is not well below cold TTFT %v", second.TTFT, first.TTFT)
	}
}

func TestSpeedFactor(t *testing.T) {
	fast := start(t, Config{Speed: 1})
	slow := start(t, Config{Speed: 0.25})
	f := meanE2E(t, fast, 4, 30)
	sl := meanE2E(t, slow, 4, 30)
	ratio := float64(sl) / float64(f)
	t.Logf("speed 1: %v, speed 0.25: %v, ratio %.2f", f, sl, ratio)
	if ratio < 2.5 || ratio > 6 {
		t.Fatalf("a 4x slower engine was %.2fx slower, want about 4x", ratio)
	}
}

func TestMetricsParse(t *testing.T) {
	s := start(t, Config{})
	chat(t, s, "hello", 3)
	fams := metricFamilies(t, s)
	for _, name := range []string{
		"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
		"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
		"vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:cache_config_info",
	} {
		fam, ok := fams[name]
		if !ok {
			t.Errorf("metric %s missing", name)
			continue
		}
		found := false
		for _, l := range fam.GetMetric()[0].GetLabel() {
			if l.GetName() == "model_name" && l.GetValue() == DefaultConfig.Model {
				found = true
			}
		}
		if !found {
			t.Errorf("metric %s has no model_name label", name)
		}
	}
	if got := fams["vllm:e2e_request_latency_seconds"].GetMetric()[0].GetHistogram().GetSampleCount(); got != 1 {
		t.Errorf("e2e histogram count %d, want 1", got)
	}
}

func TestStreamFormat(t *testing.T) {
	s := start(t, Config{})
	res := chat(t, s, "hello", 7)
	if res.Tokens != 7 || res.UsageTokens != 7 || !res.Done {
		t.Fatalf("got %+v, want 7 content chunks, usage 7, [DONE]", res)
	}
	// completions endpoint, non-streaming
	r, err := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/completions", []byte(`{"prompt":"once upon","max_tokens":4}`))
	if err != nil || r.Status != 200 || r.UsageTokens != 4 {
		t.Fatalf("completion: %v %+v", err, r)
	}
}

func TestBadInput(t *testing.T) {
	s := start(t, Config{MaxModelLen: 100})
	for _, tc := range []struct {
		name, path, body string
		status           int
	}{
		{"bad json", "/v1/chat/completions", `{"messages": [`, 400},
		{"not an object", "/v1/chat/completions", `[1,2]`, 400},
		{"no messages", "/v1/chat/completions", `{"max_tokens":3}`, 400},
		{"no prompt", "/v1/completions", `{"max_tokens":3}`, 400},
		{"unknown model", "/v1/chat/completions", `{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}`, 404},
		{"context too long", "/v1/chat/completions", `{"messages":[{"role":"user","content":"x"}],"max_tokens":500}`, 400},
		{"zero max_tokens", "/v1/chat/completions", `{"messages":[{"role":"user","content":"x"}],"max_tokens":0}`, 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := Complete(context.Background(), http.DefaultClient, s.URL()+tc.path, []byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if r.Status != tc.status || r.ErrorMessage == "" {
				t.Fatalf("got %d %q, want %d with an error message", r.Status, r.ErrorMessage, tc.status)
			}
		})
	}
}

func TestFaults(t *testing.T) {
	t.Run("error rate", func(t *testing.T) {
		s := start(t, Config{Faults: Faults{ErrorRate: 1}})
		r, _ := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", "x", 2, true))
		if r.Status != 500 {
			t.Fatalf("status %d, want 500", r.Status)
		}
	})
	t.Run("429 above queue", func(t *testing.T) {
		s := start(t, Config{MaxRunning: 1, Faults: Faults{RejectAboveQueue: 1, RetryAfter: 3 * time.Second}})
		var wg sync.WaitGroup
		var mu sync.Mutex
		statuses := map[int]int{}
		retryAfter := ""
		for i := 0; i < 6; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", "x", 30, true))
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				statuses[r.Status]++
				if r.Status == 429 {
					retryAfter = r.RetryAfter
				}
				mu.Unlock()
			}()
		}
		wg.Wait()
		if statuses[429] == 0 || statuses[200] == 0 || retryAfter != "3" {
			t.Fatalf("statuses %v, Retry-After %q; want some 200 and some 429 with Retry-After 3", statuses, retryAfter)
		}
	})
	t.Run("stopped refuses connections", func(t *testing.T) {
		s := start(t, Config{})
		s.Stop()
		_, err := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", "x", 2, true))
		// a connect racing the listener's close may be reset instead of refused
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("err %v, want connection refused", err)
		}
		if err := s.Listen(""); err != nil {
			t.Fatal(err)
		}
		chat(t, s, "back", 2)
	})
	t.Run("stream cut", func(t *testing.T) {
		s := start(t, Config{Faults: Faults{CutRate: 1}})
		r, err := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", "x", 10, true))
		if err == nil || r.Tokens != 5 {
			t.Fatalf("err %v after %d tokens, want an error after 5", err, r.Tokens)
		}
	})
	t.Run("hang", func(t *testing.T) {
		s := start(t, Config{Faults: Faults{HangRate: 1}})
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_, err := Complete(ctx, http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", "x", 2, true))
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err %v, want the client's deadline", err)
		}
	})
	t.Run("slow start-up", func(t *testing.T) {
		s := start(t, Config{Faults: Faults{StartupDelay: 300 * time.Millisecond}})
		resp, err := http.Get(s.URL() + "/health")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 503 {
			t.Fatalf("health during start-up: %d, want 503", resp.StatusCode)
		}
		time.Sleep(350 * time.Millisecond)
		chat(t, s, "ready", 2)
	})
}

func TestCapacityMatchesSaturation(t *testing.T) {
	cfg := Config{MaxRunning: 8}
	capacity := cfg.Capacity(100, 40)
	s := start(t, cfg)
	// keep the engine full for a while and count completions
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				_, _ = Complete(ctx, http.DefaultClient, s.URL()+"/v1/chat/completions", ChatBody("", strings.Repeat("y", 400), 40, true))
			}
		}()
	}
	wg.Wait()
	got := float64(s.Stats().Completed) / 3
	t.Logf("estimated capacity %.1f req/s, measured %.1f req/s", capacity, got)
	if got < capacity*0.5 || got > capacity*1.3 {
		t.Fatalf("measured %.1f req/s, estimate %.1f", got, capacity)
	}
}
