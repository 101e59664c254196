package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/internal/harness"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// matrixOptions sets how long and how often each cell runs.
type matrixOptions struct {
	preset    string        // quick or full (for the header)
	seeds     int           // runs per cell and policy, seeds 1..seeds
	warmup    time.Duration // unrecorded start of each run (cells with warm-up)
	measured  time.Duration // recorded part of each run
	drain     time.Duration // longest wait for requests in flight at the end
	timeScale float64       // engine speeds are multiplied by this
	cells     []cell
	policies  []matrixPolicy // the first is the policy under test, the second the baseline
	progress  io.Writer      // one line per run; nil: none
}

// Presets. Engines run 5× faster than the simulator's defaults (a step of
// 3.2 ms instead of 16 ms at speed 1) so a short run still has hundreds of
// requests; ratios between policies are what the matrix reports. A run
// lasts warm-up + measured + the drain of the requests still in flight
// (about the longest request: 1–2 s, 10 s in work-longgen) + ~0.5 s set-up.
// work-reasoning measures 3× as long with engines 2× as fast (its own
// scales): 45 s + a drain of up to ~30 s, some 180 requests of 2000–8000
// tokens at ~17k tokens a second through Caddy, twice the other cells'.
//
//	full:  (22 cells × 2 policies + the aff- cells' 2 more) × 3 seeds × ~18 s + work-reasoning's 6 × ~80 s ≈ 53 min
//	quick: (20 cells × 2 policies + 6) × 1 seed × ~7.5 s ≈ 6 min (the fullOnly cells left out)
func presetOptions(name string) (matrixOptions, error) {
	switch name {
	case "full":
		return matrixOptions{preset: name, seeds: 3, warmup: 2 * time.Second, measured: 15 * time.Second, drain: time.Minute, timeScale: 5}, nil
	case "quick":
		return matrixOptions{preset: name, seeds: 1, warmup: 2 * time.Second, measured: 3 * time.Second, drain: time.Minute, timeScale: 5}, nil
	}
	return matrixOptions{}, fmt.Errorf("unknown matrix %q: want quick or full", name)
}

// forCell is o with cell c's own measured window and time scale.
func (o matrixOptions) forCell(c cell) matrixOptions {
	if c.measuredScale > 0 {
		o.measured = time.Duration(float64(o.measured) * c.measuredScale)
	}
	if c.timeScale > 0 {
		o.timeScale *= c.timeScale
	}
	return o
}

// matrixPolicy is a selection policy and the transport it runs with.
type matrixPolicy struct {
	name      string
	selection map[string]any
	ours      bool // transport aibalance
	noScrape  bool // always tell the transport "engine": "none"
}

// matrixPolicies are the policies -policies can add to the default pair.
func matrixPolicies(extra string) ([]matrixPolicy, error) {
	known := []matrixPolicy{
		{name: "ai_predictive", selection: map[string]any{"policy": "ai_predictive"}, ours: true},
		{name: "least_conn", selection: map[string]any{"policy": "least_conn"}},
		{name: "ai_predictive_noscrape", selection: map[string]any{"policy": "ai_predictive"}, ours: true, noScrape: true},
		{name: "ai_predictive_all", selection: map[string]any{"policy": "ai_predictive", "choose_all": true}, ours: true},
		{name: "ai_predictive_ttft0", selection: map[string]any{"policy": "ai_predictive", "ttft_weight": 0}, ours: true},
		{name: "ai_predictive_noaffinity", selection: map[string]any{"policy": "ai_predictive", "affinity": "none"}, ours: true},
		{name: "ai_predictive_ttft32", selection: map[string]any{"policy": "ai_predictive", "ttft_weight": 32}, ours: true},
		{name: "least_tokens", selection: map[string]any{"policy": "least_tokens"}, ours: true},
		{name: "round_robin", selection: map[string]any{"policy": "round_robin"}},
		{name: "random", selection: map[string]any{"policy": "random"}},
		// Caddy's sticky policy on the session the shaped workloads name
		{name: "header", selection: map[string]any{"policy": "header", "field": llmsim.SessionHeader}},
	}
	out := known[:2:2]
	for _, n := range strings.Split(extra, ",") {
		n = strings.TrimSpace(n)
		if n == "" || n == "ai_predictive" || n == "least_conn" {
			continue
		}
		found := false
		for _, p := range known {
			if p.name == n {
				out, found = append(out, p), true
			}
		}
		if !found {
			var names []string
			for _, p := range known {
				names = append(names, p.name)
			}
			return nil, fmt.Errorf("unknown policy %q; policies: %s", n, strings.Join(names, ", "))
		}
	}
	return out, nil
}

