package aibalance

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// The latency model: per backend, one online linear regression fitted by
// recursive least squares (RLS) with exponential forgetting, over the
// coefficients of two equations that share it:
//
//	TTFT = queueing + a0 + a1·pending + a2·pendingKTokens + a3·promptKTokens + a4·kvUsage + a5·running + a6·beyond
//	TPOT = b0 + b1·running
//
// "pending" are the requests in flight at the backend that have not had
// their first token yet (queued in the engine or in prefill), and their
// prompt tokens; "running" is the decode batch, which sets the time per
// output token, and slows the prefill steps a new request shares with it;
// kvUsage is the engine's KV cache use when it reports one; "beyond" is how
// far the load with this request goes past the largest batch the balancer
// has seen the backend run: an engine's batch has a limit (vLLM's
// max_num_seqs, its KV blocks) past which a request waits for a slot, a
// knee no linear term in the load can fit. Its coefficient is learned like
// the others: a backend that is not full there teaches a6 ≈ 0, and until
// then the term is uncertain, so the optimism below still sends traffic
// past the batch seen so far and the largest batch seen keeps growing.
// When the engine's own metrics are fresh they take precedence over the
// balancer's counts (see Backend.State). queueing is observed, not fitted:
// how long pending requests have waited so far, or the engine's reported
// queue drained at its recent completion rate.
//
// Why RLS and not Peak-EWMA: an LLM request's cost is not one number. Its
// time to first token grows with the prompt and the queue in front of it, its
// decode speed falls as the batch grows, and the two differ by backend (a
// slower GPU has a steeper slope, not just a larger intercept). Peak-EWMA
// learns one latency per unit of load and cannot tell a long prompt on a fast
// backend from a short prompt on a slow one. RLS learns the slopes exactly
// for a linear model in O(d²) per observation, forgets at a chosen rate so it
// tracks a backend whose speed changes, and predicts in a dot product.
//
// What an observation teaches depends on what was seen:
//   - a stream shows its first token: one TTFT equation (on a's) and, with
//     two or more tokens, one TPOT equation (on b's);
//   - a non-streaming answer shows only its completion time: one equation
//     E2E = TTFT + (out-1)·TPOT on all coefficients at once, so the fit
//     splits the time between prefill and decode as the data allow (the
//     same joint fit is why a and b share one covariance);
//   - probes, model listings, errors, cut streams and unknown request
//     shapes teach nothing (see Attempt.End).
//
// Each kind of equation is scaled by its own running residual size before
// the update (weighted least squares): a TPOT of 20 ms and an E2E of 20 s
// then count alike, and the covariance P is in units of that noise, so
// qᵀPq is the variance of a prediction q·θ.
//
// Exploration is optimism under uncertainty (a lower confidence bound, as
// in LinUCB): a policy scores a backend by its prediction minus one standard
// deviation of it, never less than half the prediction. What the balancer
// has not observed (a backend never seen at high concurrency, a new one, a
// long prompt on a backend that only saw short ones) is uncertain, so it is
// tried; as observations come in the bonus shrinks on its own. The bound
// keeps exploration from flooding a backend: a slow backend looks at most
// twice as fast as the model believes.
//
// Robustness:
//   - cold start: until a backend has warmupSamples observations its
//     prediction blends toward its pool's prior (the running averages over
//     the pool, scaled by the backend's own load), so a new backend is tried
//     at once but cannot be flooded: its predicted time grows with every
//     request sent.
//   - staleness: confidence decays when a backend has not been observed for a
//     while, pulling it back toward the prior (halfway after a minute, nine
//     tenths after five), so a backend once judged slow — or misjudged — is
//     explored again instead of starved; one new observation restores the
//     trust, so a backend that is slow indeed costs a request or two.
//   - outliers: scaled residuals are clipped at clipSigmas (Huber-style).
//   - rounding: the covariance is kept symmetric after every update and
//     restarted if rounding makes it indefinite; a fit whose coefficients
//     run off anyway starts over from the prior (see rls.update). Without
//     this, a few thousand updates of a busy engine let P drift apart and
//     the fit diverge: a fast engine predicted at hours, then starved.
//   - windup: with forgetting and little variation in the inputs the
//     covariance grows without bound; each coefficient's variance is
//     capped at its starting value.
//   - monotone in load: no load coefficient may be negative (rls.project
//     projects θ in the fit's own metric); a prediction is floored at a
//     twentieth of the pool's idle TTFT and TPOT.

