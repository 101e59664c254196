package aibalance

import (
	"math"
	"sync/atomic"
	"time"
)

// EngineMetrics is what an inference engine reports about itself on its
// Prometheus endpoint, read by a scraper (package healthcheck): its queue,
// its running batch and its KV cache use. A value the engine does not
// export has its Has flag false. At is when the values were read; values
// older than their scraper's freshness window are ignored (see
// Backend.Engine).
type EngineMetrics struct {
	Waiting    float64 // requests queued in the engine, not yet scheduled
	Running    float64 // requests in the engine's running batch
	KVUsage    float64 // KV cache use, 0..1
	HasWaiting bool
	HasRunning bool
	HasKV      bool
	// Engine is the engine the scraper recognised: vllm, sglang, tgi, llamacpp.
	Engine string
	// PrefixHits and PrefixQueries are the engine's prefix cache counters
	// in tokens (vLLM's prefix_cache_hits_total, prefix_cache_queries_total)
	// when HasPrefixCache; CacheTokens is its KV cache capacity in tokens
	// (num_gpu_blocks × block_size of vLLM's cache_config_info), 0 unknown.
	PrefixHits, PrefixQueries float64
	HasPrefixCache            bool
	CacheTokens               float64
	// StartTime is the engine process's start (unix seconds) when it
	// exports process_start_time_seconds; 0 when not. A change is a restart.
	StartTime float64
	At        time.Time
}

// engineState holds the latest engine metrics of a backend, published
// whole through an atomic pointer so readers on the request path take no lock.
type engineState struct {
	latest atomic.Pointer[engineSample]
}

type engineSample struct {
	m      EngineMetrics
	maxAge time.Duration
	// what this balancer itself had at the backend when the sample came:
	// the rest of the engine's load is other clients' (other Caddy
	// instances, direct users), which persists between scrapes, while our
	// own is counted live
	ownPending, ownRunning float64
}

// SetEngine publishes fresh engine metrics for the backend. maxAge is how
// long they may be trusted: the scraper passes a few of its intervals.
func (b *Backend) SetEngine(m EngineMetrics, maxAge time.Duration) {
	if m.At.IsZero() {
		m.At = time.Now()
	}
	pending := float64(b.pending.Load())
	running := max(float64(b.inflight.Load())-pending, 0)
	prev := b.engine.latest.Swap(&engineSample{m: m, maxAge: maxAge, ownPending: pending, ownRunning: running})
	b.learnSlots(m, prev)
	b.calibratePrefix(m)
}

// external returns the part of a fresh engine sample that is not this
// balancer's own requests: other clients' queue and batch.
func (b *Backend) external(now time.Time) (waiting, running, kv float64, ok bool) {
	s := b.engine.latest.Load()
	if s == nil || !s.fresh(now) {
		return 0, 0, 0, false
	}
	if s.m.HasWaiting {
		// an engine's waiting count includes requests of ours between
		// arrival and the scheduler's next step: ours are counted live
		waiting = max(b.queuedSince(s, s.m.Waiting-s.ownPending, now), 0)
	}
	if s.m.HasRunning {
		running = max(s.m.Running-s.ownRunning, 0)
	}
	if s.m.HasWaiting && s.m.HasRunning {
		// a non-streaming request of ours shows no first token, so the
		// balancer counts it running while the engine may still queue
		// it: what is not ours is at most the engine's total less ours
		others := max(s.m.Waiting+s.m.Running-s.ownPending-s.ownRunning, 0)
		waiting = min(waiting, others)
		running = min(running, others-waiting)
	}
	if s.m.HasKV {
		kv = min(max(s.m.KVUsage, 0), 1)
	}
	return waiting, running, kv, true
}

// learnSlots raises the known batch capacity when the engine reports a
// larger batch running. It never lowers it: an engine's waiting count
// includes requests that arrived during the current step (a long prefill
// step holds them for tens of milliseconds), so a queue seen on a scrape
// does not mean the batch is full. Saturation is learned from the waits
// the balancer observes itself (see Attempt.FirstToken).
//
// Apart from that, a queue beside the same running batch on two scrapes in
// a row is taken as a full batch (EngineSlots, which Capacity falls back
// on for Full, the queue wait and admission): a queue that persists a
// scrape interval later behind an unchanged batch is one (vLLM's
// max_num_seqs, or its KV blocks), and it is how a pool that sees only
// non-streaming requests (no first token, so no observed wait) is known
// full.
func (b *Backend) learnSlots(m EngineMetrics, prev *engineSample) {
	if !m.HasRunning || m.Running < 1 {
		return
	}
	r := int64(m.Running)
	b.raiseSeen(r)
	if r > b.slots.Load() && b.slots.Load() > 0 {
		b.setSlots(r, m.At)
	}
	if m.HasWaiting && m.Waiting >= 1 && prev != nil && prev.m.HasWaiting && prev.m.Waiting >= 1 &&
		int64(prev.m.Running) == r && m.At.Sub(prev.m.At) <= prev.maxAge {
		b.engineSlots.Store(r)
		b.engineSlotsAt.Store(m.At.UnixNano())
	}
}

// EngineSlots is the batch capacity the engine's own counts showed full
// lately (see learnSlots), or 0 when unknown or older than staleAfter.
func (b *Backend) EngineSlots(now time.Time) int64 {
	if now.UnixNano()-b.engineSlotsAt.Load() > int64(staleAfter) {
		return 0
	}
	return b.engineSlots.Load()
}

// ClearEngine forgets the backend's engine metrics (its scraper stopped).
func (b *Backend) ClearEngine() { b.engine.latest.Store(nil) }

// Engine returns the backend's latest engine metrics and whether they are
// fresh at now. Stale metrics are returned for display but must not be used
// for routing.
func (b *Backend) Engine(now time.Time) (m EngineMetrics, fresh bool) {
	s := b.engine.latest.Load()
	if s == nil {
		return EngineMetrics{}, false
	}
	return s.m, s.fresh(now)
}

// queuedSince is what remains at now of a queue of n the sample showed:
// the engine has drained it since at no less than this balancer's own
// recent rate to the backend (its completions of other clients' requests
// come on top, unseen). A sample is up to a few scrape intervals old, many
// request lifetimes of a fast engine: a queue it showed is not one now.
func (b *Backend) queuedSince(s *engineSample, n float64, now time.Time) float64 {
	if age := now.Sub(s.m.At).Seconds(); age > 0 {
		n -= age * b.RecentRate(now)
	}
	return n
}

// fresh reports whether the sample may be used for routing at now: not
// older than its maxAge (nor from the future), and made of numbers.
func (s *engineSample) fresh(now time.Time) bool {
	age := now.Sub(s.m.At)
	return age <= s.maxAge && age >= -time.Second && !math.IsNaN(s.m.Waiting+s.m.Running+s.m.KVUsage)
}
