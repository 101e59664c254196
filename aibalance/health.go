package aibalance

import (
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// HealthConfig is how a pool of engines judges their health: the circuit
// breaker's thresholds, the cooldown after 429/503, slow start, the time a
// request may wait for its first byte, the answers that are retried on
// another backend, and model discovery. It is set by the handler's
// transport (`transport aibalance`, or ai_proxy's top-level options) and
// read by its policies through the handler's Pool. Zero fields take the
// defaults of DefaultHealth; negative durations turn a feature off.
type HealthConfig struct {
	// Breaker turns the per-backend circuit breaker off when false.
	Breaker *bool `json:"circuit_breaker,omitempty"`
	// ConsecutiveFailures opens the breaker: that many failures in a row
	// (dial errors, timeouts, 5xx other than 503, streams cut by the
	// backend). A refused connection opens it at once. Default 3: a cut
	// stream reaches the client, so few are tolerated.
	ConsecutiveFailures int `json:"consecutive_failures,omitempty"`
	// FailureRatio opens the breaker when at least that share of the
	// attempts in the last FailureWindow failed, once there were
	// MinRequests of them. Default 0.25, over 10s, from 10 requests.
	FailureRatio  float64        `json:"failure_ratio,omitempty"`
	FailureWindow caddy.Duration `json:"failure_window,omitempty"`
	MinRequests   int            `json:"min_requests,omitempty"`
	// OpenDuration is how long an opened breaker keeps the backend out
	// before half-open probes; it doubles each time a probe fails, up to
	// MaxOpenDuration. Default 5s, at most 60s.
	OpenDuration    caddy.Duration `json:"open_duration,omitempty"`
	MaxOpenDuration caddy.Duration `json:"max_open_duration,omitempty"`
	// HalfOpenProbes is how many requests a half-open backend may serve at
	// once; CloseAfter successes in a row close the breaker. Default 1 and 2.
	HalfOpenProbes int `json:"half_open_probes,omitempty"`
	CloseAfter     int `json:"close_after,omitempty"`

	// Cooldown is how long a backend that answered 429 or 503 without a
	// Retry-After is left alone; MaxCooldown caps any Retry-After.
	// Default 2s and 5m.
	Cooldown    caddy.Duration `json:"cooldown,omitempty"`
	MaxCooldown caddy.Duration `json:"max_cooldown,omitempty"`

	// SlowStart is the window over which a backend that is new to a
	// serving pool, restarted, or back from an open breaker or a cooldown
	// ramps from SlowStartMin of its weight to all of it. Default 30s and
	// 0.1; negative: off.
	SlowStart    caddy.Duration `json:"slow_start,omitempty"`
	SlowStartMin float64        `json:"slow_start_min,omitempty"`

	// FirstByteTimeout bounds the wait for an attempt's first byte (the
	// first body byte of a stream, the headers of other answers): 0 is
	// auto (see FirstByteDeadline), negative is off.
	FirstByteTimeout caddy.Duration `json:"first_byte_timeout,omitempty"`
	// RetryStatus lists the answers that are retried on another backend
	// while the request has attempts left (they reach the client as the
	// backend sent them on the last one). Default 429, 500, 502, 503, 504;
	// [0] turns it off.
	RetryStatus []int `json:"retry_status,omitempty"`

	// ModelsInterval is how often each engine's /v1/models is read (with
	// its engine metrics); negative: never. Default 10s.
	ModelsInterval caddy.Duration `json:"models_interval,omitempty"`

	// OutlierFactor turns on outlier ejection: a backend whose learned
	// completion time for a reference request at the same light load is
	// more than this many times its peers' median is ejected for
	// EjectionDuration, never more than MaxEjectedPercent of the pool at
	// once. 0: off (the default; ai_predictive already sends a slow
	// backend only what it can finish soonest). Defaults when on: 50% and
	// 30s.
	OutlierFactor     float64        `json:"outlier_factor,omitempty"`
	MaxEjectedPercent int            `json:"max_ejected_percent,omitempty"`
	EjectionDuration  caddy.Duration `json:"ejection_duration,omitempty"`
}

// DefaultHealth holds the defaults of HealthConfig.
var DefaultHealth = HealthConfig{
	ConsecutiveFailures: 3,
	FailureRatio:        0.25,
	FailureWindow:       caddy.Duration(10 * time.Second),
	MinRequests:         10,
	OpenDuration:        caddy.Duration(5 * time.Second),
	MaxOpenDuration:     caddy.Duration(60 * time.Second),
	HalfOpenProbes:      1,
	CloseAfter:          2,
	Cooldown:            caddy.Duration(2 * time.Second),
	MaxCooldown:         caddy.Duration(5 * time.Minute),
	SlowStart:           caddy.Duration(30 * time.Second),
	SlowStartMin:        0.1,
	RetryStatus:         []int{429, 500, 502, 503, 504},
	ModelsInterval:      caddy.Duration(10 * time.Second),
}

// WithDefaults returns c with its zero fields set from DefaultHealth.
func (c HealthConfig) WithDefaults() HealthConfig {
	d := DefaultHealth
	if c.Breaker == nil {
		on := true
		c.Breaker = &on
	}
	setInt := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	setDur := func(v *caddy.Duration, def caddy.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	setInt(&c.ConsecutiveFailures, d.ConsecutiveFailures)
	setInt(&c.MinRequests, d.MinRequests)
	setInt(&c.HalfOpenProbes, d.HalfOpenProbes)
	setInt(&c.CloseAfter, d.CloseAfter)
	if c.FailureRatio == 0 {
		c.FailureRatio = d.FailureRatio
	}
	if c.SlowStartMin == 0 {
		c.SlowStartMin = d.SlowStartMin
	}
	setDur(&c.FailureWindow, d.FailureWindow)
	setDur(&c.OpenDuration, d.OpenDuration)
	setDur(&c.MaxOpenDuration, d.MaxOpenDuration)
	setDur(&c.Cooldown, d.Cooldown)
	setDur(&c.MaxCooldown, d.MaxCooldown)
	setDur(&c.SlowStart, d.SlowStart)
	setDur(&c.ModelsInterval, d.ModelsInterval)
	setInt(&c.MaxEjectedPercent, 50)
	setDur(&c.EjectionDuration, caddy.Duration(30*time.Second))
	if c.RetryStatus == nil {
		c.RetryStatus = d.RetryStatus
	}
	c.MaxOpenDuration = max(c.MaxOpenDuration, c.OpenDuration)
	return c
}

// Validate checks c.
func (c HealthConfig) Validate() error {
	switch {
	case c.ConsecutiveFailures < 0 || c.MinRequests < 0 || c.HalfOpenProbes < 0 || c.CloseAfter < 0:
		return fmt.Errorf("consecutive_failures, min_requests, half_open_probes and close_after must not be negative")
	case c.FailureRatio < 0 || c.FailureRatio > 1:
		return fmt.Errorf("failure_ratio must be between 0 and 1, got %g", c.FailureRatio)
	case c.SlowStartMin < 0 || c.SlowStartMin > 1:
		return fmt.Errorf("slow_start_min must be between 0 and 1, got %g", c.SlowStartMin)
	case c.OutlierFactor < 0 || (c.OutlierFactor > 0 && c.OutlierFactor <= 1) || c.MaxEjectedPercent < 0 || c.MaxEjectedPercent > 100 || c.EjectionDuration < 0:
		return fmt.Errorf("outlier ejection: the factor must be above 1 (0: off), max_ejected_percent 0..100, ejection_duration not negative")
	case c.FailureWindow < 0 || c.OpenDuration < 0 || c.MaxOpenDuration < 0 || c.Cooldown < 0 || c.MaxCooldown < 0:
		return fmt.Errorf("failure_window, open_duration, max_open_duration, cooldown and max_cooldown must not be negative")
	case c.OpenDuration > 0 && c.MaxOpenDuration > 0 && c.OpenDuration > c.MaxOpenDuration:
		return fmt.Errorf("open_duration %s is longer than max_open_duration %s", time.Duration(c.OpenDuration), time.Duration(c.MaxOpenDuration))
	case c.Cooldown > 0 && c.MaxCooldown > 0 && c.Cooldown > c.MaxCooldown:
		return fmt.Errorf("cooldown %s is longer than max_cooldown %s, which caps it", time.Duration(c.Cooldown), time.Duration(c.MaxCooldown))
	}
	seen := map[int]bool{}
	for _, s := range c.RetryStatus {
		if s != 0 && (s < 400 || s > 599) {
			return fmt.Errorf("retry_status: %d is not an error status (400-599)", s)
		}
		if seen[s] {
			return fmt.Errorf("retry_status: %d is listed twice", s)
		}
		seen[s] = true
	}
	return nil
}

// BreakerOn reports whether the circuit breaker is on.
func (c *HealthConfig) BreakerOn() bool { return c.Breaker == nil || *c.Breaker }

// Retries reports whether an answer with status is retried elsewhere.
func (c *HealthConfig) Retries(status int) bool {
	for _, s := range c.RetryStatus {
		if s == status {
			return true
		}
	}
	return false
}

// SetHealth sets the pool's health configuration (defaults applied).
func (p *Pool) SetHealth(c HealthConfig) {
	c = c.WithDefaults()
	p.health.Store(&c)
}

var defaultHealth = DefaultHealth.WithDefaults()

// Health returns the pool's health configuration, defaults when unset.
func (p *Pool) Health() *HealthConfig {
	if p == nil {
		return &defaultHealth
	}
	if c := p.health.Load(); c != nil {
		return c
	}
	return &defaultHealth
}

// HealthStatus is a backend's health as its circuit breaker (package
// healthcheck) sees it.
type HealthStatus struct {
	// State is closed, open or half_open.
	State string
	// Reason is why the breaker last changed state.
	Reason string
	// Since is when it did; Until is when an open breaker lets probes in.
	Since, Until time.Time
	// Eligible reports whether the backend may be sent a request now:
	// closed, or half-open with a probe slot free.
	Eligible bool
}

// Breaker is the circuit breaker a backend carries (package healthcheck
// implements it); the store only holds it, so that it lives and dies with
// the backend and the admin view can show it.
type Breaker interface {
	Status(now time.Time) HealthStatus
}

type breakerBox struct{ b Breaker }

// Breaker returns the backend's circuit breaker, creating it with mk on
// first use. Concurrent first calls agree on one.
func (b *Backend) Breaker(mk func() Breaker) Breaker {
	if box := b.breaker.Load(); box != nil {
		return box.b
	}
	if mk == nil {
		return nil
	}
	box := &breakerBox{b: mk()}
	if b.breaker.CompareAndSwap(nil, box) {
		return box.b
	}
	return b.breaker.Load().b
}

// StartRamp starts the backend's slow start at from: its weight ramps up
// over the pool's slow-start window from then (see Ramp). A later start
// replaces an earlier one.
func (b *Backend) StartRamp(from time.Time) { b.rampFrom.Store(from.UnixNano()) }

// Ramp is the share of its weight the backend has at now under slow start
// over window, from min to 1, linear (Envoy's slow start with aggression
// 1). It is 1 when no ramp was started or window is not positive.
func (b *Backend) Ramp(now time.Time, window time.Duration, min float64) float64 {
	from := b.rampFrom.Load()
	if from == 0 || window <= 0 {
		return 1
	}
	el := now.UnixNano() - from
	switch {
	case el >= int64(window):
		return 1
	case el <= 0:
		return min
	}
	return min + (1-min)*float64(el)/float64(window)
}

// Ramping reports whether the backend is in slow start at now, and since when.
func (b *Backend) Ramping(now time.Time, window time.Duration) (bool, time.Time) {
	from := b.rampFrom.Load()
	if from == 0 || window <= 0 {
		return false, time.Time{}
	}
	el := now.UnixNano() - from
	return el < int64(window), time.Unix(0, from)
}

// ServedModels is what a backend's /v1/models lists: each model's id and
// context length (0 when unknown), read at At.
type ServedModels struct {
	Context map[string]int
	At      time.Time
}

// SetModels publishes the models the backend serves; nil: unknown.
func (b *Backend) SetModels(m *ServedModels) { b.models.Store(m) }

// Models returns what the backend was last seen serving, or nil.
func (b *Backend) Models() *ServedModels { return b.models.Load() }

// Serves reports whether the backend is known to serve model, and its
// context length then. known is false when its models are unknown (never
// read, or the engine does not list them): it may serve anything.
func (b *Backend) Serves(model string) (known, serves bool, context int) {
	m := b.models.Load()
	if m == nil || len(m.Context) == 0 {
		return false, true, 0
	}
	c, ok := m.Context[model]
	return true, ok, c
}

// hasRequests reports whether the backend has finished any attempt.
func (b *Backend) hasRequests() bool { return b.requests.Load() > 0 }

// Reject is an answer the balancer gives itself, in the API's error shape:
// no backend may serve the request (its model is served nowhere, every
// backend asked for a pause), or every attempt failed.
type Reject struct {
	Status int    // HTTP status
	Type   string // the error's type: invalid_request_error, rate_limit_error, ...
	Code   string // its code: model_not_found, ...
	// Message says what happened, for a person.
	Message string
	// RetryAfter, when positive, is sent as Retry-After (whole seconds,
	// at least 1).
	RetryAfter time.Duration
}

// Eject takes the backend out until until, for reason (outlier
// ejection); its slow start begins when the ejection ends. samples is its
// model's sample count now: it is not ejected again on the same evidence.
func (b *Backend) Eject(until time.Time, reason string, samples int64) {
	b.ejectReason.Store(&reason)
	b.ejectSamples.Store(samples)
	b.ejections.Add(1)
	b.ejectedUntil.Store(until.UnixNano())
	b.rampFrom.Store(until.UnixNano())
}

// Ejected reports whether the backend is ejected at now, with the reason
// and the end of the ejection.
func (b *Backend) Ejected(now time.Time) (bool, string, time.Time) {
	u := b.ejectedUntil.Load()
	if u <= now.UnixNano() {
		return false, "", time.Time{}
	}
	r := ""
	if p := b.ejectReason.Load(); p != nil {
		r = *p
	}
	return true, r, time.Unix(0, u)
}

// EjectedSamples is the model's sample count when the backend was last
// ejected (0: never).
func (b *Backend) EjectedSamples() int64 { return b.ejectSamples.Load() }

// Due reports, to one caller per interval, that a periodic pool-wide task
// (outlier detection) is due at now.
func (p *Pool) Due(now time.Time, every time.Duration) bool {
	last := p.dueAt.Load()
	return now.UnixNano()-last >= int64(every) && p.dueAt.CompareAndSwap(last, now.UnixNano())
}
