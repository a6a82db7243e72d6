// SPDX-License-Identifier: Apache-2.0

package vm_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/test/vm"
)

// skipUnlessRig skips tests that boot a VM in -short mode and on hosts
// that cannot run the rig — except with NBDCSI_REQUIRE_VM=1 (CI), where a
// missing rig is a failure.
func skipUnlessRig(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM; skipped in -short mode")
	}
	if vm.InVM() {
		t.Skip("already inside the VM")
	}
	if err := vm.Available(); err != nil {
		if os.Getenv("NBDCSI_REQUIRE_VM") == "1" {
			t.Fatalf("%v, and NBDCSI_REQUIRE_VM=1 forbids skipping", err)
		}
		t.Skip(err)
	}
}

// smokeScript exercises the real kernel nbd driver end to end: nbdkit
// serves 1 GiB of memory on a unix socket, nbd-client attaches it, and
// ext4 and xfs file systems are created, mounted, written, remounted and
// verified. It prints SMOKE-OK when everything passed.
const smokeScript = `set -eu
t0=$(/bin/date +%s%N)
ms() { echo $(( ($(/bin/date +%s%N) - t0) / 1000000 )); }
[ "$NBDCSI_IN_VM" = 1 ]
modprobe nbd nbds_max=4 max_part=0
echo "SMOKE nbd loaded at $(ms) ms"
modprobe xfs
echo "SMOKE xfs loaded at $(ms) ms"
nbdkit --unix /tmp/mem.sock --pidfile /tmp/nbdkit.pid --log=stderr memory 1G
i=0; until [ -s /tmp/nbdkit.pid ]; do i=$((i+1)); [ $i -lt 100 ]; sleep 0.1; done
nbd-client -unix /tmp/mem.sock /dev/nbd0 -b 4096 -N smoke
[ "$(cat /sys/block/nbd0/size)" = 2097152 ]
echo "SMOKE attached at $(ms) ms"
mkdir -p /mnt/fs
for fs in ext4 xfs; do
	/bin/dd if=/dev/zero of=/dev/nbd0 bs=1M count=1 oflag=direct status=none
	case $fs in
	ext4) mkfs.ext4 -q -F /dev/nbd0 ;;
	xfs) mkfs.xfs -q -f /dev/nbd0 ;;
	esac
	[ "$(/usr/sbin/blkid -o value -s TYPE /dev/nbd0)" = $fs ]
	/bin/mount -t $fs /dev/nbd0 /mnt/fs
	/bin/dd if=/dev/urandom of=/mnt/fs/data bs=1M count=8 status=none
	sum1=$(/bin/sha256sum /mnt/fs/data | cut -d' ' -f1)
	/bin/umount /mnt/fs
	/bin/mount -o ro /dev/nbd0 /mnt/fs
	sum2=$(/bin/sha256sum /mnt/fs/data | cut -d' ' -f1)
	/bin/umount /mnt/fs
	[ "$sum1" = "$sum2" ]
	echo "SMOKE $fs verified at $(ms) ms"
done
nbd-client -d /dev/nbd0
[ "$(cat /sys/block/nbd0/size)" = 0 ]
kill "$(cat /tmp/nbdkit.pid)"
echo "SMOKE detached at $(ms) ms"
echo SMOKE-OK
`

