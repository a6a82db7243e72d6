// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// fakeDiscoverer serves a fixed inventory and records wipes. Like the real
// one it refuses to wipe a read-only or unknown export, resumes from
// opts.From, stops at opts.Until, and checkpoints its progress; wipeStep
// bytes are zeroed per call (0: all), modelling a wipe longer than one
// DeleteVolume's budget.
type fakeDiscoverer struct {
	mu      sync.Mutex
	exports []store.Export
	err     error
	// wiped lists the exports whose wipe finished; wipeFrom the offset
	// every Wipe call started at.
	wiped    []string
	wipeFrom []uint64
	wipeStep uint64
	wipeErr  error
	// tlsOnly refuses probes without TLS material, like a TLS-only server;
	// probesWithTLS counts the probes that had it.
	tlsOnly       bool
	probesWithTLS int
}

func (f *fakeDiscoverer) Discover(context.Context, *nbd.URI, *nbd.TLSOptions) ([]store.Export, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]store.Export(nil), f.exports...), f.err
}

func (f *fakeDiscoverer) Probe(_ context.Context, u *nbd.URI, tls *nbd.TLSOptions) (*nbd.ExportInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if tls != nil {
		f.probesWithTLS++
	} else if f.tlsOnly {
		return nil, nbd.ErrTLSRequired
	}
	for _, e := range f.exports {
		if e.Name == u.Export {
			return &nbd.ExportInfo{Name: e.Name, Size: e.Size, Flags: nbd.TransmissionFlags(e.Flags)}, nil
		}
	}
	return nil, nbd.ErrUnknownExport
}

func (f *fakeDiscoverer) Wipe(_ context.Context, u *nbd.URI, _ *nbd.TLSOptions, opts nbd.WipeOptions) (nbd.WipeResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	res := nbd.WipeResult{Next: opts.From}
	var e *store.Export
	for i := range f.exports {
		if f.exports[i].Name == u.Export {
			e = &f.exports[i]
		}
	}
	switch {
	case e == nil:
		return res, fmt.Errorf("%w: %q", nbd.ErrUnknownExport, u.Export)
	case e.ReadOnly:
		return res, fmt.Errorf("%w: export %q is read-only", nbd.ErrNotSupportedByExport, u.Export)
	case f.wipeErr != nil:
		return res, f.wipeErr
	}
	f.wipeFrom = append(f.wipeFrom, opts.From)
	res.Size = e.Size
	step := f.wipeStep
	if step == 0 {
		step = e.Size
	}
	if !opts.Until.IsZero() && !time.Now().Before(opts.Until) {
		return res, nil
	}
	res.Next = min(opts.From+step, e.Size)
	res.Zeroed = res.Next - opts.From
	if opts.Checkpoint != nil {
		if err := opts.Checkpoint(res.Next); err != nil {
			return res, err
		}
	}
	if res.Done() {
		f.wiped = append(f.wiped, u.Export)
	}
	return res, nil
}

const server = "nbd://pool.example"

func newController(t *testing.T, exports ...store.Export) (*driver.ControllerService, *fakeDiscoverer, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "store.db")
	st, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	d := &fakeDiscoverer{exports: exports}
	return driver.NewControllerService(driver.ControllerOptions{}, st, d), d, path
}

func rwoCaps() []*csi.VolumeCapability { return []*csi.VolumeCapability{mountCap("ext4", rwo)} }

func createReq(name string, size int64, params map[string]string) *csi.CreateVolumeRequest {
	p := map[string]string{"server": server}
	for k, v := range params {
		p[k] = v
	}
	return &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: rwoCaps(), Parameters: p}
}

