package aibalance

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Prometheus metrics, in Caddy's registry (the admin endpoint's /metrics).
//
// One collector reads the process-wide store when scraped: the counters
// and histograms live on the backends, which outlive config loads, so a
// reload neither resets them nor registers anything twice (each config
// load has its own registry; the collector is registered in each).
// Nothing is added to the request path beyond the histogram counts.

// latencyBuckets are the histogram bounds in seconds: first tokens take
// milliseconds to seconds, whole answers up to minutes.
var latencyBuckets = [...]float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// latencyHist is a lock-free histogram of durations.
type latencyHist struct {
	counts [len(latencyBuckets) + 1]atomic.Uint64 // the last: above every bound
	sum    atomic.Int64                           // nanoseconds
}

func (h *latencyHist) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(latencyBuckets) && s > latencyBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

// snapshot is the cumulative bucket counts, the count and the sum in
// seconds, as Prometheus wants them.
func (h *latencyHist) snapshot() (map[float64]uint64, uint64, float64) {
	b := make(map[float64]uint64, len(latencyBuckets))
	var n uint64
	for i, le := range latencyBuckets {
		n += h.counts[i].Load()
		b[le] = n
	}
	n += h.counts[len(latencyBuckets)].Load()
	return b, n, time.Duration(h.sum.Load()).Seconds()
}

// quantile estimates the q-quantile (0..1) of the histogram by linear
// interpolation within its bucket; 0 when empty. Above the last bound it
// answers the last bound.
func (h *latencyHist) quantile(q float64) float64 {
	var counts [len(latencyBuckets) + 1]uint64
	var n uint64
	for i := range counts {
		counts[i] = h.counts[i].Load()
		n += counts[i]
	}
	if n == 0 {
		return 0
	}
	rank := q * float64(n)
	var cum float64
	lo := 0.0
	for i, c := range counts {
		if i == len(latencyBuckets) {
			return latencyBuckets[len(latencyBuckets)-1]
		}
		hi := latencyBuckets[i]
		if cum+float64(c) >= rank && c > 0 {
			return lo + (hi-lo)*(rank-cum)/float64(c)
		}
		cum += float64(c)
		lo = hi
	}
	return lo
}

// LatencyView is an upstream's latency percentiles in seconds, estimated
// from its histograms (successful LLM requests since it was first seen).
type LatencyView struct {
	TTFTP50 float64 `json:"ttft_p50_s"`
	TTFTP90 float64 `json:"ttft_p90_s"`
	TTFTP99 float64 `json:"ttft_p99_s"`
	E2EP50  float64 `json:"e2e_p50_s"`
	E2EP90  float64 `json:"e2e_p90_s"`
	E2EP99  float64 `json:"e2e_p99_s"`
}

func (b *Backend) latency() LatencyView {
	return LatencyView{
		TTFTP50: b.ttftHist.quantile(0.5), TTFTP90: b.ttftHist.quantile(0.9), TTFTP99: b.ttftHist.quantile(0.99),
		E2EP50: b.e2eHist.quantile(0.5), E2EP90: b.e2eHist.quantile(0.9), E2EP99: b.e2eHist.quantile(0.99),
	}
}

// upstreamStates are the values of the state label (see UpstreamView).
var upstreamStates = []string{"active", "standby", "draining", "drained", "cooldown", "open", "half_open", "ejected", "slow_start"}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("caddy_aibalance_"+name, help, append([]string{"upstream"}, labels...), nil)
}

