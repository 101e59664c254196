// Package selection holds the aibalance plugin's reverse_proxy modules: the
// AI-aware selection policies and the observing transport that teaches them.
package selection

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/healthcheck"
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

	// Engine is the inference engine behind the upstreams, whose
	// Prometheus metrics (queue, running batch, KV cache use) are scraped
	// and used by the latency model: auto (detected from the metric names),
	// vllm, sglang, tgi, llamacpp, or none (hosted APIs that expose no
	// metrics). Default: auto.
	Engine string `json:"engine,omitempty"`
	// MetricsPath is the engines' metrics path. Default: /metrics.
	MetricsPath string `json:"metrics_path,omitempty"`
	// MetricsPort is the engines' metrics port when it is not the
	// upstream's own. Default: the upstream's port.
	MetricsPort int `json:"metrics_port,omitempty"`
	// MetricsInterval is how often each engine is scraped; values older
	// than three intervals are ignored. Default: 1s.
	MetricsInterval caddy.Duration `json:"metrics_interval,omitempty"`
	// MetricsTimeout bounds one scrape. Default: the interval, at most 2s.
	MetricsTimeout caddy.Duration `json:"metrics_timeout,omitempty"`

	// Health is how the handler's backends are judged: circuit breaker,
	// cooldown, slow start, first-byte timeout, answers retried elsewhere,
	// model discovery (see aibalance.HealthConfig). Its policies read it
	// from the handler's pool. Default: every check on, with the defaults
	// of aibalance.DefaultHealth.
	Health *aibalance.HealthConfig `json:"health,omitempty"`

	// Topology is the handler's priority tiers and zones (see
	// aibalance.Topology): standby capacity used only while the primary
	// is saturated or out, and zone-aware preference.
	Topology *aibalance.Topology `json:"topology,omitempty"`

	// Admission is the handler's overload protection (see
	// aibalance.Admission): while every backend is saturated, requests of
	// LLM work wait at the balancer in a bounded queue, fair between keys,
	// instead of in the engines' queues. Its policies (ai_predictive,
	// least_tokens) do the waiting. Default: on, 1024 requests, 30s.
	Admission *aibalance.AdmissionConfig `json:"admission,omitempty"`

	// RateLimit is the handler's per-key request and token limits (see
	// aibalance.RateLimiter). Default: none.
	RateLimit *aibalance.RateLimitConfig `json:"rate_limit,omitempty"`

	app   *aibalance.App
	set   aibalance.BackendSet
	pool  *aibalance.Pool // the handler's, for requests no policy of ours routed
	clock func() time.Time
	// body knows the handler's request_buffers: bodies it buffers whole
	// are given to each attempt afresh, so the transport may read them
	body bodyGuard

	budget retryBudget     // the handler's retries: which attempt is the last
	seen   map[string]bool // health subdirectives parsed (Caddyfile only)

	scrape  healthcheck.ScrapeConfig
	client  *http.Client
	scraped sync.Map // addr → true once a scraper was acquired (or refused)
	held    []string // addresses with a scraper reference
	heldMu  sync.Mutex
	logger  *zap.Logger
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
	t.pool = aibalance.AcquirePool(aibalance.HandlerPoolKey(ctx))
	var hc aibalance.HealthConfig
	if t.Health != nil {
		hc = *t.Health
	}
	t.pool.SetHealth(hc)
	var topo aibalance.Topology
	if t.Topology != nil {
		topo = *t.Topology
	}
	t.pool.SetTopology(topo)
	t.pool.Admission().Configure(t.Admission)
	t.pool.Limiter().Configure(t.RateLimit)
	if h := aibalance.Handler(ctx); h != nil && len(h.Upstreams) > 0 {
		static := map[string]bool{}
		for _, a := range aibalance.HandlerUpstreams(ctx) {
			static[a] = true
		}
		for _, m := range []map[string]bool{keysOf(topo.Tiers), keysOf(topo.Zones)} {
			for a := range m {
				if !static[a] {
					ctx.Logger().Warn("tier or zone given for an address that is not one of the handler's upstreams (a typo leaves the intended one in tier 0 without a zone)", zap.String("address", a))
				}
			}
		}
	}
	t.body = newBodyGuard(ctx)
	t.budget = newRetryBudget(ctx)
	t.logger = ctx.Logger()
	t.scrape = healthcheck.ScrapeConfig{
		Engine:   t.Engine,
		Path:     t.MetricsPath,
		Port:     t.MetricsPort,
		Interval: time.Duration(t.MetricsInterval),
		Timeout:  time.Duration(t.MetricsTimeout),
	}
	if t.TLSEnabled() {
		t.scrape.Scheme = "https"
	}
	t.scrape.ModelsInterval = time.Duration(t.pool.Health().ModelsInterval)
	if err := t.scrape.Validate(); err != nil {
		return fmt.Errorf("transport aibalance: %w", err)
	}
	// scrapes share the proxy's connection settings and TLS
	t.client = &http.Client{Transport: t.HTTPTransport.Transport}
	for _, addr := range aibalance.HandlerUpstreams(ctx) {
		t.set.Get(addr)
		t.pool.AddMember(addr)
		t.scrapeOnce(addr)
	}
	return nil
}

