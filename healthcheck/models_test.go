package healthcheck

import (
	"errors"
	"strings"
	"testing"
)

func TestParseModels(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		want       map[string]int
		noList     bool
	}{
		{"vllm with a LoRA adapter", `{"object":"list","data":[
			{"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","created":1,"owned_by":"vllm","root":"meta-llama/Llama-3.1-8B-Instruct","parent":null,"max_model_len":131072},
			{"id":"sql-lora","object":"model","root":"/adapters/sql","parent":"meta-llama/Llama-3.1-8B-Instruct","max_model_len":131072}]}`,
			map[string]int{"meta-llama/Llama-3.1-8B-Instruct": 131072, "sql-lora": 131072}, false},
		{"no context length (TGI, llama.cpp)", `{"object":"list","data":[{"id":"tgi","object":"model","owned_by":"x"}]}`, map[string]int{"tgi": 0}, false},
		{"context_length", `{"data":[{"id":"m","context_length":4096}]}`, map[string]int{"m": 4096}, false},
		{"absurd lengths ignored", `{"data":[{"id":"m","max_model_len":-5},{"id":"n","max_model_len":1e300}]}`, map[string]int{"m": 0, "n": 0}, false},
		{"empty ids skipped", `{"data":[{"id":""},{"id":"x"}]}`, map[string]int{"x": 0}, false},
		{"empty list", `{"data":[]}`, map[string]int{}, false},
		{"not a list", `{"models":["a"]}`, nil, true},
		{"not JSON", `<html>404</html>`, nil, true},
		{"wrong types", `{"data":[{"id":5}]}`, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := ParseModels(strings.NewReader(tc.body), 1<<20)
			if tc.noList {
				if !errors.Is(err, errNoModels) {
					t.Fatalf("got %v, %v; want errNoModels", m, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(m.Context) != len(tc.want) {
				t.Fatalf("got %v, want %v", m.Context, tc.want)
			}
			for k, v := range tc.want {
				if got, ok := m.Context[k]; !ok || got != v {
					t.Fatalf("got %v, want %v", m.Context, tc.want)
				}
			}
		})
	}
	if _, err := ParseModels(strings.NewReader(`{"data":[`+strings.Repeat(`{"id":"x"},`, 1000)+`{"id":"y"}]}`), 100); !errors.Is(err, errTooLarge) {
		t.Fatalf("a list over the limit: %v", err)
	}
}

func FuzzParseModels(f *testing.F) {
	f.Add(`{"data":[{"id":"m","max_model_len":8192}]}`)
	f.Add(`{"data":[{"id":"a"},{"id":"b","context_length":1e9}]}`)
	f.Add(`{"data":null}`)
	f.Add(`[]`)
	f.Fuzz(func(t *testing.T, body string) {
		m, err := ParseModels(strings.NewReader(body), 1<<16)
		if err != nil {
			return
		}
		if len(m.Context) > maxModels {
			t.Fatalf("%d models kept", len(m.Context))
		}
		for id, c := range m.Context {
			if id == "" || c < 0 {
				t.Fatalf("bad entry %q: %d", id, c)
			}
		}
	})
}