var (
	mRequests     = desc("upstream_requests_total", "Attempts the balancer sent to the upstream (retries count once each).")
	mInflight     = desc("upstream_in_flight_requests", "Requests in flight to the upstream, as the balancer counts them.")
	mResponses    = desc("upstream_responses_total", "Answers by HTTP status class.", "class")
	mErrors       = desc("upstream_errors_total", "Failed attempts by kind: dial (refused or reset before an answer), timeout (first byte), status_429, status_5xx, stream (cut after the first byte), other.", "kind")
	mTTFT         = desc("upstream_time_to_first_token_seconds", "Time to the first token of successful streamed LLM requests.")
	mE2E          = desc("upstream_request_duration_seconds", "Time to the end of the answer of successful LLM requests.")
	mPromptTokens = desc("upstream_prompt_tokens_total", "Estimated prompt tokens of successful requests.")
	mOutputTokens = desc("upstream_output_tokens_total", "Output tokens of successful requests (usage when given, else counted).")
	mState        = desc("upstream_state", "1 for the upstream's state now, 0 for the others.", "state")
	mCooldowns    = desc("upstream_cooldowns_total", "Cooldowns begun (429/503 answers, with or without Retry-After).")
	mEjections    = desc("upstream_ejections_total", "Outlier ejections.")
	mWeight       = desc("upstream_weight", "The upstream's weight now (the operator's, else the config's).")
	mWaiting      = desc("upstream_engine_waiting_requests", "Requests waiting in the engine's queue (last fresh scrape).")
	mRunning      = desc("upstream_engine_running_requests", "Requests running in the engine's batch (last fresh scrape).")
	mKV           = desc("upstream_engine_kv_cache_usage_ratio", "The engine's KV cache usage, 0 to 1 (last fresh scrape).")
	mPredError    = desc("upstream_prediction_error_ratio", "Mean absolute percentage error of the latency model's recent predictions, as a ratio.")
	mPredTTFT     = desc("upstream_predicted_ttft_seconds", "The model's predicted time to first token now for a reference request (500 prompt, 200 output tokens).")
	mPredE2E      = desc("upstream_predicted_duration_seconds", "The model's predicted whole time now for the reference request.")
	mPrefixTokens = desc("upstream_prefix_cached_tokens_expected_total", "Prompt tokens the balancer expected the engine to find in its prefix cache (prefix affinity's estimate).")
	mPrefixTrust  = desc("upstream_prefix_estimate_trust_ratio", "How far the prefix estimate is trusted, 0 to 1, calibrated by the engine's own prefix cache counters.")
)

var (
	mRecommended = prometheus.NewDesc("caddy_aibalance_pool_recommended_primaries", "The scaling signal: recommended number of primary (tier 0) backends.", []string{"pool"}, nil)
	mPoolCurrent = prometheus.NewDesc("caddy_aibalance_pool_primaries", "Primary backends of the pool that are not out.", []string{"pool"}, nil)
	mPoolUtil    = prometheus.NewDesc("caddy_aibalance_pool_utilisation_ratio", "Smoothed utilisation per primary backend that is not out (above 1: requests queue).", []string{"pool"}, nil)
	mQueued      = prometheus.NewDesc("caddy_aibalance_pool_queue_length", "Requests waiting in the pool's admission queue.", []string{"pool"}, nil)
	mQueueWait   = prometheus.NewDesc("caddy_aibalance_pool_queue_wait_seconds", "How long admitted requests waited in the admission queue (those that waited).", []string{"pool"}, nil)
	mQueueOut    = prometheus.NewDesc("caddy_aibalance_pool_queue_rejected_total", "Requests the admission queue answered 503: queue full or predicted wait too long (overloaded), waited max_wait (timeout), client gone (canceled).", []string{"pool", "reason"}, nil)
	mRateLimited = prometheus.NewDesc("caddy_aibalance_pool_rate_limited_total", "Requests answered 429 by the pool's per-key rate limits.", []string{"pool"}, nil)
)

var allDescs = []*prometheus.Desc{mRecommended, mPoolCurrent, mPoolUtil, mQueued, mQueueWait, mQueueOut, mRateLimited, mRequests, mInflight, mResponses, mErrors, mTTFT, mE2E, mPromptTokens, mOutputTokens, mState,
	mCooldowns, mEjections, mWeight, mWaiting, mRunning, mKV, mPredError, mPredTTFT, mPredE2E, mPrefixTokens, mPrefixTrust}

// collector exposes every backend of the store.
type collector struct{}

