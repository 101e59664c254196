package llmsim

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// sseEvents returns the event names and data of an SSE body with event: lines.
func sseEvents(t *testing.T, body string) (names []string, data []map[string]any) {
	t.Helper()
	for _, block := range strings.Split(strings.TrimSpace(body), "\n\n") {
		var name string
		var d map[string]any
		for _, line := range strings.Split(block, "\n") {
			if v, ok := strings.CutPrefix(line, "event: "); ok {
				name = v
			}
			if v, ok := strings.CutPrefix(line, "data: "); ok {
				if err := json.Unmarshal([]byte(v), &d); err != nil {
					t.Fatalf("event data %s: %v", v, err)
				}
			}
		}
		if name == "" || d == nil || d["type"] != name {
			t.Fatalf("event without a name or a matching type: %q", block)
		}
		names, data = append(names, name), append(data, d)
	}
	return names, data
}

func TestResponsesAPI(t *testing.T) {
	s := start(t, Config{})
	for _, body := range []string{
		`{"input":"hello there","instructions":"be brief","max_output_tokens":4,"stream":true}`,
		`{"input":[{"role":"user","content":[{"type":"input_text","text":"hello"}]}],"max_output_tokens":4,"stream":true}`,
	} {
		ct, out := post(t, s, "/v1/responses", body)
		if !strings.HasPrefix(ct, "text/event-stream") {
			t.Fatalf("content type %q", ct)
		}
		names, data := sseEvents(t, out)
		deltas := 0
		for i, n := range names {
			if n == "response.output_text.delta" {
				deltas++
				if d, _ := data[i]["delta"].(string); d == "" {
					t.Fatalf("delta without text: %v", data[i])
				}
			}
		}
		if names[0] != "response.created" || names[len(names)-1] != "response.completed" || deltas != 4 {
			t.Fatalf("events %v", names)
		}
		if names[len(names)-3] != "response.output_text.done" {
			t.Fatalf("no response.output_text.done before the end: %v", names)
		}
		usage := data[len(data)-1]["response"].(map[string]any)["usage"].(map[string]any)
		if usage["output_tokens"] != 4.0 || usage["input_tokens"].(float64) < 1 {
			t.Fatalf("usage %v", usage)
		}
	}
	_, out := post(t, s, "/v1/responses", `{"input":"hello","max_output_tokens":3}`)
	var r struct {
		Object string `json:"object"`
		Status string `json:"status"`
		Output []struct {
			Content []struct {
				Type, Text string
			} `json:"content"`
		} `json:"output"`
		Usage struct {
			InputTokens  int `json:"input_tokens"`
			OutputTokens int `json:"output_tokens"`
		} `json:"usage"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	if r.Object != "response" || r.Status != "completed" || r.Usage.OutputTokens != 3 || r.Output[0].Content[0].Text != " w1 w2 w3" {
		t.Fatalf("response %s", out)
	}
}

func TestMessagesAPI(t *testing.T) {
	s := start(t, Config{SpacedJSON: true})
	_, out := post(t, s, "/v1/messages",
		`{"model":"sim-llama-8b","system":[{"type":"text","text":"be brief"}],"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":5,"stream":true}`)
	names, data := sseEvents(t, out)
	want := []string{"message_start", "content_block_start", "ping"}
	for range 5 {
		want = append(want, "content_block_delta")
	}
	want = append(want, "content_block_stop", "message_delta", "message_stop")
	if strings.Join(names, ",") != strings.Join(want, ",") {
		t.Fatalf("events %v, want %v", names, want)
	}
	if d := data[3]["delta"].(map[string]any); d["type"] != "text_delta" || d["text"] != " w1" {
		t.Fatalf("delta %v", d)
	}
	if u := data[len(data)-2]["usage"].(map[string]any); u["output_tokens"] != 5.0 {
		t.Fatalf("message_delta usage %v", u)
	}
	if u := data[0]["message"].(map[string]any)["usage"].(map[string]any); u["input_tokens"].(float64) < 1 {
		t.Fatalf("message_start usage %v", u)
	}
	_, out = post(t, s, "/v1/messages", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}`)
	var m struct {
		Type    string `json:"type"`
		Content []struct{ Type, Text string }
		Usage   struct {
			InputTokens  int `json:"input_tokens"`
			OutputTokens int `json:"output_tokens"`
		} `json:"usage"`
		StopReason string `json:"stop_reason"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	if m.Type != "message" || m.Content[0].Text != " w1 w2" || m.Usage.OutputTokens != 2 || m.Usage.InputTokens < 1 || m.StopReason != "max_tokens" {
		t.Fatalf("message %s", out)
	}
	resp, err := http.Post(s.URL()+"/v1/messages", "application/json", strings.NewReader(`{"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("no max_tokens: status %d, want 400", resp.StatusCode)
	}
}

func TestEmbeddings(t *testing.T) {
	s := start(t, Config{})
	_, out := post(t, s, "/v1/embeddings", `{"input":["hello world","another text here"]}`)
	var e struct {
		Object string `json:"object"`
		Data   []struct {
			Index     int       `json:"index"`
			Embedding []float64 `json:"embedding"`
		} `json:"data"`
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
		} `json:"usage"`
	}
	if err := json.Unmarshal([]byte(out), &e); err != nil {
		t.Fatal(err)
	}
	if e.Object != "list" || len(e.Data) != 2 || len(e.Data[0].Embedding) != embeddingDims || e.Data[1].Index != 1 || e.Usage.PromptTokens != 3+5 {
		t.Fatalf("embeddings %s", out)
	}
	if st := s.Stats(); st.OutputTokens != 0 || st.PromptTokens != 8 {
		t.Fatalf("stats %+v: want prefill only", st)
	}
}