// Validate checks the engine settings.
func (t *Transport) Validate() error {
	if t.Engine != "" && !healthcheck.ValidEngine(t.Engine) {
		return fmt.Errorf("transport aibalance: unknown engine %q: want auto, vllm, sglang, tgi, llamacpp or none", t.Engine)
	}
	if t.MetricsInterval < 0 || t.MetricsTimeout < 0 || t.MetricsPort < 0 || t.MetricsPort > 65535 {
		return fmt.Errorf("transport aibalance: metrics_interval, metrics_timeout and metrics_port must not be negative (port at most 65535)")
	}
	if err := t.CheckHealth(); err != nil {
		return fmt.Errorf("transport aibalance: %w", err)
	}
	if err := t.Topology.Validate(); err != nil {
		return fmt.Errorf("transport aibalance: %w", err)
	}
	if err := t.Admission.Check(); err != nil {
		return fmt.Errorf("transport aibalance: %w", err)
	}
	if err := t.RateLimit.Check(); err != nil {
		return fmt.Errorf("transport aibalance: %w", err)
	}
	return nil
}

// scrapeOnce starts sharing the engine scraper of addr the first time the
// transport sees the address: at Provision for static upstreams, at the
// first request for dynamic ones. One scraper per address serves every
// handler and survives reloads (see healthcheck.Acquire).
func (t *Transport) scrapeOnce(addr string) {
	if _, seen := t.scraped.LoadOrStore(addr, true); seen || t.scrape.Engine == healthcheck.EngineNone {
		return
	}
	if err := healthcheck.Acquire(addr, t.scrape, t.client, t.set.Get(addr), t.logger); err != nil {
		t.logger.Debug("not scraping engine metrics", zap.String("upstream", addr), zap.Error(err))
		return
	}
	t.heldMu.Lock()
	t.held = append(t.held, addr)
	t.heldMu.Unlock()
}

// Cleanup releases the scrapers, the store references and the embedded
// transport.
func (t *Transport) Cleanup() error {
	t.heldMu.Lock()
	for _, addr := range t.held {
		healthcheck.Release(addr, t.scrape)
	}
	t.held = nil
	t.heldMu.Unlock()
	t.set.Release()
	if t.pool != nil {
		aibalance.ReleasePool(t.pool.Key())
	}
	return t.HTTPTransport.Cleanup()
}

