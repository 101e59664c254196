package selection

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// convHashes is the prefix chain of turn t of conversation c: its earlier
// turns' blocks, then new ones.
func convHashes(c, turn int) []uint64 {
	out := make([]uint64, 0, 4*(turn+1))
	h := uint64(c+1) * 0x9e3779b97f4a7c15
	for i := 0; i < 4*(turn+1); i++ {
		h = aibalance.Mix64(h + uint64(i))
		out = append(out, h)
	}
	return out
}

// TestAffinityAgreesAcrossInstances: two independent instances of the
// policy (each with its own backend state, as two Caddy instances would
// have), fed the same request stream, send the same conversation to the
// same backend: they agree on at least 90% of decisions.
func TestAffinityAgreesAcrossInstances(t *testing.T) {
	on := agreement(t, true)
	off := agreement(t, false)
	t.Logf("two instances agreed on %.0f%% of decisions with affinity prefix, %.0f%% with affinity none", 100*on, 100*off)
	if on < 0.9 || off >= on {
		t.Fatalf("agreement %.2f with affinity, %.2f without: want at least 0.9, and more than without", on, off)
	}
}

func agreement(t *testing.T, affinity bool) float64 {
	pool := testPool(t, 4)
	mk := func() *AIPredictiveSelection {
		p := newPredictive(2, false)
		p.set = aibalance.BackendSet{Private: true}
		p.affinity = affinity
		p.pool.SetAffinity(affinity)
		return p
	}
	a, b := mk(), mk()
	type inflight struct {
		p   *AIPredictiveSelection
		att aibalance.Attempt
	}
	var window []inflight
	agree, total := 0, 0
	now := time.Now()
	bt := a.app.BlockTokens()
	for i := 0; i < 400; i++ {
		c, turn := i%40, i/40
		f := &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 64 * (turn + 1), OutputTokens: 50, PrefixHashes: convHashes(c, turn)}
		var picks [2]string
		for j, p := range []*AIPredictiveSelection{a, b} {
			r := varsRequest()
			ff := p.app.Features(r)
			*ff = *f
			u := p.Select(pool, r, nil)
			picks[j] = u.Dial
			be := p.set.Get(u.Dial)
			cached := be.CachedTokens(ff, bt)
			be.RecordPrefix(ff, cached, bt, 0)
			window = append(window, inflight{p, be.BeginCached(ff, cached, p.pool.Prior(), now)})
		}
		total++
		if picks[0] == picks[1] {
			agree++
		}
		for len(window) > 16 { // a bounded number in flight, oldest first
			w := window[0]
			window = window[1:]
			w.att.End(aibalance.Outcome{Status: 200, Stream: true, TTFT: 100 * time.Millisecond, E2E: time.Second, OutputTokens: 50}, w.p.app.Lambda(), w.p.pool.Prior(), now)
		}
		now = now.Add(50 * time.Millisecond)
	}
	return float64(agree) / float64(total)
}

// TestSessionKeys: each affinity mode takes its session key from its
// source; prompt_cache_key is a session key in every mode but none.
func TestSessionKeys(t *testing.T) {
	key := func(mode, name string, set func(r *http.Request, f *aibalance.Features)) uint64 {
		p := newPredictive(2, false)
		p.Affinity, p.AffinityKey = mode, name
		r := varsRequest()
		f := p.app.Features(r)
		set(r, f)
		return p.sessionKey(r, f)
	}
	user := func(u string) func(*http.Request, *aibalance.Features) {
		return func(_ *http.Request, f *aibalance.Features) { f.User = u }
	}
	header := func(v string) func(*http.Request, *aibalance.Features) {
		return func(r *http.Request, _ *aibalance.Features) { r.Header.Set("X-Session-ID", v) }
	}
	cookie := func(v string) func(*http.Request, *aibalance.Features) {
		return func(r *http.Request, _ *aibalance.Features) { r.AddCookie(&http.Cookie{Name: "sid", Value: v}) }
	}
	pck := func(v string) func(*http.Request, *aibalance.Features) {
		return func(_ *http.Request, f *aibalance.Features) { f.PromptCacheKey = v }
	}
	for _, tc := range []struct {
		name, mode, key string
		a, b            func(*http.Request, *aibalance.Features)
	}{
		{"user", AffinitySession, "", user("alice"), user("bob")},
		{"header", AffinityHeader, "X-Session-ID", header("s1"), header("s2")},
		{"cookie", AffinityCookie, "sid", cookie("c1"), cookie("c2")},
		{"prompt_cache_key", AffinityPrefix, "", pck("k1"), pck("k2")},
	} {
		a1, a2, b1 := key(tc.mode, tc.key, tc.a), key(tc.mode, tc.key, tc.a), key(tc.mode, tc.key, tc.b)
		if a1 == 0 || a1 != a2 || a1 == b1 {
			t.Fatalf("%s: keys %x %x %x: want equal for the same session, different for another", tc.name, a1, a2, b1)
		}
	}
	if k := key(AffinityPrefix, "", user("alice")); k != 0 {
		t.Fatal("affinity prefix keyed a session by its user")
	}
	if k := key(AffinitySession, "", func(*http.Request, *aibalance.Features) {}); k != 0 {
		t.Fatal("a request with no user has a session key")
	}
}

