package healthcheck

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// Breaker states.
const (
	Closed   = "closed"
	Open     = "open"
	HalfOpen = "half_open"
)

const (
	stClosed int32 = iota
	stOpen
	stHalfOpen
)

var stateNames = [...]string{Closed, Open, HalfOpen}

// Breaker is one backend's circuit breaker: closed (requests flow), open
// (none, for a while), half-open (a bounded number of probe requests; their
// successes close it, a failure opens it again for twice as long).
//
// It opens on consecutive failures, on a refused connection at once, or
// when a share of the attempts in a sliding window failed. A failure is
// the backend's fault: no connection, a timeout (the first-byte timeout
// included), a 5xx other than 503, a stream the backend cut. A 429 or 503
// is a cooldown (see aibalance.Backend.CoolDown), not a failure; other 4xx
// are the request's fault; a client that gave up is nobody's. A closed
// breaker's window forgets what is older than the window.
//
// It lives on the backend (aibalance.Backend.Breaker): one per address,
// shared by every handler and kept across reloads. The thresholds come from
// the configuration of the handler that records (aibalance.HealthConfig).
// Reads on the request path are atomics; a mutex of its own orders
// transitions.
type Breaker struct {
	backend *aibalance.Backend

	// published for lock-free reads
	state  atomic.Int32
	until  atomic.Int64 // unix ns: an open breaker admits probes from then
	since  atomic.Int64 // unix ns of the last transition
	probes atomic.Int32 // half-open probes in flight
	probed atomic.Int64 // unix ns the last probe was claimed
	reason atomic.Pointer[string]

	last atomic.Pointer[aibalance.HealthConfig] // the config of the latest Record or Probe, for the scraper's signals

	mu          sync.Mutex
	down        bool // open because the engine could not be reached: its scraper may reopen it for probes
	consecutive int  // failures in a row
	successes   int  // half-open successes in a row
	opens       int  // opens since the breaker last closed: the backoff
	window      [windowBuckets]bucket
}

const windowBuckets = 10

type bucket struct {
	start           int64 // unix ns the bucket began
	attempts, fails int
}

// notClosed counts the breakers of the process that are not closed, so a
// policy looks for backends to probe only when there are some.
var notClosed atomic.Int64

// AnyNotClosed reports whether some breaker is open or half-open.
func AnyNotClosed() bool { return notClosed.Load() > 0 }

// NeedsProbe reports whether the backend's breaker is half-open (or open
// with its time up) with a probe free: the next request may probe it.
func (br *Breaker) NeedsProbe(now time.Time, c *aibalance.HealthConfig) bool {
	return br.state.Load() != stClosed && br.Allow(now, c)
}

// For returns b's circuit breaker, creating it on first use.
func For(b *aibalance.Backend) *Breaker {
	return b.Breaker(func() aibalance.Breaker { return &Breaker{backend: b} }).(*Breaker)
}

// Of returns b's circuit breaker, or nil when it has none yet (it has
// recorded nothing: closed).
func Of(b *aibalance.Backend) *Breaker {
	br, _ := b.Breaker(nil).(*Breaker)
	return br
}

// Status is the breaker's state at now, for the admin view. An open
// breaker whose time is up shows as half-open.
func (br *Breaker) Status(now time.Time) aibalance.HealthStatus {
	s := aibalance.HealthStatus{State: Closed, Eligible: true}
	st := br.state.Load()
	if r := br.reason.Load(); r != nil {
		s.Reason = *r
	}
	if t := br.since.Load(); t != 0 {
		s.Since = time.Unix(0, t)
	}
	switch st {
	case stOpen:
		s.Until = time.Unix(0, br.until.Load())
		if now.Before(s.Until) {
			s.State, s.Eligible = Open, false
		} else {
			s.State = HalfOpen
			s.Reason = "open time over: the next request probes it (opened: " + s.Reason + ")"
		}
	case stHalfOpen:
		s.State = HalfOpen
	}
	return s
}

// Allow reports whether the backend may be sent a request at now: the
// breaker is closed, or half-open (or open with its time up) with a probe
// free. It changes nothing: the policy calls Probe for the one it picks.
func (br *Breaker) Allow(now time.Time, c *aibalance.HealthConfig) bool {
	switch br.state.Load() {
	case stClosed:
		return true
	case stOpen:
		if now.UnixNano() < br.until.Load() {
			return false
		}
	}
	return br.probeFree(now, c)
}

