package llmsim

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"time"
)

// apiKind is the API shape a request came in.
type apiKind int

const (
	apiCompletions apiKind = iota // /v1/completions
	apiChat                       // /v1/chat/completions
	apiResponses                  // /v1/responses (OpenAI Responses API)
	apiMessages                   // /v1/messages (Anthropic Messages API)
)

// contentText is the text of a content that is a string or an array of
// parts with "text" (input_text, text, output_text...).
func contentText(raw json.RawMessage) (string, bool) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", true
	}
	var str string
	if json.Unmarshal(raw, &str) == nil {
		return str, true
	}
	var parts []struct {
		Text string `json:"text"`
	}
	if json.Unmarshal(raw, &parts) == nil {
		var b strings.Builder
		for _, p := range parts {
			b.WriteString(p.Text)
		}
		return b.String(), true
	}
	return "", false
}

type roleContent struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// framed writes messages as "role\x00content\x01", like chat prompts.
func framed(b *strings.Builder, msgs []roleContent) error {
	for _, m := range msgs {
		text, ok := contentText(m.Content)
		if !ok {
			return fmt.Errorf("message content must be a string or an array of content blocks")
		}
		b.WriteString(m.Role)
		b.WriteByte(0)
		b.WriteString(text)
		b.WriteByte(1)
	}
	return nil
}

// responsesPrompt flattens a Responses API request: instructions as a
// system message, then input (a string, or input items with content).
func responsesPrompt(req *chatRequest) (string, error) {
	var b strings.Builder
	if req.Instructions != "" {
		_ = framed(&b, []roleContent{{Role: "system", Content: json.RawMessage(mustJSON(req.Instructions))}})
	}
	var str string
	var items []roleContent
	switch {
	case len(req.Input) == 0:
		return "", fmt.Errorf("'input' is required")
	case json.Unmarshal(req.Input, &str) == nil:
		_ = framed(&b, []roleContent{{Role: "user", Content: req.Input}})
	case json.Unmarshal(req.Input, &items) == nil:
		for i := range items {
			if items[i].Role == "" {
				items[i].Role = "user"
			}
		}
		if err := framed(&b, items); err != nil {
			return "", err
		}
	default:
		return "", fmt.Errorf("'input' must be a string or an array of input items")
	}
	return b.String(), nil
}

// messagesPrompt flattens an Anthropic Messages request: system (a string
// or text blocks), then the messages.
func messagesPrompt(req *chatRequest) (string, error) {
	if len(req.Messages) == 0 {
		return "", fmt.Errorf("messages: Field required")
	}
	var b strings.Builder
	if len(req.System) > 0 {
		if _, ok := contentText(req.System); !ok {
			return "", fmt.Errorf("system: must be a string or an array of text blocks")
		}
		_ = framed(&b, []roleContent{{Role: "system", Content: req.System}})
	}
	msgs := make([]roleContent, len(req.Messages))
	for i, m := range req.Messages {
		msgs[i] = roleContent{Role: m.Role, Content: m.Content}
	}
	if err := framed(&b, msgs); err != nil {
		return "", err
	}
	return b.String(), nil
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// event writes one SSE event with an event: line, as the Responses and
// Anthropic APIs do.
func (o *responder) event(name string, data map[string]any) {
	_, _ = fmt.Fprintf(o.w, "event: %s\ndata: %s\n\n", name, o.json(string(mustJSON(data))))
	o.flush()
}

func (o *responder) text(n int) string {
	var b strings.Builder
	for i := 1; i <= n; i++ {
		b.WriteString(word(i))
	}
	return b.String()
}

func (o *responder) writeJSON(body map[string]any) {
	o.w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(o.w, o.json(string(mustJSON(body)))+"\n")
}

// responsesAnswer writes the OpenAI Responses API: response.created, a
// response.output_text.delta per token, response.output_text.done and
// response.completed with usage; or one response object.
type responsesAnswer struct {
	responder
	seqNo int
}

func (a *responsesAnswer) emit(name string, data map[string]any) {
	data["type"] = name
	data["sequence_number"] = a.seqNo
	a.seqNo++
	a.event(name, data)
}

func (a *responsesAnswer) response(status string, prompt, n int, done bool) map[string]any {
	r := map[string]any{
		"id": a.id, "object": "response", "created_at": a.created, "status": status, "model": a.model,
		"output": []any{},
	}
	if done {
		r["output"] = []any{a.message(n)}
		r["usage"] = map[string]any{"input_tokens": prompt, "output_tokens": n, "total_tokens": prompt + n}
	}
	return r
}

func (a *responsesAnswer) message(n int) map[string]any {
	return map[string]any{
		"type": "message", "id": "msg_" + a.id, "status": "completed", "role": "assistant",
		"content": []any{map[string]any{"type": "output_text", "text": a.text(n), "annotations": []any{}}},
	}
}

func (a *responsesAnswer) start(prompt int) {
	a.emit("response.created", map[string]any{"response": a.response("in_progress", prompt, 0, false)})
	a.emit("response.output_item.added", map[string]any{"output_index": 0, "item": map[string]any{
		"type": "message", "id": "msg_" + a.id, "status": "in_progress", "role": "assistant", "content": []any{},
	}})
	a.emit("response.content_part.added", map[string]any{"item_id": "msg_" + a.id, "output_index": 0, "content_index": 0,
		"part": map[string]any{"type": "output_text", "text": "", "annotations": []any{}}})
}

func (a *responsesAnswer) token(n int) {
	a.emit("response.output_text.delta", map[string]any{"item_id": "msg_" + a.id, "output_index": 0, "content_index": 0, "delta": word(n)})
}

func (a *responsesAnswer) end(stream, _ bool, prompt, n int) {
	if !stream {
		a.writeJSON(a.response("completed", prompt, n, true))
		return
	}
	a.emit("response.output_text.done", map[string]any{"item_id": "msg_" + a.id, "output_index": 0, "content_index": 0, "text": a.text(n)})
	a.emit("response.output_item.done", map[string]any{"output_index": 0, "item": a.message(n)})
	a.emit("response.completed", map[string]any{"response": a.response("completed", prompt, n, true)})
}

// messagesAnswer writes the Anthropic Messages API: message_start,
// content_block_start, a content_block_delta (text_delta) per token,
// content_block_stop, message_delta with usage.output_tokens and
// message_stop; or one message object.
type messagesAnswer struct {
	responder
}

func (a *messagesAnswer) message(prompt, n int, content []any, stop any) map[string]any {
	return map[string]any{
		"id": a.id, "type": "message", "role": "assistant", "model": a.model, "content": content,
		"stop_reason": stop, "stop_sequence": nil,
		"usage": map[string]any{"input_tokens": prompt, "output_tokens": n},
	}
}

func (a *messagesAnswer) start(prompt int) {
	a.event("message_start", map[string]any{"type": "message_start", "message": a.message(prompt, 1, []any{}, nil)})
	a.event("content_block_start", map[string]any{"type": "content_block_start", "index": 0,
		"content_block": map[string]any{"type": "text", "text": ""}})
	a.event("ping", map[string]any{"type": "ping"})
}

func (a *messagesAnswer) token(n int) {
	a.event("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
		"delta": map[string]any{"type": "text_delta", "text": word(n)}})
}

