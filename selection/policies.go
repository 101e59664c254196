package selection

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

func init() {
	caddy.RegisterModule(new(AIPredictiveSelection))
	caddy.RegisterModule(new(LeastTokensSelection))
	caddy.RegisterModule(new(WeightedLeastConnSelection))
}

// maxChoose bounds power-of-k sampling; beyond it, scanning all is as
// cheap. It is also the default k: every backend of a pool up to 16 is
// compared.
const maxChoose = 16

// AIPredictiveSelection is a policy that sends each request to the upstream
// predicted to complete it soonest: for each candidate, the upstream's
// learned latency model (see package aibalance) predicts time to first token
// plus this request's expected output tokens times the time per output
// token, given the upstream's queue, batch and pending prompt tokens and
// this request's prompt size. For streaming requests the time to first
// token counts ttft_weight more times (see TTFTWeight). The score is
// divided by the upstream's weight.
//
// Candidates are every available upstream of a pool up to k (default 16),
// and in a larger pool k sampled at random plus the previous winner (power
// of k choices with memory; Mitzenmacher, "The Power of Two Choices in
// Randomized Load Balancing", and Mitzenmacher, Prabhakar and Shah, "Load
// balancing with memory"), which keeps the cost O(k); or all of them with
// `choose all`. A small k (choose 2) spreads the simultaneous decisions of
// several Caddy instances that do not see each other's requests, at a
// price: a sample of 2 in a pool of 4 often holds no fast backend with a
// slot, and a long answer then runs on the slowest.
// Ties are broken at random. Upstreams the model has not learned yet are
// predicted from pool-wide averages scaled by their own load, so a new
// upstream is tried at once but not flooded.
//
// It learns from the aibalance transport (`transport aibalance`); without it
// the policy sees only Caddy's request counts and behaves like a randomized
// least-connections.
//
//	lb_policy ai_predictive {
//	    choose      <k>|all
//	    weights     <w1> <w2> ...
//	    ttft_weight <w>
//	    affinity    prefix|session|header <name>|cookie <name>|none
//	}
type AIPredictiveSelection struct {
	// How many available upstreams to sample and compare for each request
	// in a pool larger than that (a smaller one is compared whole).
	// Default: 16.
	Choose int `json:"choose,omitempty"`
	// Compare every available upstream instead of a sample.
	ChooseAll bool `json:"choose_all,omitempty"`
	// Weights, in the order of the upstreams, divide the predicted time:
	// an upstream of weight 2 is chosen until its predicted time is twice
	// another's. 0 never selects the upstream. Missing weights are 1.
	Weights []int `json:"weights,omitempty"`

	// For streaming requests, how many times more the predicted time to
	// first token counts in the score: score = (1+w)·TTFT + output
	// tokens·TPOT. A streaming user sees the first token long before the
	// last, and queueing shows up first in the first token, so weighting it
	// keeps requests off backends whose batch is full even when their
	// decode speed would win on total time. Non-streaming requests are
	// scored by completion time alone. 0 scores streams by completion time
	// too. Default: 8.
	TTFTWeight *float64 `json:"ttft_weight,omitempty"`

	// Affinity is how the prompt prefix each backend already holds in its
	// cache counts: prefix (the default) estimates, per candidate, the
	// leading prompt tokens it holds from what was recently sent to it,
	// and predicts the time to first token from the uncached rest, so
	// affinity and load are weighed in one score; near-equal candidates
	// are then told apart by a hash of the request's prefix, so several
	// Caddy instances send a conversation to the same backend. A
	// request's prompt_cache_key is a session key in every mode but none.
	// session also keys sessions by the OpenAI user field or Anthropic's
	// metadata.user_id; header and cookie by the request header or cookie
	// named by AffinityKey: a session's next request is expected to start
	// with its latest one's prompt, held where that one went. none ignores
	// prefixes and sessions.
	Affinity string `json:"affinity,omitempty"`
	// AffinityKey names the header or cookie of affinity header|cookie.
	AffinityKey string `json:"affinity_key,omitempty"`

	ttftWeight float64
	affinity   bool
	learner
	clock func() time.Time
}

// DefaultTTFTWeight is ai_predictive's ttft_weight when none is set.
const DefaultTTFTWeight = 8

// CaddyModule returns the Caddy module information.
func (*AIPredictiveSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.selection_policies.ai_predictive",
		New: func() caddy.Module { return new(AIPredictiveSelection) },
	}
}

// Provision sets defaults and takes references to the handler's upstreams.
// It refuses weights the handler's upstreams cannot match, and warns when
// the handler's transport is not aibalance (nothing to learn from).
func (p *AIPredictiveSelection) Provision(ctx caddy.Context) error {
	if p.Choose == 0 {
		p.Choose = maxChoose
	}
	p.ttftWeight = DefaultTTFTWeight
	if p.TTFTWeight != nil {
		p.ttftWeight = *p.TTFTWeight
	}
	if p.clock == nil {
		p.clock = time.Now
	}
	p.affinity = p.Affinity != AffinityNone
	if err := p.learner.provision(ctx, "ai_predictive", p.Weights); err != nil {
		return err
	}
	p.pool.SetAffinity(p.affinity)
	return nil
}

