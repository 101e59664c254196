// Package aicaddyfile is the Caddyfile front door of the aibalance plugin:
// the ai_proxy shortcut directive and the aibalance global option. (Named
// so it does not shadow Caddy's own caddyfile package.)
package aicaddyfile

import (
	"encoding/json"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/aibalance/caddy-aibalance/selection"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("ai_proxy", parseAIProxy)
	httpcaddyfile.RegisterDirectiveOrder("ai_proxy", httpcaddyfile.After, "reverse_proxy")
}

// Defaults ai_proxy gives the reverse_proxy it expands to, unless the block
// sets them itself.
const (
	// DefaultRequestBuffers lets a body of up to 16 MiB be replayed on a retry.
	DefaultRequestBuffers = 16 << 20
	// DefaultRetries is how many more upstreams are tried after a failure:
	// a dial error, a first-byte timeout, or an answer in the transport's
	// retry_status (429, 500, 502, 503, 504), each before any byte went to
	// the client. The client gets the last backend's own answer, or a
	// JSON error, when none is left.
	DefaultRetries = 2
)

// parseAIProxy sets up a reverse_proxy for LLM inference backends. Syntax:
//
//	ai_proxy [<upstreams...>] {
//	    # the plugin's own subdirectives
//	    policy  ai_predictive|least_tokens|weighted_least_conn [<weights...>]
//	    weights <w1> <w2> ...
//	    choose  <k>|all
//	    ttft_weight <w>
//	    affinity    prefix|session|header <name>|cookie <name>|none
//
//	    # the engines' Prometheus metrics (see transport aibalance)
//	    engine           auto|vllm|sglang|tgi|llamacpp|none
//	    metrics_path     <path>
//	    metrics_port     <port>
//	    metrics_interval <duration>
//	    metrics_timeout  <duration>
//
//	    # health (see transport aibalance; all on by default)
//	    circuit_breaker    off | { consecutive_failures <n> ... }
//	    cooldown           <duration>
//	    max_cooldown       <duration>
//	    slow_start         <window>|off [<min share>]
//	    first_byte_timeout auto|off|<duration>
//	    retry_status       <status...>|off
//	    model_discovery    <interval>|off
//
//	    # overload protection and per-key limits (see transport aibalance)
//	    admission  off | { max_queue <n>  max_wait <d>  key <key>  weight <value> <w>  priority_header <name>|off }
//	    rate_limit { key <key>  requests_per_minute <n>  tokens_per_minute <n>  max_keys <n> }
//
//	    # and every reverse_proxy subdirective, unchanged
//	}
//
// It expands to:
//
//	reverse_proxy <upstreams...> {
//	    lb_policy ai_predictive
//	    transport aibalance
//	    flush_interval -1
//	    request_buffers 16MiB
//	    lb_retries 2
//	}
//
// Health needs none of Caddy's passive health checks: the transport's
// circuit breaker, cooldowns and retry_status replace fail_duration and
// lb_retry_match (which would give the client an empty answer when its
// retries run out).
//
// Any of these the block writes itself wins, 0 included (lb_retries 0 turns
// retries off). A `transport` other than aibalance is rejected: the
// policies learn from it. A body larger than request_buffers is not
// retried once a backend read part of it (see selection.bodyGuard).
func parseAIProxy(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	d := h.Dispenser
	d.Next() // consume directive name
	header := d.Token()
	header.Text = "reverse_proxy"
	tokens := []caddyfile.Token{header}
	for d.NextArg() {
		tokens = append(tokens, d.Token())
	}
	open := header
	open.Text = "{"
	if n := len(tokens); n > 0 {
		open.Line = tokens[n-1].Line
	}
	tokens = append(tokens, open)

	var pol policyOptions
	var eng selection.Transport // the engine-metrics options given at the top level
	var engTok *caddyfile.Token // the first of them
	// the reverse_proxy subdirectives the block wrote: ai_proxy's defaults
	// apply only to the others, so a written 0 stays 0
	written := map[string]caddyfile.Token{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if handled, err := pol.parse(d); err != nil {
			return nil, err
		} else if handled {
			continue
		}
		tok := d.Token()
		if handled, err := eng.UnmarshalEngineOption(d); err != nil {
			return nil, err
		} else if handled {
			if engTok == nil {
				engTok = &tok
			}
			continue
		}
		seg := d.NextSegment()
		if seg[0].Text == "transport" && len(seg) > 1 && seg[1].Text != "aibalance" {
			return nil, errAt(seg[0], "ai_proxy: transport %s would stop the balancer from measuring its backends; put the http transport options inside `transport aibalance { ... }`", seg[1].Text)
		}
		if _, ok := written[seg[0].Text]; !ok {
			written[seg[0].Text] = seg[0]
		}
		tokens = append(tokens, seg...)
	}
	// the brace is made from the header, not copied from the last token: a
	// copy of a quoted argument would stay quoted, and a quoted "}" is
	// text, not the end of the block
	closing := header
	closing.Text, closing.Line = "}", tokens[len(tokens)-1].Line+1
	tokens = append(tokens, closing)

	rp := new(reverseproxy.Handler)
	rpd := caddyfile.NewDispenser(tokens)
	if err := rp.UnmarshalCaddyfile(rpd); err != nil {
		return nil, err
	}
	h.Dispenser = rpd
	if err := rp.FinalizeUnmarshalCaddyfile(h); err != nil {
		return nil, err
	}
	if len(rp.Upstreams) == 0 && rp.DynamicUpstreamsRaw == nil {
		return nil, errAt(header, "ai_proxy: no upstreams: give their addresses after ai_proxy (or with `to`), or a `dynamic` source in its block")
	}
	if err := applyDefaults(rp, &pol, written); err != nil {
		return nil, err
	}
	if engTok != nil {
		if err := applyEngine(*engTok, rp, &eng); err != nil {
			return nil, err
		}
	}
	return rp, nil
}

