// SPDX-License-Identifier: Apache-2.0

package device

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestSysfsDevice(t *testing.T) {
	tree := newFakeTree(t)
	tree.addDevice(0)
	tree.start(12, 321, 5<<30, 4096, "pvc-1 with spaces", true)
	// A partition directory and a non-numeric name must not count.
	tree.mkdir(filepath.Join(tree.sys, "block", "nbd12p1"))
	tree.mkdir(filepath.Join(tree.sys, "block", "nbdx"))
	s := sysfs{root: tree.sys}

	idx, err := s.indexes()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]uint32{0, 12}, idx); diff != "" {
		t.Errorf("indexes (-want +got):\n%s", diff)
	}
	d, err := s.device(tree.dev, 12)
	if err != nil {
		t.Fatal(err)
	}
	want := Device{Index: 12, Path: filepath.Join(tree.dev, "nbd12"), BackendID: "pvc-1 with spaces",
		SizeBytes: 5 << 30, PID: 321, ReadOnly: true}
	if diff := cmp.Diff(want, d, cmp.AllowUnexported(Device{})); diff != "" {
		t.Errorf("device (-want +got):\n%s", diff)
	}
	if bs, err := s.logicalBlockSize(12); err != nil || bs != 4096 {
		t.Errorf("logical block size %d, %v", bs, err)
	}
	idle, err := s.device(tree.dev, 0)
	if err != nil {
		t.Fatal(err)
	}
	if idle.PID != 0 || idle.BackendID != "" || idle.SizeBytes != 0 {
		t.Errorf("idle device %+v", idle)
	}
	// A device that does not exist reads as idle, not as an error.
	if pid, err := s.pid(99); err != nil || pid != 0 {
		t.Errorf("pid of a missing device: %d, %v", pid, err)
	}
	tree.write(tree.blockFile(0, "pid"), "garbage\n")
	if _, err := s.pid(0); err == nil {
		t.Error("unparsable pid file accepted")
	}
}

func TestSysfsEmptyAndModule(t *testing.T) {
	s := sysfs{root: t.TempDir()}
	if idx, err := s.indexes(); err != nil || len(idx) != 0 {
		t.Errorf("no /sys/block: %v, %v", idx, err)
	}
	if s.moduleLoaded() {
		t.Error("module reported loaded")
	}
	if _, err := s.nbdsMax(); err == nil {
		t.Error("nbds_max without a module")
	}
	tree := newFakeTree(t)
	tree.loadModule(32)
	s = sysfs{root: tree.sys}
	if n, err := s.nbdsMax(); err != nil || n != 32 || !s.moduleLoaded() {
		t.Errorf("nbds_max %d, %v", n, err)
	}
}

func TestFindBackendNeedsStartedDevice(t *testing.T) {
	tree := newFakeTree(t)
	tree.start(1, 5, 1<<20, 512, "v", false)
	// A stale backend file without a pid file (mid-teardown) is not a match.
	tree.write(tree.blockFile(2, "backend"), "v\n")
	got, err := findBackend(sysfs{root: tree.sys}, "v")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]uint32{1}, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestPoll(t *testing.T) {
	n := 0
	err := poll(context.Background(), "x", func() (bool, string, error) { n++; return n == 4, "", nil })
	if err != nil || n != 4 {
		t.Errorf("poll: %v after %d checks", err, n)
	}
	boom := errors.New("boom")
	if err := poll(context.Background(), "x", func() (bool, string, error) { return false, "", boom }); !errors.Is(err, boom) {
		t.Errorf("check error: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err = poll(ctx, "thing", func() (bool, string, error) { return false, "state 7", nil })
	if !errors.Is(err, context.DeadlineExceeded) || err.Error() != "wait for thing (state 7): context deadline exceeded" {
		t.Errorf("timeout: %v", err)
	}
}

func TestConfigNormalize(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := Config{Sockets: []*os.File{f}, SizeBytes: 1<<20 + 700, ServerFlags: flagHasFlags,
		ReadOnly: true, Timeout: time.Millisecond, DeadConnTimeout: 2 * time.Second}.normalize(false)
	if err != nil {
		t.Fatal(err)
	}
	if c.BlockSize != 512 || c.flags != flagHasFlags|flagReadOnly || c.timeoutSec != 1 || c.deadConnSec != 2 {
		t.Errorf("normalized %+v", c)
	}
	if c.expectedSectors != 2049 || !c.sizeShown(2049) || c.sizeShown(2048) {
		t.Errorf("expected sectors %d", c.expectedSectors)
	}
	// With 4 KiB blocks a kernel that rounds down to whole blocks shows
	// 2048 sectors; both are accepted.
	c, err = Config{Sockets: []*os.File{f}, SizeBytes: 1<<20 + 700, BlockSize: 4096}.normalize(false)
	if err != nil {
		t.Fatal(err)
	}
	if !c.sizeShown(2049) || !c.sizeShown(2048) || c.sizeShown(2047) {
		t.Errorf("4 KiB blocks: expected sectors %d", c.expectedSectors)
	}
	// Without netlink the backend identifier is optional.
	if _, err := (Config{Sockets: []*os.File{f}, SizeBytes: 512}).normalize(false); err != nil {
		t.Errorf("ioctl config without backend: %v", err)
	}
}

func TestBackendString(t *testing.T) {
	for b, want := range map[Backend]string{BackendAuto: "auto", BackendNetlink: "netlink", BackendIoctl: "ioctl", 7: "Backend(7)"} {
		if b.String() != want {
			t.Errorf("%d: %q", int(b), b.String())
		}
	}
}
