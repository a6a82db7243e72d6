// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"context"
	"errors"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// capable is the only topology provisioned volumes are accessible from.
var capable = []*csi.Topology{{Segments: map[string]string{driver.TopologyKeyCapable: driver.TopologyCapable}}}

// TestNodeInfoTopology: a node reports the capable segment only when its
// kernel can attach; one that cannot still registers under its own segment
// (so kubelet labels it, and no capable volume is scheduled there).
func TestNodeInfoTopology(t *testing.T) {
	for _, tt := range []struct {
		name     string
		readyErr error
		want     map[string]string
	}{
		{"can attach", nil, map[string]string{driver.TopologyKeyNode: "node-1", driver.TopologyKeyCapable: "true"}},
		{"no nbd module", errors.New("nbd kernel support: modprobe nbd: exit status 1: FATAL: Module nbd not found"),
			map[string]string{driver.TopologyKeyNode: "node-1"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newNodeEnv(t)
			e.att.ReadyErr = tt.readyErr
			info, err := e.svc.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, info.GetAccessibleTopology().GetSegments()); diff != "" {
				t.Errorf("topology segments (-want +got):\n%s", diff)
			}
		})
	}
}

// TestCreateVolumeTopology: every provisioned volume is accessible from the
// capable segment only, and a request whose requisite topologies hold no
// capable segment (e.g. the key set of a node that cannot attach) is
// refused with ResourceExhausted, the spec's code for unmet topology.
func TestCreateVolumeTopology(t *testing.T) {
	seg := func(kv ...string) *csi.Topology {
		m := map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return &csi.Topology{Segments: m}
	}
	for _, tt := range []struct {
		name string
		req  *csi.TopologyRequirement
		want codes.Code
	}{
		{"no requirements", nil, codes.OK},
		{"preferred only", &csi.TopologyRequirement{Preferred: []*csi.Topology{seg(driver.TopologyKeyNode, "n1")}}, codes.OK},
		{"selected capable node (strict topology)", &csi.TopologyRequirement{
			Requisite: []*csi.Topology{seg(driver.TopologyKeyNode, "n1", driver.TopologyKeyCapable, "true")},
			Preferred: []*csi.Topology{seg(driver.TopologyKeyNode, "n1", driver.TopologyKeyCapable, "true")}}, codes.OK},
		{"StorageClass allowedTopologies", &csi.TopologyRequirement{Requisite: []*csi.Topology{seg(driver.TopologyKeyCapable, "true")}}, codes.OK},
		{"mixed key sets, one capable", &csi.TopologyRequirement{
			Requisite: []*csi.Topology{seg(driver.TopologyKeyNode, "n2"), seg(driver.TopologyKeyNode, "n1", driver.TopologyKeyCapable, "true")}}, codes.OK},
		{"only a node that cannot attach", &csi.TopologyRequirement{
			Requisite: []*csi.Topology{seg(driver.TopologyKeyNode, "n2")}, Preferred: []*csi.Topology{seg(driver.TopologyKeyNode, "n2")}}, codes.ResourceExhausted},
		{"capable key with another value", &csi.TopologyRequirement{Requisite: []*csi.Topology{seg(driver.TopologyKeyCapable, "false")}}, codes.ResourceExhausted},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, _, _ := newController(t, store.Export{Name: "a", Size: 1 << 30, Flags: 1})
			req := createReq("pvc-1", 1<<20, nil)
			req.AccessibilityRequirements = tt.req
			v, err := c.CreateVolume(context.Background(), req)
			if code(err) != tt.want {
				t.Fatalf("code %v (%v), want %v", code(err), err, tt.want)
			}
			if err != nil {
				// Refused before claiming: the export stays available.
				exp, _ := c.CreateVolume(context.Background(), createReq("pvc-2", 1<<20, nil))
				if exp == nil {
					t.Error("a refused request left the only export claimed")
				}
				return
			}
			if diff := cmp.Diff(capable, v.GetVolume().GetAccessibleTopology(), protocmp.Transform()); diff != "" {
				t.Errorf("accessible topology (-want +got):\n%s", diff)
			}
			// ListVolumes and ControllerGetVolume describe it the same way.
			list, err := c.ListVolumes(context.Background(), &csi.ListVolumesRequest{})
			if err != nil || len(list.GetEntries()) != 1 {
				t.Fatalf("ListVolumes = %v, %v", list, err)
			}
			if diff := cmp.Diff(capable, list.GetEntries()[0].GetVolume().GetAccessibleTopology(), protocmp.Transform()); diff != "" {
				t.Errorf("ListVolumes accessible topology (-want +got):\n%s", diff)
			}
			got, err := c.ControllerGetVolume(context.Background(), &csi.ControllerGetVolumeRequest{VolumeId: v.GetVolume().GetVolumeId()})
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(capable, got.GetVolume().GetAccessibleTopology(), protocmp.Transform()); diff != "" {
				t.Errorf("ControllerGetVolume accessible topology (-want +got):\n%s", diff)
			}
		})
	}
}