// RoundTrip proxies req through the embedded transport and measures it.
// It is also where the health checks act on an attempt (see failover.go):
// the first-byte deadline, answers retried on another backend while the
// request has attempts left, the policy's own answers, and the clear error
// a client gets when its last attempt failed.
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
	f := t.features(req)
	if r := f.Reserved; r != nil {
		f.Reserved = nil
		r.Unreserve(f) // counted in flight by its attempt from here
	}
	pool := aibalance.RequestPool(req)
	if pool != nil && f.Reject != nil {
		rej := f.Reject
		f.Reject = nil
		if tk := f.Ticket; tk != nil {
			f.Ticket = nil
			tk.Began(t.clock())
		}
		res := rejectResponse(req, f.API, rej)
		addHeaders(res.Header, f.RateHeaders)
		return res, nil
	}
	if req.Method == http.MethodGet && req.URL.Path == "/v1/models" {
		if res := t.modelList(req, pool); res != nil {
			return res, nil
		}
	}
	b := t.set.Get(di.Upstream.Dial)
	t.scrapeOnce(di.Upstream.Dial)
	start := t.clock()
	if pool == nil {
		// another policy (Caddy's own) chose: the transport counts the
		// request's attempts itself
		pool = t.pool
		if pool.AddMember(di.Upstream.Dial) {
			t.set.RampNewcomers(pool.Members(), start)
		}
		f.Selects++
		if f.Start.IsZero() {
			f.Start = start
		}
		f.Tried.Add(di.Upstream.Dial)
	}
	hc := pool.Health()
	probe := f.Probe == di.Upstream.Dial
	if probe {
		f.Probe = ""
	}
	cached := 0
	if pool.Affinity() && (len(f.PrefixHashes) > 0 || f.SessionKey != 0) {
		// what the policy counted on, for the model to learn from the
		// prompt tokens the engine must prefill; then the prompt is
		// recorded as held there
		bt := t.app.BlockTokens()
		cached = b.CachedTokens(f, bt)
		b.RecordPrefix(f, cached, bt, t.app.PrefixLimit())
	}
	att := b.BeginCached(f, cached, pool.Prior(), start)
	if tk := f.Ticket; tk != nil {
		// an admitted request is now counted in flight: the next may go
		f.Ticket = nil
		tk.Began(start)
	}
	if ch := f.Charge; ch != nil {
		att.OnEnd = func(o aibalance.Outcome) {
			switch {
			case o.Status >= 200 && o.Status < 300 && !o.Failed():
				ch.Settle(o.OutputTokens)
			case o.Status >= 400 && o.Status < 500 && o.Status != http.StatusTooManyRequests:
				// refused as a bad request (never retried): nothing used
				ch.Refund()
			}
			// a failure another attempt may retry keeps the charge
		}
	}
	// retry reports whether Caddy's loop will try this request again
	// elsewhere if the transport hands it a dial error: attempts left, a
	// body it can send again (nothing of it read, for a refused dial), and
	// an untried backend. Asked only when the attempt failed.
	// With lb_try_duration the loop goes on trying for that long, the same
	// backend included (one restarting, say).
	retry := func(dialed bool) bool {
		return !t.budget.last(f, start) && (dialed || t.body.replayable(req)) &&
			(t.budget.tryDuration > 0 || t.elsewhere(pool, f, start))
	}

	fb := newFirstByte(t.firstByteDeadline(b, f, hc, pool.Prior(), start))
	if fb != nil {
		req = req.WithContext(fb.arm(ctx))
	}
	res, err := t.HTTPTransport.RoundTrip(req)
	if err != nil {
		timedOut := fb.stop()
		now := t.clock()
		o := aibalance.Outcome{E2E: now.Sub(start)}
		var ne net.Error
		switch {
		case errors.As(err, new(reverseproxy.DialError)):
			o.DialError = true
		case timedOut:
			o.Timeout = true
		case ctx.Err() != nil:
			o.Canceled = true
		case errors.As(err, &ne) && ne.Timeout():
			o.Timeout = true
		}
		t.end(&att, o, pool.Prior(), probe, now)
		fb.release()
		if timedOut {
			err = fb.err()
		}
		return t.failed(req, f, pool, o, err, retry(o.DialError))
	}
	outcome := aibalance.Outcome{
		Status:     res.StatusCode,
		Headers:    t.clock().Sub(start),
		RetryAfter: t.cooldown(res, hc, start),
	}
	if hc.Retries(res.StatusCode) && retry(false) {
		// another backend may answer: Caddy retries a dial error with any
		// method, and the body was never sent to the client
		fb.stop()
		healthcheck.Drain(res.Body)
		res.Body.Close()
		now := t.clock()
		outcome.E2E = now.Sub(start)
		t.end(&att, outcome, pool.Prior(), probe, now)
		fb.release()
		return nil, reverseproxy.NewDialError(fmt.Errorf("upstream %s answered %d: trying another backend", di.Upstream.Dial, res.StatusCode))
	}
	if (res.StatusCode == http.StatusTooManyRequests || res.StatusCode == http.StatusServiceUnavailable) && res.Header.Get("Retry-After") == "" {
		setRetryAfter(res.Header, soonestBack(pool, &t.set, start, hc))
	}
	// An upgraded connection (WebSocket, the OpenAI Realtime API) is not a
	// request/response exchange: its body must stay the read-writer Caddy
	// expects, and its life says nothing of the engine's speed.
	if res.StatusCode == http.StatusSwitchingProtocols || res.Body == nil || res.Body == http.NoBody {
		fb.stop()
		now := t.clock()
		outcome.E2E = now.Sub(start)
		t.end(&att, outcome, pool.Prior(), probe, now)
		fb.release()
		return res, nil
	}
	sse := isEventStream(res.Header.Get("Content-Type"))
	if fb != nil && sse && res.StatusCode < 300 {
		// a stream's headers come before its first token: wait for the
		// first body byte while the request can still go elsewhere
		if err := fb.await(res); err != nil {
			now := t.clock()
			outcome.E2E = now.Sub(start)
			outcome.StreamError, outcome.Timeout = !fb.timedOut(), fb.timedOut()
			if ctx.Err() != nil {
				outcome.Canceled, outcome.StreamError = true, false
			}
			t.end(&att, outcome, pool.Prior(), probe, now)
			fb.release()
			return t.failed(req, f, pool, outcome, err, retry(false))
		}
	}
	fb.stop()
	addHeaders(res.Header, f.RateHeaders)
	switch {
	case f.OwnerLost:
		res.Header.Set("X-Aibalance-Affinity", "lost: the backend that stored the previous response is unavailable")
	case f.OwnerUnknown:
		res.Header.Set("X-Aibalance-Affinity", "unknown: this balancer has not seen the previous response (another instance or an earlier process stored it)")
	}
	res.Body = &observedBody{
		ReadCloser: res.Body,
		t:          t,
		att:        att,
		prior:      pool.Prior(),
		api:        f.API,
		sse:        sse,
		outcome:    outcome,
		probe:      probe,
		cancel:     fb.releaseFunc(),
	}
	if f.API == aibalance.APIResponses && res.StatusCode < 300 {
		ob := res.Body.(*observedBody)
		ob.owner = di.Upstream.Dial
		if f.Conversation != "" {
			aibalance.RecordOwner("conversation:"+f.Conversation, ob.owner, start)
		}
	}
	return res, nil
}

