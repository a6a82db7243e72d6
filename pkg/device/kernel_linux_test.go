// SPDX-License-Identifier: Apache-2.0

package device

import (
	"github.com/nbd-csi/nbd-csi/internal/servers"

	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Kernel tests: see requireKernel. Each detaches what it attached.

func TestKernelNew(t *testing.T) {
	requireKernel(t)
	a, err := New(ctxFor(t, time.Minute), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if a.Backend() != BackendNetlink {
		t.Fatalf("New chose %v, want netlink", a.Backend())
	}
}

func TestKernelNetlinkAttach(t *testing.T) {
	n := kernelNetlink(t)
	t.Run("memory", func(t *testing.T) {
		srv := startNbdkit(t, "memory", "size=64M")
		attachWriteRead(t, n, srv, "kt-memory", "")
	})
	t.Run("file", func(t *testing.T) {
		file := sparseFile(t, t.TempDir(), "disk.img", 32<<20)
		srv := startNbdkit(t, "file", "file="+file)
		attachWriteRead(t, n, srv, "kt-file", file)
	})
}

// TestKernelAttachOtherServers attaches exports of qemu-nbd and nbd-server
// (nbdkit is covered above) and moves data both ways, checked on the
// server's file.
func TestKernelAttachOtherServers(t *testing.T) {
	n := kernelNetlink(t)
	t.Run("qemu-nbd", func(t *testing.T) {
		file := sparseFile(t, t.TempDir(), "disk.img", 32<<20)
		srv := &nbdkit{Server: servers.QemuNBD(t, servers.Unix, "-x", "disk", "-f", "raw", file), export: "disk"}
		attachWriteRead(t, n, srv, "kt-qemu", file)
	})
	t.Run("nbd-server", func(t *testing.T) {
		file := sparseFile(t, t.TempDir(), "disk.img", 32<<20)
		srv := &nbdkit{Server: servers.NBDServer(t, servers.Unix, "[disk]\nexportname = "+file+"\n"), export: "disk"}
		attachWriteRead(t, n, srv, "kt-nbd-server", file)
	})
}

// attachWriteRead attaches srv's default export, writes random data with
// O_DIRECT, reads it back, checks inventory, detaches, and (for a file
// export) checks the data on the server side.
func attachWriteRead(t *testing.T, n *Netlink, srv *nbdkit, id, file string) {
	ctx := ctxFor(t, 2*time.Minute)
	sock, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	d, err := n.Attach(ctx, Config{Sockets: []*os.File{sock}, SizeBytes: size, ServerFlags: flags, BackendID: id})
	sock.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("attached %s (%d bytes, flags %#x) as %s in %v", id, size, flags, d.Path, time.Since(start))
	detachAtCleanup(t, n, d.Index)
	if d.SizeBytes != size || d.BackendID != id || d.PID == 0 || d.ReadOnly || !d.Connected {
		t.Errorf("device %+v", d)
	}
	if got := blockDeviceSize(t, d.Path); got != size {
		t.Errorf("BLKGETSIZE64 %d, want %d", got, size)
	}
	data := randomBuf(t, 4<<20)
	const off = 1 << 20
	if err := writeDirect(d.Path, off, data); err != nil {
		t.Fatal(err)
	}
	back, err := readDirect(d.Path, off, len(data))
	if err != nil {
		t.Fatal(err)
	}
	if sum(back) != sum(data) {
		t.Fatal("read back differs from what was written")
	}
	found, err := n.FindByBackend(ctx, id)
	if err != nil || found.Index != d.Index {
		t.Fatalf("FindByBackend = %+v, %v", found, err)
	}
	list, err := n.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var listed bool
	for _, x := range list {
		listed = listed || (x.Index == d.Index && x.BackendID == id && x.Connected && x.SizeBytes == size)
	}
	if !listed {
		t.Errorf("List does not show nbd%d: %+v", d.Index, list)
	}
	start = time.Now()
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
	t.Logf("detached in %v", time.Since(start))
	if _, err := n.FindByBackend(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Errorf("after detach FindByBackend: %v", err)
	}
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Errorf("second detach: %v", err)
	}
	if file != "" && sum(readFileAt(t, file, off, len(data))) != sum(data) {
		t.Error("the server's file does not hold what was written")
	}
}

func TestKernelReadOnly(t *testing.T) {
	n := kernelNetlink(t)
	check := func(t *testing.T, srv *nbdkit, readOnly bool) {
		ctx := ctxFor(t, time.Minute)
		sock, size, flags, err := srv.dial("")
		if err != nil {
			t.Fatal(err)
		}
		defer sock.Close()
		d, err := n.Attach(ctx, Config{Sockets: []*os.File{sock}, SizeBytes: size, ServerFlags: flags,
			ReadOnly: readOnly, BackendID: "kt-ro"})
		if err != nil {
			t.Fatal(err)
		}
		detachAtCleanup(t, n, d.Index)
		if !d.ReadOnly {
			t.Errorf("ro not set: %+v", d)
		}
		err = writeDirect(d.Path, 0, alignedBuf(4096))
		if !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
			t.Errorf("write to a read-only device: got %v, want EPERM/EROFS/EACCES", err)
		}
		if _, err := readDirect(d.Path, 0, 4096); err != nil {
			t.Errorf("read: %v", err)
		}
	}
	t.Run("read-only export", func(t *testing.T) {
		check(t, startNbdkit(t, "-r", "memory", "size=16M"), false)
	})
	t.Run("read-only attach of a writable export", func(t *testing.T) {
		check(t, startNbdkit(t, "memory", "size=16M"), true)
	})
}

