package llmsim

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Config shapes one simulated engine. Zero fields take the defaults of
// DefaultConfig; durations are for Speed 1.
type Config struct {
	Model       string // served model name; default "sim-llama-8b"
	MaxModelLen int    // context window in tokens; default 8192

	Speed           float64       // speed multiplier: 0.5 is half as fast; default 1
	MaxRunning      int           // batch slots (vLLM max_num_seqs); default 16
	DecodeBase      time.Duration // decode step time with an empty batch; default 8ms
	DecodePerSeq    time.Duration // extra step time per running sequence; default 500µs
	PrefillPerToken time.Duration // prefill time per uncached prompt token; default 40µs
	PrefillChunk    int           // most prefill tokens per step (chunked prefill); default 2048
	BlockTokens     int           // prefix cache block size in tokens; default 16
	CacheBlocks     int           // prefix cache capacity in blocks; default 4096
	CharsPerToken   int           // default 4
	DefaultMaxTok   int           // output when a request sets no max_tokens; default 128

	// Scheduler is the engine model. "" (the default) is a vLLM-like batch
	// of MaxRunning slots with PrefillChunk prefill tokens a step and no KV
	// limit. SchedulerBudget ("budget") is a vLLM v1 / SGLang-like
	// scheduler: StepTokens a step shared by decode and chunked prefill, a
	// KV cache of KVTokens, and preemption by recompute when it runs out.
	Scheduler string
	// StepTokens is the budget scheduler's tokens a step, decode and
	// prefill together (vLLM's max_num_batched_tokens); default 2048.
	StepTokens int
	// KVTokens is the budget scheduler's KV cache in tokens; MaxModelLen
	// is capped to it and the prefix cache holds at most its blocks.
	// Default CacheBlocks × BlockTokens.
	KVTokens int

	// SpeedChanges set Speed at times after Start (Listen), in order: an
	// engine that slows down (thermal throttling, a noisy neighbour) or
	// recovers mid-run. Default: none.
	SpeedChanges []SpeedChange

	// SpacedJSON writes JSON with Python's default separators ({"a": 1,
	// "b": 2}), as Python servers do, in SSE chunks and JSON answers.
	// Default: compact, as Go and vLLM's pydantic write it.
	SpacedJSON bool
	// ReasoningTokens makes a chat answer's first N generated tokens
	// reasoning: streamed as "reasoning_content" deltas with "content":
	// null and returned as message.reasoning_content, as vLLM's reasoning
	// parsers do. They count as completion tokens. Default 0.
	ReasoningTokens int

	Faults Faults
}

// SchedulerBudget is Config.Scheduler's token-budget engine.
const SchedulerBudget = "budget"

// SpeedChange sets an engine's speed At a time after it starts listening.
type SpeedChange struct {
	At    time.Duration
	Speed float64
}

// Faults are injected failures; all off by default.
type Faults struct {
	ErrorRate        float64       // share of requests answered 500
	RejectAboveQueue int           // answer 429 when this many are waiting (0: never)
	RejectRate       float64       // share of requests answered 429 at once
	RetryAfter       time.Duration // Retry-After on 429s; default 1s
	HangRate         float64       // share of requests that never get an answer
	CutRate          float64       // share of streams cut off half-way
	StartupDelay     time.Duration // /health and requests answer 503 this long after Start
}

// DefaultConfig is a mid-sized model on one GPU, scaled to run fast.
var DefaultConfig = Config{
	Model:           "sim-llama-8b",
	MaxModelLen:     8192,
	Speed:           1,
	MaxRunning:      16,
	DecodeBase:      8 * time.Millisecond,
	DecodePerSeq:    500 * time.Microsecond,
	PrefillPerToken: 40 * time.Microsecond,
	PrefillChunk:    2048,
	BlockTokens:     16,
	CacheBlocks:     4096,
	CharsPerToken:   4,
	DefaultMaxTok:   128,
	StepTokens:      2048,
}

