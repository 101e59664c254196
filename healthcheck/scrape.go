package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// Defaults of ScrapeConfig.
const (
	DefaultInterval = time.Second
	DefaultPath     = "/metrics"
	// DefaultMaxTimeout caps the default timeout (the interval).
	DefaultMaxTimeout = 2 * time.Second
)

// ScrapeConfig says how to scrape one upstream's engine metrics. The zero
// value scrapes http://<upstream>/metrics every second and detects the engine.
type ScrapeConfig struct {
	// Engine is the engine behind the upstream: auto, vllm, sglang, tgi,
	// llamacpp, or none to never scrape. auto detects it from the metric
	// names on each scrape. Default: auto.
	Engine string
	// Path is the metrics endpoint's path. Default: /metrics.
	Path string
	// Port is the metrics endpoint's port, when it is not the upstream's
	// (TGI and vLLM serve /metrics on their API port, a sidecar exporter
	// may not). Default: 0, the upstream's own port.
	Port int
	// Scheme is http or https, from the transport's TLS settings.
	// Default: http.
	Scheme string
	// Interval is the time between the starts of two scrapes; a scrape
	// slower than it delays the next one. Samples are trusted for 3
	// intervals. Default: 1s.
	Interval time.Duration
	// Timeout bounds one scrape, body included. Default: the interval,
	// at most 2s (a busy engine answers /metrics late, and a late sample
	// is still better than none until it goes stale).
	Timeout time.Duration
	// MaxBytes is the largest body read; a longer one fails the scrape.
	// Default: 4 MiB.
	MaxBytes int64
	// ModelsInterval is how often the engine's /v1/models (on the
	// upstream's own port) is read; negative: never. Default: 10s.
	ModelsInterval time.Duration
}

