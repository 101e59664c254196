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
