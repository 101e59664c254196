package aibalance

import (
	"fmt"
	"net"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Dynamic pools: named pools of upstreams that change without a config
// reload, through the admin API (POST and DELETE on
// /aibalance/pools/{pool}/members), served to reverse_proxy by the dynamic
// upstream source `dynamic aibalance <pool>`. They belong to the process:
// a reload keeps the members added through the API, and the pool holds a
// store reference on each member, so its learned state (model, breaker,
// counters) lives as long as it is a member, whichever config uses it.

// Member is one upstream of a dynamic pool.
type Member struct {
	Address string    `json:"address"`
	Source  string    `json:"source"` // config or api
	Added   time.Time `json:"added"`
	// Removing: DELETE was called; the member gets no new request and is
	// forgotten once none is in flight.
	Removing      bool      `json:"removing,omitempty"`
	RemovingSince time.Time `json:"removing_since,omitzero"`
}

// DynamicPool is a named pool of upstreams. The request path reads the
// member list with one atomic load.
type DynamicPool struct {
	name    string
	mu      sync.Mutex // serialises changes
	members atomic.Pointer[[]Member]
	live    atomic.Pointer[[]string] // addresses that take new requests
	pending atomic.Int32             // members being removed
	// attached are the handler pools this pool serves (see Attach): a
	// member it forgets leaves them too
	attached []*Pool
}

// Attach records that the handler pool hp serves this pool's members.
func (p *DynamicPool) Attach(hp *Pool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.attached = append(p.attached, hp)
}

// Detach undoes one Attach of hp.
func (p *DynamicPool) Detach(hp *Pool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, a := range p.attached {
		if a == hp {
			p.attached = append(p.attached[:i:i], p.attached[i+1:]...)
			return
		}
	}
}

// handlerPool is a handler pool this pool serves, or nil.
func (p *DynamicPool) handlerPool() *Pool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.attached) == 0 {
		return nil
	}
	return p.attached[0]
}

// dynPools holds the dynamic pools by name, counted by the configs that
// declare them: a reload declares the pool again before the old config
// lets go, so it lives on; when no config declares it any more, it releases
// its members.
var dynPools = caddy.NewUsagePool()

// AcquireDynamicPool takes a reference to the dynamic pool called name,
// creating it.
func AcquireDynamicPool(name string) *DynamicPool {
	v, _, _ := dynPools.LoadOrNew(name, func() (caddy.Destructor, error) {
		return &DynamicPool{name: name}, nil
	})
	return v.(*DynamicPool)
}

// ReleaseDynamicPool drops a reference; the last one destroys the pool.
func ReleaseDynamicPool(name string) {
	_, _ = dynPools.Delete(name)
}

// Destruct releases the members' store references and the drains the
// pool set on members it was removing.
func (p *DynamicPool) Destruct() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.current() {
		if m.Removing {
			SetOverride(m.Address, func(o *Override) { o.Drain, o.DrainSince = false, time.Time{} })
		}
		releaseBackend(m.Address)
	}
	p.store(nil)
	return nil
}

// LookupDynamicPool returns the dynamic pool called name, if a config
// declares it.
func LookupDynamicPool(name string) (*DynamicPool, bool) {
	var found *DynamicPool
	dynPools.Range(func(k, v any) bool {
		if k == name {
			found = v.(*DynamicPool)
			return false
		}
		return true
	})
	return found, found != nil
}

