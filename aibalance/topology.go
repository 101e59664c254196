package aibalance

import (
	"fmt"
	"iter"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Priority tiers and zones.
//
// Tiers are standby capacity: tier 0 is primary, tier 1 gets traffic only
// while the tiers before it are saturated or out, and so on — a paid cloud
// endpoint behind self-hosted GPUs. A tier's utilisation is the mean of its
// members' (see Backend.Utilisation; a member that is out counts as full).
// The next tier opens when the utilisation of those open reaches the
// threshold, and closes once it has stayed below the threshold for the
// hysteresis, so a standby tier is not flapped on and off by every burst.
// When nothing of the open tiers is eligible for a request (all out, wrong
// model) the request may use any tier: the policy's panic level.
//
// Zones: each backend may carry a zone label and the Caddy instance its own
// (the global `aibalance { zone ... }`). Within a tier a backend of another
// zone is compared with its predicted time raised by the zone margin, so a
// same-zone backend keeps the traffic until its predicted time exceeds the
// best remote one's by that margin (Envoy's zone-aware routing, done on
// predicted latency instead of host counts). Without an instance zone,
// zones are only labels.

// Topology is a pool's tiers and zones (JSON under transport "topology").
type Topology struct {
	// Tiers maps an upstream address to its tier; absent: 0 (primary).
	Tiers map[string]int `json:"tiers,omitempty"`
	// Zones maps an upstream address to its zone label.
	Zones map[string]string `json:"zones,omitempty"`
	// StandbyThreshold is the utilisation (0..1) of the open tiers at which
	// the next one opens. Default 0.8.
	StandbyThreshold float64 `json:"standby_threshold,omitempty"`
	// StandbyHysteresis is how long the utilisation must stay below the
	// threshold before the last opened tier closes. Default 30s.
	StandbyHysteresis caddy.Duration `json:"standby_hysteresis,omitempty"`
	// ZoneMargin raises the predicted time of a backend outside the
	// instance's zone by this ratio (0.2: 20%) ...
	ZoneMargin float64 `json:"zone_margin,omitempty"`
	// ... plus this much time. Default (neither set): 20%.
	ZoneMarginTime caddy.Duration `json:"zone_margin_time,omitempty"`
}

// Topology defaults.
const (
	DefaultStandbyThreshold  = 0.8
	DefaultStandbyHysteresis = 30 * time.Second
	DefaultZoneMargin        = 0.2
)

// MaxTier bounds tier numbers.
const MaxTier = 9

// Validate checks the topology's values.
func (t *Topology) Validate() error {
	if t == nil {
		return nil
	}
	for a, n := range t.Tiers {
		if n < 0 || n > MaxTier {
			return fmt.Errorf("tier of %s must be from 0 to %d, got %d", a, MaxTier, n)
		}
	}
	for a, z := range t.Zones {
		if z == "" || len(z) > 64 {
			return fmt.Errorf("zone of %s must be 1 to 64 characters", a)
		}
	}
	if t.StandbyThreshold < 0 || t.StandbyThreshold > 1 || math.IsNaN(t.StandbyThreshold) {
		return fmt.Errorf("standby_threshold must be from 0 to 1, got %v", t.StandbyThreshold)
	}
	if t.StandbyHysteresis < 0 || t.ZoneMarginTime < 0 {
		return fmt.Errorf("standby_hysteresis and zone_margin must not be negative")
	}
	if t.ZoneMargin < 0 || t.ZoneMargin > 100 || math.IsNaN(t.ZoneMargin) {
		return fmt.Errorf("zone_margin must be from 0%% to 10000%%, got %v", t.ZoneMargin)
	}
	return nil
}

// withDefaults returns the topology with defaults applied.
func (t Topology) withDefaults() Topology {
	if t.StandbyThreshold == 0 {
		t.StandbyThreshold = DefaultStandbyThreshold
	}
	if t.StandbyHysteresis == 0 {
		t.StandbyHysteresis = caddy.Duration(DefaultStandbyHysteresis)
	}
	if t.ZoneMargin == 0 && t.ZoneMarginTime == 0 {
		t.ZoneMargin = DefaultZoneMargin
	}
	return t
}

// tierState is a pool's standby state.
type tierState struct {
	mu         sync.Mutex
	open       int       // highest open tier
	below      time.Time // since when the utilisation has been below the threshold (zero: it is not)
	checked    time.Time
	util       float64 // utilisation of the open tiers at the last check
	maxTier    int     // highest tier of any member
	openedAt   time.Time
	lastReason string
}

// SetTopology sets the pool's tiers and zones (defaults applied).
func (p *Pool) SetTopology(t Topology) {
	t = t.withDefaults()
	p.topology.Store(&t)
	highest := 0
	for _, n := range t.Tiers {
		highest = max(highest, n)
	}
	p.tiers.mu.Lock()
	p.tiers.maxTier = highest
	if p.tiers.lastReason == "" && highest > 0 {
		p.tiers.lastReason = fmt.Sprintf("standby tiers open when the tiers before them reach %.0f%% utilisation", 100*t.StandbyThreshold)
	}
	if p.tiers.open > highest {
		p.tiers.open = highest
	}
	p.tiers.mu.Unlock()
}

// Topology returns the pool's tiers and zones; defaults when unset.
func (p *Pool) Topology() *Topology {
	if p != nil {
		if t := p.topology.Load(); t != nil {
			return t
		}
	}
	d := Topology{}.withDefaults()
	return &d
}

// Tier is the tier of the upstream at addr (0 unless set).
func (p *Pool) Tier(addr string) int {
	if p == nil {
		return 0
	}
	if t := p.topology.Load(); t != nil {
		return t.Tiers[addr]
	}
	return 0
}

// Zone is the zone label of the upstream at addr ("" unless set).
func (p *Pool) Zone(addr string) string {
	if p == nil {
		return ""
	}
	if t := p.topology.Load(); t != nil {
		return t.Zones[addr]
	}
	return ""
}

// HasTiers reports whether any member is outside tier 0.
func (p *Pool) HasTiers() bool {
	if p == nil {
		return false
	}
	t := p.topology.Load()
	return t != nil && len(t.Tiers) > 0
}

// tierCheckEvery bounds how often a pool's utilisation is computed: it is
// a scan of the members, shared by the requests in between.
const tierCheckEvery = 100 * time.Millisecond

// OpenTier returns the highest tier that may take new requests now, given
// the members' utilisation (util returns a member's, 0..1+, and whether it
// is out). Computed at most every tierCheckEvery.
func (p *Pool) OpenTier(now time.Time, members iter.Seq[string], util func(addr string) (float64, bool)) int {
	if !p.HasTiers() {
		return 0
	}
	ts := &p.tiers
	if !ts.mu.TryLock() {
		return int(p.openTier.Load()) // another request is updating it
	}
	defer ts.mu.Unlock()
	if now.Sub(ts.checked) < tierCheckEvery {
		return ts.open
	}
	ts.checked = now
	topo := p.Topology()
	// utilisation of the tiers up to open, and of those up to open-1
	sum := make([]float64, ts.maxTier+1)
	n := make([]float64, ts.maxTier+1)
	for a := range members {
		t := topo.Tiers[a]
		u, out := util(a)
		if out {
			u = 1
		}
		sum[t] += min(u, 1)
		n[t]++
	}
	through := func(tier int) float64 {
		s, c := 0.0, 0.0
		for i := 0; i <= tier && i < len(sum); i++ {
			s, c = s+sum[i], c+n[i]
		}
		if c == 0 {
			return 1 // nothing there: as good as full
		}
		return s / c
	}
	thr := topo.StandbyThreshold
	ts.util = through(ts.open)
	switch {
	case ts.open < ts.maxTier && ts.util >= thr:
		ts.open++
		ts.openedAt, ts.below = now, time.Time{}
		ts.lastReason = fmt.Sprintf("tiers 0–%d at %.0f%% utilisation (threshold %.0f%%)", ts.open-1, 100*ts.util, 100*thr)
	case ts.open > 0 && through(ts.open-1) < thr:
		if ts.below.IsZero() {
			ts.below = now
		}
		if now.Sub(ts.below) >= time.Duration(topo.StandbyHysteresis) {
			ts.open--
			ts.below, ts.openedAt = time.Time{}, now
			ts.lastReason = fmt.Sprintf("tiers 0–%d below %.0f%% for %s", ts.open, 100*thr, time.Duration(topo.StandbyHysteresis))
		}
	default:
		ts.below = time.Time{}
	}
	p.openTier.Store(int32(ts.open))
	return ts.open
}

// RefreshTiers re-evaluates the open tier from the members' state (the
// app does it every second, so a standby tier closes after the hysteresis
// even when no request comes to ask).
func (p *Pool) RefreshTiers(now time.Time) {
	if !p.HasTiers() {
		return
	}
	p.OpenTier(now, slices.Values(p.Members()), func(addr string) (float64, bool) {
		b, ok := LookupBackend(addr)
		if !ok {
			return 1, true
		}
		return b.Load(now)
	})
}

// Load is the backend's utilisation (see Utilisation) for the tiers and
// the scaling signal, and whether it is out: draining, cooling down,
// ejected or its breaker open (then its utilisation counts as 1).
func (b *Backend) Load(now time.Time) (float64, bool) {
	if out, _, _ := b.Ejected(now); out || Draining(b.addr) || b.CoolingDown(now) || b.breakerOpen(now) {
		return 1, true
	}
	return b.Utilisation(now), false
}

// TierStatus is the pool's standby state for the admin view.
type TierStatus struct {
	Open        int       `json:"open_tier"`
	MaxTier     int       `json:"max_tier"`
	Utilisation float64   `json:"utilisation"`
	Reason      string    `json:"reason,omitempty"` // of the last change
	Since       time.Time `json:"since,omitzero"`   // of the last change
}

// Tiers returns the pool's standby state.
func (p *Pool) Tiers() TierStatus {
	ts := &p.tiers
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return TierStatus{Open: ts.open, MaxTier: ts.maxTier, Utilisation: ts.util, Reason: ts.lastReason, Since: ts.openedAt}
}

// ZoneFactor is what a predicted time on the upstream at addr is
// multiplied by, and what is added, for an instance in zone home: 1 and 0
// within the zone (or without zones).
func (p *Pool) ZoneFactor(home, addr string) (float64, time.Duration) {
	if home == "" || p == nil {
		return 1, 0
	}
	t := p.topology.Load()
	if t == nil {
		return 1, 0
	}
	z, ok := t.Zones[addr]
	if !ok || z == home {
		return 1, 0
	}
	return 1 + t.ZoneMargin, time.Duration(t.ZoneMarginTime)
}

// Utilisation is how busy the backend is, 0 (idle) to 1 (full) and beyond
// when requests queue: the engine's KV cache use and its queue when its
// metrics are fresh, the balancer's requests in flight against the batch
// size it learned otherwise (see Slots); 0 when neither is known.
func (b *Backend) Utilisation(now time.Time) float64 {
	s := b.State(now)
	u := s.KV
	if slots := float64(b.Slots(now)); slots > 0 {
		u = max(u, max(s.Inflight, s.Running)/slots)
	}
	if m, fresh := b.Engine(now); fresh && m.HasWaiting && m.Waiting > 0 {
		running := max(m.Running, 1)
		u = max(u, (running+m.Waiting)/running)
	}
	return u
}

// OpenTierNow is the highest tier open at the last check (see OpenTier).
func (p *Pool) OpenTierNow() int { return int(p.openTier.Load()) }
