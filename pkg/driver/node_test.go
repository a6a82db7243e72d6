// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/driver/drivertest"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

type nodeEnv struct {
	svc      *driver.NodeService
	att      *drivertest.Attacher
	mnt      *drivertest.Mounter
	kubelet  string
	stateDir string
}

func newNodeEnv(t *testing.T) *nodeEnv {
	t.Helper()
	root := t.TempDir()
	e := &nodeEnv{kubelet: filepath.Join(root, "kubelet"), stateDir: filepath.Join(root, "state")}
	e.att = drivertest.NewAttacher(t.TempDir())
	e.mnt = drivertest.NewMounter(e.att)
	e.svc = e.restart(t)
	return e
}

// restart builds a new node service over the same state, attacher and
// mounter, as a plugin restart would.
func (e *nodeEnv) restart(t *testing.T) *driver.NodeService {
	t.Helper()
	svc, err := driver.NewNodeService(driver.NodeOptions{NodeID: "node-1", KubeletDir: e.kubelet, StateDir: e.stateDir}, e.att, e.mnt)
	if err != nil {
		t.Fatal(err)
	}
	e.svc = svc
	return svc
}

func mountCap(fs string, mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
}

func blockCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
}

var rwo = csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER

func (e *nodeEnv) stageReq(vol string) *csi.NodeStageVolumeRequest {
	return &csi.NodeStageVolumeRequest{
		VolumeId: vol, StagingTargetPath: e.staging(vol),
		VolumeCapability: mountCap("ext4", rwo),
		VolumeContext:    map[string]string{"uri": "nbd://server/" + vol, "csi.storage.k8s.io/pv/name": "pv"},
	}
}

func (e *nodeEnv) target(vol string) string {
	return filepath.Join(e.kubelet, "pods", "uid", "volumes", "kubernetes.io~csi", vol, "mount")
}

// staging is where kubelet 1.24+ stages a filesystem volume of this driver.
func (e *nodeEnv) staging(vol string) string {
	return kubeletStaging(e.kubelet, vol)
}

func kubeletStaging(kubelet, vol string) string {
	h := sha256.Sum256([]byte(vol))
	return filepath.Join(kubelet, "plugins", "kubernetes.io", "csi", driver.DefaultDriverName, hex.EncodeToString(h[:]), "globalmount")
}

func code(err error) codes.Code { return status.Code(err) }

func TestNodeStageValidation(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	tests := []struct {
		name   string
		mutate func(r *csi.NodeStageVolumeRequest)
		want   codes.Code
	}{
		{"ok", func(*csi.NodeStageVolumeRequest) {}, codes.OK},
		{"no volume id", func(r *csi.NodeStageVolumeRequest) { r.VolumeId = "" }, codes.InvalidArgument},
		{"no staging path", func(r *csi.NodeStageVolumeRequest) { r.StagingTargetPath = "" }, codes.InvalidArgument},
		{"relative staging path", func(r *csi.NodeStageVolumeRequest) { r.StagingTargetPath = "rel" }, codes.InvalidArgument},
		{"no capability", func(r *csi.NodeStageVolumeRequest) { r.VolumeCapability = nil }, codes.InvalidArgument},
		{"multi node writer", func(r *csi.NodeStageVolumeRequest) {
			r.VolumeCapability = mountCap("ext4", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)
		}, codes.InvalidArgument},
		{"btrfs", func(r *csi.NodeStageVolumeRequest) { r.VolumeCapability = mountCap("btrfs", rwo) }, codes.InvalidArgument},
		{"no uri", func(r *csi.NodeStageVolumeRequest) { delete(r.VolumeContext, "uri") }, codes.InvalidArgument},
		{"bad uri", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["uri"] = "http://x/y" }, codes.InvalidArgument},
		{"unknown key", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["colour"] = "blue" }, codes.InvalidArgument},
		{"connections zero", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["connections"] = "0" }, codes.InvalidArgument},
		{"connections huge", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["connections"] = "1000" }, codes.InvalidArgument},
		{"timeout garbage", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["timeout"] = "soon" }, codes.InvalidArgument},
		{"timeout negative", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["timeout"] = "-5s" }, codes.InvalidArgument},
		{"timeout fractional", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["timeout"] = "1.5s" }, codes.InvalidArgument},
		{"block size odd", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["blockSize"] = "600" }, codes.InvalidArgument},
		{"cert without key", func(r *csi.NodeStageVolumeRequest) { r.Secrets = map[string]string{"tls.crt": "x"} }, codes.InvalidArgument},
		{"export missing", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["uri"] = "nbd://server/gone" }, codes.NotFound},
		// mkfs runs as root: options that read host files are refused.
		{"mkfs copies a host directory", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["mkfsOptions"] = "-d /etc" }, codes.InvalidArgument},
		{"mkfs bad blocks file", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["mkfsOptions"] = "-l /etc/shadow" }, codes.InvalidArgument},
		{"mkfs xfs protofile", func(r *csi.NodeStageVolumeRequest) {
			r.VolumeCapability = mountCap("xfs", rwo)
			r.VolumeContext["mkfsOptions"] = "-p /etc/proto"
		}, codes.InvalidArgument},
		{"mkfs bare device", func(r *csi.NodeStageVolumeRequest) { r.VolumeContext["mkfsOptions"] = "/dev/sda" }, codes.InvalidArgument},
	}
	e.att.AttachErr["gone"] = nbd.ErrUnknownExport
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := e.stageReq("vol" + string(rune('a'+i)))
			tt.mutate(req)
			_, err := e.svc.NodeStageVolume(ctx, req)
			if code(err) != tt.want {
				t.Fatalf("code = %v (%v), want %v", code(err), err, tt.want)
			}
		})
	}
}

