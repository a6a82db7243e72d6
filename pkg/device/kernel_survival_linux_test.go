// SPDX-License-Identifier: Apache-2.0

package device

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Environment of the child process of TestKernelSurvivesAttacherKill.
const (
	envChildSock    = "NBDCSI_DEVICE_TEST_CHILD_SOCK"
	envChildBackend = "NBDCSI_DEVICE_TEST_CHILD_BACKEND"
)

func TestMain(m *testing.M) {
	if uri := os.Getenv(envChildSock); uri != "" {
		os.Exit(childAttach(uri, os.Getenv(envChildBackend)))
	}
	os.Exit(m.Run())
}

// childAttach attaches the export at uri, prints "INDEX=<n>" and waits to
// be killed.
func childAttach(uri, id string) int {
	f, size, flags, err := dialExport(uri)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	n, err := NewNetlink(Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := n.Attach(ctx, Config{Sockets: []*os.File{f}, SizeBytes: size, ServerFlags: flags, BackendID: id})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	f.Close()
	fmt.Printf("INDEX=%d\n", d.Index)
	time.Sleep(time.Hour)
	return 0
}

// TestKernelSurvivesAttacherKill: a netlink device outlives the process
// that attached it, even when that process is SIGKILLed while I/O runs.
func TestKernelSurvivesAttacherKill(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, 2*time.Minute)
	file := sparseFile(t, t.TempDir(), "disk.img", 32<<20)
	srv := startNbdkit(t, "file", "file="+file)
	const id = "kt-child"
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), envChildSock+"="+srv.URI(""), envChildBackend+"="+id)
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	index, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(line), "INDEX="), 10, 32)
	if err != nil {
		t.Fatalf("child said %q", line)
	}
	detachAtCleanup(t, n, uint32(index))
	path := devicePath("/dev", uint32(index))

	const chunk, chunks = 256 << 10, 64
	data := randomBuf(t, chunk*chunks)
	var written atomic.Int32
	werr := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_DIRECT, 0)
		if err != nil {
			werr <- err
			return
		}
		defer f.Close()
		for i := range chunks {
			if _, err := f.WriteAt(data[i*chunk:(i+1)*chunk], int64(i*chunk)); err != nil {
				werr <- fmt.Errorf("chunk %d: %w", i, err)
				return
			}
			written.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
		werr <- f.Sync()
	}()
	for written.Load() < 8 {
		time.Sleep(time.Millisecond)
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = child.Wait()
	killedAt := written.Load()
	if err := <-werr; err != nil {
		t.Fatalf("writer after the attaching process was killed: %v", err)
	}
	t.Logf("attacher killed after %d of %d chunks; the writer finished", killedAt, chunks)
	d, err := n.FindByBackend(ctx, id)
	if err != nil || d.Index != uint32(index) {
		t.Fatalf("FindByBackend = %+v, %v", d, err)
	}
	back, err := readDirect(path, 0, len(data))
	if err != nil || sum(back) != sum(data) {
		t.Fatalf("read back: %v", err)
	}
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
	if sum(readFileAt(t, file, 0, len(data))) != sum(data) {
		t.Error("server file differs")
	}
}

// TestKernelConcurrentAttach attaches 32 exports of one server at once,
// writes distinct data through each and detaches them all at once; every
// device must carry its own backend and every write land in its own export.
func TestKernelConcurrentAttach(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, 3*time.Minute)
	dir := t.TempDir()
	const vols, size, n64k = 32, 2 << 20, 64 << 10
	for i := range vols {
		sparseFile(t, dir, fmt.Sprintf("vol%02d", i), size)
	}
	srv := startNbdkit(t, "file", "dir="+dir)
	data := make([][]byte, vols)
	for i := range data {
		data[i] = randomBuf(t, n64k)
	}
	var wg sync.WaitGroup
	errs := make(chan error, vols)
	indexes := make([]uint32, vols)
	start := time.Now()
	for i := range vols {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				id := fmt.Sprintf("kt-c-%02d", i)
				f, sz, flags, err := srv.dial(fmt.Sprintf("vol%02d", i))
				if err != nil {
					return fmt.Errorf("%s: dial: %w", id, err)
				}
				d, err := n.Attach(ctx, Config{Sockets: []*os.File{f}, SizeBytes: sz, ServerFlags: flags, BackendID: id})
				f.Close()
				if err != nil {
					return fmt.Errorf("%s: attach: %w", id, err)
				}
				indexes[i] = d.Index
				if b, _, _ := (sysfs{root: "/sys"}).backend(d.Index); b != id {
					return fmt.Errorf("%s: nbd%d carries %q", id, d.Index, b)
				}
				if err := writeDirect(d.Path, 0, data[i]); err != nil {
					return fmt.Errorf("%s: write: %w", id, err)
				}
				back, err := readDirect(d.Path, 0, n64k)
				if err != nil || !bytes.Equal(back, data[i]) {
					return fmt.Errorf("%s: read back: %v", id, err)
				}
				if err := n.Detach(ctx, d.Index); err != nil {
					return fmt.Errorf("%s: detach: %w", id, err)
				}
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	t.Logf("32 attach+write+read+detach cycles in %v on devices %v", time.Since(start), indexes)
	for i := range vols {
		if got := readFileAt(t, fmt.Sprintf("%s/vol%02d", dir, i), 0, n64k); !bytes.Equal(got, data[i]) {
			t.Errorf("vol%02d does not hold its own data", i)
		}
	}
	list, err := n.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range list {
		if strings.HasPrefix(d.BackendID, "kt-c-") {
			t.Errorf("left attached: %+v", d)
		}
	}
}

