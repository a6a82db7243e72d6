// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

var rox = csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY

// nbdkitDir serves the files of a directory as exports (nbdkit file
// dir=), each 1 MiB, on 127.0.0.1.
func nbdkitDir(t *testing.T, names ...string) *servers.Server {
	t.Helper()
	dir := t.TempDir()
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return servers.Nbdkit(t, servers.TCP, "file", "dir="+dir)
}

// TestControllerServerAliasesNbdkit: one nbdkit named in several
// StorageClasses under different spellings. Before server identities each
// spelling was its own pool, and each export was claimed once per spelling.
func TestControllerServerAliasesNbdkit(t *testing.T) {
	srv := nbdkitDir(t, "e0", "e1")
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c := driver.NewControllerService(driver.ControllerOptions{}, st, driver.NBDDiscoverer{})
	ctx := context.Background()
	port := strconv.Itoa(srv.Port)
	spellings := []string{
		"nbd://127.0.0.1:" + port,
		"nbd://[::ffff:127.0.0.1]:" + port,
		"nbd://127.0.0.1:" + port + "/",
		"nbd://0x7f.1:" + port,
		"nbd://2130706433:" + port,
		"nbd://localhost:" + port,
		"nbd://LOCALHOST.:" + port,
	}
	claimed := map[string]string{} // export → volume
	for i, sp := range spellings {
		for j := range 2 {
			name := fmt.Sprintf("pvc-%d-%d", i, j)
			v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: rwoCaps(),
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1}, Parameters: map[string]string{"server": sp}})
			if err != nil {
				switch {
				case strings.Contains(sp, "ocalhost") || strings.Contains(sp, "LOCALHOST"):
					if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "tcp:127.0.0.1:"+port) {
						t.Errorf("%s: %v, want FailedPrecondition naming identity tcp:127.0.0.1:%s", sp, err, port)
					}
				case code(err) != codes.ResourceExhausted:
					t.Errorf("%s: %v, want ResourceExhausted (every export claimed)", sp, err)
				}
				continue
			}
			uri := v.Volume.VolumeContext[driver.KeyURI]
			exp := uri[strings.LastIndex(uri, "/")+1:]
			if other, dup := claimed[exp]; dup {
				t.Errorf("export %s claimed by %s and again by %s (server spelled %s)", exp, other, name, sp)
			}
			claimed[exp] = name
		}
	}
	if len(claimed) != 2 {
		t.Errorf("%d exports claimed, want 2", len(claimed))
	}
	all, _ := st.Exports()
	if len(all) != 2 {
		t.Errorf("inventory holds %d records for a server with 2 exports: %+v", len(all), all)
	}

	// An administrator can declare one identity for both spellings: then
	// they are one pool (nothing left to claim).
	_, err = c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "declared", VolumeCapabilities: rwoCaps(),
		Parameters: map[string]string{"server": "nbd://localhost:" + port, "serverID": "kit"}})
	if code(err) != codes.FailedPrecondition {
		t.Errorf("a declared identity for an endpoint another identity reaches: %v, want FailedPrecondition", err)
	}
}

// TestControllerStaticFencedByExportNbdkit: hand-written PVs naming the
// export of a dynamic volume (under its own or another spelling) are fenced
// against it; readers share.
func TestControllerStaticFencedByExportNbdkit(t *testing.T) {
	srv := nbdkitDir(t, "e0")
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c := driver.NewControllerService(driver.ControllerOptions{}, st, driver.NBDDiscoverer{})
	ctx := context.Background()
	port := strconv.Itoa(srv.Port)
	v, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc", VolumeCapabilities: rwoCaps(),
		Parameters: map[string]string{"server": "nbd://127.0.0.1:" + port}})
	if err != nil {
		t.Fatal(err)
	}
	dyn := v.Volume.VolumeId
	if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: dyn, NodeId: "a",
		VolumeCapability: mountCap("ext4", rwo), VolumeContext: v.Volume.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	statics := map[string]string{
		"pv-same":      "nbd://127.0.0.1:" + port + "/e0",
		"pv-mapped":    "nbd://[::ffff:127.0.0.1]:" + port + "/e0",
		"pv-localhost": "nbd://localhost:" + port + "/e0",
	}
	for id, uri := range statics {
		_, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "b",
			VolumeCapability: mountCap("ext4", rwo), VolumeContext: map[string]string{driver.KeyURI: uri}})
		if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), dyn) {
			t.Errorf("static %s (%s) published read-write beside the writer: %v, want FailedPrecondition naming %s", id, uri, err, dyn)
		}
	}
	// Readers share the export across volumes.
	if _, err := c.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: dyn, NodeId: "a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: dyn, NodeId: "a",
		VolumeCapability: mountCap("ext4", rox), Readonly: true}); err != nil {
		t.Fatal(err)
	}
	for id, uri := range statics {
		if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "b",
			VolumeCapability: mountCap("ext4", rox), Readonly: true, VolumeContext: map[string]string{driver.KeyURI: uri}}); err != nil {
			t.Errorf("static reader %s: %v", id, err)
		}
	}
	// A writer now is refused whichever volume it comes through.
	if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: "pv-new", NodeId: "c",
		VolumeCapability: mountCap("ext4", rwo), VolumeContext: map[string]string{driver.KeyURI: statics["pv-same"]}}); code(err) != codes.FailedPrecondition {
		t.Errorf("writer beside readers: %v, want FailedPrecondition", err)
	}
}

