// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestKernelBenchEncrypted compares, in one run on the same server, plain
// and encrypted block volumes: NodeStage time (encrypted: first stage with
// luksFormat, and a restage that only opens; with cryptsetup's default
// PBKDF benchmark, as the plugin binary does) and 1 MiB O_DIRECT sequential
// write and read. Under TCG the guest's AES is emulated, which exaggerates
// the crypto cost. It only reports; it runs when NBDCSI_BENCH=1.
func TestKernelBenchEncrypted(t *testing.T) {
	if os.Getenv("NBDCSI_BENCH") != "1" {
		t.Skip("benchmark: set NBDCSI_BENCH=1 (bench/kernel.sh does)")
	}
	n := newNode(t)
	// The plugin's defaults, not the tests' fixed PBKDF cost.
	svc, err := driver.NewNodeService(driver.NodeOptions{NodeID: "vm", KubeletDir: n.kubelet, StateDir: n.stateDir}, n.att,
		driver.NewNodeMounter(), driver.WithEncryption(crypt.Volumes{C: crypt.New(crypt.ExecRunner{}, crypt.Options{})}, crypt.SecretKeySource{}))
	if err != nil {
		t.Fatal(err)
	}
	n.svc = svc
	dir := t.TempDir()
	for _, name := range []string{"plain", "enc"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(filepath.Join(dir, name), 256<<20); err != nil {
			t.Fatal(err)
		}
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+dir)
	const mib = 128
	stage := func(vol string, encrypted bool) time.Duration {
		vc := map[string]string{driver.KeyURI: srv.URI(vol)}
		var sec map[string]string
		if encrypted {
			vc[driver.KeyEncrypted] = "true"
			sec = map[string]string{driver.SecretEncryptionPassphrase: "bench-pass"}
		}
		start := time.Now()
		if _, err := n.svc.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol),
			VolumeCapability: blockCap(), VolumeContext: vc, Secrets: sec}); err != nil {
			t.Fatalf("stage %s: %v", vol, err)
		}
		return time.Since(start)
	}
	unstage := func(vol string) {
		if _, err := n.svc.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)}); err != nil {
			t.Fatalf("unstage %s: %v", vol, err)
		}
	}
	dd := func(args ...string) float64 {
		start := time.Now()
		if out, err := exec.Command("/usr/bin/dd", append(args, "bs=1M", fmt.Sprintf("count=%d", mib), "status=none")...).CombinedOutput(); err != nil {
			t.Fatalf("dd %v: %v %s", args, err, out)
		}
		return float64(mib) / time.Since(start).Seconds()
	}
	device := func(vol string, encrypted bool) string {
		if encrypted {
			return filepath.Join("/dev/mapper", crypt.MapperName(vol))
		}
		a, err := n.att.Lookup(context.Background(), vol)
		if err != nil {
			t.Fatal(err)
		}
		return a.Device
	}
	type result struct {
		stage, restage time.Duration
		write, read    float64
	}
	var res [2]result
	for i, encrypted := range []bool{false, true} {
		vol := map[bool]string{false: "plain", true: "enc"}[encrypted]
		r := &res[i]
		r.stage = stage(vol, encrypted)
		dev := device(vol, encrypted)
		r.write = dd("if=/dev/zero", "of="+dev, "oflag=direct")
		r.read = dd("if="+dev, "of=/dev/null", "iflag=direct")
		unstage(vol)
		r.restage = stage(vol, encrypted)
		unstage(vol)
	}
	p, e := res[0], res[1]
	fmt.Printf("BENCH| block volume, 256 MiB export, TCG | plain | encrypted | encrypted/plain |\n")
	fmt.Printf("BENCH| first NodeStage | %v | %v | %.2f |\n", p.stage.Round(time.Millisecond), e.stage.Round(time.Millisecond), float64(e.stage)/float64(p.stage))
	fmt.Printf("BENCH| NodeStage again | %v | %v | %.2f |\n", p.restage.Round(time.Millisecond), e.restage.Round(time.Millisecond), float64(e.restage)/float64(p.restage))
	fmt.Printf("BENCH| write 1 MiB O_DIRECT, MiB/s | %.1f | %.1f | %.2f |\n", p.write, e.write, e.write/p.write)
	fmt.Printf("BENCH| read 1 MiB O_DIRECT, MiB/s | %.1f | %.1f | %.2f |\n", p.read, e.read, e.read/p.read)
}
