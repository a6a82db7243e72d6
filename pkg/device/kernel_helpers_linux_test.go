// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"golang.org/x/sys/unix"
)

// Kernel tests (TestKernel*) drive the real nbd driver. They run as root
// where /sys/module/nbd exists or can be loaded, and nbdkit is installed —
// in practice inside the VM of test/vm:
//
//	go run ./test/vm/cmd/vmrun -gotest ./pkg/device -- \
//	    'modprobe nbd nbds_max=16 max_part=0 && /bin/device.test -test.v -test.run Kernel'
//
// Elsewhere they skip, except that inside the VM (NBDCSI_IN_VM=1) a missing
// prerequisite is a failure.
func requireKernel(t *testing.T) {
	t.Helper()
	skip := t.Skipf
	if os.Getenv("NBDCSI_IN_VM") == "1" {
		skip = t.Fatalf
	}
	if os.Geteuid() != 0 {
		skip("kernel test: needs root (CAP_SYS_ADMIN) and the nbd module; run it in the VM rig (test/vm)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := EnsureModule(ctx, Options{}); err != nil {
		skip("kernel test: %v; run it in the VM rig (test/vm)", err)
	}
	if _, err := exec.LookPath("nbdkit"); err != nil {
		skip("kernel test: nbdkit not found (apt-get install nbdkit)")
	}
}

// kernelNetlink returns a Netlink on the real kernel, closed at cleanup.
func kernelNetlink(t *testing.T) *Netlink {
	t.Helper()
	requireKernel(t)
	n, err := NewNetlink(Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	return n
}

// nbdkit is a real NBD server for the kernel tests (the name is historical:
// it may also be qemu-nbd or nbd-server), started by internal/servers.
type nbdkit struct {
	*servers.Server
	// export is dialled when the caller names none.
	export string
}

// startNbdkit runs nbdkit with ARGS on a unix socket.
func startNbdkit(t *testing.T, args ...string) *nbdkit {
	t.Helper()
	return &nbdkit{Server: servers.Nbdkit(t, servers.Unix, args...)}
}

func (k *nbdkit) start() { k.Start() }

// kill stops the server at once (SIGKILL), as a crash would.
func (k *nbdkit) kill() { k.Kill() }

// dial connects to the export and negotiates it for the kernel.
func (k *nbdkit) dial(name string) (*os.File, uint64, uint16, error) {
	if name == "" {
		name = k.export
	}
	return dialExport(k.URI(name))
}

// dialN opens n connections (for multi-conn).
func (k *nbdkit) dialN(t *testing.T, n int) ([]*os.File, uint64, uint16) {
	t.Helper()
	var files []*os.File
	var size uint64
	var flags uint16
	for range n {
		f, s, fl, err := k.dial("")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		files, size, flags = append(files, f), s, fl
	}
	return files, size, flags
}

// dialExport negotiates uri with pkg/nbd's kernel profile and returns the
// socket for the kernel with the export's size and flags.
func dialExport(uri string) (*os.File, uint64, uint16, error) {
	u, err := nbd.ParseURI(uri)
	if err != nil {
		return nil, 0, 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbd.Dial(ctx, u, nbd.WithProfile(nbd.ProfileKernel))
	if err != nil {
		return nil, 0, 0, err
	}
	defer c.Close()
	f, err := c.File()
	if err != nil {
		return nil, 0, 0, err
	}
	info := c.Export()
	return f, info.Size, uint16(info.Flags), nil
}

// alignedBuf returns an n-byte buffer aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := int(4096 - uintptr(unsafe.Pointer(&b[0]))%4096)
	return b[off : off+n : off+n]
}

func randomBuf(t *testing.T, n int) []byte {
	t.Helper()
	b := alignedBuf(n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// writeDirect writes data at off with O_DIRECT and fsyncs.
func writeDirect(path string, off int64, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		return err
	}
	return f.Sync()
}

// readDirect reads n bytes at off with O_DIRECT.
func readDirect(path string, off int64, n int) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := alignedBuf(n)
	if _, err := f.ReadAt(b, off); err != nil {
		return nil, err
	}
	return b, nil
}

// readFileAt reads n bytes of a regular file (the server side).
func readFileAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func sum(b []byte) string { return fmt.Sprintf("%x", sha256.Sum256(b)) }

// sparseFile creates a file of the given size.
func sparseFile(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// blockDeviceSize is BLKGETSIZE64.
func blockDeviceSize(t *testing.T, path string) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); errno != 0 {
		t.Fatal(errno)
	}
	return size
}

// detachAtCleanup detaches the device when the test ends, whatever happened.
func detachAtCleanup(t *testing.T, a Attacher, index uint32) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.Detach(ctx, index); err != nil && !errors.Is(err, ErrNotFound) {
			t.Errorf("cleanup: detach nbd%d: %v", index, err)
		}
	})
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
