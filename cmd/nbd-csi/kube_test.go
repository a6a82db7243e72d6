// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
	"github.com/nbd-csi/nbd-csi/internal/servers"
)

var cluster *kubetest.Cluster

func TestMain(m *testing.M) {
	if os.Getenv(envRunMain) == "1" {
		main() // the test binary started as `nbd-csi …` (runserver_test.go)
	}
	code := kubetest.Main(m, &cluster)
	if binPath != "" { // built by nbdcsiBinary()
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// TestServeKubeStore runs `nbd-csi serve --mode=controller --store=kubernetes
// --leader-election` against a real kube-apiserver and a real nbdkit pool:
// provision, fence, and read the inventory back with `nbd-csi exports`.
func TestServeKubeStore(t *testing.T) {
	kubetest.Need(t, cluster)
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := cluster.WriteKubeconfig(kubeconfig); err != nil {
		t.Fatal(err)
	}
	pool := filepath.Join(dir, "pool")
	os.Mkdir(pool, 0o755)
	for i, size := range []int64{64 << 20, 128 << 20} {
		f, err := os.Create(filepath.Join(pool, "disk"+string(rune('a'+i))))
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(size)
		f.Close()
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+pool)

	sock := filepath.Join(dir, "csi.sock")
	ctx, ctrl := serveController(t, sock, "--store=kubernetes", "--kubeconfig="+kubeconfig,
		"--leader-election", "--leader-election-namespace=default", "--scan-interval=1s")
	cctx, ccancel := context.WithTimeout(ctx, time.Minute)
	defer ccancel()
	mount := []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}
	vol, err := ctrl.CreateVolume(cctx, &csi.CreateVolumeRequest{Name: "pvc-kube", VolumeCapabilities: mount,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 100 << 20}, Parameters: map[string]string{"server": srv.URI("")}})
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	if vol.Volume.CapacityBytes != 128<<20 {
		t.Errorf("capacity %d, want the 128 MiB export", vol.Volume.CapacityBytes)
	}
	pub := func(node string) error {
		_, err := ctrl.ControllerPublishVolume(cctx, &csi.ControllerPublishVolumeRequest{VolumeId: vol.Volume.VolumeId, NodeId: node,
			VolumeCapability: mount[0], VolumeContext: vol.Volume.VolumeContext})
		return err
	}
	if err := pub("node-a"); err != nil {
		t.Fatal(err)
	}
	if err := pub("node-b"); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "node-a") {
		t.Errorf("second writer: %v, want FailedPrecondition naming node-a", err)
	}

	code, out, errOut := runCLI(t, "exports", "--json", "--store=kubernetes", "--kubeconfig="+kubeconfig)
	var got []ExportOutput
	if code != 0 || json.Unmarshal([]byte(out), &got) != nil {
		t.Fatalf("exports: exit %d: %s %s", code, out, errOut)
	}
	phases := map[string]string{}
	for _, e := range got {
		phases[e.Export] = e.Phase
		if e.Export == "diskb" && (e.VolumeName != "pvc-kube" || len(e.Nodes) != 1 || e.Nodes[0] != "node-a") {
			t.Errorf("diskb: %+v", e)
		}
	}
	if phases["diska"] != "Available" || phases["diskb"] != "Bound" {
		t.Errorf("phases %v", phases)
	}

	// The controller took the Lease for its background scans.
	dc, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	leases := dc.Resource(schema.GroupVersionResource{Group: "coordination.k8s.io", Version: "v1", Resource: "leases"}).Namespace("default")
	for i := 0; ; i++ {
		l, err := leases.Get(cctx, "nbd-csi-nbd-csi-io-controller", metav1.GetOptions{})
		if holder, _, _ := unstructured.NestedString(l.UnstructuredContent(), "spec", "holderIdentity"); err == nil && holder != "" {
			break
		}
		if i > 100 {
			t.Fatalf("no leader lease: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	if _, err := ctrl.ControllerUnpublishVolume(cctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: vol.Volume.VolumeId, NodeId: "node-a"}); err != nil {
		t.Fatal(err)
	}
	// The tenant's data; the StorageClass said nothing about wiping.
	tenantData(t, filepath.Join(pool, "diskb"))
	if _, err := ctrl.DeleteVolume(cctx, &csi.DeleteVolumeRequest{VolumeId: vol.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	wipedFile(t, filepath.Join(pool, "diskb"))
	code, out, _ = runCLI(t, "exports", "--store=kubernetes", "--kubeconfig="+kubeconfig)
	if code != 0 || strings.Contains(out, "Bound") {
		t.Errorf("after delete (exit %d):\n%s", code, out)
	}
}

// TestStoreFlagErrors: a bad --store or a kubernetes store without a
// cluster is a clear error, not a hang.
func TestStoreFlagErrors(t *testing.T) {
	code, _, errOut := runCLI(t, "exports", "--store=etcd")
	if code == 0 || !strings.Contains(errOut, "want embedded or kubernetes") {
		t.Errorf("--store=etcd: exit %d, %q", code, errOut)
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBECONFIG", "")
	code, _, errOut = runCLI(t, "exports", "--store=kubernetes")
	if code == 0 || !strings.Contains(errOut, "not in a pod") {
		t.Errorf("--store=kubernetes outside a cluster: exit %d, %q", code, errOut)
	}
}

// TestServeHealth: --health-address answers /healthz while serving,
// /readyz with 200 when the services are ready and 503 with Probe's reason
// when they are not (here: a node whose kernel has no nbd, unless this
// kernel has it), and /metrics with each mode's gauges and counters.
func TestServeHealth(t *testing.T) {
	dir := t.TempDir()
	check := func(args []string, path string, wantCode int, wantBody string) {
		t.Helper()
		port, err := servers.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan int, 1)
		go func() {
			var out, errb strings.Builder
			done <- run(ctx, append(args, "--health-address="+addr), &out, &errb)
		}()
		defer func() { cancel(); <-done }()
		var resp *http.Response
		for i := 0; ; i++ {
			resp, err = http.Get("http://" + addr + path)
			if err == nil {
				break
			}
			if i > 200 {
				t.Fatalf("health endpoint: %v", err)
			}
			time.Sleep(25 * time.Millisecond)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != wantCode || !strings.Contains(string(body), wantBody) {
			t.Errorf("%v: %s = %d %q, want %d containing %q", args[:2], path, resp.StatusCode, body, wantCode, wantBody)
		}
	}
	ctrl := []string{"serve", "--mode=controller", "--endpoint=unix://" + filepath.Join(dir, "c.sock"), "--store-path=" + filepath.Join(dir, "store.db")}
	check(ctrl, "/readyz", http.StatusOK, "ok")
	check(ctrl, "/metrics", http.StatusOK, `nbdcsi_exports{phase="Available"} 0`)
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		node := []string{"serve", "--mode=node", "--endpoint=unix://" + filepath.Join(dir, "n.sock"),
			"--kubelet-dir=" + filepath.Join(dir, "kubelet"), "--state-dir=" + filepath.Join(dir, "state"), "--skip-modprobe"}
		check(node, "/readyz", http.StatusServiceUnavailable, "nbd")
		check(node, "/healthz", http.StatusOK, "ok")
		check(node, "/metrics", http.StatusOK, `nbdcsi_node_volumes{health="degraded"} 0`)
		// Every event kind's counter starts at zero: the alert on
		// increase(…{event="gave-up"}) sees the first one.
		check(node, "/metrics", http.StatusOK, `nbdcsi_node_connection_events_total{event="gave-up"} 0`)
	}
}

// tenantData writes non-zero data at the start and in the middle of file.
func tenantData(t *testing.T, file string) {
	t.Helper()
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := []byte(strings.Repeat("tenant data ", 1<<16))
	for _, off := range []int64{0, 40 << 20} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
}

// wipedFile fails unless file reads as zeroes.
func wipedFile(t *testing.T, file string) {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	zero := make([]byte, len(buf))
	for off := int64(0); ; off += int64(len(buf)) {
		n, err := f.ReadAt(buf, off)
		if !bytes.Equal(buf[:n], zero[:n]) {
			t.Fatalf("%s has data in [%d, %d) after DeleteVolume: the next claim would get the previous tenant's data", file, off, off+int64(n))
		}
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestServeWipesByDefault: `nbd-csi serve --mode=controller` with the
// embedded store and a real nbdkit pool wipes a deleted volume's export
// although the StorageClass says nothing about it, also when the wipe
// takes several DeleteVolume calls (--wipe-budget below the time one step
// takes: each call makes one 256 MiB step of progress on the sparse 1 GiB
// export and returns Aborted; zeroing is by writes, only where
// base:allocation says data may be), and
// keeps the data only with an explicit wipeOnDelete "false".
func TestServeWipesByDefault(t *testing.T) {
	dir := t.TempDir()
	pool := filepath.Join(dir, "pool")
	os.Mkdir(pool, 0o755)
	f, err := os.Create(filepath.Join(pool, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(1 << 30)
	f.Close()
	srv := servers.Nbdkit(t, servers.Unix, "--filter=nozero", "file", "dir="+pool)
	sock := filepath.Join(dir, "csi.sock")
	ctx, ctrl := serveController(t, sock, "--store-path="+filepath.Join(dir, "store.db"), "--wipe-budget=1ns")
	cctx, ccancel := context.WithTimeout(ctx, 2*time.Minute)
	defer ccancel()
	mount := []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}
	for _, tt := range []struct {
		name   string
		params map[string]string
		wiped  bool
	}{
		{"default", map[string]string{}, true},
		{"opt-out", map[string]string{"wipeOnDelete": "false"}, false},
	} {
		tt.params["server"] = srv.URI("")
		vol, err := ctrl.CreateVolume(cctx, &csi.CreateVolumeRequest{Name: "pvc-" + tt.name, VolumeCapabilities: mount,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, Parameters: tt.params})
		if err != nil {
			t.Fatalf("%s: CreateVolume: %v", tt.name, err)
		}
		tenantData(t, filepath.Join(pool, "disk"))
		aborted := 0
		for {
			_, err := ctrl.DeleteVolume(cctx, &csi.DeleteVolumeRequest{VolumeId: vol.Volume.VolumeId})
			if err == nil {
				break
			}
			if status.Code(err) != codes.Aborted || aborted > 100 {
				t.Fatalf("%s: DeleteVolume: %v (after %d Aborted)", tt.name, err, aborted)
			}
			aborted++
			// Mid-wipe the export is not Available to another claim.
			if _, err := ctrl.CreateVolume(cctx, &csi.CreateVolumeRequest{Name: "pvc-other", VolumeCapabilities: mount,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, Parameters: tt.params}); status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("%s: claim of the export mid-wipe: %v, want ResourceExhausted", tt.name, err)
			}
		}
		t.Logf("%s: DeleteVolume returned Aborted %d times before the wipe finished", tt.name, aborted)
		if tt.wiped {
			if aborted != 3 {
				t.Errorf("%s: a 1 GiB wipe at one 256 MiB step per call took %d retries, want 3", tt.name, aborted)
			}
			wipedFile(t, filepath.Join(pool, "disk"))
		} else {
			f, err := os.Open(filepath.Join(pool, "disk"))
			if err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 11)
			_, err = io.ReadFull(f, b)
			f.Close()
			if err != nil || string(b) != "tenant data" {
				t.Errorf("%s: data gone although the StorageClass opted out of wiping", tt.name)
			}
		}
	}
}

// serveController runs `nbd-csi serve --mode=controller` in this process on
// the unix socket sock with the extra args until the test ends, and returns
// a context that ends with it and a controller client.
func serveController(t *testing.T, sock string, args ...string) (context.Context, csi.ControllerClient) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		var out, errb strings.Builder
		code := run(ctx, append([]string{"serve", "--mode=controller", "--endpoint=unix://" + sock}, args...), &out, &errb)
		if code != 0 {
			t.Logf("serve: exit %d: %s", code, errb.String())
		}
		done <- code
	}()
	t.Cleanup(func() { cancel(); <-done })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 400 {
			t.Fatal("serve did not create its socket")
		}
		time.Sleep(25 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true))) // the socket may exist a moment before it listens
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return ctx, csi.NewControllerClient(conn)
}
