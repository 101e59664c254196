package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

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

// adminJSON GETs path from the admin endpoint and decodes its answer,
// which must be 200.
func adminJSON[T any](t *testing.T, path string) T {
	t.Helper()
	status, body := adminGet(t, http.MethodGet, path)
	var v T
	if status != 200 || json.Unmarshal(body, &v) != nil {
		t.Fatalf("GET %s: %d %s", path, status, body)
	}
	return v
}

// upstreamView fetches the admin view of one upstream.
func upstreamView(t *testing.T, addr string) aibalance.UpstreamView {
	t.Helper()
	return adminJSON[aibalance.UpstreamView](t, "/aibalance/upstreams/"+addr)
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

// poolView fetches GET /aibalance/pools/{name}.
func poolView(t *testing.T, name string) aibalance.DynamicPoolView {
	t.Helper()
	return adminJSON[aibalance.DynamicPoolView](t, "/aibalance/pools/"+name)
}

func memberOf(v aibalance.DynamicPoolView, addr string) (aibalance.DynamicMemberView, bool) {
	for _, m := range v.Members {
		if m.Address == addr {
			return m, true
		}
	}
	return aibalance.DynamicMemberView{}, false
}

// TestDynamicPool: `dynamic aibalance <pool>` serves a pool the admin API
// changes without a reload: a member added by POST enters by slow start
// and takes traffic, a reload keeps it with its learned state, DELETE
// drains it (the request in flight finishes, no new one goes there) and
// then forgets it; bad calls get 400/404/405.
func TestDynamicPool(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{}, llmsim.Config{})
	a := p.Addrs()
	t.Cleanup(func() {
		for _, x := range a {
			aibalance.SetOverride(x, func(o *aibalance.Override) { *o = aibalance.Override{} })
		}
	})
	const name = "gpus-test"
	block := "\t\tdynamic aibalance " + name + " " + a[0] + "\n\t\tslow_start 3s\n\t\t" + upstreamHeader
	url := aiProxy(t, tester, "", block) + "/v1/chat/completions"
	if got := shares(t, url, 8, 2); got[a[0]] != 8 {
		t.Fatalf("one member: %v", got)
	}

	status, body := adminSend(t, http.MethodPost, "/aibalance/pools/"+name+"/members", `{"address": "`+a[1]+`"}`)
	if status != http.StatusCreated {
		t.Fatalf("POST member: %d %s", status, body)
	}
	if status, body := adminSend(t, http.MethodPost, "/aibalance/pools/"+name+"/members", `{"address": "`+a[2]+`", "weight": 2}`); status != http.StatusCreated {
		t.Fatalf("POST member with a weight: %d %s", status, body)
	}
	// joining a pool that serves: slow start before its first request,
	// its weight shown at once
	if v := upstreamView(t, a[2]); v.State != "slow_start" || v.Weight != 2 {
		t.Fatalf("a member just added: state %q weight %v", v.State, v.Weight)
	}
	first := shares(t, url, 12, 3)
	ramping := 0
	for _, x := range a[1:] {
		if v := upstreamView(t, x); v.State == "slow_start" {
			ramping++
		}
	}
	if ramping == 0 {
		t.Fatalf("no added member is in slow start after the first requests %v", first)
	}
	time.Sleep(3100 * time.Millisecond) // the ramp ends
	got := shares(t, url, 60, 6)
	t.Logf("after adding two members: first 12 requests %v, 60 after the ramp %v", first, got)
	if got[a[1]] == 0 || got[a[2]] == 0 {
		t.Fatalf("added members got no traffic: %v", got)
	}
	v := poolView(t, name)
	if m, ok := memberOf(v, a[1]); !ok || m.Source != "api" || len(v.Members) != 3 {
		t.Fatalf("pool view: %+v", v)
	}
	if m, _ := memberOf(v, a[0]); m.Source != "config" {
		t.Fatalf("config member: %+v", m)
	}
	status, body = adminGet(t, http.MethodGet, "/aibalance/pools")
	if status != 200 || !strings.Contains(string(body), `"pool": "`+name+`"`) {
		t.Fatalf("GET /aibalance/pools: %d %s", status, body)
	}

	// a reload keeps the members added through the API and what they learned
	served := upstreamView(t, a[1]).Counters.Requests
	url = aiProxy(t, tester, "", block) + "/v1/chat/completions"
	if v := poolView(t, name); len(v.Members) != 3 {
		t.Fatalf("after a reload: %+v", v)
	}
	if n := upstreamView(t, a[1]).Counters.Requests; n < served {
		t.Fatalf("after a reload %s counts %d requests, %d before", a[1], n, served)
	}

	// DELETE drains first: a long stream on the member finishes
	aibalance.SetOverride(a[0], func(o *aibalance.Override) { o.Drain = true })
	aibalance.SetOverride(a[2], func(o *aibalance.Override) { o.Drain = true })
	done := make(chan llmsim.Result, 1)
	go func() {
		res, _ := llmsim.Complete(context.Background(), http.DefaultClient, url, llmsim.ChatBody("", "a long one", 300, true))
		done <- res
	}()
	waitFor(t, func() bool { return upstreamView(t, a[1]).Load.Inflight > 0 })
	aibalance.SetOverride(a[0], func(o *aibalance.Override) { o.Drain = false })
	aibalance.SetOverride(a[2], func(o *aibalance.Override) { o.Drain = false })
	status, body = adminSend(t, http.MethodDelete, "/aibalance/pools/"+name+"/members/"+a[1], "")
	if status != 200 {
		t.Fatalf("DELETE member: %d %s", status, body)
	}
	if m, ok := memberOf(poolView(t, name), a[1]); !ok || !m.Removing || m.State != "draining" {
		t.Fatalf("a member removed with a request in flight: %+v", m)
	}
	if got := shares(t, url, 20, 4); got[a[1]] != 0 {
		t.Fatalf("a member being removed got %d new requests", got[a[1]])
	}
	if res := <-done; res.Status != 200 || res.Tokens != 300 {
		t.Fatalf("the request in flight on the removed member: %d after %d tokens", res.Status, res.Tokens)
	}
	waitFor(t, func() bool { _, ok := memberOf(poolView(t, name), a[1]); return !ok })
	// forgotten everywhere: no upstream view, not in the handler's pool
	if status, body := adminGet(t, http.MethodGet, "/aibalance/upstreams/"+a[1]); status != 404 {
		t.Fatalf("a removed member's view: %d %s", status, body)
	}
	if status, body := adminGet(t, http.MethodGet, "/aibalance/upstreams"); status != 200 || strings.Contains(string(body), a[1]) {
		t.Fatalf("a removed member is still listed: %s", body)
	}

	for _, tc := range []struct {
		method, path, body string
		status             int
		text               string
	}{
		{"POST", "/aibalance/pools/" + name + "/members", `{"address": "no-port"}`, 400, "want host:port"},
		{"POST", "/aibalance/pools/" + name + "/members", `{"address": "127.0.0.1:99999"}`, 400, "port must be a number"},
		{"POST", "/aibalance/pools/" + name + "/members", `{"adress": "127.0.0.1:1"}`, 400, `unknown field \"adress\"`},
		{"POST", "/aibalance/pools/" + name + "/members", `{"address": "127.0.0.1:1", "weight": 0}`, 400, `\"weight\" must be`},
		{"POST", "/aibalance/pools/" + name + "/members", `[`, 400, "bad JSON body"},
		{"POST", "/aibalance/pools/nope/members", `{"address": "127.0.0.1:1"}`, 404, "no dynamic pool"},
		{"DELETE", "/aibalance/pools/" + name + "/members/127.0.0.1:1", ``, 404, "not a member"},
		{"GET", "/aibalance/pools/" + name + "/members", ``, 405, "use POST"},
		{"POST", "/aibalance/pools", `{}`, 405, "use GET"},
		{"PUT", "/aibalance/pools/" + name + "/members/" + a[0], ``, 405, "use DELETE"},
	} {
		status, body := adminSend(t, tc.method, tc.path, tc.body)
		if status != tc.status || !strings.Contains(string(body), tc.text) || !strings.HasPrefix(string(body), "{") {
			t.Errorf("%s %s %s: %d %s; want %d and %q in a JSON error", tc.method, tc.path, tc.body, status, body, tc.status, tc.text)
		}
	}
	if v := poolView(t, name); len(v.Members) != 2 {
		t.Fatalf("bad calls changed the pool: %+v", v)
	}
}

