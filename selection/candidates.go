package selection

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/healthcheck"
)

// candidates decides which upstreams a request may go to, in three levels
// tried in order until one has a candidate:
//
//  0. healthy: available to Caddy, weight above zero, not already tried by
//     this request, not cooling down after a 429/503, its circuit breaker
//     closed (or half-open with a probe free), not ejected as an outlier,
//     serving the request's model (when its models are known) with a
//     context that fits the request;
//  1. panic (Envoy's panic mode): every backend is out, so the breaker,
//     ejection, slow start and the context fit are ignored — the least bad
//     backend by score gets the request rather than nobody;
//  2. a backend this request already tried.
//
// Three rules hold at every level: a backend cooling down gets nothing (it
// asked for a pause), a backend the operator drains gets nothing, and a
// backend known not to serve the model gets nothing. When nothing is left the policy answers itself (see reject).
type candidates struct {
	pool      *aibalance.Pool // weights by address, members, health; nil: positional weights
	weights   []int           // positional weights, when pool is nil
	upstreams reverseproxy.UpstreamPool
	set       *aibalance.BackendSet // nil: no state known (no health either)
	now       time.Time
	f         *aibalance.Features // nil: not read
	tried     *aibalance.Tried
	health    *aibalance.HealthConfig
	logger    *zap.Logger
	skip      [2]string // half-open backends whose probes were all taken
	nskip     int
	key       uint64 // the request's affinity key (see affinityKey); 0: none
	openTier  int    // the highest tier open at level 0 (see tierOpen)
	// held is how many of the request's prompt tokens an upstream holds
	// in its prefix cache (see nearBest); nil: not weighed
	held func(*reverseproxy.Upstream) int
}

// tierOpen is the highest tier that may take new requests now: standby
// tiers open while the tiers before them are saturated or out (see
// aibalance.Pool.OpenTier); MaxTier when the pool has no tiers.
func (c *candidates) tierOpen(pool reverseproxy.UpstreamPool) int {
	if c.pool == nil || c.set == nil || !c.pool.HasTiers() {
		return aibalance.MaxTier
	}
	members := func(yield func(string) bool) {
		for _, u := range pool {
			if !yield(u.Dial) {
				return
			}
		}
	}
	// the closure takes copies, not c: OpenTier keeps it beyond escape
	// analysis's sight, and c would move to the heap on every request
	set, health, now := c.set, c.health, c.now
	return c.pool.OpenTier(now, members, func(addr string) (float64, bool) {
		b := set.Get(addr)
		// a half-open breaker whose probes are taken is out for this
		// request too, beyond what Load sees
		if br := healthcheck.Of(b); br != nil && health.BreakerOn() && !br.Allow(now, health) {
			return 1, true
		}
		return b.Load(now)
	})
}

// zone is what the score of u is multiplied by, and what is added to it
// (seconds), for an upstream outside this instance's zone (see
// aibalance.Pool.ZoneFactor). A function of the pool, not a method of
// candidates: a score closure calling a method of c moves c to the heap.
func zone(pool *aibalance.Pool, home string, u *reverseproxy.Upstream) (float64, float64) {
	f, add := pool.ZoneFactor(home, u.Dial)
	return f, add.Seconds()
}

func (c *candidates) weight(u *reverseproxy.Upstream) float64 {
	if c.pool != nil {
		return c.pool.Weight(u.Dial)
	}
	return positionalWeight(c.weights, c.upstreams, u.Dial)
}

// ramp is the slow-start share of u's weight (1 when not ramping).
func (c *candidates) ramp(b *aibalance.Backend) float64 {
	h := c.health
	return b.Ramp(c.now, time.Duration(h.SlowStart), h.SlowStartMin)
}

func (c *candidates) skipped(addr string) bool {
	for _, s := range c.skip[:c.nskip] {
		if s == addr {
			return true
		}
	}
	return false
}

func (c *candidates) ok(level int, u *reverseproxy.Upstream) bool {
	if !u.Available() || c.weight(u) <= 0 || (level == 0 && c.skipped(u.Dial)) || aibalance.Draining(u.Dial) {
		return false
	}
	if level < 2 && c.tried.Len() > 0 && c.tried.Has(u.Dial) {
		return false
	}
	if c.set == nil {
		return true
	}
	b := c.set.Get(u.Dial)
	if b.CoolingDown(c.now) {
		return false
	}
	if c.f != nil && c.f.Model != "" {
		_, serves, context := b.Serves(c.f.Model)
		if !serves {
			return false
		}
		if level == 0 && context > 0 && c.f.PromptTokens+c.f.OutputLimit > context {
			return false
		}
	}
	if level == 0 && c.openTier < aibalance.MaxTier && c.pool.Tier(u.Dial) > c.openTier {
		return false
	}
	if level == 0 && c.health.OutlierFactor > 0 {
		if out, _, _ := b.Ejected(c.now); out {
			return false
		}
	}
	if level == 0 && c.health.BreakerOn() {
		if br := healthcheck.Of(b); br != nil && !br.Allow(c.now, c.health) {
			return false
		}
	}
	return true
}

