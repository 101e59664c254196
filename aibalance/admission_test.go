package aibalance

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// testAdmission is an admission queue whose pool has free slots while
// free > 0 (each admission takes one), and drains rate per second.
func testAdmission(cfg *AdmissionConfig, free *int, mu *sync.Mutex, rate float64) *Admission {
	a := &Admission{}
	a.capacity = func(time.Time) int { mu.Lock(); defer mu.Unlock(); return *free }
	a.drain = func(time.Time) float64 { return rate }
	a.Configure(cfg)
	return a
}

func keyed(key string, prio string) *http.Request {
	r := httptest.NewRequest("POST", "/v1/chat/completions", nil)
	r.Header.Set("Authorization", "Bearer "+key)
	if prio != "" {
		r.Header.Set("X-Priority", prio)
	}
	return r
}

// TestAdmissionFairOrder queues 3 requests of key a, 1 of key b and one
// high-priority request of key c while the pool is full, then frees one
// slot at a time: c goes first (priority), then a and b alternate
// (fair between keys) although a's three came first.
func TestAdmissionFairOrder(t *testing.T) {
	var mu sync.Mutex
	free := 0
	a := testAdmission(nil, &free, &mu, 0)
	var order []string
	var omu sync.Mutex
	var wg sync.WaitGroup
	enqueue := func(name, key, prio string) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tk, rej := a.Wait(context.Background(), keyed(key, prio), nil, time.Now())
			if rej != nil || tk == nil {
				t.Errorf("%s: not admitted: %+v", name, rej)
				return
			}
			omu.Lock()
			order = append(order, name)
			omu.Unlock()
			mu.Lock()
			free-- // it took the slot
			mu.Unlock()
			tk.Began(time.Now())
		}()
	}
	waitQueued := func(n int64) {
		for deadline := time.Now().Add(5 * time.Second); a.Queued() != n; {
			if time.Now().After(deadline) {
				t.Fatalf("queued %d, want %d", a.Queued(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	enqueue("a1", "a", "")
	waitQueued(1)
	enqueue("a2", "a", "")
	waitQueued(2)
	enqueue("a3", "a", "")
	waitQueued(3)
	enqueue("b1", "b", "")
	waitQueued(4)
	enqueue("c1", "c", "5")
	waitQueued(5)
	for i := 0; i < 5; i++ {
		mu.Lock()
		free = 1
		mu.Unlock()
		a.Kick(time.Now())
		waitQueued(int64(4 - i))
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			omu.Lock()
			n := len(order)
			omu.Unlock()
			if n == i+1 || time.Now().After(deadline) {
				break
			}
		}
	}
	wg.Wait()
	want := []string{"c1", "a1", "b1", "a2", "a3"}
	if len(order) != len(want) {
		t.Fatalf("order %v, want %v", order, want)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("order %v, want %v", order, want)
		}
	}
	st := a.Stats(time.Now())
	if st.Admitted != 5 || st.Queued != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestAdmissionBounds: a full queue and a wait past max_wait are answered
// 429 with a Retry-After from the drain rate; a canceled waiter leaves.
func TestAdmissionBounds(t *testing.T) {
	var mu sync.Mutex
	free := 0
	a := testAdmission(&AdmissionConfig{MaxQueue: 2, MaxWait: caddy.Duration(50 * time.Millisecond)}, &free, &mu, 0)
	// waits max_wait, then 429
	tk, rej := a.Wait(context.Background(), keyed("a", ""), nil, time.Now())
	if tk != nil || rej == nil || rej.Status != http.StatusTooManyRequests || rej.RetryAfter < time.Second {
		t.Fatalf("timed out: ticket %v, reject %+v", tk, rej)
	}
	// canceled: nil, nil
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if tk, rej := a.Wait(ctx, keyed("a", ""), nil, time.Now()); tk != nil || rej != nil {
		t.Fatalf("canceled: %v %+v", tk, rej)
	}
	// full: two waiters hold the queue, the third is refused at once
	a.Configure(&AdmissionConfig{MaxQueue: 2, MaxWait: caddy.Duration(time.Minute)})
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	for range 2 {
		go a.Wait(ctx, keyed("a", ""), nil, time.Now())
	}
	for deadline := time.Now().Add(5 * time.Second); a.Queued() != 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("waiters did not queue")
		}
	}
	start := time.Now()
	tk, rej = a.Wait(context.Background(), keyed("b", ""), nil, time.Now())
	if tk != nil || rej == nil || rej.Code != "server_overloaded" || time.Since(start) > 5*time.Second {
		t.Fatalf("full: %v %+v", tk, rej)
	}
	st := a.Stats(time.Now())
	if st.TimedOut != 1 || st.Canceled != 1 || st.Overloaded != 1 {
		t.Fatalf("stats %+v", st)
	}
	cancel()
	for deadline := time.Now().Add(5 * time.Second); a.Queued() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("canceled waiters stayed queued")
		}
	}
}

