// Package llmsim simulates an OpenAI-compatible LLM inference server with the
// timing of a vLLM-like engine: continuous batching with a bounded number of
// running sequences and a waiting queue, chunked prefill whose cost is the
// prompt tokens not already in the prefix cache, decode steps that slow down
// as the batch grows, and a speed factor per instance. It serves
// /v1/chat/completions, /v1/completions, /v1/responses and Anthropic's
// /v1/messages (streaming and not), /v1/embeddings (prefill only),
// /v1/models, /health and vLLM-named Prometheus /metrics, and injects faults
// on demand. Stream styles vary per engine (Python-spaced JSON, reasoning
// deltas) and an engine can change speed mid-run. A second engine model
// (Config.Scheduler "budget", budget.go) shares a per-step token budget
// between decode and prefill and preempts by recompute when its KV cache is
// full, as vLLM v1 and SGLang do.
//
// Tests and benchmarks start servers in-process on loopback (Start, StartPool);
// examples/llmsim is the command.
package llmsim

import (
	"container/list"
	"sync"
	"time"
)

// seq is one request inside the engine.
type seq struct {
	prompt      int // prompt tokens
	cached      int // prompt tokens found in the prefix cache
	prefillLeft int
	maxTokens   int
	generated   int
	tokens      chan struct{} // one value per generated token; closed at the end
	admitted    time.Time
	aborted     bool
	blocks      []uint64
	kv          int  // KV tokens held (budget scheduler)
	resumed     bool // preempted before: its admission recomputes prompt and output
}

// engine is the scheduler: one goroutine steps the batch.
type engine struct {
	mu      sync.Mutex
	wake    chan struct{}
	waiting []*seq
	running []*seq
	cache   *prefixCache
	srv     *Server
	budget  bool // the budget scheduler (budget.go)
}

func newEngine(s *Server) *engine {
	blocks := s.cfg.CacheBlocks
	budget := s.cfg.Scheduler == SchedulerBudget
	if budget {
		// cached blocks live in the KV cache: it holds no more of them
		blocks = min(blocks, s.cfg.KVTokens/s.cfg.BlockTokens)
	}
	return &engine{wake: make(chan struct{}, 1), cache: newPrefixCache(blocks), srv: s, budget: budget}
}

func (e *engine) submit(q *seq) {
	e.mu.Lock()
	e.waiting = append(e.waiting, q)
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *engine) abort(q *seq) {
	e.mu.Lock()
	q.aborted = true
	e.mu.Unlock()
}

func (e *engine) counts() (running, waiting, kvTokens int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.budget {
		return len(e.running), len(e.waiting), e.kvUsed()
	}
	for _, q := range e.running {
		kvTokens += q.prompt + q.generated
	}
	return len(e.running), len(e.waiting), kvTokens
}

// maxLag is how far the engine may fall behind its own step schedule (a
// late timer, a busy CPU) and still catch up by shortening the next steps.
const maxLag = 20 * time.Millisecond

// run steps the engine until done is closed. Steps are scheduled back to
// back on the engine's own clock, so a timer that fires late does not slow
// the simulated engine down (up to maxLag behind).
func (e *engine) run(done <-chan struct{}) {
	var due time.Time // when the last step was to end
	for {
		e.mu.Lock()
		e.dropAborted()
		idle := len(e.running) == 0 && len(e.waiting) == 0
		e.mu.Unlock()
		if idle {
			due = time.Time{}
			select {
			case <-e.wake:
				continue
			case <-done:
				return
			}
		}
		step := e.plan()
		if now := time.Now(); due.IsZero() || now.Sub(due) > maxLag {
			due = now
		}
		due = due.Add(step.duration)
		t := time.NewTimer(time.Until(due))
		select {
		case <-t.C:
		case <-done:
			t.Stop()
			return
		}
		e.apply(step)
	}
}

type stepPlan struct {
	duration time.Duration
	prefill  map[*seq]int // tokens of prefill done this step
	decode   []*seq
}

func (e *engine) dropAborted() {
	e.running = keepLive(e.running)
	e.waiting = keepLive(e.waiting)
}

// keepLive removes aborted sequences from list, ending their token streams.
func keepLive(list []*seq) []*seq {
	keep := list[:0]
	for _, q := range list {
		if q.aborted {
			close(q.tokens)
			continue
		}
		keep = append(keep, q)
	}
	clear(list[len(keep):])
	return keep
}

