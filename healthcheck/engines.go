// Package healthcheck reads what inference engines say about themselves:
// their queue, running batch and KV cache use, scraped from their Prometheus
// endpoint and published on the shared aibalance.Backend.
package healthcheck

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// Engine names accepted by Parse and ScrapeConfig.Engine.
const (
	EngineAuto     = "auto"     // detect the engine from the metric names present
	EngineNone     = "none"     // never scrape
	EngineVLLM     = "vllm"     // vLLM
	EngineSGLang   = "sglang"   // SGLang
	EngineTGI      = "tgi"      // Hugging Face text-generation-inference
	EngineLlamaCpp = "llamacpp" // llama.cpp server (started with --metrics)
)

// DefaultMaxBytes is the default limit on a metrics body: 4 MiB. A vLLM
// endpoint serving a few models with LoRA adapters is about 100 KiB.
const DefaultMaxBytes int64 = 4 << 20

// engineNames lists the metric names one engine exports for each signal.
// Where a signal has several names they are in order of preference: the
// first one present is used (vLLM renamed gpu_cache_usage_perc to
// kv_cache_usage_perc; a version exporting both keeps the new one).
type engineNames struct {
	engine  string
	waiting []string
	running []string
	kv      []string // a fraction, 0..1
	// prefix cache counters, in tokens: hits and queries
	prefixHits, prefixQueries []string
	// cacheInfo is an info metric whose labels give the KV cache geometry
	// (num_gpu_blocks × block_size tokens)
	cacheInfo string
}

// engines is the table of known engines, in the order auto detection tries
// them. Sources: each engine's documentation of its /metrics endpoint (see
// /work/shared/design/FIELD.md).
var engines = []engineNames{
	{
		engine:  EngineVLLM,
		waiting: []string{"vllm:num_requests_waiting"},
		running: []string{"vllm:num_requests_running"},
		kv:      []string{"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"},

		prefixHits:    []string{"vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"},
		prefixQueries: []string{"vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"},
		cacheInfo:     "vllm:cache_config_info",
	},
	{
		engine:  EngineSGLang,
		waiting: []string{"sglang:num_queue_reqs"},
		running: []string{"sglang:num_running_reqs"},
		kv:      []string{"sglang:token_usage"},
	},
	{
		engine:  EngineTGI,
		waiting: []string{"tgi_queue_size"},
		running: []string{"tgi_batch_current_size"},
	},
	{
		engine:  EngineLlamaCpp,
		waiting: []string{"llamacpp:requests_deferred"},
		running: []string{"llamacpp:requests_processing"},
		kv:      []string{"llamacpp:kv_cache_usage_ratio"},
	},
}

// replicaLabels name the ranks of one sharded engine. Series that differ
// only in these labels are copies of one scheduler's state (SGLang started
// with --enable-metrics-for-all-schedulers reports the same queue once per
// tensor-parallel rank), so they are combined with max, not summed. Every
// other label (model_name, vLLM's engine, SGLang's dp_rank) separates
// schedulers with queues of their own, which are summed.
var replicaLabels = []string{"tp_rank", "pp_rank", "moe_ep_rank", "attn_tp_rank"}

// ValidEngine reports whether name is an engine ScrapeConfig.Engine accepts
// (the empty string means auto).
func ValidEngine(name string) bool {
	switch name {
	case "", EngineAuto, EngineNone:
		return true
	}
	return lookupEngine(name) != nil
}

func lookupEngine(name string) *engineNames {
	for i := range engines {
		if engines[i].engine == name {
			return &engines[i]
		}
	}
	return nil
}

