package aicaddyfile_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/aibalance/caddy-aibalance"
)

var update = flag.Bool("update", false, "rewrite the golden files from the adapter's output")

func adapt(t *testing.T, caddyfile string) ([]byte, error) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

func sameJSON(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

// TestExamples adapts every examples/*/Caddyfile and compares the result
// with the caddy.json beside it.
func TestExamples(t *testing.T) {
	files, _ := filepath.Glob("../examples/*/Caddyfile")
	if len(files) < 4 {
		t.Fatalf("found %d example Caddyfiles", len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(filepath.Dir(f)), func(t *testing.T) {
			in, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			got, err := adapt(t, string(in))
			if err != nil {
				t.Fatalf("adapting %s: %v", f, err)
			}
			golden := filepath.Join(filepath.Dir(f), "caddy.json")
			if *update {
				_ = os.WriteFile(golden, got, 0o644)
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			if !sameJSON(got, want) {
				t.Fatalf("%s adapts to\n%s\nbut %s says\n%s", f, got, golden, want)
			}
		})
	}
}

// TestAdaptGolden runs testdata/*.caddyfiletest: a Caddyfile, a line of
// dashes, then the JSON it adapts to, or "error: <text the error contains>".
func TestAdaptGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.caddyfiletest")
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	dashes := regexp.MustCompile(`(?m)^-{4,}\s*$`)
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".caddyfiletest"), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			parts := dashes.Split(string(raw), 2)
			if len(parts) != 2 {
				t.Fatalf("%s: no line of dashes", f)
			}
			want := strings.TrimSpace(parts[1])
			got, err := adapt(t, parts[0])
			if wantErr, ok := strings.CutPrefix(want, "error: "); ok {
				if err == nil || !strings.Contains(err.Error(), wantErr) {
					t.Fatalf("got error %v, want one containing %q", err, wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if *update {
				_ = os.WriteFile(f, []byte(strings.TrimRight(parts[0], "\n")+"\n----------\n"+string(got)), 0o644)
				return
			}
			if !sameJSON(got, []byte(want)) {
				t.Fatalf("adapted to\n%s\nwant\n%s", got, want)
			}
		})
	}
}

// TestReadmeBlocks adapts every ```caddyfile block of the README and
// SECURITY.md, so the docs cannot rot.
func TestReadmeBlocks(t *testing.T) {
	var readme []byte
	for _, doc := range []string{"../README.md", "../SECURITY.md"} {
		b, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		readme = append(readme, b...)
	}
	blocks := regexp.MustCompile("(?s)```caddyfile\n(.*?)```").FindAllStringSubmatch(string(readme), -1)
	if len(blocks) < 3 {
		t.Fatalf("found %d caddyfile blocks in the README", len(blocks))
	}
	for i, b := range blocks {
		if _, err := adapt(t, b[1]); err != nil {
			t.Errorf("README caddyfile block %d does not adapt: %v\n%s", i+1, err, b[1])
		}
	}
}