// transport returns the transport object of p in cell c (nil: stock http).
func (p matrixPolicy) transport(c cell) map[string]any {
	if !p.ours {
		return nil
	}
	t := map[string]any{"protocol": "aibalance"}
	t["engine"] = "auto"
	if p.noScrape || !c.scrape {
		t["engine"] = "none"
	}
	return t
}

// runResult is what one run of one policy measured.
type runResult struct {
	ttftP50, ttftP99, e2eP50, e2eP99 time.Duration
	reqPerSec, tokPerSec             float64
	errors                           int
	requests                         int
	fastShare, fastCapShare          float64 // the fastest engines' share of requests and of capacity
	hitRate                          float64 // the engines' prefix cache hits over their prompt tokens
	cut                              int     // streams cut by the kill (not in errors)
	afterKillTTFTp99                 time.Duration
	preemptions                      int64 // the engines' preemptions (budget scheduler)
	side                             llmsim.SideStats
	wall                             time.Duration
}

// runOnce runs one policy on one cell with a fresh pool and a freshly
// loaded Caddy config.
func runOnce(o matrixOptions, c cell, p matrixPolicy, seed uint64) (runResult, error) {
	var res runResult
	began := time.Now()
	cfgs := c.configs(o.timeScale, o.warmup, o.measured)
	caps := c.capacities(cfgs, o.warmup, o.measured)
	pool, err := llmsim.StartPool(cfgs...)
	if err != nil {
		return res, err
	}
	defer pool.Close()
	port, err := harness.FreePort()
	if err != nil {
		return res, err
	}
	px := c.proxy(p, port, pool.Addrs())
	base, err := px.Start()
	if err != nil {
		return res, err
	}
	w := c.workload(seed, o.warmup, o.measured)
	var total float64
	for _, x := range caps {
		total += x
	}
	w.URL, w.Rate = base+"/v1/chat/completions", c.load*total
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	defer client.CloseIdleConnections()
	w.Client = client

	ctx, cancel := context.WithTimeout(context.Background(), w.Duration+o.drain+10*time.Second)
	defer cancel()
	// a client getting ready: probes and a model listing, one at a time;
	// then a probe every second, a listing every 3 s and a few broken POSTs
	side := llmsim.SideTraffic{BaseURL: base, Before: 3, ProbeEvery: time.Second, ModelsEvery: 3 * time.Second, Malformed: 3}.
		Start(ctx, w.Duration)
	// throughput: what completed inside the measured window, warm-up
	// requests included (the arrivals are the same for every policy; what
	// it finishes in time is not)
	t0 := time.Now()
	from, to := t0.Add(w.Warmup), t0.Add(w.Duration)
	var mu sync.Mutex
	var doneReqs, doneToks int
	// the kill: a request that failed on the killed engine and started
	// before it was stopped is a cut stream
	var killed string
	var killedAt time.Time
	if c.killIndex >= 0 {
		sv := pool.Servers[c.killIndex]
		killed = sv.Addr()
		kill := time.AfterFunc(w.Warmup+time.Duration(killAt*float64(o.measured)), func() {
			sv.Stop()
			mu.Lock()
			killedAt = time.Now()
			mu.Unlock()
		})
		defer kill.Stop()
	}
	w.OnResult = func(r llmsim.Record) {
		end := r.Started.Add(r.E2E)
		if r.Err == nil && r.Status == http.StatusOK && !end.Before(from) && end.Before(to) {
			mu.Lock()
			doneReqs++
			doneToks += r.Tokens
			mu.Unlock()
		}
	}
	recs := w.Run(ctx, o.drain)
	res.side = side.Wait()

	s := llmsim.Summarize(recs, o.measured)
	if detail && p.ours {
		for i, a := range pool.Addrs() {
			if b, ok := aibalance.LookupBackend(a); ok {
				st := b.Stats()
				fmt.Fprintf(os.Stderr, "  engine %d (%s): batch seen %d, capacity %d, changes %d, mape %.2f, samples %d, prefix trust %.2f, index %d blocks\n",
					i, a, st.MaxRunning, st.BatchCapacity, st.Model.Changes, st.Model.MAPE, st.Model.Samples, b.PrefixTrust(), b.PrefixBlocks())
				fmt.Fprintf(os.Stderr, "    %+v\n", st.Model)
			}
		}
	}
	if detail {
		slowestFirstTokens(recs, pool.Addrs(), t0)
	}
	if detail && c.shape != "" {
		// how often a session's request went where its previous one did
		sorted := slices.Clone(recs)
		slices.SortFunc(sorted, func(a, b llmsim.Record) int { return a.Started.Compare(b.Started) })
		last := map[string]string{}
		stay, moves := 0, 0
		for _, r := range sorted {
			if r.Session == "" || r.Backend == "" {
				continue
			}
			if prev, ok := last[r.Session]; ok {
				if prev == r.Backend {
					stay++
				} else {
					moves++
				}
			}
			last[r.Session] = r.Backend
		}
		fmt.Fprintf(os.Stderr, "  %s: session requests on the previous one's engine %d, moved %d\n", p.name, stay, moves)
	}
	ok := s.Requests - s.Errors
	res.ttftP50, res.ttftP99, res.e2eP50, res.e2eP99 = s.TTFT.P50, s.TTFT.P99, s.E2E.P50, s.E2E.P99
	mu.Lock()
	defer mu.Unlock()
	if killed != "" {
		res.cut, res.afterKillTTFTp99 = cutStreams(recs, killed, killedAt)
	}
	res.errors, res.requests = s.Errors-res.cut, s.Requests
	res.reqPerSec, res.tokPerSec = float64(doneReqs)/o.measured.Seconds(), float64(doneToks)/o.measured.Seconds()

	// the fastest engines: every engine within 1% of the highest capacity
	hi := 0.0
	for _, x := range caps {
		hi = max(hi, x)
	}
	fast := map[string]bool{}
	fastCap := 0.0
	for i, a := range pool.Addrs() {
		if caps[i] >= 0.99*hi {
			fast[a] = true
			fastCap += caps[i]
		}
	}
	n := 0
	for _, r := range recs {
		if r.Err == nil && r.Status == http.StatusOK && fast[r.Backend] {
			n++
		}
	}
	res.fastShare = float64(n) / float64(max(ok, 1))
	var cached, prompt int64
	for _, sv := range pool.Servers {
		st := sv.Stats()
		cached += st.CachedTokens
		prompt += st.PromptTokens
		res.preemptions += st.Preemptions
	}
	res.hitRate = float64(cached) / float64(max(prompt, 1))
	res.fastCapShare = fastCap / total
	res.wall = time.Since(began)
	return res, nil
}

