// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/pkg/device"
)

// fakeKernel models the nbd driver's netlink side as far as supervision
// sees it, including what the real one refuses or ignores:
//
//   - CONNECT takes a reference on every socket (a descriptor of its own);
//   - RECONFIGURE puts each socket into the first dead slot, releasing the
//     dead socket it replaces; once no dead slot is left it ignores the
//     rest and still returns success (nbd_genl_reconfigure swallows
//     -ENOSPC), dropping its reference to the ignored socket;
//   - a slot dies when its socket fails (a reader per slot sees EOF or an
//     error, as recv_work does): the kernel shuts the socket down, marks
//     the slot dead and multicasts LINK_DEAD;
//   - DISCONNECT can be made to fail.
//
// Sockets are real, so sock_diag on the host sees the kernel's references
// as the real kernel's.
type fakeKernel struct {
	t *testing.T

	mu        sync.Mutex
	devs      map[uint32]*fakeDev
	next      uint32
	watchers  []chan uint32
	watches   int // WatchLinkDead calls
	statuses  int // Status calls
	reconfigs []fakeReconfig
	// detachErr fails DISCONNECT.
	detachErr error
}

type fakeReconfig struct {
	index          uint32
	handed, taken  int
	backend        string
	resizedToBytes uint64
}

type fakeDev struct {
	index   uint32
	backend string
	size    uint64
	slots   []*fakeSlot
}

type fakeSlot struct {
	f    *os.File // the kernel's reference
	dead bool
}

func newFakeKernel(t *testing.T) *fakeKernel {
	k := &fakeKernel{t: t, devs: map[uint32]*fakeDev{}}
	t.Cleanup(func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		for _, d := range k.devs {
			for _, s := range d.slots {
				_ = unix.Shutdown(int(s.f.Fd()), unix.SHUT_RDWR)
				s.f.Close()
			}
		}
		k.devs = nil
	})
	return k
}

// ref takes the kernel's own reference on a socket (sockfd_lookup).
func ref(f *os.File) *os.File {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		panic(err)
	}
	return os.NewFile(uintptr(fd), "kernel-ref")
}

// recv is the slot's receive worker: when the connection fails it marks
// the slot dead (nbd_mark_nsock_dead) and notifies.
func (k *fakeKernel) recv(d *fakeDev, s *fakeSlot, f *os.File) {
	// Its own descriptor (taken before the goroutine starts), so that the
	// slot's may be closed meanwhile; the socket is shut down before any
	// slot is let go, which ends the read.
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		panic(err)
	}
	go k.read(d, s, f, fd)
}

func (k *fakeKernel) read(d *fakeDev, s *fakeSlot, f *os.File, fd int) {
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR || n > 0 {
			continue
		}
		break
	}
	unix.Close(fd)
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.devs == nil || k.devs[d.index] != d || s.dead || s.f != f {
		return
	}
	_ = unix.Shutdown(int(f.Fd()), unix.SHUT_RDWR)
	s.dead = true
	k.notify(d.index)
}

func (k *fakeKernel) notify(index uint32) {
	for _, ch := range k.watchers {
		select {
		case ch <- index:
		default:
		}
	}
}

// kill makes a slot's connection fail, as a request timeout does.
func (k *fakeKernel) kill(index uint32, slot int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	_ = unix.Shutdown(int(k.devs[index].slots[slot].f.Fd()), unix.SHUT_RDWR)
}

// killQuietly marks a slot dead with the notification lost (no plugin was
// listening).
func (k *fakeKernel) killQuietly(index uint32, slot int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	s := k.devs[index].slots[slot]
	s.dead = true
	_ = unix.Shutdown(int(s.f.Fd()), unix.SHUT_RDWR)
}

// lose tells every watcher that notifications were lost.
func (k *fakeKernel) lose() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.notify(device.AnyIndex)
}

func (k *fakeKernel) live(index uint32) (live, dead int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devs[index]
	if d == nil {
		return 0, 0
	}
	for _, s := range d.slots {
		if s.dead {
			dead++
		} else {
			live++
		}
	}
	return live, dead
}

