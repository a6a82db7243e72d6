// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/pkg/attach"
	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// requireKernel skips unless the nbd driver can be used; inside the VM rig
// (NBDCSI_IN_VM=1) it fails instead, so the suite can never pass by skipping.
func requireKernel(t *testing.T) {
	t.Helper()
	why := ""
	switch {
	case os.Geteuid() != 0:
		why = "needs root"
	default:
		if _, err := os.Stat("/sys/module/nbd"); err != nil {
			why = "the nbd module is not loaded (modprobe nbd)"
		}
	}
	if why == "" {
		return
	}
	if os.Getenv("NBDCSI_IN_VM") == "1" {
		t.Fatalf("kernel test cannot run in the VM: %s", why)
	}
	t.Skipf("kernel test: %s (make vm-test runs these in a VM)", why)
}

// node is a node service on the real kernel, as `nbd-csi serve --mode=node`
// builds it.
type node struct {
	t        *testing.T
	svc      *driver.NodeService
	att      *attach.Attacher
	kubelet  string
	stateDir string

	mu     sync.Mutex
	events []string // supervision event kinds, as the metrics see them
}

// sawEvents returns the supervision event kinds reported so far.
func (n *node) sawEvents() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.events)
}

func newNode(t *testing.T) *node {
	t.Helper()
	requireKernel(t)
	root := t.TempDir()
	n := &node{t: t, kubelet: filepath.Join(root, "kubelet"), stateDir: filepath.Join(root, "state")}
	n.start()
	t.Cleanup(func() { n.att.Close() })
	return n
}

// start builds the attacher and node service (again, after stop: a plugin
// restart within the process — devices outlive both).
func (n *node) start() {
	n.t.Helper()
	ctx := context.Background()
	n.att = attach.New(ctx, attach.Options{Device: device.Options{Module: device.ModuleOptions{Skip: true}},
		SecretsDir: filepath.Join(n.stateDir, "tls"),
		OnEvent: func(_ string, e device.Event) {
			n.mu.Lock()
			n.events = append(n.events, e.Kind.String())
			n.mu.Unlock()
		}})
	if err := n.att.Ready(ctx); err != nil {
		n.t.Fatal(err)
	}
	svc, err := driver.NewNodeService(driver.NodeOptions{NodeID: "vm", KubeletDir: n.kubelet, StateDir: n.stateDir}, n.att, driver.NewNodeMounter(),
		driver.WithEncryption(crypt.Volumes{C: crypt.New(crypt.ExecRunner{}, testPBKDF)}, crypt.SecretKeySource{}))
	if err != nil {
		n.t.Fatal(err)
	}
	svc.Start(ctx)
	n.svc = svc
}

// testPBKDF fixes the key slots' argon2id cost instead of benchmarking for
// cryptsetup's 2 s unlock time: under TCG on a shared host the benchmark and
// each unlock took minutes. The node plugin binary keeps the defaults.
var testPBKDF = crypt.Options{PBKDFMemoryKiB: 32 << 10, PBKDFIterations: 4}

func (n *node) stop() { n.att.Close() }

func (n *node) staging(vol string) string { return kubeletStaging(n.kubelet, vol) }

// kubeletStaging is where kubelet 1.24+ stages a filesystem volume of this
// driver (the node plugin accepts only the kubelet's paths).
func kubeletStaging(kubelet, vol string) string {
	h := sha256.Sum256([]byte(vol))
	return filepath.Join(kubelet, "plugins", "kubernetes.io", "csi", driver.DefaultDriverName, hex.EncodeToString(h[:]), "globalmount")
}

func (n *node) target(vol string) string {
	return filepath.Join(n.kubelet, "pods", "pod-"+vol, "volumes", "kubernetes.io~csi", vol, "mount")
}

func fsCap(fs string) *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
}

func blockCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
}

// stagePublish stages and publishes vol and returns the target path.
func (n *node) stagePublish(vol string, c *csi.VolumeCapability, vc map[string]string) string {
	n.t.Helper()
	return n.stagePublishSecrets(vol, c, vc, nil)
}

// stagePublishSecrets is stagePublish with node-stage secrets.
func (n *node) stagePublishSecrets(vol string, c *csi.VolumeCapability, vc, secrets map[string]string) string {
	n.t.Helper()
	ctx := context.Background()
	if _, err := n.svc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol),
		VolumeCapability: c, VolumeContext: vc, Secrets: secrets}); err != nil {
		n.t.Fatalf("stage %s: %v", vol, err)
	}
	target := n.target(vol)
	if c.GetBlock() != nil {
		// Where the kubelet publishes block volumes.
		target = filepath.Join(n.kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices", "publish", vol, "pod-"+vol)
	}
	// A failing test still leaves no mount or device behind (idempotent
	// calls: after a successful unpublishUnstage these do nothing).
	n.t.Cleanup(func() {
		ctx := context.Background()
		_, _ = n.svc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
		_, _ = n.svc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)})
	})
	if _, err := n.svc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol),
		TargetPath: target, VolumeCapability: c}); err != nil {
		n.t.Fatalf("publish %s: %v", vol, err)
	}
	return target
}

// unpublishUnstage undoes stagePublish.
func (n *node) unpublishUnstage(vol, target string) {
	n.t.Helper()
	ctx := context.Background()
	if _, err := n.svc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target}); err != nil {
		n.t.Fatalf("unpublish %s: %v", vol, err)
	}
	if _, err := n.svc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)}); err != nil {
		n.t.Fatalf("unstage %s: %v", vol, err)
	}
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func sum(b []byte) [32]byte { return sha256.Sum256(b) }
