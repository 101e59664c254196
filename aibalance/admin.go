package aibalance

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves the balancer's view of its upstreams on Caddy's admin
// endpoint, so Caddy's admin access controls apply:
//
//	GET   /aibalance/upstreams            every upstream and pool
//	GET   /aibalance/upstreams/{address}  one upstream
//	PATCH /aibalance/upstreams/{address}  {"weight": 3}, {"drain": true}
//	                                      (see Override)
//	GET    /aibalance/pools                          the dynamic pools
//	GET    /aibalance/pools/{pool}                   one of them
//	POST   /aibalance/pools/{pool}/members           {"address": "host:port"}
//	DELETE /aibalance/pools/{pool}/members/{address} drain, then forget
//	GET    /aibalance/ui/                            the dashboard (and data.json)
//
// It reads the process-wide store; it holds no state of its own (Caddy
// rebuilds admin modules on every config load).
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.aibalance",
		New: func() caddy.Module { return adminAPI{} },
	}
}

// Routes returns the admin routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/aibalance/upstreams", Handler: caddy.AdminHandlerFunc(a.handleList)},
		{Pattern: "/aibalance/upstreams/", Handler: caddy.AdminHandlerFunc(a.handleOne)},
		{Pattern: "/aibalance/pools", Handler: caddy.AdminHandlerFunc(a.handlePools)},
		{Pattern: "/aibalance/pools/", Handler: caddy.AdminHandlerFunc(a.handlePools)},
		{Pattern: "/aibalance/ui/", Handler: caddy.AdminHandlerFunc(serveUI)},
	}
}

// UpstreamsView is the answer of GET /aibalance/upstreams.
type UpstreamsView struct {
	Upstreams []UpstreamView `json:"upstreams"`
	Pools     []PoolView     `json:"pools"`
}

// PoolView describes one pool: its members and its cold-start prior.
type PoolView struct {
	Key     string   `json:"key"`
	Members []string `json:"members"`
	// Tiers is the standby state when the pool has tiers: the highest
	// tier open, the utilisation of the open tiers, and why.
	Tiers *TierStatus `json:"tiers,omitempty"`
	// Scaling is the pool's scaling signal (see ScalingConfig).
	Scaling *ScalingStatus `json:"scaling,omitempty"`
	// Admission is the pool's admission queue (see Admission), when on.
	Admission *AdmissionStats `json:"admission,omitempty"`
	// RateLimited counts requests refused by the rate limits.
	RateLimited uint64  `json:"rate_limited,omitempty"`
	PriorTTFT   float64 `json:"prior_ttft_s"`
	PriorTPOT   float64 `json:"prior_tpot_s"`
	RecentTotal float64 `json:"recent_requests_per_s"`
}

// UpstreamView is the balancer's view of one upstream.
type UpstreamView struct {
	Address string `json:"address"`
	// State is what the balancer does with the upstream now: active;
	// cooldown (it answered 429/503: nothing until Until); open (its
	// circuit breaker opened: nothing until Until, then probes); half_open
	// (a few probe requests decide); ejected (an outlier: far slower than
	// its peers at the same load); slow_start (back or new: its share of
	// its weight ramps up until Until). Reason says why; Since, when the
	// state began where known.
	// draining and drained: the operator drains it (admin API); no new
	// request goes there, and it is drained once none is in flight.
	// standby: its tier is closed (see aibalance.Topology).
	State  string    `json:"state"`
	Reason string    `json:"reason,omitempty"`
	Since  time.Time `json:"since,omitzero"`
	Until  time.Time `json:"until,omitzero"`
	// Weight is its weight in its pool now; WeightSource says where it
	// comes from: admin (PATCH, kept across reloads) or config.
	Weight       float64 `json:"weight"`
	WeightSource string  `json:"weight_source"`
	// Tier is its priority tier (0: primary); Zone its zone label.
	Tier int    `json:"tier"`
	Zone string `json:"zone,omitempty"`
	// Breaker is the circuit breaker's own state: closed, open or
	// half_open (absent before the first attempt).
	Breaker string `json:"breaker,omitempty"`
	// Models are the models the engine lists at /v1/models, with their
	// context lengths (0: not given); absent when unknown.
	Models map[string]int `json:"models,omitempty"`
	// Load is the model's input now: the balancer's counts, with the
	// engine's own figures where they are fresh.
	Load LoadView `json:"load"`
	// Engine is the last scrape of the engine's metrics, with its age.
	Engine *EngineView `json:"engine,omitempty"`
	// Predicted is what the model predicts now for a reference request
	// (500 prompt tokens, 200 output tokens) on this upstream.
	Predicted PredictionView `json:"predicted"`
	// Latency is its TTFT and E2E percentiles, from its histograms.
	Latency LatencyView `json:"latency"`
	// FailureRate is the recent share of attempts that failed through the
	// upstream's fault (decays over about 20 s).
	FailureRate float64 `json:"failure_rate"`
	// RecentRate is LLM requests per second sent to the upstream over the
	// last ten seconds (probes, listings and unreadable requests are not
	// counted); RecentShare is its part of its pool's.
	RecentRate  float64      `json:"recent_requests_per_s"`
	RecentShare float64      `json:"recent_share"`
	Counters    BackendStats `json:"counters"`
}