// probeLost is how long a claimed probe may go unreported before its slot
// is given to another request: a request whose attempt never reached the
// transport (another transport, an error before the round trip) must not
// leave the breaker half-open for ever. A probe still running then (a long
// generation) only lets one more in.
const probeLost = time.Minute

func (br *Breaker) probeFree(now time.Time, c *aibalance.HealthConfig) bool {
	return int(br.probes.Load()) < max(c.HalfOpenProbes, 1) || now.UnixNano()-br.probed.Load() > int64(probeLost)
}

// Open reports whether the breaker keeps the backend out at now.
func (br *Breaker) Open(now time.Time) bool {
	return br.state.Load() == stOpen && now.UnixNano() < br.until.Load()
}

// Probe claims a half-open probe for a request about to be sent to the
// backend. It reports whether the request may go (false: the probes are
// taken, pick another) and whether it is a probe, to be given back by
// Record.
func (br *Breaker) Probe(now time.Time, c *aibalance.HealthConfig, log *zap.Logger) (ok, probe bool) {
	br.last.Store(c)
	if br.state.Load() == stClosed {
		return true, false
	}
	br.mu.Lock()
	defer br.mu.Unlock()
	switch br.state.Load() {
	case stClosed:
		return true, false
	case stOpen:
		if now.UnixNano() < br.until.Load() {
			return false, false
		}
		br.successes = 0
		br.transition(stHalfOpen, "open time over: probing", now, log)
	}
	if !br.probeFree(now, c) {
		return false, false
	}
	if int(br.probes.Load()) >= max(c.HalfOpenProbes, 1) {
		br.probes.Store(0) // lost: see probeLost
	}
	br.probes.Add(1)
	br.probed.Store(now.UnixNano())
	return true, true
}

// verdict is what an attempt says of the backend's health.
type verdict int

const (
	neutral verdict = iota
	success
	failure
)

func judge(o aibalance.Outcome) (verdict, string) {
	switch {
	case o.Canceled && !o.StreamError:
		return neutral, ""
	case o.DialError:
		return failure, "connection failed"
	case o.Timeout:
		return failure, "timed out"
	case o.StreamError:
		return failure, "stream cut by the backend"
	case o.Status == 0:
		return failure, "no response"
	case o.Status == 503 || o.Status == 429:
		return neutral, "" // a cooldown, not a failure
	case o.Status >= 500:
		return failure, fmt.Sprintf("answered %d", o.Status)
	case o.Status >= 400:
		return neutral, ""
	}
	return success, ""
}

// Record takes the outcome of an attempt at now (probe: the attempt held a
// probe from Probe) and moves the breaker, logging every transition.
func (br *Breaker) Record(o aibalance.Outcome, probe bool, now time.Time, c *aibalance.HealthConfig, log *zap.Logger) {
	if probe && br.probes.Add(-1) < 0 {
		br.probes.Store(0) // its slot was taken back as lost
	}
	br.last.Store(c)
	v, why := judge(o)
	if v == neutral || !c.BreakerOn() {
		return
	}
	br.mu.Lock()
	defer br.mu.Unlock()
	t := now.UnixNano()
	switch br.state.Load() {
	case stClosed:
		b := br.bucket(t, time.Duration(c.FailureWindow))
		b.attempts++
		if v == success {
			br.consecutive = 0
			return
		}
		b.fails++
		br.consecutive++
		attempts, fails := br.counts(t, time.Duration(c.FailureWindow))
		switch {
		case o.DialError && !o.Timeout:
			br.open(why+": the engine is down", now, c, log)
			br.down = true
		case br.consecutive >= c.ConsecutiveFailures:
			br.open(fmt.Sprintf("%d failures in a row (last: %s)", br.consecutive, why), now, c, log)
		case attempts >= c.MinRequests && float64(fails) >= c.FailureRatio*float64(attempts):
			br.open(fmt.Sprintf("%d of %d attempts failed in %s (last: %s)", fails, attempts, time.Duration(c.FailureWindow), why), now, c, log)
		}
	case stHalfOpen, stOpen:
		// an attempt sent before the breaker opened may end now: only
		// what happens once probing began counts
		if br.state.Load() == stOpen && t < br.until.Load() {
			return
		}
		if v == failure {
			br.open("probe failed: "+why, now, c, log)
			br.down = o.DialError && !o.Timeout
			return
		}
		br.successes++
		if br.successes >= c.CloseAfter {
			br.consecutive, br.successes, br.opens = 0, 0, 0
			br.window = [windowBuckets]bucket{}
			br.transition(stClosed, fmt.Sprintf("%d probes succeeded", c.CloseAfter), now, log)
			// it recovered: its old failures no longer count against it;
			// slow start brings its traffic back gradually
			br.backend.ForgiveFailures()
			br.backend.StartRamp(now)
		}
	}
}

