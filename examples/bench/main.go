// Command bench measures routing quality: it runs the same open-loop
// workload of OpenAI streaming requests through a real Caddy with each
// selection policy in turn, in front of a fresh simulated heterogeneous pool
// each time, and prints a markdown table. With -overhead it instead compares
// the proxy throughput of `transport aibalance` + `ai_predictive` with stock
// `reverse_proxy` + `least_conn` on tiny responses. With -matrix it runs a
// scenario matrix (pools, engine timings, workloads, loads) comparing
// ai_predictive with least_conn over several seeds per cell; see
// BENCHMARKS.md.
//
//	go run ./examples/bench -speeds 1,1,0.6,0.3 -load 0.7 -duration 60s
//	go run ./examples/bench -overhead -duration 10s
//	go run ./examples/bench -matrix quick
//	go run ./examples/bench -matrix full -cells base,pool-batch -policies least_tokens
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/internal/harness"
	"github.com/aibalance/caddy-aibalance/llmsim"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/aibalance/caddy-aibalance"
)

var detail bool

type policy struct {
	name      string
	selection map[string]any
	ours      bool // uses the aibalance transport
}

func main() {
	speedsFlag := flag.String("speeds", "1,1,0.6,0.3", "speed factor of each simulated backend")
	load := flag.Float64("load", 0.7, "offered load as a fraction of the pool's estimated capacity")
	duration := flag.Duration("duration", 60*time.Second, "measured duration per policy")
	warmup := flag.Duration("warmup", 10*time.Second, "unrecorded warm-up before each measurement")
	seed := flag.Uint64("seed", 1, "workload seed (the same arrivals for every policy)")
	only := flag.String("policies", "", "comma-separated subset of policies to run (default: all)")
	overhead := flag.Bool("overhead", false, "measure proxy overhead on tiny responses instead")
	conc := flag.Int("concurrency", 32, "client connections for -overhead")
	rounds := flag.Int("rounds", 4, "alternating runs of each setup for -overhead")
	flag.BoolVar(&detail, "detail", false, "after each row, print per-backend TTFT percentiles and the slowest first tokens")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the run to this file")
	matrix := flag.String("matrix", "", "run the scenario matrix: quick or full (-policies then adds policies to ai_predictive and least_conn)")
	cellList := flag.String("cells", "", "comma-separated cells of the matrix to run (default: all)")
	seeds := flag.Int("seeds", 0, "seeds per cell and policy in the matrix (default: the preset's)")
	timeScale := flag.Float64("timescale", 0, "multiply every engine's speed in the matrix (default: the preset's)")
	soak := flag.Duration("soak", 0, "run one policy (-policies, default ai_predictive) this long on one cell (-cells, default aff-chat), sampling heap, goroutines and prefix index sizes every -soak-every")
	soakEvery := flag.Duration("soak-every", 30*time.Second, "sampling interval of -soak")
	flag.Parse()

	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		_ = pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	if *overhead {
		runOverhead(*duration, *conc, max(*rounds, 1))
		return
	}
	if *soak > 0 {
		o, err := presetOptions("full")
		list := *cellList
		if list == "" {
			list = "aff-chat"
		}
		var cells []cell
		if err == nil {
			cells, err = pickCells(list, "full")
		}
		if err == nil && len(cells) != 1 {
			err = fmt.Errorf("-soak runs one cell, got %d", len(cells))
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(2)
		}
		o.measured, o.progress = *soak, os.Stderr
		err = runSoak(o, cells[0], *only, *soakEvery, os.Stdout)
		_ = harness.Stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if *matrix != "" {
		o, err := presetOptions(*matrix)
		if err == nil {
			o.cells, err = pickCells(*cellList, o.preset)
		}
		if err == nil {
			o.policies, err = matrixPolicies(*only)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(2)
		}
		flag.Visit(func(f *flag.Flag) { // explicit flags override the preset
			switch f.Name {
			case "duration":
				o.measured = *duration
			case "warmup":
				o.warmup = *warmup
			}
		})
		if *seeds > 0 {
			o.seeds = *seeds
		}
		if *timeScale > 0 {
			o.timeScale = *timeScale
		}
		o.progress = os.Stderr
		err = runMatrix(o, os.Stdout)
		_ = harness.Stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	var speeds []float64
	for _, f := range strings.Split(*speedsFlag, ",") {
		s, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || s <= 0 {
			fmt.Fprintf(os.Stderr, "bench: bad speed %q\n", f)
			os.Exit(2)
		}
		speeds = append(speeds, s)
	}
	capWeights := make([]any, len(speeds))
	for i, s := range speeds {
		capWeights[i] = max(int(s*10+0.5), 1)
	}
	policies := []policy{
		{"round_robin", map[string]any{"policy": "round_robin"}, false},
		{"least_conn", map[string]any{"policy": "least_conn"}, false},
		{"weighted_round_robin", map[string]any{"policy": "weighted_round_robin", "weights": capWeights}, false},
		{"ai_predictive", map[string]any{"policy": "ai_predictive"}, true},
		{"ai_predictive (choose all)", map[string]any{"policy": "ai_predictive", "choose_all": true}, true},
		{"ai_predictive (ttft_weight 0)", map[string]any{"policy": "ai_predictive", "ttft_weight": 0}, true},
		{"least_tokens", map[string]any{"policy": "least_tokens"}, true},
		{"weighted_least_conn", map[string]any{"policy": "weighted_least_conn", "weights": capWeights}, false},
	}
	if *only != "" {
		keep := map[string]bool{}
		for _, n := range strings.Split(*only, ",") {
			keep[strings.TrimSpace(n)] = true
		}
		var sel []policy
		for _, p := range policies {
			if keep[p.name] {
				sel = append(sel, p)
			}
		}
		policies = sel
	}

	w := llmsim.Workload{MinPrompt: 50, MaxPrompt: 3000, MinOutput: 10, MaxOutput: 400, Seed: *seed}
	mp, mo := w.MeanTokens()
	var capacity float64
	for _, s := range speeds {
		capacity += llmsim.Config{Speed: s}.Capacity(mp, mo)
	}
	w.Rate = *load * capacity
	w.Duration = *warmup + *duration
	w.Warmup = *warmup

	fmt.Printf("# Routing quality, %s\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Printf("Pool speeds %s; estimated capacity %.1f req/s; offered %.1f req/s (%.0f%%), Poisson; prompt %d-%d tokens, output %d-%d tokens (log-uniform, means %.0f / %.0f); %v measured after %v warm-up per policy; seed %d; %d CPUs, %s.\n\n",
		*speedsFlag, capacity, w.Rate, *load*100, w.MinPrompt, w.MaxPrompt, w.MinOutput, w.MaxOutput, mp, mo, *duration, *warmup, *seed, runtime.NumCPU(), runtime.Version())
	fmt.Println("| policy | done req/s | errors | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | out tok/s | share per backend |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|")
	for _, p := range policies {
		row, err := runPolicy(p, speeds, w, *duration)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", p.name+":", err)
			os.Exit(1)
		}
		fmt.Println(row)
	}
	_ = harness.Stop()
}

func runPolicy(p policy, speeds []float64, w llmsim.Workload, measured time.Duration) (string, error) {
	pool, err := llmsim.StartPool(llmsim.Speeds(speeds...)...)
	if err != nil {
		return "", err
	}
	defer pool.Close()
	port, err := harness.FreePort()
	if err != nil {
		return "", err
	}
	px := harness.Proxy{Port: port, Upstreams: pool.Addrs(), Policy: p.selection}
	if p.ours {
		px.Transport = map[string]any{"protocol": "aibalance"}
	}
	base, err := px.Start()
	if err != nil {
		return "", err
	}
	w.URL = base + "/v1/chat/completions"
	recs := w.Run(context.Background(), 2*time.Minute)
	s := llmsim.Summarize(recs, measured)
	byBackend := map[string]int{}
	for _, r := range recs {
		if r.Err == nil && r.Status == http.StatusOK {
			byBackend[r.Backend]++
		}
	}
	var shares []string
	ok := s.Requests - s.Errors
	for i, a := range pool.Addrs() {
		shares = append(shares, fmt.Sprintf("%.2f×: %.0f%%", speeds[i], 100*float64(byBackend[a])/float64(max(ok, 1))))
	}
	if detail {
		printDetail(p.name, recs, pool.Addrs(), speeds)
	}
	secs := measured.Seconds()
	return fmt.Sprintf("| %s | %.2f | %d | %s | %s | %s | %s | %.0f | %s |",
		p.name, float64(ok)/secs, s.Errors, ms(s.TTFT.P50), ms(s.TTFT.P99), ms(s.E2E.P50), ms(s.E2E.P99),
		float64(s.OutputToks)/secs, strings.Join(shares, ", ")), nil
}

func ms(d time.Duration) string {
	if d >= 10*time.Second {
		return fmt.Sprintf("%.1fs", d.Seconds())
	}
	return fmt.Sprintf("%dms", d.Milliseconds())
}

// runOverhead compares proxy throughput on tiny responses, alternating the
// two setups round by round so both see the same machine conditions.
func runOverhead(d time.Duration, conc, rounds int) {
	backends := make([]string, 4)
	for i := range backends {
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = io.WriteString(w, `{"ok":true}`)
		})}
		port, err := harness.FreePort()
		if err != nil {
			panic(err)
		}
		backends[i] = fmt.Sprintf("127.0.0.1:%d", port)
		srv.Addr = backends[i]
		go func() { _ = srv.ListenAndServe() }()
	}
	time.Sleep(200 * time.Millisecond)
	setups := []struct {
		name string
		px   harness.Proxy
	}{
		{"reverse_proxy + least_conn (stock)", harness.Proxy{Upstreams: backends, Policy: map[string]any{"policy": "least_conn"}}},
		{"transport aibalance + ai_predictive", harness.Proxy{Upstreams: backends, Policy: map[string]any{"policy": "ai_predictive"}, Transport: map[string]any{"protocol": "aibalance"}}},
	}
	results := make([][]float64, len(setups))
	for round := 0; round < rounds; round++ {
		for i, s := range setups {
			port, err := harness.FreePort()
			if err != nil {
				panic(err)
			}
			s.px.Port = port
			base, err := s.px.Start()
			if err != nil {
				panic(err)
			}
			results[i] = append(results[i], hammer(base+"/v1/chat/completions", d, conc))
		}
	}
	_ = harness.Stop()
	fmt.Printf("# Proxy overhead, %s\n\nTiny JSON responses from 4 local backends, %d keep-alive client connections, %d alternating runs of %v per setup; %d CPUs, %s.\n\n",
		time.Now().UTC().Format("2006-01-02"), conc, rounds, d, runtime.NumCPU(), runtime.Version())
	fmt.Println("| setup | req/s per run | mean | vs stock |")
	fmt.Println("|---|---|---|---|")
	mean := func(v []float64) float64 {
		var sum float64
		for _, x := range v {
			sum += x
		}
		return sum / float64(len(v))
	}
	for i, s := range setups {
		runs := make([]string, len(results[i]))
		for j, v := range results[i] {
			runs[j] = fmt.Sprintf("%.0f", v)
		}
		fmt.Printf("| %s | %s | %.0f | %.1f%% |\n", s.name, strings.Join(runs, ", "), mean(results[i]), 100*mean(results[i])/mean(results[0]))
	}
}

