package integration

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// countingBackend reads every request body whole and answers status with
// the number of bytes it read.
type countingBackend struct {
	status int
	mu     sync.Mutex
	bodies []int64 // bytes read, per request
}

func (b *countingBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n, _ := io.Copy(io.Discard, r.Body)
	b.mu.Lock()
	b.bodies = append(b.bodies, n)
	b.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(b.status)
	fmt.Fprintf(w, `{"read":%d}`, n)
}

func (b *countingBackend) seen() []int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]int64(nil), b.bodies...)
}

func startCounting(t *testing.T, status int) (*countingBackend, string) {
	t.Helper()
	b := &countingBackend{status: status}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: b}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return b, ln.Addr().String()
}

// chunked hides a reader's length, so the client sends it chunked.
type chunked struct{ io.Reader }

// TestRetryNeverTruncatesBody: ai_proxy with its defaults (retry on 429,
// request_buffers 16MiB); the first backend (weight 1000, so tried first)
// reads the body and answers 429. A body Caddy buffered whole is retried
// whole on the second backend; a larger one is not retried at all, and
// the client gets the first backend's 429, never a truncated body sent on.
func TestRetryNeverTruncatesBody(t *testing.T) {
	tester := caddytest.NewTester(t)
	const mb = 1 << 20
	for _, tc := range []struct {
		name    string
		size    int64
		chunked bool
		status  int   // what the client gets
		second  int64 // bytes the second backend gets (-1: no request)
	}{
		{"20MB chunked", 20 * mb, true, http.StatusTooManyRequests, -1},
		{"20MB Content-Length", 20 * mb, false, http.StatusTooManyRequests, -1},
		{"1MB retried whole", 1 * mb, false, http.StatusOK, 1 * mb},
		{"1MB chunked retried whole", 1 * mb, true, http.StatusOK, 1 * mb},
	} {
		t.Run(tc.name, func(t *testing.T) {
			busy, busyAddr := startCounting(t, http.StatusTooManyRequests)
			ok, okAddr := startCounting(t, http.StatusOK)
			base := aiProxy(t, tester, busyAddr+" "+okAddr, "\t\tweights 1000 1\n\t\tchoose all\n\t\tengine none")
			var body io.Reader = bytes.NewReader(bytes.Repeat([]byte("x"), int(tc.size)))
			if tc.chunked {
				body = chunked{body}
			}
			req, err := http.NewRequest(http.MethodPost, base+"/v1/chat/completions", body)
			if err != nil {
				t.Fatal(err)
			}
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			answer, _ := io.ReadAll(res.Body)
			res.Body.Close()
			t.Logf("client got %d %q; first backend read %v, second %v", res.StatusCode, answer, busy.seen(), ok.seen())
			if got := busy.seen(); len(got) != 1 || got[0] != tc.size {
				t.Fatalf("first backend read %v, want one body of %d bytes", got, tc.size)
			}
			second := ok.seen()
			switch {
			case tc.second < 0 && len(second) != 0:
				t.Fatalf("second backend got bodies of %v bytes from a %d-byte request: a partial replay", second, tc.size)
			case tc.second >= 0 && (len(second) != 1 || second[0] != tc.second):
				t.Fatalf("second backend read %v, want one body of %d bytes", second, tc.second)
			}
			if res.StatusCode != tc.status {
				t.Fatalf("client got %d %q, want %d", res.StatusCode, answer, tc.status)
			}
			if tc.status == http.StatusOK && string(answer) != fmt.Sprintf(`{"read":%d}`, tc.size) {
				t.Fatalf("client got %q", answer)
			}
		})
	}
}

// TestDialErrorRetriesUnbufferedBody: with request_buffers 0 nothing is
// replayable, yet a retry after a dial error (which read nothing of the
// body) still goes, and sends the body whole.
func TestDialErrorRetriesUnbufferedBody(t *testing.T) {
	tester := caddytest.NewTester(t)
	ok, okAddr := startCounting(t, http.StatusOK)
	dead := fmt.Sprintf("127.0.0.1:%d", port(t))
	base := aiProxy(t, tester, dead+" "+okAddr, "\t\tweights 1000 1\n\t\tchoose all\n\t\tengine none\n\t\trequest_buffers 0")
	const size = 3 << 20
	res, err := http.Post(base+"/v1/chat/completions", "application/json", chunked{bytes.NewReader(make([]byte, size))})
	if err != nil {
		t.Fatal(err)
	}
	answer, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if got := ok.seen(); res.StatusCode != http.StatusOK || len(got) != 1 || got[0] != size {
		t.Fatalf("client got %d %q; the live backend read %v, want one body of %d bytes", res.StatusCode, answer, got, size)
	}
}