// errAt is an error that names tok's file and line, as d.Errf does at the
// dispenser's cursor: errors found once the whole block is read point at
// the line that caused them, not at the closing brace.
func errAt(tok caddyfile.Token, format string, args ...any) error {
	d := caddyfile.NewDispenser([]caddyfile.Token{tok})
	d.Next()
	return d.Errf(format, args...)
}

// applyEngine moves the engine-metrics options given at ai_proxy's top
// level into its transport, refusing one given in both places.
// tok is the first engine option, where errors point.
func applyEngine(tok caddyfile.Token, rp *reverseproxy.Handler, eng *selection.Transport) error {
	t := new(selection.Transport)
	if err := json.Unmarshal(rp.TransportRaw, t); err != nil {
		return errAt(tok, "ai_proxy: reading the transport: %v", err)
	}
	if (eng.Engine != "" && t.Engine != "") || (eng.MetricsPath != "" && t.MetricsPath != "") || (eng.MetricsPort != 0 && t.MetricsPort != 0) ||
		(eng.MetricsInterval != 0 && t.MetricsInterval != 0) || (eng.MetricsTimeout != 0 && t.MetricsTimeout != 0) {
		return errAt(tok, "ai_proxy: an engine option is given both in the block and in transport aibalance")
	}
	if eng.Health != nil && t.Health != nil {
		return errAt(tok, "ai_proxy: give the health options (circuit_breaker, cooldown, slow_start, first_byte_timeout, retry_status, model_discovery) either in the block or in transport aibalance, not both")
	}
	if eng.Health != nil {
		t.Health = eng.Health
	}
	if eng.Topology != nil && t.Topology != nil {
		return errAt(tok, "ai_proxy: give tier, zone, standby_threshold, standby_hysteresis and zone_margin either in the block or in transport aibalance, not both")
	}
	if eng.Topology != nil {
		t.Topology = eng.Topology
	}
	if err := t.Topology.Validate(); err != nil {
		return errAt(tok, "ai_proxy: %v", err)
	}
	if (eng.Admission != nil && t.Admission != nil) || (eng.RateLimit != nil && t.RateLimit != nil) {
		return errAt(tok, "ai_proxy: give admission and rate_limit either in the block or in transport aibalance, not both")
	}
	if eng.Admission != nil {
		t.Admission = eng.Admission
	}
	if eng.RateLimit != nil {
		t.RateLimit = eng.RateLimit
	}
	if eng.Engine != "" {
		t.Engine = eng.Engine
	}
	if eng.MetricsPath != "" {
		t.MetricsPath = eng.MetricsPath
	}
	if eng.MetricsPort != 0 {
		t.MetricsPort = eng.MetricsPort
	}
	if eng.MetricsInterval != 0 {
		t.MetricsInterval = eng.MetricsInterval
	}
	if eng.MetricsTimeout != 0 {
		t.MetricsTimeout = eng.MetricsTimeout
	}
	if err := t.CheckHealth(); err != nil {
		return errAt(tok, "ai_proxy: %v", err)
	}
	rp.TransportRaw = caddyconfig.JSONModuleObject(t, "protocol", "aibalance", nil)
	return nil
}

