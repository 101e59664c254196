package aibalance

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
)

func extract(t testing.TB, body string, chunked bool, cfg FeatureConfig) (*Features, []byte) {
	req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
	if chunked {
		req.ContentLength = -1
	}
	f := new(Features)
	ExtractFeatures(req, cfg, f)
	got, err := io.ReadAll(req.Body)
	if err != nil {
		t.Fatal(err)
	}
	return f, got
}

func TestAPIAndWork(t *testing.T) {
	for _, tc := range []struct {
		method, path, body string
		api                API
		work               bool
	}{
		{"POST", "/v1/chat/completions", `{"messages":[]}`, APIChat, true},
		{"POST", "/openai/v1/chat/completions/", `{"messages":[]}`, APIChat, true},
		{"POST", "/v1/completions", `{"prompt":"x"}`, APICompletions, true},
		{"POST", "/v1/responses", `{"input":"x"}`, APIResponses, true},
		{"POST", "/v1/messages", `{"messages":[]}`, APIMessages, true},
		{"POST", "/v1/embeddings", `{"input":"x"}`, APIEmbeddings, true},
		{"POST", "/v1/rerank", `{"query":"x"}`, APIRerank, true},
		{"GET", "/v1/models", ``, APINone, false},
		{"GET", "/health", ``, APINone, false},
		{"GET", "/metrics", ``, APINone, false},
		{"GET", "/v1/chat/completions", ``, APINone, false},
		{"POST", "/v1/chat/completions", `not json`, APIChat, false},
		{"POST", "/v1/unknown", `{"messages":[]}`, APINone, false},
		{"POST", "/tokenize", `{"prompt":"x"}`, APINone, false},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, tc.path, strings.NewReader(tc.body))
			f := new(Features)
			ExtractFeatures(r, DefaultFeatureConfig, f)
			if f.API != tc.api || f.Work() != tc.work {
				t.Fatalf("api %q work %v, want %q %v", f.API, f.Work(), tc.api, tc.work)
			}
			if h := HeaderFeatures(r, DefaultFeatureConfig); h.API != tc.api || h.Work() {
				t.Fatalf("header features: api %q work %v; want %q and never work (no body read)", h.API, h.Work(), tc.api)
			}
		})
	}
	// any prompt text is at least one token
	r0 := httptest.NewRequest("POST", "/v1/completions", strings.NewReader(`{"prompt":"ok","max_tokens":3}`))
	f0 := new(Features)
	ExtractFeatures(r0, DefaultFeatureConfig, f0)
	if f0.PromptTokens != 1 {
		t.Fatalf("a 2-character prompt counts %d tokens, want 1", f0.PromptTokens)
	}
	// embeddings cost their prompt only
	r := httptest.NewRequest("POST", "/v1/embeddings", strings.NewReader(`{"input":"abcdabcd","model":"e"}`))
	f := new(Features)
	ExtractFeatures(r, DefaultFeatureConfig, f)
	if f.OutputTokens != 0 || f.PromptTokens != 2 {
		t.Fatalf("embeddings: prompt %d output %d, want 2 and 0", f.PromptTokens, f.OutputTokens)
	}
}

// TestPeekGrowsWithTheBody: a client claiming a huge Content-Length does
// not make the balancer allocate it before any byte arrives.
func TestPeekGrowsWithTheBody(t *testing.T) {
	cfg := DefaultFeatureConfig
	cfg.PeekBytes = 1 << 30
	r := httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(`{"model":"m"}`))
	r.ContentLength = 1 << 30 // a lie
	var before, after runtimeMem
	before.read()
	f := new(Features)
	ExtractFeatures(r, cfg, f)
	after.read()
	if grew := after.total - before.total; grew > 1<<20 {
		t.Fatalf("peeking a 13-byte body that claims 1 GiB allocated %d bytes", grew)
	}
	if f.Model != "m" {
		t.Fatalf("model %q", f.Model)
	}
}

func TestPeek(t *testing.T) {
	body := strings.Repeat("x", 10000)
	boom := errors.New("boom")
	for _, tc := range []struct {
		name    string
		r       io.Reader
		n       int64
		want    int
		wantErr error
	}{
		{"whole body", strings.NewReader(body), 10000, 10000, nil},
		{"prefix", strings.NewReader(body), 5000, 5000, nil},
		{"shorter than claimed", strings.NewReader(body), 20000, 10000, io.ErrUnexpectedEOF},
		{"data with EOF", iotest.DataErrReader(strings.NewReader(body)), 10000, 10000, nil},
		{"one byte at a time", iotest.OneByteReader(strings.NewReader(body)), 9000, 9000, nil},
		{"read error", io.MultiReader(strings.NewReader(body[:100]), iotest.ErrReader(boom)), 10000, 100, boom},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf, err := peek(tc.r, tc.n)
			if len(buf) != tc.want || err != tc.wantErr || int64(cap(buf)) > tc.n {
				t.Fatalf("read %d (cap %d), err %v; want %d, %v, cap at most %d", len(buf), cap(buf), err, tc.want, tc.wantErr, tc.n)
			}
		})
	}
}

