// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestPluginCapabilities: every mode announces volume accessibility
// constraints (the provisioner passes topology to CreateVolume and writes
// the volume's accessible topology into the PV's node affinity only then);
// only modes serving the controller announce the controller service.
func TestPluginCapabilities(t *testing.T) {
	for _, mode := range []Mode{ModeController, ModeNode, ModeAll} {
		t.Run(string(mode), func(t *testing.T) {
			cfg := Config{Name: "x", Version: "1", Endpoint: "unix:///x", Mode: mode}
			if mode.ServesNode() {
				cfg.Node = &NodeService{}
			}
			if mode.ServesController() {
				cfg.Controller = &ControllerService{}
			}
			d, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := d.identity.GetPluginCapabilities(context.Background(), &csi.GetPluginCapabilitiesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			services := map[csi.PluginCapability_Service_Type]bool{}
			for _, c := range resp.GetCapabilities() {
				if s := c.GetService(); s != nil {
					services[s.GetType()] = true
				}
			}
			if !services[csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS] {
				t.Errorf("capabilities %v lack VOLUME_ACCESSIBILITY_CONSTRAINTS", resp.GetCapabilities())
			}
			if services[csi.PluginCapability_Service_CONTROLLER_SERVICE] != mode.ServesController() {
				t.Errorf("capabilities %v: CONTROLLER_SERVICE announced = %v, want %v", resp.GetCapabilities(),
					services[csi.PluginCapability_Service_CONTROLLER_SERVICE], mode.ServesController())
			}
		})
	}
}
