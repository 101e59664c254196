package aibalance

import (
	"math"
	"testing"
	"time"
)

func work(stream bool) *Features {
	return &Features{API: APIChat, Parsed: true, Stream: stream, PromptTokens: 100, OutputTokens: 50}
}

// TestSideTrafficTeachesNothing: probes, model listings and unknown shapes
// that answer in a millisecond count in flight but never train the model
// or the pool's prior, nor lower the failure rate.
func TestSideTrafficTeachesNothing(t *testing.T) {
	b := newBackend("side")
	var prior Prior
	now := time.Unix(1000, 0)
	for _, f := range []*Features{
		{API: APINone, OutputTokens: 256},                                // GET /v1/models, /health
		{API: APIChat, OutputTokens: 256},                                // a chat POST whose body was not JSON
		{API: APINone, Parsed: true, PromptTokens: 5, OutputTokens: 256}, // an unknown path with JSON
	} {
		a := b.Begin(f, &prior, now)
		if in, _ := b.Inflight(); in != 1 {
			t.Fatalf("side request not counted in flight: %d", in)
		}
		a.End(Outcome{Status: 200, E2E: time.Millisecond, TTFT: time.Millisecond, OutputTokens: 0}, 0.99, &prior, now)
	}
	if n := b.Model().Stats().Samples; n != 0 {
		t.Fatalf("side traffic trained the model: %d samples", n)
	}
	if prior.ttft.Load() != 0 || prior.tpot.Load() != 0 {
		t.Fatal("side traffic moved the pool's prior")
	}
	// a real request does train it
	a := b.Begin(work(true), &prior, now)
	a.FirstToken(time.Now())
	a.End(Outcome{Status: 200, Stream: true, TTFT: 50 * time.Millisecond, E2E: time.Second, OutputTokens: 50}, 0.99, &prior, now)
	if n := b.Model().Stats().Samples; n != 1 || prior.ttft.Load() == 0 {
		t.Fatalf("LLM work did not train: %d samples", n)
	}
}

// TestPendingAgeDoesNotOverflow: the sum of many pending start times once
// overflowed an int64 at six requests.
func TestPendingAgeDoesNotOverflow(t *testing.T) {
	b := newBackend("overflow")
	var prior Prior
	now := time.Now()
	var atts []Attempt
	for i := 0; i < 1000; i++ {
		atts = append(atts, b.Begin(work(true), &prior, now.Add(-time.Duration(i)*time.Millisecond)))
	}
	s := b.State(now)
	if s.Pending != 1000 || s.PendingAge < 0.4 || s.PendingAge > 0.6 {
		t.Fatalf("1000 pending streams, mean age %.3fs (want ~0.5s)", s.PendingAge)
	}
	p := b.Model().Predict(s, 100, 100, &prior, now)
	if p.TTFT <= 0 || p.TTFT > time.Hour {
		t.Fatalf("predicted TTFT %v", p.TTFT)
	}
	for i := range atts {
		atts[i].End(Outcome{Canceled: true}, 0.99, &prior, now)
	}
	if st := b.Stats(); st.Pending != 0 || st.Inflight != 0 {
		t.Fatalf("left %d pending, %d in flight", st.Pending, st.Inflight)
	}
}

// TestNonStreamingIsNotPending: a non-streaming request shows no first
// token, so it never counts as pending, and its completion time trains the
// model.
func TestNonStreamingIsNotPending(t *testing.T) {
	b := newBackend("nonstream")
	var prior Prior
	now := time.Unix(1000, 0)
	a := b.Begin(work(false), &prior, now)
	if s := b.State(now); s.Pending != 0 || s.Running != 1 {
		t.Fatalf("a non-streaming request in flight: pending %v running %v", s.Pending, s.Running)
	}
	a.End(Outcome{Status: 200, E2E: 2 * time.Second, OutputTokens: 100}, 0.99, &prior, now)
	if n := b.Model().Stats().Samples; n != 1 {
		t.Fatalf("the answer did not train the model: %d", n)
	}
	// an answer without usage (output unknown) teaches nothing
	a = b.Begin(work(false), &prior, now)
	a.End(Outcome{Status: 200, E2E: time.Second, OutputTokens: -1}, 0.99, &prior, now)
	if n := b.Model().Stats().Samples; n != 1 {
		t.Fatalf("an answer of unknown length trained the model: %d", n)
	}
}

