package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/aibalance/caddy-aibalance/llmsim"
)

// cell is one scenario of the matrix: a pool, a workload and a load.
type cell struct {
	name    string
	about   string          // what differs from the base cell
	engines []llmsim.Config // Speed is relative: the matrix's time scale multiplies it
	// slowIndex is the engine whose speed slowSteps change; -1 for none.
	slowIndex int
	slowSteps []slowStep
	// killIndex is the engine stopped (listener and connections closed:
	// its streams are cut) killAt into the measured window; -1 for none.
	killIndex int
	// failover configures Caddy for every policy as a deployment that
	// expects failures would: load_balancing retries 2 and passive health
	// checks (fail_duration 10s), so a refused dial marks the engine down
	// and is tried on another. Without the health check Caddy's retry may
	// pick the dead engine again (least_conn does: it has no connections).
	failover bool
	// measuredScale and timeScale multiply the matrix's measured window and
	// time scale for this cell (0: 1), so that a cell of long requests
	// still completes enough of them.
	measuredScale float64
	timeScale     float64
	fullOnly      bool // left out of the quick matrix

	minPrompt int
	maxPrompt int
	minOutput int
	maxOutput int
	nonStream float64
	burstOn   time.Duration // on/off arrivals when both are set
	burstOff  time.Duration
	load      float64 // offered load as a fraction of the pool's capacity
	warmup    bool
	scrape    bool   // the transport may scrape the engines' /metrics
	shape     string // what prompts share (llmsim.Shape*); min/maxPrompt size each new message
	// compare names policies (see matrixPolicies) this cell always runs
	// besides the matrix's own
	compare []string
}

// slowStep sets the slowed engine's speed to its own divided by factor, at
// a share of the measured window (1 restores it).
type slowStep struct {
	at     float64
	factor float64
}

// killAt is the share of the measured window after which killIndex stops.
const killAt = 1.0 / 3

// baseCell is the cell the others vary one factor at a time.
func baseCell() cell {
	return cell{
		name:      "base",
		about:     "4 engines of speeds 1, 1, 0.6, 0.3; prompts 50–500, outputs 32–256 tokens; Poisson at 60%; warm-up; metrics scraped",
		engines:   llmsim.Speeds(1, 1, 0.6, 0.3),
		slowIndex: -1,
		killIndex: -1,
		minPrompt: 50, maxPrompt: 500, minOutput: 32, maxOutput: 256,
		load:   0.6,
		warmup: true,
		scrape: true,
	}
}

// mixedFormats gives the engines a mix of stream styles: compact JSON,
// Python's spaced JSON, reasoning deltas first, and both.
func mixedFormats(cfgs []llmsim.Config) []llmsim.Config {
	out := make([]llmsim.Config, len(cfgs))
	for i, c := range cfgs {
		switch i % 4 {
		case 1:
			c.SpacedJSON = true
		case 2:
			c.ReasoningTokens = 16
		case 3:
			c.SpacedJSON, c.ReasoningTokens = true, 16
		}
		out[i] = c
	}
	return out
}

func withTiming(cfgs []llmsim.Config, base, perSeq, prefill time.Duration) []llmsim.Config {
	out := make([]llmsim.Config, len(cfgs))
	for i, c := range cfgs {
		c.DecodeBase, c.DecodePerSeq, c.PrefillPerToken = base, perSeq, prefill
		out[i] = c
	}
	return out
}

