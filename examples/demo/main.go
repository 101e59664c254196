// Command demo starts a heterogeneous pool of simulated LLM engines, runs
// Caddy with the aibalance plugin in front of them (the quickstart
// Caddyfile), drives a realistic open-loop load of streaming chat
// completions, and shows the live request distribution per server.
//
//	go run ./examples/demo                 # 30 s of load, then a summary
//	go run ./examples/demo -keep           # then keep serving on :8080
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/dustin/go-humanize"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/aibalance/caddy-aibalance"
	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/examples/quickstart"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

type options struct {
	speeds   []float64
	port     int
	admin    string
	duration time.Duration
	load     float64
	keep     bool
	live     bool
	out      io.Writer
}

func main() {
	o := options{out: os.Stdout}
	speeds := flag.String("speeds", "1,1,0.6,0.3", "speed factor of each simulated engine")
	flag.IntVar(&o.port, "port", 8080, "port Caddy listens on")
	flag.StringVar(&o.admin, "admin", "localhost:2019", "Caddy admin API address")
	flag.DurationVar(&o.duration, "duration", 30*time.Second, "how long to drive load")
	flag.Float64Var(&o.load, "load", 0.7, "offered load as a fraction of the pool's capacity")
	flag.BoolVar(&o.keep, "keep", false, "keep serving after the load ends, until Ctrl-C")
	flag.BoolVar(&o.live, "live", isTerminal(os.Stdout), "redraw the live view in place (ANSI); default: when writing to a terminal")
	flag.Parse()
	for _, f := range strings.Split(*speeds, ",") {
		s, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || s <= 0 {
			fmt.Fprintf(os.Stderr, "demo: bad speed %q\n", f)
			os.Exit(2)
		}
		o.speeds = append(o.speeds, s)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if _, err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// run does the demo and returns the requests completed per backend.
func run(ctx context.Context, o options) (map[string]int, error) {
	// another Caddy on these ports would silently be the one driven and read
	for _, addr := range []string{fmt.Sprintf("127.0.0.1:%d", o.port), o.admin} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("%s is taken (another Caddy?): pick free ports with -port and -admin: %w", addr, err)
		}
		_ = ln.Close()
	}
	pool, err := llmsim.StartPool(llmsim.Speeds(o.speeds...)...)
	if err != nil {
		return nil, err
	}
	defer pool.Close()

	// the quickstart Caddyfile, pointed at this pool
	cf := quickstart.Caddyfile
	for i, a := range pool.Addrs() {
		cf = strings.ReplaceAll(cf, fmt.Sprintf("127.0.0.1:%d", 8001+i), a)
	}
	cf = strings.Replace(cf, ":8080", fmt.Sprintf("http://127.0.0.1:%d", o.port), 1)
	cf = fmt.Sprintf("{\n\tadmin %s\n\tdefault_bind 127.0.0.1\n\tlog {\n\t\tlevel ERROR\n\t}\n}\n", o.admin) + cf
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	if err != nil {
		return nil, fmt.Errorf("adapting the quickstart Caddyfile: %w", err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		return nil, fmt.Errorf("starting caddy: %w", err)
	}
	defer func() { _ = caddy.Stop() }()

	var mu sync.Mutex
	w := llmsim.Workload{
		URL: fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", o.port), Duration: o.duration,
		MinPrompt: 50, MaxPrompt: 3000, MinOutput: 10, MaxOutput: 400, Seed: uint64(time.Now().UnixNano()),
	}
	mp, mo := w.MeanTokens()
	var capacity float64
	for _, s := range o.speeds {
		capacity += llmsim.Config{Speed: s}.Capacity(mp, mo)
	}
	w.Rate = o.load * capacity
	var failed int
	w.OnResult = func(r llmsim.Record) {
		if r.Err != nil || r.Status != 200 {
			mu.Lock()
			failed++
			mu.Unlock()
		}
	}
	fmt.Fprintf(o.out, "Caddy with aibalance on http://127.0.0.1:%d (OpenAI API at /v1), admin API on http://%s\n", o.port, o.admin)
	fmt.Fprintf(o.out, "Driving %.1f req/s (%.0f%% of the pool's capacity) for %v...\n\n", w.Rate, 100*o.load, o.duration)

	done := make(chan struct{})
	go func() {
		defer close(done)
		w.Run(ctx, 30*time.Second)
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lines := 0
	draw := func(final bool) {
		mu.Lock()
		defer mu.Unlock()
		if o.live && lines > 0 && !final {
			fmt.Fprintf(o.out, "\033[%dA", lines)
		}
		lines = render(o.out, pool, o.speeds, failed, o.live, adminView(o.admin))
	}
loop:
	for {
		select {
		case <-done:
			break loop
		case <-tick.C:
			draw(false)
		case <-ctx.Done():
			<-done
			break loop
		}
	}
	fmt.Fprintln(o.out, "\nSummary:")
	draw(true)
	out := map[string]int{}
	for _, s := range pool.Servers {
		out[s.Addr()] = int(s.Stats().Completed)
	}
	if o.keep && ctx.Err() == nil {
		fmt.Fprintf(o.out, "\nStill serving: point an OpenAI client at http://127.0.0.1:%d/v1 (model %q). Ctrl-C to stop.\n", o.port, llmsim.DefaultConfig.Model)
		<-ctx.Done()
	}
	return out, nil
}

// adminView reads the balancer's view of its upstreams from Caddy's admin
// API, as any operator's tool would; nil when it cannot.
func adminView(admin string) map[string]aibalance.UpstreamView {
	client := &http.Client{Timeout: 2 * time.Second}
	res, err := client.Get("http://" + admin + "/aibalance/upstreams")
	if err != nil {
		return nil
	}
	defer res.Body.Close()
	var v aibalance.UpstreamsView
	if res.StatusCode != http.StatusOK || json.NewDecoder(res.Body).Decode(&v) != nil {
		return nil
	}
	out := map[string]aibalance.UpstreamView{}
	for _, u := range v.Upstreams {
		out[u.Address] = u
	}
	return out
}

// render writes the distribution table and returns how many lines it wrote.
// Shares are what each engine completed; in-flight, latency, the learned
// speed and the engine's own queue come from the admin API.
func render(out io.Writer, pool *llmsim.Pool, speeds []float64, failed int, live bool, view map[string]aibalance.UpstreamView) int {
	eol := "\n"
	if live {
		eol = "\033[K\n" // clear the rest of a redrawn line
	}
	total := 0
	done := make([]int, len(pool.Servers))
	for i, s := range pool.Servers {
		done[i] = int(s.Stats().Completed)
		total += done[i]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Request Distribution Active: %s completed, %d failed%s", humanize.Comma(int64(total)), failed, eol)
	for i, s := range pool.Servers {
		share := 0.0
		if total > 0 {
			share = float64(done[i]) / float64(total)
		}
		var inflight float64
		latency, learned, engine := "-", "learning", ""
		if u, ok := view[s.Addr()]; ok {
			inflight = u.Load.Inflight
			if u.Counters.MeanE2E > 0 {
				latency = u.Counters.MeanE2E.Round(time.Millisecond).String()
			}
			if ms := u.Counters.Model; ms.Samples > 0 && ms.TPOTBase > 0 {
				learned = fmt.Sprintf("%.0f tok/s (prediction error %.0f%%)", 1/ms.TPOTBase, 100*ms.MAPE)
			}
			if e := u.Engine; e != nil && e.Fresh && e.Waiting != nil && e.Running != nil {
				engine = fmt.Sprintf("  engine: %.0f running, %.0f waiting", *e.Running, *e.Waiting)
			}
		}
		bar := strings.Repeat("█", int(share*30+0.5))
		fmt.Fprintf(&b, "Server %d  speed %.1f×  %5.1f%% %-30s  in-flight %3.0f  mean latency %7s  learned %s%s%s",
			i+1, speeds[i], 100*share, bar, inflight, latency, learned, engine, eol)
	}
	fmt.Fprint(out, b.String())
	return len(pool.Servers) + 1
}
