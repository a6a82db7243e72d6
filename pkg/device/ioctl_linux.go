// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"syscall"
)

// Ioctl attaches devices with the ioctl interface (include/uapi/linux/nbd.h),
// following the sequence qemu-nbd and rbd-nbd use: NBD_SET_SOCK for each
// socket, NBD_SET_BLKSIZE, NBD_SET_SIZE_BLOCKS, NBD_SET_FLAGS (BLKROSET on
// kernels without it), NBD_SET_TIMEOUT, then NBD_DO_IT, which blocks until
// the device is disconnected.
//
// A device attached this way lives only as long as this process: a thread
// blocks in NBD_DO_IT for the device's lifetime, and the kernel tears the
// device down if that thread is interrupted or the process dies. Device.Done
// and Device.Wait expose its end. There is no reconnect (Reconfigure returns
// ErrNotSupported) and no kernel-side backend identifier: BackendID is
// remembered in memory only.
type Ioctl struct {
	sys  ioctlSys
	fs   sysfs
	opts Options
	// why is the reason netlink was not used, when New fell back.
	why error

	mu        sync.Mutex
	sessions  map[uint32]*session
	attaching claims
}

var _ Attacher = (*Ioctl)(nil)

func newIoctl(sys ioctlSys, opts Options) *Ioctl {
	opts = opts.withDefaults()
	return &Ioctl{sys: sys, fs: sysfs{root: opts.SysRoot}, opts: opts, sessions: map[uint32]*session{}}
}

// Backend returns BackendIoctl.
func (x *Ioctl) Backend() Backend { return BackendIoctl }

// FallbackReason is why New chose ioctl instead of netlink (nil when ioctl
// was asked for).
func (x *Ioctl) FallbackReason() error { return x.why }

// Close does nothing: attached devices end when they are detached or the
// process exits.
func (x *Ioctl) Close() error { return nil }

type setupResult struct {
	index uint32
	s     *session
	err   error
}

// Attach claims a free device (or cfg.Index), configures it and starts it
// on a dedicated OS thread, and returns once the device is usable.
func (x *Ioctl) Attach(ctx context.Context, cfg Config) (*Device, error) {
	c, err := cfg.normalize(false)
	if err != nil {
		return nil, err
	}
	release, err := x.attaching.claim(c.BackendID)
	if err != nil {
		return nil, err
	}
	defer release()
	if c.BackendID != "" {
		if d, err := x.FindByBackend(ctx, c.BackendID); err == nil {
			return nil, fmt.Errorf("%w: backend %q is on nbd%d", ErrAlreadyAttached, c.BackendID, d.Index)
		} else if !errors.Is(err, ErrNotFound) {
			return nil, err
		}
	}
	fds, err := socketFDs(c.Sockets)
	if err != nil {
		return nil, err
	}
	res := make(chan setupResult, 1)
	go x.run(c, fds, res)
	r := <-res
	runtime.KeepAlive(c.Sockets)
	if r.err != nil {
		return nil, r.err
	}
	wctx, cancel := waitCtx(ctx, x.opts.WaitTimeout)
	defer cancel()
	path := devicePath(x.opts.DevRoot, r.index)
	err = poll(wctx, fmt.Sprintf("nbd%d to be ready", r.index), func() (bool, string, error) {
		select {
		case <-r.s.done:
			return false, "", fmt.Errorf("nbd%d ended while starting: %w", r.index, r.s.err)
		default:
		}
		pid, err := x.fs.pid(r.index)
		if err != nil {
			return false, "", err
		}
		sectors, err := x.fs.sizeSectors(r.index)
		if err != nil {
			return false, "", err
		}
		state := fmt.Sprintf("pid %d, %d sectors of %d, node %v", pid, sectors, c.expectedSectors, isDevice(path))
		return pid != 0 && c.sizeShown(sectors) && isDevice(path), state, nil
	})
	var d Device
	if err == nil {
		d, err = x.fs.device(x.opts.DevRoot, r.index)
	}
	if err != nil {
		// NBD_DO_IT is running: every failure from here on must stop the
		// device, or it would stay attached with nobody knowing of it.
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), x.opts.WaitTimeout)
		defer ccancel()
		if derr := x.Detach(cctx, r.index); derr != nil {
			return nil, fmt.Errorf("%w (and detaching it again: %w)", err, derr)
		}
		return nil, err
	}
	d.Connected = true
	d.BackendID = c.BackendID
	d.session = r.s
	return &d, nil
}

