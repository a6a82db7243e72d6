// SPDX-License-Identifier: Apache-2.0

package vm

import (
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
)

// tailLines is how many console lines errors quote.
const tailLines = 40

// console receives the VM's serial output: it forwards it to out with
// CR LF turned into LF, keeps the last lines for error messages and
// detects init's markers.
type console struct {
	mu        sync.Mutex
	out       io.Writer
	runID     string
	pendingCR bool
	line      []byte
	st        consoleState
	exited    chan struct{} // closed when the exit marker arrives
}

// consoleState is what the console learned so far.
type consoleState struct {
	tail      []string
	bootAt    time.Time     // host time of the boot marker
	guestBoot time.Duration // guest uptime in the boot marker
	exitAt    time.Time     // host time of the exit marker
	exitCode  int           // -1 until the exit marker arrives
}

func newConsole(out io.Writer, runID string) *console {
	return &console{out: out, runID: runID, st: consoleState{exitCode: -1}, exited: make(chan struct{})}
}

// Write implements io.Writer. It never fails: a failing out writer must
// not disturb the VM.
func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	buf := make([]byte, 0, len(p)+1)
	for _, b := range p {
		if c.pendingCR {
			c.pendingCR = false
			if b != '\n' {
				buf = append(buf, '\r')
				c.addByte('\r')
			}
		}
		if b == '\r' {
			c.pendingCR = true
			continue
		}
		buf = append(buf, b)
		c.addByte(b)
	}
	_, _ = c.out.Write(buf)
	return len(p), nil
}

// addByte feeds the line assembler.
func (c *console) addByte(b byte) {
	if b != '\n' {
		if len(c.line) < 64<<10 {
			c.line = append(c.line, b)
		}
		return
	}
	line := strings.TrimRight(string(c.line), "\r")
	c.line = c.line[:0]
	c.st.tail = append(c.st.tail, line)
	if len(c.st.tail) > tailLines {
		c.st.tail = c.st.tail[len(c.st.tail)-tailLines:]
	}
	if up, ok := parseBootMarker(line, c.runID); ok && c.st.bootAt.IsZero() {
		c.st.bootAt = time.Now()
		c.st.guestBoot = up
	}
	if code, ok := parseExitMarker(line, c.runID); ok && c.st.exitCode < 0 {
		c.st.exitCode = code
		c.st.exitAt = time.Now()
		close(c.exited)
	}
}

// state returns a copy of what the console learned.
func (c *console) state() consoleState {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.st
	st.tail = append([]string(nil), c.st.tail...)
	if len(c.line) > 0 {
		st.tail = append(st.tail, string(c.line))
	}
	return st
}

// parseExitMarker recognises "VMRUN-EXIT=<code> run=<id>" anywhere in
// line (kernel messages may precede it on the same line).
func parseExitMarker(line, runID string) (int, bool) {
	i := strings.LastIndex(line, MarkerExit)
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(line[i+len(MarkerExit):])
	if len(f) < 2 || f[1] != "run="+runID {
		return 0, false
	}
	code, err := strconv.Atoi(f[0])
	if err != nil || code < 0 {
		return 0, false
	}
	return code, true
}

// parseBootMarker recognises "VMRUN-BOOT uptime=<seconds> run=<id>".
func parseBootMarker(line, runID string) (time.Duration, bool) {
	i := strings.LastIndex(line, MarkerBoot+" ")
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(line[i+len(MarkerBoot):])
	if len(f) < 2 || f[1] != "run="+runID || !strings.HasPrefix(f[0], "uptime=") {
		return 0, false
	}
	secs, err := strconv.ParseFloat(strings.TrimPrefix(f[0], "uptime="), 64)
	if err != nil {
		return 0, false
	}
	return time.Duration(secs * float64(time.Second)), true
}

// tailBuffer forwards QEMU's stderr to out, prefixed with "qemu: ", and
// keeps its last max bytes for error messages.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	out io.Writer
	buf []byte
	// midLine is set when the last write ended without a newline.
	midLine bool
}

// Write implements io.Writer.
func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, l := range strings.SplitAfter(string(p), "\n") {
		if l == "" {
			continue
		}
		if !t.midLine {
			l = "qemu: " + l
		}
		_, _ = io.WriteString(t.out, l)
		t.midLine = !strings.HasSuffix(l, "\n")
	}
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = t.buf[len(t.buf)-t.max:]
	}
	return len(p), nil
}

// String returns the kept tail.
func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(t.buf))
}

// syncWriter serialises writes to w.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

// Write implements io.Writer.
func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