func (k *fakeKernel) device(d *fakeDev) *device.Device {
	return &device.Device{Index: d.index, Path: fmt.Sprintf("/dev/nbd%d", d.index), BackendID: d.backend,
		SizeBytes: d.size, Connected: true, PID: 1}
}

func (k *fakeKernel) Attach(_ context.Context, cfg device.Config) (*device.Device, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, d := range k.devs {
		if d.backend == cfg.BackendID {
			return nil, device.ErrAlreadyAttached
		}
	}
	d := &fakeDev{index: k.next, backend: cfg.BackendID, size: cfg.SizeBytes &^ 511}
	k.next++
	for _, f := range cfg.Sockets {
		s := &fakeSlot{f: ref(f)}
		d.slots = append(d.slots, s)
		k.recv(d, s, s.f)
	}
	k.devs[d.index] = d
	return k.device(d), nil
}

func (k *fakeKernel) Detach(ctx context.Context, index uint32) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.detachErr != nil {
		return k.detachErr
	}
	d := k.devs[index]
	if d == nil {
		return nil
	}
	delete(k.devs, index)
	for _, s := range d.slots {
		_ = unix.Shutdown(int(s.f.Fd()), unix.SHUT_RDWR)
		s.f.Close()
	}
	return nil
}

func (k *fakeKernel) DetachBackend(ctx context.Context, backendID string) error {
	d, err := k.FindByBackend(ctx, backendID)
	if err != nil {
		return nil
	}
	return k.Detach(ctx, d.Index)
}

func (k *fakeKernel) Reconfigure(_ context.Context, index uint32, rc device.Reconfig) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devs[index]
	if d == nil {
		return device.ErrNotFound
	}
	if rc.BackendID != d.backend {
		return device.ErrBackendMismatch
	}
	r := fakeReconfig{index: index, handed: len(rc.Sockets), backend: rc.BackendID}
	if rc.SizeBytes != 0 {
		d.size = rc.SizeBytes
		r.resizedToBytes = rc.SizeBytes
	}
	for _, f := range rc.Sockets {
		var slot *fakeSlot
		for _, s := range d.slots {
			if s.dead {
				slot = s
				break
			}
		}
		if slot == nil {
			break // -ENOSPC: the rest is ignored, success is reported
		}
		slot.f.Close() // sockfd_put(old)
		slot.f, slot.dead = ref(f), false
		k.recv(d, slot, slot.f)
		r.taken++
	}
	k.reconfigs = append(k.reconfigs, r)
	return nil
}

func (k *fakeKernel) Resize(ctx context.Context, index uint32, backendID string, sizeBytes uint64) error {
	return k.Reconfigure(ctx, index, device.Reconfig{BackendID: backendID, SizeBytes: sizeBytes})
}

func (k *fakeKernel) Status(context.Context) ([]device.Status, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.statuses++
	var out []device.Status
	for _, d := range k.devs {
		out = append(out, device.Status{Index: d.index, Connected: true})
	}
	return out, nil
}

func (k *fakeKernel) List(context.Context) ([]device.Device, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []device.Device
	for _, d := range k.devs {
		out = append(out, *k.device(d))
	}
	return out, nil
}

func (k *fakeKernel) FindByBackend(_ context.Context, backendID string) (*device.Device, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, d := range k.devs {
		if d.backend == backendID {
			return k.device(d), nil
		}
	}
	return nil, device.ErrNotFound
}

func (k *fakeKernel) WatchLinkDead(ctx context.Context) (<-chan uint32, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.watches++
	ch := make(chan uint32, 64)
	k.watchers = append(k.watchers, ch)
	return ch, nil
}

func (k *fakeKernel) Backend() device.Backend { return device.BackendNetlink }
func (k *fakeKernel) Close() error            { return nil }

var (
	_ device.Attacher    = (*fakeKernel)(nil)
	_ device.Reconnector = (*fakeKernel)(nil)
)
