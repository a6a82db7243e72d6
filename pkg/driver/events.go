// SPDX-License-Identifier: Apache-2.0

package driver

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/klog/v2"
)

// SupervisionKind classifies what the supervision of a volume's NBD
// connection observed.
type SupervisionKind int

// Supervision kinds.
const (
	// ConnectionLost: the kernel reported the connection dead; I/O stalls
	// until it is re-established or the dead-connection timeout ends.
	ConnectionLost SupervisionKind = iota + 1
	// RedialFailed: one attempt to reach the server again failed.
	RedialFailed
	// Degraded: a reconnect was refused (the export changed, or the kernel
	// refused the new connection); supervision keeps trying.
	Degraded
	// Reconnected: the device has new connections; I/O flows again.
	Reconnected
	// GaveUp: supervision ended for good; I/O to the device fails.
	GaveUp
	// DeviceGone: the device was disconnected under the plugin.
	DeviceGone
	// StatusFailed: checking the device failed; supervision goes on.
	StatusFailed
	// Watching: supervision is in place.
	Watching
	// TLSRelayFallback: a TLS volume's connection goes through the
	// plugin's relay because the kernel could not take the TLS session
	// (tls=auto); Err says why. Unlike with kernel TLS, the volume's I/O
	// then stalls while the plugin restarts.
	TLSRelayFallback
)

// SupervisionEvent is one event of a volume's connection supervision.
type SupervisionEvent struct {
	// VolumeID and Device name the volume and its block device.
	VolumeID, Device string
	// Kind says what happened; Detail is the supervisor's own name for it
	// (e.g. "export-changed").
	Kind   SupervisionKind
	Detail string
	// Attempt counts redials (from 1) where that applies.
	Attempt int
	// Err is the cause of failures.
	Err error
	// Time is when it happened.
	Time time.Time
	// Stall is how long I/O stalled before a reconnect; the reporter sets
	// it for Reconnected when it saw the connection lost.
	Stall time.Duration
}

// Kubernetes Event reasons, on the volume's PersistentVolume.
const (
	ReasonConnectionLost = "NBDConnectionLost"
	ReasonReconnected    = "NBDReconnected"
	ReasonDegraded       = "NBDDegraded"
	ReasonGaveUp         = "NBDReconnectGaveUp"
	ReasonDeviceGone     = "NBDDeviceGone"
	ReasonTLSRelay       = "NBDTLSRelayFallback"
)

// PVLookup finds the PersistentVolume of a CSI volume for Events.
type PVLookup interface {
	// PersistentVolume returns a reference to the volume's PV, nil if there
	// is none.
	PersistentVolume(ctx context.Context, volumeID string) (*corev1.ObjectReference, error)
}

// SupervisionReporter makes supervision events visible: a log line with the
// volume ID, device and reason for every event; a Kubernetes Event on the
// volume's PersistentVolume for connection lost, reconnected (with the
// stall time), degraded, given up and device gone; and per-volume counts
// for metrics. Report never blocks: Events go through a bounded queue that
// Run drains.
type SupervisionReporter struct {
	log      klog.Logger
	nodeID   string
	recorder EventRecorder // nil: no Kubernetes Events
	pvs      PVLookup

	queue chan SupervisionEvent

	mu      sync.Mutex
	volumes map[string]*volumeSupervision
}

// volumeSupervision is what the reporter tracks per volume.
type volumeSupervision struct {
	lostAt    time.Time // zero unless the connection is lost
	lastStall time.Duration
	counts    map[string]float64
}

// NewSupervisionReporter returns a reporter; recorder and pvs may be nil
// (logs and metrics only).
func NewSupervisionReporter(log klog.Logger, nodeID string, recorder EventRecorder, pvs PVLookup) *SupervisionReporter {
	return &SupervisionReporter{log: log, nodeID: nodeID, recorder: recorder, pvs: pvs,
		queue: make(chan SupervisionEvent, 256), volumes: map[string]*volumeSupervision{}}
}