func TestKernelMultiConn(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, 2*time.Minute)
	srv := startNbdkit(t, "memory", "size=64M")
	socks, size, flags := srv.dialN(t, 4)
	if flags&flagCanMultiConn == 0 {
		t.Fatalf("nbdkit memory did not advertise CAN_MULTI_CONN (flags %#x)", flags)
	}
	d, err := n.Attach(ctx, Config{Sockets: socks, SizeBytes: size, ServerFlags: flags, BackendID: "kt-multi"})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, n, d.Index)
	// One hardware queue per connection (blk_mq_update_nr_hw_queues), at
	// most one per CPU.
	want := min(4, runtime.NumCPU())
	if q, err := filepath.Glob(filepath.Join("/sys/block", filepath.Base(d.Path), "mq", "*")); err != nil || len(q) != want {
		t.Errorf("%d hardware queues, want %d (%v)", len(q), want, err)
	}
	data := randomBuf(t, 16<<20)
	if err := writeDirect(d.Path, 0, data); err != nil {
		t.Fatal(err)
	}
	back, err := readDirect(d.Path, 0, len(data))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("read back differs")
	}
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
}

func TestKernelDetachAfterServerGone(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, time.Minute)
	srv := startNbdkit(t, "memory", "size=16M")
	sock, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	d, err := n.Attach(ctx, Config{Sockets: []*os.File{sock}, SizeBytes: size, ServerFlags: flags,
		Timeout: 5 * time.Second, BackendID: "kt-gone"})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, n, d.Index)
	srv.kill()
	// I/O now fails (dead-connection timeout 0) instead of hanging.
	if _, err := readDirect(d.Path, 1<<20, 4096); err == nil {
		t.Error("read from a device whose server is gone succeeded")
	}
	start := time.Now()
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
	t.Logf("detached in %v", time.Since(start))
	if pid, _ := (sysfs{root: "/sys"}).pid(d.Index); pid != 0 {
		t.Errorf("pid file still there (%d)", pid)
	}
}