// policyOptions are the ai_proxy subdirectives that choose the policy,
// with the tokens that gave them (errors found later point at their line).
type policyOptions struct {
	name        string
	weights     []int
	choose      int // 0: not set
	chooseAll   bool
	ttftWeight  *float64
	affinity    string
	affinityKey string
	set         bool

	first, nameTok, weightsTok, chooseTok, ttftTok, affinityTok caddyfile.Token
}

// parse consumes one of the policy subdirectives, reporting whether it was one.
func (p *policyOptions) parse(d *caddyfile.Dispenser) (bool, error) {
	tok := d.Token()
	if !p.set {
		p.first = tok
	}
	switch d.Val() {
	case "policy":
		if p.name != "" {
			return true, d.Err("policy already specified")
		}
		if !d.NextArg() {
			return true, d.ArgErr()
		}
		p.name, p.nameTok = d.Val(), tok
		switch p.name {
		case "ai_predictive", "least_tokens", "weighted_least_conn":
		default:
			return true, d.Errf("unknown ai_proxy policy %q: want ai_predictive, least_tokens or weighted_least_conn (or use lb_policy for Caddy's own)", p.name)
		}
		if args := d.RemainingArgs(); len(args) > 0 {
			return true, p.setWeights(d, tok, args)
		}
	case "weights":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return true, d.ArgErr()
		}
		return true, p.setWeights(d, tok, args)
	case "choose":
		if p.choose != 0 || p.chooseAll {
			return true, d.Err("choose already specified")
		}
		var err error
		if p.choose, p.chooseAll, err = selection.ParseChoose(d); err != nil {
			return true, err
		}
		p.chooseTok = tok
	case "ttft_weight":
		if p.ttftWeight != nil {
			return true, d.Err("ttft_weight already specified")
		}
		w, err := selection.ParseTTFTWeight(d)
		if err != nil {
			return true, err
		}
		p.ttftWeight, p.ttftTok = &w, tok
	case "affinity":
		if p.affinity != "" {
			return true, d.Err("affinity already specified")
		}
		a, key, err := selection.ParseAffinity(d)
		if err != nil {
			return true, err
		}
		p.affinity, p.affinityKey, p.affinityTok = a, key, tok
	default:
		return false, nil
	}
	p.set = true
	return true, nil
}

// setWeights takes weights given either after `policy <name>` or by
// `weights` (tok).
func (p *policyOptions) setWeights(d *caddyfile.Dispenser, tok caddyfile.Token, args []string) error {
	if p.weights != nil {
		return d.Err("weights already specified")
	}
	w, err := selection.ParseWeights(d, args)
	if err != nil {
		return err
	}
	p.weights, p.weightsTok = w, tok
	p.set = true
	return nil
}