// TestSessionStickyBoundedByLoad: a session returns to the backend that
// served it while loads are comparable, and leaves it when it is loaded.
func TestSessionStickyBoundedByLoad(t *testing.T) {
	p := newPredictive(2, true)
	p.Affinity = AffinitySession
	p.affinity = true
	p.pool.SetAffinity(true)
	defer p.set.Release()
	pool := testPool(t, 4)
	now := time.Now()
	bt := p.app.BlockTokens()
	send := func(user string) (string, aibalance.Attempt) {
		r := varsRequest()
		f := p.app.Features(r)
		*f = aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 3000, OutputTokens: 50, User: user}
		u := p.Select(pool, r, nil)
		b := p.set.Get(u.Dial)
		cached := b.CachedTokens(f, bt)
		b.RecordPrefix(f, cached, bt, 0)
		return u.Dial, b.BeginCached(f, cached, p.pool.Prior(), now)
	}
	// teach every backend the same speed: 0.5 ms per uncached prompt
	// token, and 300 ms per request queued ahead
	for _, u := range pool {
		b := p.set.Get(u.Dial)
		for i := 0; i < 60; i++ {
			prompt, queued := 100+50*(i%40), i%7
			ttft := time.Duration(prompt)*time.Millisecond/2 + time.Duration(queued)*300*time.Millisecond
			b.Model().Observe(aibalance.Observation{State: aibalance.LoadState{Inflight: float64(queued), Pending: float64(queued)},
				Stream: true, PromptTokens: prompt, OutputTokens: 50, TTFT: ttft, E2E: ttft + 49*20*time.Millisecond}, 0.99, p.pool.Prior(), now)
		}
	}
	first, att := send("alice")
	att.End(aibalance.Outcome{Status: 200}, p.app.Lambda(), p.pool.Prior(), now)
	same := 0
	for i := 0; i < 10; i++ {
		got, att := send("alice")
		att.End(aibalance.Outcome{Status: 200}, p.app.Lambda(), p.pool.Prior(), now)
		if got == first {
			same++
		}
	}
	if same < 9 {
		t.Fatalf("the session returned to its backend %d of 10 times on an idle pool", same)
	}
	// load its backend heavily: the session goes elsewhere
	b := p.set.Get(first)
	for i := 0; i < 30; i++ {
		b.Begin(&aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 3000, OutputTokens: 500}, p.pool.Prior(), now)
	}
	if got, _ := send("alice"); got == first {
		t.Fatal("the session stayed on a backend with 30 requests queued while 3 others were idle")
	}
}

