package aibalance

import (
	"bytes"

	"github.com/cespare/xxhash/v2"
)

// This file is a tolerant, allocation-light scanner of LLM request bodies:
// OpenAI chat completions, completions, responses, embeddings and rerank /
// score, and Anthropic messages. It must cope with a body cut off at the
// peek limit, so a full JSON decoder does not fit: it walks the top-level
// object, reads the few fields routing needs wherever they sit, counts the
// prompt's characters and chain-hashes its first blocks, and stops quietly
// at the end of the bytes it has. Malformed input ends the scan; it never
// panics (see FuzzParseRequestJSON).
//
// The input decides neither the stack nor the heap: skip is iterative, the
// walkers that do recurse (content parts inside content parts) stop at
// maxDepth and skip what lies deeper, and nothing allocates per element.
// Every byte is scanned a bounded number of times (a field's value once to
// find its end, once to read it; a message's once more), so the cost is
// linear in the peeked bytes, and the only allocations are the features'
// own strings and hashes.
//
// Which API the path names does not change how a field is read: every
// field is read the same way wherever it appears, so a chat body sent to
// /v1/responses (or a proxy that rewrites paths) is still understood.

const (
	// maxFieldLen is the longest model, user or session key kept.
	maxFieldLen = 256
	// maxDepth bounds the nesting the content walkers follow (arrays of
	// token arrays, parts holding parts). Real requests nest a handful of
	// levels; anything deeper is skipped by the iterative skip.
	maxDepth = 64
	// maxChoices caps n / best_of, the number of completions a request asks
	// for: its expected output is the output of one times this.
	maxChoices = 128
	// reasoningOutputTokens is the expected output of a reasoning request
	// (reasoning.effort or reasoning_effort, other than "none" or
	// "minimal") that sets no output limit. OpenAI's reasoning guide
	// recommends "reserving at least 25,000 tokens for reasoning and
	// outputs" when a request has no max_output_tokens; as max_tokens is
	// taken as the expected output when set, the documented reservation is
	// the expected output when it is not.
	reasoningOutputTokens = 25000
)

// prefixHasher chain-hashes the prompt in blocks: each block's xxhash is
// seeded with the previous block's hash, so hash i identifies the whole
// prefix up to block i. xxhash (fixed seeds, no per-process randomness) keeps
// the hashes equal across Caddy instances, and hashing 8 bytes at a time it
// is several times faster than a byte-wise hash.
type prefixHasher struct {
	hashes    [MaxPrefixBlocks]uint64 // on the stack; copied out once at the end
	n         int
	d         xxhash.Digest // the current block, seeded with the previous hash
	blockSize int
	left      int // bytes until the current block ends
}

func (p *prefixHasher) reset(blockSize int) {
	p.blockSize, p.left = blockSize, blockSize
	p.d.ResetWithSeed(0)
}

func (p *prefixHasher) write(b []byte) {
	for len(b) > 0 && p.n < MaxPrefixBlocks && p.blockSize > 0 {
		k := min(len(b), p.left)
		_, _ = p.d.Write(b[:k])
		b = b[k:]
		p.left -= k
		if p.left == 0 {
			h := p.d.Sum64()
			p.hashes[p.n] = h
			p.n++
			p.d.ResetWithSeed(h)
			p.left = p.blockSize
		}
	}
}

// The framing hashed around a message: its role, roleSep, its text,
// messageSep. A token ID is followed by tokenSep so [1,23] and [12,3]
// differ.
var (
	roleSep    = []byte{0}
	messageSep = []byte{1}
	tokenSep   = []byte{','}
	systemRole = []byte("system")
)

type requestScanner struct {
	buf    []byte // the bytes being read; narrowed to one value by within
	i      int
	chars  int // prompt characters seen (raw JSON string bytes)
	tokens int // prompt token IDs seen (pre-tokenized prompts)
	msgs   int // messages and input items, each a few template tokens
	hasher prefixHasher
}

// span is where one value sits in the body: buf[i:j]. The zero span is a
// field the body does not have.
type span struct{ i, j int }

