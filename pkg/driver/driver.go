// SPDX-License-Identifier: Apache-2.0

// Package driver is the CSI layer of nbd-csi: identity, node and controller
// services. It validates requests, serialises operations per volume, maps
// errors to gRPC codes once, and logs; NBD and kernel work happens in
// pkg/nbd, pkg/device and pkg/attach.
package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
)

// Mode selects which CSI services a process serves.
type Mode string

// Modes.
const (
	ModeController Mode = "controller"
	ModeNode       Mode = "node"
	ModeAll        Mode = "all"
)

// ParseMode parses a --mode value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeController, ModeNode, ModeAll:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: want controller, node or all", s)
}

// ServesNode reports whether the mode includes the node service.
func (m Mode) ServesNode() bool { return m == ModeNode || m == ModeAll }

// ServesController reports whether the mode includes the controller service.
func (m Mode) ServesController() bool { return m == ModeController || m == ModeAll }

// ReadyFunc reports whether a service can do its work; the error says why
// not. Probe calls it.
type ReadyFunc func(ctx context.Context) error

// Driver is one nbd-csi gRPC server.
type Driver struct {
	name, version string
	endpoint      string
	mode          Mode
	identity      *IdentityService
	node          csi.NodeServer
	controller    csi.ControllerServer
	interceptors  []grpc.UnaryServerInterceptor
}

// Config assembles a Driver. Services not served by Mode must be nil.
type Config struct {
	// Name is the CSI driver name.
	Name string
	// Version is reported by GetPluginInfo.
	Version string
	// Endpoint is unix:///path/csi.sock or tcp://host:port.
	Endpoint string
	// Mode selects the services.
	Mode Mode
	// Node and Controller are the services for the mode.
	Node       csi.NodeServer
	Controller csi.ControllerServer
	// Ready checks whether the served services can work (Probe).
	Ready ReadyFunc
	// Interceptors run around every call, after the logging one (metrics).
	Interceptors []grpc.UnaryServerInterceptor
}

// New checks cfg and builds a driver.
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" || cfg.Version == "" || cfg.Endpoint == "" {
		return nil, errors.New("driver name, version and endpoint are required")
	}
	if cfg.Mode.ServesNode() != (cfg.Node != nil) {
		return nil, fmt.Errorf("mode %s: node service given=%v", cfg.Mode, cfg.Node != nil)
	}
	if cfg.Mode.ServesController() != (cfg.Controller != nil) {
		return nil, fmt.Errorf("mode %s: controller service given=%v", cfg.Mode, cfg.Controller != nil)
	}
	d := &Driver{name: cfg.Name, version: cfg.Version, endpoint: cfg.Endpoint, mode: cfg.Mode,
		node: cfg.Node, controller: cfg.Controller, interceptors: cfg.Interceptors}
	d.identity = &IdentityService{name: cfg.Name, version: cfg.Version, controller: cfg.Mode.ServesController(), ready: cfg.Ready}
	return d, nil
}

// Listen opens the endpoint. A stale unix socket left by a previous run is
// removed first; anything else at the path is left alone and is an error.
func Listen(endpoint string) (net.Listener, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	switch u.Scheme {
	case "unix":
		path := u.Path
		if path == "" {
			path = u.Opaque
		}
		if path == "" {
			return nil, fmt.Errorf("endpoint %q has no socket path", endpoint)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
			return nil, err
		}
		if err := removeStaleSocket(path); err != nil {
			return nil, err
		}
		return net.Listen("unix", path)
	case "tcp":
		return net.Listen("tcp", u.Host)
	}
	return nil, fmt.Errorf("endpoint %q: scheme must be unix or tcp", endpoint)
}

// removeStaleSocket removes path if it is a unix socket nobody listens on.
// A path that is not a socket (a regular file, a directory...) or a socket
// another process serves is an error: Listen must never delete what it did
// not make, nor steal a live endpoint.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("endpoint %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("endpoint %s exists and is not a socket (%s); not removing it", path, fi.Mode().Type())
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("endpoint %s: another process is listening on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("endpoint %s: cannot tell whether the socket is stale: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// Serve serves CSI on l until ctx ends, then stops gracefully (bounded by
// grace). It never touches attached volumes: devices outlive the plugin.
func (d *Driver) Serve(ctx context.Context, l net.Listener, grace time.Duration) error {
	logger := klog.FromContext(ctx)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(append([]grpc.UnaryServerInterceptor{logInterceptor(logger)}, d.interceptors...)...))
	csi.RegisterIdentityServer(srv, d.identity)
	if d.node != nil {
		csi.RegisterNodeServer(srv, d.node)
	}
	if d.controller != nil {
		csi.RegisterControllerServer(srv, d.controller)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	logger.Info("Serving CSI", "driver", d.name, "version", d.version, "mode", d.mode, "endpoint", l.Addr().String())
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	logger.Info("Shutting down; attached volumes stay attached")
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		srv.Stop()
	}
	return nil
}
