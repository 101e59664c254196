package llmsim

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// SideTraffic is the traffic a real deployment sends through an LLM gateway
// besides completions: readiness probes (GET /health), clients listing
// models (GET /v1/models) and the odd malformed request. Benchmarks send it
// alongside a Workload so that the balancer sees it, without counting it in
// the latency figures.
type SideTraffic struct {
	BaseURL string // the gateway, e.g. http://127.0.0.1:8080
	// Before is how many probes and how many model listings are sent, one
	// after the other, by Start before it returns (a client getting ready).
	Before int
	// ProbeEvery is the readiness probe period; 0: none during the run.
	ProbeEvery time.Duration
	// ModelsEvery is the GET /v1/models period; 0: none during the run.
	ModelsEvery time.Duration
	// Malformed is how many broken POSTs to /v1/chat/completions (bad JSON,
	// an empty body) are spread over the run; each should get a 4xx.
	Malformed int
	Client    *http.Client
}

// SideStats counts side requests and the answers that were not what a
// healthy deployment gives: a non-2xx to a probe or listing, anything but a
// 4xx to a malformed request, and transport errors.
type SideStats struct {
	Probes, Models, Malformed int
	Unexpected                int
	Notes                     []string // the first few unexpected answers
}

func (s *SideStats) add(kind string, status int, err error) {
	switch kind {
	case "probe":
		s.Probes++
	case "models":
		s.Models++
	default:
		s.Malformed++
	}
	ok := err == nil && status/100 == 2
	if kind == "malformed" {
		ok = err == nil && status/100 == 4
	}
	if ok {
		return
	}
	s.Unexpected++
	if len(s.Notes) < 5 {
		note := kind + ": "
		if err != nil {
			note += err.Error()
		} else {
			note += http.StatusText(status)
		}
		s.Notes = append(s.Notes, note)
	}
}

var malformedBodies = []string{`{"model": "x", "messages": [`, ``, `{"messages": "not a list"`}

// Start sends the Before requests sequentially, then runs the periodic side
// traffic for duration (or until ctx ends) in the background. Wait returns
// the counts once it has stopped.
func (t SideTraffic) Start(ctx context.Context, duration time.Duration) *SideRun {
	client := t.Client
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	run := &SideRun{done: make(chan struct{})}
	send := func(kind string, i int) {
		var status int
		var err error
		switch kind {
		case "probe":
			status, err = do(ctx, client, http.MethodGet, t.BaseURL+"/health", "")
		case "models":
			status, err = do(ctx, client, http.MethodGet, t.BaseURL+"/v1/models", "")
		default:
			status, err = do(ctx, client, http.MethodPost, t.BaseURL+"/v1/chat/completions", malformedBodies[i%len(malformedBodies)])
		}
		if ctx.Err() != nil {
			return // the run was cut short: not the gateway's fault
		}
		run.mu.Lock()
		run.stats.add(kind, status, err)
		run.mu.Unlock()
	}
	for i := 0; i < t.Before; i++ {
		send("probe", i)
		send("models", i)
	}
	go func() {
		defer close(run.done)
		ctx, cancel := context.WithTimeout(ctx, duration)
		defer cancel()
		var wg sync.WaitGroup
		loop := func(kind string, every time.Duration, limit int) {
			defer wg.Done()
			if every <= 0 {
				return
			}
			tick := time.NewTicker(every)
			defer tick.Stop()
			for i := 0; i < limit; i++ {
				select {
				case <-tick.C:
					send(kind, i)
				case <-ctx.Done():
					return
				}
			}
		}
		wg.Add(2)
		go loop("probe", t.ProbeEvery, 1e6)
		go loop("models", t.ModelsEvery, 1e6)
		if t.Malformed > 0 {
			wg.Add(1)
			go loop("malformed", duration/time.Duration(t.Malformed+1), t.Malformed)
		}
		wg.Wait()
	}()
	return run
}

// SideRun is side traffic under way.
type SideRun struct {
	mu    sync.Mutex
	stats SideStats
	done  chan struct{}
}

// Wait waits for the side traffic to stop and returns its counts.
func (r *SideRun) Wait() SideStats {
	<-r.done
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats
}

func do(ctx context.Context, client *http.Client, method, url, body string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, nil
}