// withDefaults returns c with its zero fields set to their defaults.
func (c ScrapeConfig) withDefaults() ScrapeConfig {
	if c.Engine == "" {
		c.Engine = EngineAuto
	}
	if c.Path == "" {
		c.Path = DefaultPath
	}
	if c.Scheme == "" {
		c.Scheme = "http"
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Timeout == 0 {
		c.Timeout = min(c.Interval, DefaultMaxTimeout)
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	if c.ModelsInterval == 0 {
		c.ModelsInterval = DefaultModelsInterval
	}
	return c
}

// Validate checks c; zero fields are valid (they take their defaults).
func (c ScrapeConfig) Validate() error {
	if !ValidEngine(c.Engine) {
		return fmt.Errorf("unknown engine %q (want auto, vllm, sglang, tgi, llamacpp or none)", c.Engine)
	}
	if c.Path != "" && !strings.HasPrefix(c.Path, "/") {
		return fmt.Errorf("metrics path %q must start with /", c.Path)
	}
	if c.Port < 0 || c.Port > 65535 {
		return fmt.Errorf("metrics port %d out of range", c.Port)
	}
	switch c.Scheme {
	case "", "http", "https":
	default:
		return fmt.Errorf("scheme %q must be http or https", c.Scheme)
	}
	if c.Interval < 0 {
		return fmt.Errorf("negative scrape interval %s", c.Interval)
	}
	if c.Timeout < 0 {
		return fmt.Errorf("negative scrape timeout %s", c.Timeout)
	}
	if c.MaxBytes < 0 {
		return fmt.Errorf("negative metrics size limit %d", c.MaxBytes)
	}
	return nil
}

// key identifies the configuration in the scraper pool (defaults applied).
func (c ScrapeConfig) key() string {
	return fmt.Sprintf("engine=%s path=%q port=%d scheme=%s interval=%s timeout=%s max=%d models=%s",
		c.Engine, c.Path, c.Port, c.Scheme, c.Interval, c.Timeout, c.MaxBytes, c.ModelsInterval)
}

// metricsURL is the URL of addr's metrics endpoint. addr is a reverse
// proxy upstream dial address, host:port (network tcp); c has its defaults.
func metricsURL(addr string, c ScrapeConfig) (string, error) {
	if strings.ContainsAny(addr, "{}") {
		return "", fmt.Errorf("address %q has placeholders", addr)
	}
	na, err := caddy.ParseNetworkAddress(addr)
	if err != nil {
		return "", fmt.Errorf("address %q: %w", addr, err)
	}
	switch na.Network {
	case "tcp", "tcp4", "tcp6":
	default:
		return "", fmt.Errorf("address %q: network %s cannot be scraped", addr, na.Network)
	}
	if na.PortRangeSize() > 1 {
		return "", fmt.Errorf("address %q is a port range", addr)
	}
	if na.Host == "" {
		return "", fmt.Errorf("address %q has no host", addr)
	}
	port := int(na.StartPort)
	if c.Port != 0 {
		port = c.Port
	}
	if port == 0 {
		return "", fmt.Errorf("address %q has no port", addr)
	}
	return c.Scheme + "://" + net.JoinHostPort(na.Host, strconv.Itoa(port)) + c.Path, nil
}

// Scraper polls one upstream's metrics endpoint and publishes what it reads
// on the upstream's aibalance.Backend. Use Acquire and Release, which share
// one Scraper per address and configuration; NewScraper is for callers that
// manage the lifetime themselves.
type Scraper struct {
	addr      string
	url       string
	modelsURL string
	cfg       ScrapeConfig // defaults applied

	// Replaced by a later Acquire of the same scraper (a reload's new
	// config): the newest transport's client and logger win.
	client  atomic.Pointer[http.Client]
	backend atomic.Pointer[aibalance.Backend]
	logger  atomic.Pointer[zap.Logger]

	now func() time.Time // the clock; time.Now unless a test sets it

	startOnce sync.Once
	stopOnce  sync.Once
	cancel    context.CancelFunc
	done      chan struct{}

	// Owned by the polling goroutine.
	failing   bool
	failures  int
	engine    string
	published time.Time // At of the last sample published
	modelsAt  time.Time // when the model list was last read (or tried)
	started   float64   // the latest process start time the engine exported
}

// NewScraper returns a stopped scraper of addr's engine metrics, publishing
// on b. client carries the transport's TLS settings (nil: http.DefaultClient);
// logger may be nil.
func NewScraper(addr string, cfg ScrapeConfig, client *http.Client, b *aibalance.Backend, logger *zap.Logger) (*Scraper, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("engine metrics scraper for %s: %w", addr, err)
	}
	cfg = cfg.withDefaults()
	if cfg.Engine == EngineNone {
		return nil, fmt.Errorf("engine metrics scraper for %s: engine is none", addr)
	}
	if b == nil {
		return nil, fmt.Errorf("engine metrics scraper for %s: no backend", addr)
	}
	u, err := metricsURL(addr, cfg)
	if err != nil {
		return nil, fmt.Errorf("engine metrics scraper: %w", err)
	}
	mu, err := modelsURL(addr, cfg)
	if err != nil {
		return nil, fmt.Errorf("engine metrics scraper: %w", err)
	}
	s := &Scraper{addr: addr, url: u, modelsURL: mu, cfg: cfg, now: time.Now, done: make(chan struct{})}
	s.update(client, b, logger)
	return s, nil
}

// update replaces the client, backend and logger used from the next scrape.
func (s *Scraper) update(client *http.Client, b *aibalance.Backend, logger *zap.Logger) {
	if client == nil {
		client = http.DefaultClient
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	s.client.Store(client)
	s.backend.Store(b)
	s.logger.Store(logger.With(zap.String("upstream", s.addr), zap.String("url", s.url)))
}

// URL is the metrics endpoint the scraper polls.
func (s *Scraper) URL() string { return s.url }

// Start starts polling in a goroutine; it scrapes at once, then every
// interval, until Destruct. Calling it again does nothing.
func (s *Scraper) Start() {
	s.startOnce.Do(func() {
		// The scraper outlives the config that started it (a reload hands
		// it to the next config), so its context is its own, not the
		// config's: Destruct, called with the last Release, cancels it.
		ctx, cancel := context.WithCancel(context.Background())
		s.cancel = cancel
		running.Add(1)
		go s.run(ctx)
	})
}

// Destruct stops the scraper, waits for its goroutine and clears the
// backend's engine metrics, unless another scraper (a reload's, with a new
// configuration) has published on the backend since. It implements
// caddy.Destructor.
func (s *Scraper) Destruct() error {
	s.stopOnce.Do(func() {
		s.startOnce.Do(func() {}) // a later Start must not start it
		if s.cancel != nil {
			s.cancel()
			<-s.done
		}
		b := s.backend.Load()
		if m, _ := b.Engine(s.now()); !s.published.IsZero() && m.At.Equal(s.published) {
			b.ClearEngine()
		}
	})
	return nil
}

func (s *Scraper) run(ctx context.Context) {
	defer close(s.done)
	defer running.Add(-1)
	t := time.NewTicker(s.cfg.Interval)
	defer t.Stop()
	for {
		s.poll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// poll scrapes once and publishes the result. A panic is logged and the
// next tick tries again.
func (s *Scraper) poll(ctx context.Context) {
	defer func() {
		if p := recover(); p != nil {
			s.logger.Load().Error("engine metrics scraper panicked",
				zap.Any("panic", p), zap.Stack("stack"))
		}
	}()
	s.pollModels(ctx)
	m, err := s.Scrape(ctx)
	if ctx.Err() != nil {
		return // stopping: not a failure of the upstream
	}
	log := s.logger.Load()
	b := s.backend.Load()
	if err != nil {
		// an engine that refuses connections on its own port is down:
		// its breaker need not wait for a client request to learn it
		var op *net.OpError
		if s.cfg.Port == 0 && errors.As(err, &op) && op.Op == "dial" {
			For(b).EngineDown(s.now(), "its metrics endpoint refused the connection", log)
		}
		// Log changes of state, not every failure: a down upstream would
		// otherwise log every interval. The old sample goes stale by itself.
		s.failures++
		if !s.failing {
			s.failing = true
			log.Debug("engine metrics scrape failing", zap.Error(err))
		}
		return
	}
	b.SetEngine(m, 3*s.cfg.Interval)
	s.published = m.At
	if br := Of(b); br != nil && s.cfg.Port == 0 {
		br.EngineUp(m.At, log)
	}
	if s.failing {
		log.Debug("engine metrics scrape recovered", zap.Int("failures", s.failures))
		s.failing, s.failures = false, 0
		// read the models again: it may be a new engine. (A scrape that
		// failed says nothing of a restart — a busy engine answers its
		// metrics late — so it starts no slow start: a restart shows in
		// the process start time, a crash in the breaker.)
		s.modelsAt = time.Time{}
	}
	// A later start time than any seen is a restart. Only later: one
	// address may front several engine processes (a Kubernetes service),
	// whose start times alternate from scrape to scrape.
	if m.StartTime > s.started {
		if s.started > 0 {
			log.Info("engine restarted: slow start", zap.Float64("process_start_time", m.StartTime))
			b.StartRamp(m.At)
			s.modelsAt = time.Time{}
		}
		s.started = m.StartTime
	}
	if m.Engine != s.engine {
		log.Debug("engine metrics found", zap.String("engine", m.Engine),
			zap.Bool("waiting", m.HasWaiting), zap.Bool("running", m.HasRunning), zap.Bool("kv_usage", m.HasKV))
		s.engine = m.Engine
	}
}

// pollModels reads the engine's model list when it is due. A list the
// engine refuses or does not have makes its models unknown (it may serve
// anything); a network error keeps the last list (a restarting engine
// serves what it served).
func (s *Scraper) pollModels(ctx context.Context) {
	if s.cfg.ModelsInterval < 0 {
		return
	}
	now := s.now()
	if !s.modelsAt.IsZero() && now.Sub(s.modelsAt) < s.cfg.ModelsInterval {
		return
	}
	s.modelsAt = now
	m, err := s.FetchModels(ctx)
	if ctx.Err() != nil {
		return
	}
	b := s.backend.Load()
	switch {
	case err == nil:
		if old := b.Models(); old == nil || !sameModels(old, m) {
			s.logger.Load().Info("engine models", zap.Strings("models", modelNames(m)))
		}
		b.SetModels(m)
	case errors.Is(err, errNoModels) || errors.Is(err, errTooLarge):
		if b.Models() != nil {
			s.logger.Load().Info("engine no longer lists its models: routing ignores them", zap.Error(err))
		}
		b.SetModels(nil)
	default:
		s.modelsAt = time.Time{} // unreachable: try again next interval
	}
}

func sameModels(a, b *aibalance.ServedModels) bool {
	if len(a.Context) != len(b.Context) {
		return false
	}
	for k, v := range a.Context {
		if w, ok := b.Context[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func modelNames(m *aibalance.ServedModels) []string {
	out := make([]string, 0, len(m.Context))
	for k := range m.Context {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Scrape fetches and parses the metrics once, without publishing them. The
// result's At is the time the body was parsed.
func (s *Scraper) Scrape(ctx context.Context) (aibalance.EngineMetrics, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return aibalance.EngineMetrics{}, fmt.Errorf("scraping %s: %w", s.url, err)
	}
	// The classic text format: engines built on Python's prometheus_client
	// answer OpenMetrics or protobuf only when asked.
	req.Header.Set("Accept", "text/plain;version=0.0.4;q=1,*/*;q=0.1")
	resp, err := s.client.Load().Do(req)
	if err != nil {
		return aibalance.EngineMetrics{}, fmt.Errorf("scraping %s: %w", s.url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		Drain(resp.Body)
		return aibalance.EngineMetrics{}, fmt.Errorf("scraping %s: status %d", s.url, resp.StatusCode)
	}
	if resp.ContentLength > s.cfg.MaxBytes {
		return aibalance.EngineMetrics{}, fmt.Errorf("scraping %s: %w: Content-Length %d over %d",
			s.url, errTooLarge, resp.ContentLength, s.cfg.MaxBytes)
	}
	m, err := Parse(s.cfg.Engine, resp.Body, s.cfg.MaxBytes)
	if err != nil {
		if !errors.Is(err, errTooLarge) {
			Drain(resp.Body)
		}
		return aibalance.EngineMetrics{}, fmt.Errorf("scraping %s: %w", s.url, err)
	}
	m.At = s.now()
	return m, nil
}

// Drain reads a little of what is left of a body so its connection can be
// reused.
func Drain(r io.Reader) { _, _ = io.Copy(io.Discard, io.LimitReader(r, 64<<10)) }

// scrapers holds one Scraper per upstream address and configuration, shared
// by every handler that uses them. It is package level so that a scraper
// survives a config reload: Caddy provisions the new config (Acquire) before
// it cleans up the old one (Release), so the count never drops to zero.
var scrapers = caddy.NewUsagePool()

// running counts the polling goroutines.
var running atomic.Int64

// Acquire takes a reference on the scraper of addr with cfg, creating and
// starting it on first use; it publishes on b. A later Acquire of a running
// scraper hands it its client, backend and logger (the newest config's).
// With cfg.Engine none it does nothing. Every successful Acquire must be
// matched by one Release with the same addr and cfg.
func Acquire(addr string, cfg ScrapeConfig, client *http.Client, b *aibalance.Backend, logger *zap.Logger) error {
	if cfg.Engine == EngineNone {
		return nil
	}
	// Build the scraper before touching the pool: the constructor below
	// cannot fail, so the pool never counts a reference to a failed entry.
	s, err := NewScraper(addr, cfg, client, b, logger)
	if err != nil {
		return err
	}
	v, loaded, err := scrapers.LoadOrNew(poolKey(addr, s.cfg), func() (caddy.Destructor, error) {
		s.Start()
		return s, nil
	})
	if err != nil {
		return fmt.Errorf("engine metrics scraper for %s: %w", addr, err)
	}
	if loaded {
		v.(*Scraper).update(client, b, logger)
	}
	return nil
}

// Release drops a reference taken by Acquire; the last one stops the
// scraper and clears the backend's engine metrics.
func Release(addr string, cfg ScrapeConfig) {
	if cfg.Engine == EngineNone || cfg.Validate() != nil {
		return // Acquire took nothing
	}
	_, _ = scrapers.Delete(poolKey(addr, cfg.withDefaults()))
}

// Scrapers returns how many scrapers are polling now.
func Scrapers() int { return int(running.Load()) }

func poolKey(addr string, cfg ScrapeConfig) string { return addr + " " + cfg.key() }

// Interface guards
var _ caddy.Destructor = (*Scraper)(nil)
