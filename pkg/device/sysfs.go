// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// sysfs reads what drivers/block/nbd.c and the block layer publish under
// /sys (rooted at root, so tests can use a temporary tree):
//
//	block/nbdN/pid      exists only while the device is started
//	block/nbdN/backend  netlink devices: the backend identifier + "\n"
//	block/nbdN/size     size in 512-byte sectors
//	block/nbdN/ro       "1" when read-only
//	module/nbd/parameters/nbds_max
type sysfs struct {
	root string
}

func (s sysfs) blockDir(index uint32) string {
	return filepath.Join(s.root, "block", fmt.Sprintf("nbd%d", index))
}

// exists reports whether /sys/block/nbdN exists.
func (s sysfs) exists(index uint32) bool {
	_, err := os.Stat(s.blockDir(index))
	return err == nil
}

// readFile returns the file's content, or ok=false when it does not exist
// (including when the device directory itself is gone).
func (s sysfs) readFile(index uint32, name string) (content string, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(s.blockDir(index), name))
	// Under concurrent attaches and detaches the kernel answers ENODEV for
	// a moment on a device's attribute while it is being replaced (seen on
	// a freshly started device's backend file, TestKernelConcurrentAttach):
	// read again briefly before reporting it.
	for try := 0; errors.Is(err, syscall.ENODEV) && try < 50; try++ {
		time.Sleep(2 * time.Millisecond)
		b, err = os.ReadFile(filepath.Join(s.blockDir(index), name))
	}
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, os.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("read nbd%d %s: %w", index, name, err)
	}
	return string(b), true, nil
}

func (s sysfs) readUint(index uint32, name string) (uint64, bool, error) {
	c, ok, err := s.readFile(index, name)
	if err != nil || !ok {
		return 0, ok, err
	}
	v, err := strconv.ParseUint(strings.TrimSpace(c), 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("parse nbd%d %s: %w", index, name, err)
	}
	return v, true, nil
}

// pid returns the pid file's value, 0 when the device is not started.
func (s sysfs) pid(index uint32) (int, error) {
	v, ok, err := s.readUint(index, "pid")
	if err != nil || !ok {
		return 0, err
	}
	return int(v), nil
}

// sizeSectors returns the size in 512-byte sectors (0 if absent).
func (s sysfs) sizeSectors(index uint32) (uint64, error) {
	v, _, err := s.readUint(index, "size")
	return v, err
}

// backend returns the backend identifier; ok is false when the file does
// not exist (device not connected through netlink).
func (s sysfs) backend(index uint32) (id string, ok bool, err error) {
	c, ok, err := s.readFile(index, "backend")
	if err != nil || !ok {
		return "", ok, err
	}
	// backend_show prints "%s\n"; identifiers cannot contain "\n".
	return strings.TrimSuffix(c, "\n"), true, nil
}

func (s sysfs) readOnly(index uint32) (bool, error) {
	v, _, err := s.readUint(index, "ro")
	return v != 0, err
}

// logicalBlockSize is queue/logical_block_size (0 if absent).
func (s sysfs) logicalBlockSize(index uint32) (uint64, error) {
	v, _, err := s.readUint(index, "queue/logical_block_size")
	return v, err
}

// indexes lists the nbd devices under block/, sorted.
func (s sysfs) indexes() ([]uint32, error) {
	entries, err := os.ReadDir(filepath.Join(s.root, "block"))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	var out []uint32
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "nbd")
		if !ok {
			continue
		}
		v, err := strconv.ParseUint(rest, 10, 32)
		if err != nil {
			continue // not nbdN (e.g. a partition name would be nbdNpM)
		}
		out = append(out, uint32(v))
	}
	slices.Sort(out)
	return out, nil
}

// moduleLoaded reports whether /sys/module/nbd exists (also true for a
// built-in driver, whose parameters are published there too).
func (s sysfs) moduleLoaded() bool {
	_, err := os.Stat(filepath.Join(s.root, "module", "nbd"))
	return err == nil
}

