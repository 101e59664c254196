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
	// slowIndex is the engine that turns slowFactor times slower a third
	// into the measured window; -1 for none.
	slowIndex  int
	slowFactor float64
	minPrompt  int
	maxPrompt  int
	minOutput  int
	maxOutput  int
	nonStream  float64
	burstOn    time.Duration // on/off arrivals when both are set
	burstOff   time.Duration
	load       float64 // offered load as a fraction of the pool's capacity
	warmup     bool
	scrape     bool   // the transport may scrape the engines' /metrics
	shape      string // what prompts share (llmsim.Shape*); min/maxPrompt size each new message
	// compare names policies (see matrixPolicies) this cell always runs
	// besides the matrix's own
	compare []string
}

// baseCell is the cell the others vary one factor at a time.
func baseCell() cell {
	return cell{
		name:      "base",
		about:     "4 engines of speeds 1, 1, 0.6, 0.3; prompts 50–500, outputs 32–256 tokens; Poisson at 60%; warm-up; metrics scraped",
		engines:   llmsim.Speeds(1, 1, 0.6, 0.3),
		slowIndex: -1,
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
		c.slowIndex, c.slowFactor = 0, 3
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

// pickCells returns the cells named in list (comma-separated), or all.
func pickCells(list string) ([]cell, error) {
	all := allCells()
	if strings.TrimSpace(list) == "" {
		return all, nil
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
// slowdown placed a third into the measured window.
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
			e.SpeedChanges = []llmsim.SpeedChange{{At: warmup + measured/3, Speed: e.Speed / c.slowFactor}}
		}
		out[i] = e
	}
	return out
}

// capacities is each engine's capacity in req/s, averaged over the
// measured window (an engine that slows down counts at each speed for the
// time it runs at it).
func (c cell) capacities(cfgs []llmsim.Config, warmup, measured time.Duration) []float64 {
	if !c.warmup {
		warmup = 0
	}
	mo := logUniformMean(c.minOutput, c.maxOutput)
	mp := llmsim.MeanShapedPrompt(c.shape, c.minPrompt, c.maxPrompt, mo)
	out := make([]float64, len(cfgs))
	for i, e := range cfgs {
		full := e.Capacity(mp, mo)
		if len(e.SpeedChanges) == 0 || measured <= 0 {
			out[i] = full
			continue
		}
		// one change inside the window: the share of time before it at the
		// first speed, the rest at the new speed
		ch := e.SpeedChanges[0]
		before := min(max(float64(ch.At-warmup)/float64(measured), 0), 1)
		slow := e
		slow.Speed, slow.SpeedChanges = ch.Speed, nil
		out[i] = before*full + (1-before)*slow.Capacity(mp, mo)
	}
	return out
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
