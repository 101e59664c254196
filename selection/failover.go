package selection

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/healthcheck"
)

// This file is the transport's part of failover: how long an attempt may
// wait for its first byte, which answers are retried on another backend,
// and what a client gets when no attempt is left.

// Auto first-byte deadline (HealthConfig.FirstByteTimeout 0): a multiple of
// the model's own prediction for this request on this backend — its queue
// and batch included, so a request legitimately queued on a busy engine is
// given the time its queue needs — and never less than a floor that covers
// what a prediction cannot know (a cold engine, a model loading). A
// streaming request's first byte is its first token; a non-streaming
// answer's is its headers, sent when the whole answer is ready, so its
// deadline covers the output the request allows (its own limit, else at
// least autoOutputFloor tokens).
const (
	autoFactor       = 4
	autoFloor        = 10 * time.Second
	autoFloorWhole   = 30 * time.Second
	autoOutputFloor  = 4096
	maxAutoFirstByte = time.Hour
)

// firstByteDeadline is how long the attempt may wait for its first byte;
// 0: no limit. Requests that are not LLM work (model listings, uploads,
// unknown paths) get none in auto mode: nothing predicts them.
func (t *Transport) firstByteDeadline(b *aibalance.Backend, f *aibalance.Features, hc *aibalance.HealthConfig, prior *aibalance.Prior, now time.Time) time.Duration {
	switch {
	case hc.FirstByteTimeout < 0:
		return 0
	case hc.FirstByteTimeout > 0:
		return time.Duration(hc.FirstByteTimeout)
	case !f.Work():
		return 0
	}
	s := b.State(now)
	if f.Stream {
		p := b.Model().Predict(s, f.PromptTokens, f.OutputTokens, prior, now)
		return min(max(autoFactor*p.TTFT, autoFloor), maxAutoFirstByte)
	}
	out := f.OutputLimit
	if out <= 0 {
		out = max(f.OutputTokens, autoOutputFloor)
	}
	p := b.Model().Predict(s, f.PromptTokens, out, prior, now)
	return min(max(autoFactor*p.E2E, autoFloorWhole), maxAutoFirstByte)
}

// firstByte is an attempt's first-byte timer: it cancels the attempt's
// context when the deadline passes before the first byte. A nil
// *firstByte (no deadline) does nothing.
type firstByte struct {
	d      time.Duration
	timer  *time.Timer
	cancel context.CancelFunc
	fired  atomic.Bool
	head   [1]byte
}

func newFirstByte(d time.Duration) *firstByte {
	if d <= 0 {
		return nil
	}
	return &firstByte{d: d}
}

// arm starts the timer and returns the attempt's context.
func (fb *firstByte) arm(parent context.Context) context.Context {
	ctx, cancel := context.WithCancel(parent)
	fb.cancel = cancel
	fb.timer = time.AfterFunc(fb.d, func() {
		fb.fired.Store(true)
		cancel()
	})
	return ctx
}

// stop stops the timer, reporting whether it had fired.
func (fb *firstByte) stop() bool {
	if fb == nil {
		return false
	}
	fb.timer.Stop()
	return fb.fired.Load()
}

func (fb *firstByte) timedOut() bool { return fb != nil && fb.fired.Load() }

// release cancels the attempt's context: call it when the attempt is over.
func (fb *firstByte) release() {
	if fb != nil {
		fb.cancel()
	}
}

// releaseFunc is release for the body that outlives RoundTrip.
func (fb *firstByte) releaseFunc() context.CancelFunc {
	if fb == nil {
		return nil
	}
	return fb.cancel
}

// await reads the stream's first byte under the timer and puts it back in
// front of the body. An error (the deadline, a cut) closes the body.
func (fb *firstByte) await(res *http.Response) error {
	for {
		n, err := res.Body.Read(fb.head[:])
		if n > 0 {
			res.Body = &prefixed{head: fb.head[:n], ReadCloser: res.Body}
			return nil
		}
		if err != nil {
			res.Body.Close()
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			if fb.fired.Load() {
				return fb.err()
			}
			return err
		}
	}
}

