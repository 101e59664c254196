package llmsim

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// post sends body to path and returns the raw answer.
func post(t *testing.T, s *Server, path, body string) (string, string) {
	t.Helper()
	resp, err := http.Post(s.URL()+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	return resp.Header.Get("Content-Type"), string(b)
}

// sseData returns the data of every SSE event in body.
func sseData(t *testing.T, body string) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			out = append(out, d)
		}
	}
	return out
}

func TestSpaceJSON(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"object", `{"a":1,"b":[1,2]}`, `{"a": 1, "b": [1, 2]}`},
		{"strings keep their commas", `{"t":"x, y:z","u":"q\"a,b"}`, `{"t": "x, y:z", "u": "q\"a,b"}`},
		{"escaped backslash", `{"t":"a\\","u":1}`, `{"t": "a\\", "u": 1}`},
		{"empty", `{}`, `{}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := spaceJSON(tc.in)
			if got != tc.want {
				t.Fatalf("spaceJSON(%s) = %s, want %s", tc.in, got, tc.want)
			}
			var a, b any
			if json.Unmarshal([]byte(tc.in), &a) != nil || json.Unmarshal([]byte(got), &b) != nil {
				t.Fatalf("not JSON: %s", got)
			}
		})
	}
}

func TestSpacedJSON(t *testing.T) {
	s := start(t, Config{SpacedJSON: true})
	_, body := post(t, s, "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}`)
	if !strings.Contains(body, `"content": " w1"`) || strings.Contains(body, `"content":"`) {
		t.Fatalf("stream not in Python's spacing:\n%s", body)
	}
	_, body = post(t, s, "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}`)
	if !strings.Contains(body, `"completion_tokens": 3`) {
		t.Fatalf("answer not in Python's spacing: %s", body)
	}
	// clients read both
	if r := chat(t, s, "hi", 5); r.Tokens != 5 || r.UsageTokens != 5 {
		t.Fatalf("client saw %+v", r)
	}
}

func TestReasoningTokens(t *testing.T) {
	s := start(t, Config{ReasoningTokens: 3})
	_, body := post(t, s, "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}`)
	var reasoning, content int
	for _, d := range sseData(t, body) {
		if d == "[DONE]" {
			continue
		}
		var c struct {
			Choices []struct {
				Delta map[string]*string `json:"delta"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatal(err)
		}
		for _, ch := range c.Choices {
			if r, ok := ch.Delta["reasoning_content"]; ok {
				if c, ok := ch.Delta["content"]; !ok || c != nil || r == nil {
					t.Fatalf("reasoning delta without content null: %s", d)
				}
				if content > 0 {
					t.Fatalf("reasoning after content: %s", d)
				}
				reasoning++
			} else if c := ch.Delta["content"]; c != nil && *c != "" {
				content++
			}
		}
	}
	if reasoning != 3 || content != 2 {
		t.Fatalf("%d reasoning and %d content deltas, want 3 and 2:\n%s", reasoning, content, body)
	}
	if r := chat(t, s, "hi", 5); r.Tokens != 5 || r.UsageTokens != 5 {
		t.Fatalf("client saw %+v, want reasoning counted as tokens", r)
	}
	_, body = post(t, s, "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}`)
	var answer struct {
		Choices []struct {
			Message struct {
				Content          string `json:"content"`
				ReasoningContent string `json:"reasoning_content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal([]byte(body), &answer); err != nil {
		t.Fatal(err)
	}
	if m := answer.Choices[0].Message; m.ReasoningContent != " w1 w2 w3" || m.Content != " w4 w5" {
		t.Fatalf("message %+v", m)
	}
}

func TestCompletionsStreamText(t *testing.T) {
	s := start(t, Config{})
	_, body := post(t, s, "/v1/completions", `{"prompt":"once upon","max_tokens":4,"stream":true}`)
	for _, d := range sseData(t, body) {
		if d == "[DONE]" {
			continue
		}
		var c struct {
			Choices []struct {
				Text *string `json:"text"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatalf("chunk %s: %v", d, err)
		}
		for _, ch := range c.Choices {
			if ch.Text == nil {
				t.Fatalf("chunk without text: %s", d)
			}
		}
	}
	r, err := Complete(context.Background(), http.DefaultClient, s.URL()+"/v1/completions", []byte(`{"prompt":"once upon","max_tokens":4,"stream":true}`))
	if err != nil || r.Tokens != 4 {
		t.Fatalf("client: %v %+v", err, r)
	}
}

func TestSpeedChanges(t *testing.T) {
	s := start(t, Config{Speed: 2, SpeedChanges: []SpeedChange{{At: 50 * time.Millisecond, Speed: 0.5}}})
	if got := s.Config().Speed; got != 2 {
		t.Fatalf("speed %v at start, want 2", got)
	}
	deadline := time.Now().Add(2 * time.Second)
	for s.Config().Speed != 0.5 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.Config().Speed; got != 0.5 {
		t.Fatalf("speed %v after the change, want 0.5", got)
	}
	// a stopped engine's pending changes are dropped
	s2 := start(t, Config{SpeedChanges: []SpeedChange{{At: 30 * time.Millisecond, Speed: 0.1}}})
	s2.Stop()
	time.Sleep(60 * time.Millisecond)
	if got := s2.Config().Speed; got != 1 {
		t.Fatalf("stopped engine changed speed to %v", got)
	}
}
