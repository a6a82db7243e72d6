// SPDX-License-Identifier: Apache-2.0

// Package e2e tests nbd-csi installed in a real cluster (KUBECONFIG) with a
// StorageClass provisioning from a real NBD server: data written by one pod
// is read by the next, the inventory shows the claim, writers survive a
// restart of the node plugin and of the NBD server, raw block volumes work,
// and a second node is fenced off a single-node volume. `make e2e` creates
// the cluster, installs the driver and runs these (test/e2e/README.md).
//
// Environment: KUBECONFIG (required; without it every test skips unless
// NBDCSI_REQUIRE_E2E=1), E2E_STORAGE_CLASS (nbd-e2e), E2E_BUSYBOX_IMAGE
// (nbd-csi-e2e/busybox:1), E2E_DRIVER_NAMESPACE (kube-system),
// E2E_SERVER_RESTART_CMD (a shell command that restarts the NBD server;
// without it that test skips), E2E_GROW_EXPORT_CMD (a shell command that
// grows export $EXPORT to $SIZE on the server; without it TestExpandVolume
// skips; it claims from E2E_GROW_STORAGE_CLASS, nbd-e2e-grow, a pool of
// its own).
package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

var (
	cs        kubernetes.Interface
	dyn       dynamic.Interface
	namespace string
)

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func TestMain(m *testing.M) {
	kc := os.Getenv("KUBECONFIG")
	if kc == "" {
		if os.Getenv("NBDCSI_REQUIRE_E2E") == "1" {
			fmt.Fprintln(os.Stderr, "e2e: KUBECONFIG is not set")
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "e2e: KUBECONFIG not set; skipping (make e2e sets up a cluster)")
		os.Exit(m.Run())
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	cfg.QPS, cfg.Burst = 50, 100
	cs = kubernetes.NewForConfigOrDie(cfg)
	dyn = dynamic.NewForConfigOrDie(cfg)
	ns, err := cs.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "nbd-csi-e2e-"}}, metav1.CreateOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: create namespace:", err)
		os.Exit(1)
	}
	namespace = ns.Name
	code := m.Run()
	if code == 0 || os.Getenv("E2E_KEEP_NAMESPACE") == "" {
		_ = cs.CoreV1().Namespaces().Delete(context.Background(), namespace, metav1.DeleteOptions{})
	}
	os.Exit(code)
}

// noNBD: the nodes' kernel has no nbd (kind on such a host,
// E2E_EXPECT_NO_NBD=1); only TestNodeWithoutNBD runs then.
var noNBD = os.Getenv("E2E_EXPECT_NO_NBD") == "1"

func need(t *testing.T) {
	t.Helper()
	if cs == nil {
		t.Skip("no cluster (KUBECONFIG)")
	}
	if noNBD {
		t.Skip("the nodes have no nbd (E2E_EXPECT_NO_NBD=1)")
	}
}

// TestNodeWithoutNBD, on a cluster whose nodes cannot attach (their kernel
// has no nbd): the driver says so itself and nothing hangs. The node
// plugin is not Ready and its /readyz gives the reason; no node carries the
// nbd-capable topology label, so a pod using a volume is never scheduled
// (and its claim never provisioned) instead of failing at stage.
func TestNodeWithoutNBD(t *testing.T) {
	if cs == nil {
		t.Skip("no cluster (KUBECONFIG)")
	}
	if !noNBD {
		t.Skip("for clusters whose nodes have no nbd (E2E_EXPECT_NO_NBD=1)")
	}
	ctx := context.Background()
	l, err := cs.CoreV1().Pods(driverNamespace()).List(ctx, metav1.ListOptions{LabelSelector: "app=nbd-csi-node"})
	if err != nil || len(l.Items) == 0 {
		t.Fatalf("node plugin pods: %v", err)
	}
	for _, p := range l.Items {
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				t.Errorf("node plugin %s on %s is Ready on a node without nbd", p.Name, p.Spec.NodeName)
			}
		}
		if body := nodeHTTP(t, p.Spec.NodeName, "/readyz"); !strings.Contains(body, "nbd") {
			t.Errorf("/readyz of %s: %q, want the reason naming nbd", p.Name, body)
		} else {
			t.Logf("%s /readyz: %s", p.Spec.NodeName, strings.TrimSpace(body))
		}
	}
	// Topology: no node reports the capable segment, so kubelet gave none
	// the label the StorageClass's allowedTopologies require.
	nl, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nl.Items {
		if v, ok := n.Labels["topology.nbd-csi.io/nbd-capable"]; ok {
			t.Errorf("node %s without nbd is labelled topology.nbd-csi.io/nbd-capable=%s", n.Name, v)
		}
	}
	// A pod with an NBD claim is never scheduled (and its claim never
	// provisioned): it stays Pending, Unschedulable, instead of failing at
	// stage on a node that cannot attach.
	pvc(t, "nonbd", false)
	pod(t, "stuck", "nonbd", false, "", "true")
	unschedulable := false
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(3 * time.Second) {
		p, err := cs.CoreV1().Pods(namespace).Get(ctx, "stuck", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Spec.NodeName != "" {
			t.Fatalf("pod scheduled to %s, a node without nbd; events:\n%s", p.Spec.NodeName, events("stuck"))
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
				unschedulable = true
			}
		}
	}
	c, err := cs.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, "nonbd", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !unschedulable || c.Status.Phase != corev1.ClaimPending {
		t.Fatalf("pod unschedulable=%v, claim %s: want an unschedulable pod and a pending claim; events:\n%s", unschedulable, c.Status.Phase, events("stuck"))
	}
	t.Logf("pod events:\n%s", events("stuck"))
}

