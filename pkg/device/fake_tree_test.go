// SPDX-License-Identifier: Apache-2.0

package device

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// fakeTree is a temporary /sys and /dev with nbd devices in them, shaped
// like what drivers/block/nbd.c publishes.
type fakeTree struct {
	t   *testing.T
	sys string
	dev string
}

func newFakeTree(t *testing.T) *fakeTree {
	t.Helper()
	root := t.TempDir()
	f := &fakeTree{t: t, sys: filepath.Join(root, "sys"), dev: filepath.Join(root, "dev")}
	f.mkdir(filepath.Join(f.sys, "block"))
	f.mkdir(f.dev)
	// A non-nbd device, which must be ignored.
	f.mkdir(filepath.Join(f.sys, "block", "vda"))
	return f
}

func (f *fakeTree) opts() Options {
	return Options{SysRoot: f.sys, DevRoot: f.dev, WaitTimeout: 2 * time.Second}
}

func (f *fakeTree) mkdir(p string) {
	f.t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeTree) write(p, content string) {
	f.t.Helper()
	f.mkdir(filepath.Dir(p))
	// Atomically, like sysfs reads: readers never see a partial file.
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeTree) remove(p string) {
	f.t.Helper()
	if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
		f.t.Fatal(err)
	}
}

// loadModule creates /sys/module/nbd with nbds_max.
func (f *fakeTree) loadModule(nbdsMax int) {
	f.write(filepath.Join(f.sys, "module", "nbd", "parameters", "nbds_max"), strconv.Itoa(nbdsMax)+"\n")
}

func (f *fakeTree) blockFile(i uint32, name string) string {
	return filepath.Join(f.sys, "block", fmt.Sprintf("nbd%d", i), name)
}

// addDevice creates an idle nbd<i> and its node.
func (f *fakeTree) addDevice(i uint32) {
	f.write(f.blockFile(i, "size"), "0\n")
	f.write(f.blockFile(i, "ro"), "0\n")
	f.write(f.blockFile(i, "queue/logical_block_size"), "1024\n")
	f.write(filepath.Join(f.dev, fmt.Sprintf("nbd%d", i)), "")
}

// start marks nbd<i> started; backend "" means no backend file (ioctl).
func (f *fakeTree) start(i uint32, pid int, sizeBytes, blockSize uint64, backend string, ro bool) {
	if _, err := os.Stat(f.blockFile(i, "size")); err != nil {
		f.addDevice(i)
	}
	// In nbd_start_device's order: flags (ro) first, then the pid file;
	// the size and backend file follow before CONNECT replies.
	r := "0\n"
	if ro {
		r = "1\n"
	}
	f.write(f.blockFile(i, "ro"), r)
	f.write(f.blockFile(i, "queue/logical_block_size"), strconv.FormatUint(blockSize, 10)+"\n")
	f.write(f.blockFile(i, "pid"), strconv.Itoa(pid)+"\n")
	f.write(f.blockFile(i, "size"), strconv.FormatUint(sizeBytes>>9, 10)+"\n")
	if backend != "" {
		f.write(f.blockFile(i, "backend"), backend+"\n")
	}
}

// stop tears nbd<i>'s configuration down.
func (f *fakeTree) stop(i uint32) {
	f.remove(f.blockFile(i, "pid"))
	f.remove(f.blockFile(i, "backend"))
	f.write(f.blockFile(i, "size"), "0\n")
	f.write(f.blockFile(i, "ro"), "0\n")
}

func (f *fakeTree) setSize(i uint32, sizeBytes uint64) {
	f.write(f.blockFile(i, "size"), strconv.FormatUint(sizeBytes>>9, 10)+"\n")
}

func (f *fakeTree) started(i uint32) bool {
	_, err := os.Stat(f.blockFile(i, "pid"))
	return err == nil
}
