// SPDX-License-Identifier: Apache-2.0

// Package sanity runs csi-test's sanity suite against the real driver
// in-process: the controller with its embedded store provisioning from a
// real nbdkit serving a pool of exports, and the node service — with the
// stateful fakes of pkg/driver/drivertest on a machine without nbd, and with
// the real attacher and mounter where the kernel has nbd (the VM rig runs
// it so: make vm-test).
package sanity

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/attach"
	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/driver/drivertest"
	"github.com/nbd-csi/nbd-csi/pkg/store"
)

// kernelAvailable reports whether the real node can attach here.
func kernelAvailable() bool {
	if os.Geteuid() != 0 {
		return false
	}
	_, err := os.Stat("/sys/module/nbd")
	return err == nil
}

func TestSanity(t *testing.T) {
	root := t.TempDir()
	pool := filepath.Join(root, "pool")
	if err := os.MkdirAll(pool, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 40; i++ {
		f, err := os.Create(filepath.Join(pool, fmt.Sprintf("disk%02d", i)))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(int64(64+i) << 20); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+pool)

	st, err := store.OpenBolt(filepath.Join(root, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ctrl := driver.NewControllerService(driver.ControllerOptions{ScanMaxAge: time.Second}, st, driver.NBDDiscoverer{})

	kubelet := filepath.Join(root, "kubelet")
	var att driver.VolumeAttacher
	var mnt driver.Mounter
	real := kernelAvailable()
	if real {
		a := attach.New(context.Background(), attach.Options{Device: device.Options{Module: device.ModuleOptions{Skip: true}}})
		t.Cleanup(func() { a.Close() })
		att, mnt = a, driver.NewNodeMounter()
		t.Log("node: real kernel attacher and mounter")
	} else {
		if os.Getenv("NBDCSI_IN_VM") == "1" {
			t.Fatal("in the VM the sanity run must use the real kernel")
		}
		fa := drivertest.NewAttacher(t.TempDir())
		att, mnt = fa, drivertest.NewMounter(fa)
		t.Log("node: stateful fakes (no nbd in this kernel)")
	}
	node, err := driver.NewNodeService(driver.NodeOptions{NodeID: "sanity-node", KubeletDir: kubelet, StateDir: filepath.Join(root, "state")}, att, mnt)
	if err != nil {
		t.Fatal(err)
	}
	endpoint := "unix://" + filepath.Join(root, "csi.sock")
	d, err := driver.New(driver.Config{Name: driver.DefaultDriverName, Version: "sanity", Endpoint: endpoint, Mode: driver.ModeAll,
		Node: node, Controller: ctrl, Ready: func(ctx context.Context) error {
			if err := node.Ready(ctx); err != nil {
				return err
			}
			return ctrl.Ready(ctx)
		}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := driver.Listen(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, l, time.Second) }()
	t.Cleanup(func() { cancel(); <-done })

	for _, d := range []string{filepath.Join(kubelet, "pods", "sanity"), filepath.Join(kubelet, "plugins", "sanity")} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	// The controller cannot know whether a node ID exists: nodes are
	// Kubernetes objects it does not watch, and the external-attacher only
	// sends IDs of CSINode objects. This one spec is skipped for that reason.
	if err := flag.Set("ginkgo.skip", "should fail when the node does not exist"); err != nil {
		t.Fatal(err)
	}
	cfg := sanity.NewTestConfig()
	cfg.Address = endpoint
	cfg.TargetPath = filepath.Join(kubelet, "pods", "sanity", "target")
	cfg.StagingPath = filepath.Join(kubelet, "plugins", "sanity", "staging")
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeExpandSize = 64 << 20 // exports cannot grow; expanding within the claimed size works
	cfg.TestVolumeParameters = map[string]string{driver.ParamServer: srv.URI("")}
	cfg.IdempotentCount = 2
	cfg.TestNodeVolumeAttachLimit = false
	sanity.Test(t, cfg)
}
