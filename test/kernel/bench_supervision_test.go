// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestSupervisionCost measures the node plugin's CPU time per minute and
// resident memory while it supervises N idle volumes (NBDCSI_BENCH_VOLUMES,
// default "1,64"). Not part of the kernel suite (its name does not start
// with TestKernel): run it on purpose, in the VM.
func TestSupervisionCost(t *testing.T) {
	requireKernel(t)
	counts := os.Getenv("NBDCSI_BENCH_VOLUMES")
	if counts == "" {
		counts = "1,64"
	}
	window := time.Minute
	if s := os.Getenv("NBDCSI_BENCH_WINDOW"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatal(err)
		}
		window = d
	}
	for _, c := range strings.Split(counts, ",") {
		n, err := strconv.Atoi(c)
		if err != nil {
			t.Fatal(err)
		}
		t.Run(fmt.Sprint(n), func(t *testing.T) { supervisionCost(t, n, window) })
	}
}

func supervisionCost(t *testing.T, count int, window time.Duration) {
	root := t.TempDir()
	kubelet, state := filepath.Join(root, "kubelet"), filepath.Join(root, "state")
	srv := servers.Nbdkit(t, servers.TCP, "memory", "size=16M")
	vc := map[string]string{driver.KeyURI: srv.URI(""), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s"}
	p := startPlugin(t, kubelet, state)
	ctx := context.Background()
	for i := range count {
		vol := fmt.Sprintf("bench-%03d", i)
		staging := kubeletStaging(kubelet, vol)
		if _, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging,
			VolumeCapability: blockCap(), VolumeContext: vc}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_, _ = p.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging})
		})
	}
	time.Sleep(5 * time.Second)
	pid := p.cmd.Process.Pid
	cpu0 := cpuTicks(t, pid)
	time.Sleep(window)
	cpu := cpuTicks(t, pid) - cpu0
	rss := rssKiB(t, pid)
	perMin := float64(cpu) * 10 * float64(time.Minute) / float64(window) // 100 ticks/s: 10 ms each
	t.Logf("BENCH volumes=%d cpu=%.0fms/min rss=%dKiB", count, perMin, rss)
}

// cpuTicks is utime+stime of a process, in clock ticks.
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	fs := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	u, _ := strconv.ParseInt(fs[11], 10, 64)
	k, _ := strconv.ParseInt(fs[12], 10, 64)
	return u + k
}

func rssKiB(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}
