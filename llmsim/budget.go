package llmsim

import (
	"slices"
	"time"
)

// planBudget is the budget scheduler's next step (Config.Scheduler
// "budget"), after vLLM v1's scheduler (vllm/v1/core/sched/scheduler.py)
// and SGLang's: one token budget a step (max_num_batched_tokens), shared by
// every running sequence, one token for each that decodes and a chunk of
// prefill for each that has not finished its prefill, served oldest first;
// then the waiting queue in order while the budget, the slots and the KV
// cache allow. A sequence holds the KV of every token it has computed.
//
// A running sequence whose tokens do not fit in the KV cache preempts the
// newest running one by recompute: its KV is dropped and it goes back to the
// front of the queue, to prefill its prompt and what it has generated again
// before it generates on (what it streamed stays streamed). Nothing new is
// admitted in a step that preempted, as in vLLM. The oldest sequence always
// progresses: MaxModelLen is capped to the KV cache, so it fits alone.
func (e *engine) planBudget(cfg Config) stepPlan {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := stepPlan{prefill: map[*seq]int{}}
	budget := cfg.StepTokens
	used := e.kvUsed()
	prefillTokens := 0
	preempted := false
	for i := 0; i < len(e.running) && budget > 0; i++ {
		q := e.running[i]
		n := 1
		if q.prefillLeft > 0 {
			n = min(q.prefillLeft, budget)
		}
		for used+n > cfg.KVTokens && i < len(e.running) {
			used -= e.preemptNewest()
			preempted = true
		}
		if i == len(e.running) { // q preempted itself: it was the newest
			break
		}
		q.kv += n
		used += n
		budget -= n
		if q.prefillLeft > 0 {
			p.prefill[q] = n
			prefillTokens += n
			continue
		}
		p.decode = append(p.decode, q)
	}
	now := time.Now()
	for !preempted && budget > 0 && len(e.running) < cfg.MaxRunning && len(e.waiting) > 0 {
		q := e.waiting[0]
		// a preempted sequence recomputes its output too: only its prompt
		// can be in the prefix cache, and at least one token is computed
		tokens := q.prompt + q.generated
		cached := min(e.cache.lookup(q.blocks)*cfg.BlockTokens, q.prompt, tokens-1)
		n := min(tokens-cached, budget)
		if used+cached+n > cfg.KVTokens {
			break // first come, first served: the head waits for room
		}
		e.waiting[0] = nil
		e.waiting = e.waiting[1:]
		e.cache.lookupAndInsert(q.blocks)
		q.cached, q.prefillLeft, q.kv = cached, tokens-cached, cached+n
		q.admitted = now
		if !q.resumed { // the prefix cache counters count each request once
			e.srv.stats.cachedTokens.Add(int64(q.cached))
			e.srv.stats.queryTokens.Add(int64(q.prompt))
		}
		e.running = append(e.running, q)
		used += cached + n
		budget -= n
		p.prefill[q] = n
		prefillTokens += n
	}
	d := cfg.DecodeBase + time.Duration(len(p.decode))*cfg.DecodePerSeq + time.Duration(prefillTokens)*cfg.PrefillPerToken
	p.duration = time.Duration(float64(d) / cfg.Speed)
	return p
}

// preemptNewest drops the KV of the newest running sequence and puts it at
// the front of the queue; it returns the KV tokens it held. Called with
// e.mu held.
func (e *engine) preemptNewest() int {
	last := len(e.running) - 1
	q := e.running[last]
	e.running[last] = nil
	e.running = e.running[:last]
	held := q.kv
	q.kv, q.cached, q.prefillLeft, q.resumed = 0, 0, 0, true
	e.waiting = slices.Insert(e.waiting, 0, q)
	e.srv.stats.preemptions.Add(1)
	return held
}

// kvUsed is the KV tokens the running sequences hold. Called with e.mu held.
func (e *engine) kvUsed() int {
	n := 0
	for _, q := range e.running {
		n += q.kv
	}
	return n
}
