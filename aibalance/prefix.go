package aibalance

import (
	"math"
	"sync"
	"sync/atomic"
)

var (
	float64bits     = math.Float64bits
	float64frombits = math.Float64frombits
)

// Prefix affinity as a model input.
//
// An engine with a prefix cache (vLLM's automatic prefix caching, SGLang's
// radix cache) skips the prefill of the leading prompt tokens it still holds
// in KV memory: for a long shared system prompt or a growing chat history
// that is most of the time to first token. So the balancer estimates, for
// each candidate, how many of this request's leading tokens that backend
// still holds, and the latency model predicts the time to first token from
// the uncached prompt tokens only. Affinity and load are then one decision
// (the idea of NVIDIA Dynamo's KV router and llm-d's predicted-latency
// scheduler): a backend holding the prefix wins while its queue is short,
// and loses on its own once its predicted wait outweighs the prefill it
// saves. No separate affinity weight has to be balanced against load — the
// failure llm-d's README warns of, and the collapse FIELD.md reports for
// affinity that ignores load.
//
// What a backend holds is estimated from what the balancer sent it: a
// bounded index of the chain hashes of the prompt blocks of recent requests
// (Features.PrefixHashes: equal hashes mean equal prefixes up to that
// block). An engine's cache is an LRU of KV blocks, so the index is one
// too, approximately and in O(1): two generations of a hash set, the older
// dropped when the newer fills. Sized to the engine's KV capacity (from its
// metrics when it reports its cache geometry, else the configured size), it
// forgets roughly when the engine does. The engine's own counters (vLLM's
// prefix_cache_hits_total against prefix_cache_queries_total) calibrate how
// far the estimate is trusted: another client's traffic, the running
// requests' KV and the output tokens also evict, which the index cannot see.

// prefixIndex is one backend's record of the prompt blocks recently sent to
// it. Lookups take a read lock of the backend's own index; no lock is shared
// between backends.
type prefixIndex struct {
	mu       sync.RWMutex
	cur, old map[uint64]struct{}
	limit    int // blocks per generation; 0: the default

	// calibration: what the balancer expected the engine to hit since the
	// last scrape, and the resulting trust in the estimate (float64 bits,
	// 0..1; 1 until the engine's counters say otherwise)
	expected atomic.Int64 // cached tokens expected, summed
	trust    atomic.Uint64
	hits     atomic.Pointer[hitSample]
}

type hitSample struct {
	hits, queries float64
	expected      int64
}

// DefaultPrefixBlocks is the default index size per backend, in blocks per
// generation (two generations are kept): 16384 blocks of 16 tokens is
// 262144 tokens, the KV capacity of a mid-sized model on one GPU, in about
// 1.5 MiB.
const DefaultPrefixBlocks = 16384