// end ends an attempt: its backend's counters and model, and its breaker.
func (t *Transport) end(att *aibalance.Attempt, o aibalance.Outcome, prior *aibalance.Prior, probe bool, now time.Time) {
	att.End(o, t.app.Lambda(), prior, now)
	t.pool.Admission().Kick(now) // a slot may have freed
	hc := t.pool.Health()
	healthcheck.For(att.Backend()).Record(o, probe, now, hc, t.logger)
	if hc.OutlierFactor > 1 && t.pool.Due(now, healthcheck.OutlierInterval) {
		healthcheck.EjectOutliers(t.pool, t.set.Get, now, hc, t.logger)
	}
}

// features returns the request's features. req is this attempt's shallow
// copy of the proxy loop's request: a body read here is lost for a retry
// (a dial error, say, which Caddy retries with the same body). So these are
// the features a policy of ours read on the loop's own request; or, under
// another policy, the body's own when Caddy buffered it whole (it then
// gives every attempt a fresh reader of its buffer); or the path's alone.
func (t *Transport) features(req *http.Request) *aibalance.Features {
	// both return the features already cached in the request's vars
	if req.ContentLength > 0 && t.body.wholeBuffered(req) {
		return aibalance.RequestFeatures(req, t.app.FeatureConfig())
	}
	return aibalance.HeaderFeatures(req, t.app.FeatureConfig())
}

// CheckHealth checks the health options, alone and against the engine
// options (for adapt-time errors as well as Validate).
func (t *Transport) CheckHealth() error {
	if t.Health == nil {
		return nil
	}
	if err := t.Health.Validate(); err != nil {
		return err
	}
	if t.Engine == healthcheck.EngineNone && t.Health.ModelsInterval > 0 {
		return fmt.Errorf("model_discovery reads /v1/models with the engine scraper, which engine none turns off")
	}
	return nil
}

