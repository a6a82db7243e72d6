// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// socketFiles returns n connected stream sockets (one end of socketpairs).
func socketFiles(t *testing.T, n int) []*os.File {
	t.Helper()
	var out []*os.File
	for range n {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
		t.Cleanup(func() { a.Close(); b.Close() })
		out = append(out, a)
	}
	return out
}

func fdsOf(files []*os.File) []uint32 {
	var out []uint32
	for _, f := range files {
		out = append(out, uint32(f.Fd()))
	}
	return out
}

func TestNetlinkAttachRequest(t *testing.T) {
	tests := []struct {
		name   string
		opts   func(*Options)
		cfg    func([]*os.File) Config
		nsocks int
		want   func([]*os.File) nlReq
	}{{
		name:   "defaults, index omitted",
		nsocks: 1,
		cfg: func(s []*os.File) Config {
			return Config{Sockets: s, SizeBytes: 1 << 30, ServerFlags: flagHasFlags | flagSendFlush, BackendID: "vol-1"}
		},
		want: func(s []*os.File) nlReq {
			return nlReq{Cmd: cmdConnect, Size: ptr[uint64](1 << 30), BlockSize: ptr[uint64](512),
				Timeout: ptr[uint64](0), DeadConn: ptr[uint64](0), ServerFlags: ptr[uint64](0b101),
				ClientFlags: ptr[uint64](0), Sockets: fdsOf(s), Backend: ptr("vol-1")}
		},
	}, {
		name:   "index, read-only, timeouts rounded up, destroy on disconnect, multi-conn",
		nsocks: 3,
		opts:   func(o *Options) { o.DestroyOnDisconnect = true },
		cfg: func(s []*os.File) Config {
			return Config{Sockets: s, SizeBytes: 10 << 20, BlockSize: 4096, ReadOnly: true, Index: ptr[uint32](7),
				ServerFlags: flagHasFlags | flagCanMultiConn, Timeout: 1500 * time.Millisecond,
				DeadConnTimeout: time.Minute, BackendID: "pvc-0a"}
		},
		want: func(s []*os.File) nlReq {
			return nlReq{Cmd: cmdConnect, Index: ptr[uint32](7), Size: ptr[uint64](10 << 20),
				BlockSize: ptr[uint64](4096), Timeout: ptr[uint64](2), DeadConn: ptr[uint64](60),
				ServerFlags: ptr(uint64(flagHasFlags | flagReadOnly | flagCanMultiConn)),
				ClientFlags: ptr[uint64](1), Sockets: fdsOf(s), Backend: ptr("pvc-0a")}
		},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tree := newFakeTree(t)
			k := newFakeKernel(t, tree)
			opts := tree.opts()
			if tc.opts != nil {
				tc.opts(&opts)
			}
			n := k.netlink(opts)
			socks := socketFiles(t, tc.nsocks)
			cfg := tc.cfg(socks)
			d, err := n.Attach(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			// STATUS first: only connected devices' backend files are read.
			if diff := cmp.Diff([]nlReq{{Cmd: cmdStatus}, tc.want(socks)}, k.requests()); diff != "" {
				t.Errorf("requests (-want +got):\n%s", diff)
			}
			var idx uint32
			if cfg.Index != nil {
				idx = *cfg.Index
			}
			want := Device{Index: idx, Path: devicePath(tree.dev, idx), BackendID: cfg.BackendID,
				SizeBytes: cfg.SizeBytes, Connected: true, PID: 4242, ReadOnly: cfg.ReadOnly}
			if diff := cmp.Diff(want, *d, cmp.AllowUnexported(Device{})); diff != "" {
				t.Errorf("device (-want +got):\n%s", diff)
			}
			if d.ProcessBound() || d.Done() != nil || !errors.Is(d.Wait(context.Background()), ErrNotProcessBound) {
				t.Error("a netlink device must not be process-bound")
			}
		})
	}
}

