package selection

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

// TestFirstByteDeadline: fixed and off are as configured; auto gives
// nothing to requests that are not LLM work, a floor to a backend the
// model knows nothing of, and a multiple of the prediction to a slow,
// queued one, covering the whole answer of a non-streaming request.
func TestFirstByteDeadline(t *testing.T) {
	var set aibalance.BackendSet
	defer set.Release()
	tr := &Transport{app: aibalance.NewApp(), clock: time.Now}
	now := time.Now()
	prior := new(aibalance.Prior)
	stream := &aibalance.Features{API: aibalance.APIChat, Parsed: true, Stream: true, PromptTokens: 500, OutputTokens: 256}
	whole := &aibalance.Features{API: aibalance.APIChat, Parsed: true, PromptTokens: 500, OutputTokens: 256}
	probe := &aibalance.Features{API: aibalance.APINone}
	auto := aibalance.HealthConfig{}.WithDefaults()
	fixed := aibalance.HealthConfig{FirstByteTimeout: caddy.Duration(3 * time.Second)}.WithDefaults()
	off := aibalance.HealthConfig{FirstByteTimeout: -1}.WithDefaults()

	cold := set.Get("fbd-cold:1")
	if d := tr.firstByteDeadline(cold, stream, &fixed, prior, now); d != 3*time.Second {
		t.Fatalf("fixed: %s", d)
	}
	if d := tr.firstByteDeadline(cold, stream, &off, prior, now); d != 0 {
		t.Fatalf("off: %s", d)
	}
	if d := tr.firstByteDeadline(cold, probe, &auto, prior, now); d != 0 {
		t.Fatalf("auto, not LLM work: %s", d)
	}
	if d := tr.firstByteDeadline(cold, stream, &auto, prior, now); d != autoFloor {
		t.Fatalf("auto, a stream on an unknown backend: %s, want the floor %s", d, autoFloor)
	}

	// a backend whose first token takes 6 s and whose tokens take 50 ms
	slow := set.Get("fbd-slow:1")
	for i := 0; i < 60; i++ {
		slow.Model().Observe(aibalance.Observation{Stream: true, PromptTokens: 500, OutputTokens: 200,
			TTFT: 6 * time.Second, E2E: 6*time.Second + 199*50*time.Millisecond}, 0.99, prior, now)
	}
	d := tr.firstByteDeadline(slow, stream, &auto, prior, now)
	t.Logf("auto deadline for a 6 s TTFT: %s", d)
	if d < 20*time.Second || d > 30*time.Second {
		t.Fatalf("auto, stream on a 6 s-TTFT backend: %s, want about 4×6 s", d)
	}
	// a non-streaming answer's headers come at its end: with no limit of
	// its own, the deadline covers at least 4096 tokens
	d = tr.firstByteDeadline(slow, whole, &auto, prior, now)
	if min := 4096 * 50 * time.Millisecond; d < min {
		t.Fatalf("auto, non-streaming without a limit: %s, shorter than 4096 tokens at 50 ms (%s)", d, min)
	}
	limited := *whole
	limited.OutputLimit = 20
	if d := tr.firstByteDeadline(slow, &limited, &auto, prior, now); d != autoFloorWhole {
		t.Fatalf("auto, non-streaming with a 20-token limit: %s, want the floor %s", d, autoFloorWhole)
	}
}

// TestFirstByteAwait: a stream whose first byte does not come in time is
// a dial error to Caddy (so it retries any method) that says so; one that
// comes is put back in front of the body.
func TestFirstByteAwait(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		if r.URL.Path == "/hang" {
			select {
			case <-release:
			case <-r.Context().Done():
			}
			return
		}
		_, _ = io.WriteString(w, "data: {}\n\n")
	}))
	defer srv.Close()
	defer close(release)
	get := func(path string, d time.Duration) (*http.Response, *firstByte, error) {
		fb := newFirstByte(d)
		req, _ := http.NewRequestWithContext(fb.arm(context.Background()), http.MethodGet, srv.URL+path, nil)
		res, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		return res, fb, fb.await(res)
	}
	start := time.Now()
	_, fb, err := get("/hang", 200*time.Millisecond)
	if !errors.As(err, new(reverseproxy.DialError)) || !fb.timedOut() || !strings.Contains(err.Error(), "first_byte_timeout") {
		t.Fatalf("hanging stream: %v (timed out %v)", err, fb.timedOut())
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("the 200 ms deadline took %s", took)
	}
	res, fb, err := get("/ok", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	fb.stop()
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	fb.release()
	if string(body) != "data: {}\n\n" {
		t.Fatalf("body after the first byte was read: %q", body)
	}
}

// TestRejectResponse: the balancer's own answers are in the API's error
// shape, with Retry-After in whole seconds, never empty.
func TestRejectResponse(t *testing.T) {
	rej := &aibalance.Reject{Status: 429, Type: "rate_limit_error", Code: "rate_limit_exceeded", Message: "pause", RetryAfter: 1500 * time.Millisecond}
	for _, api := range []aibalance.API{aibalance.APIChat, aibalance.APIMessages} {
		res := rejectResponse(nil, api, rej)
		body, _ := io.ReadAll(res.Body)
		want := `{"error":{"code":"rate_limit_exceeded","message":"pause","param":null,"type":"rate_limit_error"}}`
		if api == aibalance.APIMessages {
			want = `{"error":{"message":"pause","type":"rate_limit_error"},"type":"error"}`
		}
		if res.StatusCode != 429 || strings.TrimSpace(string(body)) != want || res.Header.Get("Retry-After") != "2" ||
			res.Header.Get("Content-Length") != strconv.Itoa(len(body)) {
			t.Fatalf("%s: %d %q Retry-After %q", api, res.StatusCode, body, res.Header.Get("Retry-After"))
		}
	}
}

// TestPolicyRejects: with nothing eligible, the policy's own answer says
// why: 404 only when no backend serves the model, 429 with the soonest
// end when every backend that serves it cools down.
func TestPolicyRejects(t *testing.T) {
	p := newPredictive(2, true)
	p.ours = true
	defer p.set.Release()
	pool := testPool(t, 2)
	now := time.Now()
	for _, u := range pool {
		p.set.Get(u.Dial).SetModels(&aibalance.ServedModels{Context: map[string]int{"m": 8192}})
	}
	sel := func(model string) *aibalance.Features {
		r := varsRequest()
		f := p.app.Features(r)
		f.Model = model
		if u := p.Select(pool, r, nil); u == nil {
			t.Fatalf("model %q: nil upstream", model)
		}
		return f
	}
	if f := sel("m"); f.Reject != nil {
		t.Fatalf("a served model was rejected: %+v", f.Reject)
	}
	if f := sel("other"); f.Reject == nil || f.Reject.Status != 404 || f.Reject.Code != "model_not_found" || !strings.Contains(f.Reject.Message, "Served models: m.") {
		t.Fatalf("an unserved model: %+v", f.Reject)
	}
	p.set.Get(pool[0].Dial).CoolDown(now, now.Add(10*time.Second))
	p.set.Get(pool[1].Dial).CoolDown(now, now.Add(3*time.Second))
	f := sel("m")
	if f.Reject == nil || f.Reject.Status != 429 || f.Reject.RetryAfter > 3*time.Second || f.Reject.RetryAfter < 2*time.Second {
		t.Fatalf("every backend cooling down: %+v, want 429 with the soonest end", f.Reject)
	}
}
