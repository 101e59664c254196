package llmsim

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
)

// Workload shapes: what the prompts of a workload share. Uniform prompts
// share nothing; the others model the traffic prefix-cache affinity is for.
const (
	// ShapeUniform: every prompt is unique (the default).
	ShapeUniform = ""
	// ShapeChat: multi-turn conversations; each turn sends the whole
	// history, which grows by an answer and a new question each turn.
	ShapeChat = "chat"
	// ShapePrefix: many tenants, each with its own long system prompt,
	// chosen by Zipf popularity; each request adds a short question.
	ShapePrefix = "prefix"
	// ShapeAgentic: agents with a long fixed tool-and-instructions prefix,
	// each running a loop of many short turns (tool results appended).
	ShapeAgentic = "agentic"
)

// shaper makes the request bodies of a shaped workload, one arrival after
// another (it is not safe for concurrent use; Run calls it from its loop).
type shaper struct {
	shape string
	r     *rand.Rand
	w     Workload
	convs []*conversation
	next  int // the next conversation id
	zipf  *rand.Zipf
}

type conversation struct {
	id, turns, limit int
	lastOutput       int // the previous turn's max_tokens: its answer's length
	msgs             []map[string]string
}

// shape parameters: enough concurrent conversations or tenants that an
// engine's prefix cache cannot hold them all, few enough that they recur.
// Chat: 32 conversations of 2–16 turns whose history grows by a question
// and an answer each turn hold about 35k tokens at a time, twice a 16k-token
// engine cache and half of four.
const (
	chatConversations  = 32
	chatTurns          = 16
	prefixTenants      = 48
	prefixSystemTokens = 1200
	agentCount         = 24
	agentPrefixTokens  = 2500
	agentTurns         = 24
	agentKinds         = 12
)

func newShaper(w Workload, r *rand.Rand) *shaper {
	s := &shaper{shape: w.Shape, r: r, w: w}
	if w.Shape == ShapePrefix {
		s.zipf = rand.NewZipf(r, 1.1, 1, prefixTenants-1)
	}
	return s
}

// SessionHeader carries a shaped request's session (its conversation,
// agent loop or tenant), as a client that names its sessions sends it: what
// Caddy's header policy and affinity header hash.
const SessionHeader = "X-Session-Id"

// body returns the next request's body, its prompt tokens (estimated) and
// its session.
func (s *shaper) body(i, output int, stream bool) ([]byte, int, string) {
	switch s.shape {
	case ShapeChat:
		return s.turn(chatConversations, chatTurns, 0, output, stream, func(c *conversation) string {
			return fmt.Sprintf("%s: %s", "question", randomText(c.id*1000+c.turns, 4*logUniform(s.r, s.w.MinPrompt, s.w.MaxPrompt), s.r))
		})
	case ShapeAgentic:
		return s.turn(agentCount, agentTurns, agentPrefixTokens, output, stream, func(c *conversation) string {
			return "tool result: " + randomText(c.id*1000+c.turns, 4*logUniform(s.r, s.w.MinPrompt, s.w.MaxPrompt), s.r)
		})
	case ShapePrefix:
		tenant := int(s.zipf.Uint64())
		msgs := []map[string]string{
			{"role": "system", "content": systemPrompt(tenant, prefixSystemTokens)},
			{"role": "user", "content": randomText(i, 4*logUniform(s.r, s.w.MinPrompt, s.w.MaxPrompt), s.r)},
		}
		return chatBody(msgs, output, stream), tokensOf(msgs), fmt.Sprintf("tenant-%d", tenant)
	}
	prompt := logUniform(s.r, s.w.MinPrompt, s.w.MaxPrompt)
	return ChatBody("", randomText(i, prompt*4, s.r), output, stream), prompt, ""
}

// turn advances a random conversation of n (replacing finished ones) by
// one user message and returns the request with its whole history. A
// conversation starts with a system prompt of systemTokens (0: a short
// one of its own).
func (s *shaper) turn(n, limit, systemTokens, output int, stream bool, next func(*conversation) string) ([]byte, int, string) {
	if s.convs == nil {
		s.convs = make([]*conversation, n)
	}
	k := s.r.IntN(n)
	c := s.convs[k]
	if c == nil || c.turns >= c.limit {
		c = &conversation{id: s.next, limit: 2 + s.r.IntN(limit-1)}
		s.next++
		sys := fmt.Sprintf("You are assistant %d.", c.id)
		if systemTokens > 0 {
			sys = systemPrompt(c.id%agentKinds, systemTokens) // agents of a kind share their tools
		}
		c.msgs = []map[string]string{{"role": "system", "content": sys}}
		s.convs[k] = c
	} else {
		// the answer to the previous turn, as the client keeps it: as
		// long as that turn's output (the simulator writes max_tokens)
		c.msgs = append(c.msgs, map[string]string{"role": "assistant", "content": strings.Repeat("wrd ", max(c.lastOutput, 1))})
	}
	c.msgs = append(c.msgs, map[string]string{"role": "user", "content": next(c)})
	c.turns++
	c.lastOutput = output
	return chatBody(c.msgs, output, stream), tokensOf(c.msgs), fmt.Sprintf("conversation-%d", c.id)
}

// systemPrompt is tenant's fixed system prompt of about n tokens.
func systemPrompt(tenant, n int) string {
	r := rand.New(rand.NewPCG(uint64(tenant)+1, 0x51ed))
	return fmt.Sprintf("Tenant %d instructions. ", tenant) + randomText(-tenant-1, 4*n, r)
}

func chatBody(msgs []map[string]string, output int, stream bool) []byte {
	req := map[string]any{"messages": msgs, "max_tokens": output, "stream": stream}
	if stream {
		req["stream_options"] = map[string]bool{"include_usage": true}
	}
	b, _ := json.Marshal(req)
	return b
}

func tokensOf(msgs []map[string]string) int {
	n := 0
	for _, m := range msgs {
		n += len(m["content"])/4 + 4
	}
	return n
}

// MeanShapedPrompt estimates a shape's mean prompt tokens, for capacity
// estimates: the history or prefix dominates. Each turn of a conversation
// adds a message and the previous answer (the mean output).
func MeanShapedPrompt(shape string, minPrompt, maxPrompt int, meanOutput float64) float64 {
	q := logUniformMean(minPrompt, maxPrompt)
	switch shape {
	case ShapeChat:
		return 0.5 * float64(chatTurns) * (q + meanOutput)
	case ShapeAgentic:
		return agentPrefixTokens + 0.5*float64(agentTurns)*(q+meanOutput)
	case ShapePrefix:
		return prefixSystemTokens + q
	}
	return q
}
