// SPDX-License-Identifier: Apache-2.0

// Package sanity runs csi-test's sanity suite against the real driver
// in-process: the controller with its embedded store provisioning from a
// real nbdkit serving a pool of exports, and the node service — with the
// stateful fakes of pkg/driver/drivertest on a machine without nbd, and with
// the real attacher and mounter where the kernel has nbd (the VM rig runs
// it so: make vm-test).
package sanity

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/attach"
	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/crypt/crypttest"
	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/driver/drivertest"
	"github.com/nbd-csi/nbd-csi/pkg/store"
	"github.com/nbd-csi/nbd-csi/pkg/store/kubestore"
)

// kernelAvailable reports whether the real node can attach here.
func kernelAvailable() bool {
	if os.Geteuid() != 0 {
		return false
	}
	_, err := os.Stat("/sys/module/nbd")
	return err == nil
}

// startPool serves 40 sparse exports of 64–103 MiB with a real nbdkit.
func startPool(t *testing.T, root string) *servers.Server {
	t.Helper()
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
	return servers.Nbdkit(t, servers.Unix, "file", "dir="+pool)
}

// runSanity runs csi-sanity against endpoint, provisioning from srv.
func runSanity(t *testing.T, endpoint, kubelet string, srv *servers.Server, encrypted bool) {
	t.Helper()
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
	if encrypted {
		// Exports are 64–103 MiB; an encrypted volume needs 16 MiB more
		// than it offers.
		cfg.TestVolumeSize, cfg.TestVolumeExpandSize = 48<<20, 48<<20
		cfg.TestVolumeParameters[driver.KeyEncrypted] = "true"
		cfg.SecretsFile = filepath.Join(t.TempDir(), "secrets.yaml")
		if err := os.WriteFile(cfg.SecretsFile, []byte("NodeStageVolumeSecret:\n  encryptionPassphrase: sanity-pass\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	sanity.Test(t, cfg)
}

var cluster *kubetest.Cluster

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m, &cluster)) }

