// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2/textlogger"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestSupervisionReporter: every supervision event is logged with the
// volume ID, device and reason; connection lost, reconnected (with the
// stall), degraded and given up become Kubernetes Events on the volume's
// PersistentVolume, found by its CSI volume handle; metrics series exist
// only for attached volumes.
func TestSupervisionReporter(t *testing.T) {
	var logs bytes.Buffer
	log := textlogger.NewLogger(textlogger.NewConfig(textlogger.Output(&logs), textlogger.Verbosity(0)))
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	client := dynamicfake.NewSimpleDynamicClient(scheme,
		&corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-other", UID: "u0"},
			Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{
				CSI: &corev1.CSIPersistentVolumeSource{Driver: "other.csi", VolumeHandle: "vol-1"}}}},
		&corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-1", UID: "u1"},
			Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{
				CSI: &corev1.CSIPersistentVolumeSource{Driver: driver.DefaultDriverName, VolumeHandle: "vol-1"}}}})
	rec := record.NewFakeRecorder(16)
	rec.IncludeObject = true
	r := driver.NewSupervisionReporter(log, "node-a", rec, driver.NewKubePVLookup(client, driver.DefaultDriverName))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)

	t0 := time.Now()
	dev := "/dev/nbd3"
	r.Report(driver.SupervisionEvent{VolumeID: "vol-1", Device: dev, Kind: driver.ConnectionLost, Detail: "link-dead", Time: t0})
	r.Report(driver.SupervisionEvent{VolumeID: "vol-1", Device: dev, Kind: driver.RedialFailed, Detail: "redial-failed", Attempt: 1,
		Err: errors.New("connection refused"), Time: t0.Add(time.Second)})
	r.Report(driver.SupervisionEvent{VolumeID: "vol-1", Device: dev, Kind: driver.Reconnected, Detail: "reconnected", Time: t0.Add(2500 * time.Millisecond)})
	r.Report(driver.SupervisionEvent{VolumeID: "vol-1", Device: dev, Kind: driver.Degraded, Detail: "export-changed",
		Err: errors.New("export shrank"), Time: t0.Add(3 * time.Second)})
	r.Report(driver.SupervisionEvent{VolumeID: "vol-1", Device: dev, Kind: driver.GaveUp, Detail: "gave-up",
		Err: errors.New("reconnect timeout"), Time: t0.Add(4 * time.Second)})
	// A volume with no PV (e.g. staged by hand): logged, no Event.
	r.Report(driver.SupervisionEvent{VolumeID: "vol-2", Device: "/dev/nbd4", Kind: driver.ConnectionLost, Detail: "link-dead"})

	want := []string{
		"Warning NBDConnectionLost Connection to the NBD server lost on node node-a (device /dev/nbd3)",
		"Normal NBDReconnected Connection to the NBD server re-established on node node-a (device /dev/nbd3) after I/O stalled for 2.5s",
		"Warning NBDDegraded Reconnect refused on node node-a (device /dev/nbd3) (export-changed): export shrank",
		"Warning NBDReconnectGaveUp Reconnecting gave up on node node-a (device /dev/nbd3): reconnect timeout",
	}
	for _, w := range want {
		select {
		case got := <-rec.Events:
			if !strings.HasPrefix(got, w) || !strings.Contains(got, "involvedObject{kind=PersistentVolume,") {
				t.Errorf("event %q, want it to start with %q and involve a PersistentVolume", got, w)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no event %q", w)
		}
	}
	// The PersistentVolume is the one of this driver with the volume's
	// handle (FakeRecorder prints only its kind).
	ref, err := driver.NewKubePVLookup(client, driver.DefaultDriverName).PersistentVolume(ctx, "vol-1")
	if err != nil || ref == nil || ref.Name != "pv-1" || ref.UID != "u1" || ref.Kind != "PersistentVolume" {
		t.Errorf("PV of vol-1 = %+v, %v; want pv-1 (u1)", ref, err)
	}
	select {
	case got := <-rec.Events:
		t.Errorf("unexpected event %q", got)
	case <-time.After(200 * time.Millisecond):
	}

	out := logs.String()
	for _, w := range []string{
		`"NBD connection lost; I/O stalls until it is re-established" volumeID="vol-1" device="/dev/nbd3" event="link-dead"`,
		`"Reconnecting to the NBD server failed; retrying" volumeID="vol-1" device="/dev/nbd3" event="redial-failed" attempt=1 err="connection refused"`,
		`"NBD connection re-established" volumeID="vol-1" device="/dev/nbd3" event="reconnected" stall="2.5s"`,
		`"NBD reconnect refused; the volume stays degraded while supervision retries" err="export shrank" volumeID="vol-1" device="/dev/nbd3" event="export-changed"`,
		`"NBD reconnect gave up; I/O to the device fails" err="reconnect timeout" volumeID="vol-1" device="/dev/nbd3" event="gave-up"`,
		`"NBD connection lost; I/O stalls until it is re-established" volumeID="vol-2" device="/dev/nbd4"`,
	} {
		if !strings.Contains(out, w) {
			t.Errorf("log lacks %s\nlog:\n%s", w, out)
		}
	}

	series := r.Series([]string{"vol-1"})
	if s := series["vol-1"]; s.Counts["link-dead"] != 1 || s.Counts["reconnected"] != 1 || s.LastStall != 2500*time.Millisecond {
		t.Errorf("series of vol-1 = %+v", s)
	}
	if _, ok := series["vol-2"]; ok {
		t.Error("series for vol-2, which is not attached")
	}
	if got := r.Series([]string{"vol-2"}); len(got) != 0 {
		t.Errorf("vol-2 was forgotten, yet Series = %v", got)
	}
}
