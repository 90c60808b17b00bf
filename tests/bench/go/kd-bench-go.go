// kd-bench-go: the Go anchor of kd-bench
//
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// W1, W2 and W3 of BENCH.md written the way a Go programmer would write them,
// with the standard library only. kd-bench (tests/bench/kd-bench.c) runs this
// program in the same invocation as kdispatch and the plain-GLib baseline, so
// it can report kdispatch's rate over Go's measured on the same processors in
// the same minutes: absolute figures on a shared host move by 2x and more,
// a same-run ratio does not.
//
//	W1  1,000,000 unkeyed jobs: one channel buffered to 1024 (the bound) and
//	    4 worker goroutines ranging over it; job i does slot[i]++, and every
//	    slot must be 1 afterwards
//	W2  1,000,000 jobs over 1,000 keys, key = i % 1000, seq = i / 1000: per
//	    key a goroutine and a channel buffered to 64, both made at the key's
//	    first job; the producer finds the key's channel in a map by its
//	    "k%u" string (formatted before timing). The job checks the key's
//	    sequence against its 64-byte padded last entry
//	W3  100,000 keys x 10 jobs (key churn), as W2
//
// Timing runs from just before the first send until every job has ended
// (the channels closed and every goroutine returned); making the W1 workers
// and formatting the keys is outside it. GOMAXPROCS is left at its default.
// Peak RSS is VmHWM, reset through /proc/self/clear_refs just before timing,
// as kd-bench does for its own runs.
//
// One run per invocation, one line on stdout:
//
//	W1 seconds=0.056700 jobs=1000000 ok=1 check="0 of 1000000 slots != 1" peak_rss_kib=12345 gomaxprocs=2
//
// The exit status is 1 if the check failed, 2 on a usage error.
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const cacheLine = 64

const (
	w1Jobs      = 1000000
	w1Workers   = 4
	w1Capacity  = 1024
	w2Keys      = 1000
	w2Jobs      = 1000000
	w3Keys      = 100000
	w3Rounds    = 10
	mailboxSize = 64
)

type result struct {
	seconds float64
	jobs    uint32
	ok      bool
	check   string
}

// resetPeakRSS resets VmHWM to the current RSS (writing 5 to clear_refs,
// Linux >= 4.0); without it the figure would include everything before the
// run.
func resetPeakRSS() {
	_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
}

func peakRSSKiB() uint64 {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			fields := strings.Fields(line[len("VmHWM:"):])
			if len(fields) > 0 {
				kib, _ := strconv.ParseUint(fields[0], 10, 64)
				return kib
			}
		}
	}
	return 0
}

// W1: unkeyed fan-out through one buffered channel.
func runW1(nJobs uint32, nWorkers, capacity int) result {
	slots := make([]uint8, nJobs)
	jobs := make(chan uint32, capacity)
	var wg sync.WaitGroup

	wg.Add(nWorkers)
	for w := 0; w < nWorkers; w++ {
		go func() {
			defer wg.Done()
			for i := range jobs {
				slots[i]++
			}
		}()
	}
	resetPeakRSS()

	start := time.Now()
	for i := uint32(0); i < nJobs; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	seconds := time.Since(start).Seconds()

	bad := 0
	for _, slot := range slots {
		if slot != 1 {
			bad++
		}
	}
	return result{seconds, nJobs, bad == 0, fmt.Sprintf("%d of %d slots != 1", bad, nJobs)}
}

// W2 and W3: keyed, a goroutine and a channel per key.

type paddedLast struct {
	value int64
	_     [cacheLine - 8]byte
}

type keyed struct {
	nKeys      uint32
	nJobs      uint32
	keys       []string
	last       []paddedLast
	violations int64 // atomic
}

func newKeyed(nKeys, nJobs uint32) *keyed {
	k := &keyed{nKeys: nKeys, nJobs: nJobs, keys: make([]string, nKeys), last: make([]paddedLast, nKeys)}

	for i := range k.keys {
		k.keys[i] = fmt.Sprintf("k%d", i)
		k.last[i].value = -1
	}
	return k
}

func (k *keyed) job(i uint32) {
	key := i % k.nKeys
	seq := int64(i / k.nKeys)

	if k.last[key].value != seq-1 {
		atomic.AddInt64(&k.violations, 1)
	}
	k.last[key].value = seq
}

// serve runs a key's jobs in the order they were sent, until the producer
// closes the key's channel.
func (k *keyed) serve(mailbox <-chan uint32, wg *sync.WaitGroup) {
	defer wg.Done()
	for i := range mailbox {
		k.job(i)
	}
}

func runKeyed(nKeys, nJobs uint32) result {
	k := newKeyed(nKeys, nJobs)
	mailboxes := make(map[string]chan uint32)
	var wg sync.WaitGroup

	resetPeakRSS()

	start := time.Now()
	for i := uint32(0); i < nJobs; i++ {
		key := k.keys[i%nKeys]
		mailbox, found := mailboxes[key]
		if !found {
			mailbox = make(chan uint32, mailboxSize)
			mailboxes[key] = mailbox
			wg.Add(1)
			go k.serve(mailbox, &wg)
		}
		mailbox <- i
	}
	for _, mailbox := range mailboxes {
		close(mailbox)
	}
	wg.Wait()
	seconds := time.Since(start).Seconds()

	expected := int64(nJobs/nKeys) - 1
	wrong := 0
	for i := range k.last {
		if k.last[i].value != expected {
			wrong++
		}
	}
	violations := atomic.LoadInt64(&k.violations)
	return result{seconds, nJobs, violations == 0 && wrong == 0,
		fmt.Sprintf("%d violations, %d keys with last != %d", violations, wrong, expected)}
}

func main() {
	workload := flag.String("w", "", "the workload: W1, W2 or W3")
	nJobs := flag.Uint("j", 0, "jobs per run (0: the workload's own; W3 runs j/10 keys x 10)")
	nWorkers := flag.Int("n", w1Workers, "W1's worker goroutines")
	capacity := flag.Int("c", w1Capacity, "W1's channel buffer (the bound)")
	flag.Parse()

	if flag.NArg() != 0 || *nWorkers < 1 || *capacity < 0 || *nJobs > 1<<31 {
		flag.Usage()
		os.Exit(2)
	}

	var r result
	switch *workload {
	case "W1":
		n := uint32(*nJobs)
		if n == 0 {
			n = w1Jobs
		}
		r = runW1(n, *nWorkers, *capacity)
	case "W2":
		n := uint32(*nJobs)
		if n == 0 {
			n = w2Jobs
		}
		r = runKeyed(w2Keys, n)
	case "W3":
		keys := uint32(w3Keys)
		if *nJobs != 0 {
			keys = uint32(*nJobs) / w3Rounds
			if keys == 0 {
				keys = 1
			}
		}
		r = runKeyed(keys, keys*w3Rounds)
	default:
		fmt.Fprintf(os.Stderr, "kd-bench-go: unknown workload %q (W1, W2 or W3)\n", *workload)
		os.Exit(2)
	}

	ok := 0
	if r.ok {
		ok = 1
	}
	fmt.Printf("%s seconds=%.6f jobs=%d ok=%d check=%q peak_rss_kib=%d gomaxprocs=%d\n",
		*workload, r.seconds, r.jobs, ok, r.check, peakRSSKiB(), runtime.GOMAXPROCS(0))
	if !r.ok {
		os.Exit(1)
	}
}