func TestControllerCreateValidation(t *testing.T) {
	c, _, _ := newController(t, store.Export{Name: "a", Size: 1 << 30, Flags: 1})
	ctx := context.Background()
	tests := []struct {
		name string
		req  *csi.CreateVolumeRequest
		want codes.Code
	}{
		{"ok", createReq("v", 1<<20, nil), codes.OK},
		{"no name", createReq("", 1, nil), codes.InvalidArgument},
		{"no server", &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: rwoCaps()}, codes.InvalidArgument},
		{"server with export", createReq("x", 1, map[string]string{"server": "nbd://h/disk"}), codes.InvalidArgument},
		{"bad server", createReq("x", 1, map[string]string{"server": "http://h"}), codes.InvalidArgument},
		{"unknown param", createReq("x", 1, map[string]string{"color": "blue"}), codes.InvalidArgument},
		{"bad glob", createReq("x", 1, map[string]string{"exportFilter": "["}), codes.InvalidArgument},
		{"bad wipe", createReq("x", 1, map[string]string{"wipeOnDelete": "maybe"}), codes.InvalidArgument},
		{"bad node key", createReq("x", 1, map[string]string{"connections": "99"}), codes.InvalidArgument},
		{"mkfs copies a host directory", createReq("x", 1, map[string]string{"mkfsOptions": "-d /etc"}), codes.InvalidArgument},
		{"mkfs journal device", createReq("x", 1, map[string]string{"mkfsOptions": "-J device=/dev/sda"}), codes.InvalidArgument},
		{"sidecar keys ignored (then no export is left)", createReq("y", 1, map[string]string{"csi.storage.k8s.io/pvc/name": "p"}), codes.ResourceExhausted},
		{"no capabilities", &csi.CreateVolumeRequest{Name: "x", Parameters: map[string]string{"server": server}}, codes.InvalidArgument},
		{"multi writer", &csi.CreateVolumeRequest{Name: "x", Parameters: map[string]string{"server": server},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}}, codes.InvalidArgument},
		{"snapshot source", &csi.CreateVolumeRequest{Name: "x", Parameters: map[string]string{"server": server}, VolumeCapabilities: rwoCaps(),
			VolumeContentSource: &csi.VolumeContentSource{}}, codes.InvalidArgument},
		{"too big", createReq("z", 2<<30, nil), codes.ResourceExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.CreateVolume(ctx, tt.req)
			if code(err) != tt.want {
				t.Fatalf("code %v (%v), want %v", code(err), err, tt.want)
			}
		})
	}
}