// run is the device's thread: everything from the first NBD_SET_SOCK to
// NBD_DO_IT must come from the same task (the kernel records the first
// caller in task_setup and refuses others with EBUSY), so it locks the OS
// thread and never unlocks it; the thread exits with the goroutine.
// Signals are blocked on it because a signal interrupting NBD_DO_IT's wait
// makes the kernel shut the sockets down and tear the device off.
func (x *Ioctl) run(c normalized, fds []uint32, res chan<- setupResult) {
	runtime.LockOSThread()
	if err := x.sys.BlockSignals(); err != nil {
		res <- setupResult{err: fmt.Errorf("block signals: %w", err)}
		return
	}
	fd, index, err := x.claim(c, fds[0])
	if err != nil {
		res <- setupResult{err: err}
		return
	}
	if err := x.configure(fd, index, c, fds[1:]); err != nil {
		_ = x.sys.Ioctl(fd, nbdClearSock, 0)
		_ = x.sys.Close(fd)
		res <- setupResult{err: err}
		return
	}
	s := newSession(index, c.BackendID)
	x.mu.Lock()
	x.sessions[index] = s
	x.mu.Unlock()
	res <- setupResult{index: index, s: s}

	err = x.sys.Ioctl(fd, nbdDoIt, 0)
	if err != nil {
		err = fmt.Errorf("nbd%d NBD_DO_IT: %w", index, err)
	}
	// As qemu's nbd_client does after NBD_DO_IT returns.
	_ = x.sys.Ioctl(fd, nbdClearQue, 0)
	_ = x.sys.Ioctl(fd, nbdClearSock, 0)
	_ = x.sys.Close(fd)
	x.mu.Lock()
	delete(x.sessions, index)
	x.mu.Unlock()
	s.finish(err)
}

// claim finds a free device by trying NBD_SET_SOCK on /dev/nbd0, nbd1, …
// (up to nbds_max), as rbd-nbd does: the kernel refuses a device that
// another task is setting up or running (EBUSY) and a netlink-bound one
// (EINVAL), which makes the search race-free. It returns the open device.
func (x *Ioctl) claim(c normalized, sock0 uint32) (int, uint32, error) {
	var candidates []uint32
	if c.Index != nil {
		candidates = []uint32{*c.Index}
	} else {
		max, err := x.fs.nbdsMax()
		if err != nil {
			return -1, 0, err
		}
		for i := 0; i < max; i++ {
			candidates = append(candidates, uint32(i))
		}
	}
	for _, i := range candidates {
		path := devicePath(x.opts.DevRoot, i)
		fd, err := x.sys.Open(path)
		if err != nil {
			if c.Index == nil && (errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ENXIO)) {
				continue
			}
			return -1, 0, fmt.Errorf("open %s: %w", path, err)
		}
		err = x.sys.Ioctl(fd, nbdSetSock, uintptr(sock0))
		if err == nil {
			return fd, i, nil
		}
		_ = x.sys.Close(fd)
		busy := errors.Is(err, syscall.EBUSY)
		if errors.Is(err, syscall.EINVAL) {
			// Also what a netlink-bound device answers; it is started.
			if pid, _ := x.fs.pid(i); pid != 0 {
				busy = true
			}
		}
		if !busy {
			return -1, 0, kernelError(fmt.Sprintf("nbd%d NBD_SET_SOCK", i), err)
		}
		if c.Index != nil {
			return -1, 0, fmt.Errorf("nbd%d NBD_SET_SOCK: %w: %w", i, ErrDeviceBusy, err)
		}
	}
	return -1, 0, fmt.Errorf("%w: no free device among /dev/nbd0 … nbd%d", ErrDeviceBusy, len(candidates)-1)
}

