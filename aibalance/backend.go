package aibalance

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Backend is the shared state of one upstream, keyed by its dial address.
// One exists per address per process, shared by every handler and config
// that uses the address, and it survives config reloads (see Store). All of
// its fields are updated with atomics or its own small locks: no lock is
// shared between backends.
type Backend struct {
	addr string

	inflight atomic.Int64
	// selections not yet sent (see Reserve): in a burst, many requests
	// are scored before the first of them reaches the transport
	reserved   atomic.Int64
	reservedAt atomic.Int64 // unix ns of the latest reservation
	// streams among them, and their prompt tokens: pending work
	reservedStreams, reservedTokens atomic.Int64
	// the batch capacity the engine's metrics showed full (see learnSlots)
	engineSlots    atomic.Int64
	engineSlotsAt  atomic.Int64
	inflightTokens atomic.Int64
	pending        atomic.Int64  // streams in flight without a first token yet
	pendingTokens  atomic.Int64  // their prompt tokens
	pendingSince   atomic.Int64  // sum of their start times, µs since epoch (mean age = now - sum/pending)
	streaming      atomic.Int64  // streams in flight past their first token
	maxRunning     atomic.Int64  // most streams seen past their first token at once: the batch seen so far (see LoadState.Beyond)
	slots          atomic.Int64  // the engine's batch capacity, as observed saturated (see learnSlots, FirstToken); 0: unknown
	slotsAt        atomic.Int64  // unix ns of the last evidence of it; it expires after staleAfter
	e2eEWMA        atomic.Uint64 // float64 seconds: recent completion time of successful LLM requests

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
	cooldownFrom atomic.Int64 // unix ns the cooldown began

	fails    failureRate
	recent   recentRate
	model    Model
	engine   engineState
	breaker  atomic.Pointer[breakerBox]   // see Breaker
	rampFrom atomic.Int64                 // unix ns a slow start began; 0: none (see Ramp)
	models   atomic.Pointer[ServedModels] // from /v1/models; nil: unknown

	prefix         prefixIndex  // prompt blocks recently sent here (see CachedTokens)
	sessions       sessionIndex // sessions recently sent here
	prefixCapacity atomic.Int64 // the engine's KV capacity in tokens, from its metrics; 0: unknown

	ejectedUntil atomic.Int64 // unix ns: outlier ejection (see Eject)
	// for the metrics: latency histograms of successful LLM requests,
	// cooldowns begun and ejections
	ttftHist, e2eHist    latencyHist
	cooldowns, ejections atomic.Uint64
	ejectReason          atomic.Pointer[string]
	ejectSamples         atomic.Int64
}

// epoch is the origin of pendingSince: offsets from it, in microseconds,
// keep the sum of many start times far from overflowing an int64 (raw
// UnixNano values overflow at six).
var epoch = time.Now()

func sinceEpoch(t time.Time) int64 { return t.Sub(epoch).Microseconds() }

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

// State is the backend's load at now, as a model input: the balancer's own
// requests, counted live, plus what the engine's fresh metrics show beyond
// them — other Caddy instances' and clients' queue and batch, which a
// balancer cannot see otherwise — and the engine's KV cache use. (The
// engine's own counts are up to a scrape interval old; a queue that drains
// in milliseconds must not look like one that lasts a second.)
func (b *Backend) State(now time.Time) LoadState {
	reserved, rStreams, rTokens := b.reservations(now)
	s := LoadState{
		Inflight:       float64(b.inflight.Load() + reserved),
		InflightTokens: float64(b.inflightTokens.Load()),
		PendingTokens:  float64(b.pendingTokens.Load() + rTokens),
		Pending:        float64(rStreams),
	}
	// the sum and the count are two atomics: a racing Begin or FirstToken
	// can skew one reading of the age, which is clamped at zero
	since := b.pendingSince.Load()
	if n := b.pending.Load(); n > 0 {
		s.Pending += float64(n)
		s.PendingAge = max(float64(sinceEpoch(now)-since/n)/1e6, 0)
	}
	s.Running = max(s.Inflight-s.Pending, 0)
	s.Streams = float64(b.streaming.Load()) + s.Pending
	if waiting, running, kv, ok := b.external(now); ok {
		s.Pending += waiting
		s.Running += running
		s.KV = kv
		s.Inflight += waiting + running
	}
	if seen := float64(b.maxRunning.Load()); seen > 0 {
		s.Beyond = max(s.Inflight+1-seen, 0)
	}
	// A request beyond a batch the engine has shown full waits for a
	// slot: running requests finish at about slots/E2E per second.
	if slots := float64(b.Capacity(now)); slots > 0 {
		if ahead := s.Inflight + 1 - slots; ahead > 0 {
			s.QueueWait = b.SlotWait(ahead, slots)
		}
	}
	return s
}