func token() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func pvc(t *testing.T, name string, block bool) *corev1.PersistentVolumeClaim {
	t.Helper()
	return pvcOf(t, env("E2E_STORAGE_CLASS", "nbd-e2e"), name, block)
}

// pvcOf creates a 64Mi claim of StorageClass sc, deleted at cleanup.
func pvcOf(t *testing.T, sc, name string, block bool) *corev1.PersistentVolumeClaim {
	t.Helper()
	mode := corev1.PersistentVolumeFilesystem
	if block {
		mode = corev1.PersistentVolumeBlock
	}
	c := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: &sc, VolumeMode: &mode,
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("64Mi")}},
		},
	}
	c, err := cs.CoreV1().PersistentVolumeClaims(namespace).Create(context.Background(), c, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cs.CoreV1().PersistentVolumeClaims(namespace).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	return c
}

// pod runs script in busybox with the claim at /data (or as /dev/xvda for
// a block claim), on node if given: through the scheduler (node affinity on
// the node's name), never spec.nodeName, which would skip it and so leave a
// WaitForFirstConsumer claim unprovisioned.
func pod(t *testing.T, name, claim string, block bool, node, script string) *corev1.Pod {
	t.Helper()
	var affinity *corev1.Affinity
	if node != "" {
		affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
			RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
				MatchFields: []corev1.NodeSelectorRequirement{{Key: "metadata.name", Operator: corev1.NodeSelectorOpIn, Values: []string{node}}},
			}}}}}
	}
	return podWith(t, name, claim, block, affinity, script)
}

// podWith is pod with any affinity (nil: none).
func podWith(t *testing.T, name, claim string, block bool, affinity *corev1.Affinity, script string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			Affinity:      affinity,
			Containers: []corev1.Container{{
				Name: "c", Image: env("E2E_BUSYBOX_IMAGE", "nbd-csi-e2e/busybox:1"), ImagePullPolicy: corev1.PullIfNotPresent,
				Command: []string{"sh", "-c", script},
			}},
			Volumes: []corev1.Volume{{Name: "v", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}}}},
			TerminationGracePeriodSeconds: new(int64),
		},
	}
	if block {
		p.Spec.Containers[0].VolumeDevices = []corev1.VolumeDevice{{Name: "v", DevicePath: "/dev/xvda"}}
	} else {
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "v", MountPath: "/data"}}
	}
	p, err := cs.CoreV1().Pods(namespace).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { deletePod(t, name) })
	return p
}

func deletePod(t *testing.T, name string) {
	ctx := context.Background()
	_ = cs.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	for range 600 {
		if _, err := cs.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Errorf("pod %s not gone after 5 min", name)
}

// waitPod waits for the pod to reach phase; it fails early on the other
// terminal phase and reports the pod's events when it times out.
func waitPod(t *testing.T, name string, phase corev1.PodPhase, d time.Duration) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(d)
	var p *corev1.Pod
	for time.Now().Before(deadline) {
		var err error
		p, err = cs.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			if p.Status.Phase == phase {
				return p
			}
			if p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
				t.Fatalf("pod %s ended %s, want %s; log:\n%s", name, p.Status.Phase, phase, logs(t, name))
			}
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("pod %s not %s after %v (phase %v); events:\n%s", name, phase, d, p.Status.Phase, events(name))
	return nil
}

func logs(t *testing.T, name string) string {
	b, err := cs.CoreV1().Pods(namespace).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(context.Background())
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	return string(b)
}