// Affinity modes.
const (
	AffinityPrefix  = "prefix"
	AffinitySession = "session"
	AffinityHeader  = "header"
	AffinityCookie  = "cookie"
	AffinityNone    = "none"
)

// Validate checks the configuration.
func (p *AIPredictiveSelection) Validate() error {
	if p.Choose < 1 || p.Choose > maxChoose {
		return fmt.Errorf("ai_predictive: choose must be between 1 and %d (or all), got %d", maxChoose, p.Choose)
	}
	if p.ttftWeight < 0 || p.ttftWeight > 1000 {
		return fmt.Errorf("ai_predictive: ttft_weight must be between 0 and 1000, got %g", p.ttftWeight)
	}
	switch p.Affinity {
	case "", AffinityPrefix, AffinitySession, AffinityNone:
		if p.AffinityKey != "" {
			return fmt.Errorf("ai_predictive: affinity_key applies to affinity header or cookie, not %q", p.Affinity)
		}
	case AffinityHeader, AffinityCookie:
		if p.AffinityKey == "" {
			return fmt.Errorf("ai_predictive: affinity %s needs the %s's name (affinity_key)", p.Affinity, p.Affinity)
		}
	default:
		return fmt.Errorf("ai_predictive: affinity must be prefix, session, header, cookie or none, got %q", p.Affinity)
	}
	return validateWeights("ai_predictive", p.Weights)
}

// Cleanup releases the store references.
func (p *AIPredictiveSelection) Cleanup() error {
	p.set.Release()
	if p.pool != nil {
		aibalance.ReleasePool(p.pool.Key())
	}
	return nil
}

// Select returns the available upstream predicted to finish the request
// first, or nil if none is available.
//
// A candidate's score is its model's optimistic prediction (see
// aibalance.Optimistic: uncertainty earns a bounded bonus, so what the
// balancer has not observed gets tried), divided by its weight and by the
// share of its recent attempts that succeeded: with failure rate p, a
// request needs 1/(1-p) attempts there on average, so a backend that
// answers every request with a fast 429 or 500 never looks idle. Backends
// that asked for a pause with Retry-After, and backends this request has
// already failed on, are skipped while another is eligible.
//
// Scores fall in tiers before times are compared: backends predicted to
// meet the request's SLO headers (X-SLO-TTFT-Ms, X-SLO-E2E-Ms) before those
// predicted to miss them, and among each, backends with a free batch slot
// before full ones (a known capacity reached, the capacity another engine
// of the pool showed exceeded by one whose own is unknown, or the engine
// queueing on a full KV cache): the completion-time optimum alone parks
// requests in a fast engine's queue while a slower one has a slot free,
// and the first-token tail is those waits.
func (p *AIPredictiveSelection) Select(pool reverseproxy.UpstreamPool, r *http.Request, _ http.ResponseWriter) *reverseproxy.Upstream {
	f := p.app.Features(r)
	if !p.body.allow(r) {
		return nil
	}
	if rej := p.gate(r, f, pool); rej != nil {
		return p.answer(r, f, rej, pool)
	}
	now := p.clock()
	c := p.begin(r, f, now)
	prior := p.pool.Prior()
	factor := 1.0
	if f.Stream {
		factor += p.ttftWeight
	}
	out := float64(f.OutputTokens)
	blockTokens := p.app.BlockTokens()
	if p.affinity {
		f.SessionKey = p.sessionKey(r, f)
	}
	affinity := p.affinity && (len(f.PrefixHashes) > 0 || f.SessionKey != 0)
	home := p.app.Zone
	if affinity {
		c.key = affinityKey(f)
		c.held = func(u *reverseproxy.Upstream) int { return p.set.Get(u.Dial).CachedTokens(f, blockTokens) }
	}
	sloTTFT, sloE2E := aibalance.SLO(r)
	// A backend whose batch capacity is not known has proven the largest
	// batch it ran; one request at a time may probe beyond it (its first
	// token raises the batch seen or shows the limit). Once an engine of
	// the pool has shown its limit, engines of one pool being mostly
	// configured alike, the others are taken to have that capacity
	// (or the batch they ran, when more) and probe no further.
	poolSlots := -1.0
	unproven := func(b *aibalance.Backend) float64 {
		if poolSlots < 0 {
			poolSlots = 0
			for _, u := range pool {
				poolSlots = max(poolSlots, float64(p.set.Get(u.Dial).Capacity(now)))
			}
		}
		seen := float64(b.BatchSeen())
		if poolSlots > 0 {
			return max(poolSlots, seen)
		}
		return seen + 1
	}
	score := func(u *reverseproxy.Upstream) float64 {
		b := p.set.Get(u.Dial)
		s := b.State(now)
		// Caddy's own count covers requests proxied without our transport
		s.Inflight = max(s.Inflight, float64(u.NumRequests()))
		// tiers, in order: a backend predicted to meet the request's
		// targets, then one with a free batch slot, then one whose slot
		// is only assumed free (beyond the batch it ran, no capacity known
		// in the pool: the wait for a slot is a first-token tail no
		// completion-time gain is worth), then a full one, then the best
		// time
		tier := 0.0
		full := b.Full(s, now)
		if !full && b.Capacity(now) == 0 {
			if slots := unproven(b); s.Streams+1 > slots {
				wait := b.SlotWait(s.Streams+1-slots, slots)
				if poolSlots > 0 {
					// beyond the capacity the pool's engines showed: as
					// full as they are, waiting as long as its queue says
					full = true
					s.QueueWait = max(s.QueueWait, wait)
				} else {
					// among backends all beyond what they have shown (a
					// burst before any limit is known), the one whose slot
					// would free soonest if that were all it has
					tier = unprovenPenalty + wait
				}
			}
		}
		if full {
			tier = fullPenalty
		}
		prompt := f.PromptTokens
		if affinity {
			prompt -= b.CachedTokens(f, blockTokens)
		}
		m := b.Model()
		mean, sd := m.Score(s, prompt, out, factor, prior, now)
		score := aibalance.Optimistic(mean, sd)
		if home != "" {
			// another zone's backend is compared on its predicted time
			// plus the margin, without the benefit of the doubt an
			// uncertain prediction gets: it is not explored for its own sake
			if zf, za := zone(p.pool, home, u); zf != 1 || za != 0 {
				score = mean*zf + za
			}
		}
		score /= (1 - min(b.FailureRate(now), maxFailureRate)) * p.pool.Weight(u.Dial)
		score += tier
		if sloTTFT > 0 || sloE2E > 0 {
			ttft, tpot := m.PredictSeconds(s, prompt, prior, now)
			if (sloTTFT > 0 && ttft > sloTTFT) || (sloE2E > 0 && ttft+out*tpot > sloE2E) {
				score += sloPenalty
			}
		}
		return late(score, f, b, now)
	}
	var best *reverseproxy.Upstream
	// a request whose prefix some backend holds compares every backend
	// of a pool up to maxChoose: the holder must be among the candidates
	if p.ChooseAll || len(pool) <= p.Choose || f.Ticket != nil || (affinity && len(pool) <= maxChoose && p.held(pool, f)) {
		best = c.pick(pool, score, nil, 0)
	} else {
		best = c.pick(pool, score, p.pool.Last(), p.Choose)
	}
	return p.finish(&c, pool, best)
}

