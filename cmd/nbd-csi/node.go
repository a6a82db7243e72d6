// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"time"

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

// newNodeService builds the node service on the real kernel and mounter,
// adopts what an earlier process attached, and starts the orphan sweep.
func newNodeService(ctx context.Context, opts driver.NodeOptions, af attachFlags, m *metrics.Registry) (*driver.NodeService, driver.ReadyFunc, func(), error) {
	devOpts, err := af.options()
	if err != nil {
		return nil, nil, nil, err
	}
	att := attach.New(ctx, attach.Options{Device: devOpts, PollInterval: af.pollInterval,
		SecretsDir: filepath.Join(opts.StateDir, "tls"),
		OnEvent:    func(_ string, e device.Event) { m.ConnectionEvent(e.Kind.String()) }})
	m.Gauges("node_volumes", "NBD volumes attached on this node, by health (degraded: connection lost, reconnecting or given up).", "health",
		func(context.Context) (map[string]float64, error) {
			healthy, degraded := att.Health()
			return map[string]float64{"healthy": float64(healthy), "degraded": float64(degraded)}, nil
		})
	if err := att.Ready(ctx); err != nil {
		// Keep serving: Probe reports the reason, and the kubelet shows it.
		klog.FromContext(ctx).Error(err, "Node cannot attach NBD devices")
	}
	enc := crypt.Volumes{C: crypt.New(crypt.ExecRunner{}, crypt.Options{})}
	svc, err := driver.NewNodeService(opts, att, driver.NewNodeMounter(), driver.WithEncryption(enc, crypt.SecretKeySource{}))
	if err != nil {
		att.Close()
		return nil, nil, nil, err
	}
	if att.Ready(ctx) == nil {
		svc.Start(ctx)
	}
	return svc, svc.Ready, func() { _ = att.Close() }, nil
}
