package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/internal/harness"
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
	o.cells, err = pickCells("base")
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
	all, err := pickCells("")
	if err != nil || len(all) != 19 {
		t.Fatalf("%d cells, %v; want 19", len(all), err)
	}
	names := map[string]bool{}
	for _, c := range all {
		if names[c.name] {
			t.Errorf("cell %s twice", c.name)
		}
		names[c.name] = true
	}
	if _, err := pickCells("base,nope"); err == nil {
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
	cs, _ := pickCells("pool-slowdown")
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
