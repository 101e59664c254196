// Package selection holds the aibalance plugin's reverse_proxy modules: the
// AI-aware selection policies and the observing transport that teaches them.
package selection

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

func init() {
	caddy.RegisterModule(new(Transport))
}

// Transport is Caddy's HTTP transport that also measures every attempt
// against the upstream it went to: requests and estimated tokens in flight,
// time to response headers, time to first token (the first server-sent event
// carrying content, or the first body byte of other answers), completion
// time, output tokens (counted from the stream or read from the usage
// object), status, Retry-After, dial errors and timeouts. The measurements
// train each upstream's latency model in the aibalance app.
//
// Every option of the standard http transport works unchanged, in JSON and
// in the Caddyfile:
//
//	transport aibalance {
//	    <any http transport subdirective>
//	}
//
// Responses are never buffered or delayed: the body is observed as Caddy
// copies it to the client. Errors are returned as they come, so Caddy's retry
// logic (dial errors, timeouts) is unchanged. Active health checks pass
// through unmeasured.
type Transport struct {
	reverseproxy.HTTPTransport

	app   *aibalance.App
	set   aibalance.BackendSet
	clock func() time.Time
}

// CaddyModule returns the Caddy module information.
func (*Transport) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.transport.aibalance",
		New: func() caddy.Module { return new(Transport) },
	}
}

// Provision sets up the embedded HTTP transport and takes references to the
// handler's upstreams in the shared store.
func (t *Transport) Provision(ctx caddy.Context) error {
	if err := t.HTTPTransport.Provision(ctx); err != nil {
		return err
	}
	app, err := aibalance.Load(ctx)
	if err != nil {
		return err
	}
	t.app = app
	if t.clock == nil {
		t.clock = time.Now
	}
	for _, addr := range aibalance.HandlerUpstreams(ctx) {
		t.set.Get(addr)
	}
	return nil
}

// Cleanup releases the store references and the embedded transport.
func (t *Transport) Cleanup() error {
	t.set.Release()
	return t.HTTPTransport.Cleanup()
}

// RoundTrip proxies req through the embedded transport and measures it.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	di, ok := reverseproxy.GetDialInfo(ctx)
	// Active health checks are not user traffic. Their context has no
	// request variables: the server sets those per request. (It may carry
	// the server itself: Caddy's http app puts it in the provisioning
	// context that health checks derive from.)
	if !ok || di.Upstream == nil || ctx.Value(caddyhttp.VarsCtxKey) == nil {
		return t.HTTPTransport.RoundTrip(req)
	}
	b := t.set.Get(di.Upstream.Dial)
	f := t.app.Features(req)
	start := t.clock()
	att := b.Begin(f, t.app.Prior(), start)

	res, err := t.HTTPTransport.RoundTrip(req)
	if err != nil {
		now := t.clock()
		o := aibalance.Outcome{E2E: now.Sub(start)}
		var ne net.Error
		switch {
		case errors.As(err, new(reverseproxy.DialError)):
			o.DialError = true
		case errors.As(err, &ne) && ne.Timeout():
			o.Timeout = true
		case ctx.Err() != nil:
			o.Canceled = true
		}
		att.End(o, t.app.Lambda(), t.app.Prior(), now)
		return nil, err // unchanged: Caddy decides retries by its type
	}
	ob := &observedBody{
		ReadCloser: res.Body,
		t:          t,
		att:        att,
		sse:        isEventStream(res.Header.Get("Content-Type")),
		outcome: aibalance.Outcome{
			Status:     res.StatusCode,
			Headers:    t.clock().Sub(start),
			RetryAfter: retryAfter(res, start),
		},
	}
	if res.Body == nil || res.Body == http.NoBody {
		ob.finish(nil)
		return res, nil
	}
	res.Body = ob
	return res, nil
}

// UnmarshalCaddyfile sets up the transport from Caddyfile tokens. It takes
// every subdirective of the http transport:
//
//	transport aibalance {
//	    <http transport subdirectives>
//	}
func (t *Transport) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	return t.HTTPTransport.UnmarshalCaddyfile(d)
}

func isEventStream(contentType string) bool {
	return len(contentType) >= 17 && contentType[:17] == "text/event-stream"
}

// retryAfter reads a 429/503 answer's Retry-After: seconds or an HTTP date.
func retryAfter(res *http.Response, now time.Time) time.Duration {
	if res.StatusCode != http.StatusTooManyRequests && res.StatusCode != http.StatusServiceUnavailable {
		return 0
	}
	v := res.Header.Get("Retry-After")
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(v); err == nil {
		return time.Duration(max(secs, 0)) * time.Second
	}
	if when, err := http.ParseTime(v); err == nil && when.After(now) {
		return when.Sub(now)
	}
	return 0
}

// observedBody watches a response body as Caddy copies it to the client.
// It reads nothing on its own and holds on to nothing but a bounded carry of
// one partial SSE line and the last bytes of a JSON answer.
type observedBody struct {
	io.ReadCloser
	t       *Transport
	att     aibalance.Attempt
	sse     bool
	outcome aibalance.Outcome
	once    sync.Once

	bytes  int64
	events int    // SSE events that carried content
	usage  int    // usage.completion_tokens, when seen
	carry  []byte // partial SSE line (bounded)
	tail   []byte // last bytes of a non-SSE body (bounded)
}

