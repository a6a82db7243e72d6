// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"bytes"
	"context"
	"io"
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
	// Over TCP the plugin ends the kernel's connections through
	// sock_diag (SOCK_DESTROY); over a unix socket through the descriptor
	// it kept.
	for _, c := range []struct {
		fs     string
		listen servers.Listen
	}{{"ext4", servers.Unix}, {"xfs", servers.Unix}, {"ext4", servers.TCP}} {
		fs := c.fs
		t.Run(fs+"-"+c.listen.String(), func(t *testing.T) {
			n := newNode(t)
			img := backingFile(t, 320<<20)
			srv := servers.Nbdkit(t, c.listen, "file", "file="+img)
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

// TestKernelNodeExpandBlock: a raw block volume whose export grew is
// resized by NodeExpandVolume (the kubelet calls it for block volumes too,
// since ControllerExpandVolume asks for node expansion): the published
// device file shows the new size and data at both ends reads back.
func TestKernelNodeExpandBlock(t *testing.T) {
	n := newNode(t)
	img := backingFile(t, 64<<20)
	srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
	target := n.stagePublish("expand-block", blockCap(), map[string]string{driver.KeyURI: srv.URI("")})
	head := randomBytes(t, 4096)
	write(t, target, true, head)
	if err := os.Truncate(img, 128<<20); err != nil {
		t.Fatal(err)
	}
	if got := deviceSize(t, target); got != 64<<20 {
		t.Fatalf("device is %d bytes before the expansion, want %d", got, 64<<20)
	}
	resp, err := n.svc.NodeExpandVolume(context.Background(), &csi.NodeExpandVolumeRequest{VolumeId: "expand-block",
		VolumePath: target, CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20},
		VolumeCapability: blockCap()})
	if err != nil {
		t.Fatalf("NodeExpandVolume: %v", err)
	}
	if resp.CapacityBytes != 128<<20 || deviceSize(t, target) != 128<<20 {
		t.Errorf("after expansion: capacity %d, device %d bytes; want %d", resp.CapacityBytes, deviceSize(t, target), 128<<20)
	}
	tail := randomBytes(t, 4096)
	writeAt(t, target, tail, 128<<20-4096)
	// What reached the server: the backing file has both blocks.
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 128<<20 || !bytes.Equal(b[:4096], head) || !bytes.Equal(b[len(b)-4096:], tail) {
		t.Error("the backing file lacks the first block written before or the last block written after the expansion")
	}
	n.unpublishUnstage("expand-block", target)
}

func deviceSize(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	return size
}

// writeAt writes data at off of the device file and syncs it.
func writeAt(t *testing.T, path string, data []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}