// TestNodeStageNotReady: a node whose kernel cannot attach refuses to
// stage with FailedPrecondition and the reason, and stages once it can.
func TestNodeStageNotReady(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	e.att.ReadyErr = errors.New("nbd kernel support: kernel has no nbd support")
	_, err := e.svc.NodeStageVolume(ctx, e.stageReq("vol1"))
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cannot attach NBD devices") ||
		!strings.Contains(err.Error(), "no nbd support") {
		t.Fatalf("stage on a node without nbd: %v, want FailedPrecondition with the reason", err)
	}
	e.att.ReadyErr = nil
	if _, err := e.svc.NodeStageVolume(ctx, e.stageReq("vol1")); err != nil {
		t.Fatalf("stage once ready: %v", err)
	}
}

func TestNodeLifecycle(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	req := e.stageReq("vol1")
	req.VolumeContext["mkfsOptions"] = "-E lazy_itable_init=1"
	for i := 0; i < 2; i++ { // the second call is a no-op
		if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
			t.Fatalf("stage #%d: %v", i, err)
		}
	}
	if diff := cmp.Diff([]string{"attach vol1 " + filepath.Join(e.att.Dir, "nbd0")}, e.att.Log); diff != "" {
		t.Errorf("attacher log (-want +got):\n%s", diff)
	}
	dev := filepath.Join(e.att.Dir, "nbd0")
	if e.mnt.Formats[dev] != "ext4" || !cmp.Equal(e.mnt.FormatOptions[dev], []string{"-E", "lazy_itable_init=1"}) {
		t.Errorf("format = %q %q", e.mnt.Formats[dev], e.mnt.FormatOptions[dev])
	}

	// Same volume, different export → AlreadyExists.
	other := e.stageReq("vol1")
	other.VolumeContext["uri"] = "nbd://server/other"
	if _, err := e.svc.NodeStageVolume(ctx, other); code(err) != codes.AlreadyExists {
		t.Errorf("restage with another export: %v, want AlreadyExists", err)
	}

	pub := &csi.NodePublishVolumeRequest{VolumeId: "vol1", StagingTargetPath: req.StagingTargetPath,
		TargetPath: e.target("vol1"), VolumeCapability: req.VolumeCapability}
	for i := 0; i < 2; i++ {
		if _, err := e.svc.NodePublishVolume(ctx, pub); err != nil {
			t.Fatalf("publish #%d: %v", i, err)
		}
	}
	outside := proto.Clone(pub).(*csi.NodePublishVolumeRequest)
	for _, p := range []string{"/etc/evil", filepath.Join(e.kubelet, "plugins", "other"), filepath.Join(e.kubelet, "pods", "..", "x"),
		filepath.Join(e.kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices")} {
		outside.TargetPath = p
		if _, err := e.svc.NodePublishVolume(ctx, outside); code(err) != codes.InvalidArgument {
			t.Errorf("publish at %s: %v, want InvalidArgument", p, err)
		}
	}
	outside.TargetPath = "/etc/evil"
	if _, err := e.svc.NodePublishVolume(ctx, outside); code(err) != codes.InvalidArgument {
		t.Errorf("publish outside kubelet dir: %v, want InvalidArgument", err)
	}
	sneaky := proto.Clone(pub).(*csi.NodePublishVolumeRequest)
	sneaky.TargetPath = filepath.Join(e.kubelet, "pods", "..", "..", "etc")
	if _, err := e.svc.NodePublishVolume(ctx, sneaky); code(err) != codes.InvalidArgument {
		t.Errorf("publish with ..: %v, want InvalidArgument", err)
	}

	stats, err := e.svc.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "vol1", VolumePath: pub.TargetPath})
	if err != nil || len(stats.Usage) != 2 {
		t.Fatalf("stats: %v %v", stats, err)
	}
	h, err := e.svc.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: "vol1"})
	if err != nil || len(h.VolumeHealth.HealthStatuses) != 0 {
		t.Fatalf("health: %v %v", h, err)
	}
	e.att.SetHealthy("vol1", false, "link dead, reconnecting")
	h, err = e.svc.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: "vol1"})
	if err != nil || len(h.VolumeHealth.HealthStatuses) != 1 || h.VolumeHealth.HealthStatuses[0].Status != csi.VolumeHealthErrorType_DEGRADED {
		t.Fatalf("health while dead: %v %v", h, err)
	}

	// A restarted plugin still knows the volume.
	e.restart(t)
	for i := 0; i < 2; i++ {
		if _, err := e.svc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol1", TargetPath: pub.TargetPath}); err != nil {
			t.Fatalf("unpublish #%d: %v", i, err)
		}
		if _, err := e.svc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "vol1", StagingTargetPath: req.StagingTargetPath}); err != nil {
			t.Fatalf("unstage #%d: %v", i, err)
		}
	}
	if devs, _ := e.att.List(ctx); len(devs) != 0 {
		t.Errorf("devices left: %v", devs)
	}
	if mps, _ := e.mnt.List(); len(mps) != 0 {
		t.Errorf("mounts left: %v", mps)
	}
	if _, err := os.Stat(pub.TargetPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("target not removed: %v", err)
	}
}