// err is the error of an attempt whose first byte did not come in time.
// It is a dial error to Caddy, which retries those with any method: no
// byte went to the client, and request_buffers replays the body.
func (fb *firstByte) err() error {
	return reverseproxy.NewDialError(&firstByteTimeout{d: fb.d})
}

type firstByteTimeout struct{ d time.Duration }

func (e *firstByteTimeout) Error() string {
	return fmt.Sprintf("no first byte from the upstream within %s (first_byte_timeout)", e.d)
}
func (e *firstByteTimeout) Timeout() bool   { return true }
func (e *firstByteTimeout) Temporary() bool { return true }

// prefixed is a body with bytes already read put back in front.
type prefixed struct {
	head []byte
	io.ReadCloser
}

func (p *prefixed) Read(b []byte) (int, error) {
	if len(p.head) > 0 {
		n := copy(b, p.head)
		p.head = p.head[n:]
		return n, nil
	}
	return p.ReadCloser.Read(b)
}

// cooldown is the pause a 429/503 answer asks for: its Retry-After (capped
// by max_cooldown), or the configured cooldown when it gives none.
func (t *Transport) cooldown(res *http.Response, hc *aibalance.HealthConfig, now time.Time) time.Duration {
	if res.StatusCode != http.StatusTooManyRequests && res.StatusCode != http.StatusServiceUnavailable {
		return 0
	}
	d := retryAfter(res, now)
	if d <= 0 {
		d = time.Duration(hc.Cooldown)
	}
	return min(d, time.Duration(hc.MaxCooldown))
}

// elsewhere reports whether a retry of the request has somewhere to go: a
// member of the pool it has not tried that serves its model and is not
// cooling down. An open breaker does not count: when every backend is out,
// the policy's panic mode sends the retry to one anyway, and the retry is
// as good a chance as the attempt that just failed.
func (t *Transport) elsewhere(pool *aibalance.Pool, f *aibalance.Features, now time.Time) bool {
	for _, addr := range pool.Members() {
		if f.Tried.Has(addr) {
			continue
		}
		b := t.set.Get(addr)
		if b.CoolingDown(now) {
			continue
		}
		if f.Model != "" {
			if _, serves, _ := b.Serves(f.Model); !serves {
				continue
			}
		}
		return true
	}
	return false
}

// failed returns what Caddy gets for an attempt that failed before its
// first byte: with retry, the error as a dial error, which Caddy retries
// with any method (a reused connection the backend closed, a reset before
// the headers or a first-byte timeout is as safe to retry as a refused
// dial: no byte reached the client, and the body can be sent again);
// otherwise, on the request's last attempt, an answer in the API's error
// shape (502, or 504 for a timeout) with the soonest time a backend is
// expected back, never an empty body. A client that went away gets the
// error.
func (t *Transport) failed(req *http.Request, f *aibalance.Features, pool *aibalance.Pool, o aibalance.Outcome, err error, retry bool) (*http.Response, error) {
	if o.Canceled {
		return nil, err
	}
	if retry {
		if !errors.As(err, new(reverseproxy.DialError)) {
			err = reverseproxy.NewDialError(err)
		}
		return nil, err
	}
	now := t.clock()
	rej := &aibalance.Reject{
		Status: http.StatusBadGateway, Type: "upstream_error", Code: "upstream_failed",
		Message:    fmt.Sprintf("every attempt to reach a backend failed (tried %d); last: %v", max(f.Tried.Len(), 1), err),
		RetryAfter: soonestBack(pool, &t.set, now, pool.Health()),
	}
	if o.Timeout {
		rej.Status, rej.Code = http.StatusGatewayTimeout, "upstream_timeout"
	}
	t.logger.Warn("request failed on every attempt", zap.Int("tried", f.Tried.Len()), zap.Error(err))
	return rejectResponse(req, f.API, rej), nil
}

