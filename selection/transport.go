// Package selection holds the aibalance plugin's reverse_proxy modules: the
// AI-aware selection policies and the observing transport that teaches them.
package selection

import (
	"errors"
	"net"
	"net/http"
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
	pool  *aibalance.Pool // the handler's, for requests no policy of ours routed
	clock func() time.Time
	// requestBuffers is the handler's request_buffers: bodies it buffers
	// whole are given to each attempt afresh, so the transport may read them
	requestBuffers int64
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
	t.pool = aibalance.AcquirePool(aibalance.HandlerPoolKey(ctx))
	mods := ctx.Modules()
	for i := len(mods) - 1; i >= 0; i-- {
		if h, ok := mods[i].(*reverseproxy.Handler); ok {
			t.requestBuffers = h.RequestBuffers
			break
		}
	}
	return nil
}

// Cleanup releases the store references and the embedded transport.
func (t *Transport) Cleanup() error {
	t.set.Release()
	if t.pool != nil {
		aibalance.ReleasePool(t.pool.Key())
	}
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
	f := t.features(req)
	pool := aibalance.RequestPool(req)
	if pool == nil {
		pool = t.pool
	}
	start := t.clock()
	att := b.Begin(f, pool.Prior(), start)

	res, err := t.HTTPTransport.RoundTrip(req)
	if err != nil {
		now := t.clock()
		o := aibalance.Outcome{E2E: now.Sub(start)}
		var ne net.Error
		switch {
		case errors.As(err, new(reverseproxy.DialError)):
			o.DialError = true
		case ctx.Err() != nil:
			o.Canceled = true
		case errors.As(err, &ne) && ne.Timeout():
			o.Timeout = true
		}
		att.End(o, t.app.Lambda(), pool.Prior(), now)
		return nil, err // unchanged: Caddy decides retries by its type
	}
	outcome := aibalance.Outcome{
		Status:     res.StatusCode,
		Headers:    t.clock().Sub(start),
		RetryAfter: retryAfter(res, start),
	}
	// An upgraded connection (WebSocket, the OpenAI Realtime API) is not a
	// request/response exchange: its body must stay the read-writer Caddy
	// expects, and its life says nothing of the engine's speed.
	if res.StatusCode == http.StatusSwitchingProtocols || res.Body == nil || res.Body == http.NoBody {
		now := t.clock()
		outcome.E2E = now.Sub(start)
		att.End(outcome, t.app.Lambda(), pool.Prior(), now)
		return res, nil
	}
	res.Body = &observedBody{
		ReadCloser: res.Body,
		t:          t,
		att:        att,
		prior:      pool.Prior(),
		api:        f.API,
		sse:        isEventStream(res.Header.Get("Content-Type")),
		outcome:    outcome,
	}
	return res, nil
}

// features returns the request's features. req is this attempt's shallow
// copy of the proxy loop's request: a body read here is lost for a retry
// (a dial error, say, which Caddy retries with the same body). So these are
// the features a policy of ours read on the loop's own request; or, under
// another policy, the body's own when Caddy buffered it whole (it then
// gives every attempt a fresh reader of its buffer); or the path's alone.
func (t *Transport) features(req *http.Request) *aibalance.Features {
	cfg := t.app.FeatureConfig()
	if f := aibalance.CachedFeatures(req); f != nil {
		return f
	}
	if t.requestBuffers != 0 && req.ContentLength > 0 && (t.requestBuffers < 0 || req.ContentLength < t.requestBuffers) {
		return aibalance.RequestFeatures(req, cfg)
	}
	return aibalance.HeaderFeatures(req, cfg)
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
