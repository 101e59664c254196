package aicaddyfile

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// FuzzCaddyfile: any Caddyfile — seeded with every golden test's input,
// so ai_proxy, the policies, the transport, dynamic pools, the dashboard
// directive and the global option are all exercised — adapts to valid
// JSON or fails with an error; it never panics.
func FuzzCaddyfile(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.caddyfiletest")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		in, _, _ := strings.Cut(string(b), "\n----------\n")
		f.Add(in)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(in), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("adapted to invalid JSON: %s", out)
		}
	})
}