func TestNodePublishSelfHeal(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	req := e.stageReq("vol1")
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	// A reboot: the device and the staging mount are gone, the record stays.
	e.att.Forget("vol1")
	if err := e.mnt.Unmount(req.StagingTargetPath); err != nil {
		t.Fatal(err)
	}
	e.restart(t)
	pub := &csi.NodePublishVolumeRequest{VolumeId: "vol1", StagingTargetPath: req.StagingTargetPath,
		TargetPath: e.target("vol1"), VolumeCapability: req.VolumeCapability}
	if _, err := e.svc.NodePublishVolume(ctx, pub); err != nil {
		t.Fatalf("publish after reboot: %v", err)
	}
	mounted, err := e.mnt.IsMountPoint(req.StagingTargetPath)
	if err != nil || !mounted {
		t.Fatalf("staging path not mounted again: %v %v", mounted, err)
	}

	// A volume never staged is FailedPrecondition, never an empty bind.
	pub2 := proto.Clone(pub).(*csi.NodePublishVolumeRequest)
	pub2.VolumeId, pub2.TargetPath, pub2.StagingTargetPath = "vol2", e.target("vol2"), e.staging("vol2")
	if _, err := e.svc.NodePublishVolume(ctx, pub2); code(err) != codes.FailedPrecondition {
		t.Errorf("publish unstaged: %v, want FailedPrecondition", err)
	}
}