// TestNonStreamingLearnsItsSpeed: trained on completion times alone, the
// joint fit tells a slow backend from a fast one, for any output length.
func TestNonStreamingLearnsItsSpeed(t *testing.T) {
	var prior Prior
	now := time.Unix(1000, 0)
	fast, slow := newBackend("f"), newBackend("s")
	for i := 0; i < 200; i++ {
		out := 20 + (i*37)%400
		for _, c := range []struct {
			b     *Backend
			speed float64
		}{{fast, 1}, {slow, 0.3}} {
			e2e := (0.05 + 0.01*float64(out-1)) / c.speed
			a := c.b.Begin(work(false), &prior, now)
			a.End(Outcome{Status: 200, E2E: secondsToDuration(e2e), OutputTokens: out}, 0.99, &prior, now)
		}
	}
	for _, out := range []int{10, 500} {
		pf := fast.Model().Predict(LoadState{}, 100, out, &prior, now).E2E.Seconds()
		ps := slow.Model().Predict(LoadState{}, 100, out, &prior, now).E2E.Seconds()
		want := 0.05 + 0.01*float64(out-1)
		if math.Abs(pf-want)/want > 0.25 || math.Abs(ps-want/0.3)/(want/0.3) > 0.25 {
			t.Fatalf("output %d: predicted fast %.2fs slow %.2fs, true %.2fs and %.2fs", out, pf, ps, want, want/0.3)
		}
	}
}

// TestFailuresCount: fast failures raise the failure rate at once, client
// cancellations and 4xx do not, and the rate is forgiven with time.
func TestFailuresCount(t *testing.T) {
	var prior Prior
	now := time.Unix(1000, 0)
	for _, tc := range []struct {
		name string
		o    Outcome
		fail bool
	}{
		{"429", Outcome{Status: 429, RetryAfter: 5 * time.Second}, true},
		{"500", Outcome{Status: 500}, true},
		{"dial", Outcome{DialError: true}, true},
		{"timeout", Outcome{Timeout: true}, true},
		{"cut stream", Outcome{Status: 200, StreamError: true}, true},
		{"client cancel", Outcome{Canceled: true}, false},
		{"client cancel mid-stream", Outcome{Status: 200, Canceled: true}, false},
		{"400", Outcome{Status: 400}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBackend(tc.name)
			for i := 0; i < 5; i++ {
				a := b.Begin(work(true), &prior, now)
				a.End(tc.o, 0.99, &prior, now)
			}
			r := b.FailureRate(now)
			if tc.fail != (r > 0.5) {
				t.Fatalf("failure rate %.2f after 5 × %s", r, tc.name)
			}
			if tc.fail && b.FailureRate(now.Add(5*failureMemory)) > 0.05 {
				t.Fatal("failures never forgiven")
			}
		})
	}
}

// TestCooldownNeverShortened: a later, shorter Retry-After does not end a
// running cooldown.
func TestCooldownNeverShortened(t *testing.T) {
	var prior Prior
	b := newBackend("cool")
	now := time.Unix(1000, 0)
	a := b.Begin(work(true), &prior, now)
	a.End(Outcome{Status: 429, RetryAfter: 60 * time.Second}, 0.99, &prior, now)
	a = b.Begin(work(true), &prior, now)
	a.End(Outcome{Status: 429, RetryAfter: time.Second}, 0.99, &prior, now.Add(time.Second))
	if !b.CoolingDown(now.Add(30*time.Second)) || b.CoolingDown(now.Add(61*time.Second)) {
		t.Fatalf("cooldown until %v, want 60 s from the first 429", b.Cooldown())
	}
}

// TestEngineMetricsTakePrecedence: fresh engine queue and batch figures
// feed the state; stale ones are ignored.
func TestEngineMetricsTakePrecedence(t *testing.T) {
	b := newBackend("engine")
	now := time.Unix(1000, 0)
	b.SetEngine(EngineMetrics{Waiting: 7, Running: 12, KVUsage: 0.9, HasWaiting: true, HasRunning: true, HasKV: true, At: now}, 3*time.Second)
	s := b.State(now.Add(time.Second))
	if s.Pending != 7 || s.Running != 12 || s.KV != 0.9 || s.Inflight != 19 {
		t.Fatalf("fresh engine metrics not used: %+v", s)
	}
	if s := b.State(now.Add(10 * time.Second)); s.Pending != 0 || s.Running != 0 || s.KV != 0 {
		t.Fatalf("stale engine metrics used: %+v", s)
	}
}

