package selection

import (
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// healthKeys are the health subdirectives of transport aibalance (and of
// ai_proxy's top level):
//
//	circuit_breaker off | {
//	    consecutive_failures <n>
//	    failure_ratio        <0..1>
//	    failure_window       <duration>
//	    min_requests         <n>
//	    open_duration        <duration>
//	    max_open_duration    <duration>
//	    half_open_probes     <n>
//	    close_after          <n>
//	}
//	cooldown           <duration>          # after a 429/503 without Retry-After
//	max_cooldown       <duration>          # caps any Retry-After
//	slow_start         <window>|off [<min share>]
//	first_byte_timeout auto|off|<duration>
//	retry_status       <status...>|off     # answers retried on another backend
//	model_discovery    <interval>|off
//	outlier_ejection   off | [<factor>] [{    # a bare outlier_ejection: factor 3
//	    factor      <x>          # default 3
//	    max_ejected <percent>%   # default 50%
//	    duration    <duration>   # default 30s
//	}]
var healthKeys = map[string]bool{
	"circuit_breaker": true, "cooldown": true, "max_cooldown": true, "slow_start": true,
	"first_byte_timeout": true, "retry_status": true, "model_discovery": true, "outlier_ejection": true,
}

// DefaultOutlierFactor is outlier_ejection's factor when none is given.
const DefaultOutlierFactor = 3

// unmarshalHealth parses one health subdirective into t.Health, reporting
// whether it was one.
func (t *Transport) unmarshalHealth(d *caddyfile.Dispenser) (bool, error) {
	key := d.Val()
	if !healthKeys[key] {
		return t.unmarshalTopology(d)
	}
	if t.Health == nil {
		t.Health = new(aibalance.HealthConfig)
	}
	if t.seen == nil {
		t.seen = map[string]bool{}
	}
	if t.seen[key] {
		return true, d.Errf("%s already specified", key)
	}
	t.seen[key] = true
	h := t.Health
	args := d.RemainingArgs()
	one := func() (string, error) {
		if len(args) != 1 {
			return "", d.ArgErr()
		}
		return args[0], nil
	}
	switch key {
	case "circuit_breaker":
		if len(args) == 1 && args[0] == "off" {
			off := false
			h.Breaker = &off
			return true, nil
		}
		if len(args) > 0 {
			return true, d.Errf("circuit_breaker: want off or a block, got %q", args[0])
		}
		inner := map[string]bool{}
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			if inner[d.Val()] {
				return true, d.Errf("circuit_breaker: %s already specified", d.Val())
			}
			inner[d.Val()] = true
			if err := parseBreaker(d, h); err != nil {
				return true, err
			}
		}
		if len(inner) == 0 {
			return true, d.Err("circuit_breaker: want off or a block of options (the breaker is on by default)")
		}
	case "cooldown", "max_cooldown":
		v, err := one()
		if err != nil {
			return true, err
		}
		dur, err := positiveDuration(d, key, v)
		if err != nil {
			return true, err
		}
		if key == "cooldown" {
			h.Cooldown = dur
		} else {
			h.MaxCooldown = dur
		}
	case "slow_start":
		if len(args) == 0 || len(args) > 2 {
			return true, d.ArgErr()
		}
		if args[0] == "off" {
			if len(args) > 1 {
				return true, d.ArgErr()
			}
			h.SlowStart = -1
			return true, nil
		}
		dur, err := positiveDuration(d, key, args[0])
		if err != nil {
			return true, err
		}
		h.SlowStart = dur
		if len(args) == 2 {
			share, err := strconv.ParseFloat(args[1], 64)
			if err != nil || share <= 0 || share > 1 {
				return true, d.Errf("slow_start: the starting share must be above 0 and at most 1, got %q", args[1])
			}
			h.SlowStartMin = share
		}
	case "first_byte_timeout":
		v, err := one()
		if err != nil {
			return true, err
		}
		switch v {
		case "auto":
			h.FirstByteTimeout = 0
		case "off":
			h.FirstByteTimeout = -1
		default:
			dur, err := positiveDuration(d, key, v)
			if err != nil {
				return true, d.Errf("first_byte_timeout: want auto, off or a positive duration, got %q", v)
			}
			h.FirstByteTimeout = dur
		}
	case "retry_status":
		if len(args) == 0 {
			return true, d.ArgErr()
		}
		if len(args) == 1 && args[0] == "off" {
			h.RetryStatus = []int{0}
			return true, nil
		}
		h.RetryStatus = nil
		for _, a := range args {
			n, err := strconv.Atoi(a)
			if err != nil || n < 400 || n > 599 {
				return true, d.Errf("retry_status: want error statuses (400-599) or off, got %q", a)
			}
			h.RetryStatus = append(h.RetryStatus, n)
		}
	case "outlier_ejection":
		if len(args) == 1 && args[0] == "off" {
			h.OutlierFactor = 0
			return true, nil
		}
		if len(args) > 1 {
			return true, d.ArgErr()
		}
		h.OutlierFactor = DefaultOutlierFactor
		if len(args) == 1 {
			f, err := parseFactor(d, args[0])
			if err != nil {
				return true, err
			}
			h.OutlierFactor = f
		}
		inner := map[string]bool{}
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			key := d.Val()
			if inner[key] {
				return true, d.Errf("outlier_ejection: %s already specified", key)
			}
			inner[key] = true
			if !d.NextArg() {
				return true, d.ArgErr()
			}
			v := d.Val()
			if d.NextArg() {
				return true, d.ArgErr()
			}
			switch key {
			case "factor":
				f, err := parseFactor(d, v)
				if err != nil {
					return true, err
				}
				h.OutlierFactor = f
			case "max_ejected":
				n, err := strconv.Atoi(strings.TrimSuffix(v, "%"))
				if err != nil || n < 1 || n > 100 {
					return true, d.Errf("max_ejected: want a percentage from 1%% to 100%%, got %q", v)
				}
				h.MaxEjectedPercent = n
			case "duration":
				dur, err := positiveDuration(d, key, v)
				if err != nil {
					return true, err
				}
				h.EjectionDuration = dur
			default:
				return true, d.Errf("unrecognized outlier_ejection option %q", key)
			}
		}
	case "model_discovery":
		v, err := one()
		if err != nil {
			return true, err
		}
		if v == "off" {
			h.ModelsInterval = -1
			return true, nil
		}
		dur, err := positiveDuration(d, key, v)
		if err != nil {
			return true, d.Errf("model_discovery: want an interval such as 10s, or off, got %q", v)
		}
		h.ModelsInterval = dur
	}
	return true, nil
}