const (
	ttftDims      = 7
	tpotDims      = 2
	modelDims     = ttftDims + tpotDims
	warmupSamples = 12
	clipSigmas    = 3.0
	staleAfter    = 30 * time.Second
	minStaleTrust = 0.1 // a backend unobserved for 5 minutes is predicted nine tenths of the way back to the prior
	errWindow     = 128
	// maxOptimism bounds the exploration bonus: a score is never below
	// (1-maxOptimism) of the prediction.
	maxOptimism = 0.5
	// changeBias is the running mean of signed residuals, in noise units,
	// taken as a change of speed: unbiased noise averages near 0, and
	// ten residuals in a row past 2.5σ of one sign bring it past 1.5.
	changeBias = 1.5
)

// LoadState is what a prediction depends on besides the request itself.
type LoadState struct {
	Inflight       float64 // requests in flight at the backend (not counting this one)
	InflightTokens float64 // their estimated tokens (prompt + expected output)
	Pending        float64 // requests without a first token yet (queued or in prefill)
	PendingTokens  float64 // their prompt tokens
	PendingAge     float64 // how long our pending streams have waited so far, on average, in seconds
	QueueWait      float64 // the wait for a batch slot beyond the known capacity (observed or the engine's), at the recent completion rate, in seconds
	Running        float64 // the decode batch
	KV             float64 // the engine's KV cache use, 0..1; 0 when unknown
	Beyond         float64 // how far Inflight+1 exceeds the largest batch seen running
	Streams        float64 // our streams in flight, past their first token or waiting for it (what the batch seen counts)
}

// Observation is one finished attempt, as the transport measured it.
type Observation struct {
	State        LoadState     // the backend's state when the request was sent
	PromptTokens int           // estimated prompt tokens
	OutputTokens int           // output tokens produced
	Stream       bool          // TTFT was seen (a stream); otherwise only E2E is known
	TTFT         time.Duration // time to first token (streams)
	E2E          time.Duration // time to the end of the response body
	Predicted    time.Duration // the model's prediction of E2E at dispatch; 0 if none
}

// equation kinds, each with its own residual scale
const (
	eqTTFT = iota
	eqTPOT
	eqE2E
	eqKinds
)

// rls is a recursive-least-squares fit of y = θ·x with forgetting factor λ.
type rls struct {
	theta    [modelDims]float64
	p        [modelDims][modelDims]float64
	p0       [modelDims]float64 // initial diagonal, for the windup cap
	scale    [eqKinds]float64   // running mean absolute residual per equation kind
	ymag     [eqKinds]float64   // running mean absolute target per equation kind
	bias     [eqKinds]float64   // running mean of the scaled, signed residuals
	resets   int64              // covariance resets on a detected change
	restarts int64              // covariance restarts after rounding broke it
}

func newRLS(pTTFT, pTPOT float64) rls {
	var r rls
	r.theta[0] = pTTFT
	r.theta[ttftDims] = pTPOT
	// a prior standard deviation of each coefficient about twice the pool's
	// typical value: weak, so a few observations outweigh it
	for i := 0; i < modelDims; i++ {
		v := 2 * pTTFT
		if i >= ttftDims {
			v = 2 * pTPOT
		}
		r.p0[i] = v * v
		r.p[i][i] = r.p0[i]
	}
	return r
}

func dot(a, b *[modelDims]float64) float64 {
	var y float64
	for i := range a {
		y += a[i] * b[i]
	}
	return y
}