func hammer(url string, d time.Duration, conc int) float64 {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
	body := llmsim.ChatBody("sim", "hello there, a short prompt", 16, false)
	var n atomic.Int64
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				resp, err := client.Post(url, "application/json", strings.NewReader(string(body)))
				if err != nil {
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					n.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	client.CloseIdleConnections()
	return float64(n.Load()) / d.Seconds()
}

// printDetail shows where a policy's first-token tail comes from.
func printDetail(name string, recs []llmsim.Record, addrs []string, speeds []float64) {
	fmt.Printf("\n<details><summary>%s: TTFT by backend</summary>\n\n", name)
	for i, a := range addrs {
		var mine []llmsim.Record
		for _, r := range recs {
			if r.Backend == a && r.Err == nil && r.Status == http.StatusOK {
				mine = append(mine, r)
			}
		}
		s := llmsim.Summarize(mine, time.Second)
		fmt.Printf("- %.2f×: %d requests, TTFT p50 %s p90 %s p99 %s max %s\n", speeds[i], len(mine), ms(s.TTFT.P50), ms(s.TTFT.P90), ms(s.TTFT.P99), ms(s.TTFT.Max))
		if b, ok := aibalance.LookupBackend(a); ok {
			st := b.Stats()
			fmt.Printf("  - batch seen %d, capacity %d; model: %+v\n", st.MaxRunning, st.BatchCapacity, st.Model)
		}
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].TTFT > recs[j].TTFT })
	for i := 0; i < min(8, len(recs)); i++ {
		r := recs[i]
		fmt.Printf("  - TTFT %s prompt %d output %d on %s\n", ms(r.TTFT), r.Prompt, r.Output, r.Backend)
	}
	fmt.Println("\n</details>")
	fmt.Println()
}
