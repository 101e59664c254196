package healthcheck

import (
	"fmt"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// Outlier ejection compares the backends of one pool on the same footing:
// each one's learned model predicts a reference request (500 prompt tokens,
// 200 output tokens) at the same light load (one request running), so a
// backend that is simply busier is not taken for a slower one. A backend
// whose prediction is more than the configured factor times the pool's
// median is ejected for a while (Envoy's outlier detection, on latency
// instead of errors), never more than max_ejected_percent of the pool at
// once; when the ejection ends it ramps up by slow start. It is ejected
// again only on new evidence: its model must have learned from new
// requests since (an ejected backend gets none, and its old speed must not
// keep it out forever).

const (
	// outlierMinSamples is how much a model must have learned to be judged
	// or to judge.
	outlierMinSamples = 20
	// outlierMinPeers is the fewest learned backends a median is taken of.
	outlierMinPeers = 3
	// outlierNewSamples is the new evidence needed to eject again.
	outlierNewSamples = 10
	// OutlierInterval is how often a pool is checked.
	OutlierInterval = time.Second
)

var outlierRef = aibalance.LoadState{Inflight: 1, Running: 1}

// EjectOutliers checks the pool's members (get returns a member's
// backend) at now and ejects the outliers, logging each ejection.
func EjectOutliers(pool *aibalance.Pool, get func(string) *aibalance.Backend, now time.Time, c *aibalance.HealthConfig, log *zap.Logger) {
	if c.OutlierFactor <= 1 {
		return
	}
	type judged struct {
		b       *aibalance.Backend
		e2e     float64
		samples int64
	}
	members := pool.Members()
	var learned []judged
	ejected := 0
	for _, addr := range members {
		b := get(addr)
		if out, _, _ := b.Ejected(now); out {
			ejected++
			continue
		}
		n := b.Model().Stats().Samples
		if n < outlierMinSamples {
			continue
		}
		p := b.Model().Predict(outlierRef, 500, 200, pool.Prior(), now)
		learned = append(learned, judged{b: b, e2e: p.E2E.Seconds(), samples: n})
	}
	if len(learned) < outlierMinPeers {
		return
	}
	sort.Slice(learned, func(i, j int) bool { return learned[i].e2e < learned[j].e2e })
	median := learned[len(learned)/2].e2e
	if len(learned)%2 == 0 {
		median = (learned[len(learned)/2-1].e2e + median) / 2
	}
	limit := c.MaxEjectedPercent * len(members) / 100
	for i := len(learned) - 1; i >= 0 && ejected < limit; i-- {
		j := learned[i]
		if j.e2e <= c.OutlierFactor*median {
			break
		}
		if prev := j.b.EjectedSamples(); prev > 0 && j.samples < prev+outlierNewSamples {
			continue
		}
		d := time.Duration(c.EjectionDuration)
		reason := fmt.Sprintf("outlier: a reference request takes %.3gs here, %.1f× the pool's median %.3gs (factor %g); out for %s",
			j.e2e, j.e2e/median, median, c.OutlierFactor, d)
		j.b.Eject(now.Add(d), reason, j.samples)
		ejected++
		if log != nil {
			log.Warn("upstream ejected", zap.String("upstream", j.b.Addr()), zap.String("reason", reason))
		}
	}
}