// update fits one equation θ·x = y of the given kind.
func (r *rls) update(x [modelDims]float64, y, lambda float64, kind int) {
	e := y - dot(&r.theta, &x)
	if r.scale[kind] == 0 {
		// the first residual sets the scale, so a prior far from the
		// truth is corrected at once instead of clipped
		r.scale[kind] = max(math.Abs(e), math.Abs(y)/2) + 1e-9
		r.ymag[kind] = math.Abs(y) + 1e-9
	}
	r.ymag[kind] = 0.95*r.ymag[kind] + 0.05*math.Abs(y)
	s := r.scale[kind]
	// a fit that has become exact would shrink the scale toward zero and
	// blow the scaled inputs up past float precision: the noise is taken
	// to be at least 1% of the targets
	r.scale[kind] = max(0.95*s+0.05*min(math.Abs(e), clipSigmas*s), 0.01*r.ymag[kind])
	// weighted least squares: scale the equation by its noise
	// a backend whose speed changed (a noisy neighbour, thermal throttling,
	// a restart with another config) leaves residuals of one sign: once
	// their running mean passes changeBias noise units, the covariance is
	// reset to its starting width, so the fit re-learns within a few
	// observations instead of forgetting the old speed over its whole
	// memory — and the exploration bonus widens with it. The noise scale
	// is widened to this residual too: a scale learned on a steady engine
	// would clip every residual of the new speed to a few percent and the
	// fit would crawl toward it (a 5× slowdown took dozens of requests)
	r.bias[kind] = 0.9*r.bias[kind] + 0.1*max(min(e/s, clipSigmas), -clipSigmas)
	if math.Abs(r.bias[kind]) > changeBias {
		for i := 0; i < modelDims; i++ {
			r.p[i][i] = max(r.p[i][i], r.width(i))
		}
		r.bias = [eqKinds]float64{}
		r.resets++
		s = max(s, math.Abs(e)/2)
		r.scale[kind] = s
	}
	for i := range x {
		x[i] /= s
	}
	e /= s
	e = max(min(e, clipSigmas), -clipSigmas)

	px := r.px(&x)
	xpx := dot(&x, &px)
	if !(xpx >= 0) || math.IsInf(xpx, 0) {
		// P is a covariance: xᵀPx < 0 means rounding in thousands of
		// rank-one updates made it indefinite, and the gain below would
		// throw θ anywhere. Restart the covariance (θ is kept).
		r.restartCovariance()
		px = r.px(&x)
		xpx = dot(&x, &px)
	}
	denom := lambda + xpx
	if denom <= 0 || math.IsNaN(denom) || math.IsInf(denom, 0) {
		return
	}
	for i := 0; i < modelDims; i++ {
		k := px[i] / denom
		r.theta[i] += k * e
		for j := 0; j < modelDims; j++ {
			r.p[i][j] = (r.p[i][j] - k*px[j]) / lambda
		}
	}
	// the update is symmetric in exact arithmetic only: keep P symmetric,
	// and restart it if rounding left a variance that is not positive
	for i := 0; i < modelDims; i++ {
		for j := i + 1; j < modelDims; j++ {
			v := (r.p[i][j] + r.p[j][i]) / 2
			r.p[i][j], r.p[j][i] = v, v
		}
		if !(r.p[i][i] > 0) || math.IsInf(r.p[i][i], 0) {
			r.restartCovariance()
			break
		}
	}
	// windup: forgetting inflates the variance of coefficients the data
	// do not excite (a KV input an engine never reports); no coefficient
	// may grow more uncertain than its starting width. Scaling row and
	// column i together keeps P symmetric positive definite.
	for i := 0; i < modelDims; i++ {
		if w := r.width(i); r.p[i][i] > w {
			f := math.Sqrt(w / r.p[i][i])
			for j := 0; j < modelDims; j++ {
				r.p[i][j] *= f
				r.p[j][i] *= f
			}
		}
	}
	r.project()
}

// loadCoefs are the coefficients of load and prompt size: none may be
// negative, or a prediction falls as the backend fills and a busy backend
// attracts more traffic the busier it is.
var loadCoefs = [...]int{1, 2, 3, 4, 5, 6, ttftDims + 1}

// project moves θ to the nearest point with no negative load coefficient,
// nearest in the metric of the fit's own uncertainty (P⁻¹): zeroing θᵢ
// moves every coefficient correlated with it by Pⱼᵢ·θᵢ/Pᵢᵢ, so the fit
// still explains what it has seen (pending requests and their tokens are
// correlated: a negative weight on one is mostly the other's). Clamping
// θᵢ alone would not, and drags the fit off. With several constraints
// active the projections are repeated; a coefficient still negative after
// that is set to 0.
func (r *rls) project() {
	for pass := 0; pass < 4; pass++ {
		moved := false
		for _, i := range loadCoefs {
			if r.theta[i] >= 0 || !(r.p[i][i] > 0) {
				continue
			}
			f := r.theta[i] / r.p[i][i]
			for j := 0; j < modelDims; j++ {
				r.theta[j] -= r.p[j][i] * f
			}
			r.theta[i] = 0
			moved = true
		}
		if !moved {
			return
		}
	}
	for _, i := range loadCoefs {
		r.theta[i] = max(r.theta[i], 0)
	}
}