func (c Config) withDefaults() Config {
	d := DefaultConfig
	if c.Model == "" {
		c.Model = d.Model
	}
	if c.MaxModelLen == 0 {
		c.MaxModelLen = d.MaxModelLen
	}
	if c.Speed == 0 {
		c.Speed = d.Speed
	}
	if c.MaxRunning == 0 {
		c.MaxRunning = d.MaxRunning
	}
	if c.DecodeBase == 0 {
		c.DecodeBase = d.DecodeBase
	}
	if c.DecodePerSeq == 0 {
		c.DecodePerSeq = d.DecodePerSeq
	}
	if c.PrefillPerToken == 0 {
		c.PrefillPerToken = d.PrefillPerToken
	}
	if c.PrefillChunk == 0 {
		c.PrefillChunk = d.PrefillChunk
	}
	if c.BlockTokens == 0 {
		c.BlockTokens = d.BlockTokens
	}
	if c.CacheBlocks == 0 {
		c.CacheBlocks = d.CacheBlocks
	}
	if c.CharsPerToken == 0 {
		c.CharsPerToken = d.CharsPerToken
	}
	if c.DefaultMaxTok == 0 {
		c.DefaultMaxTok = d.DefaultMaxTok
	}
	if c.Faults.RetryAfter == 0 {
		c.Faults.RetryAfter = time.Second
	}
	if c.StepTokens == 0 {
		c.StepTokens = d.StepTokens
	}
	if c.KVTokens == 0 {
		c.KVTokens = c.CacheBlocks * c.BlockTokens
	}
	if c.Scheduler == SchedulerBudget {
		// as vLLM refuses a context its KV cache cannot hold, and every
		// admitted sequence then fits alone (so it always progresses)
		c.MaxModelLen = min(c.MaxModelLen, c.KVTokens)
	}
	return c
}

// validate checks the fields withDefaults cannot mend.
func (c Config) validate() error {
	switch c.Scheduler {
	case "", SchedulerBudget:
	default:
		return fmt.Errorf("llmsim: unknown scheduler %q", c.Scheduler)
	}
	if c.StepTokens < 0 || c.KVTokens < 0 {
		return fmt.Errorf("llmsim: negative step_tokens %d or kv_tokens %d", c.StepTokens, c.KVTokens)
	}
	return nil
}

// Capacity estimates the requests per second the engine sustains with a
// full batch, for requests of the given mean prompt and output tokens and
// no prefix cache hits. Benchmarks use it to set a load as a fraction of
// what a pool can serve.
//
// The budget scheduler's batch is also bounded by its KV cache and its step
// budget. The KV cache holds KVTokens / (P + O/2) sequences: a sequence
// holds its prompt and, averaged over its decode, half its output. Each
// step decodes b tokens and prefills the b·P/O tokens of the requests that
// replace the finished ones, so b·(1 + P/O) ≤ StepTokens. Where the KV
// cache binds this is an upper estimate: it takes the cache as always
// full, and ignores the spread of lengths (long outputs hold more than
// O/2 for longer) and the prefill that preempted sequences redo.
func (c Config) Capacity(promptTokens, outputTokens float64) float64 {
	c = c.withDefaults()
	b := float64(c.MaxRunning)
	if c.Scheduler == SchedulerBudget {
		b = min(b, float64(c.KVTokens)/(promptTokens+outputTokens/2), float64(c.StepTokens)/(1+promptTokens/outputTokens))
	}
	// per step: base + per-sequence decode + the prefill of the requests
	// that replace finished ones (B/O requests per step, P tokens each)
	step := c.DecodeBase.Seconds() + c.DecodePerSeq.Seconds()*b + c.PrefillPerToken.Seconds()*promptTokens*b/outputTokens
	step /= c.Speed
	return b / (step * outputTokens)
}

// Stats are counters a test can read.
type Stats struct {
	Requests     int64 // requests received on the completion endpoints
	Completed    int64 // answered in full
	Errors       int64 // answered 500 by fault injection
	Rejected     int64 // answered 429
	BadRequests  int64 // answered 4xx for bad input
	Cut          int64 // streams cut off
	Hung         int64 // requests left hanging
	PromptTokens int64 // prompt tokens of admitted requests
	CachedTokens int64 // of which found in the prefix cache
	OutputTokens int64 // tokens generated
	HealthProbes int64 // GET /health requests answered
	Preemptions  int64 // running sequences preempted (budget scheduler)
	Running      int   // sequences in the batch now
	Waiting      int   // sequences queued now
}

type counters struct {
	requests, completed, errors, rejected, badRequests, cut, hung atomic.Int64
	healthProbes, preemptions                                     atomic.Int64
	queryTokens, cachedTokens, outputTokens                       atomic.Int64
}

// Server is one simulated engine on a loopback port.
type Server struct {
	mu      sync.Mutex
	cfg     Config
	addr    string
	ln      net.Listener
	srv     *http.Server
	done    chan struct{}
	started time.Time
	eng     *engine
	stats   counters
	metrics *metrics
	rng     *rand.Rand
	rngMu   sync.Mutex
	timers  []*time.Timer // pending SpeedChanges

	// the Responses API's stored responses (previous_response_id)
	respMu    sync.Mutex
	responses map[string]int64
	respN     int64
	idSeq     atomic.Int64
}

