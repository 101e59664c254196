package aibalance

import (
	_ "embed"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// The dashboard: one self-contained page (no CDN, nothing fetched but its
// own data) that shows the request distribution per backend, states and
// reasons, latency percentiles, tiers, zones, models and each pool's
// recommendation, refreshed every second from data.json beside it. Served
// on the admin endpoint at /aibalance/ui/ and, for browsers and behind
// basic_auth, by the site handler aibalance_ui.

//go:embed ui/index.html
var uiPage []byte

// UIData is what the dashboard reads: the upstreams view at a time.
type UIData struct {
	Time time.Time `json:"time"`
	UpstreamsView
}

// serveUI answers the page, or data.json for a path ending in it.
func serveUI(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return notAllowed(w, r, "GET, HEAD", "GET (the dashboard)")
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if strings.HasSuffix(r.URL.Path, "/data.json") {
		now := time.Now()
		return writeJSON(w, UIData{Time: now, UpstreamsView: View(now)})
	}
	// the page runs only its own inline script and reads only its origin
	w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'")
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, err := w.Write(uiPage)
	return err
}

func init() {
	caddy.RegisterModule(UIHandler{})
}

// UIHandler serves the dashboard on a site (Caddyfile: aibalance_ui), so it
// can sit behind the site's basic_auth and TLS:
//
//	route /lb/* {
//	    basic_auth { admin <hash> }
//	    aibalance_ui
//	}
//
// The page is answered at any path of the route, and the data at paths
// ending in /data.json.
type UIHandler struct{}

// CaddyModule returns the Caddy module information.
func (UIHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.aibalance_ui",
		New: func() caddy.Module { return new(UIHandler) },
	}
}

// ServeHTTP serves the dashboard.
func (UIHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if err := serveUI(w, r); err != nil {
		if ae, ok := err.(caddy.APIError); ok {
			return caddyhttp.Error(ae.HTTPStatus, ae.Err)
		}
		return err
	}
	return nil
}

var _ caddyhttp.MiddlewareHandler = UIHandler{}