// width is the largest variance coefficient i may have: its starting
// variance, or its own square if that is larger. A backend five times
// slower than the pool's prior has coefficients many starting deviations
// away; after a change of speed (or back) its fit must be free to move by
// their own size, not by the prior's.
func (r *rls) width(i int) float64 { return max(r.p0[i], r.theta[i]*r.theta[i]) }

// px is P·x.
func (r *rls) px(x *[modelDims]float64) [modelDims]float64 {
	var px [modelDims]float64
	for i := 0; i < modelDims; i++ {
		for j := 0; j < modelDims; j++ {
			px[i] += r.p[i][j] * x[j]
		}
	}
	return px
}

// restartCovariance sets P back to its starting diagonal: every
// coefficient as uncertain as at the start, θ kept.
func (r *rls) restartCovariance() {
	r.p = [modelDims][modelDims]float64{}
	for i := 0; i < modelDims; i++ {
		r.p[i][i] = r.p0[i]
	}
	r.restarts++
}

// maxCoefSpread bounds a coefficient, in starting standard deviations
// (each about twice the pool's typical TTFT or TPOT): a coefficient past
// it (an hour per pending request, say) is a fit gone numerically wrong,
// not a backend.
const maxCoefSpread = 1e4

// diverged reports a fit that must start over: a coefficient that is not
// a number or is past maxCoefSpread.
func (r *rls) diverged() bool {
	for i, v := range r.theta {
		if math.IsNaN(v) || math.IsInf(v, 0) || math.Abs(v) > maxCoefSpread*math.Sqrt(r.p0[i]) {
			return true
		}
	}
	return false
}

// fit is a published copy of the regression, read without a lock.
type fit struct {
	theta [modelDims]float64
	p     [modelDims][modelDims]float64
}

// variance is qᵀPq: the variance of the prediction θ·q.
func (f *fit) variance(q *[modelDims]float64) float64 {
	var v float64
	for i := 0; i < modelDims; i++ {
		if q[i] == 0 {
			continue
		}
		var row float64
		for j := 0; j < modelDims; j++ {
			row += f.p[i][j] * q[j]
		}
		v += q[i] * row
	}
	return max(v, 0)
}

// Model is one backend's learned latency model. Observe takes a per-backend
// lock; predictions read a published copy of the fit and take none.
type Model struct {
	mu     sync.Mutex
	r      rls
	apes   [errWindow]float64 // absolute percentage errors of E2E predictions
	apeN   int
	apeSum float64

	published atomic.Pointer[fit]
	resets    atomic.Int64
	// restarts counts numerical repairs: covariance restarts and fits
	// started over after diverging (see rls.update, rls.diverged)
	restarts    atomic.Int64
	divergences atomic.Int64
	samples     atomic.Int64
	lastSeen    atomic.Int64 // unix nanoseconds of the last observation
	mape        atomic.Uint64
	errCount    atomic.Int64
}

// Prior is a pool's expectation for backends the model does not know yet:
// the running averages of TTFT and time per output token across the pool's
// backends, per unit of load. Each pool has its own (see Pool), so pools of
// different models do not share cold-start beliefs, and only LLM work
// teaches it.
type Prior struct {
	ttft atomic.Uint64 // float64 bits, seconds
	tpot atomic.Uint64
}

// Default prior before any request has been seen: 0.5 s to first token, 20 ms
// per output token (a mid-sized model on one GPU).
const (
	defaultPriorTTFT = 0.5
	defaultPriorTPOT = 0.02
)

func (p *Prior) values() (ttft, tpot float64) {
	ttft = math.Float64frombits(p.ttft.Load())
	tpot = math.Float64frombits(p.tpot.Load())
	if ttft <= 0 || math.IsNaN(ttft) || math.IsInf(ttft, 0) {
		ttft = defaultPriorTTFT
	}
	if tpot <= 0 || math.IsNaN(tpot) || math.IsInf(tpot, 0) {
		tpot = defaultPriorTPOT
	}
	return ttft, tpot
}

