package aibalance

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// The latency model: per backend, two online linear regressions fitted by
// recursive least squares (RLS) with exponential forgetting.
//
//	TTFT = queueing + a0 + a1·pending + a2·pendingKTokens + a3·promptKTokens
//	TPOT = b0 + b1·running
//
// "pending" are the requests in flight at the backend that have not had
// their first token yet (queued in the engine or in prefill), and their
// prompt tokens: the balancer's own view of the engine's queue, which is
// what a new request's first token waits behind. "running" are the
// requests in flight past their first token: the decode batch, which sets
// the time per output token.
//
// Why RLS and not Peak-EWMA: an LLM request's cost is not one number. Its
// time to first token grows with the prompt and the queue in front of it, its
// decode speed falls as the batch grows, and the two differ by backend (a
// slower GPU has a steeper slope, not just a larger intercept). Peak-EWMA
// learns one latency per unit of load and cannot tell a long prompt on a fast
// backend from a short prompt on a slow one. RLS learns the slopes exactly
// for a linear model in O(d²) per observation (d = 4), forgets at a chosen
// rate so it tracks a backend whose speed changes, and predicts in a dot
// product, cheap enough for the selection hot path.
//
// Robustness:
//   - cold start: until a backend has warmupSamples observations its
//     prediction blends toward a prior (the pool-wide running averages, scaled
//     by the backend's own load), so a new backend is tried at once but
//     cannot be flooded: its predicted time grows with every request sent.
//   - staleness: confidence decays when a backend has not been observed for a
//     while, pulling it halfway back toward the prior, so a backend once
//     judged slow is explored again when the others are loaded instead of
//     starved forever, without being mistaken for an average one (exploring
//     a slow backend with a long prompt is what costs the tail).
//   - outliers: residuals are clipped at clipSigmas running deviations
//     (Huber-style) before they update the fit.
//   - windup: with forgetting and little variation in the inputs the
//     covariance grows without bound; its trace is capped.

const (
	ttftDims      = 4
	tpotDims      = 2
	warmupSamples = 12
	clipSigmas    = 3.0
	maxTrace      = 1e3
	staleAfter    = 30 * time.Second
	minStaleTrust = 0.5 // a stale backend is predicted halfway between what it was and the prior
	errWindow     = 128
)

// LoadState is what a prediction depends on besides the request itself.
type LoadState struct {
	Inflight       float64 // requests in flight at the backend (not counting this one)
	InflightTokens float64 // their estimated tokens (prompt + expected output)
	Pending        float64 // of the requests in flight, those without a first token yet
	PendingTokens  float64 // their prompt tokens
	PendingAge     float64 // how long they have waited so far, on average, in seconds
	QueueWait      float64 // anticipated wait for a batch slot, in seconds (see Backend.State)
}

// Observation is one finished attempt, as the transport measured it.
type Observation struct {
	State        LoadState     // the backend's state when the request was sent
	PromptTokens int           // estimated prompt tokens
	OutputTokens int           // output tokens produced
	TTFT         time.Duration // time to first token (or first body byte)
	E2E          time.Duration // time to the end of the response body
	Predicted    time.Duration // the model's prediction of E2E at dispatch; 0 if none
}

// rls is a recursive-least-squares fit of y = θ·x with forgetting factor λ.
type rls struct {
	theta [ttftDims]float64
	p     [ttftDims][ttftDims]float64
	dims  int
	sigma float64 // running mean absolute residual, for clipping
}

func newRLS(dims int, theta []float64) rls {
	r := rls{dims: dims}
	copy(r.theta[:], theta)
	for i := 0; i < dims; i++ {
		r.p[i][i] = 100
	}
	return r
}

func (r *rls) predict(x *[ttftDims]float64) float64 {
	var y float64
	for i := 0; i < r.dims; i++ {
		y += r.theta[i] * x[i]
	}
	return y
}

