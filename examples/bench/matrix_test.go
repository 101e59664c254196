package main

import (
	"bytes"
	"errors"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/internal/harness"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// TestMatrixTinyCell runs one short cell end to end: fresh engines, a real
// in-process Caddy with each policy, side traffic, and the tables.
func TestMatrixTinyCell(t *testing.T) {
	if testing.Short() {
		t.Skip("runs Caddy and simulated engines for a few seconds")
	}
	o, err := presetOptions("quick")
	if err != nil {
		t.Fatal(err)
	}
	o.cells, err = pickCells("base", "full")
	if err != nil {
		t.Fatal(err)
	}
	o.policies, err = matrixPolicies("")
	if err != nil {
		t.Fatal(err)
	}
	o.warmup, o.measured, o.drain = 500*time.Millisecond, 1500*time.Millisecond, 20*time.Second
	var out bytes.Buffer
	err = runMatrix(o, &out)
	_ = harness.Stop()
	if err != nil {
		t.Fatal(err)
	}
	text := out.String()
	t.Log("\n" + text)
	for _, want := range []string{
		"## base", "| ai_predictive | ", "| least_conn | ",
		"## Summary: ai_predictive / least_conn", "| base | ", "Total wall time: ",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "| ai_predictive |") || strings.HasPrefix(line, "| least_conn |") {
			if strings.Contains(line, "| 0 | 0 |") || !strings.Contains(line, " 0 of ") {
				t.Errorf("row without throughput or with unexpected side-traffic answers: %s", line)
			}
		}
	}
}

func TestPickCells(t *testing.T) {
	all, err := pickCells("", "full")
	if err != nil || len(all) != 23 {
		t.Fatalf("%d cells, %v; want 23", len(all), err)
	}
	quick, _ := pickCells("", "quick")
	inQuick := map[string]bool{}
	for _, c := range quick {
		inQuick[c.name] = true
	}
	if len(quick) != 20 || !inQuick["fail-kill"] || inQuick["work-reasoning"] || inQuick["engine-budget"] || inQuick["pool-slowrecover"] {
		t.Fatalf("quick has %d cells: %v; want 20 with fail-kill, without the other new cells", len(quick), inQuick)
	}
	names := map[string]bool{}
	for _, c := range all {
		if names[c.name] {
			t.Errorf("cell %s twice", c.name)
		}
		names[c.name] = true
	}
	if _, err := pickCells("base,nope", "full"); err == nil {
		t.Fatal("an unknown cell was accepted")
	}
	if _, err := matrixPolicies("least_tokens,bogus"); err == nil {
		t.Fatal("an unknown policy was accepted")
	}
	ps, _ := matrixPolicies("least_tokens,round_robin")
	if len(ps) != 4 || ps[0].name != "ai_predictive" || ps[1].name != "least_conn" {
		t.Fatalf("policies %+v", ps)
	}
}

func TestSlowdownCapacity(t *testing.T) {
	cs, _ := pickCells("pool-slowdown", "full")
	c := cs[0]
	warm, meas := 2*time.Second, 15*time.Second
	cfgs := c.configs(5, warm, meas)
	if ch := cfgs[0].SpeedChanges; len(ch) != 1 || ch[0].At != 7*time.Second || ch[0].Speed != 5.0/3 {
		t.Fatalf("speed changes %+v", ch)
	}
	caps := c.capacities(cfgs, warm, meas)
	// a third at full speed, two thirds at a third: 5/9 of the other speed-1 engine
	if r := caps[0] / caps[1]; r < 0.5 || r > 0.6 {
		t.Fatalf("slowed engine's capacity is %.2f of its twin's, want about 0.56", r)
	}
}

func cellNamed(t *testing.T, name string) cell {
	t.Helper()
	cs, err := pickCells(name, "full")
	if err != nil {
		t.Fatal(err)
	}
	return cs[0]
}

// TestWindowCapacities: each engine's capacity averaged over the measured
// window, with several speed changes and a kill.
func TestWindowCapacities(t *testing.T) {
	warm, meas := 2*time.Second, 15*time.Second
	for _, tc := range []struct {
		cell string
		want float64 // engine 0's capacity over engine 1's (its twin)
	}{
		{"base", 1},
		{"pool-slowdown", 1.0/3 + 2.0/3/3},
		{"pool-slowrecover", 1.0/3 + 1.0/3/5 + 1.0/3},
		{"fail-kill", 1.0 / 3},
	} {
		t.Run(tc.cell, func(t *testing.T) {
			c := cellNamed(t, tc.cell)
			cfgs := c.configs(5, warm, meas)
			caps := c.capacities(cfgs, warm, meas)
			if r := caps[0] / caps[1]; math.Abs(r-tc.want) > 1e-9 {
				t.Fatalf("engine 0 has %.4f of its twin's capacity, want %.4f (speed changes %+v)", r, tc.want, cfgs[0].SpeedChanges)
			}
		})
	}
	cfgs := cellNamed(t, "pool-slowrecover").configs(5, warm, meas)
	if ch := cfgs[0].SpeedChanges; len(ch) != 2 || ch[0].At != 7*time.Second || ch[0].Speed != 1 || ch[1].At != 12*time.Second || ch[1].Speed != 5 {
		t.Fatalf("speed changes %+v; want 1 at 7s, 5 at 12s", ch)
	}
}