// parseBreaker parses one line of a circuit_breaker block.
func parseBreaker(d *caddyfile.Dispenser, h *aibalance.HealthConfig) error {
	key := d.Val()
	if !d.NextArg() {
		return d.ArgErr()
	}
	v := d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	count := func(target *int) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return d.Errf("%s: want a whole number of at least 1, got %q", key, v)
		}
		*target = n
		return nil
	}
	dur := func(target *caddy.Duration) error {
		x, err := positiveDuration(d, key, v)
		*target = x
		return err
	}
	switch key {
	case "consecutive_failures":
		return count(&h.ConsecutiveFailures)
	case "min_requests":
		return count(&h.MinRequests)
	case "half_open_probes":
		return count(&h.HalfOpenProbes)
	case "close_after":
		return count(&h.CloseAfter)
	case "failure_ratio":
		r, err := strconv.ParseFloat(v, 64)
		if err != nil || r <= 0 || r > 1 {
			return d.Errf("failure_ratio: want a share above 0 and at most 1, got %q", v)
		}
		h.FailureRatio = r
		return nil
	case "failure_window":
		return dur(&h.FailureWindow)
	case "open_duration":
		return dur(&h.OpenDuration)
	case "max_open_duration":
		return dur(&h.MaxOpenDuration)
	}
	return d.Errf("unrecognized circuit_breaker option %q", key)
}

func positiveDuration(d *caddyfile.Dispenser, key, v string) (caddy.Duration, error) {
	x, err := caddy.ParseDuration(v)
	if err != nil || x <= 0 {
		return 0, d.Errf("%s: want a positive duration such as 5s, got %q", key, v)
	}
	return caddy.Duration(min(x, 365*24*time.Hour)), nil
}

func parseFactor(d *caddyfile.Dispenser, v string) (float64, error) {
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f <= 1 || f > 1000 {
		return 0, d.Errf("outlier_ejection: the factor must be a number above 1, got %q", v)
	}
	return f, nil
}