// sessionKey is the request's session key under the policy's affinity:
// its prompt_cache_key, else (session) its user, (header) the header,
// (cookie) the cookie; 0 when none.
func (p *AIPredictiveSelection) sessionKey(r *http.Request, f *aibalance.Features) uint64 {
	if f.PromptCacheKey != "" {
		return hashKey("pck\x00" + f.PromptCacheKey)
	}
	var v string
	switch p.Affinity {
	case AffinitySession:
		v = f.User
	case AffinityHeader:
		v = r.Header.Get(p.AffinityKey)
	case AffinityCookie:
		if c, err := r.Cookie(p.AffinityKey); err == nil {
			v = c.Value
		}
	}
	if v == "" {
		return 0
	}
	return hashKey(p.Affinity + "\x00" + v)
}

// hashKey hashes a session key (FNV-1a, mixed), never 0.
func hashKey(s string) uint64 { return aibalance.Mix64(aibalance.FNV64(s)) | 1 }

// held reports whether some upstream of pool holds a leading block of f's
// prompt (see aibalance.Backend.CachedTokens).
func (p *AIPredictiveSelection) held(pool reverseproxy.UpstreamPool, f *aibalance.Features) bool {
	for _, u := range pool {
		if p.set.Get(u.Dial).HoldsPrefix(f) {
			return true
		}
	}
	return false
}

// maxFailureRate bounds the failure penalty at ×100.
const maxFailureRate = 0.99

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	ai_predictive {
//	    choose      <k>|all
//	    weights     <w1> <w2> ...
//	    ttft_weight <w>
//	}
func (p *AIPredictiveSelection) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume policy name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "choose":
			if p.Choose != 0 || p.ChooseAll {
				return d.Err("choose already specified")
			}
			var err error
			if p.Choose, p.ChooseAll, err = ParseChoose(d); err != nil {
				return err
			}
		case "weights":
			if p.Weights != nil {
				return d.Err("weights already specified")
			}
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			w, err := ParseWeights(d, args)
			if err != nil {
				return err
			}
			p.Weights = w
		case "ttft_weight":
			if p.TTFTWeight != nil {
				return d.Err("ttft_weight already specified")
			}
			w, err := ParseTTFTWeight(d)
			if err != nil {
				return err
			}
			p.TTFTWeight = &w
		case "affinity":
			if p.Affinity != "" {
				return d.Err("affinity already specified")
			}
			a, key, err := ParseAffinity(d)
			if err != nil {
				return err
			}
			p.Affinity, p.AffinityKey = a, key
		default:
			return d.Errf("unrecognized ai_predictive subdirective %q", d.Val())
		}
	}
	return nil
}

// LeastTokensSelection is a policy that selects the available upstream with
// the fewest estimated tokens in flight per unit of weight: prompt plus
// expected output tokens of every request it is serving, as counted by the
// aibalance transport. Unlike least_conn it knows that a request with a
// 6000-token prompt and 1000 output tokens is not the same load as a
// 50-token chat turn. Ties go to fewer requests, then at random. Without
// `transport aibalance` no tokens are counted and it is least_conn.
//
//	lb_policy least_tokens [<w1> <w2> ...]
type LeastTokensSelection struct {
	// Weights, in the order of the upstreams; missing weights are 1, 0 never
	// selects the upstream.
	Weights []int `json:"weights,omitempty"`

	learner
}