// LoadView is an upstream's load as the model sees it.
type LoadView struct {
	Inflight       float64 `json:"inflight"`
	InflightTokens float64 `json:"inflight_tokens"`
	Pending        float64 `json:"pending"`
	Running        float64 `json:"running"`
	PendingAge     float64 `json:"pending_age_s"`
	QueueWait      float64 `json:"queue_wait_s"`
	KV             float64 `json:"kv_usage"`
}

// EngineView is an engine's last scraped metrics.
type EngineView struct {
	Engine  string   `json:"engine"`
	Waiting *float64 `json:"waiting,omitempty"`
	Running *float64 `json:"running,omitempty"`
	KVUsage *float64 `json:"kv_usage,omitempty"`
	Age     float64  `json:"age_s"`
	Fresh   bool     `json:"fresh"`
}

// PredictionView is a prediction in seconds.
type PredictionView struct {
	TTFT float64 `json:"ttft_s"`
	TPOT float64 `json:"tpot_s"`
	E2E  float64 `json:"e2e_s"`
}

// View returns the balancer's view of every upstream and pool at now.
func View(now time.Time) UpstreamsView {
	v := UpstreamsView{Upstreams: []UpstreamView{}, Pools: []PoolView{}}
	poolOf := map[string]*Pool{}
	poolRate := map[*Pool]float64{}
	for _, p := range AllPools() {
		pv := PoolView{Key: p.key, Members: p.Members()}
		pv.PriorTTFT, pv.PriorTPOT = p.prior.values()
		if p.HasTiers() {
			ts := p.Tiers()
			pv.Tiers = &ts
		}
		if st := p.Scaling(); st.Recommended > 0 {
			pv.Scaling = &st
		}
		if p.admission.On() {
			st := p.admission.Stats(now)
			pv.Admission = &st
		}
		pv.RateLimited = p.limiter.Limited()
		for _, m := range pv.Members {
			if _, ok := poolOf[m]; !ok {
				poolOf[m] = p
			}
			if b, ok := LookupBackend(m); ok {
				pv.RecentTotal += b.RecentRate(now)
			}
		}
		poolRate[p] = pv.RecentTotal
		if pv.Members == nil {
			pv.Members = []string{}
		}
		v.Pools = append(v.Pools, pv)
	}
	// members of dynamic pools the balancer has not routed to yet
	for _, dp := range AllDynamicPools() {
		hp := dp.handlerPool()
		if hp == nil {
			continue
		}
		for _, m := range dp.Members() {
			if _, ok := poolOf[m.Address]; !ok {
				poolOf[m.Address] = hp
			}
		}
	}
	for _, b := range AllBackends() {
		var prior *Prior
		p := poolOf[b.addr]
		if p == nil && len(poolOf) > 0 {
			// in no pool: a dynamic member removed since, still held by
			// the handler that routed to it until the next reload
			continue
		}
		if p != nil {
			prior = &p.prior
		} else {
			prior = new(Prior)
		}
		u := b.view(now, prior, p.Health())
		u.Weight, u.WeightSource = 1, "config"
		if p != nil {
			u.Weight = p.Weight(b.addr)
			u.Tier, u.Zone = p.Tier(b.addr), p.Zone(b.addr)
			if ts := p.Tiers(); u.State == "active" && p.HasTiers() && u.Tier > ts.Open {
				u.State = "standby"
				u.Reason = fmt.Sprintf("tier %d: takes requests while tiers 0–%d are at %.0f%% utilisation or more (now %.0f%%), or out", u.Tier, u.Tier-1, 100*p.Topology().StandbyThreshold, 100*ts.Utilisation)
			}
		}
		if _, ok := AdminWeight(b.addr); ok {
			u.WeightSource = "admin"
		}
		if p != nil && poolRate[p] > 0 {
			u.RecentShare = u.RecentRate / poolRate[p]
		}
		v.Upstreams = append(v.Upstreams, u)
	}
	return v
}

