// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/klog/v2"

	"github.com/nbd-csi/nbd-csi/pkg/attach"
	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/metrics"
)

// attachFlags configure the kernel side of the node plugin.
type attachFlags struct {
	method       string
	nbdsMax      int
	maxPart      int
	skipModprobe bool
	sysRoot      string
	devRoot      string
	pollInterval time.Duration
}

func (f *attachFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.method, "attach-method", "auto", "kernel interface: auto (netlink, else ioctl), netlink or ioctl; ioctl devices do not survive a plugin restart")
	fs.IntVar(&f.nbdsMax, "nbds-max", 16, "nbds_max when this plugin loads the nbd module (netlink creates devices beyond it on demand)")
	fs.IntVar(&f.maxPart, "max-part", 0, "max_part when this plugin loads the nbd module (partitions per device)")
	fs.BoolVar(&f.skipModprobe, "skip-modprobe", false, "never run modprobe; the nbd module must be loaded already")
	fs.StringVar(&f.sysRoot, "sys-root", "/sys", "where sysfs is mounted")
	fs.StringVar(&f.devRoot, "dev-root", "/dev", "where device nodes are")
	fs.DurationVar(&f.pollInterval, "health-poll-interval", 10*time.Second, "how often attached devices are checked besides the kernel's link-dead notifications")
}

func (f *attachFlags) options() (device.Options, error) {
	o := device.Options{SysRoot: f.sysRoot, DevRoot: f.devRoot,
		Module: device.ModuleOptions{Skip: f.skipModprobe, NbdsMax: f.nbdsMax, MaxPart: f.maxPart}}
	switch f.method {
	case "auto":
		o.Backend = device.BackendAuto
	case "netlink":
		o.Backend = device.BackendNetlink
	case "ioctl":
		o.Backend = device.BackendIoctl
	default:
		return o, fmt.Errorf("%w: --attach-method=%q, want auto, netlink or ioctl", errUsage, f.method)
	}
	return o, nil
}

// supervisionKinds maps the supervisor's events to what the node reports.
var supervisionKinds = map[device.EventKind]driver.SupervisionKind{
	device.EventLinkDead:          driver.ConnectionLost,
	device.EventRedialFailed:      driver.RedialFailed,
	device.EventExportChanged:     driver.Degraded,
	device.EventReconfigureFailed: driver.Degraded,
	device.EventReconnected:       driver.Reconnected,
	device.EventGaveUp:            driver.GaveUp,
	device.EventDeviceGone:        driver.DeviceGone,
	device.EventTLSRelay:          driver.TLSRelayFallback,
	device.EventStatusFailed:      driver.StatusFailed,
	device.EventWatching:          driver.Watching,
}

// newNodeService builds the node service on the real kernel and mounter,
// adopts what an earlier process attached, and starts the orphan sweep.
// Supervision events are logged with the volume, counted per volume and,
// in a cluster, become Kubernetes Events on the volume's PersistentVolume.
func newNodeService(ctx context.Context, opts driver.NodeOptions, af attachFlags, kubeconfig string, m *metrics.Registry) (*driver.NodeService, driver.ReadyFunc, func(), error) {
	devOpts, err := af.options()
	if err != nil {
		return nil, nil, nil, err
	}
	log := klog.FromContext(ctx).WithName("supervision")
	recorder, pvs, stopEvents := newEventRecorder(ctx, kubeconfig, opts.NodeID, opts.DriverName)
	reporter := driver.NewSupervisionReporter(log, opts.NodeID, recorder, pvs)
	rctx, cancelReporter := context.WithCancel(ctx)
	go reporter.Run(rctx)
	for _, k := range device.EventKinds() {
		m.ConnectionEventKinds(k.String())
	}
	att := attach.New(ctx, attach.Options{Device: devOpts, PollInterval: af.pollInterval,
		SecretsDir: filepath.Join(opts.StateDir, "tls"),
		OnEvent: func(volumeID string, e device.Event) {
			m.ConnectionEvent(e.Kind.String())
			reporter.Report(driver.SupervisionEvent{VolumeID: volumeID,
				Device: filepath.Join(af.devRoot, fmt.Sprintf("nbd%d", e.Index)),
				Kind:   supervisionKinds[e.Kind], Detail: e.Kind.String(), Attempt: e.Attempt, Err: e.Err, Time: e.Time})
		}})
	stopAll := func() {
		_ = att.Close()
		cancelReporter()
		stopEvents()
	}
	m.Gauges("node_volumes", "NBD volumes attached on this node, by health (degraded: connection lost, reconnecting or given up).", "health",
		func(context.Context) (map[string]float64, error) {
			healthy, degraded := att.Health()
			return map[string]float64{"healthy": float64(healthy), "degraded": float64(degraded)}, nil
		})
	m.Gauges("node_tls_volumes", "TLS volumes attached on this node, by how their connections are encrypted: kernel (kernel TLS, no process in the data path), relay (the plugin's relay, the fallback where the kernel cannot; docs/tls.md) or mixed (some connections of the volume through the relay).", "mode",
		func(ctx context.Context) (map[string]float64, error) {
			out := map[string]float64{driver.TLSKernel: 0, driver.TLSRelay: 0, driver.TLSMixed: 0}
			if att.Ready(ctx) != nil {
				return out, nil
			}
			atts, err := att.List(ctx)
			if err != nil {
				return nil, err
			}
			for _, a := range atts {
				if a.TLS != "" {
					out[a.TLS]++
				}
			}
			return out, nil
		})
	registerVolumeMetrics(m, att, reporter)
	if err := att.Ready(ctx); err != nil {
		// Keep serving: Probe reports the reason, and the kubelet shows it.
		klog.FromContext(ctx).Error(err, "Node cannot attach NBD devices")
	}
	enc := crypt.Volumes{C: crypt.New(crypt.ExecRunner{}, crypt.Options{})}
	svc, err := driver.NewNodeService(opts, att, driver.NewNodeMounter(), driver.WithEncryption(enc, crypt.SecretKeySource{}))
	if err != nil {
		stopAll()
		return nil, nil, nil, err
	}
	if att.Ready(ctx) == nil {
		svc.Start(ctx)
	}
	return svc, svc.Ready, stopAll, nil
}