// CaddyModule returns the Caddy module information.
func (*LeastTokensSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.selection_policies.least_tokens",
		New: func() caddy.Module { return new(LeastTokensSelection) },
	}
}

// Provision takes references to the handler's upstreams. It refuses
// weights the handler's upstreams cannot match, and warns when the
// handler's transport is not aibalance (no tokens counted).
func (p *LeastTokensSelection) Provision(ctx caddy.Context) error {
	return p.learner.provision(ctx, "least_tokens", p.Weights)
}

// Validate checks the configuration.
func (p *LeastTokensSelection) Validate() error { return validateWeights("least_tokens", p.Weights) }

// Cleanup releases the store references.
func (p *LeastTokensSelection) Cleanup() error {
	p.set.Release()
	if p.pool != nil {
		aibalance.ReleasePool(p.pool.Key())
	}
	return nil
}

// Select returns the available upstream with the fewest tokens in flight
// per unit of weight, skipping (while another is eligible) upstreams in a
// Retry-After cooldown and those this request already failed on.
func (p *LeastTokensSelection) Select(pool reverseproxy.UpstreamPool, r *http.Request, _ http.ResponseWriter) *reverseproxy.Upstream {
	f := p.app.Features(r) // read where the loop's own request is seen, for the transport
	if !p.body.allow(r) {
		return nil
	}
	if rej := p.gate(r, f, pool); rej != nil {
		return p.answer(r, f, rej, pool)
	}
	now := time.Now()
	c := p.begin(r, f, now)
	add := float64(f.Tokens())
	best := c.pick(pool, func(u *reverseproxy.Upstream) float64 {
		b := p.set.Get(u.Dial)
		_, tokens := b.Inflight()
		// the tokens it would have with this request; requests break
		// ties, a fraction of a token each
		score := (float64(tokens) + add + float64(u.NumRequests())/(1<<20)) / p.pool.Weight(u.Dial)
		if zf, _ := zone(p.pool, p.app.Zone, u); zf != 1 {
			score *= zf // tokens have no time: the margin's ratio only
		}
		return late(score, f, b, now)
	}, nil, 0)
	return p.finish(&c, pool, best)
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	least_tokens [<w1> <w2> ...]
func (p *LeastTokensSelection) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume policy name
	w, err := ParseWeights(d, d.RemainingArgs())
	if err != nil {
		return err
	}
	p.Weights = w
	if d.NextBlock(d.Nesting()) {
		return d.Err("least_tokens takes no block")
	}
	return nil
}

// WeightedLeastConnSelection is a policy that selects the available upstream
// with the highest weight / (active requests + 1), as Envoy's least_request
// balancer does with unequal weights; Caddy itself has weights only for
// round robin. Active requests are Caddy's own counts, so it needs no
// other module. Ties are broken at random.
//
//	lb_policy weighted_least_conn <w1> <w2> ...
type WeightedLeastConnSelection struct {
	// Weights, in the order of the upstreams; missing weights are 1, 0 never
	// selects the upstream.
	Weights []int `json:"weights,omitempty"`

	body bodyGuard
	set  aibalance.BackendSet
	pool *aibalance.Pool
}

// CaddyModule returns the Caddy module information.
func (*WeightedLeastConnSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.selection_policies.weighted_least_conn",
		New: func() caddy.Module { return new(WeightedLeastConnSelection) },
	}
}

// Provision refuses more weights than the handler has static upstreams
// and reads its request_buffers.
func (p *WeightedLeastConnSelection) Provision(ctx caddy.Context) error {
	if err := checkWeights(ctx, "weighted_least_conn", p.Weights, false); err != nil {
		return err
	}
	p.body = newBodyGuard(ctx)
	// its health (breaker, cooldown, slow start) is the pool's, as for
	// the other policies
	p.pool = aibalance.AcquirePool(aibalance.HandlerPoolKey(ctx))
	for _, addr := range aibalance.HandlerUpstreams(ctx) {
		p.set.Get(addr)
	}
	return nil
}

// Cleanup releases the store references.
func (p *WeightedLeastConnSelection) Cleanup() error {
	p.set.Release()
	if p.pool != nil {
		aibalance.ReleasePool(p.pool.Key())
	}
	return nil
}

// Validate checks the configuration.
func (p *WeightedLeastConnSelection) Validate() error {
	return validateWeights("weighted_least_conn", p.Weights)
}