func events(name string) string {
	l, err := cs.CoreV1().Events(namespace).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range l.Items {
		fmt.Fprintf(&b, "  %s %s: %s\n", e.Type, e.Reason, e.Message)
	}
	return b.String()
}

// nodes lists the schedulable nodes that can take an NBD volume: those
// whose node plugin reported the capable topology segment (kubelet copies
// it to the node's labels). A node without nbd in the cluster
// (TestNoVolumesOnNodeWithoutNBD) is never one of them.
func nodes(t *testing.T) []string {
	l, err := cs.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{LabelSelector: topologyCapable + "=true"})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, n := range l.Items {
		if !n.Spec.Unschedulable {
			out = append(out, n.Name)
		}
	}
	return out
}

// topologyCapable is the topology key of nodes that can attach NBD devices
// (pkg/driver TopologyKeyCapable).
const topologyCapable = "topology.nbd-csi.io/nbd-capable"

const startTimeout = 5 * time.Minute

// TestDataSurvivesPods: a pod writes to a dynamically provisioned volume
// and exits; the next pod (on another node when there is one) reads the
// same data; the inventory shows the export Bound to the volume.
func TestDataSurvivesPods(t *testing.T) {
	need(t)
	pvc(t, "data", false)
	tok := token()
	pod(t, "writer", "data", false, "", "echo "+tok+" > /data/token && sync && cat /data/token")
	w := waitPod(t, "writer", corev1.PodSucceeded, startTimeout)
	deletePod(t, "writer")
	node := ""
	for _, n := range nodes(t) {
		if n != w.Spec.NodeName {
			node = n
		}
	}
	pod(t, "reader", "data", false, node, "cat /data/token")
	waitPod(t, "reader", corev1.PodSucceeded, startTimeout)
	if got := strings.TrimSpace(logs(t, "reader")); got != tok {
		t.Fatalf("reader read %q, writer wrote %q", got, tok)
	}
	claim, err := cs.CoreV1().PersistentVolumeClaims(namespace).Get(context.Background(), "data", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	exports, err := dyn.Resource(schema.GroupVersionResource{Group: "nbd-csi.io", Version: "v1alpha1", Resource: "nbdexports"}).
		List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatalf("kubectl get nbdexports: %v", err)
	}
	found := false
	for _, e := range exports.Items {
		st, _ := e.Object["status"].(map[string]any)
		if st["volumeName"] == claim.Spec.VolumeName && st["phase"] == "Bound" {
			found = true
		}
	}
	if !found {
		t.Errorf("no NBDExport Bound to %s among %d", claim.Spec.VolumeName, len(exports.Items))
	}
}

// TestBlockVolume: a raw block volume is written and read back through
// the device.
func TestBlockVolume(t *testing.T) {
	need(t)
	pvc(t, "raw", true)
	tok := token()
	pod(t, "raw", "raw", true, "", "printf "+tok+" | dd of=/dev/xvda bs=4096 conv=fsync 2>/dev/null && dd if=/dev/xvda bs=16 count=1 2>/dev/null")
	waitPod(t, "raw", corev1.PodSucceeded, startTimeout)
	if got := logs(t, "raw"); got != tok {
		t.Fatalf("read back %q, wrote %q", got, tok)
	}
}

// writerScript appends 64 KiB records with fsync for secs seconds, exiting
// non-zero at the first I/O error, then verifies every record.
func writerScript(secs int) string {
	// The record is made once in a file: dd reading a pipe may get short
	// blocks.
	return fmt.Sprintf(`set -e
rm -f /data/log
dd if=/dev/zero bs=65536 count=1 2>/dev/null | tr '\0' x > /tmp/rec
[ "$(stat -c %%s /tmp/rec)" -eq 65536 ]
end=$(( $(date +%%s) + %d )); n=0
while [ $(date +%%s) -lt $end ]; do
  dd if=/tmp/rec of=/data/log bs=65536 seek=$n count=1 conv=notrunc,fsync 2>/dev/null
  n=$((n+1))
done
size=$(stat -c %%s /data/log)
[ "$size" -eq $((n*65536)) ] || { echo "size $size, wrote $n records"; exit 1; }
[ -z "$(tr -d x < /data/log)" ] || { echo "corrupt records"; exit 1; }
echo "ok $n records"`, secs)
}

func driverNamespace() string { return env("E2E_DRIVER_NAMESPACE", "kube-system") }

