package selection

import (
	"context"
	"net/http"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// withVars gives r the request-variables map Caddy's server gives every request.
func withVars(r *http.Request) context.Context {
	return context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{})
}
