package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// metricsServer is an engine's /metrics on a loopback port; its body and
// status can change while a scraper polls it.
type metricsServer struct {
	addr   string
	body   atomic.Pointer[string]
	status atomic.Int64
	hits   atomic.Int64
}

func startMetricsServer(t *testing.T, body string) *metricsServer {
	t.Helper()
	ms := &metricsServer{}
	ms.set(http.StatusOK, body)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ms.addr = ln.Addr().String()
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ms.hits.Add(1)
			if r.URL.Path != "/metrics" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
			w.WriteHeader(int(ms.status.Load()))
			_, _ = w.Write([]byte(*ms.body.Load()))
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ms
}

func (ms *metricsServer) set(status int, body string) {
	ms.body.Store(&body)
	ms.status.Store(int64(status))
}

// waitFor polls cond until it holds or a generous deadline passes: the
// machine may be loaded, so no test depends on how fast a tick comes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// fastConfig polls every 20ms with a timeout far above it, so a slow
// machine delays samples instead of failing them.
func fastConfig() ScrapeConfig {
	return ScrapeConfig{Interval: 20 * time.Millisecond, Timeout: 5 * time.Second}
}

// pooled returns the scraper the pool holds for addr and cfg, or nil.
func pooled(addr string, cfg ScrapeConfig) *Scraper {
	var found *Scraper
	key := poolKey(addr, cfg.withDefaults())
	scrapers.Range(func(k, v any) bool {
		if k == key {
			found = v.(*Scraper)
			return false
		}
		return true
	})
	return found
}

func checkNoScrapers(t *testing.T) {
	t.Helper()
	if n := Scrapers(); n != 0 {
		t.Fatalf("Scrapers() = %d before the test, want 0", n)
	}
}

func TestScraperFollowsEngine(t *testing.T) {
	checkNoScrapers(t)
	vllm := string(readFixture(t, "vllm.txt"))
	ms := startMetricsServer(t, vllm)
	b := new(aibalance.Backend)
	cfg := fastConfig()
	if err := Acquire(ms.addr, cfg, &http.Client{}, b, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	defer Release(ms.addr, cfg)

	steps := []struct {
		name    string
		body    string
		engine  string
		waiting float64
	}{
		{"vllm fixture", vllm, "vllm", 5},
		{"vllm queue grows", strings.Replace(vllm,
			`vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0`,
			`vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 40.0`, 1), "vllm", 42},
		{"engine replaced by sglang", string(readFixture(t, "sglang.txt")), "sglang", 12},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			ms.set(http.StatusOK, st.body)
			waitFor(t, fmt.Sprintf("%s waiting=%v", st.engine, st.waiting), func() bool {
				m, fresh := b.Engine(time.Now())
				return fresh && m.Engine == st.engine && m.Waiting == st.waiting
			})
		})
	}
}

func TestScraperKeepsOldSampleOnError(t *testing.T) {
	checkNoScrapers(t)
	ms := startMetricsServer(t, string(readFixture(t, "tgi.txt")))
	core, logs := observer.New(zapcore.DebugLevel)
	b := new(aibalance.Backend)
	cfg := fastConfig()
	if err := Acquire(ms.addr, cfg, &http.Client{}, b, zap.New(core)); err != nil {
		t.Fatal(err)
	}
	defer Release(ms.addr, cfg)
	waitFor(t, "a first sample", func() bool { _, fresh := b.Engine(time.Now()); return fresh })

	ms.set(http.StatusServiceUnavailable, "loading model")
	failedFrom := ms.hits.Load()
	waitFor(t, "several failed scrapes", func() bool { return ms.hits.Load() >= failedFrom+5 })
	m, _ := b.Engine(time.Now())
	if m.Engine != "tgi" || m.Waiting != 3 {
		t.Fatalf("after errors Engine = %+v, want the old tgi sample", m)
	}
	if _, fresh := b.Engine(m.At.Add(4 * cfg.Interval)); fresh {
		t.Fatal("the old sample is still fresh 4 intervals on")
	}
	if n := logs.FilterMessage("engine metrics scrape failing").Len(); n != 1 {
		t.Fatalf("%d failure logs over several failures, want 1", n)
	}

	ms.set(http.StatusOK, string(readFixture(t, "llamacpp.txt")))
	waitFor(t, "recovery", func() bool { m, fresh := b.Engine(time.Now()); return fresh && m.Engine == "llamacpp" })
	if n := logs.FilterMessage("engine metrics scrape recovered").Len(); n != 1 {
		t.Fatalf("%d recovery logs, want 1", n)
	}
}