// add records that the leading blocks with these chain hashes were sent.
func (x *prefixIndex) add(hashes []uint64, limit int) {
	if len(hashes) == 0 {
		return
	}
	if limit <= 0 {
		limit = DefaultPrefixBlocks
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.cur == nil {
		x.cur = make(map[uint64]struct{}, min(limit, 1024))
	}
	for _, h := range hashes {
		if _, ok := x.cur[h]; ok {
			continue
		}
		if len(x.cur) >= limit {
			// the older generation is forgotten: an LRU's oldest blocks
			x.old, x.cur = x.cur, make(map[uint64]struct{}, min(limit, 1024))
		}
		x.cur[h] = struct{}{}
	}
}

// match returns how many leading blocks of hashes the index holds. Chain
// hashes make the held blocks a prefix (a block is sent only after those
// before it), so a binary search finds the longest; an eviction that broke
// the chain makes it an estimate.
func (x *prefixIndex) match(hashes []uint64) int {
	if len(hashes) == 0 {
		return 0
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	has := func(i int) bool {
		h := hashes[i]
		if _, ok := x.cur[h]; ok {
			return true
		}
		_, ok := x.old[h]
		return ok
	}
	lo, hi := 0, len(hashes) // blocks [0, lo) held; [hi, n) not
	for lo < hi {
		mid := (lo + hi) / 2
		if has(mid) {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo
}

// size is the number of blocks the index holds.
func (x *prefixIndex) size() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.cur) + len(x.old)
}

// CachedTokens estimates how many of the request's leading prompt tokens
// the backend still holds in its prefix cache: the blocks of f's prefix the
// balancer sent it lately, times the tokens per block, scaled by the trust
// the engine's own hit counters give the estimate, and never more than the
// prompt.
func (b *Backend) CachedTokens(f *Features, blockTokens float64) int {
	session := b.SessionCachedTokens(f)
	if len(f.PrefixHashes) == 0 || blockTokens <= 0 {
		return session
	}
	n := b.prefix.match(f.PrefixHashes)
	if n == 0 {
		return session
	}
	cached := float64(n) * blockTokens * b.PrefixTrust()
	return max(min(int(cached), f.PromptTokens), session)
}

// HoldsPrefix reports whether the backend holds at least the first block
// of f's prompt.
func (b *Backend) HoldsPrefix(f *Features) bool {
	if b.HoldsSession(f) {
		return true
	}
	if len(f.PrefixHashes) == 0 {
		return false
	}
	return b.prefix.match(f.PrefixHashes[:1]) > 0
}

// RecordPrefix records that f's prompt was sent to the backend, and the
// cached tokens the balancer expected there (for the calibration). The
// index holds about as many blocks as the engine's KV cache when the engine
// reports its geometry (blockTokens tokens per block), at most limit per
// generation.
func (b *Backend) RecordPrefix(f *Features, expected int, blockTokens float64, limit int) {
	if limit <= 0 {
		limit = DefaultPrefixBlocks
	}
	if c := b.prefixCapacity.Load(); c > 0 && blockTokens > 0 {
		// two generations hold between one and two limits: about the
		// engine's capacity on average
		limit = min(limit, max(int(2*float64(c)/blockTokens/3), 64))
	}
	b.prefix.add(f.PrefixHashes, limit)
	if f.SessionKey != 0 {
		b.sessions.add(f.SessionKey, f.PromptTokens, sessionLimit)
	}
	if expected > 0 {
		b.prefix.expected.Add(int64(expected))
	}
}

// PrefixTrust is how far the backend's cached-token estimates are trusted,
// 0..1: 1 until its engine reports prefix cache counters.
func (b *Backend) PrefixTrust() float64 {
	bits := b.prefix.trust.Load()
	if bits == 0 {
		return 1
	}
	return float64frombits(bits) - 1 // stored +1 so that 0 bits means unset
}

// PrefixBlocks is how many prompt blocks the backend's index holds.
func (b *Backend) PrefixBlocks() int { return b.prefix.size() }

// calibratePrefix compares the engine's prefix cache hits since the last
// sample with what the balancer expected, and moves the trust toward their
// ratio (an exponential average, so one noisy scrape does not swing it).
// The engine's hits include other clients' and its own reuse; the ratio is
// capped at 1.
func (b *Backend) calibratePrefix(m EngineMetrics) {
	if m.CacheTokens > 0 {
		b.prefixCapacity.Store(int64(m.CacheTokens))
	}
	if !m.HasPrefixCache {
		return
	}
	exp := b.prefix.expected.Load()
	prev := b.prefix.hits.Swap(&hitSample{hits: m.PrefixHits, queries: m.PrefixQueries, expected: exp})
	if prev == nil || m.PrefixHits < prev.hits || m.PrefixQueries < prev.queries {
		return // first sample, or the engine restarted
	}
	dExp := float64(exp - prev.expected)
	if dExp < 1024 {
		return // too little expected to judge
	}
	ratio := min((m.PrefixHits-prev.hits)/dExp, 1)
	t := b.PrefixTrust()
	t += 0.3 * (ratio - t)
	b.prefix.trust.Store(float64bits(min(max(t, 0.05), 1) + 1))
}

// sessionIndex is one backend's record of the sessions recently sent to
// it, with the prompt size of each one's latest request: a chat session's
// next request starts with the history its latest one sent, which the
// engine then holds. Two generations, like prefixIndex.
type sessionIndex struct {
	mu       sync.RWMutex
	cur, old map[uint64]int32
}

func (x *sessionIndex) add(key uint64, prompt, limit int) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.cur == nil {
		x.cur = make(map[uint64]int32, min(limit, 1024))
	}
	if _, ok := x.cur[key]; !ok && len(x.cur) >= limit {
		x.old, x.cur = x.cur, make(map[uint64]int32, min(limit, 1024))
	}
	x.cur[key] = int32(min(prompt, 1<<30))
}

func (x *sessionIndex) get(key uint64) (int, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	if v, ok := x.cur[key]; ok {
		return int(v), true
	}
	v, ok := x.old[key]
	return int(v), ok
}

// sessionLimit bounds each backend's session index per generation.
const sessionLimit = 8192

// SessionCachedTokens estimates the leading prompt tokens the backend holds
// for f's session: the prompt of the session's latest request sent there,
// never more than this prompt, scaled by the trust in the estimates.
func (b *Backend) SessionCachedTokens(f *Features) int {
	if f.SessionKey == 0 {
		return 0
	}
	last, ok := b.sessions.get(f.SessionKey)
	if !ok {
		return 0
	}
	return int(float64(min(last, f.PromptTokens)) * b.PrefixTrust())
}

// HoldsSession reports whether the backend served f's session lately.
func (b *Backend) HoldsSession(f *Features) bool {
	if f.SessionKey == 0 {
		return false
	}
	_, ok := b.sessions.get(f.SessionKey)
	return ok
}
