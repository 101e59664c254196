package selection

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
)

func TestBodyGuard(t *testing.T) {
	const body = "0123456789"
	for _, tc := range []struct {
		name    string
		buffers int64
		length  int64 // the request's ContentLength as Caddy leaves it
		read    int   // bytes the first attempt reads
		retry   bool  // whether the retry may be sent
		wrapped bool  // whether the guard wraps the body
	}{
		{"whole in buffer", 16, 10, 10, true, false},
		{"unlimited buffer", -1, 10, 10, true, false},
		{"larger than buffer, read", 4, 10, 3, false, true},
		{"filled the buffer exactly", 10, 10, 3, false, true},
		{"chunked beyond buffer, read", 4, -1, 1, false, true},
		{"no buffering, read", 0, 10, 10, false, true},
		{"no buffering, dial error", 0, 10, 0, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := bodyGuard{requestBuffers: tc.buffers}
			r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
			r = r.WithContext(withVars(r))
			r.ContentLength = tc.length
			if !g.allow(r) {
				t.Fatal("first attempt refused")
			}
			first := r.Body
			if _, ok := first.(*attemptBody); ok != tc.wrapped {
				t.Fatalf("wrapped %v, want %v", ok, tc.wrapped)
			}
			if _, err := io.ReadFull(first, make([]byte, tc.read)); err != nil {
				t.Fatal(err)
			}
			_ = first.Close()
			if got := g.allow(r); got != tc.retry {
				t.Fatalf("retry allowed %v, want %v", got, tc.retry)
			}
			if !tc.retry || !tc.wrapped {
				return
			}
			// the retry sends the body whole; the first attempt's handle is dead
			if n, err := first.Read(make([]byte, 1)); n != 0 || err != errBodyHandedOver {
				t.Fatalf("stale handle read %d, %v", n, err)
			}
			got, err := io.ReadAll(r.Body)
			if err != nil || string(got) != body {
				t.Fatalf("retry read %q, %v; want %q", got, err, body)
			}
		})
	}
}

// TestPoliciesRefusePartialRetry: every policy returns nil for a retry
// whose body an earlier attempt read in part, and chooses normally when
// nothing was read.
func TestPoliciesRefusePartialRetry(t *testing.T) {
	pool := testPool(t, 3)
	for _, sel := range []reverseproxy.Selector{newPredictive(2, false), newLeastTokens(), &WeightedLeastConnSelection{Weights: []int{1, 1, 1}}} {
		r := chatRequest()
		r = r.WithContext(withVars(r))
		r.ContentLength = -1 // chunked: never buffered whole
		if sel.Select(pool, r, nil) == nil {
			t.Fatalf("%T: first attempt got nothing", sel)
		}
		if sel.Select(pool, r, nil) == nil {
			t.Fatalf("%T: a retry after an attempt that read nothing got nothing", sel)
		}
		_, _ = r.Body.Read(make([]byte, 1))
		if u := sel.Select(pool, r, nil); u != nil {
			t.Fatalf("%T: a retry after a partly sent body went to %s", sel, u.Dial)
		}
	}
}
