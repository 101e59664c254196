package llmsim

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"
)

// Workload describes an open-loop stream of chat completion requests.
type Workload struct {
	URL      string  // the /v1/chat/completions address
	Rate     float64 // mean arrivals per second (Poisson)
	Duration time.Duration
	// NonStream is the share (0..1) of requests sent with "stream": false;
	// their TTFT is their E2E and they are left out of TTFT percentiles.
	// Default 0: every request streams.
	NonStream float64
	// BurstOn and BurstOff, when both are set, make arrivals bursty at the
	// same mean Rate: a Markov-modulated on/off Poisson process whose on and
	// off periods last exponentially distributed times of these means, with
	// arrivals only while on (at Rate*(on+off)/on). Default: plain Poisson.
	BurstOn, BurstOff time.Duration
	Warmup            time.Duration // requests sent in this first part are not recorded
	MinPrompt         int           // prompt tokens, log-uniform between Min and Max
	MaxPrompt         int
	MinOutput         int // max_tokens, log-uniform between Min and Max
	MaxOutput         int
	Seed              uint64
	// Shape is what the prompts share: ShapeUniform (nothing, the
	// default), ShapeChat, ShapePrefix or ShapeAgentic. MinPrompt and
	// MaxPrompt then size each new message, not the whole prompt.
	Shape  string
	Client *http.Client
	// OnResult, if set, sees every result as it arrives (the demo's live view).
	OnResult func(Record)
}

// MeanTokens is the mean prompt and output tokens of the workload.
func (w Workload) MeanTokens() (prompt, output float64) {
	return logUniformMean(w.MinPrompt, w.MaxPrompt), logUniformMean(w.MinOutput, w.MaxOutput)
}

func logUniformMean(a, b int) float64 {
	if a >= b {
		return float64(a)
	}
	return float64(b-a) / math.Log(float64(b)/float64(a))
}

func logUniform(r *rand.Rand, a, b int) int {
	if a >= b {
		return a
	}
	return int(math.Exp(math.Log(float64(a)) + r.Float64()*(math.Log(float64(b))-math.Log(float64(a)))))
}

// Record is one request's outcome.
type Record struct {
	Result
	Err     error
	Prompt  int
	Output  int
	Warmup  bool
	Stream  bool // sent with "stream": true
	Started time.Time
	Session string // a shaped request's session (see SessionHeader)
}

// arrivals yields the gaps between request arrivals.
type arrivals struct {
	r        *rand.Rand
	rate     float64 // arrivals per second while on
	on, off  float64 // mean period lengths in seconds; 0: always on
	onLeft   float64 // seconds left in the current on period
	bursting bool
}

func newArrivals(w Workload, r *rand.Rand) *arrivals {
	a := &arrivals{r: r, rate: w.Rate}
	if w.BurstOn > 0 && w.BurstOff > 0 {
		a.bursting = true
		a.on, a.off = w.BurstOn.Seconds(), w.BurstOff.Seconds()
		a.rate = w.Rate * (a.on + a.off) / a.on
		a.onLeft = r.ExpFloat64() * a.on
	}
	return a
}

// next returns the time from one arrival to the next: exponential in on
// time, with every off period it crosses added.
func (a *arrivals) next() time.Duration {
	gap := a.r.ExpFloat64() / a.rate
	if !a.bursting {
		return time.Duration(gap * float64(time.Second))
	}
	wall := 0.0
	for i := 0; gap > a.onLeft && i < 1e6; i++ {
		gap -= a.onLeft
		wall += a.onLeft + a.r.ExpFloat64()*a.off
		a.onLeft = a.r.ExpFloat64() * a.on
	}
	a.onLeft -= gap
	return time.Duration((wall + gap) * float64(time.Second))
}

// Run sends the workload and returns every recorded request's outcome, after
// waiting (at most drain) for the requests still in flight at the end.
func (w Workload) Run(ctx context.Context, drain time.Duration) []Record {
	r := rand.New(rand.NewPCG(w.Seed, w.Seed^0x9e3779b97f4a7c15))
	client := w.Client
	if client == nil {
		client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	}
	reqCtx, cancel := context.WithTimeout(ctx, w.Duration+drain)
	defer cancel()
	var mu sync.Mutex
	var out []Record
	var wg sync.WaitGroup
	start := time.Now()
	next := start
	gaps := newArrivals(w, r)
	shapes := newShaper(w, r)
	for i := 0; ; i++ {
		next = next.Add(gaps.next())
		if next.Sub(start) >= w.Duration || ctx.Err() != nil {
			break
		}
		time.Sleep(time.Until(next))
		var body []byte
		var header http.Header
		var session string
		var prompt, output int
		var stream bool
		if w.Shape == ShapeUniform { // the draws in their original order
			prompt = logUniform(r, w.MinPrompt, w.MaxPrompt)
			output = logUniform(r, w.MinOutput, w.MaxOutput)
			stream = w.NonStream <= 0 || r.Float64() >= w.NonStream
			body = ChatBody("", randomText(i, prompt*4, r), output, stream)
		} else {
			output = logUniform(r, w.MinOutput, w.MaxOutput)
			stream = w.NonStream <= 0 || r.Float64() >= w.NonStream
			body, prompt, session = shapes.body(i, output, stream)
			if session != "" {
				header = http.Header{SessionHeader: {session}}
			}
		}
		warm := next.Sub(start) < w.Warmup
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.Now()
			res, err := CompleteWith(reqCtx, client, w.URL, body, header)
			if !stream {
				res.TTFT = res.E2E // what a non-streaming client waits for
			}
			rec := Record{Result: res, Err: err, Prompt: prompt, Output: output, Warmup: warm, Stream: stream, Started: t, Session: session}
			if w.OnResult != nil {
				w.OnResult(rec)
			}
			if !warm {
				mu.Lock()
				out = append(out, rec)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

// randomText is n characters of text, unique from its first words so that
// requests do not share prefixes by accident.
func randomText(id, n int, r *rand.Rand) string {
	var b strings.Builder
	fmt.Fprintf(&b, "request %d %d: ", id, r.Uint32())
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		b.WriteByte(' ')
	}
	return b.String()[:max(n, 1)]
}

var words = strings.Fields("the model serves tokens from a batch of sequences while the scheduler admits new requests into free slots and prefill competes with decode for the same step")

// Summary is the aggregate of a run.
type Summary struct {
	Requests   int
	Errors     int
	Wall       time.Duration
	TTFT, E2E  Percentiles
	OutputToks int
}

// Percentiles of a latency distribution.
type Percentiles struct{ P50, P90, P99, Max time.Duration }

// Summarize aggregates records measured over wall time. TTFT percentiles
// are of streamed requests only.
func Summarize(recs []Record, wall time.Duration) Summary {
	s := Summary{Wall: wall}
	var ttft, e2e []time.Duration
	for _, r := range recs {
		s.Requests++
		if r.Err != nil || r.Status != http.StatusOK {
			s.Errors++
			continue
		}
		if r.Stream {
			ttft = append(ttft, r.TTFT)
		}
		e2e = append(e2e, r.E2E)
		s.OutputToks += r.Tokens
	}
	s.TTFT, s.E2E = percentiles(ttft), percentiles(e2e)
	return s
}

func percentiles(d []time.Duration) Percentiles {
	if len(d) == 0 {
		return Percentiles{}
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	at := func(q float64) time.Duration { return d[min(int(q*float64(len(d))), len(d)-1)] }
	return Percentiles{P50: at(0.5), P90: at(0.9), P99: at(0.99), Max: d[len(d)-1]}
}