func (a *messagesAnswer) end(stream, _ bool, prompt, n int) {
	if !stream {
		a.writeJSON(a.message(prompt, n, []any{map[string]any{"type": "text", "text": a.text(n)}}, "max_tokens"))
		return
	}
	a.event("content_block_stop", map[string]any{"type": "content_block_stop", "index": 0})
	a.event("message_delta", map[string]any{"type": "message_delta",
		"delta": map[string]any{"stop_reason": "max_tokens", "stop_sequence": nil},
		"usage": map[string]any{"output_tokens": n}})
	a.event("message_stop", map[string]any{"type": "message_stop"})
}

// embeddingDims is the length of the vectors /v1/embeddings returns.
const embeddingDims = 8

// embeddings serves /v1/embeddings: each input costs its prefill on the
// engine (one step's worth of compute, no decode) and gets a unit vector
// derived from its text.
func (s *Server) embeddings(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	cfg, ok := s.admit(w, r, &req)
	if !ok {
		return
	}
	var inputs []string
	var one string
	switch {
	case json.Unmarshal(req.Input, &one) == nil:
		inputs = []string{one}
	case json.Unmarshal(req.Input, &inputs) == nil && len(inputs) > 0:
	default:
		s.stats.badRequests.Add(1)
		openAIError(w, http.StatusBadRequest, "invalid_request_error", "'input' must be a string or a non-empty array of strings")
		return
	}
	arrived := time.Now()
	seqs := make([]*seq, len(inputs))
	total := 0
	for i, text := range inputs {
		tokens := max((len(text)+cfg.CharsPerToken-1)/cfg.CharsPerToken, 1)
		if tokens > cfg.MaxModelLen {
			s.stats.badRequests.Add(1)
			openAIError(w, http.StatusBadRequest, "invalid_request_error", fmt.Sprintf(
				"This model's maximum context length is %d tokens. However, input %d has %d tokens.", cfg.MaxModelLen, i, tokens))
			return
		}
		total += tokens
		// prefill only: the step that completes the prefill ends the sequence
		seqs[i] = &seq{prompt: tokens, maxTokens: 1, tokens: make(chan struct{}, 1)}
	}
	for _, q := range seqs {
		s.eng.submit(q)
	}
	data := make([]any, len(inputs))
	for i, q := range seqs {
		for done := false; !done; {
			select {
			case _, ok := <-q.tokens:
				done = !ok
			case <-r.Context().Done():
				for _, q := range seqs {
					s.eng.abort(q)
				}
				return
			}
		}
		data[i] = map[string]any{"object": "embedding", "index": i, "embedding": vector(inputs[i])}
	}
	s.stats.completed.Add(1)
	s.metrics.observe(time.Since(arrived), time.Since(arrived), total, 0)
	o := responder{w: w, spaced: cfg.SpacedJSON}
	o.writeJSON(map[string]any{
		"object": "list", "data": data, "model": cfg.Model,
		"usage": map[string]any{"prompt_tokens": total, "total_tokens": total},
	})
}

// vector is a deterministic unit vector for text.
func vector(text string) []float64 {
	v := make([]float64, embeddingDims)
	h := uint64(14695981039346656037)
	var norm float64
	for i := range v {
		for j := 0; j < len(text); j++ {
			h ^= uint64(text[j]) + uint64(i)
			h *= 1099511628211
		}
		v[i] = float64(int64(h>>11)%2001-1000) / 1000
		norm += v[i] * v[i]
	}
	norm = math.Sqrt(max(norm, 1e-12))
	for i := range v {
		v[i] /= norm
	}
	return v
}
