// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// reaped is one process reaped by the supervisor.
type reaped struct {
	pid    int
	status syscall.WaitStatus
}

// superviseServer runs argv as a child and reaps it and every process
// left to us, until none is left or ctx ends (SIGTERM, SIGINT).
//
// Why SIGKILL: a server told to stop (nbdkit on SIGTERM) answers the
// requests it reads meanwhile with an error reply (ESHUTDOWN); the kernel
// nbd driver fails every request that gets an error reply with EIO, and
// the filesystem above sees a write error. A killed server sends nothing:
// the kernel sees the connection drop, keeps the requests and resends them
// on the connection the node plugin makes when the server is back.
//
// Why it is safe for the servers we document: they write with pwrite(2)
// into the backing file before replying, so an acknowledged write is in
// the page cache of the host and outlives the process; a flush is answered
// only after fdatasync(2). A request killed before its reply is resent by
// the kernel. (A server that keeps acknowledged writes in its own memory —
// qemu-nbd with a qcow2 image, nbdkit's cache filter in writeback mode —
// loses those on SIGKILL as on a crash; docs/operations.md.)
//
// The child runs in its own process group, so a signal sent to our group
// (a terminal's ^C, a supervisor signalling the group) reaches only us. We
// are a child subreaper: a server that daemonizes (nbd-server) is
// re-parented to us, so it is supervised and killed like a direct child.
func superviseServer(ctx context.Context, argv []string, o runServerOptions, log io.Writer) error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("become a child subreaper: %w", err)
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return err
	}
	fwd := make(chan os.Signal, 8)
	signal.Notify(fwd, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(fwd)

	// Pdeathsig is tied to the thread that forks: keep this goroutine on
	// it (Go does not end threads of unlocked goroutines), so that the
	// server dies with us should we be killed.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	pid, err := syscall.ForkExec(path, argv, &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: []uintptr{os.Stdin.Fd(), os.Stdout.Fd(), os.Stderr.Fd()},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL},
	})
	if err != nil {
		return fmt.Errorf("start %s: %w", argv[0], err)
	}
	exits := make(chan reaped)
	go reap(exits)

	var mainStatus *syscall.WaitStatus
	var lastAbnormal string
	for {
		select {
		case e, ok := <-exits:
			if !ok {
				// Every process is gone on its own.
				switch {
				case mainStatus != nil && !exitedZero(*mainStatus):
					return fmt.Errorf("%s %s", argv[0], describe(*mainStatus))
				case lastAbnormal != "":
					return fmt.Errorf("a process of %s %s", argv[0], lastAbnormal)
				}
				return nil
			}
			if e.pid == pid {
				st := e.status
				mainStatus = &st
			} else if !exitedZero(e.status) {
				lastAbnormal = describe(e.status)
			}
		case s := <-fwd:
			for _, c := range children(os.Getpid()) {
				_ = syscall.Kill(c, s.(syscall.Signal))
			}
		case <-ctx.Done():
			start := time.Now()
			n, err := killAll(exits, o.killTimeout)
			if err != nil {
				return err
			}
			fmt.Fprintf(log, "nbd-csi run-server: stop requested: killed %s (%d processes) with SIGKILL in %v, so that clients see a dropped connection\n",
				argv[0], n, time.Since(start).Round(time.Millisecond))
			for _, p := range o.sync {
				if err := syncFS(p); err != nil {
					return err
				}
				fmt.Fprintf(log, "nbd-csi run-server: flushed the filesystem of %s\n", p)
			}
			return nil
		}
	}
}

// reap waits for any child and reports it on exits, which it closes when
// no child is left (ECHILD).
func reap(exits chan<- reaped) {
	defer close(exits)
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		exits <- reaped{pid, ws}
	}
}

// killAll sends SIGKILL to every descendant, again and again (a process
// may fork between two scans; an orphan is re-parented to us), until the
// reaper has seen the last one go. It returns how many processes it
// killed.
func killAll(exits <-chan reaped, timeout time.Duration) (int, error) {
	killed := map[int]bool{}
	deadline := time.After(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, p := range descendants(os.Getpid()) {
			if err := syscall.Kill(p, syscall.SIGKILL); err == nil {
				killed[p] = true
			}
		}
		select {
		case _, ok := <-exits:
			if !ok {
				return len(killed), nil
			}
		case <-tick.C:
		case <-deadline:
			return len(killed), fmt.Errorf("processes %v still alive %v after SIGKILL", descendants(os.Getpid()), timeout)
		}
	}
}

// parents maps every process to its parent, from /proc/PID/stat.
func parents() map[int]int {
	m := map[int]int{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return m
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// "pid (comm) state ppid …"; comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(f[1]); err == nil {
			m[pid] = ppid
		}
	}
	return m
}

// children returns the direct children of pid.
func children(pid int) []int {
	var out []int
	for p, pp := range parents() {
		if pp == pid {
			out = append(out, p)
		}
	}
	return out
}

// descendants returns every process below pid.
func descendants(pid int) []int {
	par := parents()
	kids := map[int][]int{}
	for p, pp := range par {
		kids[pp] = append(kids[pp], p)
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range kids[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// syncFS flushes the filesystem holding path (syncfs(2)).
func syncFS(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

func exitedZero(ws syscall.WaitStatus) bool { return ws.Exited() && ws.ExitStatus() == 0 }

func describe(ws syscall.WaitStatus) string {
	if ws.Signaled() {
		return "was killed by " + ws.Signal().String()
	}
	return "exited with status " + strconv.Itoa(ws.ExitStatus())
}
