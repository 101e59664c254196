package selection

import (
	"bytes"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

func newObserved(t *testing.T, body string, sse bool) (*observedBody, *aibalance.Backend) {
	var set aibalance.BackendSet
	t.Cleanup(set.Release)
	observedN++
	b := set.Get(t.Name() + ":" + strconv.Itoa(observedN))
	tr := &Transport{app: aibalance.NewApp(), clock: time.Now}
	prior := new(aibalance.Prior)
	att := b.Begin(&aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: sse, PromptTokens: 10, OutputTokens: 5}, prior, time.Now())
	return &observedBody{ReadCloser: io.NopCloser(strings.NewReader(body)), t: tr, att: att, prior: prior, api: aibalance.APIChat, sse: sse, outcome: aibalance.Outcome{Status: 200}}, b
}

var observedN int

// readIn reads o in chunks of n bytes, as a proxy copying a stream would.
func readIn(o io.Reader, n int) {
	buf := make([]byte, n)
	for {
		if _, err := o.Read(buf); err != nil {
			return
		}
	}
}

func TestObservedStream(t *testing.T) {
	stream := `data: {"choices":[{"delta":{"role":"assistant","content":""}}]}

data: {"choices":[{"delta":{"content":"Hel"}}]}

data: {"choices":[{"delta":{"content":"lo"}}]}

: keep-alive comment

data: {"choices":[{"delta":{"content":"!"}}]}

data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13}}

data: [DONE]

`
	for _, chunk := range []int{1, 7, 64, 4096} {
		o, b := newObserved(t, stream, true)
		readIn(o, chunk)
		st := b.Stats()
		if o.events != 3 || o.usage != 3 || st.OutputTokens < 3 || st.Inflight != 0 || st.Pending != 0 {
			t.Fatalf("chunks of %d: %d content events, usage %d, stats %+v; want 3, 3, nothing in flight", chunk, o.events, o.usage, st)
		}
	}
	// without usage, content events count as tokens
	o, _ := newObserved(t, strings.Replace(stream, `"completion_tokens":3`, `"x":1`, 1), true)
	readIn(o, 5)
	if o.events != 3 || o.usage != 0 {
		t.Fatalf("events %d usage %d", o.events, o.usage)
	}
}

func TestObservedJSONUsage(t *testing.T) {
	body := `{"choices":[{"message":{"content":"` + strings.Repeat("x", 5000) + `"}}],"usage":{"prompt_tokens":3,"completion_tokens":1234,"total_tokens":1237}}`
	o, b := newObserved(t, body, false)
	readIn(o, 333)
	if st := b.Stats(); st.OutputTokens != 1234 {
		t.Fatalf("output tokens %d, want 1234 from usage", st.OutputTokens)
	}
}

func FuzzObservedBody(f *testing.F) {
	f.Add([]byte("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"completion_tokens\":7}}\n\ndata: [DONE]\n\n"), uint8(3), true)
	f.Add([]byte(`{"usage":{"completion_tokens":99999999999999999999}}`), uint8(1), false)
	f.Add([]byte("data:\ndata: \"content\":\"\n\n"), uint8(2), true)
	f.Fuzz(func(t *testing.T, body []byte, chunk uint8, sse bool) {
		var set aibalance.BackendSet
		defer set.Release()
		b := set.Get("fuzz-observed")
		tr := &Transport{app: aibalance.NewApp(), clock: time.Now}
		prior := new(aibalance.Prior)
		att := b.Begin(&aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: sse}, prior, time.Now())
		o := &observedBody{ReadCloser: io.NopCloser(bytes.NewReader(body)), t: tr, att: att, prior: prior, sse: sse, outcome: aibalance.Outcome{Status: 200}}
		readIn(o, int(chunk)+1)
		_ = o.Close()
		if len(o.carry) > maxCarry || len(o.tail) > maxTail || o.usage < 0 || o.events < 0 {
			t.Fatalf("bounds broken: carry %d tail %d usage %d", len(o.carry), len(o.tail), o.usage)
		}
		if st := b.Stats(); st.Inflight != 0 || st.Pending != 0 {
			t.Fatalf("attempt not ended: %+v", st)
		}
	})
}