// Report records one event. Safe for concurrent use; it never blocks.
func (r *SupervisionReporter) Report(e SupervisionEvent) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	r.mu.Lock()
	v := r.volumes[e.VolumeID]
	if v == nil {
		v = &volumeSupervision{counts: map[string]float64{}}
		r.volumes[e.VolumeID] = v
	}
	v.counts[e.Detail]++
	var stall time.Duration
	switch e.Kind {
	case ConnectionLost:
		if v.lostAt.IsZero() {
			v.lostAt = e.Time
		}
	case Reconnected:
		if !v.lostAt.IsZero() {
			stall = e.Time.Sub(v.lostAt)
			v.lastStall = stall
		}
		v.lostAt = time.Time{}
	case GaveUp, DeviceGone:
		v.lostAt = time.Time{}
	}
	r.mu.Unlock()

	log := r.log.WithValues("volumeID", e.VolumeID, "device", e.Device, "event", e.Detail)
	switch e.Kind {
	case ConnectionLost:
		log.Info("NBD connection lost; I/O stalls until it is re-established")
	case RedialFailed:
		// One line per outage at the default level, every attempt at V(2).
		if e.Attempt == 1 || e.Attempt%10 == 0 {
			log.Info("Reconnecting to the NBD server failed; retrying", "attempt", e.Attempt, "err", errString(e.Err))
		} else {
			log.V(2).Info("Reconnecting to the NBD server failed; retrying", "attempt", e.Attempt, "err", errString(e.Err))
		}
	case Degraded:
		log.Error(e.Err, "NBD reconnect refused; the volume stays degraded while supervision retries")
	case Reconnected:
		if stall > 0 {
			log.Info("NBD connection re-established", "stall", stall)
		} else {
			log.Info("NBD connection re-established")
		}
	case GaveUp:
		log.Error(e.Err, "NBD reconnect gave up; I/O to the device fails")
	case DeviceGone:
		log.Error(e.Err, "NBD device was disconnected; supervision ended")
	case StatusFailed:
		log.Error(e.Err, "Checking the NBD device failed; supervision goes on")
	case TLSRelayFallback:
		log.Info("TLS volume uses the plugin's relay: the kernel cannot take the TLS session", "reason", errString(e.Err))
	default:
		log.V(2).Info("NBD supervision event")
	}
	if r.recorder == nil {
		return
	}
	switch e.Kind {
	case ConnectionLost, Reconnected, Degraded, GaveUp, DeviceGone, TLSRelayFallback:
	default:
		return
	}
	e.Stall = stall
	select {
	case r.queue <- e:
	default:
		log.Info("Kubernetes Event queue full; Event dropped")
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// Run emits the queued Kubernetes Events until ctx ends.
func (r *SupervisionReporter) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-r.queue:
			r.emit(ctx, e)
		}
	}
}