// SlotWait is how long a request waits for a batch slot with ahead
// requests before it and slots running: they finish at about slots/E2E per
// second (E2E the backend's recent completion time); 0 when none is known.
func (b *Backend) SlotWait(ahead, slots float64) float64 {
	if e2e := math.Float64frombits(b.e2eEWMA.Load()); e2e > 0 && slots > 0 {
		return max(ahead, 0) * e2e / slots
	}
	return 0
}

// Reserve counts a request a policy chose for the backend until its
// attempt begins (Unreserve): it is in flight for the requests scored in
// between, and a stream among them pending with its prompt tokens, so a
// burst scored inside one window spreads by the work it sends. A
// reservation whose attempt never began (the client left in between)
// stops counting a second after the latest one.
func (b *Backend) Reserve(f *Features, now time.Time) {
	if f.Stream {
		b.reservedStreams.Add(1)
		b.reservedTokens.Add(int64(f.PromptTokens))
	}
	b.reserved.Add(1)
	b.reservedAt.Store(now.UnixNano())
}

// Unreserve ends the reservation Reserve made for f: the attempt began.
func (b *Backend) Unreserve(f *Features) {
	if f.Stream {
		if b.reservedStreams.Add(-1) < 0 {
			b.reservedStreams.Store(0)
		}
		if b.reservedTokens.Add(-int64(f.PromptTokens)) < 0 {
			b.reservedTokens.Store(0)
		}
	}
	if b.reserved.Add(-1) < 0 {
		b.reserved.Store(0)
	}
}

// Reserved is the reservations counting at now.
func (b *Backend) Reserved(now time.Time) int64 {
	n, _, _ := b.reservations(now)
	return n
}

// reservations is the reservations counting at now: requests, streams
// among them and those streams' prompt tokens.
func (b *Backend) reservations(now time.Time) (n, streams, tokens int64) {
	n = b.reserved.Load()
	if n <= 0 || now.UnixNano()-b.reservedAt.Load() > int64(time.Second) {
		return 0, 0, 0
	}
	return n, max(b.reservedStreams.Load(), 0), max(b.reservedTokens.Load(), 0)
}

// Cooldown is when the backend's last Retry-After ends; zero if none.
func (b *Backend) Cooldown() time.Time {
	if ra := b.retryAfter.Load(); ra > 0 {
		return time.Unix(0, ra)
	}
	return time.Time{}
}

// CoolDown takes the backend out from from until until (a 429 or 503 asked for a
// pause). A later, shorter cooldown never shortens a running one. The
// backend's slow start begins when it ends.
func (b *Backend) CoolDown(from, until time.Time) {
	u := until.UnixNano()
	for {
		cur := b.retryAfter.Load()
		if u <= cur {
			return
		}
		if b.retryAfter.CompareAndSwap(cur, u) {
			if cur <= from.UnixNano() { // a new cooldown, not a longer one
				b.cooldownFrom.Store(from.UnixNano())
				b.cooldowns.Add(1)
			}
			b.rampFrom.Store(u)
			return
		}
	}
}

// CooldownSince is when the running (or last) cooldown began.
func (b *Backend) CooldownSince() time.Time {
	if t := b.cooldownFrom.Load(); t > 0 {
		return time.Unix(0, t)
	}
	return time.Time{}
}

