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
	b := set.Get(t.Name() + ":" + strconv.Itoa(len(body)))
	tr := &Transport{app: aibalance.NewApp(), clock: time.Now}
	prior := new(aibalance.Prior)
	att := b.Begin(&aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: sse, PromptTokens: 10, OutputTokens: 5}, prior, time.Now())
	return &observedBody{ReadCloser: io.NopCloser(strings.NewReader(body)), t: tr, att: att, prior: prior, api: aibalance.APIChat, sse: sse, outcome: aibalance.Outcome{Status: 200}}, b
}

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

func TestObservedClosedEarlyIsNotTheBackendsFault(t *testing.T) {
	o, b := newObserved(t, "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", true)
	_ = o.Close()
	st := b.Stats()
	if st.StreamErrors != 0 || st.Model.Samples != 0 || st.Inflight != 0 || st.Pending != 0 {
		t.Fatalf("an early close trained the model or counted an error: %+v", st)
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
