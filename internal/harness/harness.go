// Package harness runs a real Caddy in process in front of upstreams, for
// the benchmark program, the demo and the integration tests.
package harness

import (
	"encoding/json"
	"fmt"
	"net"

	"github.com/caddyserver/caddy/v2"
)

// FreePort returns a loopback port that was free a moment ago.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Proxy describes one reverse_proxy in front of upstreams.
type Proxy struct {
	Port      int
	Upstreams []string
	// Policy is the selection_policy object, e.g. {"policy":"ai_predictive"}.
	Policy map[string]any
	// Transport is the transport object; nil is Caddy's http transport.
	Transport map[string]any
	// Admin is the admin listen address; "" disables the admin endpoint.
	Admin string
	// Extra handler fields (flush_interval, load_balancing retries...).
	Extra map[string]any
}

// JSON returns the Caddy config.
func (p Proxy) JSON() []byte {
	ups := make([]map[string]string, len(p.Upstreams))
	for i, u := range p.Upstreams {
		ups[i] = map[string]string{"dial": u}
	}
	h := map[string]any{
		"handler":        "reverse_proxy",
		"upstreams":      ups,
		"flush_interval": -1,
		// tell the client which backend answered
		"headers": map[string]any{"response": map[string]any{"set": map[string][]string{
			"X-Upstream": {"{http.reverse_proxy.upstream.hostport}"},
		}}},
	}
	if p.Policy != nil {
		h["load_balancing"] = map[string]any{"selection_policy": p.Policy}
	}
	if p.Transport != nil {
		h["transport"] = p.Transport
	}
	for k, v := range p.Extra {
		h[k] = v
	}
	admin := map[string]any{"disabled": true}
	if p.Admin != "" {
		admin = map[string]any{"listen": p.Admin}
	}
	cfg := map[string]any{
		"admin":   admin,
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"bench": map[string]any{
			"listen": []string{fmt.Sprintf("127.0.0.1:%d", p.Port)},
			"routes": []any{map[string]any{"handle": []any{h}}},
		}}}},
	}
	b, _ := json.Marshal(cfg)
	return b
}

// Start loads the config into this process's Caddy (replacing any running
// config) and returns the proxy's base URL.
func (p Proxy) Start() (string, error) {
	if err := caddy.Load(p.JSON(), true); err != nil {
		return "", fmt.Errorf("loading caddy config: %w", err)
	}
	return fmt.Sprintf("http://127.0.0.1:%d", p.Port), nil
}

// Stop stops this process's Caddy.
func Stop() error { return caddy.Stop() }
