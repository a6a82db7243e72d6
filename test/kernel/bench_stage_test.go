// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestKernelBenchStage measures NodeStage (negotiate + attach + mkfs.ext4 +
// mount) of fresh 1 GiB volumes against a shell doing nbd-client +
// mkfs.ext4 + mount on the same kind of export in the same run, and the
// per-volume time of staging N fresh 256 MiB volumes at once. It only reports; it runs
// when NBDCSI_BENCH=1 (bench/kernel.sh), not in make test.
func TestKernelBenchStage(t *testing.T) {
	if os.Getenv("NBDCSI_BENCH") != "1" {
		t.Skip("benchmark: set NBDCSI_BENCH=1 (bench/kernel.sh does)")
	}
	n := newNode(t)
	dir := t.TempDir()
	// Fresh exports for every measurement (mkfs only runs on empty
	// devices): 1 + 16 + 64 for the N rounds, then 10 for ours/shell.
	const maxN = 1 + 16 + 64
	const pairs = 5 // ours and the shell's, alternating
	for i := 0; i < maxN+2*pairs; i++ {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("v%02d", i)))
		if err != nil {
			t.Fatal(err)
		}
		// 1 GiB for the comparison with the shell; 256 MiB for the N
		// rounds, whose filesystem metadata must fit the VM's tmpfs.
		size := int64(256 << 20)
		if i >= maxN {
			size = 1 << 30
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+dir)
	stage := func(vol string) time.Duration {
		start := time.Now()
		if _, err := n.svc.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: vol,
			StagingTargetPath: n.staging(vol), VolumeCapability: fsCap("ext4"),
			VolumeContext: map[string]string{driver.KeyURI: srv.URI(vol)}}); err != nil {
			t.Fatalf("stage %s: %v", vol, err)
		}
		return time.Since(start)
	}
	unstage := func(vol string) {
		if _, err := n.svc.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)}); err != nil {
			t.Fatalf("unstage %s: %v", vol, err)
		}
	}
	shell := func(export string, dev string) time.Duration {
		mnt := filepath.Join(t.TempDir(), "mnt")
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		script := fmt.Sprintf("nbd-client -unix %s %s -N %s -b 512 >/dev/null && mkfs.ext4 -q -F -m0 %s && mount %s %s",
			srv.Socket, dev, export, dev, dev, mnt)
		if out, err := exec.Command("/bin/sh", "-c", script).CombinedOutput(); err != nil {
			t.Fatalf("shell stage: %v\n%s", err, out)
		}
		d := time.Since(start)
		_ = exec.Command("umount", mnt).Run()
		_ = exec.Command("nbd-client", "-d", dev).Run()
		return d
	}

	// One fresh volume at a time, alternating ours and the shell's.
	var ours, ref []time.Duration
	for i := 0; i < pairs; i++ {
		vol := fmt.Sprintf("v%02d", maxN+2*i)
		ours = append(ours, stage(vol))
		unstage(vol)
		ref = append(ref, shell(fmt.Sprintf("v%02d", maxN+2*i+1), "/dev/nbd63"))
	}
	med := func(d []time.Duration) time.Duration {
		s := append([]time.Duration(nil), d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2]
	}
	fmt.Printf("BENCH| NodeStage of a fresh 1 GiB volume, median of %d | %v | %v | %.2f |\n", pairs,
		med(ours).Round(time.Millisecond), med(ref).Round(time.Millisecond), float64(med(ours))/float64(med(ref)))
	fmt.Printf("RATIO| NodeStage / nbd-client + mkfs.ext4 + mount | %.2f | 0.9 |\n", float64(med(ours))/float64(med(ref)))

	// N volumes at once.
	next := 0
	perVolume := map[int]time.Duration{}
	for _, count := range []int{1, 16, 64} {
		vols := make([]string, count)
		for i := range vols {
			vols[i] = fmt.Sprintf("v%02d", next+i)
		}
		next += count
		start := time.Now()
		var wg sync.WaitGroup
		for _, v := range vols {
			wg.Add(1)
			go func(v string) { defer wg.Done(); stage(v) }(v)
		}
		wg.Wait()
		total := time.Since(start)
		perVolume[count] = total / time.Duration(count)
		fmt.Printf("BENCH| stage %d fresh 256 MiB volumes at once: total | %v | per volume | %v |\n", count, total.Round(time.Millisecond), perVolume[count].Round(time.Millisecond))
		for _, v := range vols {
			unstage(v)
		}
	}
	// Flat in N: staging many at once costs no more per volume than one
	// (within 20 %: the run-to-run noise of a single stage under TCG).
	fmt.Printf("RATIO| stage per volume, 16 at once / 1 | %.2f | 1.2 |\n", float64(perVolume[16])/float64(perVolume[1]))
	fmt.Printf("RATIO| stage per volume, 64 at once / 1 | %.2f | 1.2 |\n", float64(perVolume[64])/float64(perVolume[1]))
}
