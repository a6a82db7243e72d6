// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"k8s.io/klog/v2"

	"google.golang.org/grpc"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/metrics"
)

// serveFlags are the flags of `nbd-csi serve`; docs/cli.md lists them.
type serveFlags struct {
	mode       string
	endpoint   string
	driverName string
	grace      time.Duration
	health     string
	node       driver.NodeOptions
	attach     attachFlags
	controller controllerFlags
}

func (f *serveFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.mode, "mode", "all", "services to serve: controller, node or all")
	fs.StringVar(&f.endpoint, "endpoint", "unix:///csi/csi.sock", "CSI gRPC endpoint: unix:///path or tcp://host:port")
	fs.StringVar(&f.driverName, "driver-name", driver.DefaultDriverName, "CSI driver name (must match the CSIDriver object)")
	fs.DurationVar(&f.grace, "shutdown-grace", 30*time.Second, "how long SIGTERM waits for RPCs in flight (volumes stay attached)")
	fs.StringVar(&f.health, "health-address", "", "serve HTTP on this address (e.g. :9808): GET /healthz answers 200 while the process serves; GET /readyz 200 when Probe is ready, else 503 with the reason; GET /metrics Prometheus metrics; empty: off")

	host, _ := os.Hostname()
	if n := os.Getenv("NODE_NAME"); n != "" {
		host = n
	}
	fs.StringVar(&f.node.NodeID, "node-id", host, "node name (default $NODE_NAME, else the hostname)")
	fs.StringVar(&f.node.KubeletDir, "kubelet-dir", "/var/lib/kubelet", "kubelet root directory: staging and target paths must be the ones the kubelet makes under it (symlinks resolved)")
	fs.StringVar(&f.node.PathRoot, "path-root", "", "accept staging and target paths anywhere strictly below this directory instead of the kubelet's layout (for csi-sanity and tests; never in a cluster)")
	fs.StringVar(&f.node.StateDir, "state-dir", "", "directory for per-volume state records (default KUBELET_DIR/plugins/DRIVER_NAME/volumes)")
	fs.Int64Var(&f.node.MaxVolumesPerNode, "max-volumes-per-node", 0, "volumes the scheduler may place on a node (0: no limit)")
	fs.DurationVar(&f.node.OrphanGracePeriod, "orphan-grace-period", 10*time.Minute, "how long a device of ours with no state record and no mount is left before it is detached")
	f.attach.register(fs)
	f.controller.register(fs)
}

func runServe(ctx context.Context, args []string, _ io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var f serveFlags
	f.register(fs)
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	klogFlags.VisitAll(func(fl *flag.Flag) {
		if fl.Name == "v" || fl.Name == "vmodule" {
			fs.Var(fl.Value, fl.Name, fl.Usage)
		}
	})
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: nbd-csi serve [flags]\n\nServes the CSI identity service and, per --mode, the node and/or controller service.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	mode, err := driver.ParseMode(f.mode)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	logger := klog.Background().WithValues("mode", mode)
	ctx = klog.NewContext(ctx, logger)

	m := metrics.New()
	cfg := driver.Config{Name: f.driverName, Version: Version(), Endpoint: f.endpoint, Mode: mode,
		Interceptors: []grpc.UnaryServerInterceptor{m.Interceptor()}}
	var ready []driver.ReadyFunc
	if mode.ServesNode() {
		f.node.DriverName = f.driverName
		if f.node.StateDir == "" {
			f.node.StateDir = filepath.Join(f.node.KubeletDir, "plugins", f.driverName, "volumes")
		}
		node, nodeReady, stop, err := newNodeService(ctx, f.node, f.attach, m)
		if err != nil {
			return err
		}
		defer stop()
		cfg.Node = node
		ready = append(ready, nodeReady)
	}
	if mode.ServesController() {
		ctrl, ctrlReady, stop, err := newControllerService(ctx, f.driverName, f.controller, m)
		if err != nil {
			return err
		}
		defer stop()
		cfg.Controller = ctrl
		ready = append(ready, ctrlReady)
	}
	cfg.Ready = func(ctx context.Context) error {
		for _, r := range ready {
			if err := r(ctx); err != nil {
				return err
			}
		}
		return nil
	}
	d, err := driver.New(cfg)
	if err != nil {
		return err
	}
	l, err := driver.Listen(f.endpoint)
	if err != nil {
		return err
	}
	if f.health != "" {
		stop, err := serveHealth(ctx, f.health, cfg.Ready, m.Handler())
		if err != nil {
			l.Close()
			return err
		}
		defer stop()
	}
	return d.Serve(ctx, l, f.grace)
}

// serveHealth answers GET /healthz (alive) and GET /readyz (what Probe
// says, with the reason when not ready), for kubelet's liveness and
// readiness probes without a livenessprobe sidecar, and GET /metrics. A
// node whose kernel cannot attach is thus not Ready, with the reason in the
// pod's events, instead of being restarted in a loop.
func serveHealth(ctx context.Context, addr string, ready driver.ReadyFunc, metricsHandler http.Handler) (func(), error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--health-address: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	if metricsHandler != nil {
		mux.Handle("GET /metrics", metricsHandler)
	}
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		rctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		if ready != nil {
			if err := ready(rctx); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.FromContext(ctx).Error(err, "Health endpoint stopped", "address", addr)
		}
	}()
	return func() { srv.Close() }, nil
}
