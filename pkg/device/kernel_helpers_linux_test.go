// SPDX-License-Identifier: Apache-2.0

package device

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
	"unsafe"

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

// nbdkit is a server started on a Unix socket in a temporary directory.
type nbdkit struct {
	t    *testing.T
	sock string
	args []string
	cmd  *exec.Cmd
}

// startNbdkit runs "nbdkit -f -U sock ARGS..." and waits for its pid file.
func startNbdkit(t *testing.T, args ...string) *nbdkit {
	t.Helper()
	k := &nbdkit{t: t, sock: filepath.Join(t.TempDir(), "nbd.sock"), args: args}
	k.start()
	t.Cleanup(k.kill)
	return k
}

func (k *nbdkit) start() {
	k.t.Helper()
	pidfile := k.sock + ".pid"
	_ = os.Remove(pidfile)
	_ = os.Remove(k.sock)
	argv := append([]string{"-f", "--exit-with-parent", "-U", k.sock, "--pidfile", pidfile}, k.args...)
	cmd := exec.Command("nbdkit", argv...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		k.t.Fatalf("nbdkit: %v", err)
	}
	k.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(pidfile); err == nil {
			return
		}
		if time.Now().After(deadline) {
			k.t.Fatalf("nbdkit %v did not start", argv)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill stops the server at once (SIGKILL).
func (k *nbdkit) kill() {
	if k.cmd == nil {
		return
	}
	_ = k.cmd.Process.Kill()
	_ = k.cmd.Wait()
	k.cmd = nil
}

// dial connects to the export and negotiates it for the kernel.
func (k *nbdkit) dial(name string) (*os.File, uint64, uint16, error) {
	return dialExport(k.sock, name)
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

// dialExport is a minimal fixed-newstyle client: NBD_OPT_GO with no
// information requests and nothing else (no structured replies, which the
// kernel cannot parse), so every handshake byte is consumed when it
// returns. Test-only.
//
// TODO(pkg/nbd): switch to nbd.Dial(ctx, uri, nbd.WithProfile(nbd.ProfileKernel))
// and conn.File() once the lead says pkg/nbd's kernel profile is ready.
func dialExport(sock, name string) (*os.File, uint64, uint16, error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return nil, 0, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	be := binary.BigEndian
	var greet [18]byte
	if _, err := io.ReadFull(c, greet[:]); err != nil {
		return nil, 0, 0, fmt.Errorf("greeting: %w", err)
	}
	if be.Uint64(greet[0:]) != 0x4e42444d41474943 || be.Uint64(greet[8:]) != 0x49484156454F5054 ||
		be.Uint16(greet[16:])&1 == 0 {
		return nil, 0, 0, fmt.Errorf("not a fixed-newstyle server: %x", greet)
	}
	clientFlags := uint32(1) | uint32(be.Uint16(greet[16:])&2) // FIXED_NEWSTYLE, NO_ZEROES if offered
	var req bytes.Buffer
	data := be.AppendUint32(nil, uint32(len(name)))
	data = append(data, name...)
	data = be.AppendUint16(data, 0) // no information requests
	req.Write(be.AppendUint32(nil, clientFlags))
	req.Write(be.AppendUint64(nil, 0x49484156454F5054))
	req.Write(be.AppendUint32(nil, 7)) // NBD_OPT_GO
	req.Write(be.AppendUint32(nil, uint32(len(data))))
	req.Write(data)
	if _, err := c.Write(req.Bytes()); err != nil {
		return nil, 0, 0, err
	}
	var size uint64
	var flags uint16
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return nil, 0, 0, fmt.Errorf("option reply: %w", err)
		}
		typ, n := be.Uint32(hdr[12:]), be.Uint32(hdr[16:])
		if be.Uint64(hdr[0:]) != 0x3e889045565a9 || be.Uint32(hdr[8:]) != 7 || n > 4096 {
			return nil, 0, 0, fmt.Errorf("bad option reply %x", hdr)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c, payload); err != nil {
			return nil, 0, 0, err
		}
		switch {
		case typ == 1: // NBD_REP_ACK: transmission starts
			f, err := c.(*net.UnixConn).File()
			return f, size, flags, err
		case typ&(1<<31) != 0:
			return nil, 0, 0, fmt.Errorf("NBD_OPT_GO: error %#x: %s", typ, payload)
		case typ == 3 && n == 12 && be.Uint16(payload) == 0: // NBD_INFO_EXPORT
			size, flags = be.Uint64(payload[2:]), be.Uint16(payload[10:])
		}
	}
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