func TestExtractFeatures(t *testing.T) {
	long := strings.Repeat("a", 4000)
	for _, tc := range []struct {
		name    string
		body    string
		chunked bool
		peek    int64
		want    Features
	}{
		{name: "chat", body: `{"model":"llama-3","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"` + long + `"}],"max_tokens":77,"stream":true,"user":"alice"}`,
			want: Features{Model: "llama-3", User: "alice", PromptTokens: (8+4000)/4 + 8, OutputTokens: 77, Stream: true, Parsed: true}},
		{name: "max_completion_tokens wins", body: `{"messages":[],"max_tokens":5,"max_completion_tokens":9}`,
			want: Features{OutputTokens: 9, Parsed: true}},
		{name: "content parts", body: `{"messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"},{"type":"image_url","image_url":{"url":"x"}}]}]}`,
			want: Features{PromptTokens: 2 + 4, OutputTokens: 256, Parsed: true}},
		{name: "completion prompt", body: `{"prompt":"abcdabcd","max_tokens":3}`,
			want: Features{PromptTokens: 2, OutputTokens: 3, Parsed: true}},
		{name: "token id prompt", body: `{"prompt":[1,2,3,4,5],"max_tokens":3}`,
			want: Features{PromptTokens: 5, OutputTokens: 3, Parsed: true}},
		{name: "escaped quotes", body: `{"model":"m","messages":[{"role":"user","content":"say \"hi\" \\"}],"stream":false}`,
			want: Features{Model: "m", PromptTokens: 13/4 + 4, OutputTokens: 256, Parsed: true}},
		{name: "model after a long body beyond the peek", body: `{"messages":[{"role":"user","content":"` + long + `"}],"model":"late"}`, peek: 1000,
			want: Features{PromptTokens: (1000-39+3058)/4 + 4, OutputTokens: 256, Parsed: true, Truncated: true}}, // seen content + unread bytes
		{name: "chunked passes untouched", body: `{"model":"x","max_tokens":5}`, chunked: true,
			want: Features{OutputTokens: 256}},
		{name: "not json", body: `hello=world&a=b`, want: Features{OutputTokens: 256}},
		{name: "garbage", body: `{"model":{"messages":[[[[`, want: Features{OutputTokens: 256, Parsed: true}},
		{name: "negative and fractional numbers", body: `{"max_tokens":-4,"max_completion_tokens":2.5}`, want: Features{OutputTokens: 256, Parsed: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultFeatureConfig
			if tc.peek > 0 {
				cfg.PeekBytes = tc.peek
			}
			f, got := extract(t, tc.body, tc.chunked, cfg)
			if !bytes.Equal(got, []byte(tc.body)) {
				t.Fatalf("body changed: got %d bytes, want %d", len(got), len(tc.body))
			}
			f.PrefixHashes, f.OutputLimit = nil, 0 // TestOutputLimit
			tc.want.API = APIChat
			if fmt.Sprintf("%+v", *f) != fmt.Sprintf("%+v", tc.want) {
				t.Fatalf("got %+v\nwant %+v", *f, tc.want)
			}
		})
	}
}

func TestPrefixHashes(t *testing.T) {
	sys := strings.Repeat("You are a helpful assistant. ", 20) // 580 bytes
	a, _ := extract(t, `{"messages":[{"role":"system","content":"`+sys+`"},{"role":"user","content":"first question"}]}`, false, DefaultFeatureConfig)
	b, _ := extract(t, `{"model":"m","messages":[{"role":"system","content":"`+sys+`"},{"role":"user","content":"another one"}]}`, false, DefaultFeatureConfig)
	c, _ := extract(t, `{"messages":[{"role":"system","content":"X`+sys+`"}]}`, false, DefaultFeatureConfig)
	if len(a.PrefixHashes) != 9 || len(b.PrefixHashes) != 9 {
		t.Fatalf("blocks %d and %d, want 9 full 64-byte blocks", len(a.PrefixHashes), len(b.PrefixHashes))
	}
	if a.PrefixHashes[8] != b.PrefixHashes[8] {
		t.Fatal("same system prompt, different prefix hashes")
	}
	if a.PrefixHashes[0] == c.PrefixHashes[0] {
		t.Fatal("different first block, same hash")
	}
	huge := strings.Repeat("z", 100000)
	h, _ := extract(t, `{"messages":[{"role":"user","content":"`+huge+`"}]}`, false, DefaultFeatureConfig)
	if len(h.PrefixHashes) != MaxPrefixBlocks {
		t.Fatalf("blocks %d, want the cap %d", len(h.PrefixHashes), MaxPrefixBlocks)
	}
}

func TestPeekedBodyKeepsOriginalOpenUntilRead(t *testing.T) {
	rc := &closeCounter{Reader: strings.NewReader(`{"model":"m"}`)}
	req := httptest.NewRequest(http.MethodPost, "/", nil)
	req.Body, req.ContentLength = rc, 13
	ExtractFeatures(req, DefaultFeatureConfig, new(Features))
	_ = req.Body.Close() // a failed dial closes the body before sending it
	if rc.closed != 0 {
		t.Fatal("closing an unread body closed the original: a retry could not resend it")
	}
	if b, _ := io.ReadAll(req.Body); string(b) != `{"model":"m"}` {
		t.Fatalf("body after a close-before-read: %q", b)
	}
	_ = req.Body.Close()
	if rc.closed != 1 {
		t.Fatal("closing a read body did not close the original")
	}
}

