// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/crypt"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// plugin is an `nbd-csi serve --mode=node` process and a CSI client to it.
type plugin struct {
	t        *testing.T
	bin      string
	args     []string
	endpoint string
	cmd      *exec.Cmd
	exited   chan error
	conn     *grpc.ClientConn
	node     csi.NodeClient
	ident    csi.IdentityClient
}

// pluginBinary returns the nbd-csi binary the rig put in the VM
// (NBDCSI_BIN, set by hack/vm-test.sh).
func pluginBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("NBDCSI_BIN")
	if bin == "" {
		if os.Getenv("NBDCSI_IN_VM") == "1" {
			t.Fatal("NBDCSI_BIN is not set in the VM (hack/vm-test.sh sets it)")
		}
		t.Skip("NBDCSI_BIN not set: build bin/nbd-csi and point NBDCSI_BIN at it")
	}
	return bin
}

func startPlugin(t *testing.T, kubelet, state string) *plugin {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	p := &plugin{t: t, bin: pluginBinary(t), endpoint: "unix://" + sock,
		args: []string{"serve", "--mode=node", "--endpoint=unix://" + sock, "--node-id=vm", "--kubelet-dir=" + kubelet,
			"--state-dir=" + state, "--skip-modprobe", "--health-poll-interval=1s", "-v=4"}}
	p.start()
	conn, err := grpc.NewClient(p.endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	p.conn, p.node, p.ident = conn, csi.NewNodeClient(conn), csi.NewIdentityClient(conn)
	t.Cleanup(func() {
		conn.Close()
		p.kill()
	})
	p.waitReady()
	return p
}

func (p *plugin) start() {
	p.t.Helper()
	p.cmd = exec.Command(p.bin, p.args...)
	p.cmd.Stdout, p.cmd.Stderr = os.Stderr, os.Stderr
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.exited = make(chan error, 1)
	go func(c *exec.Cmd, ch chan error) { ch <- c.Wait() }(p.cmd, p.exited)
}

func (p *plugin) waitReady() {
	p.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := p.ident.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("plugin not ready: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kill sends SIGKILL and waits for the process to end.
func (p *plugin) kill() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// terminate sends SIGTERM and returns the exit error.
func (p *plugin) terminate() error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.exited:
		return err
	case <-time.After(40 * time.Second):
		p.t.Fatal("plugin did not exit after SIGTERM")
		return nil
	}
}

// backendAttached reports whether a started device carries the backend
// identifier id (read from sysfs, as the kernel reports it).
func backendAttached(t *testing.T, id string) bool {
	t.Helper()
	files, _ := filepath.Glob("/sys/block/nbd*/backend")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err == nil && strings.TrimSpace(string(b)) == id {
			if _, err := os.Stat(filepath.Join(filepath.Dir(f), "pid")); err == nil {
				return true
			}
		}
	}
	return false
}

// TestKernelPluginKilled: the node plugin process is killed with SIGKILL
// while a writer runs on a published volume; the writer never sees an
// error, a new process adopts the volume, and unpublish/unstage work
// through it. SIGTERM leaves the volume attached too.
//
// With kernel TLS (tls-kernel) the kernel holds the TLS session, so I/O goes
// on with no plugin, as for a plaintext volume. With the relay (tls-relay)
// the kernel's socket is one end of a pair relayed by the plugin, so the
// kill cuts the connection and I/O stalls until the new process reconnects
// it with the TLS material it kept, within the dead-connection timeout. The
// test logs how long the writer stood still in each case.
func TestKernelPluginKilled(t *testing.T) {
	t.Run("plain", func(t *testing.T) { pluginKilled(t, false, false) })
	t.Run("tls-kernel", func(t *testing.T) { pluginKilledTLS(t, driver.TLSKernel) })
	t.Run("tls-relay", func(t *testing.T) { pluginKilledTLS(t, driver.TLSRelay) })
	// Encrypted: the LUKS mapping lives in the kernel too; the restarted
	// plugin finds it by its name (health shows no MappingMissing) and
	// closes it at unstage.
	t.Run("encrypted", func(t *testing.T) { pluginKilled(t, false, true) })
}

func pluginKilled(t *testing.T, useTLS, encrypted bool) { pluginKilledMode(t, useTLS, encrypted, "") }

func pluginKilledTLS(t *testing.T, mode string) { pluginKilledMode(t, true, false, mode) }

