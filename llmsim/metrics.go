package llmsim

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics exposes the engine in Prometheus text with vLLM's metric names,
// each with a model_name label, as a router scraping vLLM would see them.
type metrics struct {
	reg         *prometheus.Registry
	ttft, e2e   prometheus.Observer
	promptToks  prometheus.Counter
	genToks     prometheus.Counter
	successReqs prometheus.Counter
}

func newMetrics(s *Server) *metrics {
	cfg := s.cfg
	labels := prometheus.Labels{"model_name": cfg.Model}
	m := &metrics{reg: prometheus.NewRegistry()}
	gauge := func(name, help string, f func() float64) {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help, ConstLabels: labels}, f))
	}
	counterFunc := func(name, help string, f func() float64) {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels}, f))
	}
	gauge("vllm:num_requests_running", "Number of requests in model execution batches.", func() float64 {
		r, _, _ := s.eng.counts()
		return float64(r)
	})
	gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", func() float64 {
		_, w, _ := s.eng.counts()
		return float64(w)
	})
	// as Python's process collector exports it: a new value on each
	// (re)start, which tells a balancer the engine restarted
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "process_start_time_seconds", Help: "Start time of the process since unix epoch in seconds."}, func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(s.started.UnixNano()) / 1e9
	}))
	kvCapacity, kvBlocks := float64(cfg.CacheBlocks*cfg.BlockTokens), cfg.CacheBlocks
	if cfg.Scheduler == SchedulerBudget {
		kvCapacity, kvBlocks = float64(cfg.KVTokens), cfg.KVTokens/cfg.BlockTokens
	}
	gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", func() float64 {
		_, _, kv := s.eng.counts()
		return min(float64(kv)/kvCapacity, 1)
	})
	// 0 on the default engine, which has no KV limit
	counterFunc("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", func() float64 {
		return float64(s.stats.preemptions.Load())
	})
	counterFunc("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.", func() float64 {
		return float64(s.stats.queryTokens.Load())
	})
	counterFunc("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", func() float64 {
		return float64(s.stats.cachedTokens.Load())
	})
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "vllm:cache_config_info", Help: "Information of the LLMEngine CacheConfig"},
		[]string{"model_name", "block_size", "num_gpu_blocks"})
	info.WithLabelValues(cfg.Model, strconv.Itoa(cfg.BlockTokens), strconv.Itoa(kvBlocks)).Set(1)
	m.reg.MustRegister(info)
	buckets := []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}
	ttft := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vllm:time_to_first_token_seconds", Help: "Histogram of time to first token in seconds.", ConstLabels: labels, Buckets: buckets})
	e2e := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vllm:e2e_request_latency_seconds", Help: "Histogram of end to end request latency in seconds.", ConstLabels: labels, Buckets: buckets})
	m.promptToks = prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:prompt_tokens_total", Help: "Number of prefill tokens processed.", ConstLabels: labels})
	m.genToks = prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:generation_tokens_total", Help: "Number of generation tokens processed.", ConstLabels: labels})
	m.successReqs = prometheus.NewCounter(prometheus.CounterOpts{Name: "vllm:request_success_total", Help: "Count of successfully processed requests.", ConstLabels: labels})
	m.reg.MustRegister(ttft, e2e, m.promptToks, m.genToks, m.successReqs)
	m.ttft, m.e2e = ttft, e2e
	return m
}

func (m *metrics) observe(ttft, e2e time.Duration, prompt, generated int) {
	m.ttft.Observe(ttft.Seconds())
	m.e2e.Observe(e2e.Seconds())
	m.promptToks.Add(float64(prompt))
	m.genToks.Add(float64(generated))
	m.successReqs.Inc()
}

func (m *metrics) handler() http.Handler {
	// plain text format: what vLLM serves and what scrapers expect
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{DisableCompression: true})
}
