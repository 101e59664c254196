package integration

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// hashingBackend answers every request with the SHA-256 and the length of
// the body it read, and the Content-Encoding it was sent with.
func hashingBackend(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		w.Header().Set("Content-Type", "application/json")
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
		}
		fmt.Fprintf(w, `{"sha256":%q,"n":%d,"encoding":%q}`, hex.EncodeToString(h.Sum(nil)), n, r.Header.Get("Content-Encoding"))
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// repeated is a reader of n bytes of c, between head and tail.
func repeated(head string, c byte, n int64, tail string) io.Reader {
	return io.MultiReader(strings.NewReader(head), io.LimitReader(byteReader(c), n), strings.NewReader(tail))
}

type byteReader byte

func (b byteReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(b)
	}
	return len(p), nil
}

// TestBadInputPassesThrough sends what a balancer must not choke on
// through ai_proxy (with peek_bytes raised to 1 MiB, so deep bodies are
// parsed): each one reaches the backend byte for byte, or gets a clear
// error; none panics or is cut.
func TestBadInputPassesThrough(t *testing.T) {
	tester := caddytest.NewTester(t)
	addr := hashingBackend(t)
	listen := port(t)
	global := strings.Replace(globals, "\tgrace_period 1s\n", "\tgrace_period 1s\n\taibalance {\n\t\tpeek_bytes 1MiB\n\t}\n", 1)
	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\tai_proxy %s {\n\t\tengine none\n\t}\n}", global, listen, addr), "caddyfile")
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen)

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write([]byte(`{"model":"m","messages":[{"role":"user","content":"compressed"}],"stream":true}`))
	_ = zw.Close()
	const mb = 1 << 20
	deep := strings.Repeat("[", 100000) + strings.Repeat("]", 100000)
	huge := func() io.Reader {
		return repeated(`{"model":"m","messages":[{"role":"user","content":"`, 'a', 100*mb, `"}]}`)
	}
	for _, tc := range []struct {
		name     string
		body     func() io.Reader
		size     int64 // -1: chunked
		encoding string
	}{
		{"malformed JSON", func() io.Reader { return strings.NewReader(`{"messages": [`) }, 0, ""},
		{"not JSON", func() io.Reader { return strings.NewReader("hello, world") }, 0, ""},
		{"invalid UTF-8", func() io.Reader {
			return strings.NewReader("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\xc3(\"}]}")
		}, 0, ""},
		{"invalid UTF-8 in keys and model", func() io.Reader {
			return strings.NewReader("{\"mo\xffdel\":\"\xc3\x28\",\"model\":\"\xe2\x82\",\"user\":\"\xf0\x28\x8c\xbc\"}")
		}, 0, ""},
		{"100k-deep nesting", func() io.Reader { return strings.NewReader(`{"model":"m","messages":` + deep + `}`) }, 0, ""},
		{"100k-deep nesting in a string field", func() io.Reader { return strings.NewReader(`{"model":` + deep + `,"user":` + deep + `}`) }, 0, ""},
		{"gzip-compressed body", func() io.Reader { return bytes.NewReader(gz.Bytes()) }, 0, "gzip"},
		{"100 MB with Content-Length", huge, 100 * mb, ""},
		{"100 MB chunked", huge, -1, ""},
		{"empty body", func() io.Reader { return strings.NewReader("") }, 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := sha256.New()
			n, _ := io.Copy(want, tc.body())
			var body io.Reader = tc.body()
			if tc.size < 0 {
				body = chunked{body}
			}
			req, err := http.NewRequest(http.MethodPost, url, body)
			if err != nil {
				t.Fatal(err)
			}
			if tc.size > 0 {
				req.ContentLength = n
			}
			req.Header.Set("Content-Type", "application/json")
			if tc.encoding != "" {
				req.Header.Set("Content-Encoding", tc.encoding)
			}
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := io.ReadAll(res.Body)
			res.Body.Close()
			var got struct {
				SHA256, Encoding string
				N                int64
			}
			if res.StatusCode != 200 || json.Unmarshal(raw, &got) != nil {
				t.Fatalf("%d %s", res.StatusCode, raw)
			}
			if got.SHA256 != hex.EncodeToString(want.Sum(nil)) || got.N != n || got.Encoding != tc.encoding {
				t.Fatalf("backend read %d bytes (hash %s, encoding %q), sent %d (hash %x, encoding %q)", got.N, got.SHA256, got.Encoding, n, want.Sum(nil), tc.encoding)
			}
		})
	}
}