// pick returns the eligible upstream with the lowest score, choosing
// uniformly among equal scores, and records it as tried (and, for dynamic
// upstreams, as a member of the pool). With k > 0 it compares k random
// eligible upstreams plus the previous winner (memory), else all of them.
// A half-open winner must get one of its probes, or the pick is made
// again without it.
func (c *candidates) pick(pool reverseproxy.UpstreamPool, score func(*reverseproxy.Upstream) float64, memory *atomic.Int64, k int) *reverseproxy.Upstream {
	if c.health == nil {
		c.health = c.pool.Health()
	}
	if u := c.owner(pool); u != nil {
		return u
	}
	if u := c.probe(pool); u != nil {
		return u
	}
	// level 0 first within the open tiers, then, when none of them may
	// take the request, in every tier: a healthy standby before panic
	c.openTier = c.tierOpen(pool)
	for pass := 0; pass < 4; pass++ {
		level := max(pass-1, 0)
		if pass == 1 {
			if c.openTier >= aibalance.MaxTier {
				continue
			}
			c.openTier = aibalance.MaxTier
		}
		eligible := func(u *reverseproxy.Upstream) bool { return c.ok(level, u) }
		for {
			var best *reverseproxy.Upstream
			if k > 0 {
				best = sampleMin(pool, eligible, k, memory, score, c.key, c.held)
			} else {
				best = selectMin(pool, eligible, score, c.key, c.held)
			}
			if best == nil {
				break
			}
			if !c.claim(level, best) || !c.admitRamp(level, best) {
				if c.nskip == len(c.skip) {
					break
				}
				c.skip[c.nskip] = best.Dial
				c.nskip++
				continue
			}
			c.tried.Add(best.Dial)
			if c.pool != nil && c.pool.AddMember(best.Dial) && c.set != nil {
				// a dynamic upstream new to a serving pool starts slowly
				c.set.RampNewcomers(c.pool.Members(), c.now)
			}
			return best
		}
	}
	return nil
}

// owner returns the backend that stores the history a stateful Responses
// request continues (previous_response_id, conversation) when it may take
// it; nil when none is known, or when it is out, and then the request is
// routed as any other and marked so that its answer says so.
func (c *candidates) owner(pool reverseproxy.UpstreamPool) *reverseproxy.Upstream {
	if c.f == nil || c.f.API != aibalance.APIResponses {
		return nil
	}
	key := c.f.StatefulKey()
	if key == "" {
		return nil
	}
	addr, ok := aibalance.Owner(key, c.now)
	if !ok {
		c.f.OwnerUnknown = true
		return nil
	}
	for _, u := range pool {
		if u.Dial != addr {
			continue
		}
		if c.ok(0, u) && c.claim(0, u) {
			c.f.OwnerLost = false
			c.tried.Add(u.Dial)
			return u
		}
		break
	}
	c.f.OwnerLost = true
	return nil
}

// probe returns a backend whose breaker waits for a probe, having claimed
// the probe, or nil. A recovering backend is probed by the next request
// that may go to it, whatever its score: its score still carries the
// failures that opened it, and without a probe it would never close. The
// probe is bounded (half_open_probes), and an attempt that fails before
// its first byte is retried elsewhere. It costs a scan of the pool only
// while some breaker in the process is not closed.
func (c *candidates) probe(pool reverseproxy.UpstreamPool) *reverseproxy.Upstream {
	if c.set == nil || !c.health.BreakerOn() || !healthcheck.AnyNotClosed() {
		return nil
	}
	for _, u := range pool {
		br := healthcheck.Of(c.set.Get(u.Dial))
		if br == nil || !br.NeedsProbe(c.now, c.health) || !c.ok(0, u) {
			continue
		}
		if c.claim(0, u) {
			c.tried.Add(u.Dial)
			return u
		}
	}
	return nil
}

// admitRamp applies slow start: a backend ramping up takes a request it
// won with probability equal to its ramp (the share of its weight it has
// now), else the request goes to the next best. So its traffic rises from
// slow_start_min of what it would win to all of it, whatever the policy's
// score: dividing a predicted time by the ramp would hold it at nothing
// until the ramp nearly ends, since a fresh, idle backend wins by far. In
// panic (level 1 and up) every backend is welcome.
func (c *candidates) admitRamp(level int, u *reverseproxy.Upstream) bool {
	if level > 0 || c.set == nil {
		return true
	}
	r := c.ramp(c.set.Get(u.Dial))
	return r >= 1 || rand.Float64() < r
}