// configure issues the rest of the sequence on the claimed device.
func (x *Ioctl) configure(fd int, index uint32, c normalized, more []uint32) error {
	do := func(req uint, arg uintptr) error {
		if err := x.sys.Ioctl(fd, req, arg); err != nil {
			return kernelError(fmt.Sprintf("nbd%d %s", index, ioctlName(req)), err)
		}
		return nil
	}
	for _, s := range more {
		if err := do(nbdSetSock, uintptr(s)); err != nil {
			return err
		}
	}
	if err := do(nbdSetBlksize, uintptr(c.BlockSize)); err != nil {
		return err
	}
	// SET_SIZE_BLOCKS takes an unsigned long; the kernel shifts it by the
	// block size bits with an overflow check. A trailing partial block is
	// not addressable.
	blocks := c.SizeBytes / c.BlockSize
	if blocks > uint64(^uintptr(0)) {
		return fmt.Errorf("%w: %d blocks do not fit this architecture's ioctl argument", ErrInvalidConfig, blocks)
	}
	if err := do(nbdSetSizeBlocks, uintptr(blocks)); err != nil {
		return err
	}
	if err := x.sys.Ioctl(fd, nbdSetFlags, uintptr(c.flags)); err != nil {
		if !errors.Is(err, syscall.ENOTTY) {
			return kernelError(fmt.Sprintf("nbd%d NBD_SET_FLAGS", index), err)
		}
		// Kernels before NBD_SET_FLAGS: at least honour read-only.
		if err := x.sys.SetReadOnly(fd, c.flags&flagReadOnly != 0); err != nil {
			return kernelError(fmt.Sprintf("nbd%d BLKROSET", index), err)
		}
	}
	// Always set, even to 0, so a timeout left by a previous user of the
	// device is not inherited (0 resets the queue timeout to 30 s).
	if c.timeoutSec > uint64(^uintptr(0)) {
		return fmt.Errorf("%w: timeout of %d s does not fit the ioctl argument", ErrInvalidConfig, c.timeoutSec)
	}
	return do(nbdSetTimeout, uintptr(c.timeoutSec))
}

// Detach disconnects like qemu-nbd -d (NBD_CLEAR_QUE, NBD_DISCONNECT,
// NBD_CLEAR_SOCK; the last shuts the sockets down so NBD_DO_IT returns even
// when the server does not answer) and waits until the device is
// released. It works on devices attached by other processes too. A device
// that is not started is not an error.
func (x *Ioctl) Detach(ctx context.Context, index uint32) error {
	x.mu.Lock()
	s := x.sessions[index]
	x.mu.Unlock()
	pid, err := x.fs.pid(index)
	if err != nil {
		return err
	}
	if pid != 0 || s != nil {
		path := devicePath(x.opts.DevRoot, index)
		fd, err := x.sys.Open(path)
		if err != nil {
			return fmt.Errorf("open %s: %w", path, err)
		}
		_ = x.sys.Ioctl(fd, nbdClearQue, 0)
		derr := x.sys.Ioctl(fd, nbdDisconnect, 0)
		cerr := x.sys.Ioctl(fd, nbdClearSock, 0)
		_ = x.sys.Close(fd)
		if derr != nil && cerr != nil {
			return kernelError(fmt.Sprintf("nbd%d NBD_DISCONNECT", index), derr)
		}
	}
	wctx, cancel := waitCtx(ctx, x.opts.WaitTimeout)
	defer cancel()
	if s != nil {
		select {
		case <-s.done:
		case <-wctx.Done():
			return fmt.Errorf("%w: nbd%d: NBD_DO_IT has not returned: %w", ErrDeviceBusy, index, wctx.Err())
		}
	}
	return waitReleased(wctx, x.fs, index)
}

