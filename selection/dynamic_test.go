package selection

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// TestDynamicUpstreamsCaddyfile: the pool name and the members, inline or
// in a block; clear errors for what is wrong.
func TestDynamicUpstreamsCaddyfile(t *testing.T) {
	parse := func(in string) (*DynamicUpstreams, error) {
		d := new(DynamicUpstreams)
		return d, d.UnmarshalCaddyfile(caddyfile.NewTestDispenser(in))
	}
	d, err := parse("aibalance gpus 10.0.0.1:8000 {\n members 10.0.0.2:8000 gpu-3.internal:8000\n}")
	if err != nil || d.Pool != "gpus" || strings.Join(d.Members, " ") != "10.0.0.1:8000 10.0.0.2:8000 gpu-3.internal:8000" {
		t.Fatalf("%+v %v", d, err)
	}
	if d, err := parse("aibalance empty"); err != nil || len(d.Members) != 0 {
		t.Fatalf("a pool with no members yet: %+v %v", d, err)
	}
	for in, want := range map[string]string{
		"aibalance":                           "want a pool name",
		"aibalance bad/name":                  "pool name",
		"aibalance gpus 10.0.0.1":             "want host:port",
		"aibalance gpus 10.0.0.1:0":           "port must be",
		"aibalance gpus h:1 h:1":              "listed twice",
		"aibalance gpus {\n members\n}":       "wrong argument count",
		"aibalance gpus {\n weight 3\n}":      "unknown subdirective",
		"aibalance gpus http://10.0.0.1:8000": "want host:port",
		"aibalance gpus host/v1:8000":         "character",
	} {
		if _, err := parse(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", in, err, want)
		}
	}
}

// FuzzCheckAddress: an address the admin API accepts is host:port with a
// port in range, and checking never panics.
func FuzzCheckAddress(f *testing.F) {
	for _, s := range []string{"127.0.0.1:8000", "[::1]:80", "h:1", ":80", "h:", "h:65536", "a b:1", "h:1:2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, addr string) {
		if aibalance.CheckAddress(addr) != nil {
			return
		}
		if !strings.Contains(addr, ":") || strings.ContainsAny(addr, " /?#@") {
			t.Fatalf("%q accepted", addr)
		}
	})
}
