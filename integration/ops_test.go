package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// adminSend sends body with method to the admin endpoint.
func adminSend(t *testing.T, method, path, body string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://localhost:2999"+path, strings.NewReader(body))
	req.Header.Set("Origin", "http://localhost:2999")
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, b
}

// upstreamView fetches the admin view of one upstream.
func upstreamView(t *testing.T, addr string) aibalance.UpstreamView {
	t.Helper()
	status, body := adminGet(t, http.MethodGet, "/aibalance/upstreams/"+addr)
	var v aibalance.UpstreamView
	if status != 200 || json.Unmarshal(body, &v) != nil {
		t.Fatalf("GET %s: %d %s", addr, status, body)
	}
	return v
}

// shares sends n short requests, workers at a time, and counts them by the
// backend that answered.
func shares(t *testing.T, url string, n, workers int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, r := range drive(t, url, n, workers, 4) {
		out[r.Backend]++
	}
	return out
}

// TestAdminDrainAndWeight: PATCH drain stops new requests to an upstream
// while those in flight finish (the view shows draining, then drained);
// drain false brings it back; a weight shifts the distribution; both
// survive a config reload; bad calls get 400/404/405 with a JSON error.
func TestAdminDrainAndWeight(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{}, llmsim.Config{})
	addrs := p.Addrs()
	t.Cleanup(func() {
		for _, a := range addrs {
			aibalance.SetOverride(a, func(o *aibalance.Override) { *o = aibalance.Override{} })
		}
	})
	block := "\t\t" + upstreamHeader
	url := aiProxy(t, tester, upstreams(p), block) + "/v1/chat/completions"
	drive(t, url, 12, 3, 4)

	// long streams in flight on every backend, then drain the first
	var wg sync.WaitGroup
	var mu sync.Mutex
	var long []llmsim.Result
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := llmsim.Complete(ctx, http.DefaultClient, url, llmsim.ChatBody("", fmt.Sprintf("long %d", i), 300, true))
			if err != nil {
				res.Status = -1
			}
			mu.Lock()
			long = append(long, res)
			mu.Unlock()
		}()
	}
	drained := addrs[0]
	waitFor(t, func() bool { return upstreamView(t, drained).Load.Inflight > 0 })
	status, body := adminSend(t, http.MethodPatch, "/aibalance/upstreams/"+drained, `{"drain": true}`)
	var v aibalance.UpstreamView
	if status != 200 || json.Unmarshal(body, &v) != nil || v.State != "draining" || v.Load.Inflight == 0 {
		t.Fatalf("PATCH drain: %d %s", status, body)
	}
	t.Logf("drain: %s (%s)", v.State, v.Reason)
	during := shares(t, url, 30, 3)
	if during[drained] != 0 {
		t.Fatalf("the draining upstream got %d of 30 new requests: %v", during[drained], during)
	}
	wg.Wait()
	for _, r := range long {
		if r.Status != 200 || r.Tokens != 300 {
			t.Fatalf("a request in flight during the drain ended with %d after %d tokens", r.Status, r.Tokens)
		}
	}
	waitFor(t, func() bool { return upstreamView(t, drained).State == "drained" })

	if got := shares(t, url, 12, 3); got[drained] != 0 {
		t.Fatalf("after a reload the drained upstream got %d requests", got[drained])
	}

	// back, and a weight
	if status, body := adminSend(t, http.MethodPatch, "/aibalance/upstreams/"+drained, `{"drain": false}`); status != 200 || !strings.Contains(string(body), `"state": "active"`) {
		t.Fatalf("PATCH undrain: %d %s", status, body)
	}
	before := shares(t, url, 60, 6)
	heavy := addrs[1]
	if status, body := adminSend(t, http.MethodPatch, "/aibalance/upstreams/"+heavy, `{"weight": 8}`); status != 200 || !strings.Contains(string(body), `"weight_source": "admin"`) {
		t.Fatalf("PATCH weight: %d %s", status, body)
	}
	url = aiProxy(t, tester, upstreams(p), block) + "/v1/chat/completions" // kept across a reload too
	if v := upstreamView(t, heavy); v.Weight != 8 || v.WeightSource != "admin" {
		t.Fatalf("after a reload: weight %v from %s", v.Weight, v.WeightSource)
	}
	after := shares(t, url, 60, 6)
	t.Logf("requests by upstream, 60 at 6 in flight: before %v, after weight 8 on %s: %v", before, heavy, after)
	if after[heavy] < 40 || after[heavy] <= before[heavy]+10 {
		t.Fatalf("weight 8 on %s: %d of 60 requests (before: %d)", heavy, after[heavy], before[heavy])
	}
	if status, body := adminSend(t, http.MethodPatch, "/aibalance/upstreams/"+heavy, `{"weight": 0}`); status != 200 || !strings.Contains(string(body), `"weight_source": "config"`) {
		t.Fatalf("PATCH weight 0: %d %s", status, body)
	}

	for _, tc := range []struct {
		method, path, body string
		status             int
		text               string
	}{
		{"PATCH", "/aibalance/upstreams/" + heavy, `{"weight": -1}`, 400, `\"weight\" must be from 0.01 to 1000`},
		{"PATCH", "/aibalance/upstreams/" + heavy, `{"weight": "3"}`, 400, "bad JSON body"},
		{"PATCH", "/aibalance/upstreams/" + heavy, `{"wieght": 3}`, 400, `unknown field \"wieght\"`},
		{"PATCH", "/aibalance/upstreams/" + heavy, `{"drain": "yes"}`, 400, "bad JSON body"},
		{"PATCH", "/aibalance/upstreams/" + heavy, `{}`, 400, "nothing to change"},
		{"PATCH", "/aibalance/upstreams/" + heavy, `not json`, 400, "bad JSON body"},
		{"PATCH", "/aibalance/upstreams/" + heavy, ``, 400, "empty body"},
		{"PATCH", "/aibalance/upstreams/127.0.0.1:1", `{"drain": true}`, 404, "no upstream"},
		{"PUT", "/aibalance/upstreams/" + heavy, `{"drain": true}`, 405, "use GET or PATCH"},
	} {
		status, body := adminSend(t, tc.method, tc.path, tc.body)
		var e struct {
			Error string `json:"error"`
		}
		if status != tc.status || json.Unmarshal(body, &e) != nil || !strings.Contains(string(body), tc.text) {
			t.Errorf("%s %s %s: %d %s; want %d and %q in a JSON error", tc.method, tc.path, tc.body, status, body, tc.status, tc.text)
		}
	}
	if v := upstreamView(t, heavy); v.State != "active" || v.WeightSource != "config" {
		t.Fatalf("bad calls changed the upstream: %+v", v)
	}
}