func TestNodeBlockVolume(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	req := e.stageReq("blk")
	req.VolumeCapability = blockCap()
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	if len(e.mnt.Formats) != 0 {
		t.Errorf("block volume was formatted: %v", e.mnt.Formats)
	}
	// Where the kubelet publishes block volumes (found by the e2e suite: not
	// under pods/).
	target := filepath.Join(e.kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices", "publish", "pv-blk", "pod-uid")
	pub := &csi.NodePublishVolumeRequest{VolumeId: "blk", StagingTargetPath: req.StagingTargetPath, TargetPath: target, VolumeCapability: blockCap()}
	if _, err := e.svc.NodePublishVolume(ctx, pub); err != nil {
		t.Fatal(err)
	}
	mps, _ := e.mnt.List()
	if len(mps) != 1 || mps[0].Device != filepath.Join(e.att.Dir, "nbd0") || mps[0].Path != target {
		t.Errorf("mounts = %+v, want the device bound to the target", mps)
	}
	st, err := e.svc.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "blk", VolumePath: target})
	if err != nil || len(st.Usage) != 1 || st.Usage[0].Total != 1<<30 {
		t.Errorf("block stats = %v, %v", st, err)
	}
	// The kubelet asks for a block volume's stats at its global map path's
	// per-pod entry, a bind mount of the published device.
	mapped := filepath.Join(e.kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices", "pv-blk", "dev", "pod-uid")
	if err := os.MkdirAll(filepath.Dir(mapped), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mapped, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.mnt.Mount(target, mapped, "", []string{"bind"}); err != nil {
		t.Fatal(err)
	}
	st, err = e.svc.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "blk", VolumePath: mapped})
	if err != nil || len(st.Usage) != 1 || st.Usage[0].Total != 1<<30 {
		t.Errorf("block stats at the global map path = %v, %v", st, err)
	}
	if err := e.mnt.Unmount(mapped); err != nil {
		t.Fatal(err)
	}
	// Publishing a block-staged volume as a filesystem is refused.
	pub.VolumeCapability = mountCap("ext4", rwo)
	pub.TargetPath = e.target("blk")
	if _, err := e.svc.NodePublishVolume(ctx, pub); code(err) != codes.InvalidArgument {
		t.Errorf("publish block as mount: %v, want InvalidArgument", err)
	}

	// Unpublish removes the file the publish made, and nothing it did not
	// make: files at other block target paths stay, empty or not.
	foreign := filepath.Join(filepath.Dir(target), "other-pod")
	if err := os.WriteFile(foreign, []byte("not ours"), 0o600); err != nil {
		t.Fatal(err)
	}
	emptyForeign := filepath.Join(filepath.Dir(target), "empty-pod")
	if err := os.WriteFile(emptyForeign, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{target, foreign, emptyForeign} {
		if _, err := e.svc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "blk", TargetPath: p}); err != nil {
			t.Errorf("unpublish %s: %v", p, err)
		}
	}
	if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("block target %s left after unpublish: %v", target, err)
	}
	for _, p := range []string{foreign, emptyForeign} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("file %s that no publish made was removed: %v", p, err)
		}
	}
	if mps, _ := e.mnt.List(); len(mps) != 0 {
		t.Errorf("mounts after unpublish: %+v", mps)
	}
}

func TestNodeExpand(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	req := e.stageReq("vol1")
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	e.att.Sizes["vol1"] = 2 << 30
	resp, err := e.svc.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "vol1", VolumePath: req.StagingTargetPath,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30}})
	if err != nil || resp.CapacityBytes != 2<<30 || len(e.mnt.Resized) != 1 {
		t.Fatalf("expand = %v, %v, resized %v", resp, err, e.mnt.Resized)
	}
	_, err = e.svc.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "vol1", VolumePath: req.StagingTargetPath,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 3 << 30}})
	if code(err) != codes.OutOfRange {
		t.Errorf("expand beyond the export: %v, want OutOfRange", err)
	}
	if _, err := e.svc.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "nope", VolumePath: "/x"}); code(err) != codes.NotFound {
		t.Errorf("expand unknown volume: %v, want NotFound", err)
	}
}

