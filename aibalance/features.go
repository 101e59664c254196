package aibalance

import (
	"bytes"
	"io"
	"net/http"

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
	// PeekBytes is the most bytes of a body read to find the features.
	PeekBytes int64
	// DefaultOutputTokens is the expected output when a request names no
	// max_tokens / max_completion_tokens.
	DefaultOutputTokens int
	// CharsPerToken converts prompt characters into estimated tokens.
	CharsPerToken int
	// PrefixBlockChars is the size of a prefix block, in bytes of prompt text.
	PrefixBlockChars int
}

// DefaultFeatureConfig is what the aibalance app uses when nothing is set.
var DefaultFeatureConfig = FeatureConfig{
	PeekBytes:           64 << 10,
	DefaultOutputTokens: 256,
	CharsPerToken:       4,
	PrefixBlockChars:    64,
}

// Features is what the balancer knows of one request before sending it.
// A request it cannot read (no JSON body, chunked, GET) gets a neutral cost:
// zero prompt tokens and the default output.
type Features struct {
	// Model is the requested model, if the body named it within the peeked prefix.
	Model string
	// User is the OpenAI "user" field, a natural session key.
	User string
	// PromptTokens is the estimated size of the prompt, including the part of
	// the body that was not peeked (estimated from Content-Length).
	PromptTokens int
	// OutputTokens is max_tokens / max_completion_tokens or the default.
	OutputTokens int
	// Stream is true when the client asked for server-sent events.
	Stream bool
	// Parsed is true when the body was read as an OpenAI-style JSON request.
	Parsed bool
	// Truncated is true when the body was longer than the peek.
	Truncated bool
	// PrefixHashes[i] is the chain hash of the first (i+1) prompt blocks
	// (at most MaxPrefixBlocks): equal hashes mean equal prefixes.
	// Deterministic across processes.
	PrefixHashes []uint64
}

// Tokens is the request's total estimated token cost (prompt plus output).
func (f *Features) Tokens() int { return f.PromptTokens + f.OutputTokens }

// RequestFeatures returns the features of r, extracting them on first use and
// caching them in r's vars for every later step and retry. When r has no vars
// (not served by Caddy) it extracts them every call.
func RequestFeatures(r *http.Request, cfg FeatureConfig) *Features {
	if v, ok := caddyhttp.GetVar(r.Context(), featuresVarKey).(*Features); ok {
		return v
	}
	f := new(Features)
	ExtractFeatures(r, cfg, f)
	if r.Context().Value(caddyhttp.VarsCtxKey) != nil {
		caddyhttp.SetVar(r.Context(), featuresVarKey, f)
	}
	return f
}

// ExtractFeatures reads at most cfg.PeekBytes of r's body into f and gives the
// body back to r byte for byte. Bodies of unknown length (chunked), empty
// bodies, and bodies that are not a JSON object pass through untouched with a
// neutral cost.
func ExtractFeatures(r *http.Request, cfg FeatureConfig, f *Features) {
	f.OutputTokens = cfg.DefaultOutputTokens
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength <= 0 || cfg.PeekBytes <= 0 {
		return
	}
	n := min(r.ContentLength, cfg.PeekBytes)
	buf := make([]byte, n)
	read, err := io.ReadFull(r.Body, buf)
	buf = buf[:read]
	r.Body = &peekedBody{head: bytes.NewReader(buf), rest: r.Body, restErr: err}
	if err != nil && err != io.ErrUnexpectedEOF {
		return
	}
	var rest int64
	if int64(read) < r.ContentLength {
		rest = r.ContentLength - int64(read)
		f.Truncated = true
	}
	parseRequestJSON(buf, rest, cfg, f)
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