// Values returns the prior's TTFT and time per output token, in seconds,
// for one request on an idle backend.
func (p *Prior) Values() (ttft, tpot float64) { return p.values() }

func ewmaAtomic(a *atomic.Uint64, v float64) {
	if v <= 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return
	}
	for {
		old := a.Load()
		f := math.Float64frombits(old)
		n := v
		if f > 0 {
			n = 0.98*f + 0.02*v
		}
		if a.CompareAndSwap(old, math.Float64bits(n)) {
			return
		}
	}
}

func (p *Prior) observe(ttft, tpot float64) {
	ewmaAtomic(&p.ttft, ttft)
	ewmaAtomic(&p.tpot, tpot)
}

func ttftFeatures(s LoadState, promptTokens int) [ttftDims]float64 {
	return [ttftDims]float64{1, s.Pending, s.PendingTokens / 1000, float64(promptTokens) / 1000, s.KV, s.Running, s.Beyond}
}

func tpotFeatures(s LoadState) [tpotDims]float64 { return [tpotDims]float64{1, s.Running} }

// query is the regressor of ttftFactor·TTFT + out·TPOT.
func query(s LoadState, promptTokens int, ttftFactor, out float64) [modelDims]float64 {
	var q [modelDims]float64
	xt, xp := ttftFeatures(s, promptTokens), tpotFeatures(s)
	for i, v := range xt {
		q[i] = ttftFactor * v
	}
	for i, v := range xp {
		q[ttftDims+i] = out * v
	}
	return q
}

// queueing is the observed or reported wait before the engine starts a
// request: whichever of the pending requests' age and the engine's queue
// is larger.
func queueing(s LoadState) float64 { return max(s.PendingAge, s.QueueWait) }

// Prediction is the model's estimate for one request on one backend.
type Prediction struct {
	TTFT time.Duration
	TPOT time.Duration
	E2E  time.Duration
}

// Predict estimates TTFT, time per output token and completion time of a
// request with the given prompt and output tokens on a backend in state s.
func (m *Model) Predict(s LoadState, promptTokens, outputTokens int, prior *Prior, now time.Time) Prediction {
	ttft, tpot := m.PredictSeconds(s, promptTokens, prior, now)
	e2e := ttft + float64(max(outputTokens-1, 0))*tpot
	return Prediction{
		TTFT: secondsToDuration(ttft),
		TPOT: secondsToDuration(tpot),
		E2E:  secondsToDuration(e2e),
	}
}

// PredictSeconds is Predict's TTFT and time per output token in seconds.
func (m *Model) PredictSeconds(s LoadState, promptTokens int, prior *Prior, now time.Time) (ttft, tpot float64) {
	e := m.estimate(s, promptTokens, prior, now)
	return e.ttft, e.tpot
}

// Score predicts ttftFactor·TTFT + outputTokens·TPOT of a request on a
// backend in state s, in seconds, and the standard deviation of that
// prediction: what a policy compares (see the exploration note above).
func (m *Model) Score(s LoadState, promptTokens int, outputTokens, ttftFactor float64, prior *Prior, now time.Time) (mean, sd float64) {
	e := m.estimate(s, promptTokens, prior, now)
	mean = ttftFactor*e.ttft + outputTokens*e.tpot
	priorMean := ttftFactor*e.priorTTFT + outputTokens*e.priorTPOT
	if e.fit == nil {
		return mean, priorMean // know nothing: as uncertain as it is large
	}
	q := query(s, promptTokens, ttftFactor, outputTokens)
	sd = e.w*math.Sqrt(e.fit.variance(&q)) + (1-e.w)*priorMean
	return mean, sd
}

// estimate is a point prediction and what it was blended from.
type estimate struct {
	ttft, tpot           float64 // the prediction, seconds: the fit's, blended toward the prior by 1-w
	priorTTFT, priorTPOT float64 // the pool's prior for this backend's load
	w                    float64 // trust in the fit: samples seen, staleness
	fit                  *fit    // nil: nothing learned, the prediction is the prior
}

