// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestKernelNodeExpand grows the export on the server, then
// NodeExpandVolume resizes the device and grows the mounted filesystem
// online while a writer keeps going. Between the two the server crashes
// and comes back with the grown export: the device must reconnect to it
// (keeping its size) rather than give up, so the expansion still works.
func TestKernelNodeExpand(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			n := newNode(t)
			img := backingFile(t, 320<<20)
			srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
			vol := "expand-" + fs
			target := n.stagePublish(vol, fsCap(fs), map[string]string{driver.KeyURI: srv.URI(""),
				driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s"})
			before := fsSize(t, target)
			w := startWriter(t, filepath.Join(target, "log"))
			w.waitRecords(t, 10, time.Minute)

			if err := os.Truncate(img, 640<<20); err != nil {
				t.Fatal(err)
			}
			srv.Kill()
			waitHealth(t, n, vol, csi.VolumeHealthErrorType_DEGRADED, 30*time.Second)
			srv.Start()
			waitHealth(t, n, vol, csi.VolumeHealthErrorType_UNKNOWN_VOLUME_HEALTH_TYPE, 60*time.Second)
			w.waitRecords(t, w.records.Load()+10, time.Minute)
			if s := fsSize(t, target); s != before {
				t.Errorf("filesystem size changed from %d to %d before the expansion", before, s)
			}
			resp, err := n.svc.NodeExpandVolume(context.Background(), &csi.NodeExpandVolumeRequest{VolumeId: vol,
				VolumePath: target, StagingTargetPath: n.staging(vol), CapacityRange: &csi.CapacityRange{RequiredBytes: 640 << 20}})
			if err != nil {
				t.Fatalf("NodeExpandVolume: %v", err)
			}
			if resp.CapacityBytes != 640<<20 {
				t.Errorf("capacity %d, want %d", resp.CapacityBytes, 640<<20)
			}
			w.waitRecords(t, w.records.Load()+10, time.Minute)
			after := fsSize(t, target)
			if after < before+250<<20 {
				t.Errorf("filesystem grew from %d to %d bytes, want about 320 MiB more", before, after)
			}
			got := w.finish(t)
			t.Logf("%s grew from %d to %d MiB online; writer acknowledged %d records", fs, before>>20, after>>20, got)
			n.unpublishUnstage(vol, target)
		})
	}
}

func fsSize(t *testing.T, path string) int64 {
	t.Helper()
	var s unix.Statfs_t
	if err := unix.Statfs(path, &s); err != nil {
		t.Fatal(err)
	}
	return int64(s.Blocks) * int64(s.Bsize)
}
