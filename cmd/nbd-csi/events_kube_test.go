// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/klog/v2"

	"github.com/nbd-csi/nbd-csi/internal/kubetest"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestKubeEventsOnPersistentVolume: on a real kube-apiserver, the node's
// supervision events become Events on the volume's PersistentVolume (the
// one of this driver with the volume handle), with the stall time of the
// reconnect, as `kubectl describe pv` shows them.
func TestKubeEventsOnPersistentVolume(t *testing.T) {
	kubetest.Need(t, cluster)
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := cluster.WriteKubeconfig(kubeconfig); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := corev1client.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-events"},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:    corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: driver.DefaultDriverName, VolumeHandle: "vol-events"}}}}
	pv, err = client.PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rec, pvs, stop := newEventRecorder(ctx, kubeconfig, "node-a", driver.DefaultDriverName)
	defer stop()
	if rec == nil {
		t.Fatal("no event recorder with a kubeconfig")
	}
	r := driver.NewSupervisionReporter(klog.Background(), "node-a", rec, pvs)
	go r.Run(ctx)
	t0 := time.Now()
	r.Report(driver.SupervisionEvent{VolumeID: "vol-events", Device: "/dev/nbd7", Kind: driver.ConnectionLost, Detail: "link-dead", Time: t0})
	r.Report(driver.SupervisionEvent{VolumeID: "vol-events", Device: "/dev/nbd7", Kind: driver.Reconnected, Detail: "reconnected", Time: t0.Add(3 * time.Second)})
	// The same again: the recorder counts it on the existing Event (a
	// strategic-merge patch through the event sink).
	r.Report(driver.SupervisionEvent{VolumeID: "vol-events", Device: "/dev/nbd7", Kind: driver.ConnectionLost, Detail: "link-dead", Time: t0.Add(3500 * time.Millisecond)})
	r.Report(driver.SupervisionEvent{VolumeID: "vol-events", Device: "/dev/nbd7", Kind: driver.GaveUp, Detail: "gave-up",
		Err: errors.New("reconnect window expired"), Time: t0.Add(4 * time.Second)})

	want := map[string]string{
		driver.ReasonConnectionLost: "lost on node node-a (device /dev/nbd7)",
		driver.ReasonReconnected:    "after I/O stalled for 3s",
		driver.ReasonGaveUp:         "reconnect window expired",
	}
	for {
		evs, err := client.Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.kind=PersistentVolume,involvedObject.name=pv-events,involvedObject.uid=" + string(pv.UID)})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs.Items {
			if e.Reason == driver.ReasonConnectionLost && e.Count < 2 {
				continue // not yet patched
			}
			if w, ok := want[e.Reason]; ok && strings.Contains(e.Message, w) && e.Source.Component == "nbd-csi-node" && e.Source.Host == "node-a" {
				delete(want, e.Reason)
			}
		}
		if len(want) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("Events missing on the PV: %v (got %d events)", want, len(evs.Items))
		case <-time.After(200 * time.Millisecond):
		}
	}
}