// scrapeMetrics parses the admin endpoint's /metrics.
func scrapeMetrics(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	status, body := adminGet(t, http.MethodGet, "/metrics")
	if status != 200 {
		t.Fatalf("GET /metrics: %d %s", status, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// sumOf adds a family's values (counters and gauges; histogram counts)
// over the series whose labels include want.
func sumOf(f *dto.MetricFamily, want map[string]string) float64 {
	total := 0.0
	if f == nil {
		return 0
	}
series:
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue series
			}
		}
		switch {
		case m.Counter != nil:
			total += m.GetCounter().GetValue()
		case m.Gauge != nil:
			total += m.GetGauge().GetValue()
		case m.Histogram != nil:
			total += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return total
}

// TestMetrics: the plugin's metrics are in Caddy's registry at the admin
// /metrics, named caddy_aibalance_*, counting what went through the proxy,
// and a config reload neither breaks nor resets them.
func TestMetrics(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{Speed: 0.5})
	url := aiProxy(t, tester, upstreams(p), "\t\tmetrics_interval 100ms") + "/v1/chat/completions"
	waitFor(t, func() bool {
		for _, a := range p.Addrs() {
			if b, ok := aibalance.LookupBackend(a); !ok {
				return false
			} else if _, fresh := b.Engine(timeNow()); !fresh {
				return false
			}
		}
		return true
	})
	drive(t, url, 20, 4, 8)

	fams := scrapeMetrics(t)
	if testing.Verbose() {
		_, raw := adminGet(t, http.MethodGet, "/metrics")
		for _, l := range strings.Split(string(raw), "\n") {
			if strings.HasPrefix(l, "caddy_aibalance_") && strings.Contains(l, p.Addrs()[0]) && !strings.Contains(l, "_bucket") {
				t.Log(l)
			}
		}
	}
	for _, name := range []string{
		"upstream_requests_total", "upstream_in_flight_requests", "upstream_responses_total", "upstream_errors_total",
		"upstream_time_to_first_token_seconds", "upstream_request_duration_seconds", "upstream_prompt_tokens_total",
		"upstream_output_tokens_total", "upstream_state", "upstream_cooldowns_total", "upstream_ejections_total",
		"upstream_weight", "upstream_engine_waiting_requests", "upstream_engine_running_requests",
		"upstream_engine_kv_cache_usage_ratio", "upstream_prediction_error_ratio", "upstream_predicted_ttft_seconds",
		"upstream_predicted_duration_seconds", "upstream_prefix_cached_tokens_expected_total", "upstream_prefix_estimate_trust_ratio",
	} {
		if fams["caddy_aibalance_"+name] == nil {
			t.Errorf("caddy_aibalance_%s missing", name)
		}
	}
	var requests, ttfts, outputs float64
	for _, a := range p.Addrs() {
		up := map[string]string{"upstream": a}
		requests += sumOf(fams["caddy_aibalance_upstream_requests_total"], up)
		ttfts += sumOf(fams["caddy_aibalance_upstream_time_to_first_token_seconds"], up)
		outputs += sumOf(fams["caddy_aibalance_upstream_output_tokens_total"], up)
		if s := sumOf(fams["caddy_aibalance_upstream_state"], map[string]string{"upstream": a, "state": "active"}); s != 1 {
			t.Errorf("%s: state active = %v", a, s)
		}
	}
	// drive streams every request
	if requests != 20 || ttfts != 20 || outputs != 20*8 {
		t.Fatalf("metrics count %v requests (want 20), %v first tokens (want 20), %v output tokens (want 160)", requests, ttfts, outputs)
	}

	aiProxy(t, tester, upstreams(p), "\t\tmetrics_interval 100ms")
	again := scrapeMetrics(t)
	after := 0.0
	for _, a := range p.Addrs() {
		after += sumOf(again["caddy_aibalance_upstream_requests_total"], map[string]string{"upstream": a})
	}
	if after != requests {
		t.Fatalf("after a reload: %v requests counted, before %v", after, requests)
	}
}
