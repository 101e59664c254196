package aibalance

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// MaxPrefixBlocks bounds how many prefix-block hashes a request carries:
// enough for affinity on the first 128 blocks of a prompt (8 KiB of text at
// the default block size), which is where shared system prompts and chat
// histories overlap.
const MaxPrefixBlocks = 128

// featuresVarKey is the request variable holding a request's *Features, so
// every retry and every module reads them once.
const featuresVarKey = "aibalance.features"

// FeatureConfig says how request features are extracted.
type FeatureConfig struct {
	// PeekBytes is the most bytes of a body read to find the features. The
	// buffer grows with the bytes that arrive, never by Content-Length.
	PeekBytes int64
	// DefaultOutputTokens is the expected output when a request names no
	// max_tokens / max_completion_tokens / max_output_tokens.
	DefaultOutputTokens int
	// CharsPerToken converts prompt characters into estimated tokens.
	CharsPerToken int
	// PrefixBlockChars is the size of a prefix block, in bytes of prompt text.
	PrefixBlockChars int
}

// DefaultFeatureConfig is what the aibalance app uses when nothing is set.
var DefaultFeatureConfig = FeatureConfig{
	PeekBytes:           1 << 20,
	DefaultOutputTokens: 256,
	CharsPerToken:       4,
	PrefixBlockChars:    64,
}

// API names the kind of LLM API a request calls, from its path.
type API string

// The APIs the balancer recognises. APINone is any other request: a probe,
// a model listing, metrics, a path it does not know.
const (
	APINone        API = ""
	APIChat        API = "chat"        // /v1/chat/completions
	APICompletions API = "completions" // /v1/completions
	APIResponses   API = "responses"   // /v1/responses
	APIMessages    API = "messages"    // /v1/messages (Anthropic)
	APIEmbeddings  API = "embeddings"  // /v1/embeddings
	APIRerank      API = "rerank"      // /v1/rerank, /rerank, /v1/score
)

// apiOf returns the API a request calls: a POST whose path ends in one of
// the known endpoints (so /v1/..., /openai/v1/... and stripped prefixes all
// work). Anything else, GETs included, is APINone.
func apiOf(r *http.Request) API {
	if r.Method != http.MethodPost || r.URL == nil {
		return APINone
	}
	p := strings.TrimSuffix(r.URL.Path, "/")
	switch {
	case strings.HasSuffix(p, "/chat/completions"):
		return APIChat
	case strings.HasSuffix(p, "/completions"):
		return APICompletions
	case strings.HasSuffix(p, "/responses"):
		return APIResponses
	case strings.HasSuffix(p, "/messages"):
		return APIMessages
	case strings.HasSuffix(p, "/embeddings"):
		return APIEmbeddings
	case strings.HasSuffix(p, "/rerank"), strings.HasSuffix(p, "/score"):
		return APIRerank
	}
	return APINone
}