// DetachBackend detaches the device this process attached with backendID
// (or a netlink device carrying it), if any.
func (x *Ioctl) DetachBackend(ctx context.Context, backendID string) error {
	return detachBackend(ctx, x, x.fs, backendID)
}

// Reconfigure is not possible with ioctl.
func (x *Ioctl) Reconfigure(context.Context, uint32, Reconfig) error {
	return fmt.Errorf("reconfigure: %w with the ioctl interface", ErrNotSupported)
}

// Resize sets the size of a device this process attached (NBD_SET_SIZE_BLOCKS
// with the current logical block size) and waits until sysfs shows it.
func (x *Ioctl) Resize(ctx context.Context, index uint32, backendID string, sizeBytes uint64) error {
	x.mu.Lock()
	s := x.sessions[index]
	x.mu.Unlock()
	if s == nil {
		return fmt.Errorf("%w: nbd%d was not attached by this process", ErrNotFound, index)
	}
	if s.backendID != backendID {
		return fmt.Errorf("%w: nbd%d carries %q, not %q", ErrBackendMismatch, index, s.backendID, backendID)
	}
	bs, err := x.fs.logicalBlockSize(index)
	if err != nil {
		return err
	}
	if bs == 0 {
		return fmt.Errorf("nbd%d: no logical block size in sysfs", index)
	}
	if sizeBytes == 0 || sizeBytes > 1<<63-1 || sizeBytes/bs > uint64(^uintptr(0)) {
		return fmt.Errorf("%w: size %d", ErrInvalidConfig, sizeBytes)
	}
	path := devicePath(x.opts.DevRoot, index)
	fd, err := x.sys.Open(path)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	err = x.sys.Ioctl(fd, nbdSetSizeBlocks, uintptr(sizeBytes/bs))
	_ = x.sys.Close(fd)
	if err != nil {
		return kernelError(fmt.Sprintf("nbd%d NBD_SET_SIZE_BLOCKS", index), err)
	}
	return waitSize(ctx, x.fs, index, sizeBytes/bs*bs, x.opts.WaitTimeout)
}

// Status reports every nbd device in sysfs; without netlink, a device
// counts as connected while it is started (its pid file exists).
func (x *Ioctl) Status(context.Context) ([]Status, error) {
	idx, err := x.fs.indexes()
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(idx))
	for _, i := range idx {
		pid, err := x.fs.pid(i)
		if err != nil {
			return nil, err
		}
		out = append(out, Status{Index: i, Connected: pid != 0})
	}
	return out, nil
}

// List reads every nbd device from sysfs; devices attached by this process
// carry their BackendID and session.
func (x *Ioctl) List(ctx context.Context) ([]Device, error) {
	ds, err := inventory(ctx, x.fs, x.opts.DevRoot, x.Status)
	if err != nil {
		return nil, err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	for i := range ds {
		if s := x.sessions[ds[i].Index]; s != nil {
			ds[i].BackendID, ds[i].session = s.backendID, s
		}
	}
	return ds, nil
}

// FindByBackend looks among devices this process attached, then among
// netlink devices' backend files.
func (x *Ioctl) FindByBackend(ctx context.Context, backendID string) (*Device, error) {
	x.mu.Lock()
	var own *session
	for _, s := range x.sessions {
		if s.backendID == backendID {
			own = s
		}
	}
	x.mu.Unlock()
	if own != nil {
		d, err := x.fs.device(x.opts.DevRoot, own.index)
		if err != nil {
			return nil, err
		}
		d.Connected, d.BackendID, d.session = d.PID != 0, backendID, own
		return &d, nil
	}
	return findByBackend(ctx, x.fs, x.opts.DevRoot, backendID, x.Status, false)
}
