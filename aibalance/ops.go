package aibalance

import (
	"sync"
	"sync/atomic"
	"time"
)

// Operator overrides: what an operator set through the admin API
// (PATCH /aibalance/upstreams/{address}), by address. They belong to the
// process, not to a config, so a config reload keeps them, and they apply
// in every pool the address is in. The request path reads them with one
// atomic load (copy on write); writes are rare and serialised.
type Override struct {
	// Weight replaces the config's weight of the upstream when above 0.
	Weight float64
	// Drain: the upstream gets no new request; those in flight finish.
	Drain      bool
	DrainSince time.Time
}

var (
	overrides  atomic.Pointer[map[string]Override]
	overrideMu sync.Mutex
)

// OverrideOf returns the operator's override of the upstream at addr.
func OverrideOf(addr string) (Override, bool) {
	m := overrides.Load()
	if m == nil {
		return Override{}, false
	}
	o, ok := (*m)[addr]
	return o, ok
}

// SetOverride changes the override of addr with fn (under a lock; readers
// see the old or the new map, never a partial one). An override left with
// nothing set is removed.
func SetOverride(addr string, fn func(*Override)) Override {
	overrideMu.Lock()
	defer overrideMu.Unlock()
	next := map[string]Override{}
	if m := overrides.Load(); m != nil {
		for k, v := range *m {
			next[k] = v
		}
	}
	o := next[addr]
	fn(&o)
	if o == (Override{}) {
		delete(next, addr)
	} else {
		next[addr] = o
	}
	if len(next) == 0 {
		overrides.Store(nil)
	} else {
		overrides.Store(&next)
	}
	return o
}

// Draining reports whether the operator drains the upstream at addr.
func Draining(addr string) bool {
	o, ok := OverrideOf(addr)
	return ok && o.Drain
}

// AdminWeight is the operator's weight of the upstream at addr, if set.
func AdminWeight(addr string) (float64, bool) {
	o, ok := OverrideOf(addr)
	return o.Weight, ok && o.Weight > 0
}
