package selection

import (
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// gate passes a request of LLM work through the handler's rate limits and
// its admission queue (see aibalance.Admission), once: on its first
// selection. It waits while every backend of the pool is saturated, and
// returns the answer to give when the request may not go. Only the
// plugin's transport can give that answer, so without it nothing is
// limited or queued.
func (l *learner) gate(r *http.Request, f *aibalance.Features, pool reverseproxy.UpstreamPool) *aibalance.Reject {
	if f.Admitted || !l.ours || f.API == aibalance.APINone || len(pool) == 0 {
		return nil
	}
	f.Admitted = true
	now := time.Now()
	if lim := l.pool.Limiter(); lim.On() {
		ch, h, rej := lim.Take(r, f, now)
		f.RateHeaders = h
		if rej != nil {
			return rej
		}
		f.Charge = ch
	}
	adm := l.pool.Admission()
	if !adm.On() {
		return nil
	}
	if free, busy := l.slots(pool, now); !busy || (free && adm.Queued() == 0) {
		// a slot is free and nobody waits for it; or every backend is
		// out (cooling down, open, draining): none will free a slot by
		// finishing a request, and the policy answers (a 429 with the
		// cooldown's rest, a failover, a 503)
		return nil
	}
	t, rej := adm.Wait(r.Context(), r, f, now)
	if t != nil {
		f.Ticket = t
		return nil
	}
	f.Charge.Refund()
	if rej == nil { // the client left while waiting
		rej = &aibalance.Reject{Status: http.StatusServiceUnavailable, Type: aibalance.CodeOverloaded, Code: "canceled", Message: "the request was canceled while waiting for a backend"}
	}
	return rej
}

// slots reports whether some available backend of pool, in an open
// tier, has a free slot (it stops at the first), and whether some is
// busy: in, but full.
func (l *learner) slots(pool reverseproxy.UpstreamPool, now time.Time) (free, busy bool) {
	tiers := l.pool.HasTiers()
	open := l.pool.OpenTierNow()
	for _, u := range pool {
		if !u.Available() || (tiers && l.pool.Tier(u.Dial) > open) {
			continue
		}
		n, out := l.set.Get(u.Dial).FreeSlots(now)
		if out {
			continue
		}
		if n > 0 {
			return true, true
		}
		busy = true
	}
	return false, busy
}

// unmarshalLimits parses admission and rate_limit, reporting whether d
// was at one:
//
//	admission off | {
//	    max_queue       <n>
//	    max_wait        <duration>
//	    key             api_key|user|ip|header <name>
//	    weight          <key value> <w>
//	    priority_header <name>|off
//	}
//	rate_limit off | {
//	    key                 api_key|user|ip|header <name>
//	    requests_per_minute <n>
//	    tokens_per_minute   <n>
//	    max_keys            <n>
//	}
func (t *Transport) unmarshalLimits(d *caddyfile.Dispenser) (bool, error) {
	key := d.Val()
	if key != "admission" && key != "rate_limit" {
		return false, nil
	}
	if t.seen == nil {
		t.seen = map[string]bool{}
	}
	if t.seen[key] {
		return true, d.Errf("%s already specified", key)
	}
	t.seen[key] = true
	args := d.RemainingArgs()
	if key == "admission" {
		a := new(aibalance.AdmissionConfig)
		t.Admission = a
		switch {
		case len(args) == 1 && args[0] == "off":
			a.Off = true
			if d.NextBlock(d.Nesting()) {
				return true, d.Err("admission off takes no block")
			}
			return true, nil
		case len(args) > 0:
			return true, d.Errf("admission: want `off` or a block, got %q", args[0])
		}
		once := map[string]bool{}
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			sub := d.Val()
			vals := d.RemainingArgs()
			if sub != "weight" {
				if once[sub] {
					return true, d.Errf("admission %s already specified", sub)
				}
				once[sub] = true
			}
			one := func() (string, error) {
				if len(vals) != 1 {
					return "", d.Errf("admission %s: want one value", sub)
				}
				return vals[0], nil
			}
			switch sub {
			case "max_queue":
				v, err := one()
				if err != nil {
					return true, err
				}
				n, err := strconv.Atoi(v)
				if err != nil || n < 1 || n > aibalance.MaxQueueLimit {
					return true, d.Errf("admission max_queue: want a count from 1 to %d, got %q", aibalance.MaxQueueLimit, v)
				}
				a.MaxQueue = n
			case "max_wait":
				v, err := one()
				if err != nil {
					return true, err
				}
				dur, err := caddy.ParseDuration(v)
				if err != nil || dur <= 0 || dur > aibalance.MaxWaitLimit {
					return true, d.Errf("admission max_wait: want a positive duration up to %s, got %q", aibalance.MaxWaitLimit, v)
				}
				a.MaxWait = caddy.Duration(dur)
			case "key":
				k, err := parseKey(d, vals)
				if err != nil {
					return true, err
				}
				a.Key = k
			case "weight":
				if len(vals) != 2 {
					return true, d.Err("admission weight: want weight <key value> <w>")
				}
				w, err := strconv.ParseFloat(vals[1], 64)
				if err != nil || !(w > 0) || math.IsInf(w, 0) {
					return true, d.Errf("admission weight: want a positive number, got %q", vals[1])
				}
				if a.Weights == nil {
					a.Weights = map[string]float64{}
				}
				if _, dup := a.Weights[vals[0]]; dup {
					return true, d.Errf("admission weight of %q already specified", vals[0])
				}
				a.Weights[vals[0]] = w
			case "priority_header":
				v, err := one()
				if err != nil {
					return true, err
				}
				if v == "off" {
					v = "-"
				}
				a.PriorityHeader = v
			default:
				return true, d.Errf("unrecognized admission option %q", sub)
			}
		}
		if err := a.Check(); err != nil {
			return true, d.Err(err.Error())
		}
		return true, nil
	}
	if len(args) == 1 && args[0] == "off" {
		if d.NextBlock(d.Nesting()) {
			return true, d.Err("rate_limit off takes no block")
		}
		return true, nil // no limits: the default, said explicitly
	}
	if len(args) > 0 {
		return true, d.Errf("rate_limit: want `off` or a block, got %q", args[0])
	}
	rl := new(aibalance.RateLimitConfig)
	t.RateLimit = rl
	once := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		vals := d.RemainingArgs()
		if once[sub] {
			return true, d.Errf("rate_limit %s already specified", sub)
		}
		once[sub] = true
		if sub == "key" {
			k, err := parseKey(d, vals)
			if err != nil {
				return true, err
			}
			rl.Key = k
			continue
		}
		if len(vals) != 1 {
			return true, d.Errf("rate_limit %s: want one value", sub)
		}
		n, err := strconv.Atoi(vals[0])
		if err != nil || n < 1 {
			return true, d.Errf("rate_limit %s: want a positive count, got %q", sub, vals[0])
		}
		switch sub {
		case "requests_per_minute":
			rl.RequestsPerMinute = n
		case "tokens_per_minute":
			rl.TokensPerMinute = n
		case "max_keys":
			rl.MaxKeys = n
		default:
			return true, d.Errf("unrecognized rate_limit option %q", sub)
		}
	}
	if err := rl.Check(); err != nil {
		return true, d.Err(err.Error())
	}
	return true, nil
}

// parseKey parses a key's arguments: api_key, user, ip or header <name>.
func parseKey(d *caddyfile.Dispenser, vals []string) (*aibalance.KeySpec, error) {
	k := new(aibalance.KeySpec)
	switch {
	case len(vals) == 2 && vals[0] == "header":
		k.Source, k.Header = "header", vals[1]
	case len(vals) == 1 && vals[0] != "header":
		k.Source = vals[0]
	default:
		return nil, d.Err("key: want api_key, user, ip or header <name>")
	}
	if err := k.Check(); err != nil {
		return nil, d.Err(err.Error())
	}
	return k, nil
}
