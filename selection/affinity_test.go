package selection

import (
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// convHashes is the prefix chain of turn t of conversation c: its earlier
// turns' blocks, then new ones.
func convHashes(c, turn int) []uint64 {
	out := make([]uint64, 0, 4*(turn+1))
	h := uint64(c+1) * 0x9e3779b97f4a7c15
	for i := 0; i < 4*(turn+1); i++ {
		h = mix64(h + uint64(i))
		out = append(out, h)
	}
	return out
}

// TestAffinityAgreesAcrossInstances: two independent instances of the
// policy (each with its own backend state, as two Caddy instances would
// have), fed the same request stream, send the same conversation to the
// same backend: they agree on at least 90% of decisions.
func TestAffinityAgreesAcrossInstances(t *testing.T) {
	on := agreement(t, true)
	off := agreement(t, false)
	t.Logf("two instances agreed on %.0f%% of decisions with affinity prefix, %.0f%% with affinity none", 100*on, 100*off)
	if on < 0.9 || off >= on {
		t.Fatalf("agreement %.2f with affinity, %.2f without: want at least 0.9, and more than without", on, off)
	}
}

func agreement(t *testing.T, affinity bool) float64 {
	pool := testPool(t, 4)
	mk := func() *AIPredictiveSelection {
		p := newPredictive(2, false)
		p.set = aibalance.BackendSet{Private: true}
		p.affinity = affinity
		p.pool.SetAffinity(affinity)
		return p
	}
	a, b := mk(), mk()
	type inflight struct {
		p   *AIPredictiveSelection
		att aibalance.Attempt
	}
	var window []inflight
	agree, total := 0, 0
	now := time.Now()
	bt := a.app.BlockTokens()
	for i := 0; i < 400; i++ {
		c, turn := i%40, i/40
		f := &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 64 * (turn + 1), OutputTokens: 50, PrefixHashes: convHashes(c, turn)}
		var picks [2]string
		for j, p := range []*AIPredictiveSelection{a, b} {
			r := varsRequest()
			ff := p.app.Features(r)
			*ff = *f
			u := p.Select(pool, r, nil)
			picks[j] = u.Dial
			be := p.set.Get(u.Dial)
			cached := be.CachedTokens(ff, bt)
			be.RecordPrefix(ff, cached, bt, 0)
			window = append(window, inflight{p, be.BeginCached(ff, cached, p.pool.Prior(), now)})
		}
		total++
		if picks[0] == picks[1] {
			agree++
		}
		for len(window) > 16 { // a bounded number in flight, oldest first
			w := window[0]
			window = window[1:]
			w.att.End(aibalance.Outcome{Status: 200, Stream: true, TTFT: 100 * time.Millisecond, E2E: time.Second, OutputTokens: 50}, w.p.app.Lambda(), w.p.pool.Prior(), now)
		}
		now = now.Add(50 * time.Millisecond)
	}
	return float64(agree) / float64(total)
}