func TestNetlinkAttachInvalid(t *testing.T) {
	tree := newFakeTree(t)
	k := newFakeKernel(t, tree)
	n := k.netlink(tree.opts())
	s1, s2 := socketFiles(t, 1), socketFiles(t, 2)
	ok := Config{Sockets: s1, SizeBytes: 1 << 20, BackendID: "v"}
	tests := map[string]func(c *Config){
		"no sockets":             func(c *Config) { c.Sockets = nil },
		"nil socket":             func(c *Config) { c.Sockets = []*os.File{nil} },
		"zero size":              func(c *Config) { c.SizeBytes = 0 },
		"size beyond loff_t":     func(c *Config) { c.SizeBytes = 1 << 63 },
		"block size 256":         func(c *Config) { c.BlockSize = 256 },
		"block size 1536":        func(c *Config) { c.BlockSize = 1536 },
		"block size over page":   func(c *Config) { c.BlockSize = uint64(os.Getpagesize()) * 2 },
		"no backend":             func(c *Config) { c.BackendID = "" },
		"backend with newline":   func(c *Config) { c.BackendID = "a\nb" },
		"backend too long":       func(c *Config) { c.BackendID = strings.Repeat("x", MaxBackendIDLen+1) },
		"negative timeout":       func(c *Config) { c.Timeout = -time.Second },
		"multi-conn not offered": func(c *Config) { c.Sockets = s2 },
	}
	for name, mutate := range tests {
		t.Run(name, func(t *testing.T) {
			c := ok
			mutate(&c)
			if _, err := n.Attach(context.Background(), c); !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("got %v, want ErrInvalidConfig", err)
			}
		})
	}
	if r := k.requests(); len(r) != 0 {
		t.Errorf("invalid configs reached the kernel: %+v", r)
	}
}

func TestNetlinkAttachErrors(t *testing.T) {
	t.Run("busy index", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		tree.start(3, 1, 1<<20, 512, "other", false)
		n := k.netlink(tree.opts())
		_, err := n.Attach(context.Background(), Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, BackendID: "v", Index: ptr[uint32](3)})
		if !errors.Is(err, ErrDeviceBusy) || !errors.Is(err, syscall.EBUSY) {
			t.Fatalf("got %v, want ErrDeviceBusy wrapping EBUSY", err)
		}
	})
	t.Run("permission", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		k.fail[cmdConnect] = int(syscall.EPERM)
		n := k.netlink(tree.opts())
		_, err := n.Attach(context.Background(), Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, BackendID: "v"})
		if !errors.Is(err, ErrPermission) || !errors.Is(err, syscall.EPERM) {
			t.Fatalf("got %v, want ErrPermission wrapping EPERM", err)
		}
	})
	t.Run("backend already attached", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		tree.start(0, 1, 1<<20, 512, "v", false)
		n := k.netlink(tree.opts())
		_, err := n.Attach(context.Background(), Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, BackendID: "v"})
		if !errors.Is(err, ErrAlreadyAttached) {
			t.Fatalf("got %v, want ErrAlreadyAttached", err)
		}
		if r := k.requests(); len(r) != 1 || r[0].Cmd != cmdStatus {
			t.Errorf("sent %+v, want STATUS only", r)
		}
	})
	t.Run("backend already attached, STATUS failing", func(t *testing.T) {
		// Without STATUS every device's backend file is read: the
		// duplicate is still refused.
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		tree.start(3, 1, 1<<20, 512, "v", false)
		k.fail[cmdStatus] = int(syscall.EIO)
		n := k.netlink(tree.opts())
		_, err := n.Attach(context.Background(), Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, BackendID: "v"})
		if !errors.Is(err, ErrAlreadyAttached) {
			t.Fatalf("got %v, want ErrAlreadyAttached", err)
		}
		if r := k.requests(); len(r) != 1 || r[0].Cmd != cmdStatus {
			t.Errorf("sent %+v, want STATUS only", r)
		}
	})
	t.Run("kernel without backend identifiers", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		k.noBackendFile = true
		n := k.netlink(tree.opts())
		_, err := n.Attach(context.Background(), Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, BackendID: "v"})
		if !errors.Is(err, ErrNotSupported) {
			t.Fatalf("got %v, want ErrNotSupported", err)
		}
		r := k.requests()
		if len(r) != 3 || r[2].Cmd != cmdDisconnect || *r[2].Index != 0 {
			t.Errorf("the half-attached device was not disconnected: %+v", r)
		}
		if tree.started(0) {
			t.Error("nbd0 still started")
		}
	})
	t.Run("device node never appears", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		opts := tree.opts()
		opts.DevRoot = t.TempDir() // empty: no nodes
		opts.WaitTimeout = 50 * time.Millisecond
		n := k.netlink(opts)
		_, err := n.Attach(context.Background(), Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, BackendID: "v"})
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "node false") {
			t.Fatalf("got %v, want a readiness timeout naming the missing node", err)
		}
		if tree.started(0) {
			t.Error("nbd0 still started")
		}
	})
}