func (collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

func (collector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, p := range AllPools() {
		if a := &p.admission; a.On() {
			ch <- prometheus.MustNewConstMetric(mQueued, prometheus.GaugeValue, float64(a.Queued()), p.key)
			buckets, n, sum := a.wait.snapshot()
			ch <- prometheus.MustNewConstHistogram(mQueueWait, n, sum, buckets, p.key)
			ch <- prometheus.MustNewConstMetric(mQueueOut, prometheus.CounterValue, float64(a.overloaded.Load()), p.key, "overloaded")
			ch <- prometheus.MustNewConstMetric(mQueueOut, prometheus.CounterValue, float64(a.timedOut.Load()), p.key, "timeout")
			ch <- prometheus.MustNewConstMetric(mQueueOut, prometheus.CounterValue, float64(a.canceled.Load()), p.key, "canceled")
		}
		if p.limiter.On() {
			ch <- prometheus.MustNewConstMetric(mRateLimited, prometheus.CounterValue, float64(p.limiter.Limited()), p.key)
		}
		st := p.Scaling()
		if st.Recommended == 0 {
			continue // not evaluated yet
		}
		ch <- prometheus.MustNewConstMetric(mRecommended, prometheus.GaugeValue, float64(st.Recommended), p.key)
		ch <- prometheus.MustNewConstMetric(mPoolCurrent, prometheus.GaugeValue, float64(st.Current), p.key)
		ch <- prometheus.MustNewConstMetric(mPoolUtil, prometheus.GaugeValue, st.Utilisation, p.key)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, u := range View(now).Upstreams {
		b, ok := LookupBackend(u.Address)
		if !ok {
			continue
		}
		a, c := u.Address, u.Counters
		counter(mRequests, float64(c.Requests)+float64(max(c.Inflight, 0)), a) // ended + in flight: every attempt sent
		gauge(mInflight, float64(c.Inflight), a)
		counter(mResponses, float64(c.Status2xx), a, "2xx")
		counter(mResponses, float64(c.Status4xx), a, "4xx")
		counter(mResponses, float64(c.Status5xx), a, "5xx")
		counter(mErrors, float64(c.DialErrors), a, "dial")
		counter(mErrors, float64(c.Timeouts), a, "timeout")
		counter(mErrors, float64(c.Status429), a, "status_429")
		counter(mErrors, float64(c.Status5xx), a, "status_5xx")
		counter(mErrors, float64(c.StreamErrors), a, "stream")
		counter(mErrors, float64(c.OtherErrors), a, "other")
		for _, h := range []struct {
			d *prometheus.Desc
			h *latencyHist
		}{{mTTFT, &b.ttftHist}, {mE2E, &b.e2eHist}} {
			buckets, n, sum := h.h.snapshot()
			ch <- prometheus.MustNewConstHistogram(h.d, n, sum, buckets, a)
		}
		counter(mPromptTokens, float64(c.PromptTokens), a)
		counter(mOutputTokens, float64(c.OutputTokens), a)
		for _, s := range upstreamStates {
			v := 0.0
			if s == u.State {
				v = 1
			}
			gauge(mState, v, a, s)
		}
		counter(mCooldowns, float64(b.cooldowns.Load()), a)
		counter(mEjections, float64(b.ejections.Load()), a)
		gauge(mWeight, u.Weight, a)
		if e := u.Engine; e != nil && e.Fresh {
			if e.Waiting != nil {
				gauge(mWaiting, *e.Waiting, a)
			}
			if e.Running != nil {
				gauge(mRunning, *e.Running, a)
			}
			if e.KVUsage != nil {
				gauge(mKV, *e.KVUsage, a)
			}
		}
		if c.Model.Samples > 0 && c.Model.MAPE >= 0 {
			gauge(mPredError, c.Model.MAPE, a)
		}
		if u.Predicted.TTFT >= 0 {
			gauge(mPredTTFT, u.Predicted.TTFT, a)
		}
		if u.Predicted.E2E >= 0 {
			gauge(mPredE2E, u.Predicted.E2E, a)
		}
		counter(mPrefixTokens, float64(b.prefix.expected.Load()), a)
		gauge(mPrefixTrust, b.PrefixTrust(), a)
	}
}

// registerMetrics adds the collector to reg once; a registry that has it
// already is fine.
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	err := reg.Register(collector{})
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		return nil
	}
	return err
}