func (b *Backend) view(now time.Time, prior *Prior, hc *HealthConfig) UpstreamView {
	s := b.State(now)
	u := UpstreamView{
		Address:     b.addr,
		State:       "active",
		FailureRate: b.FailureRate(now),
		RecentRate:  b.RecentRate(now),
		Counters:    b.Stats(),
		Load: LoadView{
			Inflight: s.Inflight, InflightTokens: s.InflightTokens, Pending: s.Pending, Running: s.Running,
			PendingAge: s.PendingAge, QueueWait: s.QueueWait, KV: s.KV,
		},
	}
	var br HealthStatus
	if k := b.Breaker(nil); k != nil {
		br = k.Status(now)
		u.Breaker = br.State
	}
	ramping, rampFrom := b.Ramping(now, time.Duration(hc.SlowStart))
	ejected, ejectWhy, ejectUntil := b.Ejected(now)
	o, _ := OverrideOf(b.addr)
	switch {
	case o.Drain && s.Inflight > 0:
		u.State, u.Since = "draining", o.DrainSince
		u.Reason = fmt.Sprintf("drained through the admin API: no new requests, %.0f in flight", s.Inflight)
	case o.Drain:
		u.State, u.Since = "drained", o.DrainSince
		u.Reason = "drained through the admin API: no new requests, none in flight"
	case b.CoolingDown(now):
		u.State, u.Since, u.Until = "cooldown", b.CooldownSince(), b.Cooldown()
		u.Reason = fmt.Sprintf("answered 429/503: out for %s (its Retry-After, capped by max_cooldown, or the configured cooldown)", u.Until.Sub(u.Since).Round(time.Millisecond))
	case ejected:
		u.State, u.Reason, u.Until = "ejected", ejectWhy, ejectUntil
		u.Since = ejectUntil.Add(-time.Duration(hc.EjectionDuration))
	case br.State == "open" || br.State == "half_open":
		u.State, u.Reason, u.Since, u.Until = br.State, br.Reason, br.Since, br.Until
		if br.State == "half_open" {
			u.Until = time.Time{}
		}
	case ramping:
		u.State, u.Since = "slow_start", rampFrom
		u.Until = rampFrom.Add(time.Duration(hc.SlowStart))
		u.Reason = fmt.Sprintf("ramping up after joining, a restart or a recovery: %.0f%% of its weight", 100*b.Ramp(now, time.Duration(hc.SlowStart), hc.SlowStartMin))
	}
	if m := b.Models(); m != nil {
		u.Models = m.Context
	}
	if m, fresh := b.Engine(now); !m.At.IsZero() {
		e := &EngineView{Engine: m.Engine, Age: now.Sub(m.At).Seconds(), Fresh: fresh}
		if m.HasWaiting {
			e.Waiting = &m.Waiting
		}
		if m.HasRunning {
			e.Running = &m.Running
		}
		if m.HasKV {
			e.KVUsage = &m.KVUsage
		}
		u.Engine = e
	}
	u.Latency = b.latency()
	pr := b.model.Predict(s, 500, 200, prior, now)
	u.Predicted = PredictionView{TTFT: finite(pr.TTFT.Seconds()), TPOT: finite(pr.TPOT.Seconds()), E2E: finite(pr.E2E.Seconds())}
	u.Counters.Model.MAPE = finite(u.Counters.Model.MAPE)
	return u
}

// finite keeps JSON encodable: NaN and ±Inf have no JSON form.
func finite(f float64) float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return -1
	}
	return f
}

func (adminAPI) handleList(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return notAllowed(w, r, "GET", "GET")
	}
	return writeJSON(w, View(time.Now()))
}

