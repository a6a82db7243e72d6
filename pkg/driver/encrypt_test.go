// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/crypt/crypttest"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/driver/drivertest"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

type encEnv struct {
	*nodeEnv
	tools *crypttest.Tools
	enc   crypt.Volumes
}

// newEncEnv is a node with encryption on the fake cryptsetup, over an
// attacher whose exports keep their data across detach.
func newEncEnv(t *testing.T) *encEnv {
	t.Helper()
	root := t.TempDir()
	e := &encEnv{nodeEnv: &nodeEnv{kubelet: filepath.Join(root, "kubelet"), stateDir: filepath.Join(root, "state")}}
	// The fake devices live in the fake /dev, as the real ones in /dev.
	devDir := filepath.Join(root, "dev")
	if err := os.MkdirAll(devDir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.att = drivertest.NewAttacher(devDir)
	e.att.Persist = true
	e.att.DefaultSize = 64 << 20
	e.mnt = drivertest.NewMounter(e.att)
	e.tools = crypttest.NewTools(devDir)
	e.enc = crypt.Volumes{C: crypt.New(e.tools, crypt.Options{DevDir: devDir, SysDir: e.tools.SysDir()})}
	e.restartEnc(t)
	return e
}

func (e *encEnv) restartEnc(t *testing.T) {
	t.Helper()
	svc, err := driver.NewNodeService(driver.NodeOptions{NodeID: "node-1", KubeletDir: e.kubelet, StateDir: e.stateDir},
		e.att, e.mnt, driver.WithEncryption(e.enc, crypt.SecretKeySource{}))
	if err != nil {
		t.Fatal(err)
	}
	e.svc = svc
}

func (e *encEnv) encStageReq(vol, pass string) *csi.NodeStageVolumeRequest {
	r := e.stageReq(vol)
	r.VolumeContext["encrypted"] = "true"
	r.Secrets = map[string]string{"encryptionPassphrase": pass}
	return r
}

func (e *encEnv) unstage(t *testing.T, vol string) {
	t.Helper()
	if _, err := e.svc.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol,
		StagingTargetPath: e.stageReq(vol).StagingTargetPath}); err != nil {
		t.Fatal(err)
	}
}

func (e *encEnv) mountedFrom(path string) string {
	mps, _ := e.mnt.List()
	for _, mp := range mps {
		if mp.Path == path {
			return mp.Device
		}
	}
	return ""
}

func TestEncryptedStageFormatsOnceAndReopens(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	req := e.encStageReq("vol1", "pass-1")
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	mapper := e.enc.Path("vol1")
	if got := e.mountedFrom(req.StagingTargetPath); got != mapper {
		t.Fatalf("staging path mounted from %q, want the mapping %q", got, mapper)
	}
	dev := filepath.Join(e.att.Dir, "export-vol1")
	if !e.tools.Opens(dev, []byte("pass-1")) {
		t.Fatal("the device was not formatted with the passphrase")
	}
	// Idempotent.
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatalf("repeated stage: %v", err)
	}
	e.unstage(t, "vol1")
	if _, ok := e.tools.Active(crypt.MapperName("vol1")); ok {
		t.Fatal("unstage left the mapping open")
	}
	if !slices.Equal(e.att.Log, []string{"attach vol1 " + dev, "detach vol1"}) {
		t.Fatalf("attacher log %q", e.att.Log)
	}
	// Restage: opened, not formatted again.
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(strings.Join(e.tools.Actions(), " "), "luksFormat"); n != 1 {
		t.Fatalf("luksFormat ran %d times, want 1", n)
	}
	for _, c := range e.tools.Commands() {
		if slices.ContainsFunc(c.Args, func(a string) bool { return strings.Contains(a, "pass-1") }) {
			t.Fatalf("the passphrase is in the arguments of %s %s", c.Name, c.Args[0])
		}
	}
}