// TestPoolsDoNotShareBeliefs: what one pool learns does not move another
// pool's prior.
func TestPoolsDoNotShareBeliefs(t *testing.T) {
	big, small := AcquirePool("test-70b"), AcquirePool("test-8b")
	defer ReleasePool("test-70b")
	defer ReleasePool("test-8b")
	if big == small {
		t.Fatal("two pools share one object")
	}
	b := newBackend("70b")
	now := time.Unix(1000, 0)
	for i := 0; i < 50; i++ {
		a := b.Begin(work(true), big.Prior(), now)
		a.FirstToken(time.Now())
		a.End(Outcome{Status: 200, Stream: true, TTFT: 3 * time.Second, E2E: 30 * time.Second, OutputTokens: 100}, 0.99, big.Prior(), now)
	}
	bt, _ := big.Prior().Values()
	st, _ := small.Prior().Values()
	if bt < 1 || st != defaultPriorTTFT {
		t.Fatalf("prior TTFT: 70b pool %.2fs, 8b pool %.2fs (want the 8b pool untouched at %.2fs)", bt, st, defaultPriorTTFT)
	}
	if AcquirePool("test-70b") != big {
		t.Fatal("the same key gave another pool")
	}
	ReleasePool("test-70b")
}

// TestSlotsFromObservedWaits: a stream sent past the largest batch seen
// whose first token came late reveals the engine's batch limit; a batch
// running past it raises it; the evidence expires.
func TestSlotsFromObservedWaits(t *testing.T) {
	var prior Prior
	b := newBackend("slots")
	now := time.Unix(1000, 0)
	for i := 0; i < 30; i++ { // first tokens in 10 ms, requests take 1 s
		a := b.Begin(work(true), &prior, now)
		a.FirstToken(now.Add(10 * time.Millisecond))
		a.End(Outcome{Status: 200, Stream: true, TTFT: 10 * time.Millisecond, E2E: time.Second, OutputTokens: 50}, 0.99, &prior, now)
	}
	b.maxRunning.Store(0)
	// four streams run at once: the batch seen is 4
	var running []Attempt
	for i := 0; i < 4; i++ {
		a := b.Begin(work(true), &prior, now)
		a.FirstToken(now.Add(10 * time.Millisecond))
		running = append(running, a)
	}
	if b.Slots(now) != 0 {
		t.Fatal("a capacity was assumed before any wait was seen")
	}
	// a fifth, sent with 4 in flight, waits 400 ms for its first token
	a := b.Begin(work(true), &prior, now)
	a.FirstToken(now.Add(400 * time.Millisecond))
	if got := b.Slots(now); got != 4 {
		t.Fatalf("capacity %d after a wait at 4 in flight, want 4", got)
	}
	if s := b.State(now); s.QueueWait <= 0 {
		t.Fatalf("no queue anticipated past a full batch: %+v", s)
	}
	if b.Slots(now.Add(2*staleAfter)) != 0 {
		t.Fatal("the capacity evidence never expires")
	}
	// a batch of six running raises it
	for i := 0; i < 2; i++ {
		x := b.Begin(work(true), &prior, now)
		x.FirstToken(now.Add(5 * time.Millisecond))
	}
	if got := b.Slots(now); got < 6 {
		t.Fatalf("capacity %d after 6 ran at once", got)
	}
	_ = running
}

// TestRecentRateShowsABurstAtOnce: requests of the current second count,
// so the admin view's shares are right right after a burst begins.
func TestRecentRateShowsABurstAtOnce(t *testing.T) {
	var r recentRate
	now := time.Unix(1000, 500_000_000)
	for i := 0; i < 20; i++ {
		r.add(now)
	}
	if got := r.perSecond(now); got != 2 {
		t.Fatalf("20 requests this second: %.1f/s over the 10 s window, want 2", got)
	}
	if got := r.perSecond(now.Add(10 * time.Second)); got != 0 {
		t.Fatalf("after the window: %.1f/s", got)
	}
}

// TestBatchSeenCountsStreams: non-streaming requests in flight may wait in
// the engine's queue, so they do not make the batch seen larger; streams
// past their first token do.
func TestBatchSeenCountsStreams(t *testing.T) {
	var prior Prior
	b := newBackend("batch-seen")
	now := time.Unix(1000, 0)
	for i := 0; i < 6; i++ {
		b.Begin(work(false), &prior, now) // six non-streaming, in flight
	}
	s := b.Begin(work(true), &prior, now)
	s.FirstToken(now)
	if got := b.Stats().MaxRunning; got != 1 {
		t.Fatalf("batch seen %d with one stream running and six non-streaming requests in flight, want 1", got)
	}
	s.End(Outcome{Status: 200, Stream: true, TTFT: time.Millisecond, E2E: time.Second, OutputTokens: 5}, 0.99, &prior, now)
	if b.streaming.Load() != 0 {
		t.Fatal("an ended stream still counts as running")
	}
}