// TestKernelResize grows a file export: Resize changes the kernel's size,
// the old connection (negotiated at the old size) refuses the new space,
// and once the connection is replaced (here: the server restarts and the
// Supervisor, told the new size with SetExport, reconnects) it is usable.
func TestKernelResize(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, 2*time.Minute)
	file := sparseFile(t, t.TempDir(), "disk.img", 8<<20)
	srv := startNbdkit(t, "file", "file="+file)
	sock, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	d, err := n.Attach(ctx, Config{Sockets: []*os.File{sock}, SizeBytes: size, ServerFlags: flags,
		Timeout: 5 * time.Second, DeadConnTimeout: 30 * time.Second, BackendID: "kt-resize"})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, n, d.Index)
	data := randomBuf(t, 1<<20)
	if err := writeDirect(d.Path, 6<<20, data); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, 16<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.Resize(ctx, d.Index, "wrong-id", 16<<20); !errors.Is(err, ErrBackendMismatch) {
		t.Errorf("resize with another backend id: %v", err)
	}
	if err := n.Resize(ctx, d.Index, "kt-resize", 16<<20); err != nil {
		t.Fatal(err)
	}
	if got := blockDeviceSize(t, d.Path); got != 16<<20 {
		t.Errorf("BLKGETSIZE64 %d after resize", got)
	}
	if dev, err := n.FindByBackend(ctx, "kt-resize"); err != nil || dev.SizeBytes != 16<<20 {
		t.Errorf("after resize: %+v, %v", dev, err)
	}
	back, err := readDirect(d.Path, 6<<20, len(data))
	if err != nil || !bytes.Equal(back, data) {
		t.Errorf("data before the old end changed: %v", err)
	}
	_, err = readDirect(d.Path, 12<<20, 4096)
	t.Logf("read beyond the old end on the old connection: %v", err)

	reconnected, watching := make(chan struct{}, 1), make(chan struct{}, 1)
	sup, err := NewSupervisor(n, SupervisorConfig{
		Index: d.Index, BackendID: "kt-resize", SizeBytes: size, ServerFlags: flags, DeadConnTimeout: 30 * time.Second,
		Redial: func(context.Context) ([]*os.File, uint64, uint16, error) {
			f, s, fl, err := srv.dial("")
			if err != nil {
				return nil, 0, 0, err
			}
			return []*os.File{f}, s, fl, nil
		},
		MinBackoff: 50 * time.Millisecond,
		OnEvent: func(e Event) {
			switch e.Kind {
			case EventReconnected:
				reconnected <- struct{}{}
			case EventWatching:
				watching <- struct{}{}
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	sup.SetExport(16<<20, flags)
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = sup.Run(sctx) }()
	<-watching // a link that dies before the subscription is not reported
	srv.kill()
	srv.start()
	select {
	case <-reconnected:
	case <-time.After(30 * time.Second):
		t.Fatal("no reconnect")
	}
	more := randomBuf(t, 1<<20)
	if err := writeDirect(d.Path, 12<<20, more); err != nil {
		t.Fatalf("write to the new space after reconnecting: %v", err)
	}
	if back, err := readDirect(d.Path, 12<<20, len(more)); err != nil || !bytes.Equal(back, more) {
		t.Fatalf("read back the new space: %v", err)
	}
	stop()
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFileAt(t, file, 12<<20, len(more)), more) || !bytes.Equal(readFileAt(t, file, 6<<20, len(data)), data) {
		t.Error("server file differs")
	}
}

func TestKernelIoctl(t *testing.T) {
	requireKernel(t)
	x, err := NewIoctl(Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxFor(t, 2*time.Minute)
	srv := startNbdkit(t, "memory", "size=32M")
	sock, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	start := time.Now()
	d, err := x.Attach(ctx, Config{Sockets: []*os.File{sock}, SizeBytes: size, ServerFlags: flags,
		Timeout: 30 * time.Second, BackendID: "kt-ioctl"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("attached %s with ioctl in %v", d.Path, time.Since(start))
	detachAtCleanup(t, x, d.Index)
	if !d.ProcessBound() || d.SizeBytes != size {
		t.Errorf("device %+v", d)
	}
	if b, ok, _ := (sysfs{root: "/sys"}).backend(d.Index); ok {
		t.Errorf("an ioctl device has a backend file (%q)", b)
	}
	data := randomBuf(t, 4<<20)
	if err := writeDirect(d.Path, 0, data); err != nil {
		t.Fatal(err)
	}
	back, err := readDirect(d.Path, 0, len(data))
	if err != nil || !bytes.Equal(back, data) {
		t.Fatalf("read back: %v", err)
	}
	if got, err := x.FindByBackend(ctx, "kt-ioctl"); err != nil || got.Index != d.Index {
		t.Errorf("FindByBackend = %+v, %v", got, err)
	}
	if err := x.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
	if err := d.Wait(ctx); err != nil {
		t.Errorf("NBD_DO_IT after a requested disconnect: %v", err)
	}
	if pid, _ := (sysfs{root: "/sys"}).pid(d.Index); pid != 0 {
		t.Errorf("pid file still there (%d)", pid)
	}
}

// TestKernelIoctlSkipsNetlinkDevice checks the free-device search against
// a device netlink holds (the kernel refuses ioctls on it).
func TestKernelIoctlSkipsNetlinkDevice(t *testing.T) {
	n := kernelNetlink(t)
	x, err := NewIoctl(Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxFor(t, time.Minute)
	srv := startNbdkit(t, "memory", "size=16M")
	s1, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	nd, err := n.Attach(ctx, Config{Sockets: []*os.File{s1}, SizeBytes: size, ServerFlags: flags,
		Index: ptr[uint32](0), BackendID: "kt-nl0"})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, n, nd.Index)
	s2, _, _, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	xd, err := x.Attach(ctx, Config{Sockets: []*os.File{s2}, SizeBytes: size, ServerFlags: flags})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, x, xd.Index)
	if xd.Index == 0 {
		t.Fatal("ioctl attach took the netlink device")
	}
	if err := x.Detach(ctx, xd.Index); err != nil {
		t.Fatal(err)
	}
	if id, _, _ := (sysfs{root: "/sys"}).backend(0); id != "kt-nl0" {
		t.Errorf("netlink device disturbed: backend %q", id)
	}
}

func TestKernelAttachErrors(t *testing.T) {
	n := kernelNetlink(t)
	ctx := ctxFor(t, time.Minute)
	srv := startNbdkit(t, "memory", "size=16M")
	s1, size, flags, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	d, err := n.Attach(ctx, Config{Sockets: []*os.File{s1}, SizeBytes: size, ServerFlags: flags, BackendID: "kt-err"})
	if err != nil {
		t.Fatal(err)
	}
	detachAtCleanup(t, n, d.Index)
	s2, _, _, err := srv.dial("")
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	_, err = n.Attach(ctx, Config{Sockets: []*os.File{s2}, SizeBytes: size, ServerFlags: flags, BackendID: "kt-err"})
	if !errors.Is(err, ErrAlreadyAttached) {
		t.Errorf("same backend twice: %v", err)
	}
	_, err = n.Attach(ctx, Config{Sockets: []*os.File{s2}, SizeBytes: size, ServerFlags: flags,
		BackendID: "kt-err-2", Index: &d.Index})
	if !errors.Is(err, ErrDeviceBusy) || !errors.Is(err, syscall.EBUSY) {
		t.Errorf("connect to a busy index: %v", err)
	}
	if err := n.Reconfigure(ctx, d.Index, Reconfig{BackendID: "not-it"}); !errors.Is(err, ErrBackendMismatch) {
		t.Errorf("reconfigure with another backend: %v", err)
	}
	if !strings.HasPrefix(d.Path, "/dev/nbd") {
		t.Errorf("path %q", d.Path)
	}
}