const (
	maxCarry = 4 << 10
	maxTail  = 512
)

func (o *observedBody) Read(p []byte) (int, error) {
	n, err := o.ReadCloser.Read(p)
	if n > 0 {
		if o.bytes == 0 && !o.sse {
			o.outcome.TTFT = o.t.clock().Sub(o.att.Start())
			o.att.FirstToken()
		}
		o.bytes += int64(n)
		if o.sse {
			o.scanSSE(p[:n])
		} else {
			o.keepTail(p[:n])
		}
	}
	if err != nil {
		if err == io.EOF {
			o.finish(nil)
		} else {
			o.finish(err)
		}
	}
	return n, err
}

// Close ends the observation; a body closed before its end was cut short
// by the client or by Caddy, not by the backend.
func (o *observedBody) Close() error {
	o.finish(errClosedEarly)
	return o.ReadCloser.Close()
}

var errClosedEarly = errors.New("closed before the end")

func (o *observedBody) finish(err error) {
	o.once.Do(func() {
		now := o.t.clock()
		out := o.outcome
		out.E2E = now.Sub(o.att.Start())
		switch {
		case err == errClosedEarly:
			out.Canceled = true
		case err != nil:
			out.StreamError = true
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				out.Timeout = true
			}
		}
		switch {
		case o.usage > 0:
			out.OutputTokens = o.usage
		case o.sse:
			out.OutputTokens = o.events
		default:
			out.OutputTokens = int(o.bytes / int64(max(o.t.app.FeatureConfig().CharsPerToken, 1)))
			if u := usageIn(o.tail); u > 0 {
				out.OutputTokens = u
			}
		}
		if out.TTFT == 0 && o.bytes > 0 {
			out.TTFT = out.E2E
		}
		o.att.End(out, o.t.app.Lambda(), o.t.app.Prior(), now)
	})
}

func (o *observedBody) keepTail(p []byte) {
	if len(p) >= maxTail {
		o.tail = append(o.tail[:0], p[len(p)-maxTail:]...)
		return
	}
	if over := len(o.tail) + len(p) - maxTail; over > 0 {
		o.tail = append(o.tail[:0], o.tail[over:]...)
	}
	o.tail = append(o.tail, p...)
}

// scanSSE splits p into lines (joining a line split across reads) and looks
// at each "data:" line.
func (o *observedBody) scanSSE(p []byte) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			if room := maxCarry - len(o.carry); room > 0 {
				o.carry = append(o.carry, p[:min(len(p), room)]...)
			}
			return
		}
		line := p[:i]
		if len(o.carry) > 0 {
			if room := maxCarry - len(o.carry); room > 0 {
				o.carry = append(o.carry, line[:min(len(line), room)]...)
			}
			line = o.carry
		}
		o.sseLine(line)
		o.carry = o.carry[:0]
		p = p[i+1:]
	}
}

var (
	dataPrefix   = []byte("data:")
	usageKey     = []byte(`"completion_tokens":`)
	contentKey   = []byte(`"content":"`)
	textKey      = []byte(`"text":"`)
	doneSentinel = []byte("[DONE]")
)

func (o *observedBody) sseLine(line []byte) {
	data, ok := bytes.CutPrefix(line, dataPrefix)
	if !ok {
		return
	}
	data = bytes.TrimSpace(data)
	if bytes.Equal(data, doneSentinel) {
		return
	}
	if u := usageIn(data); u > 0 {
		o.usage = u
	}
	if hasContent(data, contentKey) || hasContent(data, textKey) {
		if o.events == 0 {
			o.outcome.TTFT = o.t.clock().Sub(o.att.Start())
			o.att.FirstToken()
		}
		o.events++
	}
}

// hasContent reports whether key is followed by a non-empty string.
func hasContent(data, key []byte) bool {
	i := bytes.Index(data, key)
	return i >= 0 && i+len(key) < len(data) && data[i+len(key)] != '"'
}

// usageIn finds "completion_tokens": N in b.
func usageIn(b []byte) int {
	i := bytes.LastIndex(b, usageKey)
	if i < 0 {
		return 0
	}
	b = bytes.TrimLeft(b[i+len(usageKey):], " ")
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' || n > 1<<30 {
			break
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// Interface guards
var (
	_ http.RoundTripper                                = (*Transport)(nil)
	_ caddy.Provisioner                                = (*Transport)(nil)
	_ caddy.CleanerUpper                               = (*Transport)(nil)
	_ caddyfile.Unmarshaler                            = (*Transport)(nil)
	_ reverseproxy.TLSTransport                        = (*Transport)(nil)
	_ reverseproxy.H2CTransport                        = (*Transport)(nil)
	_ reverseproxy.HealthCheckSchemeOverriderTransport = (*Transport)(nil)
)