func TestAcquireRelease(t *testing.T) {
	checkNoScrapers(t)
	ms := startMetricsServer(t, string(readFixture(t, "sglang.txt")))
	b := new(aibalance.Backend)
	cfg := fastConfig()
	other := fastConfig()
	other.Engine = EngineSGLang

	steps := []struct {
		name    string
		do      func() error
		want    int  // Scrapers() after the step
		sameAs1 bool // the pool still holds the first scraper of cfg
	}{
		{"first acquire starts", func() error { return Acquire(ms.addr, cfg, nil, b, nil) }, 1, true},
		{"second acquire shares", func() error { return Acquire(ms.addr, cfg, nil, b, nil) }, 1, true},
		{"other config, own scraper", func() error { return Acquire(ms.addr, other, nil, b, nil) }, 2, true},
		{"engine none scrapes nothing", func() error { return Acquire(ms.addr, ScrapeConfig{Engine: EngineNone}, nil, b, nil) }, 2, true},
		{"release once, still running", func() error { Release(ms.addr, cfg); return nil }, 2, true},
		{"release other", func() error { Release(ms.addr, other); return nil }, 1, true},
		{"release none is a no-op", func() error { Release(ms.addr, ScrapeConfig{Engine: EngineNone}); return nil }, 1, true},
		{"release twice, stopped", func() error { Release(ms.addr, cfg); return nil }, 0, false},
		{"release after the last is harmless", func() error { Release(ms.addr, cfg); return nil }, 0, false},
	}
	var first *Scraper
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			if err := st.do(); err != nil {
				t.Fatal(err)
			}
			if first == nil {
				first = pooled(ms.addr, cfg)
			}
			if n := Scrapers(); n != st.want {
				t.Fatalf("Scrapers() = %d, want %d", n, st.want)
			}
			if got := pooled(ms.addr, cfg); st.sameAs1 != (got != nil && got == first) {
				t.Fatalf("pool holds %p, first scraper %p, want same %v", got, first, st.sameAs1)
			}
		})
	}
	if m, _ := b.Engine(time.Now()); m.Engine != "" {
		t.Fatalf("after the last release Engine = %+v, want cleared", m)
	}
	// a scrape already on the wire when the scraper stopped may still
	// reach the server: let it land before counting
	time.Sleep(50 * time.Millisecond)
	hits := ms.hits.Load()
	time.Sleep(100 * time.Millisecond)
	if n := ms.hits.Load(); n != hits {
		t.Fatalf("%d scrapes after the last release", n-hits)
	}
}

// TestReloadKeepsScraper follows a Caddy reload: the new config acquires
// before the old one releases, so the scraper never stops and its sample
// stays fresh.
func TestReloadKeepsScraper(t *testing.T) {
	checkNoScrapers(t)
	ms := startMetricsServer(t, string(readFixture(t, "vllm.txt")))
	b := new(aibalance.Backend)
	cfg := fastConfig()
	oldClient, newClient := &http.Client{}, &http.Client{}
	if err := Acquire(ms.addr, cfg, oldClient, b, nil); err != nil {
		t.Fatal(err)
	}
	s := pooled(ms.addr, cfg)
	waitFor(t, "a first sample", func() bool { _, fresh := b.Engine(time.Now()); return fresh })

	if err := Acquire(ms.addr, cfg, newClient, b, nil); err != nil { // new config's Provision
		t.Fatal(err)
	}
	Release(ms.addr, cfg) // old config's Cleanup
	defer Release(ms.addr, cfg)

	if got := pooled(ms.addr, cfg); got != s {
		t.Fatalf("scraper replaced on reload: %p, was %p", got, s)
	}
	if Scrapers() != 1 {
		t.Fatalf("Scrapers() = %d, want 1", Scrapers())
	}
	if s.client.Load() != newClient {
		t.Fatal("the scraper still uses the old config's client")
	}
	if m, _ := b.Engine(time.Now()); m.Engine != "vllm" {
		t.Fatalf("sample cleared by the reload: %+v", m)
	}
}

