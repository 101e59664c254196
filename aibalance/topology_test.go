package aibalance

import (
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestOpenTier: the standby tier opens when the primary's utilisation
// reaches the threshold or the primary is out, stays open while it is
// above, and closes only after the hysteresis below it.
func TestOpenTier(t *testing.T) {
	p := &Pool{key: "tiers"}
	p.SetTopology(Topology{Tiers: map[string]int{"s:1": 1}, StandbyThreshold: 0.8, StandbyHysteresis: caddy.Duration(10 * time.Second)})
	members := slices.Values([]string{"p:1", "p:2", "s:1"})
	util := map[string]float64{}
	out := map[string]bool{}
	f := func(a string) (float64, bool) { return util[a], out[a] }
	now := time.Unix(1000, 0)
	step := func(d time.Duration) int {
		now = now.Add(d)
		return p.OpenTier(now, members, f)
	}
	util["p:1"], util["p:2"] = 0.5, 0.6
	if got := step(time.Second); got != 0 {
		t.Fatalf("primary at 55%%: tier %d open", got)
	}
	util["p:1"], util["p:2"] = 1.4, 0.7 // one queues: mean of min(u,1) = 0.85
	if got := step(time.Second); got != 1 {
		t.Fatalf("primary at 85%%: tier %d open, want 1", got)
	}
	if got := step(50 * time.Millisecond); got != 1 {
		t.Fatal("a check within 100ms changed the tier")
	}
	util["p:1"], util["p:2"] = 0.3, 0.3
	for i := 0; i < 9; i++ {
		if got := step(time.Second); got != 1 {
			t.Fatalf("closed %ds after the load fell, before the 10s hysteresis", i+1)
		}
	}
	util["p:1"], util["p:2"] = 0.95, 0.9 // a burst above the threshold restarts the hysteresis
	step(time.Second)
	util["p:1"], util["p:2"] = 0.3, 0.3
	for i := 0; i < 9; i++ {
		if got := step(time.Second); got != 1 {
			t.Fatalf("closed %ds after a burst", i+1)
		}
	}
	if got := step(2 * time.Second); got != 0 {
		t.Fatalf("still open %v after the load fell", 11*time.Second)
	}
	out["p:1"], out["p:2"] = true, true
	if got := step(time.Second); got != 1 {
		t.Fatal("the primary is out and the standby is closed")
	}
	if st := p.Tiers(); st.Open != 1 || st.Reason == "" {
		t.Fatalf("status %+v", st)
	}
	if p.Tier("s:1") != 1 || p.Tier("p:1") != 0 {
		t.Fatal("tiers by address")
	}
}

// TestZoneFactor: another zone's backends get the margin; the instance's
// own zone, unlabelled backends and instances without a zone do not.
func TestZoneFactor(t *testing.T) {
	p := &Pool{key: "zones"}
	p.SetTopology(Topology{Zones: map[string]string{"a:1": "eu", "b:1": "us"}, ZoneMarginTime: caddy.Duration(5 * time.Millisecond)})
	for _, tc := range []struct {
		home, addr string
		f          float64
		add        time.Duration
	}{
		{"eu", "a:1", 1, 0}, {"eu", "b:1", 1, 5 * time.Millisecond}, {"eu", "c:1", 1, 0}, {"", "b:1", 1, 0},
	} {
		if f, add := p.ZoneFactor(tc.home, tc.addr); f != tc.f || add != tc.add {
			t.Errorf("%s from %s: ×%v +%v, want ×%v +%v", tc.addr, tc.home, f, add, tc.f, tc.add)
		}
	}
	p.SetTopology(Topology{Zones: map[string]string{"b:1": "us"}})
	if f, _ := p.ZoneFactor("eu", "b:1"); f != 1+DefaultZoneMargin {
		t.Errorf("default margin: ×%v", f)
	}
	if err := (&Topology{Tiers: map[string]int{"x:1": 10}}).Validate(); err == nil {
		t.Error("tier 10 accepted")
	}
	if err := (&Topology{StandbyThreshold: 1.5}).Validate(); err == nil {
		t.Error("threshold 1.5 accepted")
	}
}