// nbdsMax is the nbds_max module parameter.
func (s sysfs) nbdsMax() (int, error) {
	b, err := os.ReadFile(filepath.Join(s.root, "module", "nbd", "parameters", "nbds_max"))
	if err != nil {
		return 0, fmt.Errorf("read nbds_max: %w", err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("parse nbds_max: %w", err)
	}
	return v, nil
}

// device reads one device; Connected is left to the caller.
func (s sysfs) device(devRoot string, index uint32) (Device, error) {
	d := Device{Index: index, Path: devicePath(devRoot, index)}
	var err error
	if d.PID, err = s.pid(index); err != nil {
		return d, err
	}
	if d.BackendID, _, err = s.backend(index); err != nil {
		return d, err
	}
	sectors, err := s.sizeSectors(index)
	if err != nil {
		return d, err
	}
	d.SizeBytes = sectors << 9
	if d.ReadOnly, err = s.readOnly(index); err != nil {
		return d, err
	}
	return d, nil
}

// inventory lists devices from sysfs, with Connected from status.
func inventory(ctx context.Context, s sysfs, devRoot string, status func(context.Context) ([]Status, error)) ([]Device, error) {
	idx, err := s.indexes()
	if err != nil {
		return nil, err
	}
	st, err := status(ctx)
	if err != nil {
		return nil, err
	}
	connected := make(map[uint32]bool, len(st))
	for _, x := range st {
		connected[x.Index] = x.Connected
	}
	out := make([]Device, 0, len(idx))
	for _, i := range idx {
		d, err := s.device(devRoot, i)
		if err != nil {
			if !s.exists(i) {
				continue // removed meanwhile (DESTROY_ON_DISCONNECT)
			}
			return nil, err
		}
		d.Connected = connected[i]
		out = append(out, d)
	}
	return out, nil
}

// findBackend returns the started devices whose backend file is id.
func findBackend(s sysfs, id string) ([]uint32, error) {
	idx, err := s.indexes()
	if err != nil {
		return nil, err
	}
	return findBackendIn(s, id, idx)
}

// findBackendIn is findBackend among the devices idx.
func findBackendIn(s sysfs, id string, idx []uint32) ([]uint32, error) {
	var out []uint32
	for _, i := range idx {
		b, ok, err := s.backend(i)
		if err != nil {
			return nil, err
		}
		if !ok || b != id {
			continue
		}
		if pid, err := s.pid(i); err != nil || pid == 0 {
			continue
		}
		out = append(out, i)
	}
	return out, nil
}

// waitCtx applies the default wait bound when ctx has no deadline.
func waitCtx(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// poll calls check with exponential backoff (2 ms … 100 ms) until it
// reports done, returns an error, or ctx ends; then the error says what
// was awaited and the last state check described.
func poll(ctx context.Context, what string, check func() (done bool, state string, err error)) error {
	delay := 2 * time.Millisecond
	for {
		done, state, err := check()
		if err != nil {
			return err
		}
		if done {
			return nil
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("wait for %s (%s): %w", what, state, ctx.Err())
		case <-t.C:
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
}

// isDevice reports whether path exists (a device node in real /dev; any
// file in a test tree).
func isDevice(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// waitReleased waits until nbd<index> is no longer started (its pid file is
// gone); a context that ends first yields ErrDeviceBusy: something still
// holds the device open.
func waitReleased(ctx context.Context, s sysfs, index uint32) error {
	err := poll(ctx, fmt.Sprintf("nbd%d to be released", index), func() (bool, string, error) {
		pid, err := s.pid(index)
		return pid == 0, fmt.Sprintf("pid %d: still held open?", pid), err
	})
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ErrDeviceBusy, err)
	}
	return err
}

// detachBackend detaches the device carrying backendID through a, if any.
// The backend file is read again right before disconnecting, so a device
// released and reused meanwhile is left alone.
func detachBackend(ctx context.Context, a Attacher, s sysfs, backendID string) error {
	d, err := a.FindByBackend(ctx, backendID)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	// (ioctl devices have no backend file: then the caller's own record
	// of the device is what FindByBackend used.)
	if id, ok, err := s.backend(d.Index); err != nil {
		return err
	} else if ok && id != backendID {
		return nil // it went away meanwhile
	}
	return a.Detach(ctx, d.Index)
}