func (adminAPI) handleOne(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet && r.Method != http.MethodPatch {
		return notAllowed(w, r, "GET, PATCH", "GET or PATCH")
	}
	addr, err := url.PathUnescape(strings.TrimPrefix(r.URL.Path, "/aibalance/upstreams/"))
	if err != nil || addr == "" || strings.Contains(addr, "/") {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("want /aibalance/upstreams/<host:port>, got %q", r.URL.Path)}
	}
	if _, ok := LookupBackend(addr); !ok {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no upstream %q in any loaded config", addr)}
	}
	if r.Method == http.MethodPatch {
		p, err := readPatch(r)
		if err != nil {
			return asAPIError(err)
		}
		now := time.Now()
		SetOverride(addr, func(o *Override) {
			if p.Weight != nil {
				o.Weight = *p.Weight
			}
			if p.Drain != nil && *p.Drain != o.Drain {
				o.Drain, o.DrainSince = *p.Drain, now
				if !o.Drain {
					o.DrainSince = time.Time{}
				}
			}
		})
		if c := caddy.Log().Named("aibalance.admin").Check(zap.InfoLevel, "upstream changed"); c != nil {
			c.Write(zap.String("upstream", addr), zap.Any("weight", p.Weight), zap.Any("drain", p.Drain))
		}
	}
	for _, u := range View(time.Now()).Upstreams {
		if u.Address == addr {
			return writeJSON(w, u)
		}
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no upstream %q in any loaded config", addr)}
}

// upstreamPatch is the body of PATCH /aibalance/upstreams/{address}: the
// fields given change, the others stay. "weight": a number from 0.01 to
// 1000, or 0 to go back to the config's; "drain": true or false.
type upstreamPatch struct {
	Weight *float64 `json:"weight"`
	Drain  *bool    `json:"drain"`
}

// maxPatchBody bounds a PATCH body.
const maxPatchBody = 64 << 10

func readPatch(r *http.Request) (upstreamPatch, error) {
	var p upstreamPatch
	if err := readAdminJSON(r, &p, `{"weight": 3} or {"drain": true}`); err != nil {
		return p, err
	}
	if p.Weight == nil && p.Drain == nil {
		return p, fmt.Errorf(`nothing to change: give "weight" and/or "drain"`)
	}
	if w := p.Weight; w != nil && (math.IsNaN(*w) || *w < 0 || *w > 1000 || (*w > 0 && *w < 0.01)) {
		return p, fmt.Errorf(`"weight" must be from 0.01 to 1000 (0: back to the config's weight), got %v`, *w)
	}
	return p, nil
}

// readAdminJSON decodes an admin request's body, read as JSON whatever
// its Content-Type says (curl -d sends application/x-www-form-urlencoded),
// into v: one JSON value, no unknown fields, at most maxPatchBody bytes
// (413 beyond). want is an example of a good body, for the error.
func readAdminJSON(r *http.Request, v any, want string) error {
	raw, err := io.ReadAll(io.LimitReader(r.Body, maxPatchBody+1))
	if err != nil {
		return fmt.Errorf("reading the body: %v", err)
	}
	if len(raw) > maxPatchBody {
		return caddy.APIError{HTTPStatus: http.StatusRequestEntityTooLarge, Err: fmt.Errorf("body larger than %d bytes", maxPatchBody)}
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if err == io.EOF {
			return fmt.Errorf("empty body: want a JSON object such as %s", want)
		}
		return fmt.Errorf("bad JSON body: %v (want an object such as %s)", err, want)
	}
	if dec.More() {
		return fmt.Errorf("bad JSON body: more than one value")
	}
	return nil
}

// asAPIError is err as the admin API's answer: its own status when it
// has one, else 400.
func asAPIError(err error) error {
	var ae caddy.APIError
	if errors.As(err, &ae) {
		return ae
	}
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
}

