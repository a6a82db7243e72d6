// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/internal/servers"
)

// fdCount counts the open descriptors of process pid.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestIntegrationHealthPortIdleConnections: the health port is on every
// node's host network. 300 idle connections to it, against a plugin limited
// to 256 descriptors, must neither exhaust its descriptors nor stop the CSI
// socket from answering; the process's descriptor count stays bounded by
// --health-max-connections.
func TestIntegrationHealthPortIdleConnections(t *testing.T) {
	dir := t.TempDir()
	port, err := servers.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	sock := filepath.Join(dir, "csi.sock")
	cmd := startServe(t, sock, "--mode=node", "--node-id=n1", "--kubelet-dir="+filepath.Join(dir, "kubelet"),
		"--state-dir="+filepath.Join(dir, "state"), "--skip-modprobe", "--health-address="+addr)
	pid := cmd.Process.Pid
	lim := unix.Rlimit{Cur: 256, Max: 256}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &lim, nil); err != nil {
		t.Fatalf("prlimit: %v", err)
	}
	identity := csi.NewIdentityClient(dialCSI(t, sock))
	call := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := identity.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		return err
	}
	if err := call(); err != nil {
		t.Fatalf("CSI call before: %v", err)
	}
	before := fdCount(t, pid)

	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < 300; i++ {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	time.Sleep(500 * time.Millisecond) // let the server accept what it will
	during := fdCount(t, pid)
	t.Logf("descriptors of the plugin: %d before, %d with 300 idle health connections", before, during)
	if during > before+16+4 {
		t.Errorf("descriptors grew from %d to %d with 300 idle connections; want at most the connection limit (16) more", before, during)
	}
	// A new CSI connection (as the kubelet makes) is accepted and answered.
	identity = csi.NewIdentityClient(dialCSI(t, sock))
	start := time.Now()
	if err := call(); err != nil {
		t.Errorf("CSI call on a new connection with 300 idle health connections: %v", err)
	}
	t.Logf("CSI call answered in %v", time.Since(start))

	// The idle connections are closed by the server after the header
	// timeout, and the health endpoint serves again.
	var resp *http.Response
	client := &http.Client{Timeout: 20 * time.Second}
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	resp, err = client.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatalf("/healthz after the idle connections: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "ok") {
		t.Errorf("/healthz = %d %q", resp.StatusCode, body)
	}
}

// TestHealthzFollowsCSIServer: /healthz answers 200 while the CSI server
// answers and 503 when its endpoint accepts connections but never answers
// (a wedged gRPC server).
func TestHealthzFollowsCSIServer(t *testing.T) {
	dir := t.TempDir()
	wedged := filepath.Join(dir, "wedged.sock")
	l, err := net.Listen("unix", wedged)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c) // accepted, never answered
		}
	}()
	get := func(endpoint string) (int, string) {
		t.Helper()
		port, err := servers.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		stop, err := serveHealth(ctx, healthConfig{addr: addr, csiEndpoint: endpoint})
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
		resp, err := (&http.Client{Timeout: 20 * time.Second}).Get("http://" + addr + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("unix://" + wedged); code != http.StatusServiceUnavailable {
		t.Errorf("/healthz with a wedged CSI server: %d %q, want 503", code, body)
	}

	sock := filepath.Join(dir, "csi.sock")
	startServe(t, sock, "--mode=node", "--node-id=n1", "--kubelet-dir="+filepath.Join(dir, "kubelet"),
		"--state-dir="+filepath.Join(dir, "state"), "--skip-modprobe")
	if code, body := get("unix://" + sock); code != http.StatusOK {
		t.Errorf("/healthz with a live CSI server: %d %q, want 200", code, body)
	}
}