// TestStandbyTier: a tier-1 backend gets nothing while the primary keeps
// up, takes traffic once the primary saturates (its engine queues), and
// stops after the hysteresis once the load is gone.
func TestStandbyTier(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{MaxRunning: 2}, llmsim.Config{})
	primary, standby := p.Addrs()[0], p.Addrs()[1]
	url := aiProxy(t, tester, upstreams(p), "\t\ttier 1 "+standby+"\n\t\tstandby_hysteresis 1s\n\t\tmetrics_interval 50ms\n\t\t"+upstreamHeader) + "/v1/chat/completions"
	waitFor(t, func() bool {
		b, ok := aibalance.LookupBackend(primary)
		if !ok {
			return false
		}
		_, fresh := b.Engine(timeNow())
		return fresh
	})
	if got := shares(t, url, 10, 1); got[standby] != 0 {
		t.Fatalf("one at a time, the standby got %d of 10", got[standby])
	}
	if v := upstreamView(t, standby); v.State != "standby" || v.Tier != 1 {
		t.Fatalf("standby view: state %q tier %d (%s)", v.State, v.Tier, v.Reason)
	}
	var busy map[string]int
	for _, r := range drive(t, url, 48, 8, 40) {
		if busy == nil {
			busy = map[string]int{}
		}
		busy[r.Backend]++
	}
	if busy[standby] == 0 || busy[primary] == 0 {
		t.Fatalf("8 in flight on a 2-slot primary: %v", busy)
	}
	status, body := adminGet(t, http.MethodGet, "/aibalance/upstreams")
	if status != 200 || !strings.Contains(string(body), `"open_tier"`) {
		t.Fatalf("pool view without its tiers: %s", body)
	}
	// the load is gone: after the hysteresis the standby closes again,
	// with no request to ask (the app re-evaluates every second)
	time.Sleep(3 * time.Second)
	if v := upstreamView(t, standby); v.State != "standby" {
		t.Fatalf("3s after the load the standby is %q (%s)", v.State, v.Reason)
	}
	after := shares(t, url, 10, 1)
	if after[standby] != 0 {
		t.Fatalf("3s after the load the standby took %d of 10 one-at-a-time requests", after[standby])
	}
	t.Logf("standby tier: at 8 in flight %v; after 3 s idle, 10 of 10 one at a time on the primary", busy)
}