// TestObservedStreamFormats: every stream format's first token and output
// count, compact or spaced JSON, content in reasoning and tool-call deltas.
func TestObservedStreamFormats(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stream string
		events int
		usage  int
	}{
		{"chat spaced", "data: {\"choices\": [{\"delta\": {\"role\": \"assistant\", \"content\": \"\"}}]}\n\ndata: {\"choices\": [{\"delta\": {\"content\": \"Hi\"}}]}\n\ndata: {\"choices\": [{\"delta\": {\"content\": \" there\"}}]}\n\ndata: {\"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 2}}\n\ndata: [DONE]\n\n", 2, 2},
		{"reasoning_content", "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"think\",\"content\":null}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\ndata: [DONE]\n\n", 2, 0},
		{"tool_calls", "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\ndata: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\ndata: [DONE]\n\n", 1, 0},
		{"completions", "data: {\"choices\":[{\"text\":\" a\",\"index\":0}]}\n\ndata: {\"choices\":[{\"text\":\" b\"}],\"usage\":{\"completion_tokens\":2}}\n\ndata: [DONE]\n\n", 2, 2},
		{"responses", "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"output\":[],\"text\":{\"format\":{\"type\":\"text\"}}}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"He\"}\n\nevent: response.output_text.delta\ndata: {\"type\": \"response.output_text.delta\", \"delta\": \"llo\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":0}}}}\n\n", 2, 2},
		{"anthropic", "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"content\":[],\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n", 2, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, chunk := range []int{1, 13, 4096} {
				o, b := newObserved(t, tc.stream, true)
				readIn(o, chunk)
				if o.events != tc.events || o.usage != tc.usage {
					t.Fatalf("chunks of %d: %d content events, usage %d; want %d, %d", chunk, o.events, o.usage, tc.events, tc.usage)
				}
				if st := b.Stats(); st.Model.Samples != 1 || st.Pending != 0 || st.MeanTTFT <= 0 {
					t.Fatalf("chunks of %d: first token not seen or model not trained: %+v", chunk, st)
				}
			}
		})
	}
}

// TestObservedLongEventUsage: a usage object at the end of an event longer
// than the carry (a Responses completion with its whole text) is still read.
func TestObservedLongEventUsage(t *testing.T) {
	stream := "data: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n" +
		"data: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"content\":[{\"text\":\"" + strings.Repeat("y", 20000) + "\"}]}],\"usage\":{\"output_tokens\": 4321}}}\n\n"
	o, _ := newObserved(t, stream, true)
	readIn(o, 1000)
	if o.usage != 4321 || len(o.carry) > maxCarry {
		t.Fatalf("usage %d carry %d", o.usage, len(o.carry))
	}
}

// TestObservedEndings: an early close is the client's doing (counted as
// canceled, no error against the backend, nothing learned); a body cut by
// the backend is a stream error; a complete body trains the model.
func TestObservedEndings(t *testing.T) {
	stream := "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"
	o, b := newObserved(t, stream, true)
	buf := make([]byte, 10)
	_, _ = o.Read(buf)
	_ = o.Close()
	st := b.Stats()
	if st.StreamErrors != 0 || st.Model.Samples != 0 || st.Inflight != 0 || st.Pending != 0 || st.Status2xx != 1 || st.FailureRate != 0 {
		t.Fatalf("an early close trained the model or counted against the backend: %+v", st)
	}

	o, b = newObserved(t, stream, true)
	o.ReadCloser = io.NopCloser(io.MultiReader(strings.NewReader(stream[:40]), errReader{}))
	readIn(o, 7)
	if st := b.Stats(); st.StreamErrors != 1 || st.Model.Samples != 0 || st.FailureRate == 0 {
		t.Fatalf("a cut stream: %+v", st)
	}

	o, b = newObserved(t, stream, true)
	readIn(o, 7)
	if st := b.Stats(); st.Model.Samples != 1 || st.StreamErrors != 0 {
		t.Fatalf("a complete stream: %+v", st)
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, io.ErrUnexpectedEOF }

// TestObservedJSONWithoutUsage: a non-streaming answer without a usage
// object is counted but teaches nothing (its output is unknown; a byte
// count would count JSON, not tokens).
func TestObservedJSONWithoutUsage(t *testing.T) {
	o, b := newObserved(t, `{"choices":[{"message":{"content":"`+strings.Repeat("x", 3000)+`"}}]}`, false)
	readIn(o, 100)
	if st := b.Stats(); st.Model.Samples != 0 || st.OutputTokens != 0 || st.Status2xx != 1 {
		t.Fatalf("%+v", st)
	}
}
