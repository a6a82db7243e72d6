// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"golang.org/x/sys/unix"
)

// ioCall is one system call the ioctl attacher made.
type ioCall struct {
	Dev string // nbdN
	Op  string // open, close, an ioctl name, BLKROSET, block-signals
	Arg uintptr
	TID int
}

// fakeIoctl is a stateful fake of the nbd ioctl interface over a fakeTree:
// SET_SOCK is refused with EBUSY on busy devices, NBD_DO_IT starts the
// device and blocks until NBD_DISCONNECT or NBD_CLEAR_SOCK.
type fakeIoctl struct {
	tree *fakeTree

	mu      sync.Mutex
	calls   []ioCall
	fds     map[int]string
	next    int
	busy    map[string]bool
	running map[string]chan struct{}
	blksize map[string]uint64
	blocks  map[string]uint64
	flags   map[string]uintptr
	// errs fails an operation on a device: "nbd1 NBD_SET_FLAGS" → errno.
	errs map[string]syscall.Errno
	// afterStart, if set, runs once NBD_DO_IT has started a device.
	afterStart func(index uint32)
}

func newFakeIoctl(tree *fakeTree) *fakeIoctl {
	return &fakeIoctl{tree: tree, fds: map[int]string{}, next: 100, busy: map[string]bool{},
		running: map[string]chan struct{}{}, blksize: map[string]uint64{}, blocks: map[string]uint64{},
		flags: map[string]uintptr{}, errs: map[string]syscall.Errno{}}
}

func (f *fakeIoctl) record(dev, op string, arg uintptr) error {
	f.calls = append(f.calls, ioCall{Dev: dev, Op: op, Arg: arg, TID: unix.Gettid()})
	if e := f.errs[dev+" "+op]; e != 0 {
		return e
	}
	return nil
}

func (f *fakeIoctl) Open(path string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	dev := filepath.Base(path)
	if err := f.record(dev, "open", 0); err != nil {
		return -1, err
	}
	if !isDevice(path) {
		return -1, syscall.ENOENT
	}
	f.next++
	f.fds[f.next] = dev
	return f.next, nil
}

func (f *fakeIoctl) Close(fd int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.record(f.fds[fd], "close", 0)
	delete(f.fds, fd)
	return err
}

func (f *fakeIoctl) SetReadOnly(fd int, ro bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var arg uintptr
	if ro {
		arg = 1
	}
	return f.record(f.fds[fd], "BLKROSET", arg)
}

func (f *fakeIoctl) BlockSignals() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.record("", "block-signals", 0)
}

func (f *fakeIoctl) Ioctl(fd int, req uint, arg uintptr) error {
	f.mu.Lock()
	dev := f.fds[fd]
	op := ioctlName(req)
	if err := f.record(dev, op, arg); err != nil {
		f.mu.Unlock()
		return err
	}
	var index uint32
	fmt.Sscanf(dev, "nbd%d", &index)
	switch req {
	case nbdSetSock:
		if f.busy[dev] {
			f.mu.Unlock()
			return syscall.EBUSY
		}
	case nbdSetBlksize:
		f.blksize[dev] = uint64(arg)
	case nbdSetSizeBlocks:
		f.blocks[dev] = uint64(arg)
		if f.running[dev] != nil {
			f.tree.setSize(index, f.blocks[dev]*f.blksize[dev])
		}
	case nbdSetFlags:
		f.flags[dev] = arg
	case nbdDoIt:
		stop := make(chan struct{})
		f.running[dev] = stop
		f.tree.start(index, 777, f.blocks[dev]*f.blksize[dev], f.blksize[dev], "", f.flags[dev]&uintptr(flagReadOnly) != 0)
		if f.afterStart != nil {
			f.afterStart(index)
		}
		f.mu.Unlock()
		<-stop
		f.mu.Lock()
		f.tree.stop(index)
	case nbdDisconnect, nbdClearSock:
		if stop := f.running[dev]; stop != nil {
			close(stop)
			delete(f.running, dev)
		}
	}
	f.mu.Unlock()
	return nil
}

func (f *fakeIoctl) recorded() []ioCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]ioCall(nil), f.calls...)
}

func ioctlTree(t *testing.T, devices int) (*fakeTree, *fakeIoctl, *Ioctl) {
	tree := newFakeTree(t)
	tree.loadModule(devices)
	for i := range devices {
		tree.addDevice(uint32(i))
	}
	f := newFakeIoctl(tree)
	return tree, f, newIoctl(f, tree.opts())
}