// plan admits waiting sequences into free slots and works out the next
// step: chunked prefill up to PrefillChunk tokens, one decode token for
// every sequence past its prefill.
func (e *engine) plan() stepPlan {
	cfg := e.srv.config()
	if e.budget {
		return e.planBudget(cfg)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now()
	for len(e.running) < cfg.MaxRunning && len(e.waiting) > 0 {
		q := e.waiting[0]
		e.waiting[0] = nil
		e.waiting = e.waiting[1:]
		hit := e.cache.lookupAndInsert(q.blocks)
		q.cached = min(hit*cfg.BlockTokens, q.prompt)
		// like vLLM, at least one token is always computed
		q.prefillLeft = max(q.prompt-q.cached, 1)
		q.admitted = now
		e.running = append(e.running, q)
		e.srv.stats.cachedTokens.Add(int64(q.cached))
		e.srv.stats.queryTokens.Add(int64(q.prompt))
	}
	p := stepPlan{prefill: map[*seq]int{}}
	budget := cfg.PrefillChunk
	prefillTokens := 0
	for _, q := range e.running {
		if q.prefillLeft > 0 {
			if budget == 0 {
				continue
			}
			n := min(q.prefillLeft, budget)
			budget -= n
			prefillTokens += n
			p.prefill[q] = n
			continue
		}
		p.decode = append(p.decode, q)
	}
	d := cfg.DecodeBase + time.Duration(len(p.decode))*cfg.DecodePerSeq + time.Duration(prefillTokens)*cfg.PrefillPerToken
	p.duration = time.Duration(float64(d) / cfg.Speed)
	return p
}

// apply advances the sequences of a finished step and emits their tokens.
func (e *engine) apply(p stepPlan) {
	e.mu.Lock()
	defer e.mu.Unlock()
	emit := func(q *seq) {
		if q.aborted {
			return
		}
		q.generated++
		q.tokens <- struct{}{}
	}
	for q, n := range p.prefill {
		q.prefillLeft -= n
		if q.prefillLeft == 0 {
			emit(q) // the step that completes prefill yields the first token
		}
	}
	for _, q := range p.decode {
		emit(q)
	}
	keep := e.running[:0]
	for _, q := range e.running {
		if q.aborted || q.generated >= q.maxTokens {
			close(q.tokens)
			continue
		}
		keep = append(keep, q)
	}
	clear(e.running[len(keep):])
	e.running = keep
}

// prefixCache is an LRU of prompt block hashes, like vLLM's automatic prefix
// caching: a block is reusable only if every block before it is too.
type prefixCache struct {
	capacity int
	order    *list.List // front = most recent
	index    map[uint64]*list.Element
}

func newPrefixCache(capacity int) *prefixCache {
	return &prefixCache{capacity: capacity, order: list.New(), index: map[uint64]*list.Element{}}
}

// lookup returns how many leading blocks are cached.
func (c *prefixCache) lookup(blocks []uint64) int {
	hits := 0
	for _, h := range blocks {
		if _, ok := c.index[h]; !ok {
			break
		}
		hits++
	}
	return hits
}

// lookupAndInsert returns how many leading blocks were cached, then caches all.
func (c *prefixCache) lookupAndInsert(blocks []uint64) int {
	hits := c.lookup(blocks)
	for _, h := range blocks {
		if el, ok := c.index[h]; ok {
			c.order.MoveToFront(el)
			continue
		}
		c.index[h] = c.order.PushFront(h)
		for c.order.Len() > c.capacity {
			old := c.order.Back()
			c.order.Remove(old)
			delete(c.index, old.Value.(uint64))
		}
	}
	return hits
}

// blockHashes chain-hashes text in blocks of blockChars bytes (FNV-1a over
// the whole prefix, sampled at each block's end). A partial last block is
// not cacheable, as in vLLM.
func blockHashes(text string, blockChars int) []uint64 {
	if blockChars <= 0 {
		return nil
	}
	out := make([]uint64, 0, len(text)/blockChars)
	h := uint64(14695981039346656037)
	for i := 0; i < len(text); i++ {
		h ^= uint64(text[i])
		h *= 1099511628211
		if (i+1)%blockChars == 0 {
			out = append(out, h)
		}
	}
	return out
}