// estimate predicts TTFT and TPOT of a request on a backend in state s.
//
// The fit's coefficients are used as they are: they are kept monotone in
// load by the projection of rls.project, not clamped here (clamping at
// prediction time, with correlated inputs such as pending requests and
// their tokens, drags the others off). An error that makes a backend look
// faster attracts traffic and is corrected by what that traffic teaches;
// one that makes it look slower is what the optimism of Optimistic is for.
func (m *Model) estimate(s LoadState, promptTokens int, prior *Prior, now time.Time) estimate {
	pTTFT, pTPOT := prior.values()
	load := s.Inflight + 1
	// the prior: pool averages, scaled by this backend's own load, so that
	// unknown backends are tried but fill up quickly in the model's eyes
	e := estimate{
		priorTTFT: pTTFT*load*(1+float64(promptTokens)/4000) + queueing(s),
		priorTPOT: pTPOT * load,
	}
	f := m.published.Load()
	n := m.samples.Load()
	if f == nil || n == 0 {
		e.ttft, e.tpot = e.priorTTFT, e.priorTPOT
		return e
	}
	xt, xp := ttftFeatures(s, promptTokens), tpotFeatures(s)
	var ttft, tpot float64
	for i, v := range xt {
		ttft += f.theta[i] * v
	}
	for i, v := range xp {
		tpot += f.theta[ttftDims+i] * v
	}
	// a fit never predicts a backend much faster than the pool's idle best
	ttft = max(ttft, 0.05*pTTFT) + queueing(s)
	tpot = max(tpot, 0.05*pTPOT)

	e.fit = f
	e.w = min(float64(n)/warmupSamples, 1)
	if age := now.UnixNano() - m.lastSeen.Load(); age > int64(staleAfter) {
		e.w *= max(float64(staleAfter)/float64(age), minStaleTrust)
	}
	e.ttft = e.w*ttft + (1-e.w)*e.priorTTFT
	e.tpot = e.w*tpot + (1-e.w)*e.priorTPOT
	return e
}

// Optimistic is the score a policy ranks by: the prediction less one
// standard deviation, never below (1-maxOptimism) of the prediction.
func Optimistic(mean, sd float64) float64 {
	return max(mean-sd, (1-maxOptimism)*mean)
}