// proxy is the Caddy reverse_proxy of policy p in cell c.
func (c cell) proxy(p matrixPolicy, port int, upstreams []string) harness.Proxy {
	px := harness.Proxy{Port: port, Upstreams: upstreams, Policy: p.selection, Transport: p.transport(c)}
	if c.failover {
		px.Extra = map[string]any{
			"load_balancing": map[string]any{"selection_policy": p.selection, "retries": 2},
			"health_checks":  map[string]any{"passive": map[string]any{"fail_duration": "10s"}},
		}
	}
	return px
}

// cutStreams counts the requests that failed on the killed engine having
// started before it was killed, and returns the TTFT p99 of the streams
// that started after the kill and completed (on the survivors).
func cutStreams(recs []llmsim.Record, killed string, killedAt time.Time) (int, time.Duration) {
	cut := 0
	var after []llmsim.Record
	for _, r := range recs {
		failed := r.Err != nil || r.Status != http.StatusOK
		switch {
		case failed && r.Backend == killed && r.Started.Before(killedAt):
			cut++
		case !failed && !killedAt.IsZero() && !r.Started.Before(killedAt):
			after = append(after, r)
		}
	}
	return cut, llmsim.Summarize(after, time.Second).TTFT.P99
}

// cellResult is every run of a cell, by policy.
type cellResult struct {
	cell  cell
	caps  []float64
	runs  map[string][]runResult
	order []string
}

