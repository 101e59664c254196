package aibalance

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Scaling signal.
//
// Every pool gets a recommended number of primary (tier 0) backends, for an
// external autoscaler: the demand is the sum of the primary members'
// utilisation (see Backend.Utilisation: the engine's KV use and queue when
// scraped, the balancer's requests in flight against the learned batch size
// otherwise; a queueing engine counts above 1), smoothed over time, and the
// recommendation is the demand divided by the target utilisation, rounded
// up. It moves up when the members run above target + hysteresis, down
// when one member fewer would still run below target − hysteresis, and at
// most once per min_interval. Each change is shown in the pool's view, as
// a metric, and, when a webhook is configured, POSTed to it as JSON; new
// engines then join through the admin API (dynamic pools) or DNS and ramp
// up by slow start.

// ScalingConfig is the app's scaling settings (JSON "scaling" of the
// aibalance app; Caddyfile: global aibalance { scaling { ... } }).
type ScalingConfig struct {
	// Webhook is a URL POSTed a ScalingEvent when a pool's recommendation
	// changes. Empty: none.
	Webhook string `json:"webhook,omitempty"`
	// TargetUtilisation is the utilisation the recommendation aims for.
	// Default 0.7.
	TargetUtilisation float64 `json:"target_utilisation,omitempty"`
	// Hysteresis is the utilisation band around the target inside which
	// the recommendation holds. Default 0.1.
	Hysteresis float64 `json:"hysteresis,omitempty"`
	// MinInterval is the least time between two changes of a pool's
	// recommendation. Default 1m.
	MinInterval caddy.Duration `json:"min_interval,omitempty"`
	// Smoothing is the time constant of the demand's moving average.
	// Default 30s.
	Smoothing caddy.Duration `json:"smoothing,omitempty"`
	// Every is how often the pools are evaluated. Default 1s.
	Every caddy.Duration `json:"every,omitempty"`
	// MinReplicas and MaxReplicas bound the recommendation. Default 1 and
	// no bound.
	MinReplicas int `json:"min_replicas,omitempty"`
	MaxReplicas int `json:"max_replicas,omitempty"`
}

// withDefaults returns the settings with defaults applied.
func (c ScalingConfig) withDefaults() ScalingConfig {
	if c.TargetUtilisation == 0 {
		c.TargetUtilisation = 0.7
	}
	if c.Hysteresis == 0 {
		c.Hysteresis = 0.1
	}
	if c.MinInterval == 0 {
		c.MinInterval = caddy.Duration(time.Minute)
	}
	if c.Smoothing == 0 {
		c.Smoothing = caddy.Duration(30 * time.Second)
	}
	if c.Every == 0 {
		c.Every = caddy.Duration(time.Second)
	}
	if c.MinReplicas == 0 {
		c.MinReplicas = 1
	}
	return c
}

// Validate checks the settings.
func (c *ScalingConfig) Validate() error {
	if c == nil {
		return nil
	}
	if c.Webhook != "" {
		u, err := url.Parse(c.Webhook)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("scaling webhook: want an http or https URL, got %q", c.Webhook)
		}
	}
	if c.TargetUtilisation < 0 || c.TargetUtilisation > 1 || math.IsNaN(c.TargetUtilisation) {
		return fmt.Errorf("scaling target_utilisation must be from 0 to 1, got %v", c.TargetUtilisation)
	}
	if c.Hysteresis < 0 || c.Hysteresis >= 0.5 || math.IsNaN(c.Hysteresis) {
		return fmt.Errorf("scaling hysteresis must be from 0 to 0.5, got %v", c.Hysteresis)
	}
	if c.MinInterval < 0 || c.Smoothing < 0 || c.Every < 0 {
		return fmt.Errorf("scaling min_interval, smoothing and every must not be negative")
	}
	if c.MinReplicas < 0 || c.MaxReplicas < 0 || (c.MaxReplicas > 0 && c.MaxReplicas < c.MinReplicas) {
		return fmt.Errorf("scaling min_replicas %d and max_replicas %d: want 0 ≤ min ≤ max", c.MinReplicas, c.MaxReplicas)
	}
	return nil
}

// ScalingStatus is a pool's recommendation (the pool's view, the metric,
// the webhook's body).
type ScalingStatus struct {
	Recommended int       `json:"recommended_primaries"`
	Current     int       `json:"current_primaries"` // primary members not out
	Demand      float64   `json:"demand"`            // smoothed sum of their utilisation
	Utilisation float64   `json:"utilisation"`       // demand per current primary
	Since       time.Time `json:"since,omitzero"`    // of the recommendation
	Reason      string    `json:"reason,omitempty"`
}

// ScalingEvent is what the webhook receives.
type ScalingEvent struct {
	Pool     string   `json:"pool"`
	Members  []string `json:"members"`
	Previous int      `json:"previous_recommended"`
	ScalingStatus
}