// soonestBack is how long until a member of the pool is expected to take
// requests again: the soonest end of a cooldown or an open breaker, at
// least a second; a second when one is available now.
func soonestBack(pool *aibalance.Pool, set *aibalance.BackendSet, now time.Time, hc *aibalance.HealthConfig) time.Duration {
	soonest := time.Duration(0)
	for _, addr := range pool.Members() {
		b := set.Get(addr)
		var until time.Time
		if b.CoolingDown(now) {
			until = b.Cooldown()
		}
		if br := healthcheck.Of(b); hc.BreakerOn() && br != nil && br.Open(now) {
			if u := br.Status(now).Until; u.After(until) {
				until = u
			}
		}
		d := until.Sub(now)
		if until.IsZero() {
			d = 0
		}
		if soonest == 0 || d < soonest {
			soonest = d
		}
		if d <= 0 {
			break
		}
	}
	return max(soonest, time.Second)
}

func setRetryAfter(h http.Header, d time.Duration) {
	secs := max(int((d+time.Second-1)/time.Second), 1)
	h.Set("Retry-After", strconv.Itoa(secs))
}

// rejectResponse is the balancer's own answer, in the error shape of the
// API the request called: Anthropic's for the Messages API, OpenAI's for
// the others.
func rejectResponse(req *http.Request, api aibalance.API, rej *aibalance.Reject) *http.Response {
	var body any
	status := rej.Status
	if api == aibalance.APIMessages {
		if rej.Code == aibalance.CodeOverloaded {
			status = 529 // Anthropic's overloaded_error
		}
		typ := map[int]string{400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}[status]
		if typ == "" {
			typ = "api_error"
		}
		body = map[string]any{"type": "error", "error": map[string]any{"type": typ, "message": rej.Message}}
	} else {
		body = map[string]any{"error": map[string]any{"message": rej.Message, "type": rej.Type, "param": nil, "code": rej.Code}}
	}
	b, _ := json.Marshal(body)
	b = append(b, '\n')
	h := http.Header{}
	h.Set("X-Aibalance-Error", rej.Code)
	if rej.RetryAfter > 0 {
		setRetryAfter(h, rej.RetryAfter)
	}
	return jsonResponse(req, status, h, b)
}

// jsonResponse is an answer the balancer gives itself, without a backend:
// status, the headers h, and the JSON body b.
func jsonResponse(req *http.Request, status int, h http.Header, b []byte) *http.Response {
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	return &http.Response{
		Status:        fmt.Sprintf("%d %s", status, http.StatusText(status)),
		StatusCode:    status,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Body:          io.NopCloser(bytes.NewReader(b)),
		ContentLength: int64(len(b)),
		Request:       req,
	}
}

// modelList answers GET /v1/models for the whole pool when every member's
// models are known: the union of what they serve, in the OpenAI list
// shape, each with the largest context a member gives it. One backend's
// own list would hide the models only the others serve. nil: pass the
// request through (some member's models are unknown).
func (t *Transport) modelList(req *http.Request, pool *aibalance.Pool) *http.Response {
	if pool == nil {
		pool = t.pool
	}
	members := pool.Members()
	if len(members) == 0 {
		return nil
	}
	ctx := map[string]int{}
	var created int64
	for _, addr := range members {
		m := t.set.Get(addr).Models()
		if m == nil {
			return nil
		}
		for id, c := range m.Context {
			ctx[id] = max(ctx[id], c)
		}
		created = max(created, m.At.Unix())
	}
	ids := make([]string, 0, len(ctx))
	for id := range ctx {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	data := make([]map[string]any, 0, len(ids))
	for _, id := range ids {
		e := map[string]any{"id": id, "object": "model", "created": created, "owned_by": "aibalance"}
		if ctx[id] > 0 {
			e["max_model_len"] = ctx[id]
		}
		data = append(data, e)
	}
	b, _ := json.Marshal(map[string]any{"object": "list", "data": data})
	h := http.Header{}
	h.Set("X-Aibalance-Models", "pool")
	return jsonResponse(req, http.StatusOK, h, b)
}
