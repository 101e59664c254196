package llmsim

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
)

// TestShapes: a conversation's next request starts with its whole previous
// one plus the answer (as long as that turn's output), under the same
// session; tenants keep their system prompt; uniform prompts name no
// session.
func TestShapes(t *testing.T) {
	type msg = map[string]string
	decode := func(b []byte) []msg {
		var req struct {
			Messages []msg `json:"messages"`
		}
		if err := json.Unmarshal(b, &req); err != nil {
			t.Fatal(err)
		}
		return req.Messages
	}
	for _, shape := range []string{ShapeChat, ShapeAgentic} {
		s := newShaper(Workload{Shape: shape, MinPrompt: 20, MaxPrompt: 60}, rand.New(rand.NewPCG(1, 2)))
		last := map[string][]msg{}
		lastOut := map[string]int{}
		continued := 0
		for i := 0; i < 500; i++ {
			out := 10 + i%50
			body, prompt, session := s.body(i, out, true)
			if session == "" || prompt <= 0 {
				t.Fatalf("%s: request %d: session %q, prompt %d", shape, i, session, prompt)
			}
			msgs := decode(body)
			if prev, ok := last[session]; ok {
				continued++
				if len(msgs) != len(prev)+2 {
					t.Fatalf("%s: session %s grew from %d to %d messages", shape, session, len(prev), len(msgs))
				}
				for j := range prev {
					if msgs[j]["content"] != prev[j]["content"] {
						t.Fatalf("%s: session %s changed message %d", shape, session, j)
					}
				}
				answer := msgs[len(prev)]
				if answer["role"] != "assistant" || len(answer["content"]) != 4*lastOut[session] {
					t.Fatalf("%s: answer %q of %d characters after an output of %d tokens", shape, answer["role"], len(answer["content"]), lastOut[session])
				}
			}
			last[session], lastOut[session] = msgs, out
		}
		if continued < 200 {
			t.Fatalf("%s: only %d of 500 requests continued a session", shape, continued)
		}
	}

	s := newShaper(Workload{Shape: ShapePrefix, MinPrompt: 20, MaxPrompt: 60}, rand.New(rand.NewPCG(1, 2)))
	system := map[string]string{}
	for i := 0; i < 300; i++ {
		body, _, tenant := s.body(i, 10, false)
		msgs := decode(body)
		if !strings.HasPrefix(tenant, "tenant-") || msgs[0]["role"] != "system" {
			t.Fatalf("prefix: tenant %q, first role %q", tenant, msgs[0]["role"])
		}
		if prev, ok := system[tenant]; ok && prev != msgs[0]["content"] {
			t.Fatalf("prefix: %s changed its system prompt", tenant)
		}
		system[tenant] = msgs[0]["content"]
	}
	if len(system) < 10 {
		t.Fatalf("prefix: %d tenants in 300 requests", len(system))
	}

	u := newShaper(Workload{MinPrompt: 20, MaxPrompt: 60}, rand.New(rand.NewPCG(1, 2)))
	if _, _, session := u.body(0, 10, false); session != "" {
		t.Fatalf("uniform: session %q", session)
	}
}