func TestIoctlAttachSequence(t *testing.T) {
	tree, f, x := ioctlTree(t, 4)
	f.busy["nbd0"] = true
	socks := socketFiles(t, 2)
	ctx := context.Background()
	d, err := x.Attach(ctx, Config{Sockets: socks, SizeBytes: 8<<20 + 100, BlockSize: 4096,
		ServerFlags: flagHasFlags | flagCanMultiConn, ReadOnly: true, Timeout: 30 * time.Second, BackendID: "vol"})
	if err != nil {
		t.Fatal(err)
	}
	want := Device{Index: 1, Path: devicePath(tree.dev, 1), BackendID: "vol", SizeBytes: 8 << 20,
		Connected: true, PID: 777, ReadOnly: true}
	if diff := cmp.Diff(want, *d, cmpopts.IgnoreUnexported(Device{})); diff != "" {
		t.Errorf("device (-want +got):\n%s", diff)
	}
	if !d.ProcessBound() {
		t.Error("an ioctl device is process-bound")
	}
	fd0, fd1 := uintptr(socks[0].Fd()), uintptr(socks[1].Fd())
	setup := []ioCall{
		{Op: "block-signals"},
		{Dev: "nbd0", Op: "open"}, {Dev: "nbd0", Op: "NBD_SET_SOCK", Arg: fd0}, {Dev: "nbd0", Op: "close"},
		{Dev: "nbd1", Op: "open"}, {Dev: "nbd1", Op: "NBD_SET_SOCK", Arg: fd0},
		{Dev: "nbd1", Op: "NBD_SET_SOCK", Arg: fd1},
		{Dev: "nbd1", Op: "NBD_SET_BLKSIZE", Arg: 4096},
		{Dev: "nbd1", Op: "NBD_SET_SIZE_BLOCKS", Arg: 2048},
		{Dev: "nbd1", Op: "NBD_SET_FLAGS", Arg: uintptr(flagHasFlags | flagReadOnly | flagCanMultiConn)},
		{Dev: "nbd1", Op: "NBD_SET_TIMEOUT", Arg: 30},
		{Dev: "nbd1", Op: "NBD_DO_IT"},
	}
	got := f.recorded()
	if diff := cmp.Diff(setup, got, cmpopts.IgnoreFields(ioCall{}, "TID")); diff != "" {
		t.Fatalf("setup calls (-want +got):\n%s", diff)
	}
	for _, c := range got[1:] {
		if c.TID != got[0].TID {
			t.Fatalf("%s on thread %d, signals were blocked on %d: the sequence must stay on one thread", c.Op, c.TID, got[0].TID)
		}
	}
	thread := got[0].TID

	if err := x.Detach(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := d.Wait(ctx); err != nil {
		t.Fatalf("Wait: %v", err)
	}
	select {
	case <-d.Done():
	default:
		t.Fatal("Done not closed after Detach")
	}
	teardown := f.recorded()[len(setup):]
	var after []ioCall
	for _, c := range teardown {
		if c.TID == thread {
			after = append(after, c)
		}
	}
	wantAfter := []ioCall{{Dev: "nbd1", Op: "NBD_CLEAR_QUE"}, {Dev: "nbd1", Op: "NBD_CLEAR_SOCK"}, {Dev: "nbd1", Op: "close"}}
	if diff := cmp.Diff(wantAfter, after, cmpopts.IgnoreFields(ioCall{}, "TID")); diff != "" {
		t.Errorf("calls on the device thread after NBD_DO_IT (-want +got):\n%s", diff)
	}
	var ops []string
	for _, c := range teardown {
		if c.TID != thread && c.Op != "open" && c.Op != "close" {
			ops = append(ops, c.Op)
		}
	}
	if diff := cmp.Diff([]string{"NBD_CLEAR_QUE", "NBD_DISCONNECT", "NBD_CLEAR_SOCK"}, ops); diff != "" {
		t.Errorf("detach calls (-want +got):\n%s", diff)
	}
	if tree.started(1) {
		t.Error("nbd1 still started")
	}
	if err := x.Detach(ctx, 1); err != nil {
		t.Errorf("second detach: %v", err)
	}
}

func TestIoctlSetFlagsFallback(t *testing.T) {
	_, f, x := ioctlTree(t, 1)
	f.errs["nbd0 NBD_SET_FLAGS"] = syscall.ENOTTY
	d, err := x.Attach(context.Background(), Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20,
		ServerFlags: flagHasFlags | flagReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	defer x.Detach(context.Background(), d.Index)
	var found bool
	for _, c := range f.recorded() {
		if c.Op == "BLKROSET" {
			found = c.Arg == 1
		}
	}
	if !found {
		t.Error("no BLKROSET 1 after NBD_SET_FLAGS failed with ENOTTY")
	}
}

func TestIoctlAttachErrors(t *testing.T) {
	ctx := context.Background()
	t.Run("all busy", func(t *testing.T) {
		_, f, x := ioctlTree(t, 2)
		f.busy["nbd0"], f.busy["nbd1"] = true, true
		_, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20})
		if !errors.Is(err, ErrDeviceBusy) {
			t.Fatalf("got %v, want ErrDeviceBusy", err)
		}
	})
	t.Run("requested index busy", func(t *testing.T) {
		_, f, x := ioctlTree(t, 2)
		f.busy["nbd1"] = true
		_, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, Index: ptr[uint32](1)})
		if !errors.Is(err, ErrDeviceBusy) || !errors.Is(err, syscall.EBUSY) {
			t.Fatalf("got %v, want ErrDeviceBusy wrapping EBUSY", err)
		}
	})
	t.Run("netlink-bound device is skipped", func(t *testing.T) {
		tree, f, x := ioctlTree(t, 2)
		tree.start(0, 5, 1<<20, 512, "nl", false)
		f.errs["nbd0 NBD_SET_SOCK"] = syscall.EINVAL
		d, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		if d.Index != 1 {
			t.Errorf("got nbd%d, want nbd1", d.Index)
		}
		if err := x.Detach(ctx, 1); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("setup failure clears the socket", func(t *testing.T) {
		_, f, x := ioctlTree(t, 1)
		f.errs["nbd0 NBD_SET_SIZE_BLOCKS"] = syscall.EINVAL
		_, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20})
		if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "NBD_SET_SIZE_BLOCKS") {
			t.Fatalf("got %v", err)
		}
		calls := f.recorded()
		last := calls[len(calls)-2:]
		if diff := cmp.Diff([]ioCall{{Dev: "nbd0", Op: "NBD_CLEAR_SOCK"}, {Dev: "nbd0", Op: "close"}}, last,
			cmpopts.IgnoreFields(ioCall{}, "TID")); diff != "" {
			t.Errorf("cleanup (-want +got):\n%s", diff)
		}
	})
	t.Run("DO_IT fails", func(t *testing.T) {
		_, f, x := ioctlTree(t, 1)
		f.errs["nbd0 NBD_DO_IT"] = syscall.EINVAL
		_, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20})
		if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "NBD_DO_IT") {
			t.Fatalf("got %v", err)
		}
	})
	// A sysfs read failing after NBD_DO_IT started the device must not
	// leave it running with nobody knowing about it.
	t.Run("sysfs read fails after start", func(t *testing.T) {
		tree, f, x := ioctlTree(t, 1)
		f.afterStart = func(i uint32) { tree.write(tree.blockFile(i, "ro"), "not-a-number\n") }
		_, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20})
		if err == nil {
			t.Fatal("attach succeeded over an unreadable sysfs file")
		}
		f.mu.Lock()
		running := len(f.running)
		f.mu.Unlock()
		if running != 0 || tree.started(0) {
			t.Fatalf("attach failed (%v) but left nbd0 running", err)
		}
	})
	t.Run("reconfigure unsupported", func(t *testing.T) {
		_, _, x := ioctlTree(t, 1)
		if err := x.Reconfigure(ctx, 0, Reconfig{BackendID: "v"}); !errors.Is(err, ErrNotSupported) {
			t.Fatalf("got %v", err)
		}
	})
}