// TestAdmissionPredictedWait: with a queue ahead and a drain rate that
// predicts a wait past half of max_wait (the margin), a request is
// answered at once, told to come back after the predicted wait.
func TestAdmissionPredictedWait(t *testing.T) {
	var mu sync.Mutex
	free := 0
	a := testAdmission(&AdmissionConfig{MaxWait: caddy.Duration(7 * time.Second)}, &free, &mu, 1) // 1 request/s
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for range 3 {
		go a.Wait(ctx, keyed("a", ""), nil, time.Now())
	}
	for deadline := time.Now().Add(5 * time.Second); a.Queued() != 3; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("waiters did not queue")
		}
	}
	tk, rej := a.Wait(context.Background(), keyed("b", ""), nil, time.Now())
	if tk != nil || rej == nil || rej.RetryAfter != 4*time.Second {
		t.Fatalf("predicted: %v %+v (want Retry-After 4s: 4 requests at 1/s)", tk, rej)
	}
}

func TestPriorityHeader(t *testing.T) {
	for _, c := range []struct {
		v    string
		want int
	}{{"", 0}, {"3", 3}, {" -2 ", -2}, {"x", 0}, {"99999", maxPriority}, {"-99999", -maxPriority}} {
		r := keyed("k", c.v)
		if got := Priority(r, ""); got != c.want {
			t.Errorf("X-Priority %q: %d, want %d", c.v, got, c.want)
		}
	}
	if Priority(keyed("k", "5"), "-") != 0 {
		t.Error("priority_header off still reads X-Priority")
	}
}

func TestRequestKeys(t *testing.T) {
	r := httptest.NewRequest("POST", "/v1/chat/completions", nil)
	r.RemoteAddr = "10.1.2.3:5555"
	if got := (*KeySpec)(nil).Of(r, nil); got != "10.1.2.3" {
		t.Errorf("no key: %q, want the client address", got)
	}
	r.Header.Set("X-Api-Key", "sk-ant")
	if got := (*KeySpec)(nil).Of(r, nil); got != "sk-ant" {
		t.Errorf("x-api-key: %q", got)
	}
	r.Header.Set("Authorization", "Bearer sk-1")
	if got := (*KeySpec)(nil).Of(r, nil); got != "sk-1" {
		t.Errorf("bearer: %q", got)
	}
	if got := (&KeySpec{Source: "user"}).Of(r, &Features{User: "u1"}); got != "u1" {
		t.Errorf("user: %q", got)
	}
	r.Header.Set("X-Tenant", "t9")
	if got := (&KeySpec{Source: "header", Header: "X-Tenant"}).Of(r, nil); got != "t9" {
		t.Errorf("header: %q", got)
	}
	for _, bad := range []*KeySpec{{Source: "header"}, {Source: "ip", Header: "x"}, {Source: "cookie"}} {
		if bad.Check() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// TestAdmissionPriorityEvicts: a full queue makes room for a request of
// higher priority by turning away its newest lowest-priority waiter; a
// request of the same priority is refused instead.
func TestAdmissionPriorityEvicts(t *testing.T) {
	var mu sync.Mutex
	free := 0
	a := testAdmission(&AdmissionConfig{MaxQueue: 2, MaxWait: caddy.Duration(time.Minute)}, &free, &mu, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	results := make(chan *Reject, 3)
	for _, k := range []string{"low1", "low2"} {
		go func() {
			_, rej := a.Wait(ctx, keyed(k, "-1"), nil, time.Now())
			results <- rej
		}()
		for deadline := time.Now().Add(5 * time.Second); a.Queued() < map[string]int64{"low1": 1, "low2": 2}[k]; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("waiters did not queue")
			}
		}
	}
	// same priority as the waiters: refused
	if _, rej := a.Wait(ctx, keyed("other", "-1"), nil, time.Now()); rej == nil || rej.Code != "server_overloaded" {
		t.Fatalf("same priority into a full queue: %+v", rej)
	}
	// higher: low2 (the newest) leaves, the new one waits
	go func() {
		_, rej := a.Wait(ctx, keyed("vip", "5"), nil, time.Now())
		results <- rej
	}()
	select {
	case rej := <-results:
		if rej == nil || rej.Status != http.StatusTooManyRequests {
			t.Fatalf("evicted waiter got %+v", rej)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no waiter was evicted")
	}
	if a.Queued() != 2 {
		t.Fatalf("queued %d after the eviction, want 2", a.Queued())
	}
	mu.Lock()
	free = 1
	mu.Unlock()
	a.Kick(time.Now())
	// the vip goes first
	select {
	case rej := <-results:
		if rej != nil {
			t.Fatalf("after a free slot: %+v", rej)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nobody admitted")
	}
	a.mu.Lock()
	left := ""
	for _, fl := range a.flows {
		left = fmt.Sprint(fl.prio)
	}
	a.mu.Unlock()
	if left != "-1" {
		t.Fatalf("the waiter left is of priority %s, want the low one (-1)", left)
	}
}