// TestZonePreference: with the instance in zone eu, a backend in zone us
// gets nothing while the eu one keeps up, and the spill-over when it
// does not.
func TestZonePreference(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{MaxRunning: 2}, llmsim.Config{})
	near, far := p.Addrs()[0], p.Addrs()[1]
	listen := port(t)
	g := strings.Replace(globals, "{\n", "{\n\taibalance {\n\t\tzone eu\n\t}\n", 1)
	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\tai_proxy %s {\n\t\tzone eu %s\n\t\tzone us %s\n\t\tzone_margin 50%%\n\t\t%s\n\t}\n}", g, listen, upstreams(p), near, far, upstreamHeader), "caddyfile")
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen)
	if got := shares(t, url, 20, 1); got[far] != 0 {
		t.Fatalf("one at a time, the other zone got %d of 20", got[far])
	}
	if v := upstreamView(t, far); v.Zone != "us" {
		t.Fatalf("zone in the view: %q", v.Zone)
	}
	busy := shares(t, url, 48, 8)
	if busy[far] == 0 {
		t.Fatalf("8 in flight on a 2-slot engine in the instance's zone: %v", busy)
	}
	t.Logf("zones: one at a time all 20 in zone; at 8 in flight %v", busy)
}

// TestScalingWebhook: the recommended primary count rises when the pool's
// engines queue and falls back when the load is gone, each change POSTed
// once to the webhook, changes at least min_interval apart.
func TestScalingWebhook(t *testing.T) {
	var mu sync.Mutex
	var events []aibalance.ScalingEvent
	var at []time.Time
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ev aibalance.ScalingEvent
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" || json.NewDecoder(r.Body).Decode(&ev) != nil {
			t.Errorf("webhook: %s %s", r.Method, r.Header.Get("Content-Type"))
		}
		mu.Lock()
		events, at = append(events, ev), append(at, time.Now())
		mu.Unlock()
	}))
	t.Cleanup(srv.Close)
	hook := srv.Listener.Addr().String()
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{MaxRunning: 2}, llmsim.Config{MaxRunning: 2})
	listen := port(t)
	g := strings.Replace(globals, "{\n", "{\n\taibalance {\n\t\tscaling {\n\t\t\twebhook http://"+hook+"/hook\n\t\t\tevery 100ms\n\t\t\tsmoothing 200ms\n\t\t\tmin_interval 500ms\n\t\t}\n\t}\n", 1)
	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\tai_proxy %s {\n\t\tmetrics_interval 50ms\n\t}\n}", g, listen, upstreams(p)), "caddyfile")
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen)
	key := "static:" + upstreams(p)
	mine := func() []aibalance.ScalingEvent {
		mu.Lock()
		defer mu.Unlock()
		var out []aibalance.ScalingEvent
		for _, e := range events {
			if e.Pool == key {
				out = append(out, e)
			}
		}
		return out
	}
	drive(t, url, 4, 1, 4)
	time.Sleep(300 * time.Millisecond)
	drive(t, url, 60, 12, 40) // 12 in flight on 4 batch slots: the engines queue
	waitFor(t, func() bool { ev := mine(); return len(ev) > 0 && ev[len(ev)-1].Recommended > 2 })
	peak := mine()[len(mine())-1]
	waitFor(t, func() bool { ev := mine(); return len(ev) > 0 && ev[len(ev)-1].Recommended == 1 })
	time.Sleep(700 * time.Millisecond) // idle and stable: no more changes
	ev := mine()
	if raw, err := json.Marshal(ev[0]); err == nil {
		t.Logf("first webhook body: %s", raw)
	}
	t.Logf("scaling events: %d, peak %d primaries recommended for %d at utilisation %.2f (%s); last: %d (%s)",
		len(ev), peak.Recommended, peak.Current, peak.Utilisation, peak.Reason, ev[len(ev)-1].Recommended, ev[len(ev)-1].Reason)
	if ev[len(ev)-1].Recommended != 1 {
		t.Fatalf("changed again while idle: %+v", ev[len(ev)-1])
	}
	mu.Lock()
	defer mu.Unlock()
	last, lastAt := 2, time.Time{}
	for i, e := range events {
		if e.Pool != key {
			continue
		}
		if e.Previous != last || e.Recommended == e.Previous || len(e.Members) != 2 {
			t.Fatalf("event %d: %+v after a recommendation of %d", i, e, last)
		}
		if !lastAt.IsZero() && at[i].Sub(lastAt) < 450*time.Millisecond {
			t.Fatalf("event %d came %v after the one before (min_interval 500ms)", i, at[i].Sub(lastAt))
		}
		last, lastAt = e.Recommended, at[i]
	}
	status, body := adminGet(t, http.MethodGet, "/aibalance/upstreams")
	if status != 200 || !strings.Contains(string(body), `"recommended_primaries": 1`) {
		t.Fatalf("pool view without its recommendation: %s", body)
	}
	fams := scrapeMetrics(t)
	if v := sumOf(fams["caddy_aibalance_pool_recommended_primaries"], map[string]string{"pool": key}); v != 1 {
		t.Fatalf("caddy_aibalance_pool_recommended_primaries = %v", v)
	}
}