// Select returns the available upstream with the most weight per active
// request, skipping upstreams this request already failed on while another
// is eligible.
func (p *WeightedLeastConnSelection) Select(pool reverseproxy.UpstreamPool, r *http.Request, _ http.ResponseWriter) *reverseproxy.Upstream {
	if !p.body.allow(r) {
		return nil
	}
	c := candidates{weights: p.Weights, upstreams: pool, tried: aibalance.RequestTried(r), now: time.Now(), f: aibalance.CachedFeatures(r)}
	if p.pool != nil { // nil only when used outside a Caddy config
		c.set, c.health = &p.set, p.pool.Health()
	}
	return c.pick(pool, func(u *reverseproxy.Upstream) float64 {
		return float64(u.NumRequests()+1) / c.weight(u)
	}, nil, 0)
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	weighted_least_conn <w1> <w2> ...
func (p *WeightedLeastConnSelection) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume policy name
	args := d.RemainingArgs()
	if len(args) == 0 {
		return d.ArgErr()
	}
	w, err := ParseWeights(d, args)
	if err != nil {
		return err
	}
	p.Weights = w
	if d.NextBlock(d.Nesting()) {
		return d.Err("weighted_least_conn takes no block")
	}
	return nil
}

// learner is what the policies that learn from transport aibalance share:
// the app, the handler's backends and pool, its retry settings and its
// request_buffers.
type learner struct {
	app    *aibalance.App
	set    aibalance.BackendSet
	pool   *aibalance.Pool
	body   bodyGuard
	budget retryBudget
	ours   bool // the handler's transport is aibalance: it gives the policy's own answers
	logger *zap.Logger
}

// provision refuses weights the handler's upstreams cannot match, warns
// when the transport is another, reads the handler's request_buffers and
// retry settings, loads the aibalance app, takes references to the
// handler's static upstreams before the old config lets go of them (a
// newcomer to a pool that already serves starts slowly), and takes the
// handler's pool, giving it the weights by address.
func (l *learner) provision(ctx caddy.Context, policy string, weights []int) error {
	if err := checkWeights(ctx, policy, weights, true); err != nil {
		return err
	}
	l.ours = !warnWithoutTransport(ctx, policy)
	l.body = newBodyGuard(ctx)
	l.budget = newRetryBudget(ctx)
	l.logger = ctx.Logger()
	app, err := aibalance.Load(ctx)
	if err != nil {
		return err
	}
	l.app = app
	addrs := aibalance.HandlerUpstreams(ctx)
	for _, addr := range addrs {
		l.set.Get(addr)
	}
	l.set.RampNewcomers(addrs, time.Now())
	l.pool = aibalance.AcquirePool(aibalance.HandlerPoolKey(ctx))
	byAddr := map[string]float64{}
	for i, addr := range addrs {
		l.pool.AddMember(addr)
		if i < len(weights) {
			byAddr[addr] = float64(weights[i])
		}
	}
	l.pool.SetWeights(byAddr)
	return nil
}

// begin counts a selection of the request and returns its candidates.
func (l *learner) begin(r *http.Request, f *aibalance.Features, now time.Time) candidates {
	aibalance.SetRequestPool(r, l.pool)
	f.Selects++
	if f.Start.IsZero() {
		f.Start = now
	}
	f.Reject = nil
	return candidates{pool: l.pool, set: &l.set, now: now, f: f, tried: &f.Tried, health: l.pool.Health(), logger: l.logger}
}

// finish returns best, or, when there is none, lets the transport answer
// for the policy (see candidates.reject): at once for a model no backend
// serves and for a pool that is all cooling down, and on the request's
// last attempt otherwise; until then nil lets Caddy wait and try again
// (lb_try_duration). Another transport cannot answer: nil.
func (l *learner) finish(c *candidates, pool reverseproxy.UpstreamPool, best *reverseproxy.Upstream) *reverseproxy.Upstream {
	if best != nil && l.ours {
		// counted in flight from now, not from when the transport
		// begins: requests of a burst scored in between see it
		if old := c.f.Reserved; old != nil {
			old.Unreserve(c.f)
		}
		b := l.set.Get(best.Dial)
		b.Reserve(c.f, c.now)
		c.f.Reserved = b
	}
	if best != nil || !l.ours {
		return best
	}
	rej := c.reject(pool)
	if rej.Status == http.StatusServiceUnavailable && !l.budget.last(c.f, c.now) {
		return nil
	}
	c.f.Reject = rej
	return answering(pool)
}

// nowhere is the upstream a policy returns to let the transport answer
// for a pool with no upstreams at all (a dynamic pool without members):
// Caddy needs one to call the transport, which answers without dialling.
var nowhere = &reverseproxy.Upstream{Host: new(reverseproxy.Host), Dial: "no-upstream.invalid:0"}

// answering is the upstream that carries the transport's own answer:
// not dialled.
func answering(pool reverseproxy.UpstreamPool) *reverseproxy.Upstream {
	if len(pool) == 0 {
		return nowhere
	}
	return pool[0]
}

// The score tiers (seconds added to a predicted time, far above any):
// a backend whose slot for the request is only assumed (no capacity known
// in the pool, and beyond the batch it has run plus one probe) ranks after
// every backend with a slot shown; one whose batch is full (its known
// capacity reached, or, its own unknown, the capacity another engine of
// the pool showed) ranks after every backend with a free slot, whatever
// their predicted times, so a request never waits for a slot while
// another engine has one; a backend predicted to miss the request's SLO
// ranks after every one predicted to meet it; and for a request that
// waited in the admission queue, a full backend ranks last of all (see
// late).
const (
	unprovenPenalty  = 1e5
	fullPenalty      = 1e6
	sloPenalty       = 1e7
	saturatedPenalty = 1e9
)

