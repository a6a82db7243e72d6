// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// stageEnc stages vol as an encrypted volume with passphrase pass. It
// returns the error of NodeStageVolume.
func (n *node) stageEnc(vol string, c *csi.VolumeCapability, uri, pass string) error {
	n.t.Helper()
	return n.stageEncContext(vol, c, map[string]string{driver.KeyURI: uri}, pass)
}

// stageEncContext is stageEnc with a volume context of the caller's (the
// encrypted key is added).
func (n *node) stageEncContext(vol string, c *csi.VolumeCapability, vc map[string]string, pass string) error {
	n.t.Helper()
	vc = maps.Clone(vc)
	vc[driver.KeyEncrypted] = "true"
	_, err := n.svc.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol),
		VolumeCapability: c, VolumeContext: vc,
		Secrets: map[string]string{driver.SecretEncryptionPassphrase: pass}})
	n.t.Cleanup(func() {
		_, _ = n.svc.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)})
	})
	return err
}

// publish publishes a staged vol and returns the target.
func (n *node) publish(vol string, c *csi.VolumeCapability) string {
	n.t.Helper()
	target := n.target(vol)
	if c.GetBlock() != nil {
		target = filepath.Join(n.kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices", "publish", vol, "pod-"+vol)
	}
	n.t.Cleanup(func() {
		_, _ = n.svc.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
	})
	if _, err := n.svc.NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol),
		TargetPath: target, VolumeCapability: c}); err != nil {
		n.t.Fatalf("publish %s: %v", vol, err)
	}
	return target
}

// fileContains reports whether the file holds pattern anywhere, reading it
// in chunks (backing files are hundreds of MiB).
func fileContains(t *testing.T, path string, pattern []byte) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4<<20+len(pattern))
	carry := 0
	for {
		n, err := io.ReadFull(f, buf[carry:])
		if bytes.Contains(buf[:carry+n], pattern) {
			return true
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
		total := carry + n
		keep := min(len(pattern)-1, total)
		copy(buf, buf[total-keep:total])
		carry = keep
	}
}

// patternData is 1 MiB made of one random 4 KiB block repeated: the block
// is what the backing file is searched for.
func patternData(t *testing.T) (data, block []byte) {
	block = randomBytes(t, 4096)
	return bytes.Repeat(block, 256), block
}

func fileHead(t *testing.T, path string, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := io.ReadFull(f, b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestKernelEncrypted stages encrypted ext4, xfs and block volumes on real
// dm-crypt: what a pod writes never reaches the server in clear (the
// backing file is searched for the written block; a plain volume is the
// control that the search finds it), a wrong passphrase is refused and
// leaves the header untouched, and after unstage the right passphrase
// reads the data back.
func TestKernelEncrypted(t *testing.T) {
	t.Run("plain control", func(t *testing.T) {
		n := newNode(t)
		img := backingFile(t, 64<<20)
		srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
		target := n.stagePublish("plain-control", blockCap(), map[string]string{driver.KeyURI: srv.URI("")})
		data, block := patternData(t)
		write(t, target, true, data)
		if !fileContains(t, img, block) {
			t.Fatal("the search does not find a block written to a plain volume: it cannot prove anything")
		}
		n.unpublishUnstage("plain-control", target)
	})
	for _, tc := range []struct {
		name string
		c    *csi.VolumeCapability
	}{{"ext4", fsCap("ext4")}, {"xfs", fsCap("xfs")}, {"block", blockCap()}} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			block := tc.c.GetBlock() != nil
			img := backingFile(t, 336<<20)
			srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
			vol := "enc-" + tc.name
			started := time.Now()
			if err := n.stageEnc(vol, tc.c, srv.URI(""), "pass-A"); err != nil {
				t.Fatalf("stage: %v", err)
			}
			t.Logf("first stage (luksFormat, open%s) took %s", map[bool]string{false: ", mkfs, mount"}[block], time.Since(started).Round(time.Millisecond))
			mapper := filepath.Join("/dev/mapper", crypt.MapperName(vol))
			if _, err := os.Stat(mapper); err != nil {
				t.Fatalf("mapping: %v", err)
			}
			target := n.publish(vol, tc.c)
			data, pat := patternData(t)
			write(t, target, block, data)
			if !bytes.HasPrefix(fileHead(t, img, 6), []byte("LUKS\xba\xbe")) {
				t.Fatal("the backing file does not start with a LUKS header")
			}
			if fileContains(t, img, pat) {
				t.Fatal("the server's backing file holds the written block in clear")
			}
			if st, err := n.svc.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target}); err != nil {
				t.Fatalf("stats: %v", err)
			} else if total := st.Usage[0].Total; total <= 0 || total > 320<<20 {
				t.Errorf("stats report %d bytes; want the size inside the mapping (at most 320 MiB)", total)
			}
			n.unpublishUnstage(vol, target)
			if _, err := os.Stat(mapper); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("after unstage the mapping is still there (%v)", err)
			}
			header := fileHead(t, img, crypt.HeaderArea)

			err := n.stageEnc(vol, tc.c, srv.URI(""), "pass-B")
			if status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("stage with a wrong passphrase: %v, want FailedPrecondition", err)
			}
			t.Logf("wrong passphrase: %v", err)
			if !bytes.Equal(fileHead(t, img, crypt.HeaderArea), header) {
				t.Fatal("a stage with a wrong passphrase changed the LUKS header area")
			}
			if _, err := n.svc.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)}); err != nil {
				t.Fatal(err)
			}

			if err := n.stageEnc(vol, tc.c, srv.URI(""), "pass-A"); err != nil {
				t.Fatalf("restage: %v", err)
			}
			target = n.publish(vol, tc.c)
			if got := read(t, target, block, len(data)); !bytes.Equal(got, data) {
				t.Fatal("data read back after restaging differs")
			}
			n.unpublishUnstage(vol, target)
		})
	}
}