// allCells is the matrix: the base cell and one factor changed at a time.
func allCells() []cell {
	var cells []cell
	add := func(name, about string, change func(c *cell)) {
		c := baseCell()
		c.name, c.about = name, about
		change(&c)
		cells = append(cells, c)
	}
	cells = append(cells, baseCell())
	// pools
	add("pool-equal", "4 equal engines", func(c *cell) { c.engines = llmsim.Speeds(1, 1, 1, 1) })
	add("pool-8mixed", "8 engines of speeds 1, 1, 0.8, 0.8, 0.5, 0.5, 0.3, 0.3; mixed stream formats", func(c *cell) {
		c.engines = mixedFormats(llmsim.Speeds(1, 1, 0.8, 0.8, 0.5, 0.5, 0.3, 0.3))
	})
	add("pool-batch", "4 engines of speed 1 with max_running 4, 4, 64, 64", func(c *cell) {
		c.engines = llmsim.Speeds(1, 1, 1, 1)
		for i, b := range []int{4, 4, 64, 64} {
			c.engines[i].MaxRunning = b
		}
	})
	add("pool-slowdown", "the first speed-1 engine turns 3× slower a third into the measured run", func(c *cell) {
		c.slowIndex, c.slowSteps = 0, []slowStep{{1.0 / 3, 3}}
	})
	add("pool-slowrecover", "the first speed-1 engine turns 5× slower a third into the measured run and recovers at two thirds", func(c *cell) {
		c.slowIndex, c.slowSteps = 0, []slowStep{{1.0 / 3, 5}, {2.0 / 3, 1}}
		c.fullOnly = true
	})
	// failures
	add("fail-kill", "the first speed-1 engine (one of the fastest) is killed a third into the measured run: its streams are cut, its port refuses; every policy with Caddy's retries 2 and passive health checks", func(c *cell) {
		c.killIndex, c.failover = 0, true
	})
	// engine timing
	add("timing-fastdecode", "fast decode, slow prefill: decode 4ms + 0.25ms/seq, prefill 120µs/token", func(c *cell) {
		c.engines = withTiming(c.engines, 4*time.Millisecond, 250*time.Microsecond, 120*time.Microsecond)
	})
	add("timing-fastprefill", "slow decode, fast prefill: decode 16ms + 1ms/seq, prefill 15µs/token", func(c *cell) {
		c.engines = withTiming(c.engines, 16*time.Millisecond, time.Millisecond, 15*time.Microsecond)
	})
	add("noscrape", `engine metrics not scraped (transport "engine": "none", as for hosted APIs)`, func(c *cell) { c.scrape = false })
	// workloads
	add("work-longctx", "long context: prompts 2000–6000 tokens", func(c *cell) { c.minPrompt, c.maxPrompt = 2000, 6000 })
	add("work-longgen", "long generation: outputs 500–1500 tokens; mixed stream formats", func(c *cell) {
		c.minOutput, c.maxOutput = 500, 1500
		c.engines = mixedFormats(c.engines)
	})
	// about 150 requests per measured window at 60%: the window is 3× as
	// long and the engines 2× as fast (the tokens a second Caddy forwards
	// double; see presetOptions)
	add("work-reasoning", "reasoning models: outputs 2000–8000 tokens, the first 1500 streamed as reasoning_content; engines with a 16k-token context and a 256k-token KV cache; measured 3× as long, engines 2× as fast", func(c *cell) {
		c.minOutput, c.maxOutput = 2000, 8000
		for i := range c.engines {
			c.engines[i].MaxModelLen, c.engines[i].CacheBlocks, c.engines[i].ReasoningTokens = 16384, 16384, 1500
		}
		c.measuredScale, c.timeScale = 3, 2
		c.fullOnly = true
	})
	add("work-mixedstream", "50% streaming, 50% not; mixed stream formats", func(c *cell) {
		c.nonStream = 0.5
		c.engines = mixedFormats(c.engines)
	})
	add("work-bursty", "bursty arrivals: on/off periods of 1 s mean each, same mean rate", func(c *cell) {
		c.burstOn, c.burstOff = time.Second, time.Second
	})
	// loads
	for _, l := range []float64{0.3, 0.85, 1.1} {
		add(fmt.Sprintf("load-%.0f", l*100), fmt.Sprintf("offered load %.0f%% of capacity", l*100), func(c *cell) { c.load = l })
	}
	add("nowarmup", "no warm-up: cold balancer state is measured", func(c *cell) { c.warmup = false })
	// the other engine model: KV-bound, preempting. 2048 KV tokens hold
	// about 8 requests of the base cell as they average over their life
	// (prompt 195 + half of output 108), half the 16 slots: the KV cache,
	// not the slots, bounds the batch, as on a large model.
	add("engine-budget", `the budget scheduler (Config.Scheduler "budget": a 2048-token step shared by decode and chunked prefill, preemption by recompute) with a 2048-token KV cache, about 8 requests of the mean size in 16 slots`, func(c *cell) {
		for i := range c.engines {
			c.engines[i].Scheduler, c.engines[i].KVTokens = llmsim.SchedulerBudget, 2048
		}
		c.fullOnly = true
	})
	// what prompts share: prefix-cache affinity. Engines with a KV cache of
	// 16384 tokens (the working set fits the pool, not one engine) and a
	// prefill of 120 µs a token (before the time scale), so that holding a
	// prefix matters as it does on a large model.
	affinityEngines := func(c *cell) {
		c.compare = []string{"header", "ai_predictive_noaffinity"}
		c.engines = withTiming(c.engines, 8*time.Millisecond, 500*time.Microsecond, 120*time.Microsecond)
		for i := range c.engines {
			c.engines[i].CacheBlocks = 1024
		}
	}
	add("aff-chat", "engines with a 16k-token KV cache and a 120 µs/token prefill; multi-turn chat: 32 conversations of up to 16 turns, each sending its whole history (new messages 50–300 tokens, answers as long as their output)", func(c *cell) {
		c.shape, c.minPrompt, c.maxPrompt = llmsim.ShapeChat, 50, 300
		affinityEngines(c)
	})
	add("aff-prefix", "engines with a 16k-token KV cache and a 120 µs/token prefill; 48 tenants by Zipf popularity, each with its own 1200-token system prompt, and a 50–300-token question", func(c *cell) {
		c.shape, c.minPrompt, c.maxPrompt = llmsim.ShapePrefix, 50, 300
		affinityEngines(c)
	})
	add("aff-agentic", "engines with a 16k-token KV cache and a 120 µs/token prefill; 24 agent loops of up to 24 short turns after a 2500-token tool-and-instructions prefix (12 kinds of agent)", func(c *cell) {
		c.shape, c.minPrompt, c.maxPrompt = llmsim.ShapeAgentic, 20, 100
		affinityEngines(c)
	})
	return cells
}