// TestControllerIdempotencyToTheLetter: the same name with a request the
// existing volume does not satisfy is ALREADY_EXISTS (CSI spec).
func TestControllerIdempotencyToTheLetter(t *testing.T) {
	c, _, _ := newController(t,
		store.Export{Name: "disk-a", Size: 1 << 30},
		store.Export{Name: "ro-b", Size: 1 << 30, ReadOnly: true, Flags: 3})
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, createReq("pvc", 1, map[string]string{"exportFilter": "disk-*"}))
	if err != nil {
		t.Fatal(err)
	}
	if again, err := c.CreateVolume(ctx, createReq("pvc", 1, map[string]string{"exportFilter": "disk-*"})); err != nil || again.Volume.VolumeId != v.Volume.VolumeId {
		t.Errorf("same request again = %v, %v", again, err)
	}
	if _, err := c.CreateVolume(ctx, createReq("pvc", 1, map[string]string{"exportFilter": "other-*"})); code(err) != codes.AlreadyExists {
		t.Errorf("same name, a filter excluding its export: %v, want AlreadyExists", err)
	}
	if _, err := c.CreateVolume(ctx, createReq("pvc", 1, map[string]string{"server": "nbd://elsewhere.example"})); code(err) != codes.AlreadyExists {
		t.Errorf("same name, another server: %v, want AlreadyExists", err)
	}
	if _, err := c.CreateVolume(ctx, createReq("pvc", 2<<30, nil)); code(err) != codes.AlreadyExists {
		t.Errorf("same name, larger: %v, want AlreadyExists", err)
	}
	// A read-only export claimed for readers, then asked for by a writer.
	ro := &csi.CreateVolumeRequest{Name: "ro", VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4", rox)},
		Parameters: map[string]string{"server": server, "exportFilter": "ro-*"}}
	if _, err := c.CreateVolume(ctx, ro); err != nil {
		t.Fatal(err)
	}
	ro.VolumeCapabilities = rwoCaps()
	if _, err := c.CreateVolume(ctx, ro); code(err) != codes.AlreadyExists {
		t.Errorf("same name, a writer for a read-only export: %v, want AlreadyExists", err)
	}
}

// TestControllerSizesNeverNegative: exports of 2^63 bytes and more, and
// sums past int64, are clamped to math.MaxInt64.
func TestControllerSizesNeverNegative(t *testing.T) {
	c, _, _ := newController(t,
		store.Export{Name: "huge", Size: 1 << 63},
		store.Export{Name: "max-a", Size: math.MaxInt64},
		store.Export{Name: "max-b", Size: math.MaxInt64},
		store.Export{Name: "top", Size: math.MaxUint64})
	ctx := context.Background()
	capResp, err := c.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"server": server}})
	if err != nil {
		t.Fatal(err)
	}
	if capResp.AvailableCapacity != math.MaxInt64 || capResp.MaximumVolumeSize.GetValue() != math.MaxInt64 {
		t.Errorf("GetCapacity = %d (max %d), want both clamped to MaxInt64", capResp.AvailableCapacity, capResp.MaximumVolumeSize.GetValue())
	}
	v, err := c.CreateVolume(ctx, createReq("big", 1<<62, map[string]string{"exportFilter": "huge"}))
	if err != nil {
		t.Fatal(err)
	}
	if v.Volume.CapacityBytes != math.MaxInt64 {
		t.Errorf("capacity_bytes of a 2^63-byte export = %d, want MaxInt64", v.Volume.CapacityBytes)
	}
	l, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(l.Entries) != 1 || l.Entries[0].Volume.CapacityBytes < 0 {
		t.Errorf("ListVolumes = %v, %v", l, err)
	}
	g, err := c.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.Volume.VolumeId})
	if err != nil || g.Volume.CapacityBytes != math.MaxInt64 {
		t.Errorf("ControllerGetVolume = %v, %v", g, err)
	}
}