func (sp span) ok() bool { return sp.j > sp.i }

// requestFields are the top-level fields whose order of hashing must not
// depend on their order in the body: system text comes before the
// conversation, whatever the client's JSON encoder did.
type requestFields struct {
	system, instructions, messages, input          span
	prompt, query, documents, text1, text2         span
	maxTokens, maxCompletion, maxOutput, n, bestOf int
	budget                                         int  // thinking.budget_tokens
	reasoning                                      bool // a reasoning effort other than none / minimal
	metadataUser                                   string
}

// parseRequestJSON fills f from buf, the first bytes of a body that has rest
// more bytes after them. f.API is already set and left alone.
func parseRequestJSON(buf []byte, rest int64, cfg FeatureConfig, f *Features) {
	s := requestScanner{buf: buf}
	s.hasher.reset(cfg.PrefixBlockChars)
	s.ws()
	if s.i >= len(s.buf) || s.buf[s.i] != '{' {
		return
	}
	f.Parsed = true
	var r requestFields
	s.object(func(key []byte) {
		switch string(key) { // no allocation: the compiler compares in place
		case "model":
			f.Model = s.name()
		case "user":
			f.User = s.name()
		case "previous_response_id":
			f.PreviousResponseID = s.name()
		case "prompt_cache_key":
			f.PromptCacheKey = s.name()
		case "conversation":
			f.Conversation = s.id()
		case "metadata":
			r.metadataUser = s.metadataUser()
		case "max_tokens":
			r.maxTokens = s.integer()
		case "max_completion_tokens":
			r.maxCompletion = s.integer()
		case "max_output_tokens":
			r.maxOutput = s.integer()
		case "n":
			r.n = s.integer()
		case "best_of":
			r.bestOf = s.integer()
		case "stream":
			f.Stream = s.literal("true")
		case "reasoning":
			r.reasoning = s.reasoning()
		case "reasoning_effort":
			r.reasoning = s.effort()
		case "thinking":
			r.budget = s.thinking()
		case "tools", "functions":
			// Tool definitions are rendered into the prompt (as JSON, by
			// most chat templates): their bytes count. They are not hashed:
			// where they land in the prompt depends on the template.
			start := s.i
			s.skip()
			s.chars += s.i - start
		case "system":
			r.system = s.span()
		case "instructions":
			r.instructions = s.span()
		case "messages":
			r.messages = s.span()
		case "input":
			r.input = s.span()
		case "prompt":
			r.prompt = s.span()
		case "query":
			r.query = s.span()
		case "documents":
			r.documents = s.span()
		case "text_1":
			r.text1 = s.span()
		case "text_2":
			r.text2 = s.span()
		default:
			s.skip()
		}
	})

	// The prompt, hashed in the order an engine sees it: system text, the
	// conversation, then anything else that is prompt text.
	s.within(r.system, func() { s.systemText(0) })
	s.within(r.instructions, func() { s.systemText(0) })
	s.within(r.messages, s.items)
	s.within(r.input, s.items)
	for _, sp := range [...]span{r.prompt, r.query, r.documents, r.text1, r.text2} {
		s.within(sp, func() { s.value(0) })
	}

	if f.User == "" {
		f.User = r.metadataUser
	}
	f.OutputTokens = r.output(cfg.DefaultOutputTokens)
	if limit := r.limit(); limit > 0 {
		f.OutputLimit = limit * min(max(r.n, r.bestOf, 1), maxChoices)
	}
	if s.hasher.n > 0 {
		f.PrefixHashes = append([]uint64(nil), s.hasher.hashes[:s.hasher.n]...)
	}
	cpt := max(cfg.CharsPerToken, 1)
	// the unread rest of a long body is almost all prompt text
	chars := int64(s.chars) + rest
	text := chars / int64(cpt)
	if text == 0 && chars > 0 {
		text = 1 // any prompt text is at least one token
	}
	f.PromptTokens = int(text) + s.tokens + 4*s.msgs
}

