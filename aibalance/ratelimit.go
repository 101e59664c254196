package aibalance

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Token-aware rate limits: per key (see KeySpec), requests and tokens per
// minute, each a token bucket that holds a minute's allowance and refills
// continuously. A request is charged at admission its estimated tokens
// (prompt plus expected output, see Features.Tokens); when it ends, the
// charge is corrected to the prompt estimate plus the output tokens the
// transport counted, so a request that asked for 4000 tokens and got 50
// gives the difference back. Answers carry OpenAI's x-ratelimit-* headers;
// a request over a limit gets 429 rate_limit_exceeded with Retry-After.
//
// The buckets live in the process: each Caddy instance limits what it
// sees. Across instances, the same buckets would be kept in a shared store
// (Caddy's storage is too slow per request; a Redis INCRBY per key and
// minute, or each instance taking limit/N with N from the pool's
// membership, are the usual ways); see README.

const (
	rateShards     = 32
	defaultMaxKeys = 100000
)

// RateLimitConfig is a handler's rate limits (JSON under the transport's
// "rate_limit").
type RateLimitConfig struct {
	// Key is what a limit applies to (see KeySpec). Default: api_key.
	Key *KeySpec `json:"key,omitempty"`
	// RequestsPerMinute per key; 0: no request limit.
	RequestsPerMinute int `json:"requests_per_minute,omitempty"`
	// TokensPerMinute per key, prompt plus output; 0: no token limit.
	TokensPerMinute int `json:"tokens_per_minute,omitempty"`
	// MaxKeys bounds the keys tracked at once. A key idle for a minute
	// has a full bucket and is forgotten first. Default: 100000.
	MaxKeys int `json:"max_keys,omitempty"`
}

// Check reports a config that cannot work.
func (c *RateLimitConfig) Check() error {
	if c == nil {
		return nil
	}
	if c.RequestsPerMinute < 0 || c.TokensPerMinute < 0 || c.MaxKeys < 0 {
		return fmt.Errorf("rate_limit: limits must not be negative")
	}
	if c.RequestsPerMinute == 0 && c.TokensPerMinute == 0 {
		return fmt.Errorf("rate_limit: set requests_per_minute, tokens_per_minute or both")
	}
	return c.Key.Check()
}

type bucket struct {
	req, tok float64 // what is left
	at       time.Time
}

type rateShard struct {
	mu sync.Mutex
	m  map[uint64]*bucket
}

// RateLimiter is a handler's per-key limits.
type RateLimiter struct {
	cfg     atomic.Pointer[RateLimitConfig]
	shards  [rateShards]rateShard
	limited atomic.Uint64
}

// Configure applies cfg; nil turns the limits off.
func (l *RateLimiter) Configure(cfg *RateLimitConfig) { l.cfg.Store(cfg) }

// On reports whether limits apply.
func (l *RateLimiter) On() bool { return l != nil && l.cfg.Load() != nil }

// Limited counts the requests refused.
func (l *RateLimiter) Limited() uint64 { return l.limited.Load() }

// RateCharge is one admitted request's charge, settled when it ends.
type RateCharge struct {
	l      *RateLimiter
	key    uint64
	prompt int
	tokens float64 // charged
	done   atomic.Bool
}

// Take charges the request to its key: nil and the answer's headers when
// it may go, else the 429 to give.
func (l *RateLimiter) Take(r *http.Request, f *Features, now time.Time) (*RateCharge, http.Header, *Reject) {
	cfg := l.cfg.Load()
	if cfg == nil {
		return nil, nil, nil
	}
	key := KeyHash(cfg.Key.Of(r, f))
	est := float64(f.Tokens())
	if cfg.TokensPerMinute > 0 {
		// a request larger than a minute's tokens may go when the
		// bucket is full, or it could never go
		est = min(est, float64(cfg.TokensPerMinute))
	}
	sh := &l.shards[key%rateShards]
	sh.mu.Lock()
	b := sh.m[key]
	if b == nil {
		if sh.m == nil {
			sh.m = map[uint64]*bucket{}
		}
		l.evict(sh, cfg, now)
		b = &bucket{req: float64(cfg.RequestsPerMinute), tok: float64(cfg.TokensPerMinute), at: now}
		sh.m[key] = b
	}
	refill(b, cfg, now)
	var wait time.Duration
	var which []string
	if cfg.RequestsPerMinute > 0 && b.req < 1 {
		wait = max(wait, perMinute(1-b.req, cfg.RequestsPerMinute))
		which = append(which, fmt.Sprintf("%d requests per minute", cfg.RequestsPerMinute))
	}
	if cfg.TokensPerMinute > 0 && b.tok < est {
		wait = max(wait, perMinute(est-b.tok, cfg.TokensPerMinute))
		t := fmt.Sprintf("%d tokens per minute: this request is estimated at %d tokens (prompt and max_tokens), %d are left", cfg.TokensPerMinute, f.Tokens(), max(int(b.tok), 0))
		if float64(f.Tokens()) > float64(cfg.TokensPerMinute) {
			t = fmt.Sprintf("%d tokens per minute: this request is estimated at %d tokens (prompt and max_tokens), more than a minute's budget; it goes when the budget is full", cfg.TokensPerMinute, f.Tokens())
		}
		which = append(which, t)
	}
	if wait > 0 {
		h := headers(b, cfg)
		sh.mu.Unlock()
		l.limited.Add(1)
		return nil, h, &Reject{
			Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: "rate_limit_exceeded",
			Message:    fmt.Sprintf("Rate limit reached for this key (%s); retry after the time given", strings.Join(which, "; ")),
			RetryAfter: wait,
		}
	}
	if cfg.RequestsPerMinute > 0 {
		b.req--
	}
	if cfg.TokensPerMinute > 0 {
		b.tok -= est
	}
	h := headers(b, cfg)
	sh.mu.Unlock()
	return &RateCharge{l: l, key: key, prompt: f.PromptTokens, tokens: est}, h, nil
}

