// SPDX-License-Identifier: Apache-2.0

// Command registrar registers a CSI driver with the kubelet through the
// plugin registration API, as csi-node-driver-registrar does, for the e2e
// rig's offline nodes (that image cannot be fetched or built here). It asks
// the driver for its name (GetPluginInfo on --csi-address), serves the
// Registration service on <--plugin-registration-dir>/<name>-reg.sock, and
// exits when the kubelet reports a failed registration. It accepts the
// flags the chart passes to the upstream registrar.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type server struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (s *server) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: s.name, Endpoint: s.endpoint, SupportedVersions: []string{"1.0.0"}}, nil
}

func (s *server) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		fmt.Fprintf(os.Stderr, "registrar: kubelet refused %s: %s\n", s.name, st.Error)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "registrar: kubelet registered %s at %s\n", s.name, s.endpoint)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "the driver's CSI socket, as this container sees it")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's CSI socket, as the kubelet sees it")
	regDir := flag.String("plugin-registration-dir", "/registration", "the kubelet's plugin registration directory")
	flag.Int("v", 0, "log verbosity (accepted for compatibility)")
	flag.Duration("timeout", time.Second, "accepted for compatibility")
	httpEndpoint := flag.String("http-endpoint", "", "serve GET /healthz here: 200 while the registration socket exists, as the upstream registrar does")
	flag.Parse()
	if *kubeletPath == "" {
		fmt.Fprintln(os.Stderr, "registrar: --kubelet-registration-path is required")
		os.Exit(2)
	}
	name, err := driverName(*csiAddress)
	if err != nil {
		fmt.Fprintln(os.Stderr, "registrar:", err)
		os.Exit(1)
	}
	sock := filepath.Join(*regDir, name+"-reg.sock")
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "registrar:", err)
		os.Exit(1)
	}
	if *httpEndpoint != "" {
		go serveHealth(*httpEndpoint, sock)
	}
	g := grpc.NewServer()
	registerapi.RegisterRegistrationServer(g, &server{name: name, endpoint: *kubeletPath})
	go func() {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
		<-sigs
		g.Stop()
		_ = os.Remove(sock)
		os.Exit(0)
	}()
	fmt.Fprintf(os.Stderr, "registrar: serving registration of %s on %s\n", name, sock)
	if err := g.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "registrar:", err)
		os.Exit(1)
	}
}

// serveHealth answers GET /healthz with 200 while the registration socket
// exists, 503 otherwise.
func serveHealth(addr, sock string) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if _, err := os.Stat(sock); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, "registrar: http endpoint:", err)
		os.Exit(1)
	}
}

// driverName asks the driver for its name, retrying until it answers.
func driverName(addr string) (string, error) {
	conn, err := grpc.NewClient("unix://"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	var last error
	for range 120 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			return info.GetName(), nil
		}
		last = err
		time.Sleep(time.Second)
	}
	return "", fmt.Errorf("GetPluginInfo on %s: %w", addr, last)
}