// notAllowed answers 405 with the Allow header and what to use instead.
func notAllowed(w http.ResponseWriter, r *http.Request, allow, use string) error {
	w.Header().Set("Allow", allow)
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed: use %s", r.Method, use)}
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// DynamicPoolView is a dynamic pool in GET /aibalance/pools: its members,
// each with its source (config or api) and its upstream state (see
// UpstreamView; "removing" members are draining or drained).
type DynamicPoolView struct {
	Pool    string              `json:"pool"`
	Members []DynamicMemberView `json:"members"`
}

// DynamicMemberView is one member of a dynamic pool.
type DynamicMemberView struct {
	Member
	State    string  `json:"state"`
	Reason   string  `json:"reason,omitempty"`
	Inflight float64 `json:"inflight"`
}

func dynamicPoolView(p *DynamicPool, now time.Time) DynamicPoolView {
	v := DynamicPoolView{Pool: p.Name(), Members: []DynamicMemberView{}}
	view := map[string]UpstreamView{}
	for _, u := range View(now).Upstreams {
		view[u.Address] = u
	}
	for _, m := range p.Members() {
		u, ok := view[m.Address]
		mv := DynamicMemberView{Member: m, State: u.State, Reason: u.Reason, Inflight: u.Load.Inflight}
		if !ok {
			mv.State = "active"
		}
		v.Members = append(v.Members, mv)
	}
	return v
}

// memberRequest is the body of POST /aibalance/pools/{pool}/members.
type memberRequest struct {
	Address string   `json:"address"`
	Weight  *float64 `json:"weight"`
}

func (adminAPI) handlePools(w http.ResponseWriter, r *http.Request) error {
	now := time.Now()
	rest := strings.Trim(strings.TrimPrefix(r.URL.Path, "/aibalance/pools"), "/")
	parts := strings.Split(rest, "/")
	if rest == "" {
		if r.Method != http.MethodGet {
			return notAllowed(w, r, "GET", "GET")
		}
		out := []DynamicPoolView{}
		for _, p := range AllDynamicPools() {
			out = append(out, dynamicPoolView(p, now))
		}
		return writeJSON(w, out)
	}
	name, err := url.PathUnescape(parts[0])
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("bad pool name in %q", r.URL.Path)}
	}
	p, ok := LookupDynamicPool(name)
	if !ok {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no dynamic pool %q: declare it with `dynamic aibalance %s` in a reverse_proxy or ai_proxy", name, name)}
	}
	switch {
	case len(parts) == 1:
		if r.Method != http.MethodGet {
			return notAllowed(w, r, "GET", "GET")
		}
		return writeJSON(w, dynamicPoolView(p, now))
	case len(parts) == 2 && parts[1] == "members":
		if r.Method != http.MethodPost {
			return notAllowed(w, r, "POST", `POST with {"address": "host:port"}`)
		}
		var req memberRequest
		if err := readAdminJSON(r, &req, `{"address": "host:port"}, optionally with "weight"`); err != nil {
			return asAPIError(err)
		}
		if err := CheckAddress(req.Address); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
		}
		if wt := req.Weight; wt != nil && (math.IsNaN(*wt) || *wt < 0.01 || *wt > 1000) {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf(`"weight" must be from 0.01 to 1000, got %v`, *wt)}
		}
		if req.Weight != nil {
			SetOverride(req.Address, func(o *Override) { o.Weight = *req.Weight })
		}
		_, created := p.Add(req.Address, now)
		if c := caddy.Log().Named("aibalance.admin").Check(zap.InfoLevel, "pool member added"); c != nil {
			c.Write(zap.String("pool", name), zap.String("upstream", req.Address), zap.Bool("new", created))
		}
		if created {
			w.WriteHeader(http.StatusCreated)
		}
		return writeJSON(w, dynamicPoolView(p, now))
	case len(parts) == 3 && parts[1] == "members":
		if r.Method != http.MethodDelete {
			return notAllowed(w, r, "DELETE", "DELETE")
		}
		addr, err := url.PathUnescape(parts[2])
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("bad address in %q", r.URL.Path)}
		}
		if _, ok := p.Remove(addr, now); !ok {
			return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("%q is not a member of pool %q", addr, name)}
		}
		if c := caddy.Log().Named("aibalance.admin").Check(zap.InfoLevel, "pool member removed"); c != nil {
			c.Write(zap.String("pool", name), zap.String("upstream", addr))
		}
		return writeJSON(w, dynamicPoolView(p, now))
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no route %s: want /aibalance/pools[/{pool}[/members[/{address}]]]", r.URL.Path)}
}

// Interface guards
var _ caddy.AdminRouter = adminAPI{}