func TestControllerArgumentCodes(t *testing.T) {
	c, _, _ := newController(t, store.Export{Name: "e", Size: 1 << 30})
	ctx := context.Background()
	long := strings.Repeat("n", 40000) // over bbolt's 32 KiB key limit
	if _, err := c.CreateVolume(ctx, createReq(long, 1, nil)); code(err) != codes.InvalidArgument {
		t.Errorf("CreateVolume with a %d-byte name: %v, want InvalidArgument", len(long), err)
	}
	if _, err := c.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: long, NodeId: "n",
		VolumeCapability: mountCap("ext4", rwo), VolumeContext: map[string]string{driver.KeyURI: "nbd://h/e"}}); code(err) != codes.InvalidArgument {
		t.Errorf("publish with a %d-byte volume ID: %v, want InvalidArgument", len(long), err)
	}
	v, err := c.CreateVolume(ctx, createReq("pvc", 1, nil))
	if err != nil {
		t.Fatal(err)
	}
	for _, cr := range []*csi.CapacityRange{{RequiredBytes: -1}, {LimitBytes: -1}, {RequiredBytes: 2, LimitBytes: 1}} {
		if _, err := c.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.Volume.VolumeId, CapacityRange: cr}); code(err) != codes.InvalidArgument {
			t.Errorf("expand with %v: %v, want InvalidArgument", cr, err)
		}
	}
	for _, sid := range []string{"", "has space", strings.Repeat("x", 254), "a/b"} {
		if _, err := c.CreateVolume(ctx, createReq("x", 1, map[string]string{"serverID": sid})); code(err) != codes.InvalidArgument {
			t.Errorf("serverID %q: %v, want InvalidArgument", sid, err)
		}
	}
}

// noListing is a store whose full listing fails: what must not need it
// (health) keeps working.
type noListing struct{ store.Store }

func (noListing) Exports() ([]store.Export, error) {
	return nil, fmt.Errorf("listing the whole store is not allowed here")
}

func TestControllerReadyWithoutListing(t *testing.T) {
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c := driver.NewControllerService(driver.ControllerOptions{}, noListing{st}, &fakeDiscoverer{})
	if err := c.Ready(context.Background()); err != nil {
		t.Errorf("Ready decodes the whole store: %v", err)
	}
}

// TestControllerInventoryBudget: a server listing more than the store's
// budget is refused with FailedPrecondition naming the server and limit.
func TestControllerInventoryBudget(t *testing.T) {
	many := make([]store.Export, store.MaxServerExports+1)
	for i := range many {
		many[i] = store.Export{Name: fmt.Sprint("e", i), Size: 1 << 20}
	}
	c, _, _ := newController(t, many...)
	_, err := c.CreateVolume(context.Background(), createReq("pvc", 1, nil))
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "tcp:pool.example:10809") || !strings.Contains(err.Error(), strconv.Itoa(store.MaxServerExports)) {
		t.Errorf("CreateVolume on a server over budget: %v, want FailedPrecondition naming the server and the limit", err)
	}
}

// TestDiscoverBudgetNbdkit: a real server listing more exports than the
// budget is refused after the listing, before one probe per export.
// (nbdkit lists at most 10000 exports, under the store's budget of 16384:
// the discoverer's own bound is lowered to test against it.)
func TestDiscoverBudgetNbdkit(t *testing.T) {
	const limit = 100
	dir := t.TempDir()
	for i := range limit + 1 {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprint("e", i)), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+dir)
	u, err := nbd.ParseURI(srv.URI(""))
	if err != nil {
		t.Fatal(err)
	}
	_, err = driver.NBDDiscoverer{MaxExports: limit}.Discover(context.Background(), u, nil)
	var be *store.BudgetError
	if !errors.As(err, &be) || be.Limit != limit || be.Got != limit+1 {
		t.Errorf("Discover of %d exports = %v, want a BudgetError", limit+1, err)
	}
	if got, err := (driver.NBDDiscoverer{MaxExports: limit + 1}).Discover(context.Background(), u, nil); err != nil || len(got) != limit+1 {
		t.Errorf("Discover within the bound = %d exports, %v", len(got), err)
	}
}