// BenchmarkSelectAffinity: ai_predictive's Select with prefix affinity, for
// a prompt of 1 KB (16 blocks) and of 64 KB (its first 128 blocks hashed),
// with one backend holding the prompt's prefix (so every backend of a pool
// up to 16 is compared) and every backend's index holding 64 other
// conversations.
func BenchmarkSelectAffinity(b *testing.B) {
	for _, n := range []int{4, 16, 64} {
		for _, kb := range []int{1, 64} {
			b.Run(fmt.Sprintf("%d/%dKB", n, kb), func(b *testing.B) {
				pool := testPool(b, n)
				p := newPredictive(2, false)
				p.affinity = true
				p.pool.SetAffinity(true)
				p.body = bodyGuard{requestBuffers: 16 << 20}
				defer p.set.Release()
				blocks := min(kb*1024/64, aibalance.MaxPrefixBlocks)
				for i, u := range pool {
					be := p.set.Get(u.Dial)
					for c := 0; c < 64; c++ {
						be.RecordPrefix(&aibalance.Features{PrefixHashes: convHashes(1000*i+c, blocks/4)}, 0, 16, 0)
					}
				}
				hashes := convHashes(7, blocks/4)
				p.set.Get(pool[n/2].Dial).RecordPrefix(&aibalance.Features{PrefixHashes: hashes[:len(hashes)/2]}, 0, 16, 0)
				r := varsRequest()
				f := p.app.Features(r)
				f.PromptTokens, f.PrefixHashes = kb*256, hashes
				p.Select(pool, r, nil)
				b.ReportAllocs()
				for b.Loop() {
					if p.Select(pool, r, nil) == nil {
						b.Fatal("nil")
					}
					f.Tried.Reset()
				}
			})
		}
	}
}

// TestHotTenantSpreads: one tenant's requests (one shared prefix) arriving
// at several times what one engine can hold in its batch spread over the
// pool once the holder's queue outweighs the prefill it saves, instead of
// queueing on it.
func TestHotTenantSpreads(t *testing.T) {
	p := newPredictive(2, true)
	p.affinity = true
	p.pool.SetAffinity(true)
	defer p.set.Release()
	pool := testPool(t, 4)
	now := time.Now()
	bt := p.app.BlockTokens()
	// every backend learned the same speed: 0.2 ms a prompt token, and
	// 400 ms for each request queued ahead
	for _, u := range pool {
		b := p.set.Get(u.Dial)
		for i := 0; i < 60; i++ {
			prompt, queued := 100+40*(i%40), i%7
			ttft := time.Duration(prompt)*time.Millisecond/5 + time.Duration(queued)*400*time.Millisecond
			b.Model().Observe(aibalance.Observation{State: aibalance.LoadState{Inflight: float64(queued), Pending: float64(queued)},
				Stream: true, PromptTokens: prompt, OutputTokens: 50, TTFT: ttft, E2E: ttft + 49*20*time.Millisecond}, 0.99, p.pool.Prior(), now)
		}
	}
	hashes := convHashes(42, 32) // a 2000-token system prompt
	per := map[string]int{}
	for i := 0; i < 48; i++ { // none finishes: the tenant's queue builds up
		r := varsRequest()
		f := p.app.Features(r)
		*f = aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 2100, OutputTokens: 100, PrefixHashes: hashes}
		u := p.Select(pool, r, nil)
		b := p.set.Get(u.Dial)
		cached := b.CachedTokens(f, bt)
		b.RecordPrefix(f, cached, bt, 0)
		b.BeginCached(f, cached, p.pool.Prior(), now)
		per[u.Dial]++
	}
	t.Logf("48 requests of one tenant in flight: %v", per)
	if len(per) < 3 {
		t.Fatalf("a hot tenant stayed on %d engines: %v", len(per), per)
	}
	for addr, n := range per {
		if n > 24 {
			t.Fatalf("%s took %d of 48: the holder must give way under load", addr, n)
		}
	}
}

// TestNearBestPrefersHolder: among near-equal scores the backend holding
// most of the prompt wins, whatever the rendezvous order; a clearly
// better score still wins over a holder.
func TestNearBestPrefersHolder(t *testing.T) {
	pool := testPool(t, 4)
	held := map[string]int{pool[2].Dial: 800}
	h := func(u *reverseproxy.Upstream) int { return held[u.Dial] }
	for key := uint64(1); key < 200; key++ {
		cands := []scored{{0, 1.00}, {1, 1.01}, {2, 1.04}, {3, 1.02}}
		if got := nearBest(pool, cands, key, h); got != 2 {
			t.Fatalf("key %d: chose %d, want the holder 2 within the band", key, got)
		}
		cands[2].s = 1.2
		if got := nearBest(pool, cands, key, h); got == 2 {
			t.Fatalf("key %d: the holder won at 20%% above the best", key)
		}
	}
}