// CoolingDown reports whether the backend asked, with Retry-After, not to
// be sent requests until after now.
func (b *Backend) CoolingDown(now time.Time) bool { return b.retryAfter.Load() > now.UnixNano() }

// ForgiveFailures forgets the backend's recent failures (its breaker
// closed: it recovered).
func (b *Backend) ForgiveFailures() {
	b.fails.mu.Lock()
	defer b.fails.mu.Unlock()
	b.fails.fails, b.fails.attempts, b.fails.at = 0, 0, 0
	b.fails.pub.Store(nil)
}

// FailureRate is the recent share of the backend's attempts that failed
// through the backend's fault (see failureRate).
func (b *Backend) FailureRate(now time.Time) float64 { return b.fails.rate(now) }

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
	pending   bool    // counted as pending (a stream without its first token yet)
	running   bool    // counted in streaming (a stream past its first token)
	predTTFT  float64 // predicted TTFT at dispatch, seconds, with no wait for a slot
	work      bool    // LLM work: may teach the model
	// OnEnd, when set, is called once the attempt ended, with its outcome.
	OnEnd func(Outcome)
}

// Begin records a request sent to the backend: it is counted in flight (with
// its estimated tokens) until End. A stream also counts as pending until
// its first token; a non-streaming request shows no first token, so it
// never counts as pending.
func (b *Backend) Begin(f *Features, prior *Prior, now time.Time) Attempt {
	return b.BeginCached(f, 0, prior, now)
}

// BeginCached is Begin for a request of which the backend is expected to
// hold cached leading prompt tokens in its prefix cache: the model sees
// (and learns from) the prompt tokens it must prefill.
func (b *Backend) BeginCached(f *Features, cached int, prior *Prior, now time.Time) Attempt {
	s := b.State(now)
	prompt := max(f.PromptTokens-cached, 0)
	a := Attempt{b: b, state: s, prompt: prompt, start: now, work: f.Work()}
	if a.work {
		p := b.model.Predict(s, prompt, f.OutputTokens, prior, now)
		a.predicted = p.E2E
		a.predTTFT = max(p.TTFT.Seconds()-s.QueueWait, 0)
	}
	a.tokens = int64(f.Tokens())
	if a.work {
		b.recent.add(now)
	}
	b.inflight.Add(1)
	b.inflightTokens.Add(a.tokens)
	if f.Stream {
		a.pending = true
		b.pendingTokens.Add(int64(prompt))
		b.pendingSince.Add(sinceEpoch(now))
		b.pending.Add(1)
	}
	return a
}

// FirstToken records that the attempt got its first token at now: it stops
// counting as pending and starts counting as running. Only the first call
// counts.
//
// It is also where the balancer sees an engine's batch limit for itself,
// when the engine reports no metrics: a stream sent while the backend had
// at least as many requests in flight as the largest batch seen, whose
// first token then came later than predicted by more than half the time a
// batch slot takes to free (E2E/batch), waited for a slot — the engine was
// full with at most that many. A batch running past the known capacity
// raises it. Only an observed wait lowers the capacity, and the evidence
// expires (see Slots): what has not been observed lately is not full.
func (a *Attempt) FirstToken(now time.Time) {
	if !a.pending {
		return
	}
	a.release()
	b := a.b
	// the batch as far as seen: streams past their first token. A
	// non-streaming request in flight may still wait in the engine's
	// queue, so it is no evidence of a batch that large.
	a.running = true
	running := b.streaming.Add(1)
	seen := b.maxRunning.Load()
	b.raiseSeen(running)
	if cur := b.slots.Load(); cur > 0 && running > cur {
		b.setSlots(running, now)
	}
	e2e := math.Float64frombits(b.e2eEWMA.Load())
	if !a.work || seen < 1 || a.state.Inflight+1 <= float64(seen) || e2e <= 0 {
		return
	}
	if waited := now.Sub(a.start).Seconds() - a.predTTFT; waited > e2e/float64(seen)/2 {
		full := max(int64(a.state.Inflight), 1)
		if cur := b.Slots(now); cur == 0 || full < cur {
			b.setSlots(full, now)
		} else {
			b.slotsAt.Store(now.UnixNano()) // confirmed
		}
	}
}