// AllDynamicPools returns the dynamic pools, sorted by name.
func AllDynamicPools() []*DynamicPool {
	var out []*DynamicPool
	dynPools.Range(func(_, v any) bool {
		out = append(out, v.(*DynamicPool))
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// Name is the pool's name.
func (p *DynamicPool) Name() string { return p.name }

// Members returns the pool's members, those being removed included, after
// forgetting the removed ones with nothing left in flight.
func (p *DynamicPool) Members() []Member {
	p.prune()
	if m := p.members.Load(); m != nil {
		return append([]Member(nil), (*m)...)
	}
	return []Member{}
}

// Upstreams returns the addresses that take new requests. While members
// are being removed it also forgets those with nothing left in flight,
// unless another caller is changing the pool.
func (p *DynamicPool) Upstreams() []string {
	if p.pending.Load() > 0 && p.mu.TryLock() {
		p.pruneLocked()
		p.mu.Unlock()
	}
	if l := p.live.Load(); l != nil {
		return *l
	}
	return nil
}

// store publishes members (under p.mu).
func (p *DynamicPool) store(ms []Member) {
	live := make([]string, 0, len(ms))
	pending := 0
	for _, m := range ms {
		if m.Removing {
			pending++
		} else {
			live = append(live, m.Address)
		}
	}
	p.pending.Store(int32(pending))
	p.members.Store(&ms)
	p.live.Store(&live)
}

func (p *DynamicPool) current() []Member {
	if m := p.members.Load(); m != nil {
		return append([]Member(nil), (*m)...)
	}
	return nil
}

// SetConfigMembers applies a config's members: those new to the pool join,
// members the config added before and no longer names are removed (by
// draining), and members added through the API stay.
func (p *DynamicPool) SetConfigMembers(addrs []string, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	want := map[string]bool{}
	for _, a := range addrs {
		want[a] = true
	}
	ms := p.current()
	have := map[string]bool{}
	for i, m := range ms {
		have[m.Address] = true
		switch {
		case want[m.Address] && m.Removing:
			ms[i].Removing, ms[i].RemovingSince = false, time.Time{}
			SetOverride(m.Address, func(o *Override) { o.Drain, o.DrainSince = false, time.Time{} })
		case !want[m.Address] && m.Source == "config" && !m.Removing:
			ms[i].Removing, ms[i].RemovingSince = true, now
			SetOverride(m.Address, func(o *Override) { o.Drain, o.DrainSince = true, now })
		}
	}
	for _, a := range addrs {
		if !have[a] {
			acquireBackend(a)
			ms = append(ms, Member{Address: a, Source: "config", Added: now})
			have[a] = true
		}
	}
	p.store(ms)
}

// Add makes addr a member (source api); false when it was one already (a
// member being removed is kept instead).
func (p *DynamicPool) Add(addr string, now time.Time) (Member, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ms := p.current()
	for i, m := range ms {
		if m.Address == addr {
			if m.Removing {
				ms[i].Removing, ms[i].RemovingSince = false, time.Time{}
				SetOverride(addr, func(o *Override) { o.Drain, o.DrainSince = false, time.Time{} })
				p.store(ms)
			}
			return ms[i], false
		}
	}
	b := acquireBackend(addr)
	for _, m := range ms {
		// joining a pool that serves: slow start from now, before its
		// first request (its first requests would all go to it otherwise:
		// an idle newcomer wins)
		if o, ok := LookupBackend(m.Address); ok && o.hasRequests() && !b.hasRequests() {
			b.StartRamp(now)
			break
		}
	}
	m := Member{Address: addr, Source: "api", Added: now}
	p.store(append(ms, m))
	return m, true
}

// Remove starts removing addr: no new request goes there (it leaves the
// upstream list and is drained), and it is forgotten once none is in
// flight. False when it is not a member.
func (p *DynamicPool) Remove(addr string, now time.Time) (Member, bool) {
	p.mu.Lock()
	ms := p.current()
	found := -1
	for i, m := range ms {
		if m.Address == addr {
			found = i
		}
	}
	if found < 0 {
		p.mu.Unlock()
		return Member{}, false
	}
	if !ms[found].Removing {
		ms[found].Removing, ms[found].RemovingSince = true, now
		SetOverride(addr, func(o *Override) { o.Drain, o.DrainSince = true, now })
		p.store(ms)
	}
	m := ms[found]
	p.mu.Unlock()
	p.prune()
	return m, true
}

// prune forgets the members being removed that have nothing in flight.
func (p *DynamicPool) prune() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pruneLocked()
}

func (p *DynamicPool) pruneLocked() {
	ms := p.current()
	keep := ms[:0]
	changed := false
	for _, m := range ms {
		if m.Removing {
			if b, ok := LookupBackend(m.Address); !ok || b.inflight.Load() <= 0 {
				SetOverride(m.Address, func(o *Override) { o.Drain, o.DrainSince = false, time.Time{} })
				for _, hp := range p.attached {
					hp.RemoveMember(m.Address)
				}
				releaseBackend(m.Address)
				changed = true
				continue
			}
		}
		keep = append(keep, m)
	}
	if changed {
		p.store(keep)
	}
}

// CheckAddress validates an upstream address given to the admin API:
// host:port with a port from 1 to 65535, nothing else.
func CheckAddress(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: want host:port (%v)", addr, err)
	}
	if host == "" {
		return fmt.Errorf("address %q: no host", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("address %q: port must be a number from 1 to 65535", addr)
	}
	for _, c := range host {
		if c <= ' ' || c == '/' || c == '?' || c == '#' || c == '@' {
			return fmt.Errorf("address %q: the host has a character an address cannot", addr)
		}
	}
	return nil
}