func TestEncryptedWrongOrMissingKey(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	if _, err := e.svc.NodeStageVolume(ctx, e.encStageReq("vol1", "right")); err != nil {
		t.Fatal(err)
	}
	e.unstage(t, "vol1")
	before := len(e.tools.Actions())
	_, err := e.svc.NodeStageVolume(ctx, e.encStageReq("vol1", "wrong"))
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("wrong key: %v, want FailedPrecondition saying the passphrase does not open the header", err)
	}
	if strings.Contains(err.Error(), "wrong") && strings.Contains(err.Error(), `"wrong"`) {
		t.Fatal("the error quotes the passphrase")
	}
	if slices.Contains(e.tools.Actions()[before:], "luksFormat") {
		t.Fatal("a wrong key led to luksFormat")
	}
	if !e.tools.Opens(filepath.Join(e.att.Dir, "export-vol1"), []byte("right")) {
		t.Fatal("the header no longer opens with the right key")
	}
	e.unstage(t, "vol1")

	// No passphrase at all: refused before anything is attached.
	req := e.encStageReq("vol2", "")
	req.Secrets = nil
	if _, err := e.svc.NodeStageVolume(ctx, req); code(err) != codes.InvalidArgument {
		t.Fatalf("missing passphrase: %v, want InvalidArgument", err)
	}
	if atts, _ := e.att.List(ctx); len(atts) != 0 {
		t.Fatalf("attached %v without a passphrase", atts)
	}
}

func TestEncryptedRefusesForeignData(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	dev := filepath.Join(e.att.Dir, "export-vol1")
	b := make([]byte, 1<<20)
	b[0x438], b[0x439] = 0x53, 0xef // an ext4 superblock magic
	if err := os.WriteFile(dev, b, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := e.svc.NodeStageVolume(ctx, e.encStageReq("vol1", "k"))
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "ext4") {
		t.Fatalf("got %v, want FailedPrecondition naming ext4", err)
	}
	if slices.Contains(e.tools.Actions(), "luksFormat") {
		t.Fatal("a device holding ext4 was formatted")
	}
}

func TestEncryptedBlockPublishesMapping(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	req := e.encStageReq("vol1", "k")
	req.VolumeCapability = blockCap()
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(e.kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices", "publish", "vol1", "pod")
	if _, err := e.svc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "vol1", StagingTargetPath: req.StagingTargetPath,
		TargetPath: target, VolumeCapability: blockCap()}); err != nil {
		t.Fatal(err)
	}
	if got := e.mountedFrom(target); got != e.enc.Path("vol1") {
		t.Fatalf("target bound from %q, want the mapping %q", got, e.enc.Path("vol1"))
	}
}

func TestEncryptedPublishNeedsOpenMapping(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	req := e.encStageReq("vol1", "k")
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	// The mapping vanished (closed by hand) while the device stayed.
	if err := e.mnt.Unmount(req.StagingTargetPath); err != nil {
		t.Fatal(err)
	}
	if err := e.enc.Close(ctx, "vol1"); err != nil {
		t.Fatal(err)
	}
	_, err := e.svc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "vol1", StagingTargetPath: req.StagingTargetPath,
		TargetPath: e.target("vol1"), VolumeCapability: req.VolumeCapability})
	if code(err) != codes.FailedPrecondition {
		t.Fatalf("publish without a mapping: %v, want FailedPrecondition", err)
	}
	h, err := e.svc.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: "vol1"})
	if err != nil || len(h.VolumeHealth.HealthStatuses) != 1 || h.VolumeHealth.HealthStatuses[0].Reason != "MappingMissing" {
		t.Fatalf("health: %v %v, want MappingMissing", h, err)
	}
}

// TestEncryptedHealthDuringOutage: while the NBD server is down, I/O on
// the device under the mapping stalls (up to the dead-connection timeout);
// the health check must still answer at once, DEGRADED, and find the
// mapping open, without reading the device (cryptsetup status reads the
// LUKS header, so it stalls with it).
func TestEncryptedHealthDuringOutage(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	if _, err := e.svc.NodeStageVolume(ctx, e.encStageReq("vol1", "k")); err != nil {
		t.Fatal(err)
	}
	att, err := e.att.Lookup(ctx, "vol1")
	if err != nil {
		t.Fatal(err)
	}
	e.att.SetHealthy("vol1", false, "NBD connection lost; reconnecting")
	e.tools.Stall(att.Device, true)
	hctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	start := time.Now()
	h, err := e.svc.NodeGetVolumeHealth(hctx, &csi.NodeGetVolumeHealthRequest{VolumeId: "vol1"})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("health check took %v during the outage", d)
	}
	st := h.VolumeHealth.HealthStatuses
	if len(st) != 1 || st[0].Status != csi.VolumeHealthErrorType_DEGRADED || st[0].Reason != "ConnectionDead" {
		t.Fatalf("health during the outage: %v, want only DEGRADED ConnectionDead", st)
	}
}