// TestNodePluginRestartWhileWriting: the node plugin pod on the writer's
// node is deleted (the DaemonSet starts a new one) while the writer
// fsyncs; the writer never sees an I/O error.
func TestNodePluginRestartWhileWriting(t *testing.T) {
	need(t)
	pvc(t, "restart", false)
	pod(t, "writer", "restart", false, "", writerScript(90))
	w := waitPod(t, "writer", corev1.PodRunning, startTimeout)
	ctx := context.Background()
	plugins, err := cs.CoreV1().Pods(driverNamespace()).List(ctx, metav1.ListOptions{LabelSelector: "app=nbd-csi-node",
		FieldSelector: "spec.nodeName=" + w.Spec.NodeName})
	if err != nil || len(plugins.Items) != 1 {
		t.Fatalf("node plugin pods on %s: %v, %v", w.Spec.NodeName, plugins, err)
	}
	old := plugins.Items[0].Name
	time.Sleep(10 * time.Second)
	if err := cs.CoreV1().Pods(driverNamespace()).Delete(ctx, old, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("deleted node plugin pod %s", old)
	waitPod(t, "writer", corev1.PodSucceeded, 5*time.Minute)
	t.Logf("writer: %s", strings.TrimSpace(logs(t, "writer")))
	// The new plugin pod is Ready (its readiness is Probe).
	deadline := time.Now().Add(3 * time.Minute)
	for {
		l, _ := cs.CoreV1().Pods(driverNamespace()).List(ctx, metav1.ListOptions{LabelSelector: "app=nbd-csi-node",
			FieldSelector: "spec.nodeName=" + w.Spec.NodeName})
		if l != nil && len(l.Items) == 1 && l.Items[0].Name != old && ready(&l.Items[0]) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new Ready node plugin pod on %s", w.Spec.NodeName)
		}
		time.Sleep(2 * time.Second)
	}
}

func ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// TestServerRestartWhileWriting: the NBD server is restarted (by
// E2E_SERVER_RESTART_CMD) while the writer fsyncs; I/O stalls, resumes,
// and every record is intact.
func TestServerRestartWhileWriting(t *testing.T) {
	need(t)
	restart := os.Getenv("E2E_SERVER_RESTART_CMD")
	if restart == "" {
		t.Skip("E2E_SERVER_RESTART_CMD not set")
	}
	pvc(t, "outage", false)
	pod(t, "writer", "outage", false, "", writerScript(60))
	waitPod(t, "writer", corev1.PodRunning, startTimeout)
	time.Sleep(10 * time.Second)
	out, err := exec.Command("sh", "-c", restart).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", restart, err, out)
	}
	t.Logf("server restarted: %s", bytes.TrimSpace(out))
	w := waitPod(t, "writer", corev1.PodSucceeded, 5*time.Minute)
	t.Logf("writer: %s", strings.TrimSpace(logs(t, "writer")))
	// The node plugin counted the outage: its /metrics (on the health port,
	// host network) shows the link dying and the reconnect.
	m := nodeHTTP(t, w.Spec.NodeName, "/metrics")
	for _, want := range []string{`nbdcsi_node_connection_events_total{event="link-dead"}`, `nbdcsi_node_connection_events_total{event="reconnected"}`} {
		if !strings.Contains(m, want) {
			t.Errorf("node plugin metrics lack %s", want)
		}
	}
}

