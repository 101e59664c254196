// Command llmsim runs simulated OpenAI-compatible LLM engines on loopback,
// one per speed, until interrupted:
//
//	go run ./examples/llmsim -speeds 1,1,0.6,0.3 -port 8001
//	go run ./examples/llmsim -speeds 1,1 -max-running 4,64 -decode-base 4ms,12ms -spaced-json false,true
//	go run ./examples/llmsim -speeds 1,1 -slowdown 20s:0.33,  # the first engine turns 3x slower after 20s
//
// Each serves /v1/chat/completions, /v1/completions, /v1/models, /health and
// vLLM-style /metrics. See package llmsim for the engine model. The engine
// flags take one value for every engine or a comma-separated value per
// engine (an empty item keeps the default).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/aibalance/caddy-aibalance/llmsim"
)

func main() {
	d := llmsim.DefaultConfig
	speeds := flag.String("speeds", "1,1,0.6,0.3", "comma-separated speed factor of each engine (one engine each)")
	port := flag.Int("port", 8001, "port of the first engine, the others follow; 0 picks free ports")
	model := flag.String("model", d.Model, "model name served")
	slots := flag.String("max-running", strconv.Itoa(d.MaxRunning), "batch slots (vLLM max_num_seqs), per engine")
	decodeBase := flag.String("decode-base", d.DecodeBase.String(), "decode step time with an empty batch, per engine")
	decodePerSeq := flag.String("decode-per-seq", d.DecodePerSeq.String(), "extra decode step time per running sequence, per engine")
	prefill := flag.String("prefill-per-token", d.PrefillPerToken.String(), "prefill time per uncached prompt token, per engine")
	spaced := flag.String("spaced-json", "false", "write JSON with Python's separators, per engine")
	reasoning := flag.String("reasoning-tokens", "0", "first N tokens of chat answers sent as reasoning_content, per engine")
	slowdown := flag.String("slowdown", "", "AFTER:SPEED speed change, per engine (e.g. 20s:0.33,,,)")
	errRate := flag.Float64("error-rate", 0, "share of requests answered 500")
	reject := flag.Int("reject-above-queue", 0, "answer 429 + Retry-After when this many requests wait (0: never)")
	cut := flag.Float64("cut-rate", 0, "share of streams cut off half-way")
	hang := flag.Float64("hang-rate", 0, "share of requests never answered")
	rejectRate := flag.Float64("reject-rate", 0, "share of requests answered 429 + Retry-After at once (1: always)")
	retryAfter := flag.Duration("retry-after", time.Second, "the Retry-After of 429 answers (whole seconds)")
	startup := flag.Duration("startup-delay", 0, "answer 503 for this long after starting")
	scheduler := flag.String("scheduler", "", `engine model, per engine: "" (a batch of max-running slots) or "budget" (a token budget a step shared by decode and chunked prefill, a KV cache of -kv-tokens, preemption by recompute)`)
	stepTokens := flag.String("step-tokens", "", "the budget scheduler's tokens a step (vLLM max_num_batched_tokens), per engine; default 2048")
	kvTokens := flag.String("kv-tokens", "", "the budget scheduler's KV cache in tokens, per engine; default the prefix cache's size")
	flag.Parse()

	speedList := strings.Split(*speeds, ",")
	n := len(speedList)
	cfgs := make([]llmsim.Config, n)
	for i, f := range speedList {
		sp, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || sp <= 0 {
			fail("bad speed %q: want a positive number", f)
		}
		cfgs[i] = llmsim.Config{
			Model: *model, Speed: sp,
			Faults: llmsim.Faults{ErrorRate: *errRate, RejectAboveQueue: *reject, RejectRate: *rejectRate, RetryAfter: *retryAfter, CutRate: *cut, HangRate: *hang, StartupDelay: *startup},
		}
	}
	perEngine("max-running", *slots, n, func(i int, v string) error {
		x, err := strconv.Atoi(v)
		if err == nil && x < 1 {
			err = fmt.Errorf("want at least 1")
		}
		cfgs[i].MaxRunning = x
		return err
	})
	for _, df := range []struct {
		name, val string
		set       func(c *llmsim.Config, d time.Duration)
	}{
		{"decode-base", *decodeBase, func(c *llmsim.Config, d time.Duration) { c.DecodeBase = d }},
		{"decode-per-seq", *decodePerSeq, func(c *llmsim.Config, d time.Duration) { c.DecodePerSeq = d }},
		{"prefill-per-token", *prefill, func(c *llmsim.Config, d time.Duration) { c.PrefillPerToken = d }},
	} {
		perEngine(df.name, df.val, n, func(i int, v string) error {
			x, err := time.ParseDuration(v)
			if err == nil && x <= 0 {
				err = fmt.Errorf("want a positive duration")
			}
			df.set(&cfgs[i], x)
			return err
		})
	}
	perEngine("scheduler", *scheduler, n, func(i int, v string) error {
		if v != llmsim.SchedulerBudget {
			return fmt.Errorf(`want "budget" (or nothing, for the batch scheduler)`)
		}
		cfgs[i].Scheduler = v
		return nil
	})
	for _, tf := range []struct {
		name, val string
		set       func(c *llmsim.Config, x int)
	}{
		{"step-tokens", *stepTokens, func(c *llmsim.Config, x int) { c.StepTokens = x }},
		{"kv-tokens", *kvTokens, func(c *llmsim.Config, x int) { c.KVTokens = x }},
	} {
		perEngine(tf.name, tf.val, n, func(i int, v string) error {
			x, err := strconv.Atoi(v)
			if err == nil && x < 1 {
				err = fmt.Errorf("want at least 1")
			}
			tf.set(&cfgs[i], x)
			return err
		})
	}
	perEngine("spaced-json", *spaced, n, func(i int, v string) (err error) {
		cfgs[i].SpacedJSON, err = strconv.ParseBool(v)
		return err
	})
	perEngine("reasoning-tokens", *reasoning, n, func(i int, v string) (err error) {
		cfgs[i].ReasoningTokens, err = strconv.Atoi(v)
		return err
	})
	perEngine("slowdown", *slowdown, n, func(i int, v string) error {
		at, sp, ok := strings.Cut(v, ":")
		if !ok {
			return fmt.Errorf("want AFTER:SPEED")
		}
		after, err := time.ParseDuration(at)
		if err != nil {
			return err
		}
		speed, err := strconv.ParseFloat(sp, 64)
		if err != nil || speed <= 0 {
			return fmt.Errorf("bad speed %q", sp)
		}
		cfgs[i].SpeedChanges = append(cfgs[i].SpeedChanges, llmsim.SpeedChange{At: after, Speed: speed})
		return nil
	})

	var srvs []*llmsim.Server
	for i, c := range cfgs {
		addr := "127.0.0.1:0"
		if *port > 0 {
			addr = fmt.Sprintf("127.0.0.1:%d", *port+i)
		}
		s, err := llmsim.Start(c, addr)
		if err != nil {
			fail("%v", err)
		}
		srvs = append(srvs, s)
		c = s.Config()
		fmt.Printf("engine %d: %s  speed %.2f  model %s  max-running %d  decode %v+%v/seq  prefill %v/token  capacity %.1f req/s (200/100 tokens)\n",
			i+1, s.URL(), c.Speed, c.Model, c.MaxRunning, c.DecodeBase, c.DecodePerSeq, c.PrefillPerToken, c.Capacity(200, 100))
		if c.Scheduler == llmsim.SchedulerBudget {
			fmt.Printf("engine %d: budget scheduler: %d tokens a step, KV cache %d tokens\n", i+1, c.StepTokens, c.KVTokens)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-sig:
			for _, s := range srvs {
				s.Stop()
			}
			return
		case <-tick.C:
			for i, s := range srvs {
				st := s.Stats()
				fmt.Printf("engine %d: running %d waiting %d completed %d tokens out %d cached %d/%d\n",
					i+1, st.Running, st.Waiting, st.Completed, st.OutputTokens, st.CachedTokens, st.PromptTokens)
			}
		}
	}
}

// perEngine applies a flag's value to each engine: one value for all, or a
// comma-separated list of n (an empty item keeps that engine's default).
func perEngine(name, val string, n int, set func(i int, v string) error) {
	if strings.TrimSpace(val) == "" {
		return
	}
	items := strings.Split(val, ",")
	if len(items) != 1 && len(items) != n {
		fail("-%s: %d values for %d engines: give one, or one per engine", name, len(items), n)
	}
	for i := 0; i < n; i++ {
		v := strings.TrimSpace(items[min(i, len(items)-1)])
		if v == "" {
			continue
		}
		if err := set(i, v); err != nil {
			fail("-%s: engine %d: %q: %v", name, i+1, v, err)
		}
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "llmsim: "+format+"\n", args...)
	os.Exit(2)
}