func TestEncryptedRestartAdoptsAndExpands(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	req := e.encStageReq("vol1", "k")
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	e.restartEnc(t) // a plugin restart: the mapping stays open
	if _, err := e.svc.NodeStageVolume(ctx, req); err != nil {
		t.Fatalf("stage after restart: %v", err)
	}
	e.att.Sizes["vol1"] = 128 << 20
	resp, err := e.svc.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "vol1", VolumePath: req.StagingTargetPath})
	if err != nil || resp.CapacityBytes != 128<<20-crypt.HeaderArea {
		t.Fatalf("expand: %v %v", resp, err)
	}
	if !slices.Contains(e.tools.Actions(), "resize") {
		t.Fatal("expansion did not resize the mapping")
	}
	e.unstage(t, "vol1")
	if _, ok := e.tools.Active(crypt.MapperName("vol1")); ok {
		t.Fatal("unstage after restart left the mapping open")
	}
}

func TestEncryptedNodeWithoutSupport(t *testing.T) {
	e := newNodeEnv(t) // no WithEncryption
	r := e.stageReq("vol1")
	r.VolumeContext["encrypted"] = "true"
	r.Secrets = map[string]string{"encryptionPassphrase": "k"}
	if _, err := e.svc.NodeStageVolume(context.Background(), r); code(err) != codes.FailedPrecondition {
		t.Fatalf("got %v, want FailedPrecondition", err)
	}
}

func TestEncryptedParams(t *testing.T) {
	for v, ok := range map[string]bool{"true": true, "false": true, "yes": false, "": false} {
		_, err := driver.ParseVolumeContext(map[string]string{"uri": "nbd://h/e", "encrypted": v})
		if (err == nil) != ok {
			t.Errorf("encrypted=%q: err %v", v, err)
		}
	}
	c, _, _ := newController(t, store.Export{Name: "exact", Size: 1 << 30, Flags: 1}, store.Export{Name: "bigger", Size: 1<<30 + 16<<20, Flags: 1})
	ctx := context.Background()
	ro := &csi.CreateVolumeRequest{Name: "ro", Parameters: map[string]string{"server": server, "encrypted": "true"},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4", csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}}
	if _, err := c.CreateVolume(ctx, ro); code(err) != codes.InvalidArgument {
		t.Fatalf("encrypted read-only only: %v, want InvalidArgument", err)
	}
	if _, err := c.CreateVolume(ctx, createReq("bad", 1, map[string]string{"encrypted": "maybe"})); code(err) != codes.InvalidArgument {
		t.Fatalf("encrypted=maybe: %v, want InvalidArgument", err)
	}
	// GetCapacity of an encrypted pool counts what volumes can get: each
	// export less its LUKS2 header.
	capResp, err := c.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"server": server, "encrypted": "true"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(2<<30 - 16<<20); capResp.AvailableCapacity != want || capResp.MaximumVolumeSize.GetValue() != 1<<30 {
		t.Errorf("GetCapacity of the encrypted pool = %d (largest %d), want %d (largest %d)", capResp.AvailableCapacity, capResp.MaximumVolumeSize.GetValue(), want, 1<<30)
	}
	v, err := c.CreateVolume(ctx, createReq("pvc", 1<<30, map[string]string{"encrypted": "true"}))
	if err != nil {
		t.Fatal(err)
	}
	if v.Volume.VolumeContext["uri"] != server+"/bigger" || v.Volume.VolumeContext["encrypted"] != "true" || v.Volume.CapacityBytes != 1<<30 {
		t.Fatalf("volume %v: want the export with room for the LUKS2 header, its usable size, and encrypted in its context", v.Volume)
	}
	// Expansion reports, and checks against, the usable size.
	if _, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1<<30 + 1}}); code(err) != codes.OutOfRange {
		t.Fatalf("expand past the usable size: %v, want OutOfRange", err)
	}
	if r, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}}); err != nil || r.CapacityBytes != 1<<30 {
		t.Fatalf("expand within the usable size: %v %v", r, err)
	}
}