// claim takes a half-open probe on u's breaker when it needs one; false:
// its probes are taken. In panic (level 1 and up) nothing is claimed.
func (c *candidates) claim(level int, u *reverseproxy.Upstream) bool {
	if level > 0 || c.set == nil || !c.health.BreakerOn() {
		return true
	}
	br := healthcheck.Of(c.set.Get(u.Dial))
	if br == nil {
		return true
	}
	ok, probe := br.Probe(c.now, c.health, c.logger)
	if probe && c.f != nil {
		c.f.Probe = u.Dial
	}
	return ok
}

// reject is the policy's own answer when no upstream may take the request
// (pick found none): 404 model_not_found when the model is served by none
// of the pool's backends that list their models, 429 with Retry-After when
// every backend that could serve it is cooling down, 503 otherwise.
func (c *candidates) reject(pool reverseproxy.UpstreamPool) *aibalance.Reject {
	if len(pool) == 0 {
		return &aibalance.Reject{
			Status: http.StatusServiceUnavailable, Type: "service_unavailable", Code: "no_backend_available",
			Message: "this pool has no backends (a dynamic pool without members?)", RetryAfter: time.Second,
		}
	}
	var served []string
	known, serving, cooling := 0, 0, false
	var soonest time.Time
	for _, u := range pool {
		if c.set == nil {
			break
		}
		b := c.set.Get(u.Dial)
		if c.f != nil && c.f.Model != "" {
			k, serves, _ := b.Serves(c.f.Model)
			if k {
				known++
				if m := b.Models(); m != nil {
					for id := range m.Context {
						served = append(served, id)
					}
				}
			}
			if !serves {
				continue
			}
			serving++
		}
		if b.CoolingDown(c.now) {
			cooling = true
			if until := b.Cooldown(); soonest.IsZero() || until.Before(soonest) {
				soonest = until
			}
		}
	}
	if c.f != nil && c.f.Model != "" && known == len(pool) && known > 0 && serving == 0 {
		return modelNotFound(c.f.Model, served)
	}
	if cooling {
		return &aibalance.Reject{
			Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: "rate_limit_exceeded",
			Message:    "every backend that serves this request asked for a pause (429/503 with Retry-After); retry after the time given",
			RetryAfter: soonest.Sub(c.now),
		}
	}
	return &aibalance.Reject{
		Status: http.StatusServiceUnavailable, Type: "service_unavailable", Code: "no_backend_available",
		Message: "no backend is available to serve this request", RetryAfter: time.Second,
	}
}

// modelNotFound is the OpenAI API's answer for a model no backend serves.
func modelNotFound(model string, served []string) *aibalance.Reject {
	sort.Strings(served)
	served = compactStrings(served)
	list := "none"
	if len(served) > 0 {
		list = strings.Join(served, ", ")
	}
	return &aibalance.Reject{
		Status: http.StatusNotFound, Type: "invalid_request_error", Code: "model_not_found",
		Message: fmt.Sprintf("The model `%s` does not exist or is not served here. Served models: %s.", truncate(model, 256), list),
	}
}

func compactStrings(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// retryBudget is the handler's retry settings (lb_retries, lb_try_duration,
// lb_try_interval), read at Provision: it tells whether Caddy's proxy loop
// will try again after the current attempt, so the policy and the transport
// know when an answer is the client's last.
type retryBudget struct {
	retries     int
	tryDuration time.Duration
	tryInterval time.Duration
}

func newRetryBudget(ctx caddy.Context) retryBudget {
	h := aibalance.Handler(ctx)
	if h == nil || h.LoadBalancing == nil {
		return retryBudget{}
	}
	lb := h.LoadBalancing
	interval := time.Duration(lb.TryInterval)
	if interval == 0 && lb.TryDuration > 0 {
		interval = 250 * time.Millisecond // Caddy's default
	}
	return retryBudget{retries: lb.Retries, tryDuration: time.Duration(lb.TryDuration), tryInterval: interval}
}

// last reports whether the attempt made by the request's f.Selects-th
// selection is its last: Caddy's tryAgain would refuse another.
func (rb retryBudget) last(f *aibalance.Features, now time.Time) bool {
	if f == nil {
		return true
	}
	if rb.retries == 0 && rb.tryDuration == 0 {
		return true
	}
	if rb.tryDuration > 0 && now.Sub(f.Start)+rb.tryInterval >= rb.tryDuration {
		return true
	}
	return rb.retries > 0 && f.Selects-1 >= rb.retries
}
