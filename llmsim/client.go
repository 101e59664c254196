package llmsim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// Result is what a client saw of one completion request.
type Result struct {
	Status       int
	TTFT         time.Duration // to the first chunk carrying content or reasoning (streams) or the first body byte
	E2E          time.Duration
	Tokens       int // content chunks received (streams) or usage.completion_tokens
	UsageTokens  int // usage.completion_tokens, when the server sent usage
	Done         bool
	Backend      string // the "X-Upstream" header, if a proxy set one
	RetryAfter   string
	ErrorMessage string // the OpenAI error message of a non-200 answer
}

// Chunk is the part of an OpenAI streaming chunk the client checks.
type Chunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []struct {
		Index int `json:"index"`
		Delta *struct {
			Role             string `json:"role"`
			Content          string `json:"content"`
			ReasoningContent string `json:"reasoning_content"`
		} `json:"delta"`
		Text         *string `json:"text"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
}

// Complete posts body to url (a /v1/chat/completions or /v1/completions
// address) and reads the answer as an OpenAI client does: server-sent events
// for a 200 text/event-stream answer, checking that every event is a valid
// chunk and that the stream ends with [DONE]; JSON otherwise.
func Complete(ctx context.Context, client *http.Client, url string, body []byte) (Result, error) {
	return CompleteWith(ctx, client, url, body, nil)
}

// CompleteWith is Complete with extra request headers.
func CompleteWith(ctx context.Context, client *http.Client, url string, body []byte, header http.Header) (Result, error) {
	var res Result
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return res, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	res.Status = resp.StatusCode
	res.Backend = resp.Header.Get("X-Upstream")
	res.RetryAfter = resp.Header.Get("Retry-After")
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		res.E2E = time.Since(start)
		if json.Unmarshal(b, &e) == nil {
			res.ErrorMessage = e.Error.Message
		} else {
			res.ErrorMessage = strings.TrimSpace(string(b))
		}
		return res, nil
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		br := bufio.NewReader(resp.Body)
		if _, err := br.Peek(1); err == nil {
			res.TTFT = time.Since(start)
		}
		var out struct {
			Usage struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if err := json.NewDecoder(br).Decode(&out); err != nil {
			return res, fmt.Errorf("decoding completion: %w", err)
		}
		res.E2E = time.Since(start)
		res.Tokens, res.UsageTokens, res.Done = out.Usage.CompletionTokens, out.Usage.CompletionTokens, true
		return res, nil
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, ":") {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			return res, fmt.Errorf("not an SSE data line: %q", line)
		}
		if data == "[DONE]" {
			res.Done = true
			res.E2E = time.Since(start)
			continue
		}
		if res.Done {
			return res, fmt.Errorf("data after [DONE]: %q", data)
		}
		var c Chunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			return res, fmt.Errorf("bad chunk %q: %w", data, err)
		}
		if c.ID == "" || (c.Object != "chat.completion.chunk" && c.Object != "text_completion") {
			return res, fmt.Errorf("chunk without id or with object %q", c.Object)
		}
		if c.Usage != nil {
			res.UsageTokens = c.Usage.CompletionTokens
		}
		for _, ch := range c.Choices {
			content := ""
			if ch.Delta != nil {
				// reasoning is generated output too: it starts the first token
				content = ch.Delta.Content + ch.Delta.ReasoningContent
			} else if ch.Text != nil {
				content = *ch.Text
			}
			if content != "" {
				if res.Tokens == 0 {
					res.TTFT = time.Since(start)
				}
				res.Tokens++
			}
		}
	}
	if err := sc.Err(); err != nil {
		return res, fmt.Errorf("reading stream: %w", err)
	}
	if !res.Done {
		return res, fmt.Errorf("stream ended without [DONE] after %d tokens", res.Tokens)
	}
	return res, nil
}

// ChatBody is a chat completion request with one user message.
func ChatBody(model, content string, maxTokens int, stream bool) []byte {
	req := map[string]any{
		"model":      model,
		"messages":   []map[string]string{{"role": "user", "content": content}},
		"max_tokens": maxTokens,
		"stream":     stream,
	}
	if stream {
		req["stream_options"] = map[string]bool{"include_usage": true}
	}
	b, _ := json.Marshal(req)
	return b
}
