package aibalance

import (
	"sort"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// backends is the process-wide store of per-upstream state, keyed by dial
// address. It is package level, like Caddy's own reverse proxy hosts, so that
// entries outlive a config reload: a reload provisions the new config (which
// takes its references) before the old one is cleaned up (which drops
// its own), so an address used by both never drops to zero references.
var backends = caddy.NewUsagePool()

// acquireBackend takes a reference to the backend at addr, creating it.
func acquireBackend(addr string) *Backend {
	v, _, _ := backends.LoadOrNew(addr, func() (caddy.Destructor, error) {
		return newBackend(addr), nil
	})
	return v.(*Backend)
}

// releaseBackend drops a reference; the entry is deleted with the last one.
func releaseBackend(addr string) {
	_, _ = backends.Delete(addr)
}

// AllBackends returns every backend in the store, sorted by address.
func AllBackends() []*Backend {
	var out []*Backend
	backends.Range(func(_, v any) bool {
		out = append(out, v.(*Backend))
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].addr < out[j].addr })
	return out
}

// LookupBackend returns the backend at addr if some config holds it.
func LookupBackend(addr string) (*Backend, bool) {
	var found *Backend
	backends.Range(func(k, v any) bool {
		if k == addr {
			found = v.(*Backend)
			return false
		}
		return true
	})
	return found, found != nil
}

// BackendRefs returns how many references are held on addr's entry.
func BackendRefs(addr string) int {
	n, _ := backends.References(addr)
	return n
}

// BackendSet is one module instance's view of the store: it takes a
// reference to each address the first time the module needs it and drops
// them all at Release (the module's Cleanup). Lookups after the first are a
// lock-free map read.
type BackendSet struct {
	// Private makes the set hold backends of its own, outside the
	// process-wide store: a second balancer in one process, as a separate
	// Caddy instance would be (tests and benchmarks of agreement between
	// instances).
	Private bool

	mu   sync.Mutex // only taken the first time an address is seen
	m    sync.Map   // addr → *Backend
	held []string
}

// Get returns the backend at addr, taking a reference on first use.
func (s *BackendSet) Get(addr string) *Backend {
	if v, ok := s.m.Load(addr); ok {
		return v.(*Backend)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if v, ok := s.m.Load(addr); ok {
		return v.(*Backend)
	}
	if s.Private {
		b := newBackend(addr)
		s.m.Store(addr, b)
		return b
	}
	b := acquireBackend(addr)
	s.m.Store(addr, b)
	s.held = append(s.held, addr)
	return b
}

// Release drops every reference the set holds.
func (s *BackendSet) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, addr := range s.held {
		s.m.Delete(addr)
		releaseBackend(addr)
	}
	s.held = nil
}

// Len is how many addresses the set holds.
func (s *BackendSet) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.held)
}

// RampNewcomers starts the slow start (see Backend.Ramp) of the backends
// at addrs that have served nothing yet while another of them has: engines
// joining a pool that is already serving (a reload that adds one, a new
// dynamic member). At a cold start none has served, and none ramps.
func (s *BackendSet) RampNewcomers(addrs []string, now time.Time) {
	serving := false
	for _, a := range addrs {
		if s.Get(a).hasRequests() {
			serving = true
			break
		}
	}
	if !serving {
		return
	}
	for _, a := range addrs {
		if b := s.Get(a); !b.hasRequests() && b.rampFrom.Load() == 0 {
			b.StartRamp(now)
		}
	}
}