func TestControllerProvisioning(t *testing.T) {
	c, d, _ := newController(t,
		store.Export{Name: "small", Size: 1 << 30, Flags: 1},
		store.Export{Name: "big", Size: 8 << 30, Flags: 1},
		store.Export{Name: "ro", Size: 2 << 30, Flags: 3, ReadOnly: true},
		store.Export{Name: "other-x", Size: 4 << 30, Flags: 1})
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, createReq("pvc-1", 1<<30, map[string]string{"wipeOnDelete": "true", "timeout": "10s", "exportFilter": "[sb]*"}))
	if err != nil {
		t.Fatal(err)
	}
	if v.Volume.CapacityBytes != 1<<30 || v.Volume.VolumeContext["uri"] != server+"/small" || v.Volume.VolumeContext["timeout"] != "10s" {
		t.Errorf("volume = %v", v.Volume)
	}
	again, err := c.CreateVolume(ctx, createReq("pvc-1", 1<<30, map[string]string{"wipeOnDelete": "true", "timeout": "10s", "exportFilter": "[sb]*"}))
	if err != nil || again.Volume.VolumeId != v.Volume.VolumeId {
		t.Errorf("retry = %v, %v; want the same volume", again, err)
	}
	// A writer never gets the read-only export; 3 GiB fits only "big" (the
	// filter excludes other-x).
	w, err := c.CreateVolume(ctx, createReq("pvc-2", 2<<30, map[string]string{"exportFilter": "[sbr]*"}))
	if err != nil || w.Volume.VolumeContext["uri"] != server+"/big" {
		t.Errorf("writer = %v, %v; want big", w, err)
	}
	_, err = c.CreateVolume(ctx, createReq("pvc-3", 16<<30, nil))
	if code(err) != codes.OutOfRange {
		t.Errorf("too large = %v, want OutOfRange naming the largest free", err)
	}

	// Fencing.
	pub := &csi.ControllerPublishVolumeRequest{VolumeId: v.Volume.VolumeId, NodeId: "n1", VolumeCapability: mountCap("ext4", rwo)}
	if _, err := c.ControllerPublishVolume(ctx, pub); err != nil {
		t.Fatal(err)
	}
	pub2 := &csi.ControllerPublishVolumeRequest{VolumeId: v.Volume.VolumeId, NodeId: "n2", VolumeCapability: mountCap("ext4", rwo)}
	if _, err := c.ControllerPublishVolume(ctx, pub2); code(err) != codes.FailedPrecondition {
		t.Errorf("second node = %v, want FailedPrecondition", err)
	}
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); code(err) != codes.FailedPrecondition {
		t.Errorf("delete while published = %v, want FailedPrecondition", err)
	}
	if _, err := c.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: v.Volume.VolumeId, NodeId: "n1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if len(d.wiped) != 1 || d.wiped[0] != "small" {
		t.Errorf("wiped %v, want [small]", d.wiped)
	}
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Errorf("second delete: %v", err)
	}

	// Static volumes: fenced by their volume context; unknown IDs do not exist.
	static := &csi.ControllerPublishVolumeRequest{VolumeId: "my-pv", NodeId: "n1", VolumeCapability: mountCap("ext4", rwo),
		VolumeContext: map[string]string{"uri": "nbd://h/disk"}}
	if _, err := c.ControllerPublishVolume(ctx, static); err != nil {
		t.Errorf("static publish: %v", err)
	}
	static.NodeId = "n2"
	if _, err := c.ControllerPublishVolume(ctx, static); code(err) != codes.FailedPrecondition {
		t.Errorf("static second node = %v, want FailedPrecondition", err)
	}
	if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: "nope", NodeId: "n1",
		VolumeCapability: mountCap("ext4", rwo)}); code(err) != codes.NotFound {
		t.Errorf("unknown volume = %v, want NotFound", err)
	}

	// Expansion: only within the export's size.
	if _, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: w.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 9 << 30}}); code(err) != codes.OutOfRange {
		t.Errorf("expand beyond export = %v, want OutOfRange", err)
	}
	if r, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: w.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 30}}); err != nil || r.CapacityBytes != 8<<30 || !r.NodeExpansionRequired {
		t.Errorf("expand within export = %v, %v", r, err)
	}
	if r, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: w.Volume.VolumeId,
		CapacityRange:    &csi.CapacityRange{RequiredBytes: 8 << 30},
		VolumeCapability: &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}}}); err != nil || !r.GetNodeExpansionRequired() {
		t.Errorf("expand raw block = %v, %v; want node expansion (the device must be resized)", r, err)
	}

	// Capacity of the pool: small (released) + other-x for writers.
	cp, err := c.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"server": server}, VolumeCapabilities: rwoCaps()})
	if err != nil || cp.AvailableCapacity != 5<<30 || cp.MaximumVolumeSize.GetValue() != 4<<30 {
		t.Errorf("capacity = %v, %v", cp, err)
	}

	// Server unreachable and never scanned: Unavailable.
	d.err = fmt.Errorf("connect: %w", os.ErrDeadlineExceeded)
	if _, err := c.CreateVolume(ctx, createReq("pvc-9", 1, map[string]string{"server": "nbd://elsewhere"})); code(err) != codes.Unavailable {
		t.Errorf("unreachable server = %v, want Unavailable", err)
	}
}

