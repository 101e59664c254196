// Package aibalance is the aibalance Caddy app: the process-wide state of
// every upstream (in flight requests and tokens, counters, the learned latency
// model), kept across config reloads, and the reading of LLM request features
// that the selection policies and the transport share.
package aibalance

import (
	"fmt"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(App))
}

// MaxPeekBytes caps peek_bytes: the memory one request may hold for
// reading its features, whatever the configuration says.
const MaxPeekBytes = 16 << 20

// App is the aibalance app: process-wide settings of the AI load balancer and
// the owner of the shared per-upstream store. Modules reach it with
// ctx.App("aibalance"); it is created with defaults when no config names it.
type App struct {
	// PeekBytes is the most bytes of a request body read to learn the
	// request's model, size and options. Fields are found wherever they sit
	// within it: SDKs often put model, max_tokens, stream and user after the
	// messages. The peek holds only bytes that actually arrived (a client
	// claiming a large Content-Length allocates nothing until it sends), and
	// request buffering, when configured, holds them anyway. The rest of a
	// longer body is estimated from Content-Length as prompt text.
	// Default: 1048576 (1 MiB); at most MaxPeekBytes (16 MiB).
	PeekBytes int64 `json:"peek_bytes,omitempty"`

	// DefaultOutputTokens is the output a request is expected to produce
	// when it sets neither max_tokens nor max_completion_tokens. Default: 256.
	DefaultOutputTokens int `json:"default_output_tokens,omitempty"`

	// CharsPerToken converts prompt characters to estimated tokens.
	// Default: 4.
	CharsPerToken int `json:"chars_per_token,omitempty"`

	// PrefixBlockChars is the size, in bytes of prompt text, of the blocks
	// whose chain hashes identify a prompt's prefix. Default: 64.
	PrefixBlockChars int `json:"prefix_block_chars,omitempty"`

	// ModelMemory is how many recent observations per backend the latency
	// model mostly remembers: its forgetting factor is 1 - 1/memory. Smaller
	// adapts faster to a backend whose speed changes; larger is steadier.
	// Default: 256.
	ModelMemory int `json:"model_memory,omitempty"`

	// PrefixIndexBlocks bounds each backend's prefix index (see
	// Backend.CachedTokens): blocks per generation, two generations kept,
	// about 40 bytes a block. An engine that reports its KV cache geometry
	// gets an index of about its capacity, within this bound.
	// Default: 16384 (262144 tokens at 16 tokens a block, 1.3 MiB).
	PrefixIndexBlocks int `json:"prefix_index_blocks,omitempty"`

	// Zone is this Caddy instance's zone or region: backends labelled with
	// another zone (transport topology) are preferred less (see
	// Topology.ZoneMargin). Empty: zones are only labels.
	Zone string `json:"zone,omitempty"`

	// Scaling configures the scaling signal: each pool's recommended
	// number of primaries, its evaluation and the webhook told of changes
	// (see ScalingConfig). Evaluated with the defaults when absent.
	Scaling *ScalingConfig `json:"scaling,omitempty"`

	scaler *scaler

	features FeatureConfig
	lambda   float64
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "aibalance",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision sets defaults.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	a.setDefaults()
	return registerMetrics(ctx.GetMetricsRegistry())
}

// NewApp returns an app with default settings, provisioned, for programs and
// tests that use the store and the model outside a Caddy config.
func NewApp() *App {
	a := &App{logger: zap.NewNop()}
	a.setDefaults()
	return a
}

func (a *App) setDefaults() {
	d := DefaultFeatureConfig
	if a.PeekBytes == 0 {
		a.PeekBytes = d.PeekBytes
	}
	if a.DefaultOutputTokens == 0 {
		a.DefaultOutputTokens = d.DefaultOutputTokens
	}
	if a.CharsPerToken == 0 {
		a.CharsPerToken = d.CharsPerToken
	}
	if a.PrefixBlockChars == 0 {
		a.PrefixBlockChars = d.PrefixBlockChars
	}
	if a.ModelMemory == 0 {
		a.ModelMemory = 256
	}
	if a.PrefixIndexBlocks == 0 {
		a.PrefixIndexBlocks = DefaultPrefixBlocks
	}
	a.features = FeatureConfig{
		PeekBytes:           a.PeekBytes,
		DefaultOutputTokens: a.DefaultOutputTokens,
		CharsPerToken:       a.CharsPerToken,
		PrefixBlockChars:    a.PrefixBlockChars,
	}
	a.lambda = 1 - 1/float64(a.ModelMemory)
}

