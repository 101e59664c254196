package healthcheck

import (
	"fmt"
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

var poolSeq int

// outlierPool is n backends whose models learned a speed each: slow[i]
// times the base latency.
func outlierPool(t *testing.T, slow ...float64) (*aibalance.Pool, *aibalance.BackendSet, []*aibalance.Backend) {
	t.Helper()
	set := new(aibalance.BackendSet)
	t.Cleanup(set.Release)
	poolSeq++
	pool := aibalance.NewPool(fmt.Sprint(t.Name(), poolSeq))
	now := time.Unix(1000, 0)
	var bs []*aibalance.Backend
	for i, f := range slow {
		addr := fmt.Sprintf("outlier-%s-%d-%d", t.Name(), poolSeq, i)
		pool.AddMember(addr)
		b := set.Get(addr)
		for k := 0; k < 40; k++ {
			ttft := time.Duration(f * float64(50*time.Millisecond))
			e2e := ttft + time.Duration(f*float64(100*10*time.Millisecond))
			b.Model().Observe(aibalance.Observation{State: aibalance.LoadState{Inflight: 1, Running: 1}, Stream: true, PromptTokens: 500, OutputTokens: 100, TTFT: ttft, E2E: e2e}, 0.99, pool.Prior(), now)
		}
		bs = append(bs, b)
	}
	return pool, set, bs
}

func TestOutlierEjection(t *testing.T) {
	c := aibalance.HealthConfig{OutlierFactor: 3}.WithDefaults()
	now := time.Unix(1000, 0)

	pool, set, bs := outlierPool(t, 1, 1.1, 0.9, 5)
	EjectOutliers(pool, set.Get, now, &c, nil)
	for i, b := range bs {
		out, why, until := b.Ejected(now)
		if out != (i == 3) {
			t.Fatalf("backend %d (speed ×%v): ejected %v", i, []float64{1, 1.1, 0.9, 5}[i], out)
		}
		if out {
			t.Logf("ejected until +%s: %s", until.Sub(now), why)
		}
	}
	// the ejection ends, and the same evidence does not eject it again
	later := now.Add(time.Duration(c.EjectionDuration) + time.Second)
	EjectOutliers(pool, set.Get, later, &c, nil)
	if out, _, _ := bs[3].Ejected(later); out {
		t.Fatal("ejected again on the evidence it was ejected on")
	}
	if r := bs[3].Ramp(later, time.Duration(c.SlowStart), c.SlowStartMin); r >= 1 {
		t.Fatalf("back from ejection without slow start: ramp %.2f", r)
	}

	// never more than max_ejected_percent of the pool
	c.MaxEjectedPercent = 25
	pool, set, bs = outlierPool(t, 1, 1, 1, 1, 6, 8, 10, 1)
	EjectOutliers(pool, set.Get, now, &c, nil)
	n := 0
	for _, b := range bs {
		if out, _, _ := b.Ejected(now); out {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d of 8 ejected with max_ejected 25%%", n)
	}
	if out, _, _ := bs[6].Ejected(now); !out {
		t.Fatal("the slowest was not among the ejected")
	}

	// off, or too few learned peers: nothing
	off := aibalance.HealthConfig{}.WithDefaults()
	pool, set, bs = outlierPool(t, 1, 9, 1)
	EjectOutliers(pool, set.Get, now, &off, nil)
	pool2, set2, bs2 := outlierPool(t, 1, 9)
	EjectOutliers(pool2, set2.Get, now, &c, nil)
	for _, b := range append(bs, bs2...) {
		if out, _, _ := b.Ejected(now); out {
			t.Fatal("ejected with outlier ejection off or with fewer than 3 learned backends")
		}
	}
}