func TestNodeConcurrentSameVolume(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	codesSeen := make(chan codes.Code, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.svc.NodeStageVolume(ctx, e.stageReq("vol1"))
			codesSeen <- code(err)
		}()
	}
	wg.Wait()
	close(codesSeen)
	for c := range codesSeen {
		if c != codes.OK && c != codes.Aborted {
			t.Errorf("concurrent stage returned %v", c)
		}
	}
	if devs, _ := e.att.List(ctx); len(devs) != 1 {
		t.Errorf("devices = %d, want exactly 1", len(devs))
	}
}

func TestNodeInfoAndCapabilities(t *testing.T) {
	e := newNodeEnv(t)
	info, err := e.svc.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil || info.NodeId != "node-1" || info.AccessibleTopology.Segments[driver.TopologyKeyNode] != "node-1" {
		t.Errorf("info = %v, %v", info, err)
	}
	caps, err := e.svc.NodeGetCapabilities(context.Background(), &csi.NodeGetCapabilitiesRequest{})
	if err != nil || len(caps.Capabilities) != 5 {
		t.Errorf("capabilities = %v, %v", caps, err)
	}
}

func TestNodeRecoverAndOrphans(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	if _, err := e.svc.NodeStageVolume(ctx, e.stageReq("kept")); err != nil {
		t.Fatal(err)
	}
	// A device of ours nobody staged (e.g. a crash between attach and record).
	orphan, err := e.att.Attach(ctx, driver.AttachSpec{VolumeID: "orphan", URI: &nbd.URI{Export: "orphan"}})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := driver.NewNodeService(driver.NodeOptions{NodeID: "node-1", KubeletDir: e.kubelet, StateDir: e.stateDir,
		OrphanGracePeriod: time.Hour}, e.att, e.mnt)
	if err != nil {
		t.Fatal(err)
	}
	svc.Start(context.Background())
	waitLogged(t, e.att, "adopt kept")
	now := time.Now()
	svc.SweepOrphansForTest(ctx, now)
	if _, err := e.att.Lookup(ctx, "orphan"); err != nil {
		t.Fatalf("orphan detached before the grace period: %v", err)
	}
	svc.SweepOrphansForTest(ctx, now.Add(2*time.Hour))
	if _, err := e.att.Lookup(ctx, "orphan"); !errors.Is(err, driver.ErrNotAttached) {
		t.Errorf("orphan %s still attached after the grace period: %v", orphan.Device, err)
	}
	if _, err := e.att.Lookup(ctx, "kept"); err != nil {
		t.Errorf("staged volume lost: %v", err)
	}
}

// waitLogged waits until the fake attacher logged entry.
func waitLogged(t *testing.T, att *drivertest.Attacher, entry string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !slices.Contains(att.Logged(), entry); {
		if time.Now().After(deadline) {
			t.Fatalf("%q not logged: %v", entry, att.Logged())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestNodeStartServesFirst: Start returns at once and the node answers
// while the adoption of a staged volume waits for its server (it used to
// adopt every volume serially before serving).
func TestNodeStartServesFirst(t *testing.T) {
	e := newNodeEnv(t)
	ctx := context.Background()
	if _, err := e.svc.NodeStageVolume(ctx, e.stageReq("slow")); err != nil {
		t.Fatal(err)
	}
	e.att.AdoptWait = make(chan struct{})
	svc, err := driver.NewNodeService(driver.NodeOptions{NodeID: "node-1", KubeletDir: e.kubelet, StateDir: e.stateDir}, e.att, e.mnt)
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	go func() {
		svc.Start(ctx)
		close(started)
	}()
	select {
	case <-started:
	case <-time.After(time.Second):
		close(e.att.AdoptWait)
		t.Fatal("Start blocked on an adoption")
	}
	if _, err := svc.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{}); err != nil {
		t.Fatal(err)
	}
	close(e.att.AdoptWait)
	waitLogged(t, e.att, "adopt slow")
}