// Validate checks the settings.
func (a *App) Validate() error {
	switch {
	case a.PeekBytes < 0 || a.PeekBytes > MaxPeekBytes:
		return fmt.Errorf("peek_bytes must be between 0 and %d, got %d", MaxPeekBytes, a.PeekBytes)
	case a.DefaultOutputTokens < 0:
		return fmt.Errorf("default_output_tokens must not be negative, got %d", a.DefaultOutputTokens)
	case a.CharsPerToken < 1:
		return fmt.Errorf("chars_per_token must be at least 1, got %d", a.CharsPerToken)
	case a.PrefixBlockChars < 1:
		return fmt.Errorf("prefix_block_chars must be at least 1, got %d", a.PrefixBlockChars)
	case a.ModelMemory < 2:
		return fmt.Errorf("model_memory must be at least 2, got %d", a.ModelMemory)
	case a.PrefixIndexBlocks < 0 || a.PrefixIndexBlocks > 1<<24:
		return fmt.Errorf("prefix_index_blocks must be between 1 and %d, got %d", 1<<24, a.PrefixIndexBlocks)
	}
	return a.Scaling.Validate()
}

// Start starts the app: the store needs no goroutine of its own; the
// scaling signal has one, evaluating the pools.
func (a *App) Start() error {
	a.logger.Debug("aibalance started", zap.Int("backends", len(AllBackends())))
	var cfg ScalingConfig
	if a.Scaling != nil {
		cfg = *a.Scaling
	}
	a.scaler = &scaler{cfg: cfg.withDefaults(), client: &http.Client{Timeout: 10 * time.Second}, logger: a.logger.Named("scaling"),
		stop: make(chan struct{}), done: make(chan struct{})}
	go a.scaler.run()
	return nil
}

// Stop stops the app.
func (a *App) Stop() error {
	if a.scaler != nil {
		close(a.scaler.stop)
		<-a.scaler.done
		a.scaler = nil
	}
	return nil
}

// Cleanup runs when the app's config is unloaded. Backend entries are
// released by the modules that took them, not here.
func (a *App) Cleanup() error { return nil }

// BlockTokens is the estimated tokens in one prefix block.
func (a *App) BlockTokens() float64 {
	return float64(a.PrefixBlockChars) / float64(max(a.CharsPerToken, 1))
}

// PrefixLimit is the bound of each backend's prefix index, in blocks per
// generation.
func (a *App) PrefixLimit() int { return a.PrefixIndexBlocks }

// Features returns r's request features, read once per request.
func (a *App) Features(r *http.Request) *Features { return RequestFeatures(r, a.features) }

// FeatureConfig is the app's feature extraction settings.
func (a *App) FeatureConfig() FeatureConfig { return a.features }

// Lambda is the latency model's forgetting factor.
func (a *App) Lambda() float64 { return a.lambda }

// Load returns the aibalance app of ctx's config, creating it with defaults
// if the config does not name it.
func Load(ctx caddy.Context) (*App, error) {
	v, err := ctx.App("aibalance")
	if err != nil {
		return nil, fmt.Errorf("loading aibalance app: %w", err)
	}
	return v.(*App), nil
}

// HandlerUpstreams returns the dial addresses of the static upstreams of the
// reverse_proxy handler that is provisioning the current module, so a
// policy or transport can take its references at Provision, before the old
// config is cleaned up on a reload. It returns nil outside a reverse_proxy.
func HandlerUpstreams(ctx caddy.Context) []string {
	h := Handler(ctx)
	if h == nil {
		return nil
	}
	addrs := make([]string, 0, len(h.Upstreams))
	for _, u := range h.Upstreams {
		addrs = append(addrs, u.Dial)
	}
	return addrs
}

// Handler returns the reverse_proxy handler that is provisioning the
// current module (the nearest one among ctx's module ancestry), or nil
// outside one.
func Handler(ctx caddy.Context) *reverseproxy.Handler {
	mods := ctx.Modules()
	for i := len(mods) - 1; i >= 0; i-- {
		if h, ok := mods[i].(*reverseproxy.Handler); ok {
			return h
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
