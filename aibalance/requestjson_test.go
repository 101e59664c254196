package aibalance

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// field is one top-level key and its raw JSON value.
type field struct{ k, v string }

func jsonObject(fields []field) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, f := range fields {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Quote(f.k) + ":" + f.v)
	}
	b.WriteByte('}')
	return b.String()
}

// fieldOrders returns the fields as given, reversed, and rotated by half:
// the parse must not depend on the order a client's encoder chose.
func fieldOrders(fields []field) map[string][]field {
	rev := slices.Clone(fields)
	slices.Reverse(rev)
	h := len(fields) / 2
	rot := append(slices.Clone(fields[h:]), fields[:h]...)
	return map[string][]field{"as given": fields, "reversed": rev, "rotated": rot}
}

func extractPath(t testing.TB, path, body string, cfg FeatureConfig) *Features {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
	f := new(Features)
	ExtractFeatures(req, cfg, f)
	got, err := io.ReadAll(req.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte(body)) {
		t.Fatalf("body changed: got %d bytes, want %d", len(got), len(body))
	}
	return f
}

// toolsJSON returns a tools array of about size bytes.
func toolsJSON(size int) string {
	var b strings.Builder
	b.WriteByte('[')
	for i := 0; b.Len() < size; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"type":"function","function":{"name":"tool_%d","description":"Looks up the thing number %d in the catalogue and returns it.","parameters":{"type":"object","properties":{"id":{"type":"string"}},"required":["id"]}}}`, i, i)
	}
	b.WriteByte(']')
	return b.String()
}

func TestParseAPIShapes(t *testing.T) {
	tools := toolsJSON(9000)
	smallTools := `[{"type":"function","name":"f","parameters":{}}]`
	chatMessages := `[{"role":"system","content":"abcd"},{"role":"user","content":"efgh"},` +
		`{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get","arguments":"{\"q\":1}"}}]},` +
		`{"role":"tool","tool_call_id":"c1","content":"result"}]`
	anthropicMessages := `[{"role":"user","content":"abcd"},` +
		`{"role":"assistant","content":[{"type":"text","text":"efgh"},{"type":"tool_use","id":"t","name":"f","input":{"q":1}}]},` +
		`{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"ijkl"}]}]}]`
	responsesItems := `[{"role":"user","content":[{"type":"input_text","text":"abcdefgh"},{"type":"input_image","image_url":"data:image/png;base64,AAAA"}]},` +
		`{"type":"function_call","call_id":"c","name":"f","arguments":"abcd"},` +
		`{"type":"function_call_output","call_id":"c","output":"efgh"}]`
	for _, tc := range []struct {
		name   string
		path   string
		fields []field
		want   Features
	}{
		{name: "chat with tools, tool calls and n", path: "/v1/chat/completions", fields: []field{
			{"messages", chatMessages}, {"tools", tools}, {"model", `"m"`}, {"max_completion_tokens", "100"},
			{"n", "3"}, {"stream", "true"}, {"user", `"u"`}, {"tool_choice", `"auto"`}},
			// text: abcd efgh get {\"q\":1} result = 26 bytes, plus the tools array; 4 messages
			want: Features{API: APIChat, Model: "m", User: "u", PromptTokens: (26+len(tools))/4 + 16, OutputTokens: 300, Stream: true, Parsed: true}},
		{name: "chat content parts and max_tokens", path: "/v1/chat/completions", fields: []field{
			{"messages", `[{"content":[{"type":"text","text":"abcdefgh"},{"type":"image_url","image_url":{"url":"data:x"}}],"role":"user"}]`},
			{"max_tokens", "64"}},
			want: Features{API: APIChat, PromptTokens: 2 + 4, OutputTokens: 64, Parsed: true}},
		{name: "n is capped", path: "/v1/chat/completions", fields: []field{
			{"messages", `[]`}, {"n", "100000"}, {"max_tokens", "2"}},
			want: Features{API: APIChat, OutputTokens: 2 * maxChoices, Parsed: true}},
		{name: "completions string prompt", path: "/v1/completions", fields: []field{
			{"prompt", `"abcdefgh"`}, {"max_tokens", "10"}, {"n", "2"}, {"model", `"m"`}},
			want: Features{API: APICompletions, Model: "m", PromptTokens: 2, OutputTokens: 20, Parsed: true}},
		{name: "completions array of strings", path: "/v1/completions", fields: []field{
			{"prompt", `["abcd","efgh"]`}, {"max_tokens", "10"}},
			want: Features{API: APICompletions, PromptTokens: 2, OutputTokens: 10, Parsed: true}},
		{name: "completions token IDs", path: "/v1/completions", fields: []field{
			{"prompt", `[1,2,3]`}, {"max_tokens", "10"}},
			want: Features{API: APICompletions, PromptTokens: 3, OutputTokens: 10, Parsed: true}},
		{name: "completions batched token arrays and best_of", path: "/v1/completions", fields: []field{
			{"prompt", `[[1,2],[3,4,5]]`}, {"max_tokens", "10"}, {"best_of", "4"}, {"n", "2"}},
			want: Features{API: APICompletions, PromptTokens: 5, OutputTokens: 40, Parsed: true}},
		{name: "responses string input and ids", path: "/v1/responses", fields: []field{
			{"input", `"abcdefgh"`}, {"instructions", `"abcd"`}, {"max_output_tokens", "50"},
			{"previous_response_id", `"resp_1"`}, {"prompt_cache_key", `"key-1"`}, {"conversation", `"conv_1"`}, {"model", `"gpt"`}},
			// instructions count as a (system) message
			want: Features{API: APIResponses, Model: "gpt", PreviousResponseID: "resp_1", Conversation: "conv_1", PromptCacheKey: "key-1",
				PromptTokens: 12/4 + 4, OutputTokens: 50, Parsed: true}},
		{name: "responses items, reasoning, tools", path: "/v1/responses", fields: []field{
			{"input", responsesItems}, {"reasoning", `{"effort":"high","summary":"auto"}`}, {"tools", smallTools},
			{"conversation", `{"id":"conv_2"}`}, {"stream", "true"}},
			// text: abcdefgh abcd efgh and the tools array; 3 items
			want: Features{API: APIResponses, Conversation: "conv_2", PromptTokens: (16+len(smallTools))/4 + 12,
				OutputTokens: reasoningOutputTokens, Stream: true, Parsed: true}},
		{name: "responses minimal reasoning keeps the default", path: "/v1/responses", fields: []field{
			{"input", `"abcd"`}, {"reasoning", `{"effort":"minimal"}`}},
			want: Features{API: APIResponses, PromptTokens: 1, OutputTokens: 256, Parsed: true}},
		{name: "responses reasoning with a limit", path: "/v1/responses", fields: []field{
			{"input", `"abcd"`}, {"reasoning", `{"effort":"medium"}`}, {"max_output_tokens", "1000"}},
			want: Features{API: APIResponses, PromptTokens: 1, OutputTokens: 1000, Parsed: true}},
		{name: "chat reasoning_effort", path: "/v1/chat/completions", fields: []field{
			{"messages", `[{"role":"user","content":"abcd"}]`}, {"reasoning_effort", `"low"`}},
			want: Features{API: APIChat, PromptTokens: 1 + 4, OutputTokens: reasoningOutputTokens, Parsed: true}},
		{name: "messages with system blocks, tools, thinking, metadata", path: "/v1/messages", fields: []field{
			{"system", `[{"type":"text","text":"abcdefgh","cache_control":{"type":"ephemeral"}}]`},
			{"messages", anthropicMessages}, {"tools", tools}, {"max_tokens", "2000"},
			{"thinking", `{"type":"enabled","budget_tokens":1024}`}, {"metadata", `{"user_id":"usr-1"}`},
			{"stream", "true"}, {"model", `"claude"`}},
			// text: abcdefgh abcd efgh {"q":1} ijkl = 27 bytes and the tools;
			// system + 3 messages; thinking counts within max_tokens
			want: Features{API: APIMessages, Model: "claude", User: "usr-1", PromptTokens: (27+len(tools))/4 + 16,
				OutputTokens: 2000, Stream: true, Parsed: true}},
		{name: "messages thinking without max_tokens adds its budget", path: "/v1/messages", fields: []field{
			{"system", `"abcd"`}, {"messages", `[{"role":"user","content":"efgh"}]`},
			{"thinking", `{"type":"enabled","budget_tokens":2048}`}},
			want: Features{API: APIMessages, PromptTokens: 2 + 8, OutputTokens: 256 + 2048, Parsed: true}},
		{name: "messages interleaved thinking budget above max_tokens", path: "/v1/messages", fields: []field{
			{"messages", `[]`}, {"max_tokens", "1000"}, {"thinking", `{"type":"enabled","budget_tokens":4000}`}},
			want: Features{API: APIMessages, OutputTokens: 4000, Parsed: true}},
		{name: "messages thinking disabled", path: "/v1/messages", fields: []field{
			{"messages", `[]`}, {"thinking", `{"budget_tokens":4000,"type":"disabled"}`}},
			want: Features{API: APIMessages, OutputTokens: 256, Parsed: true}},
		{name: "user wins over metadata.user_id", path: "/v1/messages", fields: []field{
			{"metadata", `{"user_id":"meta"}`}, {"user", `"top"`}},
			want: Features{API: APIMessages, User: "top", OutputTokens: 256, Parsed: true}},
		{name: "embeddings strings", path: "/v1/embeddings", fields: []field{
			{"input", `["abcd","efgh"]`}, {"model", `"e"`}},
			want: Features{API: APIEmbeddings, Model: "e", PromptTokens: 2, Parsed: true}},
		{name: "embeddings token arrays", path: "/v1/embeddings", fields: []field{
			{"input", `[[1,2],[3]]`}, {"max_tokens", "99"}},
			want: Features{API: APIEmbeddings, PromptTokens: 3, Parsed: true}},
		{name: "rerank query and documents", path: "/v1/rerank", fields: []field{
			{"query", `"abcd"`}, {"documents", `["efgh",{"text":"ijkl"}]`}, {"top_n", "2"}},
			want: Features{API: APIRerank, PromptTokens: 3, Parsed: true}},
		{name: "score text_1 and text_2", path: "/v1/score", fields: []field{
			{"text_1", `"abcd"`}, {"text_2", `["efgh"]`}},
			want: Features{API: APIRerank, PromptTokens: 2, Parsed: true}},
		{name: "unknown path is read but is not work", path: "/v1/unknown", fields: []field{
			{"messages", `[{"role":"user","content":"abcd"}]`}, {"max_tokens", "7"}},
			want: Features{API: APINone, PromptTokens: 1 + 4, OutputTokens: 7, Parsed: true}},
		{name: "wrong types are ignored", path: "/v1/chat/completions", fields: []field{
			{"max_tokens", `"100"`}, {"stream", `"true"`}, {"model", `{"a":1}`}, {"n", "-2"}, {"user", "5"},
			{"reasoning", "null"}, {"metadata", `"x"`}, {"messages", `"abcd"`}},
			want: Features{API: APIChat, PromptTokens: 1, OutputTokens: 256, Parsed: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var first *Features
			for order, fields := range fieldOrders(tc.fields) {
				f := extractPath(t, tc.path, jsonObject(fields), DefaultFeatureConfig)
				if first == nil {
					first = f
				} else if !slices.Equal(f.PrefixHashes, first.PrefixHashes) {
					t.Fatalf("%s: prefix hashes depend on the order of the fields", order)
				}
				got := *f
				got.PrefixHashes = nil
				got.OutputLimit = 0 // TestOutputLimit
				if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", tc.want) {
					t.Fatalf("%s:\ngot  %+v\nwant %+v", order, got, tc.want)
				}
			}
		})
	}
}

// TestToolsCountAsPrompt: a 9 KB tools array is about 9000/4 prompt tokens.
func TestToolsCountAsPrompt(t *testing.T) {
	tools := toolsJSON(9000)
	for _, path := range []string{"/v1/chat/completions", "/v1/responses", "/v1/messages"} {
		f := extractPath(t, path, `{"messages":[{"role":"user","content":"hi"}],"tools":`+tools+`}`, DefaultFeatureConfig)
		if f.PromptTokens < 9000/4 || f.PromptTokens > 9300/4+8 {
			t.Fatalf("%s: %d prompt tokens for a %d-byte tools array", path, f.PromptTokens, len(tools))
		}
	}
}

// TestFieldsAfterLongMessages: the OpenAI Python SDK writes messages first;
// the routing fields after 100 KiB of them are still read.
func TestFieldsAfterLongMessages(t *testing.T) {
	long := strings.Repeat("lorem ipsum ", 100<<10/12)
	body := `{"messages":[{"role":"user","content":"` + long + `"}],"model":"late","max_tokens":33,"stream":true,"user":"bob","n":2}`
	f := extractPath(t, "/v1/chat/completions", body, DefaultFeatureConfig)
	if f.Model != "late" || f.OutputTokens != 66 || !f.Stream || f.User != "bob" || f.Truncated {
		t.Fatalf("fields after 100 KiB of messages lost: %+v", *f)
	}
	if want := len(long)/4 + 4; f.PromptTokens != want {
		t.Fatalf("prompt %d, want %d", f.PromptTokens, want)
	}
}

// TestSystemHashedFirst: Anthropic's system (and the Responses API's
// instructions) hash as a leading system message, wherever the field sits:
// the same conversation gives the same prefix as a chat request.
func TestSystemHashedFirst(t *testing.T) {
	sys := strings.Repeat("You are terse. ", 20)
	chat := extractPath(t, "/v1/chat/completions", `{"messages":[{"role":"system","content":"`+sys+`"},{"role":"user","content":"hi"}]}`, DefaultFeatureConfig)
	for _, tc := range []struct{ path, body string }{
		{"/v1/messages", `{"messages":[{"role":"user","content":"hi"}],"system":"` + sys + `"}`},
		{"/v1/messages", `{"system":[{"type":"text","text":"` + sys + `"}],"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}`},
		{"/v1/responses", `{"input":[{"role":"user","content":"hi"}],"instructions":"` + sys + `"}`},
	} {
		f := extractPath(t, tc.path, tc.body, DefaultFeatureConfig)
		if len(f.PrefixHashes) == 0 || !slices.Equal(f.PrefixHashes, chat.PrefixHashes) {
			t.Fatalf("%s %s: hashes differ from the chat request's", tc.path, tc.body[:20])
		}
	}
}