// TestNetlinkAckRules runs every request kind back to back on one
// connection: a wrong Acknowledge flag either hangs (no reply) or leaves an
// ACK queued that fails the next request's sequence check; the fake also
// asserts the flag directly.
func TestNetlinkAckRules(t *testing.T) {
	tree := newFakeTree(t)
	k := newFakeKernel(t, tree)
	n := k.netlink(tree.opts())
	ctx := context.Background()
	d, err := n.Attach(ctx, Config{Sockets: socketFiles(t, 1), SizeBytes: 1 << 20, BackendID: "v"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.Status(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.Reconfigure(ctx, d.Index, Reconfig{BackendID: "v", Sockets: socketFiles(t, 1)}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Status(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.Detach(ctx, d.Index); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Status(ctx); err != nil {
		t.Fatal(err)
	}
	var got []uint8
	for _, r := range k.requests() {
		got = append(got, r.Cmd)
	}
	want := []uint8{cmdStatus, cmdConnect, cmdStatus, cmdReconfigure, cmdStatus, cmdDisconnect, cmdStatus}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
}

func TestNetlinkDetach(t *testing.T) {
	ctx := context.Background()
	t.Run("not started is a no-op", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		tree.addDevice(2)
		n := k.netlink(tree.opts())
		for _, i := range []uint32{2, 99} {
			if err := n.Detach(ctx, i); err != nil {
				t.Fatalf("nbd%d: %v", i, err)
			}
		}
		if r := k.requests(); len(r) != 0 {
			t.Errorf("sent %+v", r)
		}
	})
	t.Run("disconnect and wait", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		tree.start(5, 1, 1<<20, 512, "v", false)
		n := k.netlink(tree.opts())
		if err := n.Detach(ctx, 5); err != nil {
			t.Fatal(err)
		}
		want := []nlReq{{Cmd: cmdDisconnect, Ack: true, Index: ptr[uint32](5)}}
		if diff := cmp.Diff(want, k.requests()); diff != "" {
			t.Errorf("requests (-want +got):\n%s", diff)
		}
		if tree.started(5) {
			t.Error("still started")
		}
	})
	t.Run("held open", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		k.holdOpen = true
		tree.start(1, 1, 1<<20, 512, "v", false)
		opts := tree.opts()
		opts.WaitTimeout = 30 * time.Millisecond
		n := k.netlink(opts)
		if err := n.Detach(ctx, 1); !errors.Is(err, ErrDeviceBusy) {
			t.Fatalf("got %v, want ErrDeviceBusy", err)
		}
	})
	t.Run("by backend", func(t *testing.T) {
		tree := newFakeTree(t)
		k := newFakeKernel(t, tree)
		tree.start(0, 1, 1<<20, 512, "a", false)
		tree.start(1, 1, 1<<20, 512, "b", false)
		n := k.netlink(tree.opts())
		if err := n.DetachBackend(ctx, "b"); err != nil {
			t.Fatal(err)
		}
		if !tree.started(0) || tree.started(1) {
			t.Error("detached the wrong device")
		}
		if err := n.DetachBackend(ctx, "b"); err != nil {
			t.Fatalf("second detach: %v", err)
		}
	})
}

func TestNetlinkReconfigureAndResize(t *testing.T) {
	ctx := context.Background()
	tree := newFakeTree(t)
	k := newFakeKernel(t, tree)
	tree.start(4, 1, 1<<20, 4096, "vol", false)
	n := k.netlink(tree.opts())

	if err := n.Reconfigure(ctx, 4, Reconfig{BackendID: "other"}); !errors.Is(err, ErrBackendMismatch) {
		t.Fatalf("mismatch: got %v", err)
	}
	if err := n.Reconfigure(ctx, 9, Reconfig{BackendID: "vol"}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("absent device: got %v", err)
	}
	if err := n.Reconfigure(ctx, 4, Reconfig{}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("no backend: got %v", err)
	}
	if len(k.requests()) != 0 {
		t.Fatalf("prechecks failed to stop requests: %+v", k.requests())
	}
	socks := socketFiles(t, 2)
	if err := n.Reconfigure(ctx, 4, Reconfig{BackendID: "vol", Sockets: socks,
		Timeout: ptr(10 * time.Second), DeadConnTimeout: ptr(time.Duration(0))}); err != nil {
		t.Fatal(err)
	}
	if err := n.Resize(ctx, 4, "vol", 3<<20); err != nil {
		t.Fatal(err)
	}
	want := []nlReq{
		{Cmd: cmdReconfigure, Ack: true, Index: ptr[uint32](4), Backend: ptr("vol"),
			Timeout: ptr[uint64](10), DeadConn: ptr[uint64](0), Sockets: fdsOf(socks)},
		{Cmd: cmdReconfigure, Ack: true, Index: ptr[uint32](4), Backend: ptr("vol"), Size: ptr[uint64](3 << 20)},
	}
	if diff := cmp.Diff(want, k.requests()); diff != "" {
		t.Errorf("requests (-want +got):\n%s", diff)
	}
	d, err := n.FindByBackend(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}
	if d.SizeBytes != 3<<20 {
		t.Errorf("size %d after resize", d.SizeBytes)
	}
}

func TestNetlinkInventory(t *testing.T) {
	ctx := context.Background()
	tree := newFakeTree(t)
	k := newFakeKernel(t, tree)
	tree.addDevice(0)
	tree.start(1, 11, 1<<20, 512, "a", true)
	tree.start(10, 12, 2<<20, 512, "", false) // ioctl-attached elsewhere
	n := k.netlink(tree.opts())
	got, err := n.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []Device{
		{Index: 0, Path: devicePath(tree.dev, 0)},
		{Index: 1, Path: devicePath(tree.dev, 1), BackendID: "a", SizeBytes: 1 << 20, Connected: true, PID: 11, ReadOnly: true},
		{Index: 10, Path: devicePath(tree.dev, 10), SizeBytes: 2 << 20, Connected: true, PID: 12},
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(Device{})); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
	d, err := n.FindByBackend(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want[1], *d, cmp.AllowUnexported(Device{})); diff != "" {
		t.Errorf("FindByBackend (-want +got):\n%s", diff)
	}
	if _, err := n.FindByBackend(ctx, "zzz"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown backend: got %v", err)
	}
	tree.start(2, 13, 1<<20, 512, "a", false)
	if _, err := n.FindByBackend(ctx, "a"); !errors.Is(err, ErrAlreadyAttached) {
		t.Errorf("duplicate backend: got %v", err)
	}
	st, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantSt := []Status{{0, false}, {1, true}, {2, true}, {10, true}}
	if diff := cmp.Diff(wantSt, st); diff != "" {
		t.Errorf("Status (-want +got):\n%s", diff)
	}
}

func TestNetlinkFamilyUnavailable(t *testing.T) {
	conn := genltest.Dial(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, genltest.Error(int(syscall.ENOENT))
	})
	_, err := newNetlinkConn(conn, nil, Options{})
	if !errors.Is(err, ErrNetlinkUnavailable) || !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("got %v, want ErrNetlinkUnavailable wrapping ENOENT", err)
	}
	for _, s := range []string{"hostNetwork", "6.4", "module"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
}

func TestNetlinkConcurrentAttachSameBackend(t *testing.T) {
	tree := newFakeTree(t)
	k := newFakeKernel(t, tree)
	n := k.netlink(tree.opts())
	const tries = 8
	errs := make(chan error, tries)
	for range tries {
		socks := socketFiles(t, 1)
		go func() {
			_, err := n.Attach(context.Background(), Config{Sockets: socks, SizeBytes: 1 << 20, BackendID: "same"})
			errs <- err
		}()
	}
	var ok int
	for range tries {
		err := <-errs
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, ErrAlreadyAttached):
			t.Errorf("unexpected error %v", err)
		}
	}
	if ok != 1 {
		t.Errorf("%d attaches of one backend succeeded, want 1", ok)
	}
}
