// SPDX-License-Identifier: Apache-2.0

package e2e

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestNoVolumesOnNodeWithoutNBD, on a cluster where some nodes can attach
// NBD devices and others cannot (E2E_NODE_WITHOUT_NBD names the latter;
// the vm provider boots one whose kernel refuses the module,
// module_blacklist=nbd): the node plugin there registers without the
// nbd-capable topology segment and says why where an admin looks (not
// Ready, /readyz, its log); a pod whose NBD claim (WaitForFirstConsumer)
// may only run there is never scheduled and its claim never provisioned,
// and a pod that prefers that node is placed on a capable one, its volume
// restricted to capable nodes.
func TestNoVolumesOnNodeWithoutNBD(t *testing.T) {
	need(t)
	bad := strings.Fields(os.Getenv("E2E_NODE_WITHOUT_NBD"))
	if len(bad) == 0 {
		t.Skip("E2E_NODE_WITHOUT_NBD not set (no node without nbd in this cluster)")
	}
	ctx := context.Background()
	capable := nodes(t)
	if len(capable) == 0 {
		t.Fatalf("no node is labelled %s=true", topologyCapable)
	}
	driver := env("E2E_DRIVER_NAME", "nbd.csi.nbd-csi.io")
	for _, name := range bad {
		n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("node %s (E2E_NODE_WITHOUT_NBD): %v", name, err)
		}
		if v, ok := n.Labels[topologyCapable]; ok {
			t.Errorf("node %s, whose kernel refuses nbd, is labelled %s=%s", name, topologyCapable, v)
		}
		// The plugin did register there (so the missing label is its
		// report, not a missing plugin), with the node segment only.
		registered := false
		for deadline := time.Now().Add(3 * time.Minute); !registered && time.Now().Before(deadline); time.Sleep(2 * time.Second) {
			cn, err := cs.StorageV1().CSINodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				continue
			}
			for _, d := range cn.Spec.Drivers {
				if d.Name != driver {
					continue
				}
				registered = true
				for _, k := range d.TopologyKeys {
					if k == topologyCapable {
						t.Errorf("CSINode %s: %s reports topology key %s", name, driver, k)
					}
				}
				t.Logf("CSINode %s: %s registered, topology keys %v", name, driver, d.TopologyKeys)
			}
		}
		if !registered {
			t.Fatalf("%s never registered on %s (CSINode)", driver, name)
		}
		// Where an admin looks: the plugin pod is not Ready, its /readyz
		// and its log give the reason.
		l, err := cs.CoreV1().Pods(driverNamespace()).List(ctx, metav1.ListOptions{LabelSelector: "app=nbd-csi-node",
			FieldSelector: "spec.nodeName=" + name})
		if err != nil || len(l.Items) != 1 {
			t.Fatalf("node plugin pods on %s: %v, %v", name, l, err)
		}
		p := l.Items[0]
		if ready(&p) {
			t.Errorf("node plugin %s on %s is Ready, its kernel refuses nbd", p.Name, name)
		}
		if body := nodeHTTP(t, name, "/readyz"); !strings.Contains(body, "nbd") {
			t.Errorf("/readyz on %s: %q, want the reason naming nbd", name, body)
		} else {
			t.Logf("%s /readyz: %s", name, strings.TrimSpace(body))
		}
		b, err := cs.CoreV1().Pods(driverNamespace()).GetLogs(p.Name, &corev1.PodLogOptions{Container: "nbd-csi"}).DoRaw(ctx)
		if err != nil {
			t.Errorf("log of %s: %v", p.Name, err)
		} else if line := grepLine(string(b), "cannot attach NBD devices"); line == "" {
			t.Errorf("log of %s on %s does not say the node cannot attach NBD devices", p.Name, name)
		} else {
			t.Logf("%s log: %s", p.Name, line)
		}
	}

	// A pod that may only run on a node without nbd: never scheduled, its
	// claim never provisioned.
	pvc(t, "pinned", false)
	pod(t, "pinned", "pinned", false, bad[0], "true")
	// A pod that prefers that node: placed on a capable one.
	pvc(t, "prefers", false)
	podWith(t, "prefers", "prefers", false, &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
		PreferredDuringSchedulingIgnoredDuringExecution: []corev1.PreferredSchedulingTerm{{Weight: 100, Preference: corev1.NodeSelectorTerm{
			MatchFields: []corev1.NodeSelectorRequirement{{Key: "metadata.name", Operator: corev1.NodeSelectorOpIn, Values: []string{bad[0]}}},
		}}}}}, "echo ok > /data/f && cat /data/f")
	start := time.Now()
	w := waitPod(t, "prefers", corev1.PodSucceeded, startTimeout)
	for _, b := range bad {
		if w.Spec.NodeName == b {
			t.Fatalf("pod with an NBD claim ran on %s, whose kernel refuses nbd", b)
		}
	}
	t.Logf("pod preferring %s ran on %s", bad[0], w.Spec.NodeName)
	c, err := cs.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, "prefers", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pv, err := cs.CoreV1().PersistentVolumes().Get(ctx, c.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !requiresCapable(pv) {
		t.Errorf("PV %s node affinity %v: want %s=true required", pv.Name, pv.Spec.NodeAffinity, topologyCapable)
	}
	// Watch the pinned pod for at least a minute in all.
	unschedulable := false
	for deadline := start.Add(time.Minute); ; time.Sleep(3 * time.Second) {
		p, err := cs.CoreV1().Pods(namespace).Get(ctx, "pinned", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Spec.NodeName != "" {
			t.Fatalf("pod pinned to %s was scheduled to %s; events:\n%s", bad[0], p.Spec.NodeName, events("pinned"))
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
				unschedulable = true
			}
		}
		if time.Now().After(deadline) {
			break
		}
	}
	c, err = cs.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, "pinned", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !unschedulable || c.Status.Phase != corev1.ClaimPending || c.Spec.VolumeName != "" {
		t.Fatalf("pod pinned to %s: unschedulable=%v, claim %s volume %q: want an unschedulable pod and an unprovisioned claim; events:\n%s",
			bad[0], unschedulable, c.Status.Phase, c.Spec.VolumeName, events("pinned"))
	}
	t.Logf("pod pinned to %s stays unschedulable, claim Pending; events:\n%s", bad[0], events("pinned"))
}

// requiresCapable: the PV's required node affinity admits only nodes
// labelled with the capable topology.
func requiresCapable(pv *corev1.PersistentVolume) bool {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil || len(pv.Spec.NodeAffinity.Required.NodeSelectorTerms) == 0 {
		return false
	}
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		ok := false
		for _, e := range term.MatchExpressions {
			if e.Key == topologyCapable && e.Operator == corev1.NodeSelectorOpIn && len(e.Values) == 1 && e.Values[0] == "true" {
				ok = true
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// grepLine returns the first line of s containing sub, or "".
func grepLine(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}