// limit is the request's own output limit, 0 when it sets none:
// max_completion_tokens, else max_output_tokens, else max_tokens.
func (r *requestFields) limit() int {
	for _, l := range [...]int{r.maxCompletion, r.maxOutput, r.maxTokens} {
		if l > 0 {
			return l
		}
	}
	return 0
}

// output is the expected output of the request: its output limit (or
// def, or the reasoning reservation), times the completions it asks for.
func (r *requestFields) output(def int) int {
	limit := r.limit()
	out := def
	switch {
	case limit > 0:
		// Anthropic counts thinking within max_tokens (budget_tokens must
		// be below it), so the budget adds nothing; with interleaved
		// thinking it may exceed max_tokens, and then it is the bound.
		out = max(limit, r.budget)
	default:
		if r.reasoning {
			out = max(out, reasoningOutputTokens)
		}
		out += r.budget
	}
	choices := min(max(r.n, r.bestOf, 1), maxChoices)
	return out * choices
}

func (s *requestScanner) ws() {
	for s.i < len(s.buf) {
		switch s.buf[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *requestScanner) consume(c byte) bool {
	if s.i < len(s.buf) && s.buf[s.i] == c {
		s.i++
		return true
	}
	return false
}

// peek returns the byte at s.i, or 0 at the end.
func (s *requestScanner) peek() byte {
	if s.i < len(s.buf) {
		return s.buf[s.i]
	}
	return 0
}

// str reads a string at s.i and returns its raw contents (escapes kept).
// A string cut off by the end of the buffer returns what there is and false.
// Each backslash is looked at once (backwards from the next quote, never past
// the previous one), so the cost is linear however the escapes are arranged.
func (s *requestScanner) str() ([]byte, bool) {
	if !s.consume('"') {
		return nil, false
	}
	start := s.i
	for {
		j := bytes.IndexByte(s.buf[s.i:], '"')
		if j < 0 {
			s.i = len(s.buf)
			return s.buf[start:], false
		}
		s.i += j
		// count the backslashes before the quote: an odd count escapes it
		bs := 0
		for k := s.i - 1; k >= start && s.buf[k] == '\\'; k-- {
			bs++
		}
		s.i++
		if bs%2 == 0 {
			return s.buf[start : s.i-1], true
		}
	}
}

// name reads a string kept as a feature (model, user, an id): at most
// maxFieldLen bytes of it. Anything else is skipped and gives "".
func (s *requestScanner) name() string {
	if s.peek() != '"' {
		s.skip()
		return ""
	}
	if v, ok := s.str(); ok {
		return string(v[:min(len(v), maxFieldLen)])
	}
	return ""
}

// id reads an id given as a string or as an object's "id" (conversation).
func (s *requestScanner) id() string {
	if s.peek() != '{' {
		return s.name()
	}
	var id string
	s.object(func(key []byte) {
		if string(key) == "id" {
			id = s.name()
			return
		}
		s.skip()
	})
	return id
}

// metadataUser reads metadata.user_id (Anthropic's session key).
func (s *requestScanner) metadataUser() string {
	var user string
	s.object(func(key []byte) {
		if string(key) == "user_id" {
			user = s.name()
			return
		}
		s.skip()
	})
	return user
}

// reasoning reads OpenAI's reasoning object: any effort other than none or
// minimal (the model's default, medium, when it names none) is reasoning.
func (s *requestScanner) reasoning() bool {
	if s.peek() != '{' {
		s.skip() // null: no reasoning
		return false
	}
	on := true
	s.object(func(key []byte) {
		if string(key) == "effort" {
			on = s.effort()
			return
		}
		s.skip()
	})
	return on
}

// effort reads a reasoning effort: reasoning unless "none" or "minimal".
func (s *requestScanner) effort() bool {
	if s.peek() != '"' {
		s.skip()
		return false
	}
	v, _ := s.str()
	switch string(v) {
	case "none", "minimal", "":
		return false
	}
	return true
}

// thinking reads Anthropic's thinking object: its budget_tokens, unless
// the type says it is disabled.
func (s *requestScanner) thinking() int {
	budget, disabled := 0, false
	s.object(func(key []byte) {
		switch string(key) {
		case "budget_tokens":
			budget = s.integer()
		case "type":
			disabled = s.name() == "disabled"
		default:
			s.skip()
		}
	})
	if disabled {
		return 0
	}
	return budget
}

// text reads a string of prompt text: counted and hashed.
func (s *requestScanner) text() bool {
	v, ok := s.str()
	s.chars += len(v)
	s.hasher.write(v)
	return ok
}

// textOrJSON reads prompt text given as a string, or as any JSON value
// (tool_use input, function arguments as an object), counted and hashed as
// its raw bytes: a template renders it as JSON.
func (s *requestScanner) textOrJSON() {
	if s.peek() == '"' {
		s.text()
		return
	}
	start := s.i
	s.skip()
	s.chars += s.i - start
	s.hasher.write(s.buf[start:s.i])
}

func (s *requestScanner) integer() int {
	n := 0
	start := s.i
	for s.i < len(s.buf) && s.buf[s.i] >= '0' && s.buf[s.i] <= '9' {
		if n < 1<<40 {
			n = n*10 + int(s.buf[s.i]-'0')
		}
		s.i++
	}
	if s.i == start || (s.i < len(s.buf) && (s.buf[s.i] == '.' || s.buf[s.i] == 'e' || s.buf[s.i] == 'E')) {
		s.skip() // negative, fractional or not a number: not a usable count
		return 0
	}
	return n
}

func (s *requestScanner) literal(want string) bool {
	if bytes.HasPrefix(s.buf[s.i:], []byte(want)) {
		s.i += len(want)
		return true
	}
	s.skip()
	return false
}

// skip passes over one JSON value of any kind, iteratively: nesting is a
// counter, not a stack.
func (s *requestScanner) skip() {
	if s.i >= len(s.buf) {
		return
	}
	switch s.buf[s.i] {
	case '"':
		s.str()
	case '{', '[':
		depth := 0
		for s.i < len(s.buf) {
			switch s.buf[s.i] {
			case '"':
				s.str()
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
			}
			s.i++
			if depth == 0 {
				return
			}
		}
	default:
		for s.i < len(s.buf) {
			switch s.buf[s.i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				return
			}
			s.i++
		}
	}
}

// span skips the value at s.i and returns where it was.
func (s *requestScanner) span() span {
	start := s.i
	s.skip()
	return span{start, s.i}
}

// within reads the value at sp with read, seeing no byte past it, then
// puts the scanner back where it was.
func (s *requestScanner) within(sp span, read func()) {
	if !sp.ok() {
		return
	}
	buf, i := s.buf, s.i
	s.buf, s.i = buf[:sp.j], sp.i
	read()
	s.buf, s.i = buf, i
}

// array calls elem for each element of the array at s.i (or skips a non-array).
func (s *requestScanner) array(elem func()) {
	if !s.consume('[') {
		s.skip()
		return
	}
	for {
		s.ws()
		if s.i >= len(s.buf) {
			return
		}
		switch s.buf[s.i] {
		case ']':
			s.i++
			return
		case ',':
			s.i++
			continue
		}
		before := s.i
		elem()
		if s.i == before { // no progress: malformed, stop here
			s.i = len(s.buf)
			return
		}
	}
}

// object calls field for each key of the object at s.i (or skips a non-object).
func (s *requestScanner) object(field func(key []byte)) {
	if !s.consume('{') {
		s.skip()
		return
	}
	for {
		s.ws()
		if s.i >= len(s.buf) {
			return
		}
		switch s.buf[s.i] {
		case '}':
			s.i++
			return
		case ',':
			s.i++
			continue
		}
		key, ok := s.str()
		if !ok {
			s.i = len(s.buf)
			return
		}
		s.ws()
		if !s.consume(':') {
			s.i = len(s.buf)
			return
		}
		s.ws()
		before := s.i
		field(key)
		if s.i == before && s.i < len(s.buf) && s.buf[s.i] != ',' && s.buf[s.i] != '}' {
			s.i = len(s.buf) // no progress on a value: malformed, stop here
			return
		}
	}
}

// systemText reads system prompt text (Anthropic's system, a string or
// text blocks; the Responses API's instructions) framed as a system message.
func (s *requestScanner) systemText(depth int) {
	s.msgs++
	s.hasher.write(systemRole)
	s.hasher.write(roleSep)
	s.value(depth)
	s.hasher.write(messageSep)
}

// items reads a conversation: chat or Anthropic messages, Responses API
// input items, or (embeddings, a Responses string input) plain prompt
// values. Objects are messages; anything else is read as a prompt value.
func (s *requestScanner) items() {
	if s.peek() != '[' {
		s.value(0)
		return
	}
	s.array(func() {
		if s.peek() == '{' {
			s.item()
			return
		}
		s.value(1)
	})
}

// item reads one message or input item. Its text is hashed in a fixed
// order whatever the order of its keys: role (or, for a Responses item
// without one, its type), roleSep, content, text, tool calls, arguments,
// tool input, tool output, messageSep. A chat message
// {"role":"user","content":"hi"} hashes as "user" 0 "hi" 1, as it always has.
func (s *requestScanner) item() {
	var role, typ, content, text, toolCalls, arguments, input, output span
	s.object(func(key []byte) {
		switch string(key) {
		case "role":
			role = s.span()
		case "type":
			typ = s.span()
		case "content":
			content = s.span()
		case "text":
			text = s.span()
		case "tool_calls":
			toolCalls = s.span()
		case "arguments":
			arguments = s.span()
		case "input":
			input = s.span()
		case "output":
			output = s.span()
		default:
			s.skip()
		}
	})
	s.msgs++
	if !role.ok() {
		role = typ
	}
	if role.ok() {
		s.within(role, func() {
			v, _ := s.str()
			s.hasher.write(v)
		})
		s.hasher.write(roleSep)
	}
	s.within(content, func() { s.value(1) })
	s.within(text, func() { s.value(1) })
	s.within(toolCalls, s.toolCalls)
	s.within(arguments, s.textOrJSON)
	s.within(input, s.textOrJSON)
	s.within(output, func() { s.value(1) })
	s.hasher.write(messageSep)
}

// toolCalls reads a chat assistant message's tool_calls: each function's
// name and arguments are prompt text.
func (s *requestScanner) toolCalls() {
	s.array(func() {
		s.object(func(key []byte) {
			if string(key) != "function" {
				s.skip()
				return
			}
			s.object(func(key []byte) {
				switch string(key) {
				case "name":
					s.text()
				case "arguments":
					s.textOrJSON()
				default:
					s.skip()
				}
			})
		})
	})
}

// value reads a prompt value: a string is text, an integer a token ID, an
// array holds values (strings, token IDs, batched token arrays, content
// parts), an object is a content part. Past maxDepth it only skips.
func (s *requestScanner) value(depth int) {
	if depth > maxDepth {
		s.skip()
		return
	}
	switch c := s.peek(); {
	case c == '"':
		s.text()
	case c >= '0' && c <= '9':
		start := s.i
		s.integer()
		s.hasher.write(s.buf[start:s.i])
		s.hasher.write(tokenSep)
		s.tokens++
	case c == '[':
		s.array(func() { s.value(depth + 1) })
	case c == '{':
		s.part(depth + 1)
	default:
		s.skip()
	}
}

// part reads a content part or block, in the order of its keys: text
// ("text", "input_text", "output_text" parts and Anthropic text blocks),
// tool_use input, tool_result content, function call arguments and
// output. Images, files and everything else are skipped.
func (s *requestScanner) part(depth int) {
	if depth > maxDepth {
		s.skip()
		return
	}
	s.object(func(key []byte) {
		switch string(key) {
		case "text":
			if s.peek() == '"' {
				s.text()
				return
			}
			s.skip()
		case "input", "arguments":
			s.textOrJSON()
		case "content", "output":
			s.value(depth + 1)
		default:
			s.skip()
		}
	})
}