func (r *rls) update(x *[ttftDims]float64, y, lambda float64) {
	d := r.dims
	e := y - r.predict(x)
	if r.sigma == 0 {
		r.sigma = math.Abs(y) + 1e-6
	}
	if lim := clipSigmas * r.sigma; math.Abs(e) > lim {
		e = math.Copysign(lim, e)
	}
	r.sigma = 0.95*r.sigma + 0.05*math.Abs(e)

	var px [ttftDims]float64
	for i := 0; i < d; i++ {
		for j := 0; j < d; j++ {
			px[i] += r.p[i][j] * x[j]
		}
	}
	denom := lambda
	for i := 0; i < d; i++ {
		denom += x[i] * px[i]
	}
	if denom <= 0 || math.IsNaN(denom) || math.IsInf(denom, 0) {
		return
	}
	var trace float64
	for i := 0; i < d; i++ {
		k := px[i] / denom
		r.theta[i] = max(r.theta[i]+k*e, 0) // see "slopes" above
		for j := 0; j < d; j++ {
			r.p[i][j] = (r.p[i][j] - k*px[j]) / lambda
		}
		trace += r.p[i][i]
	}
	if trace > maxTrace {
		s := maxTrace / trace
		for i := 0; i < d; i++ {
			for j := 0; j < d; j++ {
				r.p[i][j] *= s
			}
		}
	}
}

// Model is one backend's learned latency model. Observe takes a per-backend
// lock; Predict reads published coefficients with atomics and takes none.
type Model struct {
	mu         sync.Mutex
	ttft, tpot rls
	apes       [errWindow]float64 // absolute percentage errors of E2E predictions
	apeN       int
	apeSum     float64

	// published for lock-free prediction
	coef     [ttftDims + tpotDims]atomic.Uint64
	samples  atomic.Int64
	lastSeen atomic.Int64 // unix nanoseconds of the last observation
	mape     atomic.Uint64
	errCount atomic.Int64
}

// Prior is the pool-wide expectation used for backends the model does not
// know yet: the running averages of TTFT and time per output token across all
// backends. It is shared by every backend in the process.
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
	if ttft <= 0 {
		ttft = defaultPriorTTFT
	}
	if tpot <= 0 {
		tpot = defaultPriorTPOT
	}
	return ttft, tpot
}

func ewmaAtomic(a *atomic.Uint64, v float64) {
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
	if tpot > 0 {
		ewmaAtomic(&p.tpot, tpot)
	}
}

func ttftFeatures(s LoadState, promptTokens int) [ttftDims]float64 {
	return [ttftDims]float64{1, s.Pending, s.PendingTokens / 1000, float64(promptTokens) / 1000}
}

func tpotFeatures(s LoadState) [ttftDims]float64 {
	return [ttftDims]float64{1, running(s)}
}

func running(s LoadState) float64 { return max(s.Inflight-s.Pending, 0) }

// queueing is the observed or anticipated wait before the engine starts a
// request: whichever of the pending requests' age and the batch-slot
// estimate is larger.
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
	e2e := ttft + float64(outputTokens)*tpot
	return Prediction{
		TTFT: secondsToDuration(ttft),
		TPOT: secondsToDuration(tpot),
		E2E:  secondsToDuration(e2e),
	}
}