// TestTokenIDsAreSeparated: [1,23] and [12,3] are different prefixes.
func TestTokenIDsAreSeparated(t *testing.T) {
	cfg := DefaultFeatureConfig
	cfg.PrefixBlockChars = 4
	a := extractPath(t, "/v1/completions", `{"prompt":[1,23]}`, cfg)
	b := extractPath(t, "/v1/completions", `{"prompt":[12,3]}`, cfg)
	if len(a.PrefixHashes) == 0 || slices.Equal(a.PrefixHashes, b.PrefixHashes) {
		t.Fatalf("token prompts hash alike: %v %v", a.PrefixHashes, b.PrefixHashes)
	}
}

func TestGarbageAndTruncatedBodies(t *testing.T) {
	for _, tc := range []struct {
		name, path, body string
		want             Features
	}{
		{"truncated message", "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"abcdefgh`,
			Features{API: APIChat, Model: "m", PromptTokens: 2 + 4, OutputTokens: 256, Parsed: true}},
		{"truncated key", "/v1/chat/completions", `{"max_tokens":5,"mod`,
			Features{API: APIChat, OutputTokens: 5, Parsed: true}},
		{"truncated thinking", "/v1/messages", `{"max_tokens":5,"thinking":{"type":"enabled","budget_tokens":40`,
			Features{API: APIMessages, OutputTokens: 40, Parsed: true}},
		{"unterminated model", "/v1/chat/completions", `{"model":"m`, Features{API: APIChat, OutputTokens: 256, Parsed: true}},
		{"commas and colons", "/v1/chat/completions", `{,,,"model":"m",:::"user":"u"}`,
			Features{API: APIChat, Model: "m", OutputTokens: 256, Parsed: true}},
		{"missing value", "/v1/chat/completions", `{"max_tokens":,"model":"m"}`,
			Features{API: APIChat, Model: "m", OutputTokens: 256, Parsed: true}},
		{"closing brackets first", "/v1/responses", `{"input":]]]]}}}}`, Features{API: APIResponses, OutputTokens: 256, Parsed: true}},
		{"array body", "/v1/chat/completions", `[{"model":"m"}]`, Features{API: APIChat, OutputTokens: 256}},
		{"long model name is cut", "/v1/chat/completions", `{"model":"` + strings.Repeat("m", 1000) + `"}`,
			Features{API: APIChat, Model: strings.Repeat("m", maxFieldLen), OutputTokens: 256, Parsed: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := extractPath(t, tc.path, tc.body, DefaultFeatureConfig)
			f.PrefixHashes, f.OutputLimit = nil, 0
			if fmt.Sprintf("%+v", *f) != fmt.Sprintf("%+v", tc.want) {
				t.Fatalf("got  %+v\nwant %+v", *f, tc.want)
			}
		})
	}
}

// adversarialBodies are bodies built to cost the scanner the most: deep
// nesting (a recursive parser overflows its stack on them), many tiny
// strings, long runs of escapes, parts inside parts.
func adversarialBodies(size int) []struct{ name, path, body string } {
	return []struct{ name, path, body string }{
		{"deep arrays", "/v1/completions", `{"prompt":` + strings.Repeat("[", size)},
		{"deep objects", "/v1/chat/completions", `{"messages":` + strings.Repeat(`{"a":`, size/5)},
		{"deep parts", "/v1/messages", `{"messages":[{"role":"user","content":` + strings.Repeat(`[{"type":"tool_result","content":`, size/33)},
		{"tiny strings", "/v1/embeddings", `{"input":[` + strings.Repeat(`"",`, size/3) + `""]}`},
		{"tiny messages", "/v1/chat/completions", `{"messages":[` + strings.Repeat(`{},`, size/3) + `{}]}`},
		{"long escapes", "/v1/chat/completions", `{"messages":[{"role":"user","content":"` + strings.Repeat(`\\\"`, size/4) + `"}]}`},
		{"backslash run", "/v1/chat/completions", `{"model":"` + strings.Repeat(`\`, size) + `"}`},
		{"many keys", "/v1/responses", `{` + strings.Repeat(`"input":"x",`, size/12) + `"model":"m"}`},
	}
}

// TestWorstCaseBodies: a 4 MiB body of 4 Mi '[' (and the other adversarial
// bodies) parsed with a 4 MiB peek returns promptly: no stack overflow (a
// fatal error, not a panic), no time or memory growing faster than the body.
func TestWorstCaseBodies(t *testing.T) {
	cfg := DefaultFeatureConfig
	cfg.PeekBytes = 4 << 20
	for _, b := range adversarialBodies(4 << 20) {
		t.Run(b.name, func(t *testing.T) {
			start := time.Now()
			f := extractPath(t, b.path, b.body, cfg)
			if d := time.Since(start); d > 10*time.Second {
				t.Fatalf("%d-byte body took %v", len(b.body), d)
			}
			if !f.Parsed {
				t.Fatalf("features %+v", *f)
			}
			// the parse itself allocates only the features' strings and hashes
			body, api := []byte(b.body), f.API
			allocs := testing.AllocsPerRun(2, func() {
				f := Features{API: api}
				parseRequestJSON(body, 0, cfg, &f)
			})
			if allocs > 2 { // PrefixHashes and one name at most
				t.Fatalf("%v allocations parsing a %d-byte body", allocs, len(body))
			}
		})
	}
}

// BenchmarkWorstCaseBody measures time and memory per request for the
// adversarial bodies, 4 MiB each, through ExtractFeatures with a 4 MiB peek:
// B/op is the peek buffer plus a constant.
func BenchmarkWorstCaseBody(b *testing.B) {
	cfg := DefaultFeatureConfig
	cfg.PeekBytes = 4 << 20
	for _, tc := range adversarialBodies(4 << 20) {
		body := []byte(tc.body)
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			rd := bytes.NewReader(body)
			req := httptest.NewRequest(http.MethodPost, tc.path, nil)
			var f Features
			for b.Loop() {
				rd.Reset(body)
				req.Body, req.ContentLength = io.NopCloser(rd), int64(len(body))
				f = Features{}
				ExtractFeatures(req, cfg, &f)
			}
		})
	}
}

// TestOutputLimit: the limit a request sets itself, times its choices;
// none when it sets none (the expected output is then a default, which
// must not bound anything).
func TestOutputLimit(t *testing.T) {
	for _, tc := range []struct {
		path, body string
		want       int
	}{
		{"/v1/chat/completions", `{"messages":[],"max_tokens":300}`, 300},
		{"/v1/chat/completions", `{"max_completion_tokens":70,"max_tokens":300}`, 70},
		{"/v1/chat/completions", `{"max_tokens":100,"n":3}`, 300},
		{"/v1/responses", `{"max_output_tokens":50}`, 50},
		{"/v1/chat/completions", `{"messages":[]}`, 0},
		{"/v1/embeddings", `{"input":"x","max_tokens":9}`, 0},
	} {
		if f := extractPath(t, tc.path, tc.body, DefaultFeatureConfig); f.OutputLimit != tc.want {
			t.Errorf("%s %s: OutputLimit %d, want %d", tc.path, tc.body, f.OutputLimit, tc.want)
		}
	}
}
