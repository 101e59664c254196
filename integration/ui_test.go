package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/chromedp/chromedp"

	"github.com/aibalance/caddy-aibalance/aibalance"
	"github.com/aibalance/caddy-aibalance/llmsim"
)

// chromium finds Debian's chromium (.ci/run installs it); outside CI the
// browser test skips without it.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("CI must run the browser test: install Debian's chromium (apt-get install chromium)")
	}
	t.Skip("no chromium: apt-get install chromium (CI does)")
	return ""
}

// uiRow is one upstream as the dashboard shows it.
type uiRow struct {
	Address string  `json:"address"`
	State   string  `json:"state"`
	Share   float64 `json:"share"`
}

const readRows = `Array.from(document.querySelectorAll("tr[data-upstream]")).map(r => ({
	address: r.dataset.upstream,
	state: r.dataset.state,
	share: parseFloat(r.querySelector(".bar").dataset.share)}))`

// TestDashboardInBrowser loads the dashboard in headless Chromium, through
// the site handler (aibalance_ui behind a route), against a running Caddy
// with simulated engines: its bars and states match the admin API; a
// drain through the API shows on the page; a screenshot is saved.
func TestDashboardInBrowser(t *testing.T) {
	browser := chromium(t)
	tester := caddytest.NewTester(t)
	p := pool(t, llmsim.Config{}, llmsim.Config{}, llmsim.Config{Speed: 0.3})
	addrs := p.Addrs()
	t.Cleanup(func() {
		for _, a := range addrs {
			aibalance.SetOverride(a, func(o *aibalance.Override) { *o = aibalance.Override{} })
		}
	})
	listen := port(t)
	tester.InitServer(fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n\troute /lb/* {\n\t\taibalance_ui\n\t}\n\tai_proxy %s {\n\t\t%s\n\t}\n}", globals, listen, upstreams(p), upstreamHeader), "caddyfile")
	base := fmt.Sprintf("http://127.0.0.1:%d", listen)
	drive(t, base+"/v1/chat/completions", 60, 6, 8)

	// the admin route serves the same page and data to a client that
	// passes Caddy's origin check
	if status, body := adminGet(t, http.MethodGet, "/aibalance/ui/"); status != 200 || !strings.Contains(string(body), "<title>caddy-aibalance</title>") {
		t.Fatalf("admin /aibalance/ui/: %d", status)
	}
	if status, body := adminGet(t, http.MethodGet, "/aibalance/ui/data.json"); status != 200 || !strings.Contains(string(body), `"upstreams"`) {
		t.Fatalf("admin /aibalance/ui/data.json: %d %s", status, body)
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.WindowSize(1500, 700))
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelA()
	bctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	if _, err := chromedp.Run(bctx, chromedp.Navigate(base+"/lb/")); err != nil { // starts the browser: no timeout
		t.Fatalf("loading the dashboard: %v", err)
	}
	ctx, cancelT := context.WithTimeout(bctx, 60*time.Second)
	defer cancelT()
	ours, _ := json.Marshal(addrs)
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](string(ours)+`.every(a => document.querySelector('tr[data-upstream="' + a + '"]'))`, chromedp.WithPollingTimeout(20*time.Second))); err != nil {
		t.Fatalf("the dashboard shows no upstreams: %v", err)
	}
	rows, err := chromedp.Run(ctx, chromedp.Evaluate[[]uiRow](readRows))
	if err != nil {
		t.Fatalf("reading the page: %v", err)
	}
	view := adminJSON[aibalance.UpstreamsView](t, "/aibalance/upstreams")
	byAddr := map[string]aibalance.UpstreamView{}
	for _, u := range view.Upstreams {
		byAddr[u.Address] = u
	}
	total := 0.0
	for _, r := range rows {
		if !slices.Contains(addrs, r.Address) {
			continue // another test's backend, still in the process
		}
		u, ok := byAddr[r.Address]
		if !ok || r.State != u.State || math.Abs(r.Share-u.RecentShare) > 0.05 {
			t.Fatalf("page row %+v, admin API: state %q share %.3f", r, u.State, u.RecentShare)
		}
		total += r.Share
	}
	if math.Abs(total-1) > 0.02 {
		t.Fatalf("the bars add up to %.2f: %+v", total, rows)
	}
	t.Logf("dashboard rows: %+v", rows)

	drained := addrs[2]
	if status, body := adminSend(t, http.MethodPatch, "/aibalance/upstreams/"+drained, `{"drain": true}`); status != 200 {
		t.Fatalf("drain: %d %s", status, body)
	}
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](fmt.Sprintf(`document.querySelector('tr[data-upstream=%q]').dataset.state === "drained"`, drained), chromedp.WithPollingTimeout(10*time.Second))); err != nil {
		t.Fatalf("the page did not show the drain: %v", err)
	}
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	shot := filepath.Join(t.TempDir(), "dashboard.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	if out := os.Getenv("AIBALANCE_SCREENSHOT"); out != "" {
		_ = os.WriteFile(out, png, 0o644)
	}
	t.Logf("the page shows %s drained; screenshot %s (%d bytes)", drained, shot, len(png))
}
