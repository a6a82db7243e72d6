// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/servers"
)

// TestKernelCLI drives the operator commands: attach (netlink: returns with
// the device usable; ioctl: stays in the foreground), devices, detach.
func TestKernelCLI(t *testing.T) {
	requireKernel(t)
	bin := pluginBinary(t)
	srv := servers.Nbdkit(t, servers.Unix, "memory", "size=64M")

	out, err := exec.Command(bin, "attach", "--id", "cli-test", srv.URI("")).Output()
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	if !strings.HasPrefix(dev, "/dev/nbd") {
		t.Fatalf("attach printed %q, want a device path", dev)
	}
	// The command has exited; the device serves I/O anyway.
	data := randomBytes(t, 1<<20)
	write(t, dev, true, data)
	if got := read(t, dev, true, len(data)); sum(got) != sum(data) {
		t.Fatal("data read back differs")
	}

	out, err = exec.Command(bin, "devices", "--json").Output()
	if err != nil {
		t.Fatalf("devices: %v", err)
	}
	var devs []DeviceJSON
	if err := json.Unmarshal(out, &devs); err != nil {
		t.Fatalf("devices --json %q: %v", out, err)
	}
	found := false
	for _, d := range devs {
		if d.Device == dev {
			found = d.BackendID == "nbd-csi-cli:cli-test" && d.Owner == "cli" && d.Connected && d.Size == 64<<20
		}
	}
	if !found {
		t.Errorf("devices --json does not show %s as ours: %s", dev, out)
	}
	if err := exec.Command(bin, "detach", "--id", "cli-test").Run(); err != nil {
		t.Fatalf("detach --id: %v", err)
	}
	if backendAttached(t, "nbd-csi-cli:cli-test") || strings.Contains(mustRun(t, bin, "devices"), "cli-test") {
		t.Error("device still attached after detach")
	}

	// ioctl: the command stays in the foreground; SIGTERM detaches.
	cmd := exec.Command(bin, "attach", "--ioctl", "--id", "cli-ioctl", srv.URI(""))
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("ioctl attach printed nothing: %v", err)
	}
	dev = strings.TrimSpace(line)
	write(t, dev, true, data)
	if got := read(t, dev, true, len(data)); sum(got) != sum(data) {
		t.Fatal("ioctl device: data read back differs")
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ioctl attach after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("ioctl attach did not exit after SIGTERM")
	}
	if _, err := os.Stat("/sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/pid"); err == nil {
		t.Error("ioctl device still started after the command exited")
	}
}

// DeviceJSON mirrors `nbd-csi devices --json` (docs/cli.md).
type DeviceJSON struct {
	Device    string `json:"device"`
	BackendID string `json:"backend_id"`
	Owner     string `json:"owner"`
	Size      uint64 `json:"size"`
	Connected bool   `json:"connected"`
}

func mustRun(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", bin, args, err, out)
	}
	return string(out)
}