func (r *SupervisionReporter) emit(ctx context.Context, e SupervisionEvent) {
	log := r.log.WithValues("volumeID", e.VolumeID, "device", e.Device)
	if r.pvs == nil {
		return
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	ref, err := r.pvs.PersistentVolume(lctx, e.VolumeID)
	cancel()
	if err != nil {
		log.Error(err, "Finding the PersistentVolume for a Kubernetes Event")
		return
	}
	if ref == nil {
		log.V(2).Info("No PersistentVolume for the volume; no Kubernetes Event")
		return
	}
	where := fmt.Sprintf("on node %s (device %s)", r.nodeID, e.Device)
	switch e.Kind {
	case ConnectionLost:
		r.recorder.Eventf(ref, corev1.EventTypeWarning, ReasonConnectionLost,
			"Connection to the NBD server lost %s; I/O stalls until it is re-established", where)
	case Reconnected:
		if e.Stall > 0 {
			r.recorder.Eventf(ref, corev1.EventTypeNormal, ReasonReconnected,
				"Connection to the NBD server re-established %s after I/O stalled for %s", where, e.Stall.Round(time.Millisecond))
		} else {
			r.recorder.Eventf(ref, corev1.EventTypeNormal, ReasonReconnected, "Connection to the NBD server re-established %s", where)
		}
	case Degraded:
		r.recorder.Eventf(ref, corev1.EventTypeWarning, ReasonDegraded, "Reconnect refused %s (%s): %v; retrying", where, e.Detail, e.Err)
	case GaveUp:
		r.recorder.Eventf(ref, corev1.EventTypeWarning, ReasonGaveUp, "Reconnecting gave up %s: %v; I/O to the volume fails", where, e.Err)
	case DeviceGone:
		r.recorder.Eventf(ref, corev1.EventTypeWarning, ReasonDeviceGone, "The NBD device was disconnected %s; I/O to the volume fails", where)
	case TLSRelayFallback:
		r.recorder.Eventf(ref, corev1.EventTypeWarning, ReasonTLSRelay,
			"TLS connection %s goes through the node plugin's relay (the kernel cannot take the TLS session: %v); I/O stalls while the plugin restarts", where, e.Err)
	}
}

// VolumeSeries is a volume's supervision metrics.
type VolumeSeries struct {
	// Counts are events by the supervisor's name for them.
	Counts map[string]float64
	// LastStall is the stall of the last reconnect (0: none yet).
	LastStall time.Duration
}

// Series returns the supervision metrics of the volumes in attached and
// forgets every other volume, so the series stay bounded by the volumes on
// the node.
func (r *SupervisionReporter) Series(attached []string) map[string]VolumeSeries {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]VolumeSeries{}
	for id, v := range r.volumes {
		if !slices.Contains(attached, id) {
			delete(r.volumes, id)
			continue
		}
		counts := make(map[string]float64, len(v.counts))
		for k, c := range v.counts {
			counts[k] = c
		}
		out[id] = VolumeSeries{Counts: counts, LastStall: v.lastStall}
	}
	return out
}

// The node reaches the Kubernetes API through the dynamic client only:
// client-go's typed clientset would link (and initialise, in every nbd-csi
// process, CLI commands included) the scheme of every built-in API group,
// which was the largest part of the binary's start-up (docs/performance.md).
var (
	pvResource    = schema.GroupVersionResource{Version: "v1", Resource: "persistentvolumes"}
	eventResource = schema.GroupVersionResource{Version: "v1", Resource: "events"}
)

// KubePVLookup finds a CSI volume's PersistentVolume by listing PVs (their
// names are the kubelet's, not the volume ID) and caches the answer.
type KubePVLookup struct {
	client     dynamic.Interface
	driverName string

	mu    sync.Mutex
	cache map[string]*corev1.ObjectReference
}

// NewKubePVLookup returns a lookup for volumes of driverName.
func NewKubePVLookup(client dynamic.Interface, driverName string) *KubePVLookup {
	return &KubePVLookup{client: client, driverName: driverName, cache: map[string]*corev1.ObjectReference{}}
}

// PersistentVolume implements PVLookup.
func (l *KubePVLookup) PersistentVolume(ctx context.Context, volumeID string) (*corev1.ObjectReference, error) {
	l.mu.Lock()
	ref, ok := l.cache[volumeID]
	l.mu.Unlock()
	if ok {
		return ref, nil
	}
	list, err := l.client.Resource(pvResource).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list PersistentVolumes: %w", err)
	}
	for i := range list.Items {
		pv := &list.Items[i]
		drv, _, _ := unstructured.NestedString(pv.Object, "spec", "csi", "driver")
		handle, _, _ := unstructured.NestedString(pv.Object, "spec", "csi", "volumeHandle")
		if drv != l.driverName || handle != volumeID {
			continue
		}
		// What reference.GetReference makes of a PersistentVolume.
		ref := &corev1.ObjectReference{Kind: "PersistentVolume", APIVersion: "v1", Name: pv.GetName(),
			UID: pv.GetUID(), ResourceVersion: pv.GetResourceVersion()}
		l.mu.Lock()
		l.cache[volumeID] = ref
		l.mu.Unlock()
		return ref, nil
	}
	return nil, nil
}