// TestBadInputClearErrors: what cannot be passed through gets a clear
// answer: a pool without members, and malformed admin API calls.
func TestBadInputClearErrors(t *testing.T) {
	tester := caddytest.NewTester(t)
	addr := hashingBackend(t)
	listen := port(t)
	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\tai_proxy {\n\t\tdynamic aibalance badinput-empty\n\t\tengine none\n\t}\n}\nhttp://127.0.0.1:%d {\n\tai_proxy %s {\n\t\tengine none\n\t}\n}", globals, listen, port(t), addr), "caddyfile")
	res, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), "application/json", strings.NewReader(`{"model":"m","messages":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(res.Body)
	res.Body.Close()
	t.Logf("empty pool: %d %s", res.StatusCode, raw)
	var e struct {
		Error struct{ Code string }
	}
	if res.StatusCode != http.StatusServiceUnavailable || json.Unmarshal(raw, &e) != nil || e.Error.Code != "no_backend_available" || res.Header.Get("Retry-After") == "" {
		t.Fatalf("empty pool: %d %s (Retry-After %q): want a JSON error with Retry-After", res.StatusCode, raw, res.Header.Get("Retry-After"))
	}
	for _, tc := range []struct {
		method, path, body string
		want               int
	}{
		{http.MethodPatch, "/aibalance/upstreams/" + addr, `{`, 400},
		{http.MethodPatch, "/aibalance/upstreams/" + addr, `{"weight":"x"}`, 400},
		{http.MethodPatch, "/aibalance/upstreams/" + addr, `{"weight":-1}`, 400},
		{http.MethodPatch, "/aibalance/upstreams/" + addr, `{"drain":1}`, 400},
		{http.MethodPatch, "/aibalance/upstreams/" + addr, `[]`, 400},
		{http.MethodPatch, "/aibalance/upstreams/" + addr, "{\"weight\":\xff}", 400},
		{http.MethodPatch, "/aibalance/upstreams/" + addr, `{"weight":2,"extra":true}`, 400},
		{http.MethodPatch, "/aibalance/upstreams/" + addr, `{"weight":2}` + strings.Repeat(" ", 2<<20), 413},
		{http.MethodPost, "/aibalance/pools/badinput-empty/members", `{"address":"127.0.0.1:1"}` + strings.Repeat(" ", 2<<20), 413},
		{http.MethodPatch, "/aibalance/upstreams/10.255.255.1:1", `{"weight":2}`, 404},
		{http.MethodPost, "/aibalance/pools/badinput-empty/members", `{"address":"not an address"}`, 400},
		{http.MethodPost, "/aibalance/pools/badinput-empty/members", `{"address":"127.0.0.1:1","weight":-3}`, 400},
		{http.MethodPost, "/aibalance/pools/badinput-empty/members", strings.Repeat("[", 60000), 400},
		{http.MethodDelete, "/aibalance/pools/badinput-empty/members/127.0.0.1:9", ``, 404},
		{http.MethodPut, "/aibalance/upstreams", ``, 405},
	} {
		code, body := adminSend(t, tc.method, tc.path, tc.body)
		if code != tc.want || !json.Valid(body) {
			t.Errorf("%s %s %.40q: %d %s, want %d with a JSON error", tc.method, tc.path, tc.body, code, body, tc.want)
		}
	}
}
