package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// clockTick is USER_HZ, the unit of utime/stime in /proc/PID/stat. It is 100 on every Linux
// architecture Go supports (the kernel fixes it for the ABI).
const clockTick = 10 * time.Millisecond

// usage is what the kernel reports for a process and its descendants (a proxy that forks
// workers is measured whole).
type usage struct {
	RSS int64         // resident set, bytes (sum of VmRSS)
	HWM int64         // peak resident set since start, bytes (sum of VmHWM)
	CPU time.Duration // user + system time
}

func readUsage(pid int) (usage, error) {
	var u usage
	pids := append([]int{pid}, descendants(pid)...)
	for i, p := range pids {
		cpu, err := readCPU(p)
		if err != nil {
			if i == 0 {
				return u, err
			}
			continue // a child that just exited
		}
		u.CPU += cpu
		rss, hwm, err := readStatus(p)
		if err == nil {
			u.RSS += rss
			u.HWM += hwm
		}
	}
	return u, nil
}

// readCPU returns utime+stime from /proc/PID/stat. The command name (field 2) can hold
// spaces and parentheses, so fields are counted from its closing parenthesis.
func readCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(b)
}

func parseStatCPU(b []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("bench: malformed stat line")
	}
	f := strings.Fields(string(b[i+1:]))
	// After the name: state(3) ppid(4) ... utime(14) stime(15): indexes 11 and 12 here.
	if len(f) < 13 {
		return 0, fmt.Errorf("bench: short stat line")
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("bench: bad utime/stime in stat line")
	}
	return time.Duration(ut+st) * clockTick, nil
}

func readStatus(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			rss = parseKB(line)
		case strings.HasPrefix(line, "VmHWM:"):
			hwm = parseKB(line)
		}
	}
	return rss, hwm, sc.Err()
}

func parseKB(line string) int64 {
	f := strings.Fields(line)
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.ParseInt(f[1], 10, 64)
	return n * 1024
}

// descendants lists the process tree below pid (children, grandchildren, ...).
func descendants(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	parent := map[int]int{}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 {
			continue
		}
		pp, _ := strconv.Atoi(f[1])
		parent[p] = pp
	}
	var out []int
	frontier := []int{pid}
	for len(frontier) > 0 {
		var next []int
		for p, pp := range parent {
			for _, f := range frontier {
				if pp == f {
					next = append(next, p)
				}
			}
		}
		out = append(out, next...)
		frontier = next
	}
	return out
}

// monitor samples a process's resident set while a phase runs and reports the largest value
// and the CPU time used between start and stop.
type monitor struct {
	pid     int
	start   usage
	maxRSS  int64
	mu      sync.Mutex
	stop    chan struct{}
	stopped chan struct{}
}

func startMonitor(pid int) *monitor {
	m := &monitor{pid: pid, stop: make(chan struct{}), stopped: make(chan struct{})}
	if pid == 0 {
		close(m.stopped)
		return m
	}
	m.start, _ = readUsage(pid)
	m.maxRSS = m.start.RSS
	go func() {
		defer close(m.stopped)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-m.stop:
				return
			case <-t.C:
				if u, err := readUsage(pid); err == nil {
					m.mu.Lock()
					m.maxRSS = max(m.maxRSS, u.RSS)
					m.mu.Unlock()
				}
			}
		}
	}()
	return m
}

// done returns CPU used during the phase and the peak resident set seen.
func (m *monitor) done() (cpu time.Duration, maxRSS int64) {
	if m.pid == 0 {
		return 0, 0
	}
	close(m.stop)
	<-m.stopped
	end, err := readUsage(m.pid)
	if err != nil {
		return 0, m.maxRSS
	}
	return end.CPU - m.start.CPU, max(m.maxRSS, end.RSS)
}