// Features is what the balancer knows of one request before sending it.
// A request it cannot read (no JSON body, chunked, GET) gets a neutral cost:
// zero prompt tokens and the default output.
type Features struct {
	// API is the LLM API the request calls, from its method and path.
	API API
	// Model is the requested model, if the body named it within the peeked prefix.
	Model string
	// User is the OpenAI "user" field, or Anthropic's metadata.user_id: a
	// natural session key. At most 256 bytes.
	User string
	// PreviousResponseID is the Responses API's previous_response_id: the
	// conversation's history is stored on the server that produced it.
	// At most 256 bytes.
	PreviousResponseID string
	// Conversation is the Responses API's conversation id (given as a
	// string or as an object's id): history stored on a server, as above.
	// At most 256 bytes.
	Conversation string
	// PromptCacheKey is the request's prompt_cache_key, an explicit key for
	// routing requests that share a prompt prefix to the same cache.
	// At most 256 bytes.
	PromptCacheKey string
	// PromptTokens is the estimated size of the prompt: its text (messages,
	// system, instructions, input, tool definitions and tool calls) in
	// characters over CharsPerToken, its token IDs, a few tokens per
	// message, and the part of the body that was not peeked (estimated from
	// Content-Length as prompt text).
	PromptTokens int
	// OutputTokens is the expected output: max_completion_tokens,
	// max_output_tokens or max_tokens (or thinking.budget_tokens when that
	// is larger), else the default plus any thinking budget (at least 25000
	// for a reasoning request), times n / best_of (at most 128). Zero for
	// embeddings and rerank.
	OutputTokens int
	// OutputLimit is the output limit the request set itself
	// (max_completion_tokens, max_output_tokens or max_tokens, times its
	// choices); 0 when it set none.
	OutputLimit int
	// Stream is true when the client asked for server-sent events.
	Stream bool
	// Parsed is true when the body was read as a JSON object.
	Parsed bool
	// Truncated is true when the body was longer than the peek.
	Truncated bool
	// Tried is the upstreams this request was already sent to (see Tried).
	Tried Tried
	// Selects counts the policy's calls for this request (one per attempt
	// of Caddy's proxy loop, including those that found no upstream);
	// Start is the first one's time. Together with the handler's retry
	// settings they tell the last attempt (see selection's retryBudget).
	Selects int
	Start   time.Time
	// SessionKey is the hash of the request's session (see the policy's
	// affinity: a user, a header, a cookie, a prompt_cache_key); 0: none.
	// Set by the policy, recorded by the transport.
	SessionKey uint64
	// OwnerLost is set when the backend that stores the request's
	// previous response (or conversation) could not take it: it went
	// elsewhere, and the answer says so (X-Aibalance-Affinity).
	OwnerLost bool
	// OwnerUnknown is set when the request continues a stored response
	// (or conversation) this instance has not seen: another instance, or
	// a time before a restart, routed it. It went where the policy chose,
	// and the answer says so.
	OwnerUnknown bool
	// Probe is the address whose half-open probe this request holds.
	Probe string
	// Reject, when set by the policy, is the answer the transport gives
	// instead of proxying: no backend may serve the request.
	Reject *Reject
	// Admitted is set once the request passed the rate limits and the
	// admission queue (its first selection); Ticket is its admission
	// (nil when it did not wait), Charge its rate-limit charge, settled
	// when it ends, and RateHeaders the x-ratelimit-* headers its answer
	// carries.
	Admitted bool
	// Reserved is the backend the policy chose and reserved (see
	// Backend.Reserve), until the transport begins the attempt.
	Reserved    *Backend
	Ticket      *Ticket
	Charge      *RateCharge
	RateHeaders http.Header
	// PrefixHashes[i] is the chain hash of the first (i+1) prompt blocks
	// (at most MaxPrefixBlocks): equal hashes mean equal prefixes.
	// Deterministic across processes.
	PrefixHashes []uint64
}

// Tokens is the request's total estimated token cost (prompt plus output).
func (f *Features) Tokens() int { return f.PromptTokens + f.OutputTokens }

// Work reports whether the request is LLM work whose latency says how fast
// a backend is: a POST to a known LLM endpoint whose body was read as a JSON
// object. Probes, model listings, metrics scrapes, unknown paths and bodies
// the balancer could not read are not: they count in flight, but never
// teach the latency model or the pool's prior.
func (f *Features) Work() bool { return f.API != APINone && f.Parsed }

// RequestFeatures returns the features of r, extracting them on first use and
// caching them in r's vars for every later step and retry. When r has no vars
// (not served by Caddy) it extracts them every call.
//
// Call it only where the proxy loop's own request is seen (a selection
// policy's Select): it peeks at the body and puts back a body that replays
// the peeked bytes, which a per-attempt copy of the request would lose.
func RequestFeatures(r *http.Request, cfg FeatureConfig) *Features {
	if f := CachedFeatures(r); f != nil {
		return f
	}
	f := new(Features)
	ExtractFeatures(r, cfg, f)
	if r.Context().Value(caddyhttp.VarsCtxKey) != nil {
		caddyhttp.SetVar(r.Context(), featuresVarKey, f)
	}
	return f
}