// raiseSeen raises the largest batch seen to n when n is larger.
func (b *Backend) raiseSeen(n int64) {
	for {
		m := b.maxRunning.Load()
		if n <= m || b.maxRunning.CompareAndSwap(m, n) {
			return
		}
	}
}

// BatchSeen is the largest batch the backend has been seen to run at
// once: its streams past their first token, or the engine's own count of
// running requests when larger. It never falls: an engine that ran that
// many at once has the slots for them.
func (b *Backend) BatchSeen() int64 { return b.maxRunning.Load() }

func (b *Backend) setSlots(n int64, now time.Time) {
	b.slots.Store(n)
	b.slotsAt.Store(now.UnixNano())
}

// Slots is the backend's batch capacity as last observed saturated (by
// its metrics or by the balancer's own waits), or 0 when unknown or when
// the evidence is older than staleAfter.
func (b *Backend) Slots(now time.Time) int64 {
	if now.UnixNano()-b.slotsAt.Load() > int64(staleAfter) {
		return 0
	}
	return b.slots.Load()
}

// release stops counting the attempt as pending.
func (a *Attempt) release() {
	if !a.pending {
		return
	}
	a.pending = false
	a.b.pending.Add(-1)
	a.b.pendingSince.Add(-sinceEpoch(a.start))
	a.b.pendingTokens.Add(-int64(a.prompt))
}

// Backend is the backend the attempt went to.
func (a *Attempt) Backend() *Backend { return a.b }

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
	Stream       bool          // the answer was a stream whose first token was seen at TTFT
	Headers      time.Duration // to the response headers; 0 if none came
	TTFT         time.Duration // to first token (streams); 0 if none
	E2E          time.Duration // to the end of the body
	OutputTokens int           // -1: unknown (an answer without usage), which teaches nothing
}

// Failed reports whether the attempt failed through the backend's fault:
// no connection, a timeout, a 5xx or a 429, or a stream the backend cut.
// A client that gave up is not the backend's fault, nor is a 4xx other than
// 429 (the request was bad).
func (o Outcome) Failed() bool {
	if o.Canceled && !o.StreamError {
		return false
	}
	return o.DialError || o.Timeout || o.StreamError || o.Status == 429 || o.Status >= 500 ||
		(o.Status == 0 && !o.Canceled)
}

// End records the outcome of the attempt and trains the model on it when it
// is a clean success of LLM work. It must be called exactly once per Begin.
func (a *Attempt) End(o Outcome, lambda float64, prior *Prior, now time.Time) {
	b := a.b
	if f := a.OnEnd; f != nil {
		a.OnEnd = nil
		defer f(o)
	}
	a.release()
	if a.running {
		a.running = false
		b.streaming.Add(-1)
	}
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
		b.CoolDown(now, now.Add(o.RetryAfter))
	}
	failed := o.Failed()
	if failed || (a.work && o.Status >= 200 && o.Status < 300 && !o.Canceled) {
		b.fails.observe(failed, now)
	}
	if o.Status < 200 || o.Status >= 300 {
		return
	}
	b.promptTokens.Add(uint64(max(a.prompt, 0)))
	b.outputTokens.Add(uint64(max(o.OutputTokens, 0)))
	b.e2eNanos.Add(int64(o.E2E))
	b.ttftNanos.Add(int64(o.TTFT))
	b.headerNanos.Add(int64(o.Headers))
	// only complete answers to LLM work say how fast the backend is: a
	// probe or a model listing answered in a millisecond says nothing of
	// how long a prompt takes
	if !a.work || o.StreamError || o.Canceled {
		return
	}
	ewmaAtomic(&b.e2eEWMA, o.E2E.Seconds())
	b.e2eHist.observe(o.E2E)
	if o.Stream && o.TTFT > 0 {
		b.ttftHist.observe(o.TTFT)
	}
	if (o.Stream && o.TTFT <= 0) || o.OutputTokens < 0 {
		return
	}
	b.model.Observe(Observation{
		State:        a.state,
		PromptTokens: a.prompt,
		OutputTokens: o.OutputTokens,
		Stream:       o.Stream,
		TTFT:         o.TTFT,
		E2E:          o.E2E,
		Predicted:    a.predicted,
	}, lambda, prior, now)
}