// selector builds the selection policy module the options describe.
func (p *policyOptions) selector(upstreams int) (json.RawMessage, error) {
	name := p.name
	if name == "" {
		name = "ai_predictive"
	}
	if p.weights != nil && upstreams == 0 {
		return nil, errAt(p.weightsTok, "ai_proxy: weights without upstreams: weights follow the order of the upstreams written after ai_proxy, and a dynamic source has none")
	}
	if p.weights != nil && len(p.weights) != upstreams {
		return nil, errAt(p.weightsTok, "ai_proxy: %d weights for %d upstreams: give one weight per upstream, in order", len(p.weights), upstreams)
	}
	var sel reverseproxy.Selector
	switch name {
	case "ai_predictive":
		sel = &selection.AIPredictiveSelection{Choose: p.choose, ChooseAll: p.chooseAll, Weights: p.weights, TTFTWeight: p.ttftWeight, Affinity: p.affinity, AffinityKey: p.affinityKey}
	case "least_tokens":
		sel = &selection.LeastTokensSelection{Weights: p.weights}
	case "weighted_least_conn":
		if p.weights == nil {
			return nil, errAt(p.nameTok, "ai_proxy: policy weighted_least_conn needs weights")
		}
		sel = &selection.WeightedLeastConnSelection{Weights: p.weights}
	}
	if (p.choose != 0 || p.chooseAll) && name != "ai_predictive" {
		return nil, errAt(p.chooseTok, "ai_proxy: choose applies to ai_predictive, not %s", name)
	}
	if p.ttftWeight != nil && name != "ai_predictive" {
		return nil, errAt(p.ttftTok, "ai_proxy: ttft_weight applies to ai_predictive, not %s", name)
	}
	if p.affinity != "" && name != "ai_predictive" {
		return nil, errAt(p.affinityTok, "ai_proxy: affinity applies to ai_predictive, not %s", name)
	}
	return caddyconfig.JSONModuleObject(sel, "policy", name, nil), nil
}

// applyDefaults gives rp ai_proxy's defaults for every setting the block
// did not write (written: the subdirectives it did, with their tokens), and
// checks the weights of a long-form lb_policy against the upstreams.
func applyDefaults(rp *reverseproxy.Handler, pol *policyOptions, written map[string]caddyfile.Token) error {
	if rp.TransportRaw == nil { // parseAIProxy let no other transport through
		rp.TransportRaw = caddyconfig.JSONModuleObject(new(selection.Transport), "protocol", "aibalance", nil)
	}
	if rp.LoadBalancing == nil {
		rp.LoadBalancing = new(reverseproxy.LoadBalancing)
	}
	lb := rp.LoadBalancing
	lbTok, longForm := written["lb_policy"]
	switch {
	case longForm && pol.set:
		return errAt(pol.first, "ai_proxy: use either lb_policy or policy/weights/choose/ttft_weight/affinity, not both")
	case longForm:
		if err := checkPolicyWeights(lbTok, lb.SelectionPolicyRaw, len(rp.Upstreams)); err != nil {
			return err
		}
	default:
		raw, err := pol.selector(len(rp.Upstreams))
		if err != nil {
			return err
		}
		lb.SelectionPolicyRaw = raw
	}
	_, retries := written["lb_retries"]
	_, tryDuration := written["lb_try_duration"]
	if !retries && !tryDuration {
		lb.Retries = DefaultRetries
	}
	if _, ok := written["flush_interval"]; !ok {
		rp.FlushInterval = caddy.Duration(-1)
	}
	if _, ok := written["request_buffers"]; !ok {
		rp.RequestBuffers = DefaultRequestBuffers
	}
	return nil
}

// checkPolicyWeights refuses a long-form lb_policy of the plugin (tok)
// whose weights the upstreams cannot match: more weights than upstreams,
// or weights with no static upstreams for the policies that give weights
// by address. The policy's own block cannot see the upstreams; its
// Provision checks the same for a hand-written reverse_proxy.
func checkPolicyWeights(tok caddyfile.Token, raw json.RawMessage, upstreams int) error {
	var pol struct {
		Policy  string `json:"policy"`
		Weights []int  `json:"weights"`
	}
	if json.Unmarshal(raw, &pol) != nil || len(pol.Weights) == 0 {
		return nil
	}
	switch pol.Policy {
	case "ai_predictive", "least_tokens", "weighted_least_conn":
	default:
		return nil
	}
	if upstreams == 0 && pol.Policy != "weighted_least_conn" {
		return errAt(tok, "ai_proxy: lb_policy %s has weights but there are no upstreams: weights follow the order of the upstreams written after ai_proxy, and a dynamic source has none", pol.Policy)
	}
	if upstreams > 0 && len(pol.Weights) > upstreams {
		return errAt(tok, "ai_proxy: lb_policy %s has %d weights for %d upstreams: give at most one weight per upstream, in order", pol.Policy, len(pol.Weights), upstreams)
	}
	return nil
}
