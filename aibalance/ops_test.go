package aibalance

import (
	"math"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestOverrides: the operator's weight replaces the config's and drain
// marks the upstream; an override left empty disappears; concurrent
// writers and readers see whole maps.
func TestOverrides(t *testing.T) {
	const a, b = "127.0.0.1:7001", "127.0.0.1:7002"
	defer SetOverride(a, func(o *Override) { *o = Override{} })
	defer SetOverride(b, func(o *Override) { *o = Override{} })
	p := &Pool{key: "t"}
	p.SetWeights(map[string]float64{a: 2})
	if p.Weight(a) != 2 || p.Weight(b) != 1 {
		t.Fatalf("config weights: %v %v", p.Weight(a), p.Weight(b))
	}
	SetOverride(a, func(o *Override) { o.Weight = 5 })
	SetOverride(b, func(o *Override) { o.Drain = true })
	if p.Weight(a) != 5 || !Draining(b) || Draining(a) {
		t.Fatalf("overrides: weight %v, draining %v %v", p.Weight(a), Draining(a), Draining(b))
	}
	SetOverride(a, func(o *Override) { o.Weight = 0 })
	if p.Weight(a) != 2 {
		t.Fatalf("weight back to the config's: %v", p.Weight(a))
	}
	if _, ok := OverrideOf(a); ok {
		t.Fatal("an empty override stayed")
	}
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				SetOverride(a, func(o *Override) { o.Drain = !o.Drain })
			}
		}()
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				_ = Draining(a) || Draining(b)
			}
		}()
	}
	wg.Wait()
	if Draining(a) || !Draining(b) {
		t.Fatalf("after an even number of toggles: %v %v", Draining(a), Draining(b))
	}
}

// FuzzReadPatch: any body gives a patch within bounds or an error, never
// a panic.
func FuzzReadPatch(f *testing.F) {
	for _, s := range []string{`{"weight": 3}`, `{"drain": true}`, `{"weight": 0, "drain": false}`, `{"weight": 1e400}`, `{"weight": -0}`, `[]`, `{"drain": null}`, `{} {}`, ``, `{"weight": 3, "weight": 4}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		r := httptest.NewRequest("PATCH", "/aibalance/upstreams/x:1", strings.NewReader(body))
		p, err := readPatch(r)
		if err != nil {
			return
		}
		if p.Weight == nil && p.Drain == nil {
			t.Fatalf("%q: accepted with nothing to change", body)
		}
		if w := p.Weight; w != nil && (math.IsNaN(*w) || *w < 0 || *w > 1000 || *w > 0 && *w < 0.01) {
			t.Fatalf("%q: weight %v accepted", body, *w)
		}
	})
}

// TestLatencyQuantile: percentiles interpolate within the buckets.
func TestLatencyQuantile(t *testing.T) {
	var h latencyHist
	if h.quantile(0.5) != 0 {
		t.Fatal("empty histogram")
	}
	for i := 0; i < 100; i++ {
		h.observe(time.Duration(30+i%20) * time.Millisecond) // 30–49 ms: the 25–50 ms bucket
	}
	if q := h.quantile(0.5); q <= 0.025 || q > 0.05 {
		t.Fatalf("p50 %v, want within (0.025, 0.05]", q)
	}
	h.observe(10 * time.Minute)
	if q := h.quantile(1); q != latencyBuckets[len(latencyBuckets)-1] {
		t.Fatalf("p100 %v beyond the last bound", q)
	}
}
