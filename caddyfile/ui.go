package aicaddyfile

import (
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("aibalance_ui", parseUI)
	httpcaddyfile.RegisterDirectiveOrder("aibalance_ui", httpcaddyfile.Before, "respond")
}

// parseUI sets up the dashboard handler. Syntax (no arguments):
//
//	aibalance_ui
func parseUI(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h.Next() // consume directive name
	if h.NextArg() {
		return nil, h.Errf("aibalance_ui takes no arguments (put it in a route or handle block to choose its path)")
	}
	if h.NextBlock(0) {
		return nil, h.Errf("aibalance_ui takes no block")
	}
	return aibalance.UIHandler{}, nil
}