// TestReservationsArePendingWork: a stream a policy chose counts as
// pending with its prompt tokens until its attempt begins, so the next
// request of a burst sees the work; a non-streaming one only in flight.
func TestReservationsArePendingWork(t *testing.T) {
	b := newBackend("r:1")
	now := time.Now()
	stream := &Features{Stream: true, PromptTokens: 1500}
	whole := &Features{PromptTokens: 700}
	b.Reserve(stream, now)
	b.Reserve(whole, now)
	s := b.State(now)
	if s.Inflight != 2 || s.Pending != 1 || s.PendingTokens != 1500 {
		t.Fatalf("state with two reservations: %+v", s)
	}
	if s := b.State(now.Add(2 * time.Second)); s.Inflight != 0 || s.Pending != 0 || s.PendingTokens != 0 {
		t.Fatalf("reservations still count two seconds later: %+v", s)
	}
	b.Unreserve(stream)
	b.Unreserve(whole)
	b.Unreserve(whole) // an extra one never goes negative
	if s := b.State(now); s.Inflight != 0 || s.Pending != 0 || s.PendingTokens != 0 {
		t.Fatalf("state after unreserving: %+v", s)
	}
}

// TestEngineQueueDrainsWithAge: a queue the engine showed on its last
// scrape drains at the backend's recent rate as the sample ages, so a
// sample a scrape interval old does not mark a fast engine full (nor load
// it with a queue) long after its queue is gone.
func TestEngineQueueDrainsWithAge(t *testing.T) {
	b := newBackend("engine")
	now := time.Unix(1000, 0)
	var prior Prior
	for i := 0; i < 40; i++ { // 4 requests a second over the recent window
		a := b.Begin(work(true), &prior, now)
		a.End(Outcome{Status: 200, Stream: true, TTFT: 50 * time.Millisecond, E2E: 200 * time.Millisecond, OutputTokens: 20}, 0.99, &prior, now)
	}
	b.SetEngine(EngineMetrics{Waiting: 3, Running: 8, KVUsage: 0.95, HasWaiting: true, HasRunning: true, HasKV: true, At: now}, 3*time.Second)
	if s := b.State(now); !b.Full(s, now) || s.Pending != 3 {
		t.Fatalf("a fresh queue beside a full KV cache: full %v, pending %.1f; want full, 3", b.Full(s, now), s.Pending)
	}
	half := now.Add(500 * time.Millisecond)
	if s := b.State(half); !b.Full(s, half) || s.Pending != 1 {
		t.Fatalf("half a second on (2 drained): full %v, pending %.1f; want full, 1", b.Full(s, half), s.Pending)
	}
	later := now.Add(time.Second)
	if s := b.State(later); b.Full(s, later) || s.Pending != 0 {
		t.Fatalf("a second on, the queue of 3 is drained at 4/s: full %v, pending %.1f; want not full, 0", b.Full(s, later), s.Pending)
	}
	if n, _ := b.FreeSlots(later); n == 0 {
		t.Fatal("admission still sees the drained queue")
	}
}

// TestQueueWaitFromEngineCapacity: a batch of 4 the engine showed full (a
// queue behind it on two scrapes) is the capacity a queue waits behind,
// as it is the one Full compares with: 6 in flight and the request wait
// for 3 completions at 4 a second (1 s each over 4 slots).
func TestQueueWaitFromEngineCapacity(t *testing.T) {
	b := newBackend("engine-capacity")
	now := time.Unix(1000, 0)
	var prior Prior
	for i := 0; i < 10; i++ {
		a := b.Begin(work(true), &prior, now)
		a.FirstToken(now)
		a.End(Outcome{Status: 200, Stream: true, TTFT: 50 * time.Millisecond, E2E: time.Second, OutputTokens: 50}, 0.99, &prior, now)
	}
	for i := 0; i < 2; i++ {
		b.SetEngine(EngineMetrics{Waiting: 2, Running: 4, HasWaiting: true, HasRunning: true, At: now.Add(time.Duration(i-1) * time.Second)}, 5*time.Second)
	}
	if got, slots := b.Capacity(now), b.Slots(now); got != 4 || slots != 0 {
		t.Fatalf("capacity %d, slots observed %d; want 4 from the engine, none observed", got, slots)
	}
	s := b.State(now)
	if !b.Full(s, now) {
		t.Fatalf("%v in flight beside a capacity of 4 is not full", s.Inflight)
	}
	if want := b.SlotWait(s.Inflight+1-4, 4); want <= 0 || math.Abs(s.QueueWait-want) > 1e-9 {
		t.Fatalf("queue wait %.3fs with %v in flight, want %.3fs", s.QueueWait, s.Inflight, want)
	}
}
