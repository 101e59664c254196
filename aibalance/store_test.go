package aibalance

import "testing"

func TestBackendSetSharesAndReleases(t *testing.T) {
	const addr = "store-test:1"
	var a, b BackendSet
	ba := a.Get(addr)
	bb := b.Get(addr)
	if ba != bb {
		t.Fatal("two module instances got different entries for one address")
	}
	if a.Get(addr) != ba || BackendRefs(addr) != 2 {
		t.Fatalf("refs %d after two sets took the address (repeat Gets must not add refs), want 2", BackendRefs(addr))
	}
	ba.inflight.Add(3)

	// a reload: the new config takes its reference before the old one lets go
	var c BackendSet
	c.Get(addr)
	a.Release()
	b.Release()
	got, ok := LookupBackend(addr)
	if !ok || got != ba || got.inflight.Load() != 3 {
		t.Fatal("entry or its counters lost across a reload")
	}
	c.Release()
	if _, ok := LookupBackend(addr); ok || BackendRefs(addr) != 0 {
		t.Fatal("entry kept after the last user released it")
	}
}
