// SPDX-License-Identifier: Apache-2.0

package servers

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// startWatchdog starts "sh -c 'read; kill -s KILL -- -PGID'" with its stdin
// the read end of a pipe whose write end only this process holds. If this
// process dies, even by SIGKILL, the read returns and the daemon's group is
// killed: a daemonized server cannot outlive the test binary. Pdeathsig
// covers the servers that do not daemonize.
func (s *Server) startWatchdog() error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	cmd := exec.Command("sh", "-c", `read -r _; kill -s KILL -- "-$1" 2>/dev/null`, "sh", strconv.Itoa(s.pgid))
	cmd.Stdin = r
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	_ = r.Close()
	if err != nil {
		_ = w.Close()
		return fmt.Errorf("start watchdog: %w", err)
	}
	// The write end stays open (and unused) until stopWatchdog; it is
	// close-on-exec, so no other child inherits it.
	done := make(chan struct{})
	s.watchdog, s.watchdogDone = cmd, done
	go func() { _ = cmd.Wait(); _ = w.Close(); close(done) }()
	return nil
}

// stopWatchdog ends the watchdog without letting it kill anything.
func (s *Server) stopWatchdog() {
	if s.watchdog == nil {
		return
	}
	_ = s.watchdog.Process.Kill()
	select {
	case <-s.watchdogDone:
	case <-time.After(stopGrace):
	}
	s.watchdog = nil
}

// killGroupLocked sends SIGTERM to the process group, then SIGKILL after
// stopGrace, and waits until no live process is left in it.
func (s *Server) killGroupLocked() error {
	s.running = false
	s.stopWatchdog()
	pgid := s.pgid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	if waitGroupGone(pgid, s.exited, s.daemon, stopGrace) {
		return nil
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	if waitGroupGone(pgid, s.exited, s.daemon, stopGrace) {
		return nil
	}
	return fmt.Errorf("process group %d still alive after SIGKILL", pgid)
}

// waitGroupGone waits until the started command was reaped (unless it was a
// daemon launcher) and no live process remains in the group.
func waitGroupGone(pgid int, exited <-chan struct{}, daemon bool, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		reaped := daemon
		select {
		case <-exited:
			reaped = true
		default:
		}
		if reaped && !groupAlive(pgid) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pollInterval)
	}
}

// groupAlive reports whether a process of group pgid is alive. Zombies do
// not count: a daemon's parent may be a PID 1 that never reaps.
func groupAlive(pgid int) bool {
	if err := syscall.Kill(-pgid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may contain spaces.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) >= 3 && f[2] == strconv.Itoa(pgid) && f[0] != "Z" && f[0] != "X" {
			return true
		}
	}
	return false
}
