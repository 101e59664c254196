package aibalance

import (
	"fmt"
	"sync"
	"testing"
)

func chain(seed uint64, n int) []uint64 {
	out := make([]uint64, n)
	h := seed
	for i := range out {
		h = h*1099511628211 + uint64(i) + 1
		out[i] = h
	}
	return out
}

func TestPrefixIndexMatch(t *testing.T) {
	var x prefixIndex
	conv := chain(1, 20)
	x.add(conv[:10], 0)
	for _, tc := range []struct {
		q    []uint64
		want int
	}{
		{conv[:10], 10}, {conv[:5], 5}, {conv, 10}, {chain(2, 10), 0}, {nil, 0},
		{append(append([]uint64{}, conv[:3]...), chain(3, 5)...), 3}, // shares 3 blocks, then differs
	} {
		if got := x.match(tc.q); got != tc.want {
			t.Fatalf("match of %d blocks: %d, want %d", len(tc.q), got, tc.want)
		}
	}
}

// TestPrefixIndexBounded: the index keeps at most two generations of limit
// blocks, and what it forgets first is what was sent longest ago.
func TestPrefixIndexBounded(t *testing.T) {
	var x prefixIndex
	const limit = 100
	var convs [][]uint64
	for i := 0; i < 30; i++ {
		c := chain(uint64(i+10), 10)
		convs = append(convs, c)
		x.add(c, limit)
		if n := x.size(); n > 2*limit {
			t.Fatalf("%d blocks held with limit %d", n, limit)
		}
	}
	if x.match(convs[0]) != 0 {
		t.Fatal("the oldest conversation is still held after 300 newer blocks")
	}
	if x.match(convs[29]) != 10 {
		t.Fatal("the newest conversation was forgotten")
	}
}

func TestCachedTokensAndTrust(t *testing.T) {
	var set BackendSet
	set.Private = true
	b := set.Get("prefix-trust:1")
	f := &Features{PromptTokens: 400, PrefixHashes: chain(7, 30)}
	if got := b.CachedTokens(f, 16); got != 0 {
		t.Fatalf("nothing sent yet: %d cached", got)
	}
	b.RecordPrefix(&Features{PrefixHashes: f.PrefixHashes[:20]}, 0, 16, 0)
	if got := b.CachedTokens(f, 16); got != 320 {
		t.Fatalf("20 blocks of 16 tokens held: %d cached, want 320", got)
	}
	f.PromptTokens = 100
	if got := b.CachedTokens(f, 16); got != 100 {
		t.Fatalf("never more than the prompt: %d", got)
	}
	// the engine hits half of what the balancer expects: the trust falls
	// toward one half, step by step
	b.SetEngine(EngineMetrics{HasPrefixCache: true, PrefixHits: 0, PrefixQueries: 0}, 1<<40)
	hits := 0.0
	for i := 0; i < 20; i++ {
		b.RecordPrefix(&Features{}, 4000, 16, 0)
		hits += 2000
		b.SetEngine(EngineMetrics{HasPrefixCache: true, PrefixHits: hits, PrefixQueries: 2 * hits, CacheTokens: 16 * 1000}, 1<<40)
	}
	if tr := b.PrefixTrust(); tr < 0.45 || tr > 0.6 {
		t.Fatalf("trust %.2f after the engine hit half of the expected tokens, want about 0.5", tr)
	}
	f.PromptTokens = 1000
	if got := b.CachedTokens(f, 16); got < 140 || got > 200 {
		t.Fatalf("20 blocks held at trust %.2f: %d cached", b.PrefixTrust(), got)
	}
	// the engine's cache geometry sizes the index: 16000 tokens is 1000
	// blocks, about 667 per generation
	for i := 0; i < 100; i++ {
		b.RecordPrefix(&Features{PrefixHashes: chain(uint64(100+i), 30)}, 0, 16, 0)
	}
	if n := b.PrefixBlocks(); n > 2*667 {
		t.Fatalf("index of %d blocks for an engine holding 1000", n)
	}
}

func TestPrefixIndexConcurrent(t *testing.T) {
	var x prefixIndex
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				c := chain(uint64(g*1000+i%50), 16)
				x.add(c, 200)
				_ = x.match(c)
			}
		}(g)
	}
	wg.Wait()
	if n := x.size(); n > 400 {
		t.Fatal(fmt.Sprint("index grew to ", n))
	}
}