// late is score for a request that waited for a free slot (admitted from
// the queue): a backend without one loses to any that has, so the request
// takes the slot that freed, not a place in a full engine's queue.
func late(score float64, f *aibalance.Features, b *aibalance.Backend, now time.Time) float64 {
	if f.Ticket == nil {
		return score
	}
	if n, _ := b.FreeSlots(now); n == 0 {
		return score + saturatedPenalty
	}
	return score
}

// answer lets the transport give rej for the policy (see finish).
func (l *learner) answer(r *http.Request, f *aibalance.Features, rej *aibalance.Reject, pool reverseproxy.UpstreamPool) *reverseproxy.Upstream {
	l.begin(r, f, time.Now())
	f.Reject = rej
	return answering(pool)
}

// checkWeights refuses weights the handler's upstreams cannot match: more
// weights than upstreams, or (with needStatic) weights for a handler with
// no static upstreams: the policies that learn give weights by the
// address of the upstream written at the same place, and dynamic
// upstreams have none. It runs at Provision because the policy's own
// Caddyfile block cannot see the upstreams.
func checkWeights(ctx caddy.Context, policy string, weights []int, needStatic bool) error {
	h := aibalance.Handler(ctx)
	if h == nil || len(weights) == 0 {
		return nil
	}
	n := len(h.Upstreams)
	if n == 0 && needStatic {
		return fmt.Errorf("%s: %d weights but the reverse_proxy has no static upstreams: weights follow the order of the upstreams written in the config", policy, len(weights))
	}
	if n > 0 && len(weights) > n {
		return fmt.Errorf("%s: %d weights for %d upstreams: give at most one weight per upstream, in order", policy, len(weights), n)
	}
	return nil
}

// warnWithoutTransport logs, at Provision, that a policy that learns from
// transport aibalance runs without it: it would silently degrade to
// counting Caddy's requests. The warning shows in `caddy validate`.
func warnWithoutTransport(ctx caddy.Context, policy string) (warned bool) {
	h := aibalance.Handler(ctx)
	if h == nil {
		return true
	}
	if _, ok := h.Transport.(*Transport); ok {
		return false
	}
	name := "http" // Caddy's default, set after the policy is loaded
	if m, ok := h.Transport.(caddy.Module); ok {
		name = m.CaddyModule().ID.Name()
	}
	ctx.Logger().Warn("lb_policy "+policy+" cannot learn without transport aibalance: it measures nothing and falls back to counting requests in flight. "+
		"Add `transport aibalance` to the reverse_proxy (http transport options go inside its block), or use ai_proxy, which sets it",
		zap.String("policy", policy), zap.String("transport", name))
	return true
}

// positionalWeight is the weight of the upstream at addr in pool, from
// weights given in upstream order; 1 when none is given. The operator's
// weight (admin API) comes first.
func positionalWeight(weights []int, pool reverseproxy.UpstreamPool, addr string) float64 {
	if w, ok := aibalance.AdminWeight(addr); ok {
		return w
	}
	for i, u := range pool {
		if i >= len(weights) {
			break
		}
		if u.Dial == addr {
			return float64(weights[i])
		}
	}
	return 1
}

// selectMin scans every eligible upstream and returns the one with the
// lowest score, choosing uniformly among equal scores (reservoir sampling);
// or, for a request with an affinity key, the one ranked first by
// rendezvous hashing among those within tieBand of the lowest (see
// nearBest).
func selectMin(pool reverseproxy.UpstreamPool, eligible func(*reverseproxy.Upstream) bool, score func(*reverseproxy.Upstream) float64, key uint64, held func(*reverseproxy.Upstream) int) *reverseproxy.Upstream {
	if key != 0 {
		var buf [64]scored
		cands := buf[:0]
		for i, u := range pool {
			if eligible(u) {
				cands = append(cands, scored{i, score(u)})
			}
		}
		if i := nearBest(pool, cands, key, held); i >= 0 {
			return pool[i]
		}
		return nil
	}
	var best *reverseproxy.Upstream
	var bestScore float64
	ties := 0
	for _, u := range pool {
		if !eligible(u) {
			continue
		}
		s := score(u)
		switch {
		case best == nil || s < bestScore:
			best, bestScore, ties = u, s, 1
		case s == bestScore:
			ties++
			if rand.IntN(ties) == 0 {
				best = u
			}
		}
	}
	return best
}

// tieBand is how close two scores must be to count as near-equal for a
// request with an affinity key: then a hash of the key and the upstream's
// address decides, the same in every Caddy instance, so instances that do
// not talk to each other send a conversation to the same backend while
// their loads are comparable. Clearly better scores still win.
const tieBand = 0.05

// scored is a candidate's index in the pool and its score.
type scored struct {
	i int
	s float64
}