// PredictSeconds is Predict's TTFT and time per output token in seconds,
// for the hot path.
func (m *Model) PredictSeconds(s LoadState, promptTokens int, prior *Prior, now time.Time) (ttft, tpot float64) {
	pTTFT, pTPOT := prior.values()
	load := s.Inflight + 1
	// the prior: pool averages, scaled by this backend's own load, so that
	// unknown backends are tried but fill up quickly in the model's eyes
	priorTTFT := pTTFT * load * (1 + float64(promptTokens)/4000)
	priorTPOT := pTPOT * load

	n := m.samples.Load()
	if n == 0 {
		return priorTTFT, priorTPOT
	}
	x := ttftFeatures(s, promptTokens)
	for i := 0; i < ttftDims; i++ {
		ttft += math.Float64frombits(m.coef[i].Load()) * x[i]
	}
	ttft += queueing(s)
	tpot = math.Float64frombits(m.coef[ttftDims].Load()) + math.Float64frombits(m.coef[ttftDims+1].Load())*running(s)
	// a linear fit can go negative outside the region it has seen
	ttft = max(ttft, 0.05*priorTTFT/load)
	tpot = max(tpot, 0.05*priorTPOT/load)

	w := min(float64(n)/warmupSamples, 1)
	if age := now.UnixNano() - m.lastSeen.Load(); age > int64(staleAfter) {
		w *= max(float64(staleAfter)/float64(age), minStaleTrust)
	}
	if w < 1 {
		ttft = w*ttft + (1-w)*priorTTFT
		tpot = w*tpot + (1-w)*priorTPOT
	}
	return ttft, tpot
}

// Observe trains the model on a finished request. lambda is the forgetting
// factor (0 < λ ≤ 1; 1 - 1/λ-memory).
func (m *Model) Observe(o Observation, lambda float64, prior *Prior, now time.Time) {
	ttft := o.TTFT.Seconds()
	e2e := o.E2E.Seconds()
	if ttft <= 0 || e2e <= 0 || e2e < ttft {
		return
	}
	tpot := -1.0
	if o.OutputTokens > 1 {
		tpot = (e2e - ttft) / float64(o.OutputTokens-1)
	}
	load := o.State.Inflight + 1
	prior.observe(ttft/(load*(1+float64(o.PromptTokens)/4000)), tpot/load)

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.samples.Load() == 0 {
		pTTFT, pTPOT := prior.values()
		m.ttft = newRLS(ttftDims, []float64{pTTFT, 0, 0, 0})
		m.tpot = newRLS(tpotDims, []float64{pTPOT, 0})
	}
	x := ttftFeatures(o.State, o.PromptTokens)
	m.ttft.update(&x, max(ttft-queueing(o.State), 0), lambda)
	if tpot > 0 {
		xt := tpotFeatures(o.State)
		m.tpot.update(&xt, tpot, lambda)
	}
	for i := 0; i < ttftDims; i++ {
		m.coef[i].Store(math.Float64bits(m.ttft.theta[i]))
	}
	for i := 0; i < tpotDims; i++ {
		m.coef[ttftDims+i].Store(math.Float64bits(m.tpot.theta[i]))
	}
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
	// per 1000 pending prompt tokens, seconds per 1000 prompt tokens; time
	// per output token and its growth per running request.
	TTFTBase              float64 `json:"ttft_base_s"`
	TTFTPerPending        float64 `json:"ttft_per_pending_s"`
	TTFTPerPendingKTokens float64 `json:"ttft_per_pending_ktokens_s"`
	TTFTPerKPrompt        float64 `json:"ttft_per_prompt_ktokens_s"`
	TPOTBase              float64 `json:"tpot_base_s"`
	TPOTPerRunning        float64 `json:"tpot_per_running_s"`
}

// Stats returns a snapshot of the model's state.
func (m *Model) Stats() ModelStats {
	c := func(i int) float64 { return math.Float64frombits(m.coef[i].Load()) }
	return ModelStats{
		Samples:               m.samples.Load(),
		MAPE:                  math.Float64frombits(m.mape.Load()),
		MAPEWindow:            m.errCount.Load(),
		TTFTBase:              c(0),
		TTFTPerPending:        c(1),
		TTFTPerPendingKTokens: c(2),
		TTFTPerKPrompt:        c(3),
		TPOTBase:              c(4),
		TPOTPerRunning:        c(5),
	}
}

func secondsToDuration(s float64) time.Duration {
	if s > float64(math.MaxInt64)/1e9 {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(s * 1e9)
}