// cellPolicies is the matrix's policies plus those cell c compares
// itself with.
func (o matrixOptions) cellPolicies(c cell) []matrixPolicy {
	out := o.policies
	if len(c.compare) == 0 {
		return out
	}
	known, _ := matrixPolicies(strings.Join(c.compare, ","))
	for _, p := range known[2:] {
		if !slices.ContainsFunc(out, func(q matrixPolicy) bool { return q.name == p.name }) {
			out = append(out[:len(out):len(out)], p)
		}
	}
	return out
}

// runMatrix runs every cell, seed and policy, writing each cell's table
// as it completes, then the summary and the total wall time.
func runMatrix(o matrixOptions, out io.Writer) error {
	start := time.Now()
	n := 0
	for _, c := range o.cells {
		n += o.seeds * len(o.cellPolicies(c))
	}
	fmt.Fprintf(out, "# Routing matrix (%s), %s\n\n", o.preset, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(out, "%d cells × %d seeds × %d policies (the aff- cells add their comparisons) = %d runs; each run: a fresh simulated pool and a freshly loaded Caddy, %v warm-up (cells with warm-up) + %v measured, engine speeds ×%g (a cell with its own says so); %d CPUs, %s.",
		len(o.cells), o.seeds, len(o.policies), n, o.warmup, o.measured, o.timeScale, runtime.NumCPU(), runtime.Version())
	fmt.Fprint(out, "\n\n")
	var results []cellResult
	done := 0
	for _, c := range o.cells {
		oc := o.forCell(c)
		cr := cellResult{cell: c, runs: map[string][]runResult{}}
		cr.caps = c.capacities(c.configs(oc.timeScale, oc.warmup, oc.measured), oc.warmup, oc.measured)
		policies := o.cellPolicies(c)
		for seed := 1; seed <= o.seeds; seed++ {
			for _, p := range policies {
				r, err := runOnce(oc, c, p, uint64(seed))
				if err != nil {
					return fmt.Errorf("cell %s, seed %d, %s: %w", c.name, seed, p.name, err)
				}
				done++
				if o.progress != nil {
					fmt.Fprintf(o.progress, "bench: [%d/%d] %s seed %d %s: %d requests, %d errors, %d cut, %d preemptions, %.1fs (total %s)\n",
						done, n, c.name, seed, p.name, r.requests, r.errors, r.cut, r.preemptions, r.wall.Seconds(), time.Since(start).Round(time.Second))
				}
				cr.runs[p.name] = append(cr.runs[p.name], r)
			}
		}
		for _, p := range policies {
			cr.order = append(cr.order, p.name)
		}
		printCell(out, o, oc, cr)
		results = append(results, cr)
	}
	printSummary(out, o, results)
	fmt.Fprintf(out, "\nTotal wall time: %s\n", time.Since(start).Round(time.Second))
	return nil
}

// stat is the median over seeds and the min–max spread of one figure.
type stat struct{ med, lo, hi float64 }

func statOf(runs []runResult, f func(runResult) float64) stat {
	v := make([]float64, len(runs))
	for i, r := range runs {
		v[i] = f(r)
	}
	sort.Float64s(v)
	if len(v) == 0 {
		return stat{}
	}
	med := v[len(v)/2]
	if len(v)%2 == 0 {
		med = (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	return stat{med, v[0], v[len(v)-1]}
}

func (s stat) format(unit func(float64) string) string {
	if s.lo == s.hi {
		return unit(s.med)
	}
	return fmt.Sprintf("%s (%s–%s)", unit(s.med), unit(s.lo), unit(s.hi))
}

func msf(sec float64) string { return ms(time.Duration(sec * float64(time.Second))) }
func num(prec int) func(float64) string {
	return func(x float64) string { return fmt.Sprintf("%.*f", prec, x) }
}
func pct(x float64) string { return fmt.Sprintf("%.0f%%", 100*x) }

func secs(f func(runResult) time.Duration) func(runResult) float64 {
	return func(r runResult) float64 { return f(r).Seconds() }
}

var figures = []struct {
	name string
	get  func(runResult) float64
}{
	{"TTFT p50", secs(func(r runResult) time.Duration { return r.ttftP50 })},
	{"TTFT p99", secs(func(r runResult) time.Duration { return r.ttftP99 })},
	{"E2E p50", secs(func(r runResult) time.Duration { return r.e2eP50 })},
	{"E2E p99", secs(func(r runResult) time.Duration { return r.e2eP99 })},
	{"req/s", func(r runResult) float64 { return r.reqPerSec }},
	{"out tok/s", func(r runResult) float64 { return r.tokPerSec }},
	{"errors", func(r runResult) float64 { return float64(r.errors) }},
	{"fastest share", func(r runResult) float64 { return r.fastShare }},
	{"prefix hits", func(r runResult) float64 { return r.hitRate }},
	// the columns of some cells only (extraFigures)
	{"cut streams", func(r runResult) float64 { return float64(r.cut) }},
	{"TTFT p99 after kill", secs(func(r runResult) time.Duration { return r.afterKillTTFTp99 })},
	{"preemptions", func(r runResult) float64 { return float64(r.preemptions) }},
}

// Indexes into figures.
const (
	figErrors   = 6
	figCut      = 9
	figAfterTTF = 10
	figPreempt  = 11
	baseFigures = 9 // figures[:baseFigures] are every cell's columns
)

// extraFigures are the columns cell c adds after side traffic: the kill's
// cut streams and survivors' TTFT, a budget engine's preemptions.
func extraFigures(c cell) []int {
	var out []int
	if c.killIndex >= 0 {
		out = append(out, figCut, figAfterTTF)
	}
	if slices.ContainsFunc(c.engines, func(e llmsim.Config) bool { return e.Scheduler == llmsim.SchedulerBudget }) {
		out = append(out, figPreempt)
	}
	return out
}

// printCell writes a cell's table; oc is o with the cell's own scales.
func printCell(out io.Writer, o, oc matrixOptions, cr cellResult) {
	c := cr.cell
	speeds := make([]string, len(c.engines))
	for i, e := range c.engines {
		speeds[i] = fmt.Sprintf("%g", max(e.Speed, 1e-9))
	}
	var total float64
	for _, x := range cr.caps {
		total += x
	}
	fmt.Fprintf(out, "## %s\n\n%s. Engines %s (×%g); capacity %.1f req/s, offered %.1f req/s (%.0f%%)",
		c.name, c.about, strings.Join(speeds, ", "), oc.timeScale, total, c.load*total, 100*c.load)
	if oc.measured != o.measured {
		fmt.Fprintf(out, "; %v measured", oc.measured)
	}
	if c.failover {
		fmt.Fprint(out, "; Caddy retries 2, passive health checks (fail_duration 10s)")
	}
	if !c.scrape {
		fmt.Fprint(out, `; transport "engine": "none"`)
	}
	fmt.Fprint(out, ".\n\n")
	extra := extraFigures(c)
	head := "| policy | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | req/s | out tok/s | errors | fastest share / capacity share | prefix cache hits | side traffic unexpected |"
	for _, i := range extra {
		head += " " + figures[i].name + " |"
	}
	fmt.Fprintln(out, head)
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|---|---|"+strings.Repeat("---|", len(extra)))
	for _, name := range cr.order {
		runs := cr.runs[name]
		cells := []string{name}
		for _, f := range figures[:baseFigures] {
			s := statOf(runs, f.get)
			switch f.name {
			case "req/s":
				cells = append(cells, s.format(num(1)))
			case "out tok/s", "errors":
				cells = append(cells, s.format(num(0)))
			case "fastest share":
				cells = append(cells, s.format(pct)+" / "+pct(runs[0].fastCapShare))
			case "prefix hits":
				cells = append(cells, s.format(pct))
			default:
				cells = append(cells, s.format(msf))
			}
		}
		side, unexpected := 0, 0
		for _, r := range runs {
			side += r.side.Probes + r.side.Models + r.side.Malformed
			unexpected += r.side.Unexpected
		}
		note := fmt.Sprintf("%d of %d", unexpected, side)
		for _, r := range runs {
			if len(r.side.Notes) > 0 {
				note += " (" + strings.Join(r.side.Notes, "; ") + ")"
				break
			}
		}
		cells = append(cells, note)
		for _, i := range extra {
			s := statOf(runs, figures[i].get)
			if i == figAfterTTF {
				cells = append(cells, s.format(msf))
			} else {
				cells = append(cells, s.format(num(0)))
			}
		}
		fmt.Fprintln(out, "| "+strings.Join(cells, " | ")+" |")
	}
	fmt.Fprintln(out)
}

// misses lists the targets the policy under test missed in a cell.
func misses(cr cellResult, test, base string) (ratios []float64, miss []string) {
	t, b := cr.runs[test], cr.runs[base]
	med := func(runs []runResult, i int) float64 { return statOf(runs, figures[i].get).med }
	ratio := func(i int) float64 {
		x, y := med(t, i), med(b, i)
		if y == 0 {
			if x == 0 {
				return 1
			}
			return 0 // undefined; shown as –
		}
		return x / y
	}
	// TTFT p50, TTFT p99, E2E p50, E2E p99, throughput (req/s), fastest share / capacity share
	ratios = []float64{ratio(0), ratio(1), ratio(2), ratio(3), ratio(4)}
	share := med(t, 7) / max(t[0].fastCapShare, 1e-9)
	ratios = append(ratios, share)
	if ratios[1] > 1.05 {
		miss = append(miss, "TTFT p99 > 1.05")
	}
	if ratios[3] > 1.05 {
		miss = append(miss, "E2E p99 > 1.05")
	}
	if heterogeneous(cr.caps) && cr.cell.load >= 0.6 {
		if ratios[3] > 0.6 {
			miss = append(miss, "E2E p99 > 0.6 (heterogeneous)")
		}
		if ratios[1] > 0.8 {
			miss = append(miss, "TTFT p99 > 0.8 (heterogeneous)")
		}
	}
	if share < 0.5 {
		miss = append(miss, "fastest share < ½ capacity share")
	}
	if cr.cell.shape != "" {
		// the affinity targets: twice the hit rate, half the TTFT p50,
		// and E2E p99 at most 0.8 of the policy compared
		hits := med(t, 8) / max(med(b, 8), 1e-9)
		if hits < 2 {
			miss = append(miss, fmt.Sprintf("prefix hits %.2f× < 2×", hits))
		}
		if ratios[0] > 0.5 {
			miss = append(miss, "TTFT p50 > 0.5 (affinity)")
		}
		if ratios[3] > 0.8 {
			miss = append(miss, "E2E p99 > 0.8 (affinity)")
		}
	}
	if cr.cell.killIndex >= 0 {
		// the kill's targets; its cut streams are not errors
		if r := ratio(figAfterTTF); r > 1.2 {
			miss = append(miss, fmt.Sprintf("TTFT p99 after kill %.2f× > 1.2×", r))
		}
		if ct, cb := med(t, figCut), med(b, figCut); ct > cb {
			miss = append(miss, fmt.Sprintf("cut streams %.0f > %.0f", ct, cb))
		}
	}
	for _, r := range t {
		if r.errors > 0 {
			miss = append(miss, "errors")
			break
		}
	}
	return ratios, miss
}

func printSummary(out io.Writer, o matrixOptions, results []cellResult) {
	test, base := o.policies[0].name, o.policies[1].name
	fmt.Fprintf(out, "## Summary: %s / %s\n\n", test, base)
	fmt.Fprintln(out, "Medians over seeds; a ratio below 1 means the policy under test is lower (better for latencies, worse for throughput).")
	fmt.Fprintln(out)
	fmt.Fprintln(out, "| cell | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | throughput | errors | fastest share / capacity share | missed targets |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|")
	missed := 0
	for _, cr := range results {
		ratios, miss := misses(cr, test, base)
		row := []string{cr.cell.name}
		for _, x := range ratios[:5] {
			if x == 0 {
				row = append(row, "–")
				continue
			}
			row = append(row, fmt.Sprintf("%.2f", x))
		}
		errT := statOf(cr.runs[test], figures[figErrors].get).med
		errB := statOf(cr.runs[base], figures[figErrors].get).med
		row = append(row, fmt.Sprintf("%.0f / %.0f", errT, errB), fmt.Sprintf("%.2f", ratios[5]))
		mark := "✓"
		if len(miss) > 0 {
			mark = "**✗ " + strings.Join(miss, "; ") + "**"
			missed++
		}
		row = append(row, mark)
		fmt.Fprintln(out, "| "+strings.Join(row, " | ")+" |")
	}
	fmt.Fprintf(out, "\n%d of %d cells miss a target. Targets: TTFT p99 and E2E p99 ratios ≤ 1.05; in heterogeneous cells at ≥ 60%% load E2E p99 ≤ 0.6 and TTFT p99 ≤ 0.8; the fastest engines get at least half their capacity share; no errors; in the aff- cells, twice the prefix cache hits, TTFT p50 ≤ 0.5 and E2E p99 ≤ 0.8; in fail-kill, TTFT p99 after the kill ≤ 1.2 and no more cut streams (which are not errors) than %s.\n", missed, len(results), base)
}

// slowestFirstTokens prints, to stderr, the measured requests with the
// longest first tokens: when each started, on which engine, and how many
// of the run's requests that engine then had in flight (from the records:
// what the engine held, not what the balancer believed).
func slowestFirstTokens(recs []llmsim.Record, addrs []string, t0 time.Time) {
	slowest(recs, addrs, t0, "TTFT", func(r llmsim.Record) time.Duration { return r.TTFT })
	slowest(recs, addrs, t0, "E2E", func(r llmsim.Record) time.Duration { return r.E2E })
}

// slowest prints the six streamed requests of recs slowest by of, with the
// engine they went to and how many requests each engine had in flight then.
func slowest(recs []llmsim.Record, addrs []string, t0 time.Time, label string, of func(llmsim.Record) time.Duration) {
	var ok []llmsim.Record
	for _, r := range recs {
		if r.Err == nil && r.Status == http.StatusOK && !r.Warmup && r.Stream {
			ok = append(ok, r)
		}
	}
	slices.SortFunc(ok, func(a, b llmsim.Record) int { return cmp.Compare(of(b), of(a)) })
	for _, r := range ok[:min(6, len(ok))] {
		busy := make([]int, len(addrs))
		for _, o := range recs {
			if i := slices.Index(addrs, o.Backend); i >= 0 && o.Started.Before(r.Started) && o.Started.Add(o.E2E).After(r.Started) {
				busy[i]++
			}
		}
		fmt.Fprintf(os.Stderr, "  %s %s (TTFT %s) at %.2fs on engine %d; in flight on each engine then %v; prompt %d output %d\n",
			label, ms(of(r)), ms(r.TTFT), r.Started.Sub(t0).Seconds(), slices.Index(addrs, r.Backend), busy, r.Prompt, r.Output)
	}
}
