package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/internal/harness"
)

// TestDemoRuns runs the demo for a few seconds and checks that requests were
// served and spread over the pool.
func TestDemoRuns(t *testing.T) {
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	admin, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	dist, err := run(context.Background(), options{
		speeds: []float64{1, 1, 0.6, 0.3}, port: port, admin: fmt.Sprintf("localhost:%d", admin),
		duration: 4 * time.Second, load: 0.5, out: &out,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(out.String())
	total, used := 0, 0
	for _, n := range dist {
		total += n
		if n > 0 {
			used++
		}
	}
	if total < 10 || used < 2 || !strings.Contains(out.String(), "Request Distribution Active") || !strings.Contains(out.String(), "Summary:") {
		t.Fatalf("distribution %v (%d served by %d servers); want a non-empty distribution over several servers", dist, total, used)
	}
	if !strings.Contains(out.String(), "engine: ") || !strings.Contains(out.String(), "mean latency") {
		t.Fatalf("the table lacks what the admin API reports (engine queue, latency):\n%s", out.String())
	}
	if !strings.Contains(out.String(), " 0 failed") {
		t.Fatalf("the demo saw failed requests:\n%s", out.String())
	}
}