func TestControllerConcurrentCreate(t *testing.T) {
	var exports []store.Export
	for i := 0; i < 50; i++ {
		exports = append(exports, store.Export{Name: fmt.Sprintf("e%02d", i), Size: 1 << 30, Flags: 1})
	}
	c, _, _ := newController(t, exports...)
	var wg sync.WaitGroup
	var mu sync.Mutex
	owner := map[string]string{}
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for {
				v, err := c.CreateVolume(context.Background(), createReq(fmt.Sprintf("pvc-%02d", i), 1<<30, nil))
				if code(err) == codes.Aborted {
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				if other, dup := owner[v.Volume.VolumeContext["uri"]]; dup {
					t.Errorf("%s handed to pvc-%02d and %s", v.Volume.VolumeContext["uri"], i, other)
				}
				owner[v.Volume.VolumeContext["uri"]] = fmt.Sprintf("pvc-%02d", i)
				mu.Unlock()
				return
			}
		}(i)
	}
	wg.Wait()
	if len(owner) != 50 {
		t.Errorf("%d distinct exports for 50 volumes", len(owner))
	}
}

func TestControllerRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	d := &fakeDiscoverer{exports: []store.Export{{Name: "a", Size: 1 << 30, Flags: 1}, {Name: "b", Size: 1 << 30, Flags: 1}}}
	ctx := context.Background()
	st, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	c := driver.NewControllerService(driver.ControllerOptions{}, st, d)
	v, err := c.CreateVolume(ctx, createReq("pvc", 1, nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: v.Volume.VolumeId, NodeId: "n1",
		VolumeCapability: mountCap("ext4", rwo)}); err != nil {
		t.Fatal(err)
	}
	st.Close()

	// A new controller process on the same store file loses nothing.
	st, err = store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c = driver.NewControllerService(driver.ControllerOptions{}, st, d)
	again, err := c.CreateVolume(ctx, createReq("pvc", 1, nil))
	if err != nil || again.Volume.VolumeId != v.Volume.VolumeId || again.Volume.VolumeContext["uri"] != v.Volume.VolumeContext["uri"] {
		t.Errorf("retry after restart = %v, %v; want %v", again, err, v.Volume)
	}
	if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: v.Volume.VolumeId, NodeId: "n2",
		VolumeCapability: mountCap("ext4", rwo)}); code(err) != codes.FailedPrecondition {
		t.Errorf("fencing after restart = %v, want FailedPrecondition", err)
	}
	if _, err := c.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: v.Volume.VolumeId, NodeId: "n1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	r, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(r.Entries) != 0 {
		t.Errorf("volumes after delete: %v, %v", r, err)
	}
}

// TestControllerWipeNbdkit: by default DeleteVolume wipes the export of a
// real nbdkit (file plugin, with and without WRITE_ZEROES), so the next
// claim of the export reads zeroes; wipeOnDelete "false" is the explicit
// opt-out that keeps the data.
func TestControllerWipeNbdkit(t *testing.T) {
	data := bytes.Repeat([]byte("tenant-data!"), (1<<20)/12+1)[:1<<20]
	for _, tt := range []struct {
		name   string
		filter []string
		params map[string]string
		wiped  bool
	}{
		{"default", nil, nil, true},
		{"default-nozero", []string{"--filter=nozero"}, nil, true},
		{"opt-out", nil, map[string]string{"wipeOnDelete": "false"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			file := filepath.Join(dir, "disk")
			f, err := os.Create(file)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(64 << 20); err != nil {
				t.Fatal(err)
			}
			for _, off := range []int64{0, 40 << 20} {
				if _, err := f.WriteAt(data, off); err != nil {
					t.Fatal(err)
				}
			}
			f.Close()
			srv := servers.Nbdkit(t, servers.Unix, append(tt.filter, "file", "dir="+dir)...)
			st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"))
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			c := driver.NewControllerService(driver.ControllerOptions{}, st, driver.NBDDiscoverer{})
			ctx := context.Background()
			params := map[string]string{"server": srv.URI("")}
			for k, v := range tt.params {
				params[k] = v
			}
			req := createReq("pvc", 1<<20, nil)
			req.Parameters = params
			v, err := c.CreateVolume(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); err != nil {
				t.Fatalf("DeleteVolume: %v", err)
			}
			got, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			zero := bytes.Equal(got, make([]byte, len(got)))
			if zero != tt.wiped {
				t.Errorf("after DeleteVolume the export reads zeroes: %v, want %v", zero, tt.wiped)
			}
			all, _ := st.Exports()
			if len(all) != 1 || all[0].Phase != store.PhaseAvailable || all[0].WipedTo != 0 {
				t.Errorf("inventory after delete: %+v, want the export Available", all)
			}
		})
	}
}

