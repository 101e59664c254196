package healthcheck

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aibalance/caddy-aibalance/aibalance"
)

func testBreaker(t *testing.T, name ...string) (*Breaker, *aibalance.HealthConfig) {
	t.Helper()
	var set aibalance.BackendSet
	t.Cleanup(set.Release)
	b := set.Get("breaker-test-" + t.Name() + strings.Join(name, ""))
	c := aibalance.HealthConfig{}.WithDefaults()
	return For(b), &c
}

var (
	ok500    = aibalance.Outcome{Status: 500}
	ok200    = aibalance.Outcome{Status: 200}
	dialFail = aibalance.Outcome{DialError: true}
)

func TestBreakerOpensOnConsecutiveFailures(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	for i := 0; i < c.ConsecutiveFailures-1; i++ {
		br.Record(ok500, false, now, c, nil)
	}
	if !br.Allow(now, c) {
		t.Fatalf("open after %d failures, want %d", c.ConsecutiveFailures-1, c.ConsecutiveFailures)
	}
	br.Record(ok200, false, now, c, nil) // a success breaks the run
	for i := 0; i < c.ConsecutiveFailures-1; i++ {
		br.Record(ok500, false, now, c, nil)
	}
	if !br.Allow(now, c) {
		t.Fatal("a success did not reset the run of failures")
	}
	br.Record(ok500, false, now, c, nil)
	if br.Allow(now, c) || br.Status(now).State != Open {
		t.Fatalf("not open after %d failures in a row: %+v", c.ConsecutiveFailures, br.Status(now))
	}
	if until := br.Status(now).Until; until.Sub(now) != time.Duration(c.OpenDuration) {
		t.Fatalf("open for %s, want %s", until.Sub(now), time.Duration(c.OpenDuration))
	}
}

func TestBreakerNeutralOutcomes(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	for _, o := range []aibalance.Outcome{
		{Status: 429}, {Status: 503}, {Status: 400}, {Status: 404},
		{Canceled: true}, {Status: 200, Canceled: true},
	} {
		for i := 0; i < 10; i++ {
			br.Record(o, false, now, c, nil)
		}
	}
	if st := br.Status(now); st.State != Closed {
		t.Fatalf("cooldowns, bad requests and cancellations opened the breaker: %+v", st)
	}
	// a cut stream is the backend's fault, even when the client then left
	for i := 0; i < c.ConsecutiveFailures; i++ {
		br.Record(aibalance.Outcome{Status: 200, StreamError: true, Canceled: true}, false, now, c, nil)
	}
	if br.Status(now).State != Open {
		t.Fatal("cut streams did not open the breaker")
	}
}

func TestBreakerDialErrorOpensAtOnce(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	br.Record(dialFail, false, now, c, nil)
	if st := br.Status(now); st.State != Open {
		t.Fatalf("a refused connection left the breaker %+v", st)
	}
}

func TestBreakerOpensOnFailureRatio(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	// 30% errors, never two in a row: only the ratio can open it
	for i := 0; i < 30 && br.Status(now).State == Closed; i++ {
		o := ok200
		if i%10 == 0 || i%10 == 3 || i%10 == 6 {
			o = ok500
		}
		br.Record(o, false, now, c, nil)
		now = now.Add(100 * time.Millisecond)
	}
	if st := br.Status(now); st.State != Open {
		t.Fatalf("30%% errors over %s did not open it: %+v", time.Duration(c.FailureWindow), st)
	}
	// the same failures spread beyond the window are forgotten
	br2, _ := testBreaker(t, "trickle")
	now = time.Unix(5000, 0)
	for i := 0; i < 40; i++ {
		o := ok200
		if i%4 == 0 {
			o = ok500
		}
		br2.Record(o, false, now, c, nil)
		now = now.Add(2 * time.Second) // 5 per window: fewer than min_requests
	}
	if st := br2.Status(now); st.State != Closed {
		t.Fatalf("a trickle of failures below min_requests per window opened it: %+v", st)
	}
}

func TestBreakerHalfOpenProbesAndClose(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	br.Record(dialFail, false, now, c, nil)
	if ok, _ := br.Probe(now, c, nil); ok {
		t.Fatal("an open breaker gave a probe before its time")
	}
	now = now.Add(time.Duration(c.OpenDuration))
	if !br.Allow(now, c) {
		t.Fatal("open time over: want probes allowed")
	}
	ok, probe := br.Probe(now, c, nil)
	if !ok || !probe || br.Status(now).State != HalfOpen {
		t.Fatalf("probe %v/%v, state %s", ok, probe, br.Status(now).State)
	}
	if ok, _ := br.Probe(now, c, nil); ok || br.Allow(now, c) {
		t.Fatalf("a second probe was let in with half_open_probes %d", c.HalfOpenProbes)
	}
	br.Record(ok200, true, now, c, nil)
	if st := br.Status(now); st.State != HalfOpen {
		t.Fatalf("closed after 1 success, want %d: %+v", c.CloseAfter, st)
	}
	_, probe = br.Probe(now, c, nil)
	br.Record(ok200, probe, now, c, nil)
	if st := br.Status(now); st.State != Closed {
		t.Fatalf("not closed after %d successes: %+v", c.CloseAfter, st)
	}
	if r := br.backend.Ramp(now.Add(time.Second), time.Duration(c.SlowStart), c.SlowStartMin); r >= 0.5 {
		t.Fatalf("closing did not start the slow start: ramp %.2f a second later", r)
	}
}

