package aibalance

import (
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Pool is what belongs to one pool of engines — a reverse_proxy handler's
// upstream list, or a dynamic source — rather than to one engine: the prior
// for engines the model has not learned yet, the weights by address and the
// previous winner. Two pools (say a 70B pool and an 8B pool in one Caddy)
// never share cold-start beliefs. Pools live in a process-wide usage pool
// keyed by their members, so they survive config reloads like backends do.
type Pool struct {
	key     string
	prior   Prior
	weights atomic.Pointer[map[string]float64]
	last    atomic.Int64 // index+1 in the handler's upstream list of the previous winner
	members sync.Map     // addr → struct{}: the upstreams the pool has routed to or was configured with
	health  atomic.Pointer[HealthConfig]
	dueAt   atomic.Int64 // unix ns of the last periodic check (see Due)
	// affinity: the pool's policy weighs the prefix each backend holds
	// (see Backend.CachedTokens), so its transport records what it sends
	affinity atomic.Bool
	// tiers and zones (see topology.go)
	topology atomic.Pointer[Topology]
	tiers    tierState
	openTier atomic.Int32
	scaling  scalingState
	// admission control (see admission.go)
	admission Admission
	limiter   RateLimiter
}

// SetAffinity turns prefix affinity on or off for the pool.
func (p *Pool) SetAffinity(on bool) { p.affinity.Store(on) }

// Affinity reports whether the pool's policy uses prefix affinity.
func (p *Pool) Affinity() bool { return p != nil && p.affinity.Load() }

// AddMember records that addr belongs to the pool, reporting whether it
// is new to it.
func (p *Pool) AddMember(addr string) bool {
	if _, ok := p.members.Load(addr); ok {
		return false
	}
	_, loaded := p.members.LoadOrStore(addr, struct{}{})
	return !loaded
}

// RemoveMember forgets addr (a dynamic member removed from the pool).
func (p *Pool) RemoveMember(addr string) { p.members.Delete(addr) }

// Members returns the pool's upstream addresses, sorted.
func (p *Pool) Members() []string {
	var out []string
	p.members.Range(func(k, _ any) bool {
		out = append(out, k.(string))
		return true
	})
	sort.Strings(out)
	return out
}

// AllPools returns every pool a config holds, sorted by key.
func AllPools() []*Pool {
	var out []*Pool
	pools.Range(func(_, v any) bool {
		out = append(out, v.(*Pool))
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].key < out[j].key })
	return out
}

var pools = caddy.NewUsagePool()

// Destruct implements caddy.Destructor.
func (p *Pool) Destruct() error { return nil }

// Key is the pool's identity: its members in order, or its dynamic source.
func (p *Pool) Key() string { return p.key }

// Prior is the pool's expectation for engines not learned yet.
func (p *Pool) Prior() *Prior { return &p.prior }

// Last is the previous winner's memory for power-of-k sampling.
func (p *Pool) Last() *atomic.Int64 { return &p.last }

// SetWeights sets the pool's weights by address (the config's positional
// weights, resolved once at provision). Addresses without a weight have 1.
func (p *Pool) SetWeights(w map[string]float64) {
	if len(w) == 0 {
		p.weights.Store(nil)
		return
	}
	p.weights.Store(&w)
}

// Weight is the weight of the upstream at addr: the operator's (see
// SetOverride), else the config's, else 1.
func (p *Pool) Weight(addr string) float64 {
	if w, ok := AdminWeight(addr); ok {
		return w
	}
	if m := p.weights.Load(); m != nil {
		if w, ok := (*m)[addr]; ok {
			return w
		}
	}
	return 1
}

// AcquirePool takes a reference to the pool with key, creating it.
func AcquirePool(key string) *Pool {
	v, _, _ := pools.LoadOrNew(key, func() (caddy.Destructor, error) {
		return NewPool(key), nil
	})
	return v.(*Pool)
}

// ReleasePool drops a reference; the pool is deleted with the last one.
func ReleasePool(key string) { _, _ = pools.Delete(key) }

// HandlerPoolKey names the pool of the reverse_proxy handler that is
// provisioning the current module: its static upstreams in order, or its
// dynamic upstream source's config. Every module of one handler (policy,
// transport) gets the same key, and a reload of the same config too.
func HandlerPoolKey(ctx caddy.Context) string {
	h := Handler(ctx)
	if h == nil {
		return "standalone"
	}
	if len(h.Upstreams) == 0 && len(h.DynamicUpstreamsRaw) > 0 {
		return "dynamic:" + string(h.DynamicUpstreamsRaw)
	}
	return "static:" + strings.Join(HandlerUpstreams(ctx), " ")
}

// poolVarKey holds the request's *Pool, set by the policy that chose the
// upstream, so the transport teaches the right pool's prior.
const poolVarKey = "aibalance.pool"

// SetRequestPool records the pool that routes r.
func SetRequestPool(r *http.Request, p *Pool) {
	if r.Context().Value(caddyhttp.VarsCtxKey) != nil {
		caddyhttp.SetVar(r.Context(), poolVarKey, p)
	}
}

// RequestPool returns the pool recorded for r, or nil.
func RequestPool(r *http.Request) *Pool {
	p, _ := caddyhttp.GetVar(r.Context(), poolVarKey).(*Pool)
	return p
}

// Tried is the set of upstreams one request was already sent to. A policy
// is called again for the same request only when an attempt failed, so a
// retry avoids them while another upstream is eligible. It lives in the
// request's Features (no allocation for the first few attempts); the
// attempts of one request run one after another, on one goroutine.
type Tried struct {
	n     int
	addrs [4]string
	more  []string
}

// Has reports whether addr was tried. A nil set has nothing.
func (t *Tried) Has(addr string) bool {
	if t == nil {
		return false
	}
	for i := 0; i < min(t.n, len(t.addrs)); i++ {
		if t.addrs[i] == addr {
			return true
		}
	}
	for _, a := range t.more {
		if a == addr {
			return true
		}
	}
	return false
}

// Len is how many upstreams were tried.
func (t *Tried) Len() int {
	if t == nil {
		return 0
	}
	return t.n
}

// Add records that addr is being tried.
func (t *Tried) Add(addr string) {
	if t == nil {
		return
	}
	if t.n < len(t.addrs) {
		t.addrs[t.n] = addr
	} else {
		t.more = append(t.more, addr)
	}
	t.n++
}

// Reset forgets every attempt (for benchmarks that reuse one request).
func (t *Tried) Reset() { *t = Tried{} }

// NewPool returns a pool outside the process-wide set, for programs and
// tests that route without a Caddy config.
func NewPool(key string) *Pool {
	p := &Pool{key: key}
	p.admission.capacity = p.FreeSlots
	p.admission.drain = p.DrainRate
	p.admission.backlog = p.Backlog
	return p
}

// triedVarKey holds the tried set of a request whose features no policy
// read (weighted_least_conn does not need them).
const triedVarKey = "aibalance.tried"

// RequestTried returns r's tried set: the one in its features when a
// policy read them, else one kept in its vars (nil without vars).
func RequestTried(r *http.Request) *Tried {
	if f := CachedFeatures(r); f != nil {
		return &f.Tried
	}
	if t, ok := caddyhttp.GetVar(r.Context(), triedVarKey).(*Tried); ok {
		return t
	}
	if r.Context().Value(caddyhttp.VarsCtxKey) == nil {
		return nil
	}
	t := new(Tried)
	caddyhttp.SetVar(r.Context(), triedVarKey, t)
	return t
}