// Parse reads a Prometheus text exposition (format 0.0.4) from r and
// extracts the engine's queue, running batch and KV cache use. engine is
// auto (or empty), vllm, sglang, tgi or llamacpp; auto picks the first
// engine, in that order, whose metric names are present, and the result's
// Engine field names it.
//
// Series of one metric are combined: waiting and running are summed across
// models, LoRA adapters and data-parallel engines (copies that differ only
// in a tensor/pipeline rank label count once), KV use is the maximum.
// Gauges, counters and untyped samples are read; other types are ignored.
// NaN, infinite and negative values are skipped, and so are KV values above
// 1; a signal with no usable sample has its Has flag false.
//
// At most limit bytes are read (limit <= 0 means DefaultMaxBytes): a longer
// body is an error. So is a body the text parser rejects anywhere (as
// Prometheus rejects a whole scrape) and one without any of the engine's
// metrics. The result's At is zero: the caller stamps it.
func Parse(engine string, r io.Reader, limit int64) (aibalance.EngineMetrics, error) {
	var candidates []engineNames
	switch engine {
	case "", EngineAuto:
		candidates = engines
	case EngineNone:
		return aibalance.EngineMetrics{}, errors.New("parsing engine metrics: engine is none")
	default:
		e := lookupEngine(engine)
		if e == nil {
			return aibalance.EngineMetrics{}, fmt.Errorf("parsing engine metrics: unknown engine %q", engine)
		}
		candidates = []engineNames{*e}
	}
	if limit <= 0 {
		limit = DefaultMaxBytes
	}

	body, err := readLimited(r, limit)
	if err != nil {
		return aibalance.EngineMetrics{}, fmt.Errorf("reading engine metrics: %w", err)
	}
	families, err := parseText(body)
	if err != nil {
		return aibalance.EngineMetrics{}, fmt.Errorf("parsing engine metrics: %w", err)
	}

	for _, e := range candidates {
		if m, ok := extract(e, families); ok {
			return m, nil
		}
	}
	if len(candidates) == 1 {
		return aibalance.EngineMetrics{}, fmt.Errorf("parsing engine metrics: no %s metrics found (%s, %s)",
			candidates[0].engine, candidates[0].waiting[0], candidates[0].running[0])
	}
	return aibalance.EngineMetrics{}, errors.New("parsing engine metrics: no known engine metrics found (vllm, sglang, tgi or llamacpp)")
}

// errTooLarge is returned (wrapped) for a body over the limit.
var errTooLarge = errors.New("body exceeds the size limit")

// readLimited reads all of r, failing as soon as it holds more than limit
// bytes, so a hostile or broken endpoint cannot make us allocate more.
func readLimited(r io.Reader, limit int64) ([]byte, error) {
	if r == nil {
		return nil, errors.New("no body")
	}
	n := limit
	if n < math.MaxInt64 {
		n++ // one byte more tells "exactly limit" from "over"
	}
	body, err := io.ReadAll(io.LimitReader(r, n))
	if err != nil {
		return nil, err
	}
	if int64(len(body)) > limit {
		return nil, fmt.Errorf("%w of %d bytes", errTooLarge, limit)
	}
	return body, nil
}

// parseText runs the expfmt text parser, turning a panic inside it into an
// error: the body comes from outside and the parser is not ours.
func parseText(body []byte) (families map[string]*dto.MetricFamily, err error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, errors.New("empty body")
	}
	defer func() {
		if p := recover(); p != nil {
			families, err = nil, fmt.Errorf("text parser panicked: %v", p)
		}
	}()
	// UTF-8 validation accepts the colons in vllm:, sglang: and llamacpp:
	// names (legal in the classic format too) and quoted UTF-8 names. The
	// zero TextParser has no validation scheme and panics.
	p := expfmt.NewTextParser(model.UTF8Validation)
	var in io.Reader = bytes.NewReader(body)
	if body[len(body)-1] != '\n' {
		// The parser wants every line ended; a body cut after its last
		// value is still whole (a truncated one fails on its own).
		in = io.MultiReader(in, strings.NewReader("\n"))
	}
	return p.TextToMetricFamilies(in)
}

