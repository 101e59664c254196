package aibalance

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Admission control: when every backend of a pool is saturated, a new
// request waits at the balancer, in a bounded queue, instead of joining an
// engine's queue. Waiting here binds the request late: it goes to whichever
// backend frees a slot first, chosen by the model then, not to the engine
// whose queue looked shortest when it arrived; and the queue is fair
// between users where an engine's is first come, first served.
//
// A backend is saturated when it is out (draining, cooling down, ejected,
// breaker open), when its requests in flight fill the batch it was last
// seen saturated at (see Backend.Slots and Backend.EngineSlots: learned
// from the waits the balancer observes and from a queue the engine's
// metrics show behind an unchanged batch), or when its fresh engine
// metrics show a queue with the KV cache nearly full. What is not known to
// be full is not: without evidence nothing waits.
//
// Order: a higher priority (a request header) first; within a priority,
// start-time fair queuing between keys (the API key, a header, the user or
// the client address), each key's share in proportion to its weight; within
// a key, first come first served.
//
// Bounds: the queue holds at most MaxQueue requests, and a request waits
// at most MaxWait. A request that finds the queue full, or whose wait the
// pool's drain rate predicts to exceed half of MaxWait, is answered at once (429,
// server_overloaded, with Retry-After: the predicted wait; 529
// overloaded_error on the Messages API); one that waited MaxWait gets the
// same answer.

// CodeOverloaded is the error code (and OpenAI error type) of the queue's
// overload answer.
const CodeOverloaded = "server_overloaded"

// Admission defaults.
const (
	DefaultMaxQueue       = 1024
	DefaultMaxWait        = 10 * time.Second
	DefaultPriorityHeader = "X-Priority"
	// MaxQueueLimit and MaxWaitLimit bound the settings themselves.
	MaxQueueLimit  = 1 << 20
	MaxWaitLimit   = time.Hour
	admissionTick  = 50 * time.Millisecond
	transitTimeout = time.Second
	maxPriority    = 1000
	// waitMargin is the share of max_wait a predicted wait may take and
	// still be queued (see Wait)
	waitMargin = 0.5
)

// AdmissionConfig is a pool's admission control (JSON under the
// transport's "admission").
type AdmissionConfig struct {
	// Off turns admission control off: requests go to the engines' queues.
	Off bool `json:"off,omitempty"`
	// MaxQueue bounds the requests waiting. Default: 1024.
	MaxQueue int `json:"max_queue,omitempty"`
	// MaxWait bounds one request's wait. Default: 10s.
	MaxWait caddy.Duration `json:"max_wait,omitempty"`
	// Key tells users apart for fairness (see KeySpec). Default: api_key.
	Key *KeySpec `json:"key,omitempty"`
	// Weights gives keys shares other than 1, by the key's value (the API
	// key, the header's value, the user or the client address).
	Weights map[string]float64 `json:"weights,omitempty"`
	// PriorityHeader names the request header whose integer value (higher
	// first, -1000 to 1000, default 0) orders the queue. Default:
	// X-Priority; "-" ignores priorities.
	PriorityHeader string `json:"priority_header,omitempty"`
}

// KeySpec names what a request's key is: "api_key" (the bearer token of
// Authorization, or x-api-key / api-key; else the client address),
// "user" (the body's user field, else the client address), "ip" (the
// client address Caddy determined, trusted proxies applied), or "header"
// with Header naming the header (else the client address).
type KeySpec struct {
	Source string `json:"source,omitempty"`
	Header string `json:"header,omitempty"`
}

// Check reports a key spec that cannot work.
func (k *KeySpec) Check() error {
	if k == nil {
		return nil
	}
	switch k.Source {
	case "", "api_key", "user", "ip":
		if k.Header != "" {
			return fmt.Errorf("key %s takes no header name", k.Source)
		}
	case "header":
		if k.Header == "" {
			return fmt.Errorf("key header needs a header name")
		}
	default:
		return fmt.Errorf("unknown key %q: want api_key, user, ip or header <name>", k.Source)
	}
	return nil
}