// scalingState is a pool's recommendation between evaluations.
type scalingState struct {
	mu       sync.Mutex
	status   ScalingStatus
	smoothed float64
	at       time.Time // of the last evaluation
}

// Scaling returns the pool's recommendation (zero before the first
// evaluation).
func (p *Pool) Scaling() ScalingStatus {
	p.scaling.mu.Lock()
	defer p.scaling.mu.Unlock()
	return p.scaling.status
}

// evaluateScaling updates the pool's recommendation at now and reports
// whether it changed, with the previous value.
func (p *Pool) evaluateScaling(c ScalingConfig, now time.Time) (ScalingStatus, int, bool) {
	topo := p.Topology()
	demand, current := 0.0, 0
	for _, a := range p.Members() {
		if topo.Tiers[a] != 0 {
			continue
		}
		b, ok := LookupBackend(a)
		if !ok {
			continue // removed
		}
		u, out := b.Load(now)
		if out {
			continue
		}
		current++
		demand += u
	}
	s := &p.scaling
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.at.IsZero() {
		s.smoothed = demand
	} else if dt := now.Sub(s.at); dt > 0 {
		w := 1 - math.Exp(-dt.Seconds()/time.Duration(c.Smoothing).Seconds())
		s.smoothed += w * (demand - s.smoothed)
	}
	s.at = now
	st := &s.status
	st.Current, st.Demand = current, s.smoothed
	st.Utilisation = 0
	if current > 0 {
		st.Utilisation = s.smoothed / float64(current)
	}
	prev := st.Recommended
	bound := func(n int) int {
		n = max(n, c.MinReplicas)
		if c.MaxReplicas > 0 {
			n = min(n, c.MaxReplicas)
		}
		return n
	}
	want := bound(int(math.Ceil(s.smoothed/c.TargetUtilisation - 1e-9)))
	if prev == 0 { // first evaluation: the members as they are
		st.Recommended, st.Since = bound(max(current, want)), now
		st.Reason = "first evaluation"
		return *st, prev, false
	}
	if !st.Since.IsZero() && now.Sub(st.Since) < time.Duration(c.MinInterval) {
		return *st, prev, false
	}
	switch {
	case want > prev && s.smoothed/float64(prev) > c.TargetUtilisation+c.Hysteresis:
		st.Reason = fmt.Sprintf("utilisation %.0f%% per recommended primary, above %.0f%% + %.0f%%", 100*s.smoothed/float64(prev), 100*c.TargetUtilisation, 100*c.Hysteresis)
	case want < prev && prev > 1 && s.smoothed/float64(prev-1) < c.TargetUtilisation-c.Hysteresis:
		st.Reason = fmt.Sprintf("utilisation would be %.0f%% with one primary fewer, below %.0f%% − %.0f%%", 100*s.smoothed/float64(prev-1), 100*c.TargetUtilisation, 100*c.Hysteresis)
	default:
		return *st, prev, false
	}
	st.Recommended, st.Since = want, now
	return *st, prev, true
}

// breakerOpen reports whether the backend's circuit breaker refuses
// requests now (without claiming a probe).
func (b *Backend) breakerOpen(now time.Time) bool {
	if k := b.Breaker(nil); k != nil {
		return k.Status(now).State == "open"
	}
	return false
}

// scaler evaluates every pool periodically and calls the webhook.
type scaler struct {
	cfg    ScalingConfig
	client *http.Client
	logger *zap.Logger
	stop   chan struct{}
	done   chan struct{}
}

func (s *scaler) run() {
	defer close(s.done)
	t := time.NewTicker(time.Duration(s.cfg.Every))
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			for _, p := range AllPools() {
				p.RefreshTiers(now)
				st, prev, changed := p.evaluateScaling(s.cfg, now)
				if !changed {
					continue
				}
				s.logger.Info("scaling recommendation changed", zap.String("pool", p.key), zap.Int("from", prev), zap.Int("to", st.Recommended), zap.String("reason", st.Reason))
				if s.cfg.Webhook != "" {
					go s.post(ScalingEvent{Pool: p.key, Members: p.Members(), Previous: prev, ScalingStatus: st})
				}
			}
		}
	}
}

// post sends one event to the webhook (one try, bounded; a failure is
// logged: the next change sends the state afresh).
func (s *scaler) post(ev ScalingEvent) {
	body, _ := json.Marshal(ev)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.cfg.Webhook, bytes.NewReader(body))
	if err != nil {
		s.logger.Error("scaling webhook", zap.Error(err))
		return
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := s.client.Do(req)
	if err != nil {
		s.logger.Error("scaling webhook failed", zap.String("pool", ev.Pool), zap.Error(err))
		return
	}
	res.Body.Close()
	if res.StatusCode >= 300 {
		s.logger.Error("scaling webhook refused", zap.String("pool", ev.Pool), zap.Int("status", res.StatusCode))
	}
}