// TestControllerWipeResumes: a wipe longer than one DeleteVolume's budget
// returns Aborted, keeps the export Bound (never Available before the wipe
// finished, also across a controller restart) and continues from the
// recorded offset.
func TestControllerWipeResumes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	st, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	d := &fakeDiscoverer{exports: []store.Export{{Name: "a", Size: 3 << 30, Flags: 1}}, wipeStep: 1 << 30}
	c := driver.NewControllerService(driver.ControllerOptions{}, st, d)
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, createReq("pvc", 1, nil))
	if err != nil {
		t.Fatal(err)
	}
	del := &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}
	bound := func(st store.Store, wipedTo uint64) {
		t.Helper()
		all, err := st.Exports()
		if err != nil || len(all) != 1 || all[0].Phase != store.PhaseBound || all[0].WipedTo != wipedTo {
			t.Fatalf("inventory mid-wipe: %+v, %v; want Bound with WipedTo %d", all, err, wipedTo)
		}
	}
	if _, err := c.DeleteVolume(ctx, del); code(err) != codes.Aborted {
		t.Fatalf("first DeleteVolume of a 3 GiB wipe at 1 GiB per call: %v, want Aborted", err)
	}
	// The export is not free for another claim.
	if _, err := c.CreateVolume(ctx, createReq("pvc-2", 1, nil)); code(err) != codes.ResourceExhausted {
		t.Fatalf("claim during the wipe: %v, want ResourceExhausted", err)
	}
	// A restart mid-wipe: a new controller on the same store.
	bound(st, 1<<30)
	st.Close()
	st2, err := store.OpenBolt(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	bound(st2, 1<<30)
	c = driver.NewControllerService(driver.ControllerOptions{}, st2, d)
	if _, err := c.DeleteVolume(ctx, del); code(err) != codes.Aborted {
		t.Fatalf("second DeleteVolume: %v, want Aborted", err)
	}
	bound(st2, 2<<30)
	if _, err := c.DeleteVolume(ctx, del); err != nil {
		t.Fatalf("third DeleteVolume: %v", err)
	}
	if diff := fmt.Sprint(d.wipeFrom); diff != fmt.Sprint([]uint64{0, 1 << 30, 2 << 30}) {
		t.Errorf("wipes started at %s, want [0 1 GiB 2 GiB]: each retry continues", diff)
	}
	if _, err := c.CreateVolume(ctx, createReq("pvc-2", 1, nil)); err != nil {
		t.Fatalf("claim after the wipe finished: %v", err)
	}
}

// TestControllerWipeFailureKeepsClaim: a wipe that fails (read-only export,
// server error) keeps the export claimed; a read-only export is never
// released with its data.
func TestControllerWipeFailureKeepsClaim(t *testing.T) {
	c, d, _ := newController(t, store.Export{Name: "a", Size: 1 << 30, Flags: 1})
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, createReq("pvc", 1, nil))
	if err != nil {
		t.Fatal(err)
	}
	d.wipeErr = fmt.Errorf("write zeroes: %w", syscall.ECONNRESET)
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); code(err) != codes.Unavailable {
		t.Fatalf("DeleteVolume with a failing wipe: %v, want Unavailable", err)
	}
	if _, err := c.CreateVolume(ctx, createReq("pvc-2", 1, nil)); code(err) != codes.ResourceExhausted {
		t.Fatalf("claim after a failed wipe: %v, want ResourceExhausted (the export stays claimed)", err)
	}
	// The export vanished from its server: not NotFound (the volume
	// exists), and the claim stays.
	d.wipeErr = nil
	d.exports = nil
	if _, err := c.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.Volume.VolumeId}); code(err) != codes.FailedPrecondition {
		t.Fatalf("DeleteVolume of a volume whose export is gone: %v, want FailedPrecondition", err)
	}
}