// Of returns the request's key value (never empty: the client address
// stands in for a missing one).
func (k *KeySpec) Of(r *http.Request, f *Features) string {
	src := "api_key"
	if k != nil && k.Source != "" {
		src = k.Source
	}
	switch src {
	case "api_key":
		if v := APIKey(r); v != "" {
			return v
		}
	case "user":
		if f != nil && f.User != "" {
			return f.User
		}
	case "header":
		if v := r.Header.Get(k.Header); v != "" {
			return v
		}
	}
	return ClientIP(r)
}

// APIKey is the request's API key: the bearer token of Authorization, or
// x-api-key (Anthropic) or api-key (Azure OpenAI); "" when none.
func APIKey(r *http.Request) string {
	if a := r.Header.Get("Authorization"); a != "" {
		if len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
			return strings.TrimSpace(a[7:])
		}
		return a
	}
	if v := r.Header.Get("X-Api-Key"); v != "" {
		return v
	}
	return r.Header.Get("Api-Key")
}

// ClientIP is the client's address as Caddy determined it (trusted proxies
// applied), else the connection's remote address without its port.
func ClientIP(r *http.Request) string {
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// KeyHash is the map key of a key value: a raw API key is never kept.
func KeyHash(v string) uint64 { return Mix64(FNV64(v)) }

// FNV64 is FNV-1a of s.
func FNV64(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// Mix64 is splitmix64's finalizer.
func Mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// The headers a client names its latency targets in, in milliseconds:
// ai_predictive prefers a backend predicted to meet them (see SLO).
const (
	SLOTTFTHeader = "X-SLO-TTFT-Ms"
	SLOE2EHeader  = "X-SLO-E2E-Ms"
)

// maxSLO bounds a target (a day, in ms); past it a target means nothing.
const maxSLO = 86_400_000

// SLO is the request's latency targets from its X-SLO-TTFT-Ms and
// X-SLO-E2E-Ms headers, in seconds: time to first token and to the end of
// the answer. 0 when absent, malformed, not positive or past a day.
func SLO(r *http.Request) (ttft, e2e float64) {
	return sloHeader(r.Header.Get(SLOTTFTHeader)), sloHeader(r.Header.Get(SLOE2EHeader))
}

func sloHeader(v string) float64 {
	if v == "" {
		return 0
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
	if err != nil || !(n > 0) || n > maxSLO {
		return 0
	}
	return n / 1000
}

// Priority is the request's priority from the header named (0 when
// absent, malformed or the header is "-"), clamped to ±1000.
func Priority(r *http.Request, header string) int {
	if header == "-" {
		return 0
	}
	if header == "" {
		header = DefaultPriorityHeader
	}
	v := r.Header.Get(header)
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil {
		return 0
	}
	return min(max(n, -maxPriority), maxPriority)
}

type admissionSettings struct {
	off            bool
	maxQueue       int
	maxWait        time.Duration
	key            *KeySpec
	weights        map[uint64]float64
	priorityHeader string
}

// waiter is one queued request.
type waiter struct {
	prio     int
	tag      float64
	enqueued time.Time
	ready    chan struct{} // closed when admitted
	admitted bool          // under Admission.mu
	evicted  bool          // pushed out of a full queue by a higher priority (under mu)
}

// flow is the waiting requests of one key at one priority, in order.
type flow struct {
	prio  int
	items []*waiter
	last  float64 // finish tag of the key's latest request
}

// Admission is a pool's admission queue. The request path touches it only
// through atomics while nothing waits.
type Admission struct {
	settings atomic.Pointer[admissionSettings]
	queued   atomic.Int64
	capacity func(now time.Time) int // free slots over the pool (see Pool.FreeSlots)
	drain    func(now time.Time) float64
	backlog  func(now time.Time) int // requests queued in the engines (see Pool.Backlog); nil: none

	mu      sync.Mutex
	flows   map[uint64]*flow // by key ^ priority
	vtime   float64
	transit int // admitted, not yet sent
	transAt time.Time
	ticking bool

	admitted, overloaded, timedOut, canceled atomic.Uint64
	wait                                     latencyHist // of admitted requests that waited
}

// Configure applies cfg (nil: the defaults).
func (a *Admission) Configure(cfg *AdmissionConfig) {
	s := &admissionSettings{maxQueue: DefaultMaxQueue, maxWait: DefaultMaxWait, priorityHeader: DefaultPriorityHeader}
	if cfg != nil {
		s.off = cfg.Off
		if cfg.MaxQueue > 0 {
			s.maxQueue = cfg.MaxQueue
		}
		if cfg.MaxWait > 0 {
			s.maxWait = time.Duration(cfg.MaxWait)
		}
		s.key = cfg.Key
		if cfg.PriorityHeader != "" {
			s.priorityHeader = cfg.PriorityHeader
		}
		if len(cfg.Weights) > 0 {
			s.weights = make(map[uint64]float64, len(cfg.Weights))
			for k, w := range cfg.Weights {
				s.weights[KeyHash(k)] = w
			}
		}
	}
	a.settings.Store(s)
}

// Check reports an admission config that cannot work.
func (cfg *AdmissionConfig) Check() error {
	if cfg == nil {
		return nil
	}
	if cfg.MaxQueue < 0 || cfg.MaxQueue > MaxQueueLimit {
		return fmt.Errorf("admission: max_queue must be from 0 (the default) to %d", MaxQueueLimit)
	}
	if cfg.MaxWait < 0 || time.Duration(cfg.MaxWait) > MaxWaitLimit {
		return fmt.Errorf("admission: max_wait must be from 0 (the default) to %s", MaxWaitLimit)
	}
	for k, w := range cfg.Weights {
		if !(w > 0) || math.IsInf(w, 0) {
			return fmt.Errorf("admission: weight of %q must be positive", k)
		}
	}
	return cfg.Key.Check()
}

// On reports whether the queue is in use.
func (a *Admission) On() bool {
	s := a.settings.Load()
	return s != nil && !s.off
}

// Queued is the number of requests waiting.
func (a *Admission) Queued() int64 { return a.queued.Load() }

// Ticket is one request's passage through admission: Began must be called
// once it was sent (or given up), so the next waiter may go.
type Ticket struct {
	a    *Admission
	done bool
}

// Began marks the admitted request as sent: its slot is now counted in
// flight by its backend.
func (t *Ticket) Began(now time.Time) {
	if t == nil || t.done || t.a == nil {
		return
	}
	t.done = true
	a := t.a
	a.mu.Lock()
	if a.transit > 0 {
		a.transit--
	}
	a.mu.Unlock()
	a.Kick(now)
}

// Wait queues a request of key and priority until the pool has a free
// slot for it, ctx ends, or its wait bound runs out. It returns a ticket
// when admitted, else the answer to give: nil for a canceled request.
func (a *Admission) Wait(ctx context.Context, r *http.Request, f *Features, now time.Time) (*Ticket, *Reject) {
	s := a.settings.Load()
	key := KeyHash(s.key.Of(r, f))
	prio := Priority(r, s.priorityHeader)
	weight := 1.0
	if w, ok := s.weights[key]; ok {
		weight = w
	}
	rate := a.drain(now)
	a.mu.Lock()
	n := a.queued.Load()
	if n >= int64(s.maxQueue) && !a.evictBelow(prio) {
		a.mu.Unlock()
		a.overloaded.Add(1)
		return nil, overload(rate, n, s, "the balancer's queue is full")
	}
	// the wait predicted from the pool's drain rate for the requests
	// that go before this one: those of its priority and higher, and
	// those already queued inside the engines, which start first
	ahead := a.aheadOf(prio)
	if a.backlog != nil {
		ahead += a.backlog(now)
	}
	if ahead > 0 && rate > 0 {
		// with a margin: the drain rate moves (a burst's requests finish
		// together, engines slow under load), and a request admitted on
		// an estimate a little short would wait out max_wait and be
		// refused late instead of at once
		if est := time.Duration(float64(ahead+1) / rate * float64(time.Second)); est > time.Duration(float64(s.maxWait)*waitMargin) {
			a.mu.Unlock()
			a.overloaded.Add(1)
			return nil, overload(rate, int64(ahead), s, "the predicted wait exceeds max_wait")
		}
	}
	w := &waiter{prio: prio, enqueued: now, ready: make(chan struct{})}
	id := key ^ uint64(int64(prio))*0x9e3779b97f4a7c15
	fl := a.flows[id]
	if fl == nil {
		if a.flows == nil {
			a.flows = map[uint64]*flow{}
		}
		fl = &flow{prio: prio}
		a.flows[id] = fl
	}
	w.tag = max(a.vtime, fl.last) + 1/weight
	fl.last = w.tag
	fl.items = append(fl.items, w)
	a.queued.Add(1)
	if !a.ticking {
		a.ticking = true
		go a.tick()
	}
	a.pumpLocked(now)
	a.mu.Unlock()

	timer := time.NewTimer(s.maxWait - time.Since(now))
	defer timer.Stop()
	select {
	case <-w.ready:
	case <-timer.C:
	case <-ctx.Done():
	}
	a.mu.Lock()
	if w.admitted {
		a.mu.Unlock()
		return a.admit(w), nil
	}
	if w.evicted {
		a.mu.Unlock()
		return nil, overload(a.drain(time.Now()), a.queued.Load(), s, "a request of higher priority took this one's place in the full queue")
	}
	a.remove(id, w)
	a.mu.Unlock()
	if ctx.Err() != nil {
		a.canceled.Add(1)
		return nil, nil
	}
	a.timedOut.Add(1)
	return nil, overload(a.drain(time.Now()), a.queued.Load(), s, "the request waited max_wait")
}

func (a *Admission) admit(w *waiter) *Ticket {
	a.admitted.Add(1)
	a.wait.observe(time.Since(w.enqueued))
	return &Ticket{a: a}
}

// overload is the answer to a request the queue cannot take: 429 with a
// Retry-After of the predicted time for queued requests to drain at rate
// (per second). 429, not 503: clients and SDKs back off on a 429 by its
// Retry-After, and a router in front (LiteLLM) cools this deployment down
// and sends elsewhere, which is what an overloaded pool needs. The
// Messages API gets Anthropic's 529 overloaded_error (see
// selection.rejectResponse).
func overload(rate float64, queued int64, s *admissionSettings, why string) *Reject {
	after := s.maxWait
	if rate > 0 {
		after = time.Duration(float64(queued+1) / rate * float64(time.Second))
	}
	after = max(min(after, 10*s.maxWait), time.Second)
	return &Reject{
		Status: http.StatusTooManyRequests, Type: CodeOverloaded, Code: CodeOverloaded,
		Message:    "every backend is busy and " + why + "; retry after the time given",
		RetryAfter: after,
	}
}

// aheadOf counts the waiters that go before a new request of priority
// prio: those of its priority and higher (under mu).
func (a *Admission) aheadOf(prio int) int {
	n := 0
	for _, fl := range a.flows {
		if fl.prio >= prio {
			n += len(fl.items)
		}
	}
	return n
}

// evictBelow makes room in a full queue for a request of priority prio:
// the newest waiter of the lowest priority below prio leaves with an
// overload answer. It reports whether one did (under mu).
func (a *Admission) evictBelow(prio int) bool {
	var victim *flow
	var vid uint64
	for id, fl := range a.flows {
		if fl.prio >= prio {
			continue
		}
		last := fl.items[len(fl.items)-1]
		if victim == nil || fl.prio < victim.prio || (fl.prio == victim.prio && last.enqueued.After(victim.items[len(victim.items)-1].enqueued)) {
			victim, vid = fl, id
		}
	}
	if victim == nil {
		return false
	}
	w := victim.items[len(victim.items)-1]
	victim.items = victim.items[:len(victim.items)-1]
	if len(victim.items) == 0 {
		delete(a.flows, vid)
	}
	a.queued.Add(-1)
	a.overloaded.Add(1)
	w.evicted = true
	close(w.ready)
	return true
}

// remove takes w out of its flow (under mu).
func (a *Admission) remove(id uint64, w *waiter) {
	fl := a.flows[id]
	if fl == nil {
		return
	}
	for i, x := range fl.items {
		if x == w {
			fl.items = append(fl.items[:i], fl.items[i+1:]...)
			a.queued.Add(-1)
			break
		}
	}
	if len(fl.items) == 0 {
		delete(a.flows, id)
	}
}

// Kick admits waiting requests if the pool has room; call it when a slot
// may have freed (an attempt ended).
func (a *Admission) Kick(now time.Time) {
	if a == nil || a.queued.Load() == 0 {
		return
	}
	a.mu.Lock()
	a.pumpLocked(now)
	a.mu.Unlock()
}

// pumpLocked admits waiters in order while the pool has free slots not
// already promised to admitted requests on their way.
func (a *Admission) pumpLocked(now time.Time) {
	if a.queued.Load() == 0 {
		return
	}
	if a.transit > 0 && now.Sub(a.transAt) > transitTimeout {
		a.transit = 0 // a ticket lost on the way (never Began)
	}
	free := a.capacity(now) - a.transit
	for free > 0 && a.queued.Load() > 0 {
		var next *flow
		var nid uint64
		for id, fl := range a.flows {
			h := fl.items[0]
			if next == nil || h.prio > next.prio || (h.prio == next.prio && (h.tag < next.items[0].tag || (h.tag == next.items[0].tag && h.enqueued.Before(next.items[0].enqueued)))) {
				next, nid = fl, id
			}
		}
		w := next.items[0]
		next.items = next.items[1:]
		if len(next.items) == 0 {
			delete(a.flows, nid)
		}
		a.queued.Add(-1)
		a.vtime = max(a.vtime, w.tag)
		w.admitted = true
		close(w.ready)
		a.transit++
		a.transAt = now
		free--
	}
}

// tick re-checks the pool while requests wait: slots free without an
// attempt of this pool ending (another instance's traffic, a backend back
// from a cooldown, fresh engine metrics).
func (a *Admission) tick() {
	t := time.NewTicker(admissionTick)
	defer t.Stop()
	for now := range t.C {
		a.mu.Lock()
		if a.queued.Load() == 0 {
			a.ticking = false
			a.mu.Unlock()
			return
		}
		a.pumpLocked(now)
		a.mu.Unlock()
	}
}

// AdmissionStats is the queue's state for the admin view.
type AdmissionStats struct {
	On         bool    `json:"on"`
	Queued     int64   `json:"queued"`
	Admitted   uint64  `json:"admitted_after_wait"`
	Overloaded uint64  `json:"rejected_overloaded"`
	TimedOut   uint64  `json:"rejected_timed_out"`
	Canceled   uint64  `json:"canceled_waiting"`
	WaitP50    float64 `json:"wait_p50_seconds"`
	WaitP99    float64 `json:"wait_p99_seconds"`
	DrainRate  float64 `json:"drain_rate_per_second"`
	FreeSlots  int     `json:"free_slots"` // -1: not known to be bounded (a backend's batch size is unknown)
}

// Stats returns the queue's state.
func (a *Admission) Stats(now time.Time) AdmissionStats {
	st := AdmissionStats{
		On: a.On(), Queued: a.queued.Load(), Admitted: a.admitted.Load(), Overloaded: a.overloaded.Load(),
		TimedOut: a.timedOut.Load(), Canceled: a.canceled.Load(),
		WaitP50: a.wait.quantile(0.5), WaitP99: a.wait.quantile(0.99),
	}
	if a.drain != nil {
		st.DrainRate = a.drain(now)
	}
	if a.capacity != nil {
		st.FreeSlots = a.capacity(now)
		if st.FreeSlots >= unbounded {
			st.FreeSlots = -1
		}
	}
	return st
}

// Admission is the pool's admission queue; it is off until the handler's
// transport configures it (see Admission.Configure).
func (p *Pool) Admission() *Admission {
	if p == nil {
		return nil
	}
	return &p.admission
}

// unbounded is a free capacity not known to be bounded.
const unbounded = 1 << 20

// FreeSlots is how many more requests the pool's backends take before
// every one of them is saturated (see Backend.FreeSlots).
func (p *Pool) FreeSlots(now time.Time) int {
	free := 0
	for _, addr := range p.Members() {
		b, ok := LookupBackend(addr)
		if !ok {
			continue
		}
		if p.HasTiers() && p.Tier(addr) > p.OpenTierNow() {
			continue // a standby tier not open
		}
		n, _ := b.FreeSlots(now)
		free += n
		if free >= unbounded {
			return unbounded
		}
	}
	return free
}

// Backlog is how many requests in flight at the pool's backends wait in
// an engine's queue: those beyond each backend's known batch capacity.
func (p *Pool) Backlog(now time.Time) int {
	n := 0
	for _, addr := range p.Members() {
		b, ok := LookupBackend(addr)
		if !ok {
			continue
		}
		if slots := b.Capacity(now); slots > 0 {
			n += max(int(b.inflight.Load())-int(slots), 0)
		}
	}
	return n
}

// DrainRate is how many requests per second the pool finishes, for the
// wait a queued request is told to expect: the rate its backends took
// requests over the last seconds, but no more than what the learned
// completion times say their known batches finish. The rate taken alone
// overstates the drain right after a burst that went to the engines'
// own queues before their batches were known full (taken, not finished),
// and a queue admitted on it waits out max_wait instead of being told at once.
func (p *Pool) DrainRate(now time.Time) float64 {
	rate, model := 0.0, 0.0
	known := true
	for _, addr := range p.Members() {
		b, ok := LookupBackend(addr)
		if !ok {
			continue
		}
		rate += b.RecentRate(now)
		if _, out := b.Load(now); out {
			continue
		}
		e2e := math.Float64frombits(b.e2eEWMA.Load())
		if slots := b.Capacity(now); slots > 0 && e2e > 0 {
			model += float64(slots) / e2e
		} else {
			known = false
		}
	}
	switch {
	case rate > 0 && known && model > 0:
		return min(rate, model)
	case rate > 0:
		return rate
	}
	return model
}

// kvFull is the KV cache use past which an engine with a queue is taken
// as full (a queue beside a KV cache with room is a step's arrivals).
const kvFull = 0.9

// FreeSlots is how many more requests the backend takes before it is
// saturated: 0 when it is out (then out is true) or full, its known batch
// capacity minus what is in flight, or unbounded when nothing says it is
// bounded.
func (b *Backend) FreeSlots(now time.Time) (free int, out bool) {
	if _, out := b.Load(now); out {
		return 0, true
	}
	if b.engineQueued(now) {
		return 0, false
	}
	if slots := b.Capacity(now); slots > 0 {
		s := b.State(now)
		return max(int(float64(slots)-s.Inflight), 0), false
	}
	return unbounded, false
}

// Capacity is the backend's batch capacity as lately seen full — by the
// balancer's own waits (Slots) or the engine's counts (EngineSlots) — or
// 0 when unknown.
func (b *Backend) Capacity(now time.Time) int64 {
	if slots := b.Slots(now); slots > 0 {
		return slots
	}
	return b.EngineSlots(now)
}

// Full reports whether a request sent to the backend in state s would wait
// for a batch slot: its capacity is known and s fills it, or the engine
// reports a queue beside a full KV cache.
func (b *Backend) Full(s LoadState, now time.Time) bool {
	if b.engineQueued(now) {
		return true
	}
	slots := b.Capacity(now)
	return slots > 0 && s.Inflight+1 > float64(slots)
}

// engineQueued reports fresh engine metrics with a queue beside a full KV
// cache that has not drained since (see queuedSince): the engine cannot
// start another request.
func (b *Backend) engineQueued(now time.Time) bool {
	s := b.engine.latest.Load()
	if s == nil || !s.fresh(now) || !s.m.HasWaiting || !s.m.HasKV || s.m.KVUsage < kvFull {
		return false
	}
	return b.queuedSince(s, s.m.Waiting, now) >= 1
}