func TestIoctlInventoryAndResize(t *testing.T) {
	ctx := context.Background()
	tree, f, x := ioctlTree(t, 3)
	tree.start(2, 9, 1<<20, 512, "nl-vol", false)
	d, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 4 << 20, BackendID: "mine"})
	if err != nil {
		t.Fatal(err)
	}
	defer x.Detach(ctx, d.Index)
	got, err := x.FindByBackend(ctx, "mine")
	if err != nil || got.Index != 0 || !got.ProcessBound() {
		t.Fatalf("FindByBackend(mine) = %+v, %v", got, err)
	}
	if got, err := x.FindByBackend(ctx, "nl-vol"); err != nil || got.Index != 2 || got.ProcessBound() {
		t.Fatalf("FindByBackend(nl-vol) = %+v, %v", got, err)
	}
	if _, err := x.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 4 << 20, BackendID: "mine"}); !errors.Is(err, ErrAlreadyAttached) {
		t.Fatalf("second attach: %v", err)
	}
	list, err := x.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range list {
		ids = append(ids, fmt.Sprintf("%d:%s:%v", d.Index, d.BackendID, d.Connected))
	}
	if diff := cmp.Diff([]string{"0:mine:true", "1::false", "2:nl-vol:true"}, ids); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
	if err := x.Resize(ctx, 0, "other", 8<<20); !errors.Is(err, ErrBackendMismatch) {
		t.Fatalf("resize with wrong backend: %v", err)
	}
	if err := x.Resize(ctx, 0, "mine", 8<<20); err != nil {
		t.Fatal(err)
	}
	var last ioCall
	for _, c := range f.recorded() {
		if c.Op == "NBD_SET_SIZE_BLOCKS" {
			last = c
		}
	}
	if last.Arg != 8<<20/512 {
		t.Errorf("resize sent %d blocks, want %d", last.Arg, 8<<20/512)
	}
}
