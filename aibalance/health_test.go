package aibalance

import (
	"testing"
	"time"
)

func TestRampAndNewcomers(t *testing.T) {
	var set BackendSet
	defer set.Release()
	now := time.Unix(1000, 0)
	addrs := []string{"ramp-a:1", "ramp-b:1", "ramp-c:1"}
	// a cold start: nobody served, nobody ramps
	set.RampNewcomers(addrs, now)
	for _, a := range addrs {
		if r := set.Get(a).Ramp(now.Add(time.Second), 30*time.Second, 0.1); r != 1 {
			t.Fatalf("%s ramps at a cold start: %.2f", a, r)
		}
	}
	// a and b have served: c, new, ramps from 10% to 100% over 30 s
	for _, a := range addrs[:2] {
		att := set.Get(a).Begin(&Features{}, new(Prior), now)
		att.End(Outcome{Status: 200}, 0.99, new(Prior), now)
	}
	set.RampNewcomers(addrs, now)
	c := set.Get(addrs[2])
	for _, tc := range []struct {
		at   time.Duration
		want float64
	}{{0, 0.1}, {15 * time.Second, 0.55}, {30 * time.Second, 1}, {time.Hour, 1}} {
		if r := c.Ramp(now.Add(tc.at), 30*time.Second, 0.1); r < tc.want-1e-9 || r > tc.want+1e-9 {
			t.Fatalf("ramp at +%s: %.3f, want %.3f", tc.at, r, tc.want)
		}
	}
	if r := set.Get(addrs[0]).Ramp(now, 30*time.Second, 0.1); r != 1 {
		t.Fatalf("a serving backend ramps: %.2f", r)
	}
	if r := c.Ramp(now, 0, 0.1); r != 1 {
		t.Fatal("slow start off still ramps")
	}
	// a cooldown starts the ramp when it ends; a shorter one never
	// shortens it
	b := set.Get(addrs[1])
	b.CoolDown(now, now.Add(60*time.Second))
	b.CoolDown(now, now.Add(time.Second))
	if !b.CoolingDown(now.Add(30*time.Second)) || b.Ramp(now.Add(61*time.Second), 30*time.Second, 0.1) >= 0.2 {
		t.Fatal("a later, shorter cooldown shortened a running one, or no ramp after it")
	}
}

func TestHealthConfigDefaultsAndValidate(t *testing.T) {
	c := HealthConfig{}.WithDefaults()
	if !c.BreakerOn() || c.ConsecutiveFailures != 3 || !c.Retries(503) || c.Retries(404) || c.OutlierFactor != 0 {
		t.Fatalf("defaults: %+v", c)
	}
	off := HealthConfig{RetryStatus: []int{0}}.WithDefaults()
	if off.Retries(503) {
		t.Fatal("retry_status off still retries 503")
	}
	for _, bad := range []HealthConfig{
		{FailureRatio: 2}, {RetryStatus: []int{200}}, {OutlierFactor: 0.5}, {MaxEjectedPercent: 101}, {SlowStartMin: -1}, {Cooldown: -1},
	} {
		if bad.Validate() == nil {
			t.Fatalf("%+v validated", bad)
		}
	}
}