// TestSanity runs the driver in-process with the embedded store.
func TestSanity(t *testing.T) {
	root := t.TempDir()
	st, err := store.OpenBolt(filepath.Join(root, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	sanityInProcess(t, root, st, false)
}

// TestSanityKubeStore runs the driver in-process with the Kubernetes store
// on a real kube-apiserver. Ginkgo runs one suite per process, so unless it
// is the only test run, it re-runs this test binary for itself.
func TestSanityKubeStore(t *testing.T) {
	kubetest.Need(t, cluster)
	if os.Getenv("NBDCSI_SANITY_CHILD") != "1" {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestSanityKubeStore$", "-test.v")
		cmd.Env = append(os.Environ(), "NBDCSI_SANITY_CHILD=1")
		out, err := cmd.CombinedOutput()
		for _, line := range bytes.Split(out, []byte("\n")) {
			if bytes.Contains(line, []byte("Passed")) || bytes.HasPrefix(bytes.TrimSpace(line), []byte("Ran ")) {
				t.Logf("%s", line)
			}
		}
		if err != nil {
			t.Fatalf("sanity with the Kubernetes store: %v\n%s", err, out)
		}
		return
	}
	st, err := kubestore.New(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	sanityInProcess(t, t.TempDir(), st, false)
}

// TestSanityEncrypted runs the driver in-process with the embedded store
// and every volume encrypted (real cryptsetup and dm-crypt on the VM's
// kernel, the stateful cryptsetup fake elsewhere). Ginkgo runs one suite
// per process, so unless it is the only test run, it re-runs this test
// binary for itself.
func TestSanityEncrypted(t *testing.T) {
	if os.Getenv("NBDCSI_SANITY_CHILD") != "1" {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestSanityEncrypted$", "-test.v")
		cmd.Env = append(os.Environ(), "NBDCSI_SANITY_CHILD=1")
		out, err := cmd.CombinedOutput()
		for _, line := range bytes.Split(out, []byte("\n")) {
			if bytes.Contains(line, []byte("Passed")) || bytes.HasPrefix(bytes.TrimSpace(line), []byte("Ran ")) {
				t.Logf("%s", line)
			}
		}
		if err != nil {
			t.Fatalf("sanity with encrypted volumes: %v\n%s", err, out)
		}
		return
	}
	root := t.TempDir()
	st, err := store.OpenBolt(filepath.Join(root, "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	sanityInProcess(t, root, st, true)
}

func sanityInProcess(t *testing.T, root string, st store.Store, encrypted bool) {
	srv := startPool(t, root)
	ctrl := driver.NewControllerService(driver.ControllerOptions{ScanMaxAge: time.Second}, st, driver.NBDDiscoverer{})

	kubelet := filepath.Join(root, "kubelet")
	var att driver.VolumeAttacher
	var mnt driver.Mounter
	if kernelAvailable() {
		a := attach.New(context.Background(), attach.Options{Device: device.Options{Module: device.ModuleOptions{Skip: true}}})
		t.Cleanup(func() { a.Close() })
		att, mnt = a, driver.NewNodeMounter()
		t.Log("node: real kernel attacher and mounter")
	} else {
		if os.Getenv("NBDCSI_IN_VM") == "1" {
			t.Fatal("in the VM the sanity run must use the real kernel")
		}
		// The fake devices live in the fake /dev the fake cryptsetup
		// knows, as the real ones in /dev.
		if err := os.MkdirAll(filepath.Join(root, "dev"), 0o755); err != nil {
			t.Fatal(err)
		}
		fa := drivertest.NewAttacher(filepath.Join(root, "dev"))
		att, mnt = fa, drivertest.NewMounter(fa)
		t.Log("node: stateful fakes (no nbd in this kernel)")
	}
	var opts []driver.NodeOption
	if encrypted {
		co := crypt.Options{PBKDFMemoryKiB: 32 << 10, PBKDFIterations: 4}
		var r crypt.Runner = crypt.ExecRunner{}
		if !kernelAvailable() {
			co.DevDir = filepath.Join(root, "dev")
			tools := crypttest.NewTools(co.DevDir)
			co.SysDir, r = tools.SysDir(), tools
		}
		opts = append(opts, driver.WithEncryption(crypt.Volumes{C: crypt.New(r, co)}, crypt.SecretKeySource{}))
	}
	node, err := driver.NewNodeService(driver.NodeOptions{NodeID: "sanity-node", KubeletDir: kubelet,
		PathRoot: kubelet, StateDir: filepath.Join(root, "state")}, att, mnt, opts...)
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

	runSanity(t, endpoint, kubelet, srv, encrypted)
}

// TestSanityBinary runs csi-sanity against an `nbd-csi serve --mode=all`
// process (NBDCSI_BIN) on the real kernel: what a cluster runs.
func TestSanityBinary(t *testing.T) {
	bin := os.Getenv("NBDCSI_BIN")
	if bin == "" || !kernelAvailable() {
		if os.Getenv("NBDCSI_IN_VM") == "1" {
			t.Fatal("in the VM NBDCSI_BIN and the nbd module must be there")
		}
		t.Skip("needs NBDCSI_BIN and a kernel with nbd (make vm-test)")
	}
	root := t.TempDir()
	srv := startPool(t, root)
	kubelet := filepath.Join(root, "kubelet")
	sock := filepath.Join(root, "csi.sock")
	cmd := exec.Command(bin, "serve", "--mode=all", "--endpoint=unix://"+sock, "--node-id=sanity-node",
		"--kubelet-dir="+kubelet, "--path-root="+kubelet, "--state-dir="+filepath.Join(root, "state"), "--store-path="+filepath.Join(root, "store.db"),
		"--skip-modprobe", "--scan-max-age=1s")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 300 {
			t.Fatal("nbd-csi serve did not create its socket")
		}
		time.Sleep(50 * time.Millisecond)
	}
	runSanity(t, "unix://"+sock, kubelet, srv, false)
}
