package integration

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/healthcheck"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

func adminGet(t *testing.T, method, path string) (int, []byte) {
	t.Helper()
	return adminSend(t, method, path, "")
}

// TestAdminUpstreams: the admin API shows, per backend, its load, counters,
// learned model, prediction error, engine metrics with their age and its
// share of recent traffic; it refuses other methods and unknown addresses.
func TestAdminUpstreams(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{Speed: 0.5})
	url := aiProxy(t, tester, upstreams(p), "\t\tmetrics_interval 100ms") + "/v1/chat/completions"
	waitFor(t, func() bool {
		for _, a := range p.Addrs() {
			b, ok := aibalance.LookupBackend(a)
			if !ok {
				return false
			}
			if _, fresh := b.Engine(timeNow()); !fresh {
				return false
			}
		}
		return true
	})
	drive(t, url, 40, 4, 8)

	status, body := adminGet(t, "GET", "/aibalance/upstreams")
	if status != 200 {
		t.Fatalf("GET /aibalance/upstreams: %d %s", status, body)
	}
	var view aibalance.UpstreamsView
	if err := json.Unmarshal(body, &view); err != nil {
		t.Fatalf("%v in %s", err, body)
	}
	var share float64
	var requests uint64
	for _, a := range p.Addrs() {
		var u *aibalance.UpstreamView
		for i := range view.Upstreams {
			if view.Upstreams[i].Address == a {
				u = &view.Upstreams[i]
			}
		}
		if u == nil {
			t.Fatalf("%s missing from %s", a, body)
		}
		if u.State != "active" || u.Engine == nil || u.Engine.Engine != "vllm" || u.Engine.Waiting == nil || u.Engine.Age < 0 {
			t.Fatalf("%s: state %q engine %+v", a, u.State, u.Engine)
		}
		if u.Predicted.E2E <= 0 || u.Counters.Model.Samples == 0 && u.Counters.Requests > 0 {
			t.Fatalf("%s: prediction %+v after %d requests, %d samples", a, u.Predicted, u.Counters.Requests, u.Counters.Model.Samples)
		}
		share += u.RecentShare
		requests += u.Counters.Requests
	}
	if requests != 40 || share < 0.99 || share > 1.01 {
		t.Fatalf("%d requests counted (want 40), recent shares add up to %.2f:\n%s", requests, share, body)
	}
	if len(view.Pools) == 0 || len(view.Pools[0].Members) != 2 {
		t.Fatalf("pools: %+v", view.Pools)
	}

	status, body = adminGet(t, "GET", "/aibalance/upstreams/"+p.Addrs()[1])
	var one aibalance.UpstreamView
	if status != 200 || json.Unmarshal(body, &one) != nil || one.Address != p.Addrs()[1] {
		t.Fatalf("GET one upstream: %d %s", status, body)
	}
	for _, tc := range []struct {
		method, path string
		status       int
		text         string
	}{
		{"GET", "/aibalance/upstreams/127.0.0.1:1", 404, "no upstream"},
		{"POST", "/aibalance/upstreams", 405, "use GET"},
		{"DELETE", "/aibalance/upstreams/" + p.Addrs()[0], 405, "use GET"},
	} {
		status, body := adminGet(t, tc.method, tc.path)
		if status != tc.status || !strings.Contains(string(body), tc.text) {
			t.Fatalf("%s %s: %d %s; want %d and %q", tc.method, tc.path, status, body, tc.status, tc.text)
		}
	}
}

// TestOneScraperPerAddress: two handlers on one engine share one scraper,
// which survives a reload and stops with the last config that uses it.
func TestOneScraperPerAddress(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{})
	a, b := port(t), port(t)
	config := fmt.Sprintf(`%s
http://127.0.0.1:%d {
	ai_proxy %s
}
http://127.0.0.1:%d {
	reverse_proxy %s {
		lb_policy least_conn
		transport aibalance
	}
}`, globals, a, upstreams(p), b, p.Addrs()[0])
	empty := fmt.Sprintf(`%s
http://127.0.0.1:%d {
	respond "no upstreams"
}`, globals, a)
	// start from no scrapers: an earlier test's config may hold some
	tester.InitServer(empty, "caddyfile")
	waitFor(t, func() bool { return healthcheck.Scrapers() == 0 })
	tester.InitServer(config, "caddyfile")
	waitFor(t, func() bool { return healthcheck.Scrapers() == 2 })
	tester.InitServer(config, "caddyfile") // a reload
	if n := healthcheck.Scrapers(); n != 2 {
		t.Fatalf("%d scrapers after a reload", n)
	}
	tester.InitServer(empty, "caddyfile")
	waitFor(t, func() bool { return healthcheck.Scrapers() == 0 })
}
