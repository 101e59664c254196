package aibalance

import (
	"math"
	"sync/atomic"
	"time"
)

// Backend is the shared state of one upstream, keyed by its dial address.
// One exists per address per process, shared by every handler and config
// that uses the address, and it survives config reloads (see Store). All of
// its fields are updated with atomics or the model's own lock: no lock is
// shared between backends.
type Backend struct {
	addr string

	inflight       atomic.Int64
	inflightTokens atomic.Int64
	pending        atomic.Int64  // in flight without a first token yet
	pendingTokens  atomic.Int64  // their prompt tokens
	pendingSince   atomic.Int64  // sum of their start times, unix ns (mean age = now - sum/pending)
	maxRunning     atomic.Int64  // most requests seen past their first token at once: the batch size, as far as seen
	e2eEWMA        atomic.Uint64 // float64 seconds: recent completion time of successful requests

	requests     atomic.Uint64 // attempts finished, any outcome
	status2xx    atomic.Uint64
	status4xx    atomic.Uint64
	status5xx    atomic.Uint64
	status429    atomic.Uint64
	dialErrors   atomic.Uint64
	timeouts     atomic.Uint64
	otherErrors  atomic.Uint64
	canceled     atomic.Uint64
	streamErrors atomic.Uint64 // body cut before its end
	promptTokens atomic.Uint64
	outputTokens atomic.Uint64
	e2eNanos     atomic.Int64 // summed over successful attempts
	ttftNanos    atomic.Int64
	headerNanos  atomic.Int64
	retryAfter   atomic.Int64 // unix ns until which the backend asked not to be sent more (429/503 Retry-After)

	model  Model
	engine engineState
}

func newBackend(addr string) *Backend {
	return &Backend{addr: addr}
}

// Addr is the dial address the backend is keyed by.
func (b *Backend) Addr() string { return b.addr }

// Model is the backend's learned latency model.
func (b *Backend) Model() *Model { return &b.model }

// Inflight returns the requests and estimated tokens in flight.
func (b *Backend) Inflight() (requests, tokens int64) {
	return b.inflight.Load(), b.inflightTokens.Load()
}

// State is the backend's load at now, as a model input.
func (b *Backend) State(now time.Time) LoadState {
	s := LoadState{
		Inflight:       float64(b.inflight.Load()),
		InflightTokens: float64(b.inflightTokens.Load()),
		PendingTokens:  float64(b.pendingTokens.Load()),
	}
	// the sum and the count are two atomics: a racing Begin or FirstToken
	// can skew one reading of the age, which is clamped at zero
	since := b.pendingSince.Load()
	if n := b.pending.Load(); n > 0 {
		s.Pending = float64(n)
		s.PendingAge = max(float64(now.UnixNano()-since/n)/1e9, 0)
	}
	// Anticipated queueing: with its batch full, a backend starts a new
	// request only as running ones finish, about slots/E2E per second.
	if slots, e2e := float64(b.maxRunning.Load()), math.Float64frombits(b.e2eEWMA.Load()); slots > 0 && e2e > 0 {
		if over := s.Inflight + 1 - slots; over > 0 {
			s.QueueWait = over * e2e / slots
		}
	}
	return s
}

// Destruct implements caddy.Destructor; a backend holds no resources.
func (b *Backend) Destruct() error { return nil }

// Attempt is one request in flight to a backend, from Begin to End.
type Attempt struct {
	b         *Backend
	state     LoadState
	tokens    int64
	prompt    int
	predicted time.Duration
	start     time.Time
	gotFirst  bool
}

// Begin records a request sent to the backend: it is counted in flight (with
// its estimated tokens) until End.
func (b *Backend) Begin(f *Features, prior *Prior, now time.Time) Attempt {
	s := b.State(now)
	p := b.model.Predict(s, f.PromptTokens, f.OutputTokens, prior, now)
	tokens := int64(f.Tokens())
	b.inflight.Add(1)
	b.inflightTokens.Add(tokens)
	b.pendingTokens.Add(int64(f.PromptTokens))
	b.pendingSince.Add(now.UnixNano())
	b.pending.Add(1)
	return Attempt{b: b, state: s, tokens: tokens, prompt: f.PromptTokens, predicted: p.E2E, start: now}
}

// FirstToken records that the attempt got its first token: it stops
// counting as pending and starts counting as running. Only the first call
// counts.
func (a *Attempt) FirstToken() {
	if a.gotFirst {
		return
	}
	a.release()
	b := a.b
	running := b.inflight.Load() - b.pending.Load()
	for {
		m := b.maxRunning.Load()
		if running <= m || b.maxRunning.CompareAndSwap(m, running) {
			return
		}
	}
}

// release stops counting the attempt as pending.
func (a *Attempt) release() {
	if a.gotFirst {
		return
	}
	a.gotFirst = true
	a.b.pending.Add(-1)
	a.b.pendingSince.Add(-a.start.UnixNano())
	a.b.pendingTokens.Add(-int64(a.prompt))
}

// Start is when the attempt began.
func (a *Attempt) Start() time.Time { return a.start }