func TestKernelWatchLinkDead(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, time.Minute)
	srv := startNbdkit(t, "memory", "size=16M")
	f, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := n.Attach(ctx, Config{Sockets: []*os.File{f}, SizeBytes: size, ServerFlags: flags,
		Timeout: 5 * time.Second, DeadConnTimeout: 30 * time.Second, BackendID: "kt-watch"})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, n, d.Index)
	ch, err := n.WatchLinkDead(ctx)
	if err != nil {
		t.Fatal(err)
	}
	srv.kill()
	select {
	case i := <-ch:
		if i != d.Index {
			t.Errorf("LINK_DEAD for nbd%d, want nbd%d", i, d.Index)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no LINK_DEAD after the server died")
	}
}

// TestKernelSupervisorServerRestart kills the server during a write and
// restarts it; the Supervisor reconnects the device and the write finishes
// with every byte in place.
func TestKernelSupervisorServerRestart(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, 3*time.Minute)
	file := sparseFile(t, t.TempDir(), "disk.img", 32<<20)
	srv := startNbdkit(t, "file", "file="+file)
	f, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const deadConn = 60 * time.Second
	d, err := n.Attach(ctx, Config{Sockets: []*os.File{f}, SizeBytes: size, ServerFlags: flags,
		Timeout: 2 * time.Second, DeadConnTimeout: deadConn, BackendID: "kt-sup"})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, n, d.Index)

	events := make(chan Event, 100)
	sup, err := NewSupervisor(n, SupervisorConfig{
		Index: d.Index, BackendID: "kt-sup", SizeBytes: size, ServerFlags: flags, DeadConnTimeout: deadConn,
		Redial: func(context.Context) ([]*os.File, uint64, uint16, error) {
			f, s, fl, err := srv.dial("")
			if err != nil {
				return nil, 0, 0, err
			}
			return []*os.File{f}, s, fl, nil
		},
		PollInterval: time.Second, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond,
		OnEvent: func(e Event) { events <- e },
	})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	supDone := make(chan error, 1)
	go func() { supDone <- sup.Run(sctx) }()
	if e := <-events; e.Kind != EventWatching { // before it, a dying link goes unnoticed
		t.Fatalf("first supervisor event %v, want watching", e.Kind)
	}

	const chunk, chunks = 128 << 10, 128
	data := randomBuf(t, chunk*chunks)
	var written atomic.Int32
	werr := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(d.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
		if err != nil {
			werr <- err
			return
		}
		defer f.Close()
		for i := range chunks {
			if _, err := f.WriteAt(data[i*chunk:(i+1)*chunk], int64(i*chunk)); err != nil {
				werr <- fmt.Errorf("chunk %d: %w", i, err)
				return
			}
			written.Add(1)
		}
		werr <- f.Sync()
	}()
	for written.Load() < chunks/4 {
		time.Sleep(time.Millisecond)
	}
	killed := time.Now()
	srv.kill()
	time.Sleep(time.Second)
	srv.start()
	t.Logf("server killed at chunk %d and restarted after %v", written.Load(), time.Since(killed))
	if err := <-werr; err != nil {
		t.Fatalf("writer: %v", err)
	}
	t.Logf("write finished %v after the kill", time.Since(killed))
	stop()
	if err := <-supDone; err != context.Canceled {
		t.Errorf("supervisor: %v", err)
	}
	close(events)
	var kinds []string
	reconnected := false
	for e := range events {
		kinds = append(kinds, fmt.Sprintf("%v@%d", e.Kind, e.Attempt))
		reconnected = reconnected || e.Kind == EventReconnected
	}
	t.Logf("supervisor events: %v", kinds)
	if !reconnected {
		t.Fatal("the supervisor never reconnected")
	}
	back, err := readDirect(d.Path, 0, len(data))
	if err != nil || sum(back) != sum(data) {
		t.Fatalf("read back after the restart: %v", err)
	}
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
	if sum(readFileAt(t, file, 0, len(data))) != sum(data) {
		t.Error("server file differs")
	}
}
