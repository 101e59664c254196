package aibalance

import (
	"net/http"
	"testing"
	"time"
)

// TestRateLimitRequests: 3 requests a minute: the fourth is refused with
// Retry-After of a third of a minute less what passed, and OpenAI's
// headers count down; another key is not affected.
func TestRateLimitRequests(t *testing.T) {
	var l RateLimiter
	l.Configure(&RateLimitConfig{RequestsPerMinute: 3})
	now := time.Unix(1000, 0)
	f := &Features{PromptTokens: 10, OutputTokens: 10}
	for i := range 3 {
		ch, h, rej := l.Take(keyed("a", ""), f, now)
		if rej != nil || ch == nil {
			t.Fatalf("request %d refused: %+v", i, rej)
		}
		if got, want := h.Get("X-Ratelimit-Remaining-Requests"), []string{"2", "1", "0"}[i]; got != want {
			t.Errorf("request %d: remaining %q, want %q", i, got, want)
		}
		if h.Get("X-Ratelimit-Limit-Requests") != "3" {
			t.Errorf("limit header %q", h.Get("X-Ratelimit-Limit-Requests"))
		}
	}
	_, h, rej := l.Take(keyed("a", ""), f, now.Add(5*time.Second))
	if rej == nil || rej.Status != http.StatusTooManyRequests || rej.Code != "rate_limit_exceeded" {
		t.Fatalf("fourth: %+v", rej)
	}
	// 5s of the 20s one request takes to refill have passed
	if rej.RetryAfter < 14*time.Second || rej.RetryAfter > 16*time.Second {
		t.Errorf("Retry-After %v, want 15s", rej.RetryAfter)
	}
	if h.Get("X-Ratelimit-Remaining-Requests") != "0" || h.Get("X-Ratelimit-Reset-Requests") == "" {
		t.Errorf("headers on the 429: %v", h)
	}
	if _, _, rej := l.Take(keyed("b", ""), f, now); rej != nil {
		t.Errorf("another key refused: %+v", rej)
	}
	if _, _, rej := l.Take(keyed("a", ""), f, now.Add(21*time.Second)); rej != nil {
		t.Errorf("refilled key refused: %+v", rej)
	}
	if l.Limited() != 1 {
		t.Errorf("limited %d, want 1", l.Limited())
	}
}

// TestRateLimitTokens: the estimate is charged at admission and corrected
// to the usage when the request ends; a refund gives all back.
func TestRateLimitTokens(t *testing.T) {
	var l RateLimiter
	l.Configure(&RateLimitConfig{TokensPerMinute: 1000})
	now := time.Unix(1000, 0)
	big := &Features{PromptTokens: 100, OutputTokens: 700} // asks for 700, will use 50
	ch, h, rej := l.Take(keyed("a", ""), big, now)
	if rej != nil || h.Get("X-Ratelimit-Remaining-Tokens") != "200" {
		t.Fatalf("first: %+v %v", rej, h)
	}
	if _, _, rej := l.Take(keyed("a", ""), big, now); rej == nil {
		t.Fatal("second 800-token request fit in 200 tokens")
	}
	ch.Settle(50) // used 150: 650 given back
	ch.Settle(50) // once only
	ch2, h, rej := l.Take(keyed("a", ""), big, now)
	if rej != nil || h.Get("X-Ratelimit-Remaining-Tokens") != "50" {
		t.Fatalf("after settling: %+v remaining %s, want 50", rej, h.Get("X-Ratelimit-Remaining-Tokens"))
	}
	ch2.Refund()
	if _, h, _ := l.Take(keyed("a", ""), &Features{PromptTokens: 1}, now); h.Get("X-Ratelimit-Remaining-Tokens") != "849" {
		t.Fatalf("after refund: remaining %s, want 849", h.Get("X-Ratelimit-Remaining-Tokens"))
	}
	// a request larger than a minute's tokens goes when the bucket is full
	var l2 RateLimiter
	l2.Configure(&RateLimitConfig{TokensPerMinute: 100})
	if _, _, rej := l2.Take(keyed("a", ""), &Features{PromptTokens: 5000}, now); rej != nil {
		t.Fatalf("oversized request never goes: %+v", rej)
	}
}

// TestRateLimitKeysBounded: more keys than max_keys keep the map bounded.
func TestRateLimitKeysBounded(t *testing.T) {
	var l RateLimiter
	l.Configure(&RateLimitConfig{RequestsPerMinute: 10, MaxKeys: 64})
	now := time.Unix(1000, 0)
	f := &Features{}
	for i := range 10000 {
		l.Take(keyed(string(rune('a'+i%26))+time.Duration(i).String(), ""), f, now)
	}
	n := 0
	for i := range l.shards {
		n += len(l.shards[i].m)
	}
	if n > 64 {
		t.Fatalf("%d keys kept, max_keys 64", n)
	}
}

func TestRateLimitCheck(t *testing.T) {
	for _, bad := range []*RateLimitConfig{{}, {RequestsPerMinute: -1}, {TokensPerMinute: 5, Key: &KeySpec{Source: "nope"}}} {
		if bad.Check() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	if resetText(1500*time.Millisecond) != "2s" || resetText(120*time.Millisecond) != "120ms" || resetText(6*time.Minute) != "6m0s" {
		t.Error("reset texts")
	}
}