// registerVolumeMetrics adds the per-volume series, labelled volume_id so
// an admin finds the volume; they exist only for volumes attached on this
// node at scrape time, so there are as many as volumes.
func registerVolumeMetrics(m *metrics.Registry, att *attach.Attacher, reporter *driver.SupervisionReporter) {
	m.Family("node_volume_healthy", "1 while the NBD connection of a volume attached on this node is healthy, 0 while it is lost, reconnecting or given up.",
		false, []string{"volume_id", "device"}, func(ctx context.Context) ([]metrics.Sample, error) {
			if att.Ready(ctx) != nil {
				return nil, nil
			}
			atts, err := att.List(ctx)
			if err != nil {
				return nil, err
			}
			var out []metrics.Sample
			for _, a := range atts {
				v := 0.0
				if a.Healthy {
					v = 1
				}
				out = append(out, metrics.Sample{Labels: []string{a.VolumeID, a.Device}, Value: v})
			}
			return out, nil
		})
	attachedIDs := func(ctx context.Context) ([]string, error) {
		if att.Ready(ctx) != nil {
			return nil, nil
		}
		atts, err := att.List(ctx)
		if err != nil {
			return nil, err
		}
		ids := make([]string, 0, len(atts))
		for _, a := range atts {
			ids = append(ids, a.VolumeID)
		}
		return ids, nil
	}
	m.Family("node_volume_connection_events_total", "Connection supervision events of a volume attached on this node (link-dead, reconnected, redial-failed, gave-up, ...) since this plugin started.",
		true, []string{"volume_id", "event"}, func(ctx context.Context) ([]metrics.Sample, error) {
			ids, err := attachedIDs(ctx)
			if err != nil {
				return nil, err
			}
			var out []metrics.Sample
			for id, s := range reporter.Series(ids) {
				for ev, n := range s.Counts {
					out = append(out, metrics.Sample{Labels: []string{id, ev}, Value: n})
				}
			}
			return out, nil
		})
	m.Family("node_volume_last_stall_seconds", "How long I/O of a volume attached on this node stalled before its last reconnect.",
		false, []string{"volume_id"}, func(ctx context.Context) ([]metrics.Sample, error) {
			ids, err := attachedIDs(ctx)
			if err != nil {
				return nil, err
			}
			var out []metrics.Sample
			for id, s := range reporter.Series(ids) {
				if s.LastStall > 0 {
					out = append(out, metrics.Sample{Labels: []string{id}, Value: s.LastStall.Seconds()})
				}
			}
			return out, nil
		})
}

// newEventRecorder returns a recorder of Kubernetes Events and a lookup of
// PersistentVolumes, from --kubeconfig, $KUBECONFIG or the pod's service
// account. Outside a cluster Events are off, with one log line.
func newEventRecorder(ctx context.Context, kubeconfig, nodeID, driverName string) (driver.EventRecorder, driver.PVLookup, func()) {
	log := klog.FromContext(ctx)
	sf := storeFlags{kubeconfig: kubeconfig}
	cfg, err := sf.kubeConfig()
	if err != nil {
		log.Info("Kubernetes Events about volume connections are off: no Kubernetes API configuration", "reason", err.Error())
		return nil, nil, func() {}
	}
	client, err := dynamic.NewForConfig(cfg)
	if err != nil {
		log.Error(err, "Kubernetes Events about volume connections are off")
		return nil, nil, func() {}
	}
	rec := driver.NewKubeEventRecorder(ctx, client, corev1.EventSource{Component: "nbd-csi-node", Host: nodeID})
	rec.OnError = func(e *corev1.Event, err error) {
		log.Error(err, "Writing a Kubernetes Event failed", "reason", e.Reason, "object", klog.KRef(e.InvolvedObject.Namespace, e.InvolvedObject.Name))
	}
	log.Info("Kubernetes Events about volume connections go to the PersistentVolumes")
	return rec, driver.NewKubePVLookup(client, driverName), rec.Shutdown
}