// nearBest returns the index of the chosen candidate among those whose
// score is within tieBand of the lowest: the one holding most of the
// request's prompt (held, in tokens; nil: none known), and among equals the
// one ranked first by rendezvous hashing of key; -1 when there is none. A
// holder within the band keeps the conversation (a few percent of
// predicted time is noise, its cache is not), and the result does not
// depend on the candidates' order.
func nearBest(pool reverseproxy.UpstreamPool, cands []scored, key uint64, held func(*reverseproxy.Upstream) int) int {
	if len(cands) == 0 {
		return -1
	}
	low := cands[0].s
	for _, c := range cands[1:] {
		low = min(low, c.s)
	}
	lowTier, lowTime := splitTier(low)
	best, bestHeld, bestRank := -1, 0, uint64(0)
	for _, c := range cands {
		if tier, t := splitTier(c.s); tier != lowTier || t > lowTime*(1+tieBand) {
			continue
		}
		h := 0
		if held != nil {
			h = held(pool[c.i])
		}
		r := rendezvous(key, pool[c.i].Dial)
		if best < 0 || h > bestHeld || (h == bestHeld && r > bestRank) {
			best, bestHeld, bestRank = c.i, h, r
		}
	}
	return best
}

// splitTier splits a score into its tier (the penalties added to it, in
// units of the smallest) and its predicted time, so near-equal means the
// same tier and times within tieBand: a penalty added to every score must
// not make all of them near-equal.
func splitTier(s float64) (tier, t float64) {
	tier = math.Floor(s / unprovenPenalty)
	return tier, s - tier*unprovenPenalty
}

// rendezvous is the highest-random-weight hash of key on addr (Thaler and
// Ravishankar): each key ranks the upstreams in its own order, the same
// everywhere, and removing one upstream moves only its keys.
func rendezvous(key uint64, addr string) uint64 { return aibalance.Mix64(aibalance.FNV64(addr) ^ key) }

// affinityKey is the request's affinity key: its session key (see
// sessionKey) when it has one, else the chain hash of its first few prefix blocks (a system
// prompt and the start of a conversation: what later turns share); 0 when
// it has neither.
func affinityKey(f *aibalance.Features) uint64 {
	if f.SessionKey != 0 {
		return f.SessionKey
	}
	if n := len(f.PrefixHashes); n > 0 {
		return f.PrefixHashes[min(n, affinityKeyBlocks)-1] | 1
	}
	return 0
}

// affinityKeyBlocks is how many leading prefix blocks make the affinity
// key: 8 blocks of 64 characters, about 128 tokens.
const affinityKeyBlocks = 8

// sampleMin draws k distinct eligible upstreams at random, adds the one that
// won the previous draw (power of k choices with memory: Mitzenmacher,
// Prabhakar and Shah, "Load balancing with memory", FOCS 2002), and returns
// the one with the lowest score, ties broken uniformly at random (the
// previous winner has no edge in a tie). The memory keeps a draw of only
// slow or busy upstreams from being forced on a request, which matters in
// the small, uneven pools LLM fleets are; drawing indices (not scanning)
// keeps it O(k). When too few are found after a bounded number of draws it
// falls back to a full scan.
//
// A request with an affinity key is compared instead on its key's own k+1
// candidates — the eligible upstreams ranked first by rendezvous hashing
// of the key, a different set for each key, plus the previous winner —
// and near-ties go by that ranking (see nearBest): every instance then
// considers and prefers the same backends for a conversation, with no
// random draw of its own, while a loaded first choice still loses to a
// clearly better one.
// Ranking hashes every address, cheaply, without scoring them.
func sampleMin(pool reverseproxy.UpstreamPool, eligible func(*reverseproxy.Upstream) bool, k int, memory *atomic.Int64, score func(*reverseproxy.Upstream) float64, key uint64, held func(*reverseproxy.Upstream) int) *reverseproxy.Upstream {
	var picked [maxChoose + 2]int
	n := 0
	if key != 0 {
		// the key's own k+1 candidates: the eligible upstreams ranked
		// first by rendezvous hashing, the same set in every instance
		var ranks [maxChoose + 2]uint64
		for i, u := range pool {
			r := rendezvous(key, u.Dial)
			if n == k+1 && r <= ranks[n-1] || !eligible(u) {
				continue
			}
			j := min(n, k)
			for j > 0 && ranks[j-1] < r {
				ranks[j], picked[j] = ranks[j-1], picked[j-1]
				j--
			}
			ranks[j], picked[j] = r, i
			n = min(n+1, k+1)
		}
	}
	// the previous winner: two instances that agree so far agree on it too
	if last := int(memory.Load()) - 1; last >= 0 && last < len(pool) && eligible(pool[last]) {
		dup := false
		for _, j := range picked[:n] {
			dup = dup || j == last
		}
		if !dup {
			picked[n] = last
			n++
		}
	}
	want := n + k
	if key != 0 {
		want = n // no random draws: the key's candidates are the sample
	}
	for tries := 0; n < want && tries < 4*k+8; tries++ {
		i := rand.IntN(len(pool))
		dup := false
		for _, j := range picked[:n] {
			if j == i {
				dup = true
				break
			}
		}
		if dup || !eligible(pool[i]) {
			continue
		}
		picked[n] = i
		n++
	}
	if n < min(k, len(pool)) {
		best := selectMin(pool, eligible, score, key, held)
		for i, u := range pool {
			if u == best {
				memory.Store(int64(i) + 1)
			}
		}
		return best
	}
	if key != 0 {
		var cands [maxChoose + 2]scored
		for j, i := range picked[:n] {
			cands[j] = scored{i, score(pool[i])}
		}
		best := nearBest(pool, cands[:n], key, held)
		if best < 0 {
			return nil
		}
		memory.Store(int64(best) + 1)
		return pool[best]
	}
	bestIdx, bestScore, ties := -1, 0.0, 0
	for _, i := range picked[:n] {
		s := score(pool[i])
		switch {
		case bestIdx < 0 || s < bestScore:
			bestIdx, bestScore, ties = i, s, 1
		case s == bestScore:
			ties++
			if rand.IntN(ties) == 0 {
				bestIdx = i
			}
		}
	}
	if bestIdx < 0 {
		return nil
	}
	memory.Store(int64(bestIdx) + 1)
	return pool[bestIdx]
}

