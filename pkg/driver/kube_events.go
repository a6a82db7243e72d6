// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
)

// EventRecorder is what the supervision reporter needs of a recorder of
// Kubernetes Events. KubeEventRecorder implements it; so do client-go's
// record.EventRecorder and record.FakeRecorder (tests).
type EventRecorder interface {
	Eventf(object runtime.Object, eventtype, reason, messageFmt string, args ...any)
}

// Limits of KubeEventRecorder.
const (
	// eventRepeatWindow: an Event repeated within it is counted on the one
	// written (what client-go's event correlator does).
	eventRepeatWindow = 10 * time.Minute
	// eventQueue bounds the Events waiting to be written; Eventf drops an
	// Event when it is full rather than block the caller.
	eventQueue = 100
	// eventTimeout bounds each API request.
	eventTimeout = 10 * time.Second
	// maxEventMessage bounds a message (it may carry a server's words).
	maxEventMessage = 1024
)

// KubeEventRecorder writes Events on objects through the dynamic client,
// in the background and in order. It replaces client-go's
// tools/record, whose dependencies (strategic merge patch, OpenAPI
// models: 49 packages) every nbd-csi process initialised at start
// (docs/performance.md, "Node path").
type KubeEventRecorder struct {
	client dynamic.Interface
	source corev1.EventSource
	ctx    context.Context
	queue  chan *corev1.Event
	done   chan struct{}
	once   sync.Once
	// OnError, if set, is told about each Event that could not be written.
	OnError func(*corev1.Event, error)

	// written: by repeatKey, the Event last written and when (run only).
	written map[string]*writtenEvent
}

type writtenEvent struct {
	name, namespace string
	count           int32
	last            time.Time
}

// NewKubeEventRecorder starts a recorder; Shutdown stops it. ctx bounds
// its requests.
func NewKubeEventRecorder(ctx context.Context, client dynamic.Interface, source corev1.EventSource) *KubeEventRecorder {
	r := &KubeEventRecorder{client: client, source: source, ctx: ctx,
		queue: make(chan *corev1.Event, eventQueue), done: make(chan struct{}), written: map[string]*writtenEvent{}}
	go r.run()
	return r
}

// Eventf implements EventRecorder for objects given as
// *corev1.ObjectReference (what PVLookup returns); others are ignored. It
// never blocks.
func (r *KubeEventRecorder) Eventf(object runtime.Object, eventtype, reason, messageFmt string, args ...any) {
	ref, ok := object.(*corev1.ObjectReference)
	if !ok || ref == nil {
		return
	}
	msg := fmt.Sprintf(messageFmt, args...)
	if len(msg) > maxEventMessage {
		msg = msg[:maxEventMessage]
		for !utf8.ValidString(msg) {
			msg = msg[:len(msg)-1]
		}
	}
	ns := ref.Namespace
	if ns == "" {
		ns = metav1.NamespaceDefault
	}
	now := metav1.Now()
	e := &corev1.Event{
		ObjectMeta:          metav1.ObjectMeta{Name: fmt.Sprintf("%s.%x", ref.Name, now.UnixNano()), Namespace: ns},
		InvolvedObject:      *ref,
		Reason:              reason,
		Message:             msg,
		Source:              r.source,
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		Type:                eventtype,
		ReportingController: r.source.Component,
		ReportingInstance:   r.source.Host,
	}
	select {
	case <-r.done:
	case r.queue <- e:
	default:
		if r.OnError != nil {
			r.OnError(e, fmt.Errorf("event queue full (%d)", eventQueue))
		}
	}
}

// Shutdown stops the recorder after the queued Events are written.
func (r *KubeEventRecorder) Shutdown() {
	r.once.Do(func() { close(r.queue) })
	<-r.done
}

func (r *KubeEventRecorder) run() {
	defer close(r.done)
	for e := range r.queue {
		if err := r.write(e); err != nil && r.OnError != nil {
			r.OnError(e, err)
		}
	}
}

// repeatKey identifies repeats of an Event.
func repeatKey(e *corev1.Event) string {
	o := e.InvolvedObject
	return fmt.Sprintf("%s\x00%s\x00%s\x00%s\x00%s\x00%s\x00%s\x00%s", o.Kind, o.Namespace, o.Name, o.UID, e.Type, e.Reason, e.Message, e.Source.Host)
}

// write creates e, or counts it on the Event written for its last repeat
// within eventRepeatWindow.
func (r *KubeEventRecorder) write(e *corev1.Event) error {
	now := e.LastTimestamp.Time
	for k, w := range r.written {
		if now.Sub(w.last) > eventRepeatWindow {
			delete(r.written, k)
		}
	}
	key := repeatKey(e)
	ctx, cancel := context.WithTimeout(r.ctx, eventTimeout)
	defer cancel()
	events := r.client.Resource(eventResource)
	if w, ok := r.written[key]; ok {
		patch, err := json.Marshal(map[string]any{"count": w.count + 1, "lastTimestamp": e.LastTimestamp})
		if err != nil {
			return err
		}
		_, err = events.Namespace(w.namespace).Patch(ctx, w.name, types.MergePatchType, patch, metav1.PatchOptions{})
		if err == nil {
			w.count++
			w.last = now
			return nil
		}
		if !apierrors.IsNotFound(err) {
			return fmt.Errorf("count event %s/%s: %w", w.namespace, w.name, err)
		}
		// Expired meanwhile: write it anew.
		delete(r.written, key)
	}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(e)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	u := unstructuredEvent(m)
	if _, err := events.Namespace(e.Namespace).Create(ctx, u, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create event %s/%s: %w", e.Namespace, e.Name, err)
	}
	r.written[key] = &writtenEvent{name: e.Name, namespace: e.Namespace, count: 1, last: now}
	return nil
}

func unstructuredEvent(m map[string]any) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion("v1")
	u.SetKind("Event")
	return u
}