// New returns a server with cfg that is not listening yet.
func New(cfg Config) *Server {
	s := &Server{cfg: cfg.withDefaults(), rng: rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))}
	s.eng = newEngine(s)
	s.metrics = newMetrics(s)
	return s
}

// Start listens on addr ("127.0.0.1:0" for any free port) and serves.
func Start(cfg Config, addr string) (*Server, error) {
	s := New(cfg)
	if err := s.Listen(addr); err != nil {
		return nil, err
	}
	return s, nil
}

// Listen starts serving on addr. A stopped server may listen again (on its
// old address when addr is empty), to model a backend coming back.
func (s *Server) Listen(addr string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return errors.New("llmsim: already listening")
	}
	if err := s.cfg.validate(); err != nil {
		return err
	}
	if addr == "" {
		addr = s.addr
	}
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("llmsim: listen: %w", err)
	}
	s.ln = ln
	s.addr = ln.Addr().String()
	s.started = time.Now()
	s.done = make(chan struct{})
	s.srv = &http.Server{Handler: s.routes(), ReadHeaderTimeout: 10 * time.Second}
	for _, c := range s.cfg.SpeedChanges {
		speed := c.Speed
		s.timers = append(s.timers, time.AfterFunc(c.At, func() { s.SetSpeed(speed) }))
	}
	go s.eng.run(s.done)
	go func(srv *http.Server) { _ = srv.Serve(ln) }(s.srv)
	return nil
}

// Stop closes the listener and every connection: afterwards connections are
// refused, as from a crashed or stopped engine.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return
	}
	close(s.done)
	for _, t := range s.timers {
		t.Stop()
	}
	s.timers = nil
	_ = s.srv.Close()
	s.ln = nil
	// requests still in the engine end with it
	s.eng.mu.Lock()
	for _, q := range s.eng.running {
		q.aborted = true
	}
	for _, q := range s.eng.waiting {
		q.aborted = true
	}
	s.eng.dropAborted()
	s.eng.mu.Unlock()
}

// Addr is host:port of the server (also after Stop).
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// URL is the server's base URL.
func (s *Server) URL() string { return "http://" + s.Addr() }

// Config returns the server's current configuration.
func (s *Server) Config() Config { return s.config() }

func (s *Server) config() Config {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg
}

// SetSpeed changes the speed multiplier at run time.
func (s *Server) SetSpeed(speed float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if speed > 0 {
		s.cfg.Speed = speed
	}
}

// SetFaults changes the injected faults at run time.
func (s *Server) SetFaults(f Faults) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.RetryAfter == 0 {
		f.RetryAfter = time.Second
	}
	s.cfg.Faults = f
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	running, waiting, _ := s.eng.counts()
	return Stats{
		Requests:     s.stats.requests.Load(),
		Completed:    s.stats.completed.Load(),
		Errors:       s.stats.errors.Load(),
		Rejected:     s.stats.rejected.Load(),
		BadRequests:  s.stats.badRequests.Load(),
		Cut:          s.stats.cut.Load(),
		Hung:         s.stats.hung.Load(),
		PromptTokens: s.stats.queryTokens.Load(),
		CachedTokens: s.stats.cachedTokens.Load(),
		OutputTokens: s.stats.outputTokens.Load(),
		HealthProbes: s.stats.healthProbes.Load(),
		Preemptions:  s.stats.preemptions.Load(),
		Running:      running,
		Waiting:      waiting,
	}
}

func (s *Server) chance(p float64) bool {
	if p <= 0 {
		return false
	}
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	return s.rng.Float64() < p
}

func (s *Server) startingUp() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Since(s.started) < s.cfg.Faults.StartupDelay
}

// Pool is a set of servers.
type Pool struct {
	Servers []*Server
}

// StartPool starts one server per config on free loopback ports.
func StartPool(cfgs ...Config) (*Pool, error) {
	p := &Pool{}
	for _, c := range cfgs {
		s, err := Start(c, "127.0.0.1:0")
		if err != nil {
			p.Close()
			return nil, err
		}
		p.Servers = append(p.Servers, s)
	}
	return p, nil
}

// Speeds returns configs with the default engine at the given speeds.
func Speeds(speeds ...float64) []Config {
	out := make([]Config, len(speeds))
	for i, sp := range speeds {
		out[i] = Config{Speed: sp}
	}
	return out
}

// Addrs returns the servers' host:port addresses.
func (p *Pool) Addrs() []string {
	out := make([]string, len(p.Servers))
	for i, s := range p.Servers {
		out[i] = s.Addr()
	}
	return out
}

// Close stops every server.
func (p *Pool) Close() {
	for _, s := range p.Servers {
		s.Stop()
	}
}
