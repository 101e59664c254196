package aicaddyfile_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// validate adapts a Caddyfile site block and runs caddy.Validate on it (what
// `caddy validate` does: every module provisioned, nothing started), with
// the default log written to a file. It returns the log and Validate's
// error.
func validate(t *testing.T, site string) (string, error) {
	t.Helper()
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	out, err := adapt(t, fmt.Sprintf("{\n\tadmin off\n\tlog {\n\t\toutput file %s\n\t\tformat json\n\t\tlevel WARN\n\t}\n}\n%s", logFile, site))
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	var cfg caddy.Config
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	verr := caddy.Validate(&cfg)
	log, _ := os.ReadFile(logFile)
	return string(log), verr
}

// TestValidateWeights: a hand-written reverse_proxy's policy cannot see the
// upstreams while parsing, so its weights are checked at Provision.
func TestValidateWeights(t *testing.T) {
	for _, tc := range []struct {
		name, policy, upstreams, want string
	}{
		{"too many", "ai_predictive {\n\t\t\tweights 1 2 3\n\t\t}", "127.0.0.1:1 127.0.0.1:2", "ai_predictive: 3 weights for 2 upstreams"},
		{"least_tokens too many", "least_tokens 1 2 3", "127.0.0.1:1 127.0.0.1:2", "least_tokens: 3 weights for 2 upstreams"},
		{"wlc too many", "weighted_least_conn 1 2 3", "127.0.0.1:1", "weighted_least_conn: 3 weights for 1 upstreams"},
		{"fewer is fine", "ai_predictive {\n\t\t\tweights 2\n\t\t}", "127.0.0.1:1 127.0.0.1:2", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := validate(t, fmt.Sprintf(`:0 {
	reverse_proxy %s {
		lb_policy %s
		transport aibalance {
			engine none
		}
	}
}`, tc.upstreams, tc.policy))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("validate: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("validate: got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// TestValidateWarnsWithoutTransport: a learning policy without transport
// aibalance says so where `caddy validate` shows it; with it, it does not.
func TestValidateWarnsWithoutTransport(t *testing.T) {
	for _, tc := range []struct {
		name, block string
		warn        bool
	}{
		{"default transport", "lb_policy ai_predictive", true},
		{"http transport", "lb_policy least_tokens\n\t\ttransport http", true},
		{"aibalance", "lb_policy ai_predictive\n\t\ttransport aibalance {\n\t\t\tengine none\n\t\t}", false},
		{"weighted_least_conn needs none", "lb_policy weighted_least_conn 1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log, err := validate(t, fmt.Sprintf(":0 {\n\treverse_proxy 127.0.0.1:1 {\n\t\t%s\n\t}\n}", tc.block))
			if err != nil {
				t.Fatalf("validate: %v", err)
			}
			if tc.warn {
				t.Log(log)
			}
			if got := strings.Contains(log, "cannot learn without transport aibalance"); got != tc.warn {
				t.Fatalf("warned %v, want %v; log:\n%s", got, tc.warn, log)
			}
		})
	}
}
