package selection

import (
	"errors"
	"io"
	"net/http"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// bodyGuard keeps a retry from sending a request body that is not whole.
//
// Caddy replays a body on a retry only if request_buffers held all of it:
// it then gives each attempt a fresh reader of its buffer. A body larger
// than the buffer (or any body, without buffering) is one stream shared by
// the attempts (RP/reverseproxy.go, ServeHTTP: bufferedReqBody against
// bodyNopCloserIfNotRead), so a retry after an attempt that sent part of it
// sends only the rest: a 20 MB body arrived as 0 bytes at the second
// backend, which answered 200 (chunked) or was marked down (Content-Length).
//
// So a policy gives each attempt of such a request its own handle on the
// stream and refuses a retry (Select returns nil) once an earlier attempt
// has read a byte of it. A retry after a dial error, which reads nothing,
// still goes. When Select returns nil, Caddy ends the request with the
// last attempt's error. (The aibalance transport does not ask for such a
// retry in the first place: when the body cannot be sent again it gives
// the client the backend's own answer, or a JSON error; see
// bodyGuard.replayable. Retries asked by lb_retry_match meet the guard.)
type bodyGuard struct {
	// requestBuffers is the handler's request_buffers: bodies shorter are
	// replayed by Caddy and need no guard
	requestBuffers int64
	logger         *zap.Logger
}

// newBodyGuard reads the request_buffers of the reverse_proxy being
// provisioned.
func newBodyGuard(ctx caddy.Context) bodyGuard {
	g := bodyGuard{logger: ctx.Logger()}
	if h := aibalance.Handler(ctx); h != nil {
		g.requestBuffers = h.RequestBuffers
	}
	return g
}

// allow prepares r's body for the attempt about to be chosen and reports
// whether the attempt may be sent. r is the proxy loop's own request: a body
// set here is the one the attempt's transport reads.
func (g *bodyGuard) allow(r *http.Request) bool {
	switch b := r.Body.(type) {
	case nil:
		return true
	case *attemptBody:
		// a retry: Caddy gave the loop no fresh body, so this is the
		// stream the earlier attempts had
		if next, ok := b.handOver(); ok {
			r.Body = next
			return true
		}
		if g.logger != nil && !b.s.warned.Swap(true) {
			g.logger.Warn("not retrying: an earlier attempt sent part of the request body, which is larger than request_buffers; the client gets that attempt's answer. Raise request_buffers to retry bodies this large",
				zap.Int64("content_length", r.ContentLength),
				zap.Int64("request_buffers", g.requestBuffers),
				zap.Int("upstreams_tried", aibalance.RequestTried(r).Len()))
		}
		return false
	}
	if r.Body == http.NoBody || g.wholeBuffered(r) {
		return true
	}
	r.Body = &attemptBody{s: &sharedBody{rc: r.Body}}
	return true
}

// replayable reports whether a retry of the attempt req could send its
// body whole: it has none, Caddy buffered it whole, or no attempt read a
// byte of it yet (a dial error).
func (g *bodyGuard) replayable(req *http.Request) bool {
	switch b := req.Body.(type) {
	case nil:
		return true
	case *attemptBody:
		return b.s.state.Load()&1 == 0
	}
	return req.Body == http.NoBody || g.wholeBuffered(req)
}

// wholeBuffered reports whether Caddy buffered r's body whole, so it
// replays it on every attempt. Caddy sets the Content-Length of a body it
// buffered whole; one that filled the buffer exactly is not whole
// (RP/reverseproxy.go, bufferedBody). Trailers make the length unknown
// again, and incremental requests are not buffered.
func (g *bodyGuard) wholeBuffered(r *http.Request) bool {
	if g.requestBuffers == 0 || len(r.Trailer) > 0 || caddyhttp.IsIncremental(r.Header) {
		return false
	}
	return g.requestBuffers < 0 || (r.ContentLength >= 0 && r.ContentLength < g.requestBuffers)
}

// sharedBody is a request body stream shared by the attempts of one
// request. state is the current attempt's generation times two, plus one
// once that attempt read from the stream; then it is never handed over.
type sharedBody struct {
	rc     io.ReadCloser
	state  atomic.Uint64
	warned atomic.Bool // the refused retry was logged (once per request)
}

// attemptBody is one attempt's handle on a sharedBody. An earlier
// attempt's transport may still hold its handle (Go's transport may read
// and close the body after RoundTrip returned): once the stream is handed
// to a later attempt, the old handle neither reads nor closes it.
type attemptBody struct {
	s   *sharedBody
	gen uint64
}

// errBodyHandedOver is what an earlier attempt reads once a retry owns
// the body.
var errBodyHandedOver = errors.New("request body handed to a retry")

func (b *attemptBody) Read(p []byte) (int, error) {
	for {
		st := b.s.state.Load()
		if st>>1 != b.gen {
			return 0, errBodyHandedOver
		}
		if st&1 == 1 || b.s.state.CompareAndSwap(st, st|1) {
			return b.s.rc.Read(p)
		}
	}
}

// Close closes the stream once it was read, as Caddy's own wrapper does:
// a failed dial closes the request body, and a retry must still be able
// to send it.
func (b *attemptBody) Close() error {
	st := b.s.state.Load()
	if st>>1 != b.gen || st&1 == 0 {
		return nil
	}
	return b.s.rc.Close()
}

// handOver gives the stream to a new attempt, unless an attempt read from it.
func (b *attemptBody) handOver() (*attemptBody, bool) {
	st := b.s.state.Load()
	if st&1 == 1 || !b.s.state.CompareAndSwap(st, st+2) {
		return nil, false
	}
	return &attemptBody{s: b.s, gen: (st + 2) >> 1}, true
}