// topologyKeys are the tier and zone subdirectives of transport aibalance
// (and of ai_proxy's top level):
//
//	tier               <n> <address...>     # standby tier (0: primary)
//	zone               <name> <address...>  # zone labels
//	standby_threshold  <0..1>|<percent>%    # default 80%
//	standby_hysteresis <duration>           # default 30s
//	zone_margin        [<percent>%] [<duration>]  # default 20%
var topologyKeys = map[string]bool{
	"tier": true, "zone": true, "standby_threshold": true, "standby_hysteresis": true, "zone_margin": true,
}

// unmarshalTopology parses one tier or zone subdirective into t.Topology,
// reporting whether it was one.
func (t *Transport) unmarshalTopology(d *caddyfile.Dispenser) (bool, error) {
	key := d.Val()
	if !topologyKeys[key] {
		return t.unmarshalLimits(d)
	}
	if t.Topology == nil {
		t.Topology = new(aibalance.Topology)
	}
	topo := t.Topology
	if t.seen == nil {
		t.seen = map[string]bool{}
	}
	if key != "tier" && key != "zone" {
		if t.seen[key] {
			return true, d.Errf("%s already specified", key)
		}
		t.seen[key] = true
	}
	args := d.RemainingArgs()
	switch key {
	case "tier", "zone":
		if len(args) < 2 {
			return true, d.Errf("%s: want %s <%s> <address...>", key, key, map[string]string{"tier": "n", "zone": "name"}[key])
		}
		for _, a := range args[1:] {
			if err := aibalance.CheckAddress(a); err != nil {
				return true, d.Errf("%s: %v", key, err)
			}
		}
		if key == "tier" {
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 0 || n > aibalance.MaxTier {
				return true, d.Errf("tier: want a number from 0 to %d, got %q", aibalance.MaxTier, args[0])
			}
			if topo.Tiers == nil {
				topo.Tiers = map[string]int{}
			}
			for _, a := range args[1:] {
				if _, dup := topo.Tiers[a]; dup {
					return true, d.Errf("tier: %s already has a tier", a)
				}
				topo.Tiers[a] = n
			}
			return true, nil
		}
		if topo.Zones == nil {
			topo.Zones = map[string]string{}
		}
		for _, a := range args[1:] {
			if _, dup := topo.Zones[a]; dup {
				return true, d.Errf("zone: %s already has a zone", a)
			}
			topo.Zones[a] = args[0]
		}
	case "standby_threshold":
		if len(args) != 1 {
			return true, d.ArgErr()
		}
		v, err := ParseShare(args[0])
		if err != nil || v <= 0 || v > 1 {
			return true, d.Errf("standby_threshold: want a utilisation from 0 to 1 or 1%% to 100%%, got %q", args[0])
		}
		topo.StandbyThreshold = v
	case "standby_hysteresis":
		if len(args) != 1 {
			return true, d.ArgErr()
		}
		v, err := caddy.ParseDuration(args[0])
		if err != nil || v <= 0 {
			return true, d.Errf("standby_hysteresis: want a positive duration, got %q", args[0])
		}
		topo.StandbyHysteresis = caddy.Duration(v)
	case "zone_margin":
		if len(args) < 1 || len(args) > 2 {
			return true, d.Errf("zone_margin: want <percent>%%, <duration> or both")
		}
		for _, a := range args {
			if strings.HasSuffix(a, "%") {
				v, err := strconv.ParseFloat(strings.TrimSuffix(a, "%"), 64)
				if err != nil || v < 0 || v > 10000 {
					return true, d.Errf("zone_margin: bad percentage %q", a)
				}
				topo.ZoneMargin = v / 100
				continue
			}
			v, err := caddy.ParseDuration(a)
			if err != nil || v < 0 {
				return true, d.Errf("zone_margin: want <percent>%% or a duration, got %q", a)
			}
			topo.ZoneMarginTime = caddy.Duration(v)
		}
	}
	return true, nil
}

// ParseShare reads a share written as 0.8 or 80%.
func ParseShare(s string) (float64, error) {
	if strings.HasSuffix(s, "%") {
		v, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
		return v / 100, err
	}
	return strconv.ParseFloat(s, 64)
}