func TestControllerBackgroundScan(t *testing.T) {
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	d := &fakeDiscoverer{exports: []store.Export{{Name: "a", Size: 1 << 30, Flags: 1}}}
	c := driver.NewControllerService(driver.ControllerOptions{ScanInterval: 20 * time.Millisecond}, st, d)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c.Start(ctx)
	if _, err := c.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"server": server}}); err != nil {
		t.Fatal(err)
	}
	// The server gains an export and loses one; no request comes.
	d.mu.Lock()
	d.exports = []store.Export{{Name: "b", Size: 2 << 30, Flags: 1}}
	d.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for {
		all, err := st.Exports()
		if err != nil {
			t.Fatal(err)
		}
		phases := map[string]store.Phase{}
		for _, e := range all {
			phases[e.Name] = e.Phase
		}
		if phases["a"] == store.PhaseMissing && phases["b"] == store.PhaseAvailable {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("inventory not refreshed in the background: %v", phases)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestControllerTLSServerProbes: expansion and health checks of a volume on
// a TLS-only server use TLS material — the expand secret, else what
// CreateVolume was given — and never call a TLS refusal an outage.
func TestControllerTLSServerProbes(t *testing.T) {
	c, d, _ := newController(t, store.Export{Name: "a", Size: 4 << 30})
	d.tlsOnly = true
	ctx := context.Background()
	ca, err := os.ReadFile(servers.GenerateCerts(t).CAFile)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{"ca.crt": string(ca)}
	req := createReq("pvc-tls", 1<<30, nil)
	req.Secrets = secrets
	v, err := c.CreateVolume(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	before := d.probesWithTLS
	if r, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30}}); err != nil || r.CapacityBytes != 4<<30 {
		t.Errorf("expand = %v, %v", r, err)
	}
	if d.probesWithTLS != before+1 {
		t.Errorf("expand probed without the TLS material CreateVolume had")
	}
	if _, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.Volume.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30}, Secrets: map[string]string{"tls.crt": "x"}}); code(err) != codes.InvalidArgument {
		t.Errorf("expand with a certificate but no key = %v, want InvalidArgument", err)
	}
	h, err := c.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: v.Volume.VolumeId})
	if err != nil || len(h.VolumeHealth.HealthStatuses) != 0 || d.probesWithTLS != before+2 {
		t.Errorf("health = %v, %v (TLS probes %d)", h, err, d.probesWithTLS-before)
	}
}

// TestControllerBadTLSSecret: unparsable PEM in the provisioner secret is
// the caller's error (InvalidArgument), not an unreachable server
// (Unavailable, which the provisioner retries forever).
func TestControllerBadTLSSecret(t *testing.T) {
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c := driver.NewControllerService(driver.ControllerOptions{}, st, driver.NBDDiscoverer{})
	for name, sec := range map[string]map[string]string{
		"ca":       {"ca.crt": "not a PEM"},
		"key pair": {"tls.crt": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "tls.key": "junk"},
	} {
		t.Run(name, func(t *testing.T) {
			req := createReq("pvc", 1, map[string]string{"server": "nbds://127.0.0.1:1"})
			req.Secrets = sec
			if _, err := c.CreateVolume(context.Background(), req); code(err) != codes.InvalidArgument {
				t.Errorf("CreateVolume with %v: %v, want InvalidArgument", sec, err)
			}
		})
	}
}