// UnmarshalCaddyfile sets up the transport from Caddyfile tokens. It takes
// the engine-metrics subdirectives and every subdirective of the http
// transport:
//
//	transport aibalance {
//	    engine           auto|vllm|sglang|tgi|llamacpp|none
//	    metrics_path     <path>
//	    metrics_port     <port>
//	    metrics_interval <duration>
//	    metrics_timeout  <duration>
//	    <http transport subdirectives>
//	}
func (t *Transport) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume transport name
	header := d.Token()
	tokens := []caddyfile.Token{header}
	for d.NextArg() {
		tokens = append(tokens, d.Token())
	}
	open := header
	open.Text = "{"
	tokens = append(tokens, open)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		handled, err := t.unmarshalEngine(d)
		if err != nil {
			return err
		}
		if !handled {
			tokens = append(tokens, d.NextSegment()...)
		}
	}
	if err := t.CheckHealth(); err != nil {
		return d.Errf("transport aibalance: %v", err)
	}
	closing := header // not a copy of the last token, which may be quoted
	closing.Text, closing.Line = "}", tokens[len(tokens)-1].Line+1
	tokens = append(tokens, closing)
	return t.HTTPTransport.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens))
}

// UnmarshalEngineOption parses one engine-metrics subdirective (engine,
// metrics_path, metrics_port, metrics_interval, metrics_timeout) at d,
// reporting whether it was one. ai_proxy takes them at its top level.
func (t *Transport) UnmarshalEngineOption(d *caddyfile.Dispenser) (bool, error) {
	return t.unmarshalEngine(d)
}

// unmarshalEngine parses one engine-metrics or health subdirective,
// reporting whether it was one.
func (t *Transport) unmarshalEngine(d *caddyfile.Dispenser) (bool, error) {
	key := d.Val()
	switch key {
	case "engine", "metrics_path", "metrics_port", "metrics_interval", "metrics_timeout":
	default:
		return t.unmarshalHealth(d)
	}
	if !d.NextArg() {
		return true, d.ArgErr()
	}
	val := d.Val()
	if d.NextArg() {
		return true, d.ArgErr()
	}
	dup := func(set bool) error {
		if set {
			return d.Errf("%s already specified", key)
		}
		return nil
	}
	switch key {
	case "engine":
		if err := dup(t.Engine != ""); err != nil {
			return true, err
		}
		if !healthcheck.ValidEngine(val) {
			return true, d.Errf("engine: want auto, vllm, sglang, tgi, llamacpp or none, got %q", val)
		}
		t.Engine = val
	case "metrics_path":
		if err := dup(t.MetricsPath != ""); err != nil {
			return true, err
		}
		if !strings.HasPrefix(val, "/") {
			return true, d.Errf("metrics_path: want a path starting with /, got %q", val)
		}
		t.MetricsPath = val
	case "metrics_port":
		if err := dup(t.MetricsPort != 0); err != nil {
			return true, err
		}
		n, err := strconv.Atoi(val)
		if err != nil || n < 1 || n > 65535 {
			return true, d.Errf("metrics_port: want a port from 1 to 65535, got %q", val)
		}
		t.MetricsPort = n
	case "metrics_interval", "metrics_timeout":
		target := &t.MetricsInterval
		if key == "metrics_timeout" {
			target = &t.MetricsTimeout
		}
		if err := dup(*target != 0); err != nil {
			return true, err
		}
		v, err := caddy.ParseDuration(val)
		if err != nil || v <= 0 {
			return true, d.Errf("%s: want a positive duration such as 1s, got %q", key, val)
		}
		*target = caddy.Duration(v)
	}
	return true, nil
}

// Interface guards
var (
	_ http.RoundTripper                                = (*Transport)(nil)
	_ caddy.Provisioner                                = (*Transport)(nil)
	_ caddy.Validator                                  = (*Transport)(nil)
	_ caddy.CleanerUpper                               = (*Transport)(nil)
	_ caddyfile.Unmarshaler                            = (*Transport)(nil)
	_ reverseproxy.TLSTransport                        = (*Transport)(nil)
	_ reverseproxy.H2CTransport                        = (*Transport)(nil)
	_ reverseproxy.HealthCheckSchemeOverriderTransport = (*Transport)(nil)
)

// keysOf is the set of a map's keys.
func keysOf[V any](m map[string]V) map[string]bool {
	out := make(map[string]bool, len(m))
	for k := range m {
		out[k] = true
	}
	return out
}

// addHeaders sets each of h's headers on dst (the x-ratelimit-* headers of
// a rate-limited handler).
func addHeaders(dst, h http.Header) {
	for k, v := range h {
		dst[k] = v
	}
}