// ParseChoose reads the one argument of a choose subdirective: a number of
// candidates from 1 to 16, or all.
func ParseChoose(d *caddyfile.Dispenser) (k int, all bool, err error) {
	if !d.NextArg() {
		return 0, false, d.ArgErr()
	}
	if d.Val() == "all" {
		all = true
	} else if k, err = strconv.Atoi(d.Val()); err != nil || k < 1 || k > maxChoose {
		return 0, false, d.Errf("choose: want a number from 1 to %d or 'all', got %q", maxChoose, d.Val())
	}
	if d.NextArg() {
		return 0, false, d.ArgErr()
	}
	return k, all, nil
}

// ParseAffinity reads the arguments of an affinity subdirective:
// prefix, session, header <name>, cookie <name> or none.
func ParseAffinity(d *caddyfile.Dispenser) (mode, key string, err error) {
	if !d.NextArg() {
		return "", "", d.ArgErr()
	}
	mode = d.Val()
	switch mode {
	case AffinityPrefix, AffinitySession, AffinityNone:
	case AffinityHeader, AffinityCookie:
		if !d.NextArg() || strings.TrimSpace(d.Val()) == "" {
			return "", "", d.Errf("affinity %s: give the %s's name", mode, mode)
		}
		key = d.Val()
	default:
		return "", "", d.Errf("affinity: want prefix, session, header <name>, cookie <name> or none, got %q", mode)
	}
	if d.NextArg() {
		return "", "", d.ArgErr()
	}
	return mode, key, nil
}

// ParseTTFTWeight reads the one argument of a ttft_weight subdirective.
func ParseTTFTWeight(d *caddyfile.Dispenser) (float64, error) {
	if !d.NextArg() {
		return 0, d.ArgErr()
	}
	w, err := strconv.ParseFloat(d.Val(), 64)
	if err != nil || w < 0 || w > 1000 {
		return 0, d.Errf("ttft_weight: want a number from 0 to 1000, got %q", d.Val())
	}
	if d.NextArg() {
		return 0, d.ArgErr()
	}
	return w, nil
}

// ParseWeights reads Caddyfile weight arguments: whole numbers, 0 or more,
// at least one above 0. d is at the line that gave them.
func ParseWeights(d *caddyfile.Dispenser, args []string) ([]int, error) {
	var out []int
	total := 0
	for _, a := range args {
		w, err := strconv.Atoi(a)
		if err != nil || w < 0 {
			return nil, d.Errf("invalid weight %q: want a whole number, 0 or more", a)
		}
		out = append(out, w)
		total += w
	}
	if len(out) > 0 && total == 0 {
		return nil, d.Errf("weights are all 0: an upstream of weight 0 is never selected, so at least one weight must be above 0")
	}
	return out, nil
}

func validateWeights(policy string, weights []int) error {
	if len(weights) == 0 {
		return nil
	}
	total := 0
	for _, w := range weights {
		if w < 0 {
			return fmt.Errorf("%s: weights must not be negative, got %d", policy, w)
		}
		total += w
	}
	if total == 0 {
		return fmt.Errorf("%s: at least one weight must be positive", policy)
	}
	return nil
}

// Interface guards
var (
	_ reverseproxy.Selector = (*AIPredictiveSelection)(nil)
	_ caddy.Provisioner     = (*AIPredictiveSelection)(nil)
	_ caddy.Validator       = (*AIPredictiveSelection)(nil)
	_ caddy.CleanerUpper    = (*AIPredictiveSelection)(nil)
	_ caddyfile.Unmarshaler = (*AIPredictiveSelection)(nil)

	_ reverseproxy.Selector = (*LeastTokensSelection)(nil)
	_ caddy.Provisioner     = (*LeastTokensSelection)(nil)
	_ caddy.Validator       = (*LeastTokensSelection)(nil)
	_ caddy.CleanerUpper    = (*LeastTokensSelection)(nil)
	_ caddyfile.Unmarshaler = (*LeastTokensSelection)(nil)

	_ reverseproxy.Selector = (*WeightedLeastConnSelection)(nil)
	_ caddy.Provisioner     = (*WeightedLeastConnSelection)(nil)
	_ caddy.Validator       = (*WeightedLeastConnSelection)(nil)
	_ caddy.CleanerUpper    = (*WeightedLeastConnSelection)(nil)
	_ caddyfile.Unmarshaler = (*WeightedLeastConnSelection)(nil)
)
