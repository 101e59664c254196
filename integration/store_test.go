package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatal("condition not met in 10s")
}

// healthChecked reports whether every engine of p has answered at least
// two active health checks since the last call (so Caddy has seen the
// state each one is in now).
func healthChecked(p *llmsim.Pool) bool {
	ok := true
	for _, s := range p.Servers {
		n := s.Stats().HealthProbes
		if n-lastProbes[s] < 2 {
			ok = false
		}
	}
	if ok {
		for _, s := range p.Servers {
			lastProbes[s] = s.Stats().HealthProbes
		}
	}
	return ok
}

var lastProbes = map[*llmsim.Server]int64{}

// TestStoreLifecycle: two handlers share one entry per address; a reload
// keeps the entry and its counters; unloading the last user releases it.
func TestStoreLifecycle(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{})
	addr := p.Addrs()[0]
	a, b := port(t), port(t)
	config := func(policy string) string {
		return fmt.Sprintf(`%s
http://127.0.0.1:%d {
	reverse_proxy %s {
		lb_policy %s
		transport aibalance
	}
}
http://127.0.0.1:%d {
	reverse_proxy %s {
		lb_policy %s
		transport aibalance
	}
}`, globals, a, addr, policy, b, addr, policy)
	}
	tester.InitServer(config("ai_predictive"), "caddyfile")
	drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", a), 5, 1, 2)
	drive(t, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", b), 7, 1, 2)
	entry, ok := aibalance.LookupBackend(addr)
	if !ok || entry.Stats().Requests != 12 {
		t.Fatalf("one shared entry should have counted both handlers' 12 requests: %v %+v", ok, entry)
	}
	if refs := aibalance.BackendRefs(addr); refs != 4 {
		t.Fatalf("refs %d, want 4 (policy and transport of two handlers)", refs)
	}

	tester.InitServer(config("least_tokens"), "caddyfile") // a reload
	again, ok := aibalance.LookupBackend(addr)
	if !ok || again != entry || again.Stats().Requests != 12 || again.Model().Stats().Samples != 12 {
		t.Fatal("reload lost the entry or its counters")
	}
	if refs := aibalance.BackendRefs(addr); refs != 4 {
		t.Fatalf("refs %d after the reload, want 4: the old config's were not released", refs)
	}

	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\trespond ok\n}", globals, a), "caddyfile")
	if _, ok := aibalance.LookupBackend(addr); ok {
		t.Fatal("entry kept after no config uses the address")
	}
}

func timeNow() time.Time { return time.Now() }
