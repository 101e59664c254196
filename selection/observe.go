package selection

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// This file watches response bodies as Caddy copies them to the client:
// server-sent event streams of every LLM API the balancer knows (OpenAI
// chat and completions chunks, Responses events, Anthropic Messages
// events), and plain JSON answers, whose usage object says how many tokens
// were generated.

func isEventStream(contentType string) bool {
	return len(contentType) >= 17 && contentType[:17] == "text/event-stream"
}

// retryAfter reads a 429/503 answer's Retry-After: seconds or an HTTP date.
func retryAfter(res *http.Response, now time.Time) time.Duration {
	if res.StatusCode != http.StatusTooManyRequests && res.StatusCode != http.StatusServiceUnavailable {
		return 0
	}
	v := res.Header.Get("Retry-After")
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(v); err == nil {
		return time.Duration(min(max(secs, 0), 24*3600)) * time.Second
	}
	if when, err := http.ParseTime(v); err == nil && when.After(now) {
		return min(when.Sub(now), 24*time.Hour)
	}
	return 0
}

// observedBody watches a response body as Caddy copies it to the client.
// It reads nothing on its own and holds on to nothing but a bounded carry of
// one partial SSE line and the last bytes of a line or a JSON answer.
type observedBody struct {
	io.ReadCloser
	t       *Transport
	att     aibalance.Attempt
	prior   *aibalance.Prior
	api     aibalance.API
	sse     bool
	outcome aibalance.Outcome
	probe   bool               // the attempt holds a half-open probe
	owner   string             // a Responses answer's backend: its response id is recorded as stored there
	head    []byte             // the first bytes of a Responses answer, where its id is
	cancel  context.CancelFunc // the attempt's context (first-byte timer); nil: none
	once    sync.Once

	bytes   int64
	events  int    // SSE events that carried generated content
	usage   int    // output tokens from a usage object, when seen
	carry   []byte // head of the current SSE line (bounded)
	lineLen int    // the current line's full length so far
	tail    []byte // last bytes of the current SSE line, or of a JSON body (bounded)
}

const (
	maxCarry = 4 << 10
	maxTail  = 512
)

func (o *observedBody) Read(p []byte) (int, error) {
	n, err := o.ReadCloser.Read(p)
	if n > 0 {
		if o.owner != "" && o.bytes < maxIDHead {
			o.learnID(p[:n])
		}
		o.bytes += int64(n)
		if o.sse {
			o.scanSSE(p[:n])
		} else {
			o.tail = keepTail(o.tail, p[:n])
		}
	}
	if err != nil {
		if err == io.EOF {
			o.finish(nil)
		} else {
			o.finish(err)
		}
	}
	return n, err
}

// Close ends the observation; a body closed before its end was cut short
// by the client or by Caddy, not by the backend.
func (o *observedBody) Close() error {
	o.finish(errClosedEarly)
	return o.ReadCloser.Close()
}

var errClosedEarly = errors.New("closed before the end")

func (o *observedBody) finish(err error) {
	o.once.Do(func() {
		now := o.t.clock()
		out := o.outcome
		out.E2E = now.Sub(o.att.Start())
		switch {
		case err == errClosedEarly:
			out.Canceled = true
		case err != nil:
			out.StreamError = true
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				out.Timeout = true
			}
			// past its first byte an answer cannot be replayed: the
			// client got part of it (counted as stream_errors)
			if o.t.logger != nil {
				o.t.logger.Warn("upstream cut the answer after it began: the client got an incomplete answer",
					zap.String("upstream", o.att.Backend().Addr()), zap.Int64("bytes", o.bytes), zap.Error(err))
			}
		}
		switch {
		case o.sse && o.lineLen > 0: // a last line without its newline
			o.sseLine()
		case !o.sse:
			o.usage = max(o.usage, usageIn(o.tail))
		}
		switch {
		case o.usage > 0:
			out.OutputTokens = o.usage
		case o.sse:
			out.OutputTokens = o.events
		case o.api == aibalance.APIEmbeddings || o.api == aibalance.APIRerank:
			out.OutputTokens = 0
		default:
			// a generation answer without usage: the output is unknown, and
			// a byte count would count JSON, not tokens
			out.OutputTokens = -1
		}
		out.Stream = o.sse
		o.t.end(&o.att, out, o.prior, o.probe, now)
		if o.cancel != nil {
			o.cancel()
		}
	})
}

// maxIDHead is how far into a Responses answer its id is looked for: the
// id comes first in the response object, and the first stream event
// (response.created) carries that object.
const maxIDHead = 2048

var idField = []byte(`"id"`)

// learnID looks for the response's id in the head of a Responses answer
// and records its backend as the one that stores it.
func (o *observedBody) learnID(p []byte) {
	o.head = append(o.head, p[:min(len(p), maxIDHead-len(o.head))]...)
	i := bytes.Index(o.head, idField)
	if i < 0 {
		return
	}
	rest := bytes.TrimLeft(o.head[i+len(idField):], " \t\r\n")
	if len(rest) == 0 || rest[0] != ':' {
		return
	}
	rest = bytes.TrimLeft(rest[1:], " \t\r\n")
	if len(rest) == 0 || rest[0] != '"' {
		return
	}
	end := bytes.IndexByte(rest[1:], '"')
	if end < 0 {
		return // cut in the middle: the next read completes it
	}
	aibalance.RecordOwner(string(rest[1:1+end]), o.owner, o.att.Start())
	o.owner, o.head = "", nil
}