// CachedFeatures returns the features a policy already read for r, or nil.
func CachedFeatures(r *http.Request) *Features {
	f, _ := caddyhttp.GetVar(r.Context(), featuresVarKey).(*Features)
	return f
}

// HeaderFeatures returns r's features without touching its body: the API
// from the path and a neutral cost. A transport uses it when no policy read
// the features: it sees a per-attempt copy of the request, whose body it
// must not consume.
func HeaderFeatures(r *http.Request, cfg FeatureConfig) *Features {
	if f := CachedFeatures(r); f != nil {
		return f
	}
	f := &Features{API: apiOf(r), OutputTokens: cfg.DefaultOutputTokens}
	if r.Context().Value(caddyhttp.VarsCtxKey) != nil {
		// kept for the request's later attempts: they count as one request
		caddyhttp.SetVar(r.Context(), featuresVarKey, f)
	}
	return f
}

// ExtractFeatures reads at most cfg.PeekBytes of r's body into f and gives the
// body back to r byte for byte. Bodies of unknown length (chunked), empty
// bodies, and bodies that are not a JSON object pass through untouched with a
// neutral cost. The peek buffer grows with the bytes that actually arrive,
// never by the client's claimed Content-Length.
func ExtractFeatures(r *http.Request, cfg FeatureConfig, f *Features) {
	f.API = apiOf(r)
	f.OutputTokens = cfg.DefaultOutputTokens
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength <= 0 || cfg.PeekBytes <= 0 {
		return
	}
	buf, err := peek(r.Body, min(r.ContentLength, cfg.PeekBytes))
	read := int64(len(buf))
	r.Body = &peekedBody{head: bytes.NewReader(buf), rest: r.Body, restErr: err}
	if err != nil && err != io.ErrUnexpectedEOF {
		return
	}
	var rest int64
	if read < r.ContentLength {
		rest = r.ContentLength - read
		f.Truncated = true
	}
	parseRequestJSON(buf, rest, cfg, f)
	if f.API == APIEmbeddings || f.API == APIRerank {
		f.OutputTokens, f.OutputLimit = 0, 0 // prompt cost only
	}
}

// peek reads the first n bytes of body. The buffer starts small and
// doubles as bytes arrive, but never past n: a client's claimed length
// allocates nothing it does not send, and a full peek has allocated at most
// 2n bytes and holds n (bytes.Buffer.ReadFrom would hold 2n and allocate
// 4n, as it wants free space for one more read after the last byte).
// A body that ends early returns io.ErrUnexpectedEOF with what it had.
func peek(body io.Reader, n int64) ([]byte, error) {
	buf := make([]byte, 0, min(n, 4<<10))
	for int64(len(buf)) < n {
		if len(buf) == cap(buf) {
			grown := make([]byte, len(buf), min(2*int64(cap(buf)), n))
			copy(grown, buf)
			buf = grown
		}
		m, err := body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+m]
		switch {
		case err == io.EOF && int64(len(buf)) < n:
			return buf, io.ErrUnexpectedEOF
		case err == io.EOF:
			return buf, nil
		case err != nil:
			return buf, err
		}
	}
	return buf, nil
}

// peekedBody replays the peeked head, then the rest of the original body.
// Until someone reads from it, Close leaves the original body open, as Caddy's
// own wrapper does: a failed dial closes the request body, and a retry must
// still be able to send it.
type peekedBody struct {
	head    *bytes.Reader
	rest    io.ReadCloser
	restErr error // a read error met while peeking, returned after the head
	read    bool
}

func (p *peekedBody) Read(b []byte) (int, error) {
	p.read = true
	if p.head.Len() > 0 {
		return p.head.Read(b)
	}
	if p.restErr != nil && p.restErr != io.ErrUnexpectedEOF && p.restErr != io.EOF {
		return 0, p.restErr
	}
	return p.rest.Read(b)
}

func (p *peekedBody) Close() error {
	if !p.read {
		return nil
	}
	return p.rest.Close()
}