func pluginKilledMode(t *testing.T, useTLS, encrypted bool, tlsMode string) {
	requireKernel(t)
	root := t.TempDir()
	kubelet, state := filepath.Join(root, "kubelet"), filepath.Join(root, "state")
	img := backingFile(t, 256<<20)
	vc := map[string]string{driver.KeyDeadConnectionTimeout: "60s", driver.KeyTimeout: "5s"}
	var secrets map[string]string
	if useTLS {
		certs := servers.GenerateCerts(t)
		srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "file", "file="+img)
		vc[driver.KeyURI] = srv.TLSURI("")
		vc[driver.KeyTLS] = tlsMode
		ca, err := os.ReadFile(certs.CAFile)
		if err != nil {
			t.Fatal(err)
		}
		secrets = map[string]string{driver.SecretCA: string(ca)}
	} else {
		srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
		vc[driver.KeyURI] = srv.URI("")
	}
	if encrypted {
		vc[driver.KeyEncrypted] = "true"
		secrets = map[string]string{driver.SecretEncryptionPassphrase: "plugin-kill-pass"}
	}
	p := startPlugin(t, kubelet, state)
	ctx := context.Background()
	vol := "plugin-kill"
	staging := kubeletStaging(kubelet, vol)
	target := filepath.Join(kubelet, "pods", "pod1", "volumes", "kubernetes.io~csi", vol, "mount")
	c := fsCap("ext4")
	if _, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging,
		VolumeCapability: c, VolumeContext: vc, Secrets: secrets}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: c}); err != nil {
		t.Fatal(err)
	}
	w := startWriter(t, filepath.Join(target, "log"))
	w.waitRecords(t, 20, time.Minute)
	if useTLS {
		// `nbd-csi devices --state-dir` shows how the plugin encrypts it.
		out, err := exec.Command(pluginBinary(t), "devices", "--json", "--state-dir", state).Output()
		if err != nil {
			t.Fatalf("devices: %v", err)
		}
		var devs []struct {
			BackendID string `json:"backend_id"`
			TLS       string `json:"tls"`
		}
		if err := json.Unmarshal(out, &devs); err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(devs, func(d struct {
			BackendID string `json:"backend_id"`
			TLS       string `json:"tls"`
		}) bool {
			return d.BackendID == "nbd-csi:"+vol
		})
		if i < 0 || devs[i].TLS != tlsMode {
			t.Errorf("devices --state-dir: %s; want tls %q for the volume", out, tlsMode)
		}
	}

	killed := time.Now()
	atKill := w.records.Load()
	p.kill()
	if !useTLS || tlsMode == driver.TLSKernel {
		// Plain NBD or kernel TLS: the kernel talks to the server
		// directly, so I/O goes on with no plugin process at all.
		w.waitRecords(t, w.records.Load()+20, time.Minute)
		gap := w.maxGapSince(killed)
		t.Logf("plugin dead: %d records written in %v without it; longest pause between records %v", w.records.Load()-atKill, time.Since(killed).Round(time.Millisecond), gap.Round(time.Millisecond))
	} else {
		// The relay died with the plugin: I/O stands still until the
		// next process reconnects.
		time.Sleep(5 * time.Second)
		if progressed := w.records.Load() - atKill; progressed > 2 {
			t.Errorf("relayed TLS volume wrote %d records with no plugin (expected a stall)", progressed)
		}
	}
	restarted := time.Now()
	p.start()
	p.waitReady()
	w.waitRecords(t, w.records.Load()+20, time.Minute)
	if tlsMode == driver.TLSRelay {
		t.Logf("relay: I/O stalled from the kill (%v before the restart) until %v after the restart; longest pause between records %v",
			restarted.Sub(killed).Round(time.Millisecond), w.resumedAfter(restarted).Round(time.Millisecond), w.maxGapSince(killed).Round(time.Millisecond))
	}
	h, err := p.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: vol})
	if err != nil || len(h.VolumeHealth.HealthStatuses) != 0 {
		t.Errorf("health after restart: %v, %v", h, err)
	}

	// Graceful shutdown never detaches.
	if err := p.terminate(); err != nil {
		t.Errorf("plugin exit after SIGTERM: %v", err)
	}
	if !backendAttached(t, "nbd-csi:"+vol) {
		t.Fatal("SIGTERM detached the volume")
	}
	p.start()
	p.waitReady()
	got := w.finish(t)
	t.Logf("writer acknowledged %d records across SIGKILL and SIGTERM of the plugin", got)

	if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if backendAttached(t, "nbd-csi:"+vol) {
		t.Error("device still attached after unstage by the new process")
	}
	if _, err := os.Stat(filepath.Join("/dev/mapper", crypt.MapperName(vol))); encrypted && !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the LUKS mapping is still there after unstage by the new process (%v)", err)
	}
}