func keepTail(tail, p []byte) []byte {
	if len(p) >= maxTail {
		return append(tail[:0], p[len(p)-maxTail:]...)
	}
	if over := len(tail) + len(p) - maxTail; over > 0 {
		tail = append(tail[:0], tail[over:]...)
	}
	return append(tail, p...)
}

// scanSSE splits p into lines (joining a line split across reads) and looks
// at each. A line longer than maxCarry keeps its head and its tail: the
// head has the event's type and content, the tail its usage.
func (o *observedBody) scanSSE(p []byte) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		part := p
		if i >= 0 {
			part = p[:i]
		}
		if room := maxCarry - len(o.carry); room > 0 {
			o.carry = append(o.carry, part[:min(len(part), room)]...)
		}
		if o.lineLen+len(part) > maxCarry {
			o.tail = keepTail(o.tail, part)
		}
		o.lineLen += len(part)
		if i < 0 {
			return
		}
		o.sseLine()
		p = p[i+1:]
	}
}

var (
	dataPrefix   = []byte("data:")
	doneSentinel = []byte("[DONE]")
)

// sseLine looks at the line gathered in carry (and tail) and resets them.
func (o *observedBody) sseLine() {
	line := o.carry
	long := o.lineLen > maxCarry
	defer func() {
		o.carry, o.tail, o.lineLen = o.carry[:0], o.tail[:0], 0
	}()
	data, ok := bytes.CutPrefix(line, dataPrefix)
	if !ok {
		return // event:, id:, comments and blank lines
	}
	data = bytes.TrimSpace(data)
	if bytes.Equal(data, doneSentinel) {
		return
	}
	content, usage := scanEvent(data)
	if long {
		usage = max(usage, usageIn(o.tail))
	}
	o.usage = max(o.usage, usage)
	if content {
		if o.events == 0 {
			now := o.t.clock()
			o.outcome.TTFT = now.Sub(o.att.Start())
			o.att.FirstToken(now)
		}
		o.events++
	}
}

// scanEvent reads one event's JSON and reports whether it carries generated
// content, and the output tokens of a usage object in it. It is a tolerant
// tokenizer, not a parser: it walks the bytes once, remembers the last key,
// and looks at string and number values under the keys that matter, at any
// depth and with any spacing. It never recurses and never allocates, so
// no input can blow its stack or its memory.
//
// Content is a non-empty string under a key that carries generated text
// in one of the APIs: chat deltas (content, reasoning_content, reasoning,
// refusal; tool calls' arguments), completions (text), Responses events
// (delta, text), Anthropic deltas (text, thinking, partial_json). Usage is
// completion_tokens (OpenAI chat and completions) or output_tokens
// (Responses, Anthropic); the largest seen counts, as Anthropic streams
// report a running total.
func scanEvent(b []byte) (content bool, usage int) {
	var key []byte
	for i := 0; i < len(b); {
		c := b[i]
		switch {
		case c == '"':
			start := i + 1
			j := start
			for j < len(b) && b[j] != '"' {
				if b[j] == '\\' {
					j++
				}
				j++
			}
			str := b[start:min(j, len(b))]
			i = j + 1
			k := i
			for k < len(b) && (b[k] == ' ' || b[k] == '\t' || b[k] == '\r' || b[k] == '\n') {
				k++
			}
			if k < len(b) && b[k] == ':' {
				key = str
				i = k + 1
				continue
			}
			if len(str) > 0 && isContentKey(key) {
				content = true
			}
			key = nil
		case c >= '0' && c <= '9':
			n := 0
			for i < len(b) && b[i] >= '0' && b[i] <= '9' {
				if n < 1<<30 {
					n = n*10 + int(b[i]-'0')
				}
				i++
			}
			if isUsageKey(key) {
				usage = max(usage, n)
			}
			key = nil
		default:
			if c == '{' || c == '[' || c == ',' || c == '}' || c == ']' {
				if c != ',' {
					key = nil
				}
			} else if c != ' ' && c != '\t' && c != '\r' && c != '\n' {
				key = nil // a literal or a stray byte
			}
			i++
		}
	}
	return content, usage
}

func isContentKey(k []byte) bool {
	switch string(k) {
	case "content", "reasoning_content", "reasoning", "refusal", "arguments",
		"text", "delta", "thinking", "partial_json":
		return true
	}
	return false
}

func isUsageKey(k []byte) bool {
	switch string(k) {
	case "completion_tokens", "output_tokens":
		return true
	}
	return false
}

// usageIn finds the last "completion_tokens" or "output_tokens" count in
// b, the tail of an answer, with any spacing.
func usageIn(b []byte) int {
	best := 0
	for _, key := range [...][]byte{[]byte(`"completion_tokens"`), []byte(`"output_tokens"`)} {
		i := bytes.LastIndex(b, key)
		if i < 0 {
			continue
		}
		rest := bytes.TrimLeft(b[i+len(key):], " \t\r\n")
		rest, ok := bytes.CutPrefix(rest, []byte(":"))
		if !ok {
			continue
		}
		rest = bytes.TrimLeft(rest, " \t\r\n")
		n, digits := 0, 0
		for _, c := range rest {
			if c < '0' || c > '9' || n > 1<<30 {
				break
			}
			n = n*10 + int(c-'0')
			digits++
		}
		if digits > 0 {
			best = max(best, n)
		}
	}
	return best
}