func TestEncryptedOrphans(t *testing.T) {
	ctx := context.Background()
	e := newEncEnv(t)
	svc, err := driver.NewNodeService(driver.NodeOptions{NodeID: "node-1", KubeletDir: e.kubelet, StateDir: e.stateDir,
		OrphanGracePeriod: time.Hour}, e.att, e.mnt, driver.WithEncryption(e.enc, crypt.SecretKeySource{}))
	if err != nil {
		t.Fatal(err)
	}
	// A device of ours with no record whose mapping is open and mounted
	// (e.g. a state directory lost): in use, so kept.
	att, err := e.att.Attach(ctx, driver.AttachSpec{VolumeID: "orphan", URI: &nbd.URI{Export: "orphan"}})
	if err != nil {
		t.Fatal(err)
	}
	mapper, _, err := e.enc.Open(ctx, "orphan", att.Device, []byte("k"), false)
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "m")
	if err := e.mnt.Mount(mapper, mnt, "ext4", nil); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	svc.SweepOrphansForTest(ctx, now)
	svc.SweepOrphansForTest(ctx, now.Add(2*time.Hour))
	if _, err := e.att.Lookup(ctx, "orphan"); err != nil {
		t.Fatalf("a device whose mapping is mounted was detached: %v", err)
	}
	// Unmounted but the mapping is held open: close fails, device kept.
	if err := e.mnt.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	e.tools.SetBusy(crypt.MapperName("orphan"), true)
	svc.SweepOrphansForTest(ctx, now.Add(3*time.Hour))
	if _, err := e.att.Lookup(ctx, "orphan"); err != nil {
		t.Fatalf("a device under a busy mapping was detached: %v", err)
	}
	// Nothing uses it: the mapping closes, then the device detaches.
	e.tools.SetBusy(crypt.MapperName("orphan"), false)
	svc.SweepOrphansForTest(ctx, now.Add(4*time.Hour))
	if _, err := e.att.Lookup(ctx, "orphan"); !errors.Is(err, driver.ErrNotAttached) {
		t.Fatalf("orphan still attached: %v", err)
	}
	if _, ok := e.tools.Active(crypt.MapperName("orphan")); ok {
		t.Fatal("the orphan's mapping is still open")
	}
}

func TestEncryptionSlotOptions(t *testing.T) {
	tools := crypttest.NewTools(t.TempDir())
	dev := filepath.Join(t.TempDir(), "d")
	if err := os.WriteFile(dev, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	c := crypt.New(tools, crypt.Options{PBKDFIterations: 4})
	if err := c.Format(context.Background(), dev, []byte("k")); err != nil {
		t.Fatal(err)
	}
	args := strings.Join(tools.Commands()[len(tools.Commands())-1].Args, " ")
	for _, want := range []string{"--type luks2", "--pbkdf argon2id", "--pbkdf-memory 65536", "--pbkdf-force-iterations 4", "--key-file -"} {
		if !strings.Contains(args, want) {
			t.Errorf("luksFormat %q lacks %q", args, want)
		}
	}
}

func TestEncryptedReadOnlyBlank(t *testing.T) {
	e := newEncEnv(t)
	req := e.encStageReq("vol1", "k")
	req.VolumeCapability = mountCap("ext4", csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)
	_, err := e.svc.NodeStageVolume(context.Background(), req)
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("got %v, want FailedPrecondition: a blank device cannot be formatted read-only", err)
	}
	if slices.Contains(e.tools.Actions(), "luksFormat") {
		t.Fatal("a read-only stage formatted the device")
	}
}