func TestBreakerReopenBacksOff(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	br.Record(dialFail, false, now, c, nil)
	want := time.Duration(c.OpenDuration)
	for i := 0; i < 6; i++ {
		now = br.Status(now).Until
		_, probe := br.Probe(now, c, nil)
		if !probe {
			t.Fatalf("round %d: no probe at the end of the open time", i)
		}
		br.Record(ok500, true, now, c, nil)
		want = min(2*want, time.Duration(c.MaxOpenDuration))
		if got := br.Status(now).Until.Sub(now); got != want {
			t.Fatalf("round %d: reopened for %s, want %s", i, got, want)
		}
	}
}

// TestBreakerStragglers: an attempt sent before the breaker opened that
// ends while it is open says nothing of the backend now.
func TestBreakerStragglers(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	br.Record(dialFail, false, now, c, nil)
	for i := 0; i < 5; i++ {
		br.Record(ok200, false, now.Add(time.Second), c, nil)
	}
	if st := br.Status(now.Add(time.Second)); st.State != Open {
		t.Fatalf("successes of old attempts closed an open breaker: %+v", st)
	}
}

func TestBreakerConcurrent(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				at := now.Add(time.Duration(i) * time.Millisecond)
				ok, probe := br.Probe(at, c, nil)
				if !ok {
					continue
				}
				o := ok200
				if (i+g)%7 == 0 {
					o = ok500
				}
				br.Record(o, probe, at, c, nil)
				_ = br.Status(at)
			}
		}(g)
	}
	wg.Wait()
	if p := br.probes.Load(); p < 0 || int(p) > c.HalfOpenProbes {
		t.Fatalf("probes in flight %d after every attempt ended", p)
	}
}

// TestBreakerLostProbe: a probe claimed for a request whose attempt never
// reported does not keep the breaker half-open for ever.
func TestBreakerLostProbe(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	br.Record(dialFail, false, now, c, nil)
	now = br.Status(now).Until
	if _, probe := br.Probe(now, c, nil); !probe {
		t.Fatal("no probe")
	}
	if ok, _ := br.Probe(now.Add(time.Second), c, nil); ok {
		t.Fatal("a second probe while the first runs")
	}
	later := now.Add(probeLost + time.Second)
	ok, probe := br.Probe(later, c, nil)
	if !ok || !probe {
		t.Fatal("a lost probe kept the breaker half-open")
	}
	br.Record(ok200, true, later, c, nil)
	br.Record(ok200, true, later, c, nil) // the lost one reports after all
	if p := br.probes.Load(); p < 0 {
		t.Fatalf("probes in flight %d", p)
	}
}

// TestBreakerEngineSignals: the scraper's "refused" opens the breaker and
// keeps it open while it lasts; its "answers again" lets probes in at once,
// but only for a breaker opened because the engine was unreachable.
func TestBreakerEngineSignals(t *testing.T) {
	br, c := testBreaker(t)
	now := time.Unix(1000, 0)
	br.Record(ok200, false, now, c, nil)
	br.EngineDown(now, "refused", nil)
	if st := br.Status(now); st.State != Open || !strings.Contains(st.Reason, "refused") {
		t.Fatalf("engine down: %+v", st)
	}
	// still down when the open time ends: no probes
	later := now.Add(time.Duration(c.OpenDuration) - time.Second)
	br.EngineDown(later, "refused", nil)
	if br.Allow(now.Add(time.Duration(c.OpenDuration)+time.Second), c) {
		t.Fatal("probes allowed while the scraper says the engine is down")
	}
	back := later.Add(500 * time.Millisecond)
	br.EngineUp(back, nil)
	if !br.Allow(back, c) {
		t.Fatal("the engine answers again but no probe is allowed")
	}

	// a breaker opened by 500s is not reopened by the scraper
	br2, _ := testBreaker(t, "500s")
	for i := 0; i < c.ConsecutiveFailures; i++ {
		br2.Record(ok500, false, now, c, nil)
	}
	br2.EngineUp(now.Add(time.Second), nil)
	if br2.Allow(now.Add(time.Second), c) {
		t.Fatal("a scrape ended the open time of a breaker opened by 500s")
	}
}
