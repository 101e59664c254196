// Command llmsim runs simulated OpenAI-compatible LLM engines on loopback,
// one per speed, until interrupted:
//
//	go run ./examples/llmsim -speeds 1,1,0.6,0.3 -port 8001
//
// Each serves /v1/chat/completions, /v1/completions, /v1/models, /health and
// vLLM-style /metrics. See package llmsim for the engine model.
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
	speeds := flag.String("speeds", "1,1,0.6,0.3", "comma-separated speed factor of each engine (one engine each)")
	port := flag.Int("port", 8001, "port of the first engine, the others follow; 0 picks free ports")
	model := flag.String("model", llmsim.DefaultConfig.Model, "model name served")
	slots := flag.Int("max-running", llmsim.DefaultConfig.MaxRunning, "batch slots per engine")
	errRate := flag.Float64("error-rate", 0, "share of requests answered 500")
	reject := flag.Int("reject-above-queue", 0, "answer 429 + Retry-After when this many requests wait (0: never)")
	cut := flag.Float64("cut-rate", 0, "share of streams cut off half-way")
	hang := flag.Float64("hang-rate", 0, "share of requests never answered")
	startup := flag.Duration("startup-delay", 0, "answer 503 for this long after starting")
	flag.Parse()

	var srvs []*llmsim.Server
	for i, f := range strings.Split(*speeds, ",") {
		sp, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || sp <= 0 {
			fmt.Fprintf(os.Stderr, "llmsim: bad speed %q: want a positive number\n", f)
			os.Exit(2)
		}
		addr := "127.0.0.1:0"
		if *port > 0 {
			addr = fmt.Sprintf("127.0.0.1:%d", *port+i)
		}
		s, err := llmsim.Start(llmsim.Config{
			Model: *model, Speed: sp, MaxRunning: *slots,
			Faults: llmsim.Faults{ErrorRate: *errRate, RejectAboveQueue: *reject, CutRate: *cut, HangRate: *hang, StartupDelay: *startup},
		}, addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		srvs = append(srvs, s)
		fmt.Printf("engine %d: %s  speed %.2f  model %s\n", i+1, s.URL(), sp, *model)
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
