package healthcheck

import (
	"bytes"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// want is the expected result of Parse; nil pointers mean "Has flag false".
type want struct {
	engine           string
	waiting, running *float64
	kv               *float64
}

func f(v float64) *float64 { return &v }

func checkMetrics(t *testing.T, got aibalance.EngineMetrics, w want) {
	t.Helper()
	if got.Engine != w.engine {
		t.Errorf("Engine = %q, want %q", got.Engine, w.engine)
	}
	check := func(name string, v float64, has bool, w *float64) {
		t.Helper()
		switch {
		case w == nil && has:
			t.Errorf("%s = %v, want absent", name, v)
		case w != nil && !has:
			t.Errorf("%s absent, want %v", name, *w)
		case w != nil && v != *w:
			t.Errorf("%s = %v, want %v", name, v, *w)
		}
	}
	check("Waiting", got.Waiting, got.HasWaiting, w.waiting)
	check("Running", got.Running, got.HasRunning, w.running)
	check("KVUsage", got.KVUsage, got.HasKV, w.kv)
	if !got.At.IsZero() {
		t.Errorf("At = %v, want zero (the caller stamps it)", got.At)
	}
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseFixtures(t *testing.T) {
	tests := []struct {
		file   string
		engine string // as configured
		want   want
	}{
		// Two models, one data-parallel engine each: queues summed, KV the max.
		{"vllm.txt", EngineAuto, want{"vllm", f(5), f(16), f(0.68359375)}},
		{"vllm.txt", EngineVLLM, want{"vllm", f(5), f(16), f(0.68359375)}},
		{"vllm_old.txt", EngineAuto, want{"vllm", f(0), f(4), f(0.25)}},
		{"sglang.txt", EngineAuto, want{"sglang", f(12), f(30), f(0.87)}},
		{"sglang.txt", EngineSGLang, want{"sglang", f(12), f(30), f(0.87)}},
		// Two DP schedulers, each reported by two TP ranks: ranks count once.
		{"sglang_dp.txt", EngineAuto, want{"sglang", f(5), f(18), f(0.52)}},
		{"tgi.txt", EngineAuto, want{"tgi", f(3), f(14), nil}},
		{"tgi.txt", EngineTGI, want{"tgi", f(3), f(14), nil}},
		{"llamacpp.txt", EngineAuto, want{"llamacpp", f(1), f(2), f(0.125)}},
		{"llamacpp.txt", EngineLlamaCpp, want{"llamacpp", f(1), f(2), f(0.125)}},
	}
	for _, tt := range tests {
		t.Run(tt.file+"/"+tt.engine, func(t *testing.T) {
			got, err := Parse(tt.engine, bytes.NewReader(readFixture(t, tt.file)), 0)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			checkMetrics(t, got, tt.want)
		})
	}
}

func TestParseWrongEngine(t *testing.T) {
	tests := []struct{ file, engine string }{
		{"vllm.txt", EngineSGLang},
		{"sglang.txt", EngineVLLM},
		{"tgi.txt", EngineLlamaCpp},
		{"llamacpp.txt", EngineTGI},
	}
	for _, tt := range tests {
		t.Run(tt.file+"/"+tt.engine, func(t *testing.T) {
			_, err := Parse(tt.engine, bytes.NewReader(readFixture(t, tt.file)), 0)
			if err == nil || !strings.Contains(err.Error(), "no "+tt.engine+" metrics") {
				t.Fatalf("err = %v, want no %s metrics", err, tt.engine)
			}
		})
	}
}

func TestParseCases(t *testing.T) {
	tests := []struct {
		name    string
		engine  string
		body    string
		want    want
		wantErr string // substring; empty: no error
	}{
		{
			name: "untyped samples",
			body: "vllm:num_requests_waiting 2\nvllm:num_requests_running 3\n",
			want: want{"vllm", f(2), f(3), nil},
		},
		{
			name: "counter typed",
			body: "# TYPE tgi_queue_size counter\ntgi_queue_size 4\n",
			want: want{"tgi", f(4), nil, nil},
		},
		{
			name: "histogram of a known name is ignored",
			body: "# TYPE tgi_queue_size histogram\ntgi_queue_size_bucket{le=\"+Inf\"} 1\ntgi_queue_size_sum 1\ntgi_queue_size_count 1\n" +
				"tgi_batch_current_size 2\n",
			want: want{"tgi", nil, f(2), nil},
		},
		{
			name: "NaN, Inf and negative ignored",
			body: "vllm:num_requests_waiting NaN\nvllm:num_requests_running{engine=\"0\"} +Inf\nvllm:num_requests_running{engine=\"1\"} -1\n" +
				"vllm:kv_cache_usage_perc{engine=\"0\"} NaN\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.5\n",
			want: want{"vllm", nil, nil, f(0.5)},
		},
		{
			name: "KV above 1 ignored",
			body: "sglang:num_queue_reqs 1\nsglang:token_usage 87\n",
			want: want{"sglang", f(1), nil, nil},
		},
		{
			name: "new vLLM KV name preferred over the old one",
			body: "vllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.3\n",
			want: want{"vllm", f(0), nil, f(0.3)},
		},
		{
			name: "timestamps accepted",
			body: "tgi_queue_size 3 1761519324170\ntgi_batch_current_size 1 1761519324170\n",
			want: want{"tgi", f(3), f(1), nil},
		},
		{
			name: "quoted UTF-8 names",
			body: "{\"vllm:num_requests_waiting\",model_name=\"m\"} 6\n",
			want: want{"vllm", f(6), nil, nil},
		},
		{
			name: "no trailing newline",
			body: "llamacpp:requests_deferred 2",
			want: want{"llamacpp", f(2), nil, nil},
		},
		{
			name: "auto prefers vllm when several engines appear",
			body: "sglang:num_queue_reqs 9\nvllm:num_requests_waiting 1\n",
			want: want{"vllm", f(1), nil, nil},
		},
		// Like Prometheus, the text parser takes \n only; no engine sends CRLF.
		{name: "CRLF line ends", body: "tgi_queue_size 3\r\n", wantErr: "expected float"},
		{
			name: "sum overflowing to Inf ignored",
			body: "vllm:num_requests_waiting{engine=\"0\"} 1e308\nvllm:num_requests_waiting{engine=\"1\"} 1e308\n",
			want: want{"vllm", nil, nil, nil},
		},
		{
			name: "a repeated series counts once",
			body: "sglang:num_queue_reqs{model_name=\"m\"} 2\nsglang:num_queue_reqs{model_name=\"m\"} 2\n",
			want: want{"sglang", f(2), nil, nil},
		},
		{name: "TYPE after samples", body: "tgi_queue_size 1\n# TYPE tgi_queue_size gauge\n", wantErr: "second TYPE line"},
		{name: "duplicate label", body: "tgi_queue_size{a=\"1\",a=\"2\"} 1\n", wantErr: "duplicate label names"},
		{name: "empty", body: "", wantErr: "empty body"},
		{name: "blank lines", body: "\n\n  \n", wantErr: "empty body"},
		{name: "comments only", body: "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n", wantErr: "no known engine metrics"},
		{name: "unrelated metrics", body: "process_cpu_seconds_total 12.5\n", wantErr: "no known engine metrics"},
		{name: "garbage", body: "<html><body>404 not found</body></html>\n", wantErr: "parsing engine metrics"},
		{name: "json", body: `{"object":"list","data":[]}`, wantErr: "parsing engine metrics"},
		{name: "binary", body: "\x00\x01\xff\xfe{", wantErr: "parsing engine metrics"},
		{name: "bad value", body: "vllm:num_requests_waiting many\n", wantErr: "parsing engine metrics"},
		{name: "none", engine: EngineNone, body: "vllm:num_requests_waiting 1\n", wantErr: "engine is none"},
		{name: "unknown engine", engine: "ollama", body: "vllm:num_requests_waiting 1\n", wantErr: `unknown engine "ollama"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			engine := tt.engine
			if engine == "" {
				engine = EngineAuto
			}
			got, err := Parse(engine, strings.NewReader(tt.body), 0)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			checkMetrics(t, got, tt.want)
		})
	}
}

func TestParseLimit(t *testing.T) {
	body := readFixture(t, "vllm.txt")
	n := int64(len(body))
	tests := []struct {
		name    string
		r       io.Reader
		limit   int64
		wantErr bool
	}{
		{"exactly the limit", bytes.NewReader(body), n, false},
		{"one byte over", bytes.NewReader(body), n - 1, true},
		{"huge stream", io.MultiReader(bytes.NewReader(body), endless{}), 1 << 20, true},
		{"huge stream, default limit", endless{}, 0, true},
		{"nil reader", nil, 10, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(EngineAuto, tt.r, tt.limit)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if tt.wantErr && tt.r != nil && !errors.Is(err, errTooLarge) {
				t.Fatalf("err = %v, want errTooLarge", err)
			}
		})
	}
}

// endless is an infinite metrics body.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	const line = "vllm:num_requests_waiting{model_name=\"m\"} 1\n"
	for i := range p {
		p[i] = line[i%len(line)]
	}
	return len(p), nil
}

// TestStaleIgnored checks the contract the scraper relies on: a sample is
// trusted for maxAge, then ignored.
func TestStaleIgnored(t *testing.T) {
	const interval = 100 * time.Millisecond
	m, err := Parse(EngineAuto, bytes.NewReader(readFixture(t, "sglang.txt")), 0)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 2, 10, 0, 0, 0, time.UTC)
	m.At = now
	b := new(aibalance.Backend)
	b.SetEngine(m, 3*interval)
	tests := []struct {
		name      string
		at        time.Time
		wantFresh bool
	}{
		{"at once", now, true},
		{"after 3 intervals", now.Add(3 * interval), true},
		{"after 4 intervals", now.Add(4 * interval), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, fresh := b.Engine(tt.at)
			if fresh != tt.wantFresh {
				t.Fatalf("fresh = %v, want %v", fresh, tt.wantFresh)
			}
			if got.Waiting != 12 {
				t.Fatalf("Waiting = %v, want 12 (stale values are still returned for display)", got.Waiting)
			}
		})
	}
}

// fuzzEngines are the engine arguments FuzzParse picks from by index, so
// the fuzzer spends its time on the body, not on spelling engine names.
var fuzzEngines = []string{EngineAuto, EngineVLLM, EngineSGLang, EngineTGI, EngineLlamaCpp, EngineNone, "", "ollama"}

func FuzzParse(f *testing.F) {
	for _, name := range []string{"vllm.txt", "vllm_old.txt", "sglang.txt", "sglang_dp.txt", "tgi.txt", "llamacpp.txt"} {
		f.Add(uint8(0), readFixture(f, name))
	}
	f.Add(uint8(1), []byte("{\"vllm:num_requests_waiting\",engine=\"0\"} 1e308\n{\"vllm:num_requests_waiting\",engine=\"1\"} 1e308\n"))
	f.Add(uint8(2), []byte("sglang:num_queue_reqs{tp_rank=\"0\"} 1\nsglang:num_queue_reqs{tp_rank=\"1\"} 2\n"))
	f.Add(uint8(3), []byte("# TYPE tgi_queue_size summary\ntgi_queue_size{quantile=\"0.5\"} 1\n"))
	f.Add(uint8(4), []byte("llamacpp:requests_deferred 1\n# TYPE llamacpp:requests_deferred gauge\n"))
	f.Fuzz(func(t *testing.T, which uint8, body []byte) {
		engine := fuzzEngines[int(which)%len(fuzzEngines)]
		const limit = 64 << 10
		m, err := Parse(engine, bytes.NewReader(body), limit)
		if err != nil {
			return
		}
		if len(body) > limit {
			t.Fatalf("accepted %d bytes over the %d limit", len(body), limit)
		}
		if m.Engine == "" || lookupEngine(m.Engine) == nil {
			t.Fatalf("Engine = %q", m.Engine)
		}
		for _, v := range []struct {
			v   float64
			has bool
		}{{m.Waiting, m.HasWaiting}, {m.Running, m.HasRunning}, {m.KVUsage, m.HasKV}} {
			if v.has && (math.IsNaN(v.v) || math.IsInf(v.v, 0) || v.v < 0) {
				t.Fatalf("bad value %v in %+v", v.v, m)
			}
			if !v.has && v.v != 0 {
				t.Fatalf("value %v without its flag in %+v", v.v, m)
			}
		}
		if m.HasKV && m.KVUsage > 1 {
			t.Fatalf("KVUsage %v > 1", m.KVUsage)
		}
	})
}