// TestDestructKeepsOtherScrapersSample: when a reload changes the scrape
// config, the new scraper starts before the old one stops; the old one must
// not clear what the new one published, and must clear its own sample.
func TestDestructKeepsOtherScrapersSample(t *testing.T) {
	ms := startMetricsServer(t, string(readFixture(t, "vllm.txt")))
	t0 := time.Now()
	tests := []struct {
		name      string
		order     []string // which scraper polls, in order
		wantClear bool
	}{
		{"new published last", []string{"old", "new"}, false},
		{"old published last", []string{"new", "old"}, true},
		{"only old published", []string{"old"}, true},
		{"old never published", []string{"new"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := new(aibalance.Backend)
			byName := map[string]*Scraper{}
			for i, name := range []string{"old", "new"} {
				s, err := NewScraper(ms.addr, fastConfig(), nil, b, nil)
				if err != nil {
					t.Fatal(err)
				}
				at := t0.Add(time.Duration(i) * time.Millisecond)
				s.now = func() time.Time { return at }
				byName[name] = s
			}
			for _, name := range tt.order {
				byName[name].poll(context.Background())
			}
			_ = byName["old"].Destruct()
			m, _ := b.Engine(t0)
			if cleared := m.Engine == ""; cleared != tt.wantClear {
				t.Fatalf("cleared = %v, want %v (%+v)", cleared, tt.wantClear, m)
			}
		})
	}
}

func TestScrapeDirect(t *testing.T) {
	fixed := time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)
	ms := startMetricsServer(t, string(readFixture(t, "llamacpp.txt")))
	tests := []struct {
		name    string
		status  int
		body    string
		cfg     ScrapeConfig
		wantErr string
	}{
		{name: "ok", status: 200, body: string(readFixture(t, "llamacpp.txt"))},
		{name: "status", status: 404, body: "not found", wantErr: "status 404"},
		{name: "over the limit", status: 200, body: strings.Repeat("tgi_queue_size 1\n", 100), cfg: ScrapeConfig{MaxBytes: 1000}, wantErr: "size limit"},
		{name: "garbage", status: 200, body: "<!doctype html>", wantErr: "parsing engine metrics"},
		{name: "wrong engine", status: 200, body: "tgi_queue_size 1\n", cfg: ScrapeConfig{Engine: EngineVLLM}, wantErr: "no vllm metrics"},
		{name: "wrong path", status: 200, body: "tgi_queue_size 1\n", cfg: ScrapeConfig{Path: "/stats"}, wantErr: "status 404"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ms.set(tt.status, tt.body)
			s, err := NewScraper(ms.addr, tt.cfg, nil, new(aibalance.Backend), nil)
			if err != nil {
				t.Fatal(err)
			}
			s.now = func() time.Time { return fixed }
			m, err := s.Scrape(context.Background())
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !m.At.Equal(fixed) || m.Engine != "llamacpp" {
				t.Fatalf("got %+v, want llamacpp at the injected clock's time", m)
			}
		})
	}
}

func TestScrapeTimeout(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	s, err := NewScraper(ln.Addr().String(), ScrapeConfig{Timeout: 50 * time.Millisecond}, nil, new(aibalance.Backend), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Scrape(context.Background()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want a deadline error", err)
	}
}

// panicky is a transport that panics, to check the scraper survives it.
type panicky struct{ n atomic.Int64 }

func (p *panicky) RoundTrip(*http.Request) (*http.Response, error) {
	p.n.Add(1)
	panic("boom")
}

func TestScraperRecoversPanics(t *testing.T) {
	checkNoScrapers(t)
	core, logs := observer.New(zapcore.ErrorLevel)
	rt := new(panicky)
	cfg := fastConfig()
	if err := Acquire("127.0.0.1:9", cfg, &http.Client{Transport: rt}, new(aibalance.Backend), zap.New(core)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two panics", func() bool { return rt.n.Load() >= 2 })
	Release("127.0.0.1:9", cfg)
	if n := logs.FilterMessage("engine metrics scraper panicked").Len(); n < 2 {
		t.Fatalf("%d panic logs, want every panic logged and the loop alive", n)
	}
	if Scrapers() != 0 {
		t.Fatalf("Scrapers() = %d after release", Scrapers())
	}
}

func TestAcquireErrors(t *testing.T) {
	checkNoScrapers(t)
	b := new(aibalance.Backend)
	tests := []struct {
		name    string
		addr    string
		cfg     ScrapeConfig
		b       *aibalance.Backend
		wantErr string
	}{
		{"unknown engine", "127.0.0.1:8000", ScrapeConfig{Engine: "ollama"}, b, `unknown engine "ollama"`},
		{"no backend", "127.0.0.1:8000", ScrapeConfig{}, nil, "no backend"},
		{"unix socket", "unix//run/vllm.sock", ScrapeConfig{}, b, "cannot be scraped"},
		{"placeholder", "{http.request.host}:8000", ScrapeConfig{}, b, "placeholders"},
		{"no port", "vllm.internal", ScrapeConfig{}, b, "no port"},
		{"port range", "127.0.0.1:8000-8003", ScrapeConfig{}, b, "port range"},
		{"bad scheme", "127.0.0.1:8000", ScrapeConfig{Scheme: "h2c"}, b, "http or https"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Acquire(tt.addr, tt.cfg, nil, tt.b, nil)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
			}
			if Scrapers() != 0 {
				t.Fatalf("Scrapers() = %d after a failed Acquire", Scrapers())
			}
		})
	}
}

