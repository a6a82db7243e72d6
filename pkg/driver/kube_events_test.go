// SPDX-License-Identifier: Apache-2.0

package driver_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// TestKubeEventRecorder: an Event on a PV goes to the default namespace
// with the source and counts; an identical one is counted on it (a merge
// patch); a different message is a new Event; an object that is not an
// ObjectReference is ignored; a long message is cut at 1024 bytes; a
// failed write is reported, and Shutdown writes what was queued.
func TestKubeEventRecorder(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	client := dynamicfake.NewSimpleDynamicClient(scheme)
	// The API server refuses one Event.
	client.PrependReactor("create", "events", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.(k8stesting.CreateAction).GetObject().(runtime.Unstructured).UnstructuredContent()["reason"] == "NBDRefused" {
			return true, nil, errors.New("apiserver down")
		}
		return false, nil, nil
	})
	var mu sync.Mutex
	var failed []string
	ctx := context.Background()
	r := driver.NewKubeEventRecorder(ctx, client, corev1.EventSource{Component: "nbd-csi-node", Host: "node-a"})
	r.OnError = func(e *corev1.Event, err error) {
		mu.Lock()
		failed = append(failed, e.Reason+": "+err.Error())
		mu.Unlock()
	}
	pv := &corev1.ObjectReference{Kind: "PersistentVolume", APIVersion: "v1", Name: "pv-1", UID: "u1"}
	r.Eventf(pv, corev1.EventTypeWarning, "NBDConnectionLost", "lost on %s", "node-a")
	r.Eventf(pv, corev1.EventTypeWarning, "NBDConnectionLost", "lost on %s", "node-a")
	r.Eventf(pv, corev1.EventTypeWarning, "NBDConnectionLost", "lost on %s", "node-b")
	r.Eventf(&corev1.Pod{}, corev1.EventTypeWarning, "Ignored", "not a reference")
	r.Eventf(pv, corev1.EventTypeWarning, "NBDGaveUp", "%s", strings.Repeat("é", 600))
	r.Eventf(pv, corev1.EventTypeWarning, "NBDRefused", "refused")
	r.Shutdown()

	list, err := client.Resource(schema.GroupVersionResource{Version: "v1", Resource: "events"}).Namespace(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]int32{}
	for _, u := range list.Items {
		var e corev1.Event
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &e); err != nil {
			t.Fatal(err)
		}
		if e.InvolvedObject.Name != "pv-1" || e.Source.Component != "nbd-csi-node" || e.Source.Host != "node-a" || e.Type != corev1.EventTypeWarning {
			t.Errorf("event %+v", e)
		}
		if len(e.Message) > 1024 {
			t.Errorf("message of %d bytes", len(e.Message))
		}
		counts[e.Message] = e.Count
	}
	long := strings.Repeat("é", 512) // 1024 bytes
	if len(list.Items) != 3 || counts["lost on node-a"] != 2 || counts["lost on node-b"] != 1 || counts[long] != 1 {
		t.Errorf("events by message and count: %v (%d events)", counts, len(list.Items))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(failed) != 1 || !strings.Contains(failed[0], "NBDRefused: create event") || !strings.Contains(failed[0], "apiserver down") {
		t.Errorf("reported failures %q", failed)
	}
}
