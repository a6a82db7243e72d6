// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// wipeServer starts a real server on a sparse file of size bytes with data
// written at a few places, and returns its export URI and the file.
type wipeServer struct {
	name  string
	start func(t *testing.T, file string) string
	// sparse: the server reports holes with base:allocation.
	sparse bool
}

var wipeServers = []wipeServer{
	{"nbdkit-file", func(t *testing.T, f string) string {
		return servers.Nbdkit(t, servers.Unix, "file", "file="+f).URI("")
	}, true},
	{"qemu-nbd", func(t *testing.T, f string) string {
		return servers.QemuNBD(t, servers.Unix, "-x", "disk", "-f", "raw", "--discard=unmap", f).URI("disk")
	}, true},
	// No WRITE_ZEROES and no block status: the wipe writes zeroes
	// everywhere.
	{"nbdkit-file-nozero-noextents", func(t *testing.T, f string) string {
		return servers.Nbdkit(t, servers.Unix, "--filter=nozero", "--filter=noextents", "file", "file="+f, "zeromode=none").URI("")
	}, false},
}

// dirtyFile makes a sparse file of size bytes with 1 MiB of random data at
// each offset in at, and returns the data's offsets.
func dirtyFile(t *testing.T, size int64, at ...int64) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "disk.img")
	emptyFile(t, f, size)
	fh, err := os.OpenFile(f, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	for _, off := range at {
		if _, err := fh.WriteAt(randomBytes(t, 1<<20), off); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// allZero fails the test unless the file and the export read as zeroes.
func allZero(t *testing.T, c *nbd.Conn, file string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if i := bytes.IndexFunc(b, func(r rune) bool { return r != 0 }); i >= 0 {
		t.Fatalf("file has a non-zero byte at %d after the wipe", i)
	}
	buf := make([]byte, 4<<20)
	size := c.Export().Size
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		n := min(uint64(len(buf)), size-off)
		if err := c.ReadAt(testCtx(t), buf[:n], off); err != nil {
			t.Fatal(err)
		}
		if !allZeroes(buf[:n]) {
			t.Fatalf("export reads non-zero bytes in [%d, %d) after the wipe", off, off+n)
		}
	}
}

func allZeroes(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// TestInteropWipe wipes a sparse export with data at a few places on each
// real server and checks that it reads back zeroes (through the server and
// in the backing file); that the allocation-aware path zeroes only about
// what was written; and that an interrupted wipe resumes from its
// checkpoint and still leaves nothing behind.
func TestInteropWipe(t *testing.T) {
	const size = 64 << 20
	data := []int64{0, 5 << 20, 33<<20 + 4096, size - 1<<20}
	for _, srv := range wipeServers {
		t.Run(srv.name, func(t *testing.T) {
			t.Run("whole", func(t *testing.T) {
				f := dirtyFile(t, size, data...)
				c := dial(t, srv.start(t, f), userspace)
				var checkpoints []uint64
				res, err := c.Wipe(testCtx(t), nbd.WipeOptions{CheckpointBytes: 16 << 20,
					Checkpoint: func(n uint64) error { checkpoints = append(checkpoints, n); return nil }})
				if err != nil {
					t.Fatalf("Wipe: %v", err)
				}
				t.Logf("%s: %+v, checkpoints %v", srv.name, res, checkpoints)
				if !res.Done() || len(checkpoints) == 0 || checkpoints[len(checkpoints)-1] != size {
					t.Errorf("result %+v, checkpoints %v: want done with a last checkpoint at %d", res, checkpoints, size)
				}
				if srv.sparse && (!res.AllocationAware || res.Zeroed > 16<<20) {
					t.Errorf("allocation-aware wipe zeroed %d bytes of %d with 4 MiB written", res.Zeroed, size)
				}
				if !srv.sparse && (res.Zeroed != size || res.Method != nbd.WipeWrite) {
					t.Errorf("wipe without WRITE_ZEROES and block status: %+v, want %d bytes written", res, size)
				}
				allZero(t, c, f)
			})
			t.Run("resume", func(t *testing.T) {
				f := dirtyFile(t, size, data...)
				uri := srv.start(t, f)
				c := dial(t, uri, userspace)
				stop := errors.New("controller restarted")
				var saved uint64
				_, err := c.Wipe(testCtx(t), nbd.WipeOptions{CheckpointBytes: 1, IgnoreAllocation: true,
					Checkpoint: func(n uint64) error {
						saved = n
						if n >= 32<<20 {
							return stop
						}
						return nil
					}})
				if !errors.Is(err, stop) || saved < 32<<20 || saved >= size {
					t.Fatalf("interrupted wipe: %v at %d", err, saved)
				}
				// A deadline already past: one step (4 MiB) of progress,
				// no error.
				res, err := c.Wipe(testCtx(t), nbd.WipeOptions{From: saved, Until: time.Now(), CheckpointBytes: 4 << 20, IgnoreAllocation: true})
				if err != nil || res.Next != saved+4<<20 || res.Zeroed != 4<<20 || res.Done() {
					t.Fatalf("wipe with a past deadline: %+v, %v; want one 4 MiB step", res, err)
				}
				saved = res.Next
				c2 := dial(t, uri, userspace)
				res, err = c2.Wipe(testCtx(t), nbd.WipeOptions{From: saved, IgnoreAllocation: true})
				if err != nil || !res.Done() || res.Zeroed != size-saved {
					t.Fatalf("resumed wipe from %d: %+v, %v; want only the rest zeroed", saved, res, err)
				}
				allZero(t, c2, f)
			})
		})
	}
}