// open opens the breaker (mu held) for the open duration, doubled for each
// open since it last closed.
func (br *Breaker) open(why string, now time.Time, c *aibalance.HealthConfig, log *zap.Logger) {
	d := time.Duration(c.OpenDuration)
	for i := 0; i < br.opens && d < time.Duration(c.MaxOpenDuration); i++ {
		d *= 2
	}
	d = min(d, time.Duration(c.MaxOpenDuration))
	br.opens++
	br.successes, br.consecutive, br.down = 0, 0, false
	br.until.Store(now.Add(d).UnixNano())
	br.transition(stOpen, fmt.Sprintf("%s; out for %s", why, d), now, log)
}

func (br *Breaker) transition(to int32, why string, now time.Time, log *zap.Logger) {
	from := br.state.Swap(to)
	switch {
	case from == stClosed && to != stClosed:
		notClosed.Add(1)
	case from != stClosed && to == stClosed:
		notClosed.Add(-1)
	}
	br.since.Store(now.UnixNano())
	br.reason.Store(&why)
	if log == nil {
		return
	}
	level := log.Info
	if to == stOpen {
		level = log.Warn
	}
	level("circuit breaker "+stateNames[to],
		zap.String("upstream", br.backend.Addr()),
		zap.String("from", stateNames[from]),
		zap.String("reason", why))
}

// bucket returns the window bucket of t (mu held), recycling a stale one.
func (br *Breaker) bucket(t int64, window time.Duration) *bucket {
	width := max(int64(window)/windowBuckets, 1)
	start := t - t%width
	b := &br.window[(t/width)%windowBuckets]
	if b.start != start {
		*b = bucket{start: start}
	}
	return b
}

// counts sums the attempts and failures of the window ending at t (mu held).
func (br *Breaker) counts(t int64, window time.Duration) (attempts, fails int) {
	for _, b := range br.window {
		if b.start > t-int64(window) && b.start <= t {
			attempts += b.attempts
			fails += b.fails
		}
	}
	return attempts, fails
}

// EngineDown is the engine scraper's word that the engine refuses
// connections at now (its metrics are served on its own port): a closed
// breaker opens, and an open one stays open while it lasts, so no client
// request is sent to probe an engine known to be down.
func (br *Breaker) EngineDown(now time.Time, why string, log *zap.Logger) {
	c := br.last.Load()
	if c == nil {
		d := aibalance.DefaultHealth.WithDefaults()
		c = &d
	}
	if !c.BreakerOn() {
		return
	}
	br.mu.Lock()
	defer br.mu.Unlock()
	switch br.state.Load() {
	case stOpen:
		if until := now.Add(time.Duration(c.OpenDuration)).UnixNano(); until > br.until.Load() {
			br.until.Store(until)
		}
		br.down = true
	default:
		br.open(why+": the engine is down", now, c, log)
		br.down = true
	}
}

// EngineUp is the scraper's word that the engine answers again at now: a
// breaker opened because it could not be reached lets probes in at once
// instead of waiting out its open time.
func (br *Breaker) EngineUp(now time.Time, log *zap.Logger) {
	if br.state.Load() != stOpen {
		return
	}
	br.mu.Lock()
	defer br.mu.Unlock()
	if br.state.Load() != stOpen || !br.down || now.UnixNano() >= br.until.Load() {
		return
	}
	br.until.Store(now.UnixNano())
	why := "the engine answers its metrics again: probing"
	br.reason.Store(&why)
	if log != nil {
		log.Info("circuit breaker: engine reachable again", zap.String("upstream", br.backend.Addr()))
	}
}