// Observe trains the model on a finished request. lambda is the forgetting
// factor (0 < λ ≤ 1; 1 - 1/memory).
func (m *Model) Observe(o Observation, lambda float64, prior *Prior, now time.Time) {
	e2e := o.E2E.Seconds()
	ttft := o.TTFT.Seconds()
	if e2e <= 0 || math.IsNaN(e2e) || math.IsInf(e2e, 0) {
		return
	}
	if o.Stream && (ttft <= 0 || e2e < ttft) {
		return
	}
	out := float64(max(o.OutputTokens-1, 0))
	tpot := -1.0
	if o.Stream && out > 0 {
		tpot = (e2e - ttft) / out
	}
	load := o.State.Inflight + 1
	pTTFT, pTPOT := prior.values()
	if o.Stream {
		prior.observe((ttft-queueing(o.State))/(load*(1+float64(o.PromptTokens)/4000)), tpot/load)
	} else {
		// only the sum is known: split it at the pool's current ratio, so
		// both move with what non-streaming traffic shows (a pool that
		// only sees whole answers must still learn its per-token time, or
		// backends it has not measured look slow and are never tried)
		share := pTTFT / (pTTFT + out*pTPOT)
		tpotPart := -1.0
		if out > 0 {
			tpotPart = e2e * (1 - share) / out / load
		}
		prior.observe(e2e*share/(load*(1+float64(o.PromptTokens)/4000)), tpotPart)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.samples.Load() == 0 {
		// start from the pool's belief, which this observation just moved
		m.r = newRLS(prior.values())
	}
	xt, xp := ttftFeatures(o.State, o.PromptTokens), tpotFeatures(o.State)
	q := queueing(o.State)
	if o.Stream {
		var x [modelDims]float64
		copy(x[:], xt[:])
		m.r.update(x, max(ttft-q, 0), lambda, eqTTFT)
		if tpot > 0 {
			var x [modelDims]float64
			copy(x[ttftDims:], xp[:])
			m.r.update(x, tpot, lambda, eqTPOT)
		}
	} else {
		m.r.update(query(o.State, o.PromptTokens, 1, out), max(e2e-q, 0), lambda, eqE2E)
	}
	if m.r.diverged() {
		restarts, resets := m.r.restarts, m.r.resets
		m.r = newRLS(prior.values())
		m.r.restarts, m.r.resets = restarts+1, resets
		m.divergences.Add(1)
	}
	m.published.Store(&fit{theta: m.r.theta, p: m.r.p})
	m.resets.Store(m.r.resets)
	m.restarts.Store(m.r.restarts)
	if o.Predicted > 0 {
		ape := math.Abs(o.Predicted.Seconds()-e2e) / e2e
		slot := m.apeN % errWindow
		m.apeSum += ape - m.apes[slot]
		m.apes[slot] = ape
		m.apeN++
		m.mape.Store(math.Float64bits(m.apeSum / float64(min(m.apeN, errWindow))))
		m.errCount.Store(int64(min(m.apeN, errWindow)))
	}
	m.samples.Add(1)
	m.lastSeen.Store(now.UnixNano())
}

// ModelStats describes a model for people: how much it has seen, how wrong
// it has been lately, and what it has learned.
type ModelStats struct {
	Samples int64 `json:"samples"`
	// MAPE is the mean absolute percentage error of the last (up to 128)
	// completion-time predictions, 0..∞ (0.2 = 20% off on average).
	MAPE       float64 `json:"mape"`
	MAPEWindow int64   `json:"mape_window"`
	// Learned coefficients: seconds, seconds per pending request, seconds
	// per 1000 pending prompt tokens, seconds per 1000 prompt tokens,
	// seconds at a full KV cache, seconds per running request; time per
	// output token and its growth per running request.
	TTFTBase              float64 `json:"ttft_base_s"`
	TTFTPerPending        float64 `json:"ttft_per_pending_s"`
	TTFTPerPendingKTokens float64 `json:"ttft_per_pending_ktokens_s"`
	TTFTPerKPrompt        float64 `json:"ttft_per_prompt_ktokens_s"`
	TTFTPerKVUsage        float64 `json:"ttft_per_kv_usage_s"`
	TTFTPerRunning        float64 `json:"ttft_per_running_s"`
	TTFTPerBeyond         float64 `json:"ttft_per_beyond_batch_s"`
	TPOTBase              float64 `json:"tpot_base_s"`
	TPOTPerRunning        float64 `json:"tpot_per_running_s"`
	// Changes is how many times the model saw the backend's speed change
	// (residuals of one sign) and widened its uncertainty to re-learn.
	Changes int64 `json:"changes_detected"`
	// Repairs is how many times rounding broke the fit's covariance and
	// it was restarted, or the fit diverged and started over from the
	// pool's prior (Diverged of them).
	Repairs  int64 `json:"numeric_repairs"`
	Diverged int64 `json:"diverged"`
	// LastObserved is when the model last learned from a request.
	LastObserved time.Time `json:"last_observed,omitzero"`
}

// Stats returns a snapshot of the model's state.
func (m *Model) Stats() ModelStats {
	st := ModelStats{
		Samples:    m.samples.Load(),
		Changes:    m.resets.Load(),
		Repairs:    m.restarts.Load(),
		Diverged:   m.divergences.Load(),
		MAPE:       math.Float64frombits(m.mape.Load()),
		MAPEWindow: m.errCount.Load(),
	}
	if f := m.published.Load(); f != nil {
		st.TTFTBase, st.TTFTPerPending, st.TTFTPerPendingKTokens, st.TTFTPerKPrompt, st.TTFTPerKVUsage, st.TTFTPerRunning =
			f.theta[0], f.theta[1], f.theta[2], f.theta[3], f.theta[4], f.theta[5]
		st.TTFTPerBeyond = f.theta[6]
		st.TPOTBase, st.TPOTPerRunning = f.theta[ttftDims], f.theta[ttftDims+1]
	}
	if t := m.lastSeen.Load(); t > 0 {
		st.LastObserved = time.Unix(0, t)
	}
	return st
}

func secondsToDuration(s float64) time.Duration {
	if s > float64(math.MaxInt64)/1e9 {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(s * 1e9)
}
