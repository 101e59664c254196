package aibalance

import (
	"bytes"

	"github.com/cespare/xxhash/v2"
)

// This file is a tolerant, allocation-light scanner of OpenAI-style request
// bodies (chat completions, completions, embeddings). It must cope with a
// body cut off at the peek limit, so a full JSON decoder does not fit: it
// walks the top-level object, reads the few fields routing needs, counts the
// prompt's characters and chain-hashes its first blocks, and stops quietly at
// the end of the bytes it has. Malformed input ends the scan; it never panics
// (see FuzzParseRequestJSON).

const maxFieldLen = 256 // longest model or user name kept

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

type requestScanner struct {
	buf    []byte
	i      int
	chars  int // prompt characters seen (raw JSON string bytes)
	tokens int // prompt token IDs seen (completions with pre-tokenized prompts)
	msgs   int
	hasher prefixHasher
}

// parseRequestJSON fills f from buf, the first bytes of a body that has rest
// more bytes after them.
func parseRequestJSON(buf []byte, rest int64, cfg FeatureConfig, f *Features) {
	s := requestScanner{buf: buf}
	s.hasher.reset(cfg.PrefixBlockChars)
	s.ws()
	if !s.consume('{') {
		return
	}
	f.Parsed = true
	var maxTokens, maxCompletion int
	for {
		s.ws()
		if s.i >= len(s.buf) || s.buf[s.i] == '}' {
			break
		}
		if s.buf[s.i] == ',' {
			s.i++
			continue
		}
		key, ok := s.str()
		if !ok {
			break
		}
		s.ws()
		if !s.consume(':') {
			break
		}
		s.ws()
		switch string(key) { // no allocation: the compiler compares in place
		case "model":
			if v, ok := s.str(); ok {
				f.Model = string(v[:min(len(v), maxFieldLen)])
			}
		case "user":
			if v, ok := s.str(); ok {
				f.User = string(v[:min(len(v), maxFieldLen)])
			}
		case "max_tokens":
			maxTokens = s.integer()
		case "max_completion_tokens":
			maxCompletion = s.integer()
		case "stream":
			f.Stream = s.literal("true")
		case "messages":
			s.messages()
		case "prompt", "input":
			s.prompt()
		default:
			s.skip()
		}
	}
	switch {
	case maxCompletion > 0:
		f.OutputTokens = maxCompletion
	case maxTokens > 0:
		f.OutputTokens = maxTokens
	}
	if s.hasher.n > 0 {
		f.PrefixHashes = append([]uint64(nil), s.hasher.hashes[:s.hasher.n]...)
	}
	cpt := max(cfg.CharsPerToken, 1)
	// the unread rest of a long body is almost all prompt text
	chars := int64(s.chars) + rest
	f.PromptTokens = int(chars/int64(cpt)) + s.tokens + 4*s.msgs
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

// str reads a string at s.i and returns its raw contents (escapes kept).
// A string cut off by the end of the buffer returns what there is and false.
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

// text reads a string of prompt text: counted and hashed.
func (s *requestScanner) text() bool {
	v, ok := s.str()
	s.chars += len(v)
	s.hasher.write(v)
	return ok
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

// skip passes over one JSON value of any kind.
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
		field(key)
	}
}

var (
	roleSep    = []byte{0}
	messageSep = []byte{1}
)

func (s *requestScanner) messages() {
	s.array(func() {
		s.msgs++
		s.object(func(key []byte) {
			switch string(key) {
			case "role":
				v, _ := s.str()
				s.hasher.write(v)
				s.hasher.write(roleSep)
			case "content":
				s.content()
			default:
				s.skip()
			}
		})
		s.hasher.write(messageSep)
	})
}

// content is a string, or an array of parts whose "text" fields are text.
func (s *requestScanner) content() {
	if s.i < len(s.buf) && s.buf[s.i] == '"' {
		s.text()
		return
	}
	if s.i < len(s.buf) && s.buf[s.i] == '[' {
		s.array(func() {
			s.object(func(key []byte) {
				if string(key) == "text" && s.i < len(s.buf) && s.buf[s.i] == '"' {
					s.text()
					return
				}
				s.skip()
			})
		})
		return
	}
	s.skip()
}

// prompt is a string, an array of strings, or token IDs (one token each).
func (s *requestScanner) prompt() {
	if s.i < len(s.buf) && s.buf[s.i] == '"' {
		s.text()
		return
	}
	s.array(func() {
		switch {
		case s.i < len(s.buf) && s.buf[s.i] == '"':
			s.text()
		case s.i < len(s.buf) && s.buf[s.i] >= '0' && s.buf[s.i] <= '9':
			start := s.i
			s.integer()
			s.hasher.write(s.buf[start:s.i])
			s.tokens++
		case s.i < len(s.buf) && s.buf[s.i] == '[':
			s.prompt() // batched token arrays
		default:
			s.skip()
		}
	})
}
