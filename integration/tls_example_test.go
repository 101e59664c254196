package integration

import (
	"bytes"
	"compress/gzip"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/llmsim"
)

// TestTLSExample starts examples/tls (TLS termination with Caddy's
// internal CA, compression, basic auth) on a loopback port: a streamed
// completion arrives over HTTPS, compressed when the client asks, and is
// refused without credentials.
func TestTLSExample(t *testing.T) {
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{})
	listen := port(t)
	cfg := readExample(t, "../examples/tls/Caddyfile")
	cfg = strings.Replace(cfg, "llm.example.internal {", fmt.Sprintf("https://127.0.0.1:%d {", listen), 1)
	cfg = strings.Replace(cfg, "10.0.0.11:8000 10.0.0.12:8000", upstreams(p), 1)
	tester.InitServer(globals+cfg, "caddyfile")

	client := &http.Client{
		Timeout: 60 * time.Second,
		// Caddy's internal CA is not in the system pool; the point here is
		// that TLS terminates at Caddy, not who signed the certificate
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableCompression: true},
	}
	url := fmt.Sprintf("https://127.0.0.1:%d/v1/chat/completions", listen)
	post := func(auth bool) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(llmsim.ChatBody("", "hello over TLS", 16, true)))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept-Encoding", "gzip")
		if auth {
			req.SetBasicAuth("team", "hunter2")
		}
		res, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	// Caddy issues the internal certificate in the background at start
	waitFor(t, func() bool {
		res, err := client.Get(fmt.Sprintf("https://127.0.0.1:%d/health", listen))
		if err != nil {
			return false
		}
		res.Body.Close()
		return true
	})

	res := post(false)
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("without credentials: %d, want 401", res.StatusCode)
	}

	res = post(true)
	defer res.Body.Close()
	if res.StatusCode != 200 || res.TLS == nil {
		t.Fatalf("with credentials: %d (TLS %v)", res.StatusCode, res.TLS != nil)
	}
	if enc := res.Header.Get("Content-Encoding"); enc != "gzip" {
		t.Fatalf("Content-Encoding %q, want gzip for a client that asked", enc)
	}
	zr, err := gzip.NewReader(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(body), `"content":`); n < 16 || !strings.Contains(string(body), "data: [DONE]") {
		t.Fatalf("the decompressed stream has %d content chunks and no end:\n%s", n, body)
	}
}
