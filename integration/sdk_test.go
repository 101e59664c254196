package integration

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// TestRealSDKClients drives the official OpenAI Node SDK (chat stream,
// Responses stream, embeddings) and the Anthropic Node SDK (Messages
// stream) through ai_proxy against simulated engines, checks what they
// received, and checks through the admin API what the plugin recorded.
// The clients are installed from integration/sdk/package-lock.json by
// `npm ci` (.ci/run does it); outside CI the test skips without them.
func TestRealSDKClients(t *testing.T) {
	dir, err := filepath.Abs("sdk")
	if err != nil {
		t.Fatal(err)
	}
	node, nodeErr := exec.LookPath("node")
	_, modErr := os.Stat(filepath.Join(dir, "node_modules", "openai"))
	if nodeErr != nil || modErr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must run the SDK clients: node %v, node_modules %v (run `npm ci` in integration/sdk)", nodeErr, modErr)
		}
		t.Skip("the Node SDK clients are not installed: run `npm ci` in integration/sdk (CI does)")
	}
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{})
	base := aiProxy(t, tester, upstreams(p), "")

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "clients.mjs", base)
	cmd.Dir = dir
	cmd.Stderr = os.Stderr
	raw, err := cmd.Output()
	if err != nil {
		t.Fatalf("the SDK clients failed: %v\n%s", err, raw)
	}
	var got struct {
		Chat struct {
			Text             string `json:"text"`
			Chunks           int    `json:"chunks"`
			CompletionTokens int    `json:"completion_tokens"`
		} `json:"chat"`
		Responses struct {
			Text         string `json:"text"`
			Events       int    `json:"events"`
			OutputTokens int    `json:"output_tokens"`
		} `json:"responses"`
		Embeddings struct {
			Vectors int `json:"vectors"`
			Dims    int `json:"dims"`
		} `json:"embeddings"`
		Messages struct {
			Text         string `json:"text"`
			OutputTokens int    `json:"output_tokens"`
		} `json:"messages"`
	}
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatalf("%v in %s", err, raw)
	}
	t.Logf("SDK clients got: %s", raw)
	if got.Chat.Text == "" || got.Chat.CompletionTokens != 12 ||
		got.Responses.Text == "" || got.Responses.OutputTokens != 10 ||
		got.Embeddings.Vectors != 2 || got.Embeddings.Dims == 0 ||
		got.Messages.Text == "" || got.Messages.OutputTokens != 9 {
		t.Fatalf("unexpected answers: %+v", got)
	}

	// what the plugin recorded, read as an operator would
	status, body := adminGet(t, "GET", "/aibalance/upstreams")
	var view aibalance.UpstreamsView
	if status != 200 || json.Unmarshal(body, &view) != nil {
		t.Fatalf("admin view: %d %s", status, body)
	}
	var requests, output, prompt uint64
	var samples int64
	for _, u := range view.Upstreams {
		requests += u.Counters.Requests
		output += u.Counters.OutputTokens
		prompt += u.Counters.PromptTokens
		samples += u.Counters.Model.Samples
	}
	// 12 + 10 + 9 generated tokens, read from each API's own stream
	// format and usage; embeddings generate none
	if requests != 4 || output != 31 || prompt == 0 || samples != 4 {
		t.Fatalf("the plugin recorded %d requests, %d output and %d prompt tokens, %d model samples; want 4, 31, >0, 4:\n%s",
			requests, output, prompt, samples, body)
	}
}
