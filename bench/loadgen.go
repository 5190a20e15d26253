// Command loadgen is the benchmark's compiled load generator for the two
// measures wrk cannot take: an open-loop fixed arrival rate (Debian 12 ships
// neither wrk2 nor vegeta) and per-chunk timing of SSE streams.
//
// It uses only the Go standard library so it builds offline from Debian's
// golang-go. It prints one JSON object on stdout.
//
//	loadgen -mode rate   -url U -rate 2000 -duration 5s -body '{...}'
//	loadgen -mode stream -url U -conns 64  -duration 5s -body '{...}'
//
// Rate mode is open loop: request i is due at start+i/rate whatever happened
// to earlier requests, and its latency is measured from that due time, so a
// stalled server is charged for the queue it causes (no coordinated omission).
// Go's timers only wake at ~1 ms granularity on Linux, so the scheduler
// sleeps with nanosleep(2) and a 1 ns timer slack instead.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type options struct {
	mode        string
	url         string
	body        []byte
	auth        string
	rate        float64
	duration    time.Duration
	conns       int
	maxInflight int
	timeout     time.Duration
	maxStreams  int
}

func main() {
	var o options
	var body string
	flag.StringVar(&o.mode, "mode", "rate", "rate | stream")
	flag.StringVar(&o.url, "url", "", "target URL")
	flag.StringVar(&body, "body", "{}", "JSON request body")
	flag.StringVar(&o.auth, "auth", "Bearer sk-bench", "Authorization header")
	flag.Float64Var(&o.rate, "rate", 100, "rate mode: requests per second")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "how long to send")
	flag.IntVar(&o.conns, "conns", 1, "stream mode: concurrent streams")
	flag.IntVar(&o.maxInflight, "max-inflight", 1024, "rate mode: connections (= requests in flight) before new requests are dropped")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Second, "per-request timeout")
	flag.IntVar(&o.maxStreams, "max-streams", 100000, "stream mode: bound on streams started")
	flag.Parse()
	o.body = []byte(body)
	if o.url == "" || o.rate <= 0 || o.conns <= 0 {
		fmt.Fprintln(os.Stderr, "loadgen: -url is required; -rate and -conns must be positive")
		os.Exit(2)
	}
	client := &http.Client{
		Timeout: o.timeout,
		Transport: &http.Transport{
			MaxIdleConns:        o.maxInflight,
			MaxIdleConnsPerHost: o.maxInflight,
			DisableCompression:  true, // gzip would hide chunk boundaries
			IdleConnTimeout:     30 * time.Second,
		},
	}
	var out interface{}
	switch o.mode {
	case "rate":
		out = runRate(o)
	case "stream":
		out = runStream(client, o)
	default:
		fmt.Fprintln(os.Stderr, "loadgen: unknown -mode", o.mode)
		os.Exit(2)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

func newRequest(o options) (*http.Request, error) {
	req, err := http.NewRequest("POST", o.url, bytes.NewReader(o.body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", o.auth)
	return req, nil
}

// preciseSleep sleeps d with nanosleep(2); the caller has set a 1 ns timer slack
// on its locked OS thread.
func preciseSleep(d time.Duration) {
	ts := syscall.NsecToTimespec(d.Nanoseconds())
	_ = syscall.Nanosleep(&ts, nil)
}

type rateResult struct {
	Rate        float64 `json:"rate"`
	Sent        int     `json:"sent"`
	OK          int     `json:"ok"`
	Errors      int64   `json:"errors"`
	Dropped     int64   `json:"dropped"`
	Achieved    float64 `json:"achieved_rate"`
	OKRate      float64 `json:"ok_rate"` // successes per second, start to last completion
	Conns       int     `json:"conns"`
	P50us       float64 `json:"p50_us"`
	P90us       float64 `json:"p90_us"`
	P99us       float64 `json:"p99_us"`
	MaxUs       float64 `json:"max_us"`
	SchedLagP99 float64 `json:"sched_lag_p99_us"`
	FirstError  string  `json:"first_error"`
}

// rawConn drives one keep-alive connection by hand: a prebuilt request is
// written and the reply parsed with http.ReadResponse. This skips net/http
// Transport's per-request goroutine hand-offs, which cost about twice the CPU,
// and on a 2-core machine the generator's CPU is taken from the server.
type rawConn struct {
	conn net.Conn
	br   *bufio.Reader
}

func (rc *rawConn) close() {
	if rc.conn != nil {
		rc.conn.Close()
		rc.conn = nil
	}
}

func (rc *rawConn) do(host string, req []byte, timeout time.Duration) error {
	if rc.conn == nil {
		c, err := net.DialTimeout("tcp", host, timeout)
		if err != nil {
			return err
		}
		rc.conn, rc.br = c, bufio.NewReaderSize(c, 16<<10)
	}
	_ = rc.conn.SetDeadline(time.Now().Add(timeout))
	if _, err := rc.conn.Write(req); err != nil {
		rc.close()
		return err
	}
	resp, err := http.ReadResponse(rc.br, nil)
	if err != nil {
		rc.close()
		return err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.Close {
		rc.close()
	}
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

type job struct {
	i   int
	due time.Time
}

// worker owns one connection; idle workers sit on a LIFO stack so the fewest
// connections stay hot, and a new one is opened only when all are busy.
type worker struct {
	jobs chan job
	rc   rawConn
}

func runRate(o options) rateResult {
	u, err := url.Parse(o.url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	req := []byte(fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"+
		"Authorization: %s\r\nContent-Length: %d\r\n\r\n%s", u.RequestURI(), u.Host, o.auth, len(o.body), o.body))
	n := int(o.rate * o.duration.Seconds())
	lat := make([]float64, n) // microseconds, 0 = failed or dropped
	lag := make([]float64, n)
	interval := time.Duration(float64(time.Second) / o.rate)
	var errs, dropped int64
	var lastDone int64 // ns since start of the latest success
	var firstErr atomic.Value
	var wg sync.WaitGroup
	var mu sync.Mutex
	var idle, all []*worker
	var start time.Time // set just before the first send; workers read it after

	loop := func(w *worker) {
		for j := range w.jobs {
			if err := w.rc.do(u.Host, req, o.timeout); err != nil {
				atomic.AddInt64(&errs, 1)
				firstErr.CompareAndSwap(nil, err.Error())
			} else {
				lat[j.i] = float64(time.Since(j.due).Nanoseconds()) / 1e3
				done := int64(time.Since(start))
				for prev := atomic.LoadInt64(&lastDone); done > prev; prev = atomic.LoadInt64(&lastDone) {
					if atomic.CompareAndSwapInt64(&lastDone, prev, done) {
						break
					}
				}
			}
			mu.Lock()
			idle = append(idle, w)
			mu.Unlock()
			wg.Done()
		}
		w.rc.close()
	}
	dispatch := func(j job) {
		mu.Lock()
		var w *worker
		if len(idle) > 0 {
			w, idle = idle[len(idle)-1], idle[:len(idle)-1]
		} else if len(all) < o.maxInflight {
			w = &worker{jobs: make(chan job, 1)}
			all = append(all, w)
			go loop(w)
		}
		mu.Unlock()
		if w == nil {
			atomic.AddInt64(&dropped, 1)
			return
		}
		wg.Add(1)
		w.jobs <- j
	}

	runtime.LockOSThread()
	_, _, _ = syscall.Syscall(syscall.SYS_PRCTL, 29 /* PR_SET_TIMERSLACK */, 1, 0)
	start = time.Now()
	for i := 0; i < n; i++ {
		due := start.Add(time.Duration(i) * interval)
		if wait := time.Until(due); wait > 0 {
			preciseSleep(wait)
		}
		lag[i] = float64(time.Since(due).Microseconds())
		dispatch(job{i, due})
	}
	sendTime := time.Since(start)
	runtime.UnlockOSThread()
	wg.Wait()
	for _, w := range all {
		close(w.jobs)
	}

	ok := make([]float64, 0, n)
	for _, v := range lat {
		if v > 0 {
			ok = append(ok, v)
		}
	}
	sort.Float64s(ok)
	sort.Float64s(lag)
	r := rateResult{Rate: o.rate, Sent: n, OK: len(ok), Errors: errs, Dropped: dropped,
		Achieved: float64(n) / sendTime.Seconds(), Conns: len(all), P50us: pct(ok, 50),
		OKRate: okRate(len(ok), atomic.LoadInt64(&lastDone)),
		P90us: pct(ok, 90), P99us: pct(ok, 99), MaxUs: pct(ok, 100), SchedLagP99: pct(lag, 99)}
	if s, isStr := firstErr.Load().(string); isStr {
		r.FirstError = s
	}
	return r
}

// okRate is successes per second over [start, last success]; 0 when none succeeded.
func okRate(ok int, lastDoneNs int64) float64 {
	if ok == 0 || lastDoneNs <= 0 {
		return 0
	}
	return float64(ok) / (float64(lastDoneNs) / 1e9)
}

type streamResult struct {
	Conns        int     `json:"conns"`
	Streams      int     `json:"streams"`
	Errors       int     `json:"errors"`
	ChunksMedian float64 `json:"chunks_per_stream_median"`
	TTFTp50us    float64 `json:"ttft_p50_us"`
	TTFTp99us    float64 `json:"ttft_p99_us"`
	GapP50us     float64 `json:"gap_p50_us"`
	GapP99us     float64 `json:"gap_p99_us"`
	FirstError   string  `json:"first_error"`
}

type streamSample struct {
	ttft   float64
	gaps   []float64
	chunks int
	err    error
}

// runStream keeps o.conns streams open back to back for o.duration and
// records, per stream, the time to the first SSE event and the gaps between
// events (the final [DONE] excluded).
func runStream(client *http.Client, o options) streamResult {
	deadline := time.Now().Add(o.duration)
	var started int64
	var mu sync.Mutex
	var samples []streamSample
	var wg sync.WaitGroup
	for c := 0; c < o.conns; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && atomic.AddInt64(&started, 1) <= int64(o.maxStreams) {
				s := oneStream(client, o)
				mu.Lock()
				samples = append(samples, s)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	r := streamResult{Conns: o.conns}
	var ttft, gaps, chunks []float64
	for _, s := range samples {
		if s.err != nil {
			r.Errors++
			if r.FirstError == "" {
				r.FirstError = s.err.Error()
			}
			continue
		}
		r.Streams++
		ttft = append(ttft, s.ttft)
		gaps = append(gaps, s.gaps...)
		chunks = append(chunks, float64(s.chunks))
	}
	sort.Float64s(ttft)
	sort.Float64s(gaps)
	sort.Float64s(chunks)
	r.ChunksMedian = pct(chunks, 50)
	r.TTFTp50us, r.TTFTp99us = pct(ttft, 50), pct(ttft, 99)
	r.GapP50us, r.GapP99us = pct(gaps, 50), pct(gaps, 99)
	return r
}

func oneStream(client *http.Client, o options) streamSample {
	var s streamSample
	req, err := newRequest(o)
	if err != nil {
		return streamSample{err: err}
	}
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return streamSample{err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		_, _ = io.Copy(io.Discard, resp.Body)
		return streamSample{err: fmt.Errorf("status %d", resp.StatusCode)}
	}
	rd := bufio.NewReaderSize(resp.Body, 64<<10)
	var last time.Time
	done := false
	for !done {
		line, err := rd.ReadSlice('\n')
		if err != nil && !(err == io.EOF && len(line) > 0) {
			return streamSample{err: fmt.Errorf("stream ended without [DONE] after %d chunks: %v", s.chunks, err)}
		}
		if !bytes.HasPrefix(line, []byte("data:")) {
			continue
		}
		now := time.Now()
		if bytes.Contains(line, []byte("[DONE]")) {
			done = true
			continue
		}
		if s.chunks == 0 {
			s.ttft = float64(now.Sub(t0).Nanoseconds()) / 1e3
		} else {
			s.gaps = append(s.gaps, float64(now.Sub(last).Nanoseconds())/1e3)
		}
		last = now
		s.chunks++
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	return s
}

// pct returns the p-th percentile (nearest rank) of sorted xs, 0 if empty.
func pct(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	i := int(p/100*float64(len(xs))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(xs) {
		i = len(xs) - 1
	}
	return xs[i]
}