// Outcome is how an attempt ended.
type Outcome struct {
	Status       int           // HTTP status, 0 when no response came
	DialError    bool          // the connection could not be made
	Timeout      bool          // a timeout, at any stage
	StreamError  bool          // the response body ended with an error
	Canceled     bool          // the client or Caddy stopped the attempt, not the backend
	RetryAfter   time.Duration // from a 429/503 response's Retry-After
	Headers      time.Duration // to the response headers; 0 if none came
	TTFT         time.Duration // to first token / first body byte; 0 if none
	E2E          time.Duration // to the end of the body
	OutputTokens int
}

// End records the outcome of the attempt and trains the model on it when it
// is a clean success. It must be called exactly once per Begin.
func (a *Attempt) End(o Outcome, lambda float64, prior *Prior, now time.Time) {
	b := a.b
	a.release()
	b.inflight.Add(-1)
	b.inflightTokens.Add(-a.tokens)
	b.requests.Add(1)
	switch {
	case o.DialError:
		b.dialErrors.Add(1)
	case o.Timeout:
		b.timeouts.Add(1)
	case o.Canceled && o.Status == 0:
		b.canceled.Add(1)
	case o.Status == 0:
		b.otherErrors.Add(1)
	case o.Status == 429:
		b.status429.Add(1)
		b.status4xx.Add(1)
	case o.Status >= 500:
		b.status5xx.Add(1)
	case o.Status >= 400:
		b.status4xx.Add(1)
	case o.Status >= 200 && o.Status < 300:
		b.status2xx.Add(1)
	}
	if o.StreamError {
		b.streamErrors.Add(1)
	}
	if o.RetryAfter > 0 {
		b.retryAfter.Store(now.Add(o.RetryAfter).UnixNano())
	}
	if o.Status >= 200 && o.Status < 300 {
		b.promptTokens.Add(uint64(max(a.prompt, 0)))
		b.outputTokens.Add(uint64(max(o.OutputTokens, 0)))
		b.e2eNanos.Add(int64(o.E2E))
		b.ttftNanos.Add(int64(o.TTFT))
		b.headerNanos.Add(int64(o.Headers))
		// only complete answers say how fast the backend is
		complete := !o.StreamError && !o.Canceled
		if complete {
			ewmaAtomic(&b.e2eEWMA, o.E2E.Seconds())
		}
		if complete && o.TTFT > 0 {
			b.model.Observe(Observation{
				State:        a.state,
				PromptTokens: a.prompt,
				OutputTokens: o.OutputTokens,
				TTFT:         o.TTFT,
				E2E:          o.E2E,
				Predicted:    a.predicted,
			}, lambda, prior, now)
		}
	}
}

// BackendStats is a snapshot of a backend's counters, for the admin API,
// metrics, the demo and tests.
type BackendStats struct {
	Address        string        `json:"address"`
	Inflight       int64         `json:"inflight"`
	InflightTokens int64         `json:"inflight_tokens"`
	Pending        int64         `json:"pending"`
	MaxRunning     int64         `json:"max_running_seen"`
	Requests       uint64        `json:"requests"`
	Status2xx      uint64        `json:"status_2xx"`
	Status4xx      uint64        `json:"status_4xx"`
	Status5xx      uint64        `json:"status_5xx"`
	Status429      uint64        `json:"status_429"`
	DialErrors     uint64        `json:"dial_errors"`
	Timeouts       uint64        `json:"timeouts"`
	OtherErrors    uint64        `json:"other_errors"`
	Canceled       uint64        `json:"canceled"`
	StreamErrors   uint64        `json:"stream_errors"`
	PromptTokens   uint64        `json:"prompt_tokens"`
	OutputTokens   uint64        `json:"output_tokens"`
	MeanE2E        time.Duration `json:"mean_e2e_ns"`     // of successful attempts
	MeanTTFT       time.Duration `json:"mean_ttft_ns"`    // of successful attempts
	MeanHeaders    time.Duration `json:"mean_headers_ns"` // time to response headers, of successful attempts
	RetryAfter     time.Time     `json:"retry_after,omitzero"`
	Model          ModelStats    `json:"model"`
}

// Stats returns a snapshot of the backend's counters.
func (b *Backend) Stats() BackendStats {
	s := BackendStats{
		Address:        b.addr,
		Inflight:       b.inflight.Load(),
		InflightTokens: b.inflightTokens.Load(),
		Pending:        b.pending.Load(),
		MaxRunning:     b.maxRunning.Load(),
		Requests:       b.requests.Load(),
		Status2xx:      b.status2xx.Load(),
		Status4xx:      b.status4xx.Load(),
		Status5xx:      b.status5xx.Load(),
		Status429:      b.status429.Load(),
		DialErrors:     b.dialErrors.Load(),
		Timeouts:       b.timeouts.Load(),
		OtherErrors:    b.otherErrors.Load(),
		Canceled:       b.canceled.Load(),
		StreamErrors:   b.streamErrors.Load(),
		PromptTokens:   b.promptTokens.Load(),
		OutputTokens:   b.outputTokens.Load(),
		Model:          b.model.Stats(),
	}
	if n := int64(s.Status2xx); n > 0 {
		s.MeanE2E = time.Duration(b.e2eNanos.Load() / n)
		s.MeanTTFT = time.Duration(b.ttftNanos.Load() / n)
		s.MeanHeaders = time.Duration(b.headerNanos.Load() / n)
	}
	if ra := b.retryAfter.Load(); ra > 0 {
		s.RetryAfter = time.Unix(0, ra)
	}
	return s
}
