package llmsim

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// maxBodyBytes bounds a request body; larger ones get a 413.
const maxBodyBytes = 32 << 20

type chatRequest struct {
	Model    string `json:"model"`
	Messages []struct {
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
	} `json:"messages"`
	Prompt              json.RawMessage `json:"prompt"`
	Input               json.RawMessage `json:"input"`             // /v1/responses, /v1/embeddings
	Instructions        string          `json:"instructions"`      // /v1/responses
	MaxOutputTokens     *int            `json:"max_output_tokens"` // /v1/responses
	System              json.RawMessage `json:"system"`            // /v1/messages
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Stream              bool            `json:"stream"`
	PreviousResponseID  string          `json:"previous_response_id"` // /v1/responses: history stored here
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request) { s.complete(w, r, apiChat) })
	mux.HandleFunc("POST /v1/completions", func(w http.ResponseWriter, r *http.Request) { s.complete(w, r, apiCompletions) })
	mux.HandleFunc("POST /v1/responses", func(w http.ResponseWriter, r *http.Request) { s.complete(w, r, apiResponses) })
	mux.HandleFunc("POST /v1/messages", func(w http.ResponseWriter, r *http.Request) { s.complete(w, r, apiMessages) })
	mux.HandleFunc("POST /v1/embeddings", s.embeddings)
	mux.HandleFunc("GET /v1/models", s.models)
	mux.HandleFunc("GET /health", s.health)
	mux.Handle("GET /metrics", s.metrics.handler())
	return mux
}

// openAIError writes an error in the OpenAI API's shape.
func openAIError(w http.ResponseWriter, status int, typ, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"error": map[string]any{"message": msg, "type": typ, "param": nil, "code": status},
	})
}

func (s *Server) health(w http.ResponseWriter, _ *http.Request) {
	s.stats.healthProbes.Add(1)
	if s.startingUp() {
		http.Error(w, "starting up", http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) models(w http.ResponseWriter, _ *http.Request) {
	cfg := s.config()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"object": "list",
		"data": []map[string]any{{
			"id": cfg.Model, "object": "model", "created": s.started.Unix(),
			"owned_by": "llmsim", "root": cfg.Model, "max_model_len": cfg.MaxModelLen,
		}},
	})
}

// promptText flattens the prompt: chat messages as "role\x00content\x01"
// (the same framing the balancer hashes), a completion prompt as its text.
func promptText(req *chatRequest, api apiKind) (string, error) {
	switch api {
	case apiResponses:
		return responsesPrompt(req)
	case apiMessages:
		return messagesPrompt(req)
	}
	var b strings.Builder
	if api == apiChat {
		if len(req.Messages) == 0 {
			return "", fmt.Errorf("'messages' is required and must not be empty")
		}
		for _, m := range req.Messages {
			b.WriteString(m.Role)
			b.WriteByte(0)
			var str string
			var parts []struct {
				Type string `json:"type"`
				Text string `json:"text"`
			}
			switch {
			case len(m.Content) == 0 || string(m.Content) == "null":
			case json.Unmarshal(m.Content, &str) == nil:
				b.WriteString(str)
			case json.Unmarshal(m.Content, &parts) == nil:
				for _, p := range parts {
					b.WriteString(p.Text)
				}
			default:
				return "", fmt.Errorf("message content must be a string or an array of content parts")
			}
			b.WriteByte(1)
		}
		return b.String(), nil
	}
	var str string
	var strs []string
	switch {
	case len(req.Prompt) == 0:
		return "", fmt.Errorf("'prompt' is required")
	case json.Unmarshal(req.Prompt, &str) == nil:
		return str, nil
	case json.Unmarshal(req.Prompt, &strs) == nil:
		return strings.Join(strs, ""), nil
	}
	return "", fmt.Errorf("'prompt' must be a string or an array of strings")
}