// nodeHTTP GETs path from the node plugin on node through its health port
// (host network), whatever the status code.
func nodeHTTP(t *testing.T, node, path string) string {
	t.Helper()
	l, err := cs.CoreV1().Pods(driverNamespace()).List(context.Background(), metav1.ListOptions{LabelSelector: "app=nbd-csi-node",
		FieldSelector: "spec.nodeName=" + node})
	if err != nil || len(l.Items) == 0 {
		t.Fatalf("node plugin on %s: %v", node, err)
	}
	p := l.Items[0]
	for _, c := range p.Spec.Containers {
		if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil {
			continue
		}
		port := c.ReadinessProbe.HTTPGet.Port.String()
		for _, cp := range c.Ports {
			if cp.Name == port {
				port = fmt.Sprint(cp.ContainerPort)
			}
		}
		url := fmt.Sprintf("http://%s%s", net.JoinHostPort(p.Status.HostIP, port), path)
		resp, err := http.Get(url)
		if err != nil {
			t.Fatalf("scrape %s: %v", url, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	t.Fatalf("node plugin pod %s has no HTTP readiness probe", p.Name)
	return ""
}

// TestFencing: while one node holds a single-node volume, a second node
// cannot have it. Kubernetes' own Multi-Attach check stops the ordinary pod
// first, so the driver's fencing is also tested directly: a VolumeAttachment
// for the second node (what a split-brain attach-detach controller, or a
// forced detach race, would create) must fail in ControllerPublishVolume
// with the holder named, and deleting it must leave the holder's claim.
func TestFencing(t *testing.T) {
	need(t)
	ctx := context.Background()
	ns := nodes(t)
	if len(ns) < 2 {
		t.Skipf("needs two schedulable nodes, the cluster has %d", len(ns))
	}
	pvc(t, "fenced", false)
	pod(t, "holder", "fenced", false, ns[0], "echo held > /data/f; sync; sleep 600")
	waitPod(t, "holder", corev1.PodRunning, startTimeout)
	pod(t, "intruder", "fenced", false, ns[1], "true")
	for deadline := time.Now().Add(3 * time.Minute); ; {
		if ev := events("intruder"); strings.Contains(ev, "Multi-Attach") || strings.Contains(ev, "FailedAttachVolume") {
			t.Logf("intruder pod refused by Kubernetes: %s", ev)
			break
		}
		if p, _ := cs.CoreV1().Pods(namespace).Get(ctx, "intruder", metav1.GetOptions{}); p != nil && p.Status.Phase != corev1.PodPending {
			t.Fatalf("intruder reached %s while another node holds the volume", p.Status.Phase)
		}
		if time.Now().After(deadline) {
			t.Fatal("no attach refusal for the intruder pod within 3 min")
		}
		time.Sleep(2 * time.Second)
	}

	claim, err := cs.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, "fenced", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pv := claim.Spec.VolumeName
	va := &storagev1.VolumeAttachment{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "nbd-csi-e2e-fence-"},
		Spec: storagev1.VolumeAttachmentSpec{Attacher: env("E2E_DRIVER_NAME", "nbd.csi.nbd-csi.io"), NodeName: ns[1],
			Source: storagev1.VolumeAttachmentSource{PersistentVolumeName: &pv}},
	}
	va, err = cs.StorageV1().VolumeAttachments().Create(ctx, va, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cs.StorageV1().VolumeAttachments().Delete(ctx, va.Name, metav1.DeleteOptions{})
	}()
	for deadline := time.Now().Add(2 * time.Minute); ; {
		got, err := cs.StorageV1().VolumeAttachments().Get(ctx, va.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Status.Attached {
			t.Fatalf("the driver attached %s to %s while %s holds it", pv, ns[1], ns[0])
		}
		if e := got.Status.AttachError; e != nil {
			if !strings.Contains(e.Message, ns[0]) {
				t.Errorf("attach error does not name the holder %s: %s", ns[0], e.Message)
			}
			t.Logf("driver refused the second node: %s", e.Message)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ControllerPublishVolume for the second node neither failed nor succeeded within 2 min")
		}
		time.Sleep(2 * time.Second)
	}
	// Detaching the refused attachment unpublishes the second node only.
	if err := cs.StorageV1().VolumeAttachments().Delete(ctx, va.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Minute); ; {
		if _, err := cs.StorageV1().VolumeAttachments().Get(ctx, va.Name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the refused VolumeAttachment was not removed within 2 min")
		}
		time.Sleep(2 * time.Second)
	}
	if h := holders(t, claim); len(h) != 1 || h[0] != ns[0] {
		t.Errorf("holders after the refused attachment was removed: %v, want [%s]", h, ns[0])
	}
	if p := waitPod(t, "holder", corev1.PodRunning, time.Minute); p.Status.Phase != corev1.PodRunning {
		t.Errorf("holder is %s", p.Status.Phase)
	}
}

// holders returns the nodes the NBDVolume of a bound claim lists.
func holders(t *testing.T, claim *corev1.PersistentVolumeClaim) []string {
	t.Helper()
	pv, err := cs.CoreV1().PersistentVolumes().Get(context.Background(), claim.Spec.VolumeName, metav1.GetOptions{})
	if err != nil || pv.Spec.CSI == nil {
		t.Fatalf("PV of %s: %v", claim.Name, err)
	}
	l, err := dyn.Resource(schema.GroupVersionResource{Group: "nbd-csi.io", Version: "v1alpha1", Resource: "nbdvolumes"}).
		List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range l.Items {
		if id, _, _ := unstructured.NestedString(v.Object, "spec", "volumeID"); id != pv.Spec.CSI.VolumeHandle {
			continue
		}
		hs, _, _ := unstructured.NestedSlice(v.Object, "status", "holders")
		var nodes []string
		for _, h := range hs {
			if m, ok := h.(map[string]any); ok {
				nodes = append(nodes, fmt.Sprint(m["node"]))
			}
		}
		return nodes
	}
	t.Fatalf("no NBDVolume for volume %s", pv.Spec.CSI.VolumeHandle)
	return nil
}
