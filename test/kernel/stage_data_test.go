// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestKernelStageKeepsForeignData: NodeStage of an ext4 volume whose export
// already holds something else — an XFS filesystem, a LUKS header, a
// partition table — never formats over it (the blank shortcut must not
// call it blank, blkid then finds it): the stage fails and the export's
// bytes are unchanged. (TestKernelNodeLifecycle covers the other half: a
// fresh volume formatted by the shortcut keeps its data across unstage and
// stage.)
func TestKernelStageKeepsForeignData(t *testing.T) {
	n := newNode(t)
	fixtures := map[string]func(t *testing.T, img string){
		"xfs": func(t *testing.T, img string) { runTool(t, "", "mkfs.xfs", "-q", "-f", img) },
		"luks2": func(t *testing.T, img string) {
			runTool(t, "passphrase-for-test", "cryptsetup", "luksFormat", "-q", "--type", "luks2",
				"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-", img)
		},
		"dos": func(t *testing.T, img string) {
			mbr := make([]byte, 512)
			e := mbr[446:]
			e[4] = 0x83
			binary.LittleEndian.PutUint32(e[8:], 2048)
			binary.LittleEndian.PutUint32(e[12:], 4096)
			mbr[510], mbr[511] = 0x55, 0xaa
			f, err := os.OpenFile(img, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(mbr, 0); err != nil {
				t.Fatal(err)
			}
		},
	}
	for name, make := range fixtures {
		t.Run(name, func(t *testing.T) {
			img := backingFile(t, 320<<20)
			make(t, img)
			before := fileSum(t, img)
			srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
			vol := "foreign-" + name
			ctx := context.Background()
			_, err := n.svc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol),
				VolumeCapability: fsCap("ext4"), VolumeContext: map[string]string{driver.KeyURI: srv.URI("")}})
			if err == nil {
				t.Errorf("NodeStage as ext4 of an export holding %s succeeded", name)
			}
			if _, err := n.svc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)}); err != nil {
				t.Fatalf("unstage: %v", err)
			}
			if after := fileSum(t, img); after != before {
				t.Fatalf("the export holding %s changed under a failed NodeStage", name)
			}
		})
	}
}

func runTool(t *testing.T, stdin, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}
