// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
	"github.com/nbd-csi/nbd-csi/internal/servers"
	api "github.com/nbd-csi/nbd-csi/pkg/apis/nbdcsi/v1alpha1"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/store/kubestore"
)

func kubeCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
}

// TestKubeServerIdentityNbdkit: the alias and fencing-by-export cases of
// issue 10 on the kubernetes store (real kube-apiserver, real nbdkit, two
// controller replicas): one nbdkit named under several spellings is one
// pool, and static PVs naming a held export are refused.
func TestKubeServerIdentityNbdkit(t *testing.T) {
	kubetest.Need(t, cluster)
	dc, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	clean := func() {
		for _, gvr := range []dynamic.NamespaceableResourceInterface{dc.Resource(api.NBDExportResource), dc.Resource(api.NBDVolumeResource)} {
			if err := gvr.DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	clean()
	t.Cleanup(clean) // the other tests of this package share the API server
	dir := t.TempDir()
	for _, n := range []string{"e0", "e1"} {
		if err := os.WriteFile(filepath.Join(dir, n), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	srv := servers.Nbdkit(t, servers.TCP, "file", "dir="+dir)
	port := strconv.Itoa(srv.Port)
	var replicas []*driver.ControllerService
	for range 2 {
		st, err := kubestore.New(cluster.Config())
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		replicas = append(replicas, driver.NewControllerService(driver.ControllerOptions{}, st, driver.NBDDiscoverer{}))
	}
	spellings := []string{"nbd://127.0.0.1:" + port, "nbd://[::ffff:127.0.0.1]:" + port, "nbd://2130706433:" + port, "nbd://127.0.0.1:" + port + "/"}
	claimed := map[string]string{}
	var first *csi.Volume
	for i, sp := range spellings {
		for j := range 2 {
			name := fmt.Sprintf("pvc-%d-%d", i, j)
			v, err := replicas[(i+j)%2].CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name,
				VolumeCapabilities: []*csi.VolumeCapability{kubeCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)},
				Parameters:         map[string]string{"server": sp}})
			if err != nil {
				if status.Code(err) != codes.ResourceExhausted {
					t.Errorf("%s via %s: %v, want ResourceExhausted", name, sp, err)
				}
				continue
			}
			uri := v.Volume.VolumeContext[driver.KeyURI]
			exp := uri[strings.LastIndex(uri, "/")+1:]
			if other, dup := claimed[exp]; dup {
				t.Errorf("export %s claimed by %s and again by %s (server spelled %s)", exp, other, name, sp)
			}
			claimed[exp] = name
			if first == nil {
				first = v.Volume
			}
		}
	}
	if len(claimed) != 2 || first == nil {
		t.Fatalf("%d exports claimed, want 2", len(claimed))
	}
	if _, err := replicas[0].ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: first.VolumeId, NodeId: "a",
		VolumeCapability: kubeCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}); err != nil {
		t.Fatal(err)
	}
	uri := first.VolumeContext[driver.KeyURI]
	exp := uri[strings.LastIndex(uri, "/")+1:]
	for i, u := range []string{"nbd://127.0.0.1:" + port + "/" + exp, "nbds://[::ffff:127.0.0.1]:" + port + "/" + exp, "nbd://localhost:" + port + "/" + exp} {
		_, err := replicas[i%2].ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: fmt.Sprint("static-", i), NodeId: "b",
			VolumeCapability: kubeCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), VolumeContext: map[string]string{driver.KeyURI: u}})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), first.VolumeId) {
			t.Errorf("static PV %s beside the writer: %v, want FailedPrecondition naming %s", u, err, first.VolumeId)
		}
	}
}