func TestMetricsURL(t *testing.T) {
	tests := []struct {
		name string
		addr string
		cfg  ScrapeConfig
		want string
	}{
		{"defaults", "10.0.0.7:8000", ScrapeConfig{}, "http://10.0.0.7:8000/metrics"},
		{"https", "vllm-0.internal:443", ScrapeConfig{Scheme: "https"}, "https://vllm-0.internal:443/metrics"},
		{"own port and path", "10.0.0.7:8000", ScrapeConfig{Port: 9400, Path: "/engine/metrics"}, "http://10.0.0.7:9400/engine/metrics"},
		{"ipv6", "[fd00::7]:30000", ScrapeConfig{}, "http://[fd00::7]:30000/metrics"},
		{"tcp network prefix", "tcp/10.0.0.7:8080", ScrapeConfig{}, "http://10.0.0.7:8080/metrics"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := metricsURL(tt.addr, tt.cfg.withDefaults())
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func TestScrapeConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     ScrapeConfig
		wantErr string
	}{
		{"zero", ScrapeConfig{}, ""},
		{"every engine", ScrapeConfig{Engine: EngineLlamaCpp}, ""},
		{"path without slash", ScrapeConfig{Path: "metrics"}, "must start with /"},
		{"port", ScrapeConfig{Port: 70000}, "out of range"},
		{"interval", ScrapeConfig{Interval: -time.Second}, "negative scrape interval"},
		{"timeout", ScrapeConfig{Timeout: -time.Second}, "negative scrape timeout"},
		{"max bytes", ScrapeConfig{MaxBytes: -1}, "negative metrics size limit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if (err == nil) != (tt.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}

	defaults := []struct {
		name        string
		cfg         ScrapeConfig
		wantTimeout time.Duration
	}{
		{"default interval", ScrapeConfig{}, time.Second},
		{"short interval", ScrapeConfig{Interval: 200 * time.Millisecond}, 200 * time.Millisecond},
		{"long interval", ScrapeConfig{Interval: 10 * time.Second}, 2 * time.Second},
		{"explicit", ScrapeConfig{Interval: 10 * time.Second, Timeout: 5 * time.Second}, 5 * time.Second},
	}
	for _, tt := range defaults {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.cfg.withDefaults()
			if c.Timeout != tt.wantTimeout {
				t.Fatalf("Timeout = %s, want %s", c.Timeout, tt.wantTimeout)
			}
			if c.Engine != EngineAuto || c.Path != "/metrics" || c.Scheme != "http" || c.MaxBytes != 4<<20 {
				t.Fatalf("defaults not applied: %+v", c)
			}
		})
	}
}

// TestScraperRestartStartsSlowStart: a later process start time than any
// seen is a restart and starts the backend's slow start; an earlier one
// (another process behind the same address) is not.
func TestScraperRestartStartsSlowStart(t *testing.T) {
	engine := func(start string) string {
		return "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nprocess_start_time_seconds " + start + "\n"
	}
	ms := startMetricsServer(t, engine("1000"))
	var set aibalance.BackendSet
	defer set.Release()
	b := set.Get(ms.addr)
	s, err := NewScraper(ms.addr, fastConfig(), nil, b, nil)
	if err != nil {
		t.Fatal(err)
	}
	ramping := func() bool { r, _ := b.Ramping(time.Now(), time.Minute); return r }
	s.poll(context.Background())
	ms.set(http.StatusOK, engine("900")) // another process behind the address
	s.poll(context.Background())
	if ramping() {
		t.Fatal("a first start time, or an earlier one, started a slow start")
	}
	ms.set(http.StatusOK, engine("2000"))
	s.poll(context.Background())
	if !ramping() {
		t.Fatal("a restart (later start time) did not start a slow start")
	}
	if m, _ := b.Engine(time.Now()); m.StartTime != 2000 {
		t.Fatalf("start time %v", m.StartTime)
	}
}