// pickCells returns the cells named in list (comma-separated), or every
// cell of the preset (quick leaves out the fullOnly ones).
func pickCells(list, preset string) ([]cell, error) {
	all := allCells()
	if strings.TrimSpace(list) == "" {
		if preset != "quick" {
			return all, nil
		}
		var out []cell
		for _, c := range all {
			if !c.fullOnly {
				out = append(out, c)
			}
		}
		return out, nil
	}
	byName := map[string]cell{}
	var names []string
	for _, c := range all {
		byName[c.name] = c
		names = append(names, c.name)
	}
	var out []cell
	for _, n := range strings.Split(list, ",") {
		c, ok := byName[strings.TrimSpace(n)]
		if !ok {
			return nil, fmt.Errorf("unknown cell %q; cells: %s", n, strings.Join(names, ", "))
		}
		out = append(out, c)
	}
	return out, nil
}

// workload returns the cell's workload for one run (without URL and rate).
func (c cell) workload(seed uint64, warmup, measured time.Duration) llmsim.Workload {
	w := llmsim.Workload{
		MinPrompt: c.minPrompt, MaxPrompt: c.maxPrompt, MinOutput: c.minOutput, MaxOutput: c.maxOutput,
		NonStream: c.nonStream, BurstOn: c.burstOn, BurstOff: c.burstOff, Seed: seed, Shape: c.shape,
	}
	if !c.warmup {
		warmup = 0
	}
	w.Warmup = warmup
	w.Duration = warmup + measured
	return w
}

// configs returns the engines of one run: speeds multiplied by scale, the
// speed changes placed in the measured window.
func (c cell) configs(scale float64, warmup, measured time.Duration) []llmsim.Config {
	if !c.warmup {
		warmup = 0
	}
	out := make([]llmsim.Config, len(c.engines))
	for i, e := range c.engines {
		if e.Speed == 0 {
			e.Speed = 1
		}
		e.Speed *= scale
		if i == c.slowIndex {
			for _, st := range c.slowSteps {
				at := warmup + time.Duration(st.at*float64(measured))
				e.SpeedChanges = append(e.SpeedChanges, llmsim.SpeedChange{At: at, Speed: e.Speed / st.factor})
			}
		}
		out[i] = e
	}
	return out
}

// capacities is each engine's capacity in req/s, averaged over the
// measured window: an engine whose speed changes counts at each speed for
// the share of the window it runs at it, a killed engine for the share
// before the kill.
func (c cell) capacities(cfgs []llmsim.Config, warmup, measured time.Duration) []float64 {
	if !c.warmup {
		warmup = 0
	}
	mo := logUniformMean(c.minOutput, c.maxOutput)
	mp := llmsim.MeanShapedPrompt(c.shape, c.minPrompt, c.maxPrompt, mo)
	out := make([]float64, len(cfgs))
	for i, e := range cfgs {
		out[i] = windowCapacity(e, mp, mo, warmup, measured)
		if i == c.killIndex {
			out[i] *= killAt
		}
	}
	return out
}

// windowCapacity is e's capacity averaged over the measured window, which
// starts at warmup: each speed of e.SpeedChanges (in order) for the share
// of the window it lasts.
func windowCapacity(e llmsim.Config, mp, mo float64, warmup, measured time.Duration) float64 {
	if len(e.SpeedChanges) == 0 || measured <= 0 {
		return e.Capacity(mp, mo)
	}
	at := func(speed float64) float64 {
		x := e
		x.Speed, x.SpeedChanges = speed, nil
		return x.Capacity(mp, mo)
	}
	speed, from, total := e.Speed, 0.0, 0.0
	for _, ch := range e.SpeedChanges {
		to := min(max(float64(ch.At-warmup)/float64(measured), 0), 1)
		if to > from {
			total += (to - from) * at(speed)
			from = to
		}
		speed = ch.Speed
	}
	return total + (1-from)*at(speed)
}

func logUniformMean(a, b int) float64 {
	p, _ := llmsim.Workload{MinPrompt: a, MaxPrompt: b, MinOutput: 1, MaxOutput: 1}.MeanTokens()
	return p
}

// heterogeneous says whether the engines' capacities differ by more than 20%.
func heterogeneous(caps []float64) bool {
	lo, hi := caps[0], caps[0]
	for _, c := range caps {
		lo, hi = min(lo, c), max(hi, c)
	}
	return hi > 1.2*lo
}