func TestVMSmoke(t *testing.T) {
	skipUnlessRig(t)
	var console bytes.Buffer
	res, err := vm.RunDetailed(context.Background(), vm.Config{
		Script:  smokeScript,
		Timeout: 5 * time.Minute,
		Console: &teeWriter{a: &console, b: t.Output()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("timings: %s", res)
	if res.ExitCode != 0 {
		t.Fatalf("smoke script exited with %d", res.ExitCode)
	}
	for _, want := range []string{"SMOKE-OK", vm.MarkerExit + "0 run="} {
		if !strings.Contains(console.String(), want) {
			t.Errorf("console lacks %q", want)
		}
	}
}

func TestVMExitCodeAndFiles(t *testing.T) {
	skipUnlessRig(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "payload"), []byte("from the host\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, err := vm.Run(context.Background(), vm.Config{
		Files:   []vm.File{{HostPath: filepath.Join(dir, "payload"), GuestPath: "/opt/in/payload", Mode: 0o644}},
		Env:     []string{"GREETING=it's me"},
		Script:  `grep -qx 'from the host' /opt/in/payload && [ "$GREETING" = "it's me" ] && exit 42`,
		Timeout: 3 * time.Minute,
		Console: t.Output(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if code != 42 {
		t.Fatalf("exit code %d, want 42 (the file or the environment did not arrive)", code)
	}
}

func TestVMGoTest(t *testing.T) {
	skipUnlessRig(t)
	ctx := context.Background()
	bin, err := vm.BuildGoTest(ctx, ".", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var console bytes.Buffer
	code, err := vm.Run(ctx, vm.Config{
		Files:   []vm.File{bin},
		Script:  "modprobe nbd nbds_max=4 max_part=0 && " + bin.GuestPath + " -test.v -test.run '^TestGuest'",
		Timeout: 5 * time.Minute,
		Console: &teeWriter{a: &console, b: t.Output()},
	})
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 {
		t.Fatalf("guest tests exited with %d", code)
	}
	if !strings.Contains(console.String(), "--- PASS: TestGuestNBDFromGo") {
		t.Error("TestGuestNBDFromGo did not pass (or did not run) in the guest")
	}
}

// TestGuestNBDFromGo runs inside the VM only (see TestVMGoTest): a Go
// test binary serves memory with nbdkit over TCP on loopback, attaches
// it with nbd-client and reads back what it wrote through /dev/nbd1.
func TestGuestNBDFromGo(t *testing.T) {
	if !vm.InVM() {
		t.Skipf("runs inside the VM rig only (%s=1); TestVMGoTest runs it there", vm.EnvInVM)
	}
	// exec.LookPath must find the real util-linux mount, not busybox.
	mount, err := exec.LookPath("mount")
	if err != nil {
		t.Fatal(err)
	}
	if target, _ := filepath.EvalSymlinks(mount); strings.Contains(target, "busybox") {
		t.Errorf("mount on PATH is busybox (%s)", target)
	}
	pidfile := filepath.Join(t.TempDir(), "nbdkit.pid")
	runCmd(t, "nbdkit", "--ipaddr", "127.0.0.1", "--port", "10809", "--pidfile", pidfile, "--log=stderr", "memory", "64M")
	t.Cleanup(func() {
		if pid, err := os.ReadFile(pidfile); err == nil {
			_ = exec.Command("kill", strings.TrimSpace(string(pid))).Run()
		}
	})
	runCmd(t, "nbd-client", "127.0.0.1", "10809", "/dev/nbd1", "-N", "gotest", "-b", "4096")
	t.Cleanup(func() { runCmd(t, "nbd-client", "-d", "/dev/nbd1") })

	dev, err := os.OpenFile("/dev/nbd1", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	want := bytes.Repeat([]byte("nbd-csi!"), 8192) // 64 KiB
	if _, err := dev.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := dev.Sync(); err != nil {
		t.Fatal(err)
	}
	// Drop the page cache so that the read goes to the server.
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("1\n"), 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := dev.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("data read back from /dev/nbd1 differs from what was written")
	}
	size, err := os.ReadFile("/sys/block/nbd1/size")
	if err != nil {
		t.Fatal(err)
	}
	if s := strings.TrimSpace(string(size)); s != fmt.Sprint(64<<20/512) {
		t.Errorf("/sys/block/nbd1/size = %s sectors, want %d", s, 64<<20/512)
	}
}

func runCmd(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// teeWriter writes to both writers, ignoring errors of the second.
type teeWriter struct{ a, b io.Writer }

func (w *teeWriter) Write(p []byte) (int, error) {
	_, _ = w.b.Write(p)
	return w.a.Write(p)
}

func ExampleRun() {
	code, err := vm.Run(context.Background(), vm.Config{
		Script:  "modprobe nbd nbds_max=4 max_part=0 && ls /dev/nbd0",
		Console: os.Stdout,
	})
	if err != nil {
		fmt.Println("rig failed:", err)
		return
	}
	fmt.Println("exit status", code)
}