// TestKernelEncryptedForeignData: an export holding a filesystem is never
// formatted for encryption.
func TestKernelEncryptedForeignData(t *testing.T) {
	n := newNode(t)
	img := backingFile(t, 64<<20)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	before := fileHead(t, img, 1<<20)
	srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
	err := n.stageEnc("enc-foreign", fsCap("ext4"), srv.URI(""), "k")
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "ext4") {
		t.Fatalf("got %v, want FailedPrecondition naming ext4", err)
	}
	if !bytes.Equal(fileHead(t, img, 1<<20), before) {
		t.Fatal("the ext4 export was modified")
	}
}

// TestKernelEncryptedExpand grows encrypted volumes online: export grown,
// device resized, mapping resized, filesystem grown.
func TestKernelEncryptedExpand(t *testing.T) {
	for _, tc := range []struct {
		name     string
		c        *csi.VolumeCapability
		from, to int64
	}{{"ext4", fsCap("ext4"), 128 << 20, 256 << 20}, {"xfs", fsCap("xfs"), 320 << 20, 640 << 20}, {"block", blockCap(), 128 << 20, 256 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			block := tc.c.GetBlock() != nil
			img := backingFile(t, tc.from)
			srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
			vol := "enc-expand-" + tc.name
			if err := n.stageEnc(vol, tc.c, srv.URI(""), "k"); err != nil {
				t.Fatal(err)
			}
			target := n.publish(vol, tc.c)
			data, _ := patternData(t)
			write(t, target, block, data)
			var before int64
			if block {
				before = deviceSize(t, target)
			} else {
				before = fsSize(t, target)
			}
			if err := os.Truncate(img, tc.to); err != nil {
				t.Fatal(err)
			}
			resp, err := n.svc.NodeExpandVolume(context.Background(), &csi.NodeExpandVolumeRequest{VolumeId: vol,
				VolumePath: target, StagingTargetPath: n.staging(vol), CapacityRange: &csi.CapacityRange{RequiredBytes: tc.to - crypt.HeaderArea},
				VolumeCapability: tc.c})
			if err != nil {
				t.Fatalf("NodeExpandVolume: %v", err)
			}
			if resp.CapacityBytes != tc.to-crypt.HeaderArea {
				t.Errorf("capacity %d, want %d (the export minus the LUKS2 header)", resp.CapacityBytes, tc.to-crypt.HeaderArea)
			}
			var after int64
			if block {
				after = deviceSize(t, target)
				if after != tc.to-crypt.HeaderArea {
					t.Errorf("mapping is %d bytes after expansion, want %d", after, tc.to-crypt.HeaderArea)
				}
			} else {
				after = fsSize(t, target)
				if grow := tc.to - tc.from; after < before+grow*3/4 {
					t.Errorf("filesystem grew from %d to %d bytes, want about %d more", before, after, grow)
				}
			}
			t.Logf("%s grew from %d to %d MiB", tc.name, before>>20, after>>20)
			if got := read(t, target, block, len(data)); !bytes.Equal(got, data) {
				t.Fatal("data differs after the expansion")
			}
			n.unpublishUnstage(vol, target)
		})
	}
}

