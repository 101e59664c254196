package selection

import (
	"fmt"
	"net/http"
	"regexp"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

func init() {
	caddy.RegisterModule(DynamicUpstreams{})
}

// DynamicUpstreams is the dynamic upstream source `dynamic aibalance
// <pool>`: the members of a named pool that the admin API changes without
// a reload (POST /aibalance/pools/{pool}/members, DELETE
// /aibalance/pools/{pool}/members/{address}). Members is the pool's initial
// membership from the config; members added through the API stay across
// reloads (see aibalance.DynamicPool). A member new to the pool enters by
// slow start; a removed one is drained first.
//
//	dynamic aibalance <pool> [<address>...] {
//	    members <address>...
//	}
type DynamicUpstreams struct {
	Pool    string   `json:"pool"`
	Members []string `json:"members,omitempty"`

	pool    *aibalance.DynamicPool
	handler *aibalance.Pool // the handler's pool, which serves the members
}

// CaddyModule returns the Caddy module information.
func (DynamicUpstreams) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.upstreams.aibalance",
		New: func() caddy.Module { return new(DynamicUpstreams) },
	}
}

var poolName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Validate checks the pool name and the members' addresses.
func (d *DynamicUpstreams) Validate() error {
	if !poolName.MatchString(d.Pool) {
		return fmt.Errorf("dynamic aibalance: pool name %q: want 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit", d.Pool)
	}
	seen := map[string]bool{}
	for _, a := range d.Members {
		if err := aibalance.CheckAddress(a); err != nil {
			return fmt.Errorf("dynamic aibalance %s: %w", d.Pool, err)
		}
		if seen[a] {
			return fmt.Errorf("dynamic aibalance %s: %s listed twice", d.Pool, a)
		}
		seen[a] = true
	}
	return nil
}

// Provision declares the pool and applies the config's members.
func (d *DynamicUpstreams) Provision(ctx caddy.Context) error {
	if err := d.Validate(); err != nil {
		return err
	}
	d.pool = aibalance.AcquireDynamicPool(d.Pool)
	d.pool.SetConfigMembers(d.Members, time.Now())
	d.handler = aibalance.AcquirePool(aibalance.HandlerPoolKey(ctx))
	d.pool.Attach(d.handler)
	return nil
}

// Cleanup lets go of the pool: the last config that declares it releases
// its members.
func (d *DynamicUpstreams) Cleanup() error {
	if d.handler != nil {
		d.pool.Detach(d.handler)
		aibalance.ReleasePool(d.handler.Key())
	}
	if d.pool != nil {
		aibalance.ReleaseDynamicPool(d.Pool)
	}
	return nil
}

// GetUpstreams returns the pool's members that take new requests.
func (d *DynamicUpstreams) GetUpstreams(*http.Request) ([]*reverseproxy.Upstream, error) {
	addrs := d.pool.Upstreams()
	out := make([]*reverseproxy.Upstream, len(addrs))
	for i, a := range addrs {
		out[i] = &reverseproxy.Upstream{Dial: a}
	}
	return out, nil
}

// UnmarshalCaddyfile reads `dynamic aibalance <pool> [<address>...]` with
// an optional block of `members <address>...` lines.
func (d *DynamicUpstreams) UnmarshalCaddyfile(disp *caddyfile.Dispenser) error {
	disp.Next() // "aibalance"
	if !disp.NextArg() {
		return disp.Err("dynamic aibalance: want a pool name: dynamic aibalance <pool> [<address>...]")
	}
	d.Pool = disp.Val()
	d.Members = append(d.Members, disp.RemainingArgs()...)
	for disp.NextBlock(0) {
		switch disp.Val() {
		case "members":
			args := disp.RemainingArgs()
			if len(args) == 0 {
				return disp.ArgErr()
			}
			d.Members = append(d.Members, args...)
		default:
			return disp.Errf("dynamic aibalance: unknown subdirective %q (want members)", disp.Val())
		}
	}
	return d.Validate()
}

// Interface guards
var (
	_ reverseproxy.UpstreamSource = (*DynamicUpstreams)(nil)
	_ caddy.Provisioner           = (*DynamicUpstreams)(nil)
	_ caddy.CleanerUpper          = (*DynamicUpstreams)(nil)
	_ caddy.Validator             = (*DynamicUpstreams)(nil)
	_ caddyfile.Unmarshaler       = (*DynamicUpstreams)(nil)
)
