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
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"

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
	// healthMaxConns bounds the health endpoint's connections.
	healthMaxConns int
	node           driver.NodeOptions
	attach         attachFlags
	controller     controllerFlags
}

func (f *serveFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.mode, "mode", "all", "services to serve: controller, node or all")
	fs.StringVar(&f.endpoint, "endpoint", "unix:///csi/csi.sock", "CSI gRPC endpoint: unix:///path or tcp://host:port")
	fs.StringVar(&f.driverName, "driver-name", driver.DefaultDriverName, "CSI driver name (must match the CSIDriver object)")
	fs.DurationVar(&f.grace, "shutdown-grace", 30*time.Second, "how long SIGTERM waits for RPCs in flight (volumes stay attached)")
	fs.StringVar(&f.health, "health-address", "", "serve HTTP on this address (e.g. :9808, or 127.0.0.1:9808 for one address): GET /healthz answers 200 while the CSI server answers; GET /readyz 200 when Probe is ready, else 503 with the reason; GET /metrics Prometheus metrics; empty: off")
	fs.IntVar(&f.healthMaxConns, "health-max-connections", 16, "connections the health endpoint serves at once (more wait in the listen backlog)")

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
	if err := parseFlags(fs, args, "serve [flags]\n\nServes the CSI identity service and, per --mode, the node and/or controller service."); err != nil {
		return err
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
		node, nodeReady, stop, err := newNodeService(ctx, f.node, f.attach, f.controller.store.kubeconfig, m)
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
		stop, err := serveHealth(ctx, healthConfig{addr: f.health, ready: cfg.Ready, metrics: m.Handler(),
			csiEndpoint: f.endpoint, maxConns: f.healthMaxConns})
		if err != nil {
			l.Close()
			return err
		}
		defer stop()
	}
	return d.Serve(ctx, l, f.grace)
}

// healthConfig configures the health endpoint.
type healthConfig struct {
	// addr is --health-address.
	addr string
	// ready backs /readyz.
	ready driver.ReadyFunc
	// metrics, when set, is served at /metrics.
	metrics http.Handler
	// csiEndpoint is the CSI gRPC endpoint /healthz checks.
	csiEndpoint string
	// maxConns bounds the connections served at once (0: 16).
	maxConns int
}

// Bounds of the health endpoint: it listens on every node's host network,
// so a client that opens connections and sends nothing must not be able to
// use up the process's descriptors (and with them the CSI socket).
const (
	healthReadHeaderTimeout = 5 * time.Second
	healthReadTimeout       = 10 * time.Second
	healthWriteTimeout      = 20 * time.Second // /readyz may take 10 s
	healthIdleTimeout       = 30 * time.Second
	healthMaxHeaderBytes    = 8 << 10
	// healthCSITimeout bounds /healthz's call to the CSI server.
	healthCSITimeout = 5 * time.Second
)

// serveHealth answers GET /healthz (alive: the CSI gRPC server answers a
// GetPluginInfo call over its own endpoint within 5 s), GET /readyz (what
// Probe says, with the reason when not ready), for kubelet's liveness and
// readiness probes without a livenessprobe sidecar, and GET /metrics. A
// node whose kernel cannot attach is thus not Ready, with the reason in the
// pod's events, instead of being restarted in a loop; a plugin whose CSI
// server stopped answering is restarted. At most maxConns connections are
// served at once (more wait in the kernel's backlog, holding no descriptor
// of this process), each with read, write and idle timeouts.
func serveHealth(ctx context.Context, hc healthConfig) (func(), error) {
	if hc.maxConns <= 0 {
		hc.maxConns = 16
	}
	csiConn, err := grpc.NewClient(grpcTarget(hc.csiEndpoint), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("--health-address: CSI client for %s: %w", hc.csiEndpoint, err)
	}
	identity := csi.NewIdentityClient(csiConn)
	l, err := net.Listen("tcp", hc.addr)
	if err != nil {
		csiConn.Close()
		return nil, fmt.Errorf("--health-address: %w", err)
	}
	l = netutil.LimitListener(l, hc.maxConns)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		cctx, cancel := context.WithTimeout(r.Context(), healthCSITimeout)
		defer cancel()
		if _, err := identity.GetPluginInfo(cctx, &csi.GetPluginInfoRequest{}); err != nil {
			http.Error(w, "CSI server does not answer: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	if hc.metrics != nil {
		mux.Handle("GET /metrics", hc.metrics)
	}
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		rctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		if hc.ready != nil {
			if err := hc.ready(rctx); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: healthReadHeaderTimeout, ReadTimeout: healthReadTimeout,
		WriteTimeout: healthWriteTimeout, IdleTimeout: healthIdleTimeout, MaxHeaderBytes: healthMaxHeaderBytes}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.FromContext(ctx).Error(err, "Health endpoint stopped", "address", hc.addr)
		}
	}()
	return func() { srv.Close(); csiConn.Close() }, nil
}

// grpcTarget turns a CSI endpoint (unix:///path, tcp://host:port) into a
// gRPC client target.
func grpcTarget(endpoint string) string {
	if rest, ok := strings.CutPrefix(endpoint, "tcp://"); ok {
		return "passthrough:///" + rest
	}
	return endpoint
}