// TestKernelEncryptedRotate rotates the passphrase of a staged volume
// with `nbd-csi luks rotate`: the volume keeps serving, then the old
// passphrase is refused and the new one opens it with the data intact.
func TestKernelEncryptedRotate(t *testing.T) {
	n := newNode(t)
	bin := pluginBinary(t)
	img := backingFile(t, 64<<20)
	srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
	vol := "enc-rotate"
	if err := n.stageEnc(vol, fsCap("ext4"), srv.URI(""), "old-pass"); err != nil {
		t.Fatal(err)
	}
	target := n.publish(vol, fsCap("ext4"))
	data, _ := patternData(t)
	write(t, target, false, data)

	dir := t.TempDir()
	newFile := filepath.Join(dir, "new")
	if err := os.WriteFile(newFile, []byte("new-pass"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "luks", "rotate", "--pbkdf-memory", "32768", "--pbkdf-iterations", "4", "--volume-id", vol, "--old-key-file", "-", "--new-key-file", newFile)
	cmd.Stdin = strings.NewReader("old-pass")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("luks rotate: %v\n%s", err, out)
	}
	// Repeating the rotation is fine (the old passphrase no longer opens
	// the header, the new one does: nothing left to do) ...
	cmd = exec.Command(bin, "luks", "rotate", "--pbkdf-memory", "32768", "--pbkdf-iterations", "4", "--volume-id", vol, "--old-key-file", "-", "--new-key-file", newFile)
	cmd.Stdin = strings.NewReader("old-pass")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("repeated rotation: %v\n%s", err, out)
	}
	// ... but a rotation to a third passphrase from a wrong one is refused.
	third := filepath.Join(dir, "third")
	if err := os.WriteFile(third, []byte("third-pass"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(bin, "luks", "rotate", "--pbkdf-memory", "32768", "--pbkdf-iterations", "4", "--volume-id", vol, "--old-key-file", "-", "--new-key-file", third)
	cmd.Stdin = strings.NewReader("not-it")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "opens no key slot") {
		t.Fatalf("rotation from a wrong passphrase: %v %s, want a refusal", err, out)
	}
	write(t, target, false, data) // still serving
	n.unpublishUnstage(vol, target)

	if err := n.stageEnc(vol, fsCap("ext4"), srv.URI(""), "old-pass"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("stage with the old passphrase after rotation: %v, want FailedPrecondition", err)
	}
	if _, err := n.svc.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)}); err != nil {
		t.Fatal(err)
	}
	if err := n.stageEnc(vol, fsCap("ext4"), srv.URI(""), "new-pass"); err != nil {
		t.Fatalf("stage with the new passphrase: %v", err)
	}
	target = n.publish(vol, fsCap("ext4"))
	if got := read(t, target, false, len(data)); !bytes.Equal(got, data) {
		t.Fatal("data differs after the rotation")
	}
	n.unpublishUnstage(vol, target)
}

// TestKernelEncryptedServerRestart: the NBD server of an encrypted ext4
// volume crashes while a writer fsyncs records, and comes back; the device
// under the LUKS mapping reconnects, the writer goes on without an I/O
// error, and what it acknowledged reads back through the mapping.
func TestKernelEncryptedServerRestart(t *testing.T) {
	n := newNode(t)
	img := backingFile(t, 256<<20)
	srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
	vc := map[string]string{driver.KeyURI: srv.URI(""), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s"}
	const vol = "enc-outage"
	if err := n.stageEncContext(vol, fsCap("ext4"), vc, "a passphrase for the outage"); err != nil {
		t.Fatalf("stage: %v", err)
	}
	target := n.publish(vol, fsCap("ext4"))
	w := startWriter(t, filepath.Join(target, "log"))
	w.waitRecords(t, 20, 2*time.Minute)
	srv.Kill()
	// The health check answers during the outage: it must not read the
	// stalled device (cryptsetup status would, and wait out the
	// dead-connection timeout with it).
	start := time.Now()
	degraded := waitHealth(t, n, vol, csi.VolumeHealthErrorType_DEGRADED, 30*time.Second)
	if d := time.Since(start); d > 30*time.Second {
		t.Fatalf("the health check took %v to report the outage", d)
	}
	time.Sleep(2 * time.Second)
	srv.Start()
	waitHealth(t, n, vol, csi.VolumeHealthErrorType_UNKNOWN_VOLUME_HEALTH_TYPE, 60*time.Second)
	if ev := n.sawEvents(); !slices.Contains(ev, "link-dead") || !slices.Contains(ev, "reconnected") || slices.Contains(ev, "gave-up") {
		t.Errorf("supervision events %v: want link-dead and reconnected, and no gave-up", ev)
	}
	w.waitRecords(t, w.records.Load()+20, 2*time.Minute)
	got := w.finish(t)
	t.Logf("encrypted volume rode out the server crash (health: %s); writer acknowledged %d records", degraded, got)
	n.unpublishUnstage(vol, target)
}