// failureRate is a backend's recent failure share: failures and attempts,
// both decayed exponentially with time (time constant failureMemory), with
// one success of prior evidence, so a single failure of a fresh backend is
// a rate of 1/2, not 1. Decaying with time rather than by count means a
// backend that failed and then got no traffic is forgiven and tried again.
type failureRate struct {
	mu       sync.Mutex
	fails    float64
	attempts float64
	at       int64 // unix ns of the last update
	// published for lock-free reads
	pub atomic.Pointer[failureSnapshot]
}

type failureSnapshot struct {
	fails, attempts float64
	at              int64
}

// failureMemory is how long failures are remembered (the decay's time
// constant): long enough to span the retries and the next requests of a
// burst, short enough that a recovered backend is back within a minute.
const failureMemory = 20 * time.Second

func decay(dt int64) float64 {
	if dt <= 0 {
		return 1
	}
	return math.Exp(-float64(dt) / float64(failureMemory))
}

func (f *failureRate) observe(failed bool, now time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := now.UnixNano()
	d := decay(t - f.at)
	if f.at == 0 {
		d = 0
	}
	f.fails *= d
	f.attempts *= d
	f.attempts++
	if failed {
		f.fails++
	}
	f.at = t
	f.pub.Store(&failureSnapshot{fails: f.fails, attempts: f.attempts, at: t})
}

func (f *failureRate) rate(now time.Time) float64 {
	s := f.pub.Load()
	if s == nil || s.fails == 0 {
		return 0
	}
	d := decay(now.UnixNano() - s.at)
	return s.fails * d / (s.attempts*d + 1)
}

// BackendStats is a snapshot of a backend's counters, for the admin API,
// metrics, the demo and tests.
type BackendStats struct {
	Address        string        `json:"address"`
	Inflight       int64         `json:"inflight"`
	InflightTokens int64         `json:"inflight_tokens"`
	Pending        int64         `json:"pending"`
	MaxRunning     int64         `json:"max_running_seen"`
	BatchCapacity  int64         `json:"batch_capacity"` // as observed saturated lately; 0: unknown
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
	FailureRate    float64       `json:"failure_rate"`
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
		BatchCapacity:  b.Slots(time.Now()),
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
		FailureRate:    b.fails.rate(time.Now()),
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

// recentRate counts requests sent to a backend in per-second buckets, for
// the share of recent traffic the admin view shows: lock-free, bounded.
type recentRate struct {
	sec   [recentBuckets]atomic.Int64 // the unix second each bucket counts
	count [recentBuckets]atomic.Int64
}

const (
	recentBuckets = 16
	recentWindow  = 10 // seconds summed, the current one included
)

func (r *recentRate) add(now time.Time) {
	sec := now.Unix()
	i := sec % recentBuckets
	if old := r.sec[i].Load(); old != sec && r.sec[i].CompareAndSwap(old, sec) {
		r.count[i].Store(0)
	}
	r.count[i].Add(1)
}

// perSecond is the mean requests per second over the last recentWindow
// seconds, the current one included: a burst that started this second
// already shows (shares of it are right at once; the rate itself is low by
// the part of the second still to come).
func (r *recentRate) perSecond(now time.Time) float64 {
	sec := now.Unix()
	var n int64
	for i := range r.sec {
		if s := r.sec[i].Load(); s <= sec && s > sec-recentWindow {
			n += r.count[i].Load()
		}
	}
	return float64(n) / recentWindow
}

// RecentRate is the backend's requests per second over the last ten seconds.
func (b *Backend) RecentRate(now time.Time) float64 { return b.recent.perSecond(now) }