// admit counts a request, and reads and checks its body as every endpoint
// does: 503 while starting up, 400/413 for a bad body, 404 for another
// model. It reports whether the request may go on.
func (s *Server) admit(w http.ResponseWriter, r *http.Request, req *chatRequest) (Config, bool) {
	s.stats.requests.Add(1)
	cfg := s.config()
	if s.startingUp() {
		openAIError(w, http.StatusServiceUnavailable, "service_unavailable", "the engine is starting up")
		return cfg, false
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
	if err := json.NewDecoder(r.Body).Decode(req); err != nil {
		s.stats.badRequests.Add(1)
		status := http.StatusBadRequest
		if _, ok := err.(*http.MaxBytesError); ok {
			status = http.StatusRequestEntityTooLarge
		}
		openAIError(w, status, "invalid_request_error", "invalid JSON body: "+err.Error())
		return cfg, false
	}
	if req.Model != "" && req.Model != cfg.Model {
		s.stats.badRequests.Add(1)
		openAIError(w, http.StatusNotFound, "NotFoundError", fmt.Sprintf("The model `%s` does not exist.", req.Model))
		return cfg, false
	}
	return cfg, true
}

func (s *Server) complete(w http.ResponseWriter, r *http.Request, api apiKind) {
	var req chatRequest
	cfg, ok := s.admit(w, r, &req)
	if !ok {
		return
	}
	if api == apiResponses && req.PreviousResponseID != "" && !s.storedResponse(req.PreviousResponseID) {
		// its history lives on the server that produced it: as OpenAI and
		// vLLM answer, another server does not know it
		s.stats.badRequests.Add(1)
		openAIError(w, http.StatusNotFound, "invalid_request_error", fmt.Sprintf("Previous response with id '%s' not found.", req.PreviousResponseID))
		return
	}
	text, err := promptText(&req, api)
	if err != nil {
		s.stats.badRequests.Add(1)
		openAIError(w, http.StatusBadRequest, "invalid_request_error", err.Error())
		return
	}
	maxTokens := cfg.DefaultMaxTok
	if api == apiMessages && req.MaxTokens == nil {
		s.stats.badRequests.Add(1)
		openAIError(w, http.StatusBadRequest, "invalid_request_error", "max_tokens: Field required")
		return
	}
	if api == apiResponses {
		if req.MaxOutputTokens != nil {
			maxTokens = *req.MaxOutputTokens
		}
	} else if req.MaxCompletionTokens != nil {
		maxTokens = *req.MaxCompletionTokens
	} else if req.MaxTokens != nil {
		maxTokens = *req.MaxTokens
	}
	promptTokens := max((len(text)+cfg.CharsPerToken-1)/cfg.CharsPerToken, 1)
	if maxTokens < 1 {
		s.stats.badRequests.Add(1)
		openAIError(w, http.StatusBadRequest, "invalid_request_error", "max_tokens must be at least 1")
		return
	}
	if promptTokens+maxTokens > cfg.MaxModelLen {
		s.stats.badRequests.Add(1)
		openAIError(w, http.StatusBadRequest, "invalid_request_error", fmt.Sprintf(
			"This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the messages, %d in the completion).",
			cfg.MaxModelLen, promptTokens+maxTokens, promptTokens, maxTokens))
		return
	}

	f := cfg.Faults
	reject := s.chance(f.RejectRate)
	if f.RejectAboveQueue > 0 {
		if _, waiting, _ := s.eng.counts(); waiting >= f.RejectAboveQueue {
			reject = true
		}
	}
	if reject {
		s.stats.rejected.Add(1)
		w.Header().Set("Retry-After", strconv.Itoa(max(int(f.RetryAfter.Round(time.Second)/time.Second), 1)))
		openAIError(w, http.StatusTooManyRequests, "rate_limit_error", "the engine's queue is full")
		return
	}
	if s.chance(f.ErrorRate) {
		s.stats.errors.Add(1)
		openAIError(w, http.StatusInternalServerError, "internal_error", "injected fault")
		return
	}
	if s.chance(f.HangRate) {
		s.stats.hung.Add(1)
		<-r.Context().Done()
		return
	}
	cut := -1
	if req.Stream && s.chance(f.CutRate) {
		cut = max(maxTokens/2, 1)
	}

	q := &seq{
		prompt:    promptTokens,
		maxTokens: maxTokens,
		tokens:    make(chan struct{}, maxTokens),
		blocks:    blockHashes(text, cfg.BlockTokens*cfg.CharsPerToken),
	}
	arrived := time.Now()
	s.eng.submit(q)
	out := s.answerer(w, api, cfg, arrived)
	includeUsage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage
	if req.Stream {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		w.WriteHeader(http.StatusOK)
		out.start(promptTokens)
	}
	var first time.Time
	n := 0
	for {
		select {
		case _, ok := <-q.tokens:
			if !ok {
				if n < maxTokens { // the engine stopped under us
					panic(http.ErrAbortHandler)
				}
				s.finish(q, arrived, first, n)
				out.end(req.Stream, includeUsage, promptTokens, n)
				return
			}
			if n == 0 {
				first = time.Now()
			}
			n++
			s.stats.outputTokens.Add(1)
			if req.Stream {
				out.token(n)
				if n == cut {
					s.stats.cut.Add(1)
					s.eng.abort(q)
					panic(http.ErrAbortHandler) // drop the connection mid-stream
				}
			}
		case <-r.Context().Done():
			s.eng.abort(q)
			return
		}
	}
}

func (s *Server) finish(q *seq, arrived, first time.Time, n int) {
	s.stats.completed.Add(1)
	s.metrics.observe(first.Sub(arrived), time.Since(arrived), q.prompt, n)
}

// answer writes one API's answer: start opens a stream, token streams the
// n-th token, end closes the stream or writes the whole answer.
type answer interface {
	start(prompt int)
	token(n int)
	end(stream, includeUsage bool, prompt, n int)
}

func (s *Server) answerer(w http.ResponseWriter, api apiKind, cfg Config, arrived time.Time) answer {
	o := responder{
		w: w, chat: api == apiChat, model: cfg.Model, id: fmt.Sprintf("cmpl-%d", arrived.UnixNano()), created: arrived.Unix(),
		spaced: cfg.SpacedJSON, reasoning: cfg.ReasoningTokens,
	}
	switch api {
	case apiResponses:
		o.id = fmt.Sprintf("resp_%d_%d", arrived.UnixNano(), s.idSeq.Add(1))
		s.storeResponse(o.id)
		return &responsesAnswer{responder: o}
	case apiMessages:
		o.id = fmt.Sprintf("msg_%d", arrived.UnixNano())
		return &messagesAnswer{responder: o}
	}
	return &o
}

func (o *responder) start(int) {
	if o.chat {
		// vLLM opens a chat stream with the role; completions streams
		// start with the first token's text
		o.chunk(`{"role":"assistant","content":""}`, "", nil)
	} else {
		o.flush()
	}
}

func (o *responder) flush() {
	if f, ok := o.w.(http.Flusher); ok {
		f.Flush()
	}
}

// responder writes OpenAI responses: SSE chunks or one JSON object.
type responder struct {
	w         http.ResponseWriter
	chat      bool
	model     string
	id        string
	created   int64
	spaced    bool // Python's JSON separators
	reasoning int  // leading tokens sent as reasoning_content (chat only)
}

// json returns compact JSON text as the responder writes it.
func (o *responder) json(compact string) string {
	if o.spaced {
		return spaceJSON(compact)
	}
	return compact
}

// spaceJSON rewrites compact JSON with the separators of Python's json.dumps
// defaults: ", " between items and ": " after keys.
func spaceJSON(compact string) string {
	var b strings.Builder
	b.Grow(len(compact) + len(compact)/8)
	inString, escaped := false, false
	for i := 0; i < len(compact); i++ {
		c := compact[i]
		b.WriteByte(c)
		switch {
		case inString && escaped:
			escaped = false
		case inString && c == '\\':
			escaped = true
		case c == '"':
			inString = !inString
		case !inString && (c == ',' || c == ':'):
			b.WriteByte(' ')
		}
	}
	return b.String()
}

// word is the text of the n-th generated token: about 4 characters.
func word(n int) string { return " w" + strconv.Itoa(n%100) }

func (o *responder) chunk(delta string, finish string, usage *[2]int) {
	fin := "null"
	if finish != "" {
		fin = `"` + finish + `"`
	}
	var payload string
	if o.chat {
		choices := "[]"
		if delta != "" {
			choices = `[{"index":0,"delta":` + delta + `,"logprobs":null,"finish_reason":` + fin + `}]`
		}
		payload = `{"id":"` + o.id + `","object":"chat.completion.chunk","created":` + strconv.FormatInt(o.created, 10) +
			`,"model":"` + o.model + `","choices":` + choices
	} else {
		choices := "[]"
		if delta != "" {
			choices = `[{"index":0,"text":` + delta + `,"logprobs":null,"finish_reason":` + fin + `}]`
		}
		payload = `{"id":"` + o.id + `","object":"text_completion","created":` + strconv.FormatInt(o.created, 10) +
			`,"model":"` + o.model + `","choices":` + choices
	}
	if usage != nil {
		payload += `,"usage":{"prompt_tokens":` + strconv.Itoa(usage[0]) + `,"completion_tokens":` + strconv.Itoa(usage[1]) +
			`,"total_tokens":` + strconv.Itoa(usage[0]+usage[1]) + `}`
	}
	payload += "}"
	_, _ = fmt.Fprintf(o.w, "data: %s\n\n", o.json(payload))
	if f, ok := o.w.(http.Flusher); ok {
		f.Flush()
	}
}

func (o *responder) token(n int) {
	if o.chat {
		if n <= o.reasoning {
			o.chunk(`{"reasoning_content":"`+word(n)+`","content":null}`, "", nil)
			return
		}
		o.chunk(`{"content":"`+word(n)+`"}`, "", nil)
		return
	}
	o.chunk(`"`+word(n)+`"`, "", nil)
}

func (o *responder) end(stream, includeUsage bool, prompt, n int) {
	if stream {
		if o.chat {
			o.chunk(`{}`, "length", nil)
		} else {
			o.chunk(`""`, "length", nil)
		}
		if includeUsage {
			o.chunk("", "", &[2]int{prompt, n})
		}
		_, _ = fmt.Fprint(o.w, "data: [DONE]\n\n")
		if f, ok := o.w.(http.Flusher); ok {
			f.Flush()
		}
		return
	}
	var text, reasoning strings.Builder
	for i := 1; i <= n; i++ {
		if o.chat && i <= o.reasoning {
			reasoning.WriteString(word(i))
			continue
		}
		text.WriteString(word(i))
	}
	usage := map[string]int{"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
	var body map[string]any
	if o.chat {
		msg := map[string]any{"role": "assistant", "content": text.String()}
		if o.reasoning > 0 {
			msg["reasoning_content"] = reasoning.String()
		}
		body = map[string]any{
			"id": o.id, "object": "chat.completion", "created": o.created, "model": o.model,
			"choices": []map[string]any{{"index": 0, "message": msg, "finish_reason": "length"}},
			"usage":   usage,
		}
	} else {
		body = map[string]any{
			"id": o.id, "object": "text_completion", "created": o.created, "model": o.model,
			"choices": []map[string]any{{"index": 0, "text": text.String(), "finish_reason": "length"}},
			"usage":   usage,
		}
	}
	b, _ := json.Marshal(body)
	o.w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(o.w, o.json(string(b))+"\n")
}

// maxStoredResponses bounds the responses a server remembers; the oldest
// half is forgotten when it is reached.
const maxStoredResponses = 100000

func (s *Server) storeResponse(id string) {
	s.respMu.Lock()
	defer s.respMu.Unlock()
	if s.responses == nil {
		s.responses = map[string]int64{}
	}
	s.respN++
	s.responses[id] = s.respN
	if len(s.responses) > maxStoredResponses {
		for k, n := range s.responses {
			if n < s.respN-maxStoredResponses/2 {
				delete(s.responses, k)
			}
		}
	}
}

func (s *Server) storedResponse(id string) bool {
	s.respMu.Lock()
	defer s.respMu.Unlock()
	_, ok := s.responses[id]
	return ok
}