// extract reads e's signals from families; ok is false when none of e's
// metric names is present (then the body is not from e).
func extract(e engineNames, families map[string]*dto.MetricFamily) (m aibalance.EngineMetrics, ok bool) {
	var found bool
	if mf := first(families, e.waiting); mf != nil {
		found = true
		m.Waiting, m.HasWaiting = sumSeries(mf)
	}
	if mf := first(families, e.running); mf != nil {
		found = true
		m.Running, m.HasRunning = sumSeries(mf)
	}
	if mf := first(families, e.kv); mf != nil {
		found = true
		m.KVUsage, m.HasKV = maxSeries(mf, 1)
	}
	if !found {
		return aibalance.EngineMetrics{}, false
	}
	m.Engine = e.engine
	if hits, queries := first(families, e.prefixHits), first(families, e.prefixQueries); hits != nil && queries != nil {
		h, okH := sumSeries(hits)
		q, okQ := sumSeries(queries)
		m.PrefixHits, m.PrefixQueries, m.HasPrefixCache = h, q, okH && okQ
	}
	if mf := families[e.cacheInfo]; e.cacheInfo != "" && mf != nil {
		m.CacheTokens = cacheTokens(mf)
	}
	// the standard process collector's start time (Python's and Go's
	// Prometheus clients export it): when it changes, the engine restarted
	if mf := families["process_start_time_seconds"]; mf != nil && len(mf.GetMetric()) > 0 {
		if v, ok := maxSeries(mf, math.MaxFloat64); ok && v > 0 {
			m.StartTime = v
		}
	}
	return m, true
}

// first returns the first family among names that has samples.
func first(families map[string]*dto.MetricFamily, names []string) *dto.MetricFamily {
	for _, n := range names {
		if mf := families[n]; mf != nil && len(mf.GetMetric()) > 0 {
			return mf
		}
	}
	return nil
}

// value is the sample of a gauge, counter or untyped metric; ok is false
// for other types and for NaN, infinite or negative values.
func value(mf *dto.MetricFamily, m *dto.Metric) (v float64, ok bool) {
	switch mf.GetType() {
	case dto.MetricType_GAUGE:
		if m.GetGauge() == nil {
			return 0, false
		}
		v = m.GetGauge().GetValue()
	case dto.MetricType_COUNTER:
		if m.GetCounter() == nil {
			return 0, false
		}
		v = m.GetCounter().GetValue()
	case dto.MetricType_UNTYPED:
		if m.GetUntyped() == nil {
			return 0, false
		}
		v = m.GetUntyped().GetValue()
	default:
		return 0, false
	}
	if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
		return 0, false
	}
	return v, true
}

// sumSeries sums mf's usable samples, counting series that differ only in
// replica labels once (their maximum).
func sumSeries(mf *dto.MetricFamily) (sum float64, ok bool) {
	groups := make(map[string]float64, len(mf.GetMetric()))
	for _, m := range mf.GetMetric() {
		v, good := value(mf, m)
		if !good {
			continue
		}
		k := schedulerKey(m)
		if old, seen := groups[k]; !seen || v > old {
			groups[k] = v
		}
	}
	if len(groups) == 0 {
		return 0, false
	}
	// Sum in a fixed order so equal inputs give bit-equal results.
	keys := make([]string, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		sum += groups[k]
	}
	if math.IsInf(sum, 0) {
		return 0, false
	}
	return sum, true
}

// maxSeries is the largest usable sample of mf not above ceiling.
func maxSeries(mf *dto.MetricFamily, ceiling float64) (max float64, ok bool) {
	for _, m := range mf.GetMetric() {
		v, good := value(mf, m)
		if !good || v > ceiling {
			continue
		}
		if !ok || v > max {
			max, ok = v, true
		}
	}
	return max, ok
}

// schedulerKey identifies the scheduler a series belongs to: its labels
// without the replica labels, sorted.
func schedulerKey(m *dto.Metric) string {
	pairs := make([]string, 0, len(m.GetLabel()))
	for _, lp := range m.GetLabel() {
		if slices.Contains(replicaLabels, lp.GetName()) {
			continue
		}
		pairs = append(pairs, lp.GetName()+"\xff"+lp.GetValue())
	}
	sort.Strings(pairs)
	return strings.Join(pairs, "\xfe")
}

// cacheTokens reads a KV cache geometry info metric: the largest
// num_gpu_blocks × block_size among its series (0 when absent or absurd).
func cacheTokens(mf *dto.MetricFamily) float64 {
	var best float64
	for _, m := range mf.GetMetric() {
		var blocks, size float64
		for _, l := range m.GetLabel() {
			v, err := strconv.ParseFloat(l.GetValue(), 64)
			if err != nil || v < 0 || math.IsInf(v, 0) {
				continue
			}
			switch l.GetName() {
			case "num_gpu_blocks":
				blocks = v
			case "block_size":
				size = v
			}
		}
		if t := blocks * size; t > best && t < 1e12 {
			best = t
		}
	}
	return best
}