// TestCellScales: work-reasoning's own window and time scale, and enough
// requests in it; engine-budget's engines are bound by their KV cache.
func TestCellScales(t *testing.T) {
	o, _ := presetOptions("full")
	c := cellNamed(t, "work-reasoning")
	oc := o.forCell(c)
	if oc.measured != 45*time.Second || oc.timeScale != 10 || o.measured != 15*time.Second {
		t.Fatalf("work-reasoning: %v measured at ×%g, want 45s at ×10", oc.measured, oc.timeScale)
	}
	total := 0.0
	for _, x := range c.capacities(c.configs(oc.timeScale, oc.warmup, oc.measured), oc.warmup, oc.measured) {
		total += x
	}
	t.Logf("work-reasoning: %.1f req/s offered, %.0f requests expected in %v", c.load*total, c.load*total*oc.measured.Seconds(), oc.measured)
	if n := c.load * total * oc.measured.Seconds(); n < 160 {
		t.Fatalf("work-reasoning expects %.0f requests in its window, want at least 160", n)
	}
	if oc := o.forCell(baseCell()); oc.measured != o.measured || oc.timeScale != o.timeScale {
		t.Fatal("the base cell has scales of its own")
	}
	budget, base := cellNamed(t, "engine-budget"), baseCell()
	bc := budget.capacities(budget.configs(5, 0, 0), 0, 0)
	dc := base.capacities(base.configs(5, 0, 0), 0, 0)
	if r := bc[0] / dc[0]; r > 0.8 || r < 0.4 {
		t.Fatalf("a 2048-token KV cache leaves %.2f of the default engine's capacity, want about 0.68 (8 of 16 sequences)", r)
	}
	if got := extraFigures(budget); len(got) != 1 || got[0] != figPreempt {
		t.Fatalf("engine-budget's extra columns %v", got)
	}
}

func TestCutStreams(t *testing.T) {
	kill := time.Now()
	ok := func(backend string, at time.Duration, ttft time.Duration) llmsim.Record {
		return llmsim.Record{Result: llmsim.Result{Status: http.StatusOK, Backend: backend, TTFT: ttft, Done: true}, Stream: true, Started: kill.Add(at)}
	}
	broken := func(backend string, at time.Duration, status int) llmsim.Record {
		r := llmsim.Record{Result: llmsim.Result{Status: status, Backend: backend}, Stream: true, Started: kill.Add(at)}
		if status == http.StatusOK {
			r.Err = errors.New("stream ended without [DONE]")
		}
		return r
	}
	recs := []llmsim.Record{
		broken("dead", -time.Second, 200),             // cut
		broken("dead", -2*time.Second, 200),           // cut
		broken("alive", -time.Second, 200),            // another error
		broken("", time.Second, 502),                  // refused after the kill: another error
		ok("dead", -3*time.Second, time.Second),       // done before the kill
		ok("alive", time.Second, 50*time.Millisecond), // a survivor
		ok("alive", 2*time.Second, 70*time.Millisecond),
	}
	cut, p99 := cutStreams(recs, "dead", kill)
	if cut != 2 || p99 != 70*time.Millisecond {
		t.Fatalf("cut %d, TTFT p99 after the kill %v; want 2 and 70ms", cut, p99)
	}
	if cut, _ := cutStreams(recs, "dead", time.Time{}); cut != 0 {
		t.Fatalf("%d cut streams without a kill", cut)
	}
}

// TestFailoverProxyLoads: fail-kill's Caddy config (retries and passive
// health checks beside the selection policy) provisions for both policies.
func TestFailoverProxyLoads(t *testing.T) {
	c := cellNamed(t, "fail-kill")
	ps, _ := matrixPolicies("")
	for _, p := range ps {
		port, err := harness.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		px := c.proxy(p, port, []string{"127.0.0.1:9"})
		if _, err := px.Start(); err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		if !strings.Contains(string(px.JSON()), `"fail_duration":"10s"`) || !strings.Contains(string(px.JSON()), `"policy":"`+p.selection["policy"].(string)+`"`) {
			t.Fatalf("%s: config %s", p.name, px.JSON())
		}
	}
	_ = harness.Stop()
}