// Settle corrects the charge to the tokens the request used: its prompt
// estimate plus the output counted (output < 0: unknown, the estimate
// stands). Only the first call of Settle or Refund counts.
func (c *RateCharge) Settle(output int) {
	if c == nil || output < 0 || c.done.Swap(true) {
		return
	}
	c.giveBack(0, c.tokens-float64(c.prompt+output))
}

// Refund gives the whole charge back: the request was not served.
func (c *RateCharge) Refund() {
	if c == nil || c.done.Swap(true) {
		return
	}
	c.giveBack(1, c.tokens)
}

// giveBack returns requests and tokens to the key's bucket (tokens < 0
// charges more), which never holds more than a minute's allowance.
func (c *RateCharge) giveBack(requests, tokens float64) {
	cfg := c.l.cfg.Load()
	if cfg == nil {
		return
	}
	sh := &c.l.shards[c.key%rateShards]
	sh.mu.Lock()
	if b := sh.m[c.key]; b != nil {
		if cfg.RequestsPerMinute > 0 {
			b.req = min(b.req+requests, float64(cfg.RequestsPerMinute))
		}
		if cfg.TokensPerMinute > 0 {
			b.tok = min(b.tok+tokens, float64(cfg.TokensPerMinute))
		}
	}
	sh.mu.Unlock()
}

// refill adds what the time since b.at earned, up to a minute's allowance.
func refill(b *bucket, cfg *RateLimitConfig, now time.Time) {
	dt := now.Sub(b.at).Minutes()
	if dt <= 0 {
		return
	}
	b.at = now
	b.req = min(b.req+dt*float64(cfg.RequestsPerMinute), float64(cfg.RequestsPerMinute))
	b.tok = min(b.tok+dt*float64(cfg.TokensPerMinute), float64(cfg.TokensPerMinute))
}

func perMinute(amount float64, limit int) time.Duration {
	return time.Duration(amount / float64(limit) * float64(time.Minute))
}

// evict keeps the shard within its share of MaxKeys: keys idle for a
// minute first (their buckets are full: forgetting them changes nothing),
// then any.
func (l *RateLimiter) evict(sh *rateShard, cfg *RateLimitConfig, now time.Time) {
	limit := cfg.MaxKeys
	if limit <= 0 {
		limit = defaultMaxKeys
	}
	limit = max(limit/rateShards, 1)
	if len(sh.m) < limit {
		return
	}
	for k, b := range sh.m {
		if now.Sub(b.at) > time.Minute {
			delete(sh.m, k)
		}
	}
	for k := range sh.m {
		if len(sh.m) < limit {
			break
		}
		delete(sh.m, k)
	}
}

// headers are OpenAI's rate limit headers for b's state.
func headers(b *bucket, cfg *RateLimitConfig) http.Header {
	h := http.Header{}
	if n := cfg.RequestsPerMinute; n > 0 {
		h.Set("X-Ratelimit-Limit-Requests", strconv.Itoa(n))
		h.Set("X-Ratelimit-Remaining-Requests", strconv.Itoa(max(int(math.Floor(b.req)), 0)))
		h.Set("X-Ratelimit-Reset-Requests", resetText(perMinute(float64(n)-b.req, n)))
	}
	if n := cfg.TokensPerMinute; n > 0 {
		h.Set("X-Ratelimit-Limit-Tokens", strconv.Itoa(n))
		h.Set("X-Ratelimit-Remaining-Tokens", strconv.Itoa(max(int(math.Floor(b.tok)), 0)))
		h.Set("X-Ratelimit-Reset-Tokens", resetText(perMinute(float64(n)-b.tok, n)))
	}
	return h
}

// resetText is a duration as OpenAI writes it: "1s", "6m0s", "120ms".
func resetText(d time.Duration) string {
	if d <= 0 {
		return "0s"
	}
	if d < time.Second {
		return strconv.Itoa(max(int(d/time.Millisecond), 1)) + "ms"
	}
	return d.Round(time.Second).String()
}

// Limiter is the pool's rate limiter (off until the handler's transport
// configures it).
func (p *Pool) Limiter() *RateLimiter { return &p.limiter }