type closeCounter struct {
	io.Reader
	closed int
}

func (c *closeCounter) Close() error { c.closed++; return nil }

// fuzzPaths are the paths FuzzParseRequestJSON sends bodies to: one per API
// and one the balancer does not know.
var fuzzPaths = []string{"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/embeddings", "/v1/rerank", "/v1/unknown"}

func FuzzParseRequestJSON(f *testing.F) {
	for _, s := range []struct {
		body string
		api  uint8
	}{
		{`{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}`, 0},
		{`{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}],"tools":[{"type":"function"}],"n":3}`, 0},
		{`{"prompt":[1,2,[3,4]],"input":"x","best_of":2}`, 1},
		{`{"prompt":[[1,2],[3]],"max_tokens":9}`, 1},
		{`{"input":[{"role":"user","content":[{"type":"input_text","text":"a"}]},{"type":"function_call_output","output":"o"}],"instructions":"i","reasoning":{"effort":"high"},"previous_response_id":"r","conversation":{"id":"c"},"prompt_cache_key":"k"}`, 2},
		{`{"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"tool_result","content":[{"type":"text","text":"t"}]},{"type":"tool_use","input":{"a":[1]}}]}],"thinking":{"type":"enabled","budget_tokens":1024},"metadata":{"user_id":"u"},"max_tokens":2048}`, 3},
		{`{"input":["a","b"],"model":"e"}`, 4},
		{`{"query":"q","documents":["d",{"text":"e"}],"text_1":"a","text_2":["b"]}`, 5},
		{`{"messages":[{"content":[{"text":"a\"b"}]}]}`, 6},
		{`{"a":{"b":[1,{"c":"\\"}]}}`, 0}, {`{`, 0}, {`{"`, 2}, {`[`, 3}, {``, 0},
		{`{"prompt":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[`, 1},
	} {
		f.Add([]byte(s.body), int64(0), s.api)
	}
	f.Fuzz(func(t *testing.T, body []byte, rest int64, api uint8) {
		if rest < 0 {
			rest = -rest
		}
		path := fuzzPaths[int(api)%len(fuzzPaths)]
		ft := Features{API: apiOf(httptest.NewRequest(http.MethodPost, path, nil))}
		parseRequestJSON(body, rest%(1<<40), DefaultFeatureConfig, &ft)
		if len(ft.PrefixHashes) > MaxPrefixBlocks || ft.PromptTokens < 0 || ft.OutputTokens < 0 ||
			len(ft.Model) > maxFieldLen || len(ft.User) > maxFieldLen || len(ft.PreviousResponseID) > maxFieldLen ||
			len(ft.Conversation) > maxFieldLen || len(ft.PromptCacheKey) > maxFieldLen {
			t.Fatalf("bad features %+v", ft)
		}
		// the body always comes back byte for byte, peeked in part or whole
		for _, peek := range []int64{16, int64(len(body)) + 1} {
			req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
			cfg := DefaultFeatureConfig
			cfg.PeekBytes = peek
			var fe Features
			ExtractFeatures(req, cfg, &fe)
			got, _ := io.ReadAll(req.Body)
			if !bytes.Equal(got, body) {
				t.Fatal("body changed")
			}
			// embeddings and rerank cost their prompt only once read; an
			// unread body keeps the neutral cost (the default output)
			if fe.Parsed && (fe.API == APIEmbeddings || fe.API == APIRerank) {
				if fe.OutputTokens != 0 {
					t.Fatalf("%s: output %d, want 0", path, fe.OutputTokens)
				}
			}
		}
	})
}

func BenchmarkExtractFeatures(b *testing.B) {
	for _, size := range []int{1 << 10, 32 << 10, 1 << 20} {
		body := []byte(`{"model":"llama","stream":true,"max_tokens":200,"messages":[{"role":"system","content":"you are helpful"},{"role":"user","content":"` +
			strings.Repeat("lorem ipsum dolor sit amet ", size/27) + `"}]}`)
		b.Run(humanSize(size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			rd := bytes.NewReader(body)
			req := httptest.NewRequest(http.MethodPost, "/", nil)
			var f Features
			for b.Loop() {
				rd.Reset(body)
				req.Body, req.ContentLength = io.NopCloser(rd), int64(len(body))
				ExtractFeatures(req, DefaultFeatureConfig, &f)
			}
		})
	}
}

func humanSize(n int) string {
	if n >= 1<<20 {
		return strconv.Itoa(n>>20) + "MiB"
	}
	return strconv.Itoa(n>>10) + "KiB"
}

type runtimeMem struct{ total uint64 }

func (m *runtimeMem) read() {
	var st runtime.MemStats
	runtime.ReadMemStats(&st)
	m.total = st.TotalAlloc
}
