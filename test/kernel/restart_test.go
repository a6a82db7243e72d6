// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/attach"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// expandUntilAdopted calls NodeExpandVolume until the restarted plugin has
// finished adopting the volume (Aborted, then Unavailable until then).
func expandUntilAdopted(t *testing.T, n *node, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		resp, err := n.svc.NodeExpandVolume(ctx, req)
		cancel()
		if c := status.Code(err); (c != codes.Unavailable && c != codes.Aborted) || time.Now().After(deadline) {
			return resp, err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestKernelExpandAfterRestart: the export grows after the node plugin
// restarted. The restarted plugin does not know the kernel's connections
// (negotiated at the old size), so it cannot renew them: NodeExpandVolume
// must answer FailedPrecondition (as docs/operations.md says) and the
// mounted filesystem must go on working — never grow over connections that
// refuse I/O past the old end (EIO). Before, Adopt's reconnect kept copies
// of sockets the kernel ignored and Resize "renewed" those, then grew the
// filesystem.
func TestKernelExpandAfterRestart(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs", "block"} {
		t.Run(fs, func(t *testing.T) {
			n := newNode(t)
			img := backingFile(t, 320<<20)
			srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
			vol := "expand-restart-" + fs
			vc := map[string]string{driver.KeyURI: srv.URI(""), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s"}
			c := blockCap()
			if fs != "block" {
				c = fsCap(fs)
			}
			target := n.stagePublish(vol, c, vc)
			var w *writer
			var head []byte
			if fs == "block" {
				head = randomBytes(t, 4096)
				write(t, target, true, head)
			} else {
				w = startWriter(t, filepath.Join(target, "log"))
				w.waitRecords(t, 10, time.Minute)
			}
			n.stop()
			n.start()
			if err := os.Truncate(img, 640<<20); err != nil {
				t.Fatal(err)
			}
			req := &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 640 << 20}, VolumeCapability: c}
			if fs != "block" {
				req.StagingTargetPath = n.staging(vol)
			}
			resp, err := expandUntilAdopted(t, n, req)
			switch {
			case status.Code(err) == codes.FailedPrecondition && strings.Contains(err.Error(), "cannot end all of them"):
				t.Logf("refused honestly: %v", err)
			case err == nil:
				t.Logf("grew to %d bytes", resp.CapacityBytes)
			default:
				t.Fatalf("NodeExpandVolume after a restart: %v", err)
			}
			if fs == "block" {
				// I/O at both ends of what the device offers works.
				size := deviceSize(t, target)
				tail := randomBytes(t, 4096)
				writeAt(t, target, tail, size-4096)
				if got := read(t, target, true, 4096); !bytes.Equal(got, head) {
					t.Error("first block changed")
				}
			} else {
				w.waitRecords(t, w.records.Load()+10, time.Minute)
				got := w.finish(t)
				t.Logf("writer acknowledged %d records, no I/O error", got)
			}
			n.unpublishUnstage(vol, target)
		})
	}
}

// TestKernelRestageDuringAdoptBackoff: the plugin restarts while the
// server is down, so adoption waits in its backoff; meanwhile the volume
// is unstaged and staged again (on a new device once the server is back).
// The old adoption must end with the unstage: the new device is supervised
// and healthy, and nothing touches it. Before, adoptLater's goroutine
// replaced the live watch with one on the old device.
func TestKernelRestageDuringAdoptBackoff(t *testing.T) {
	n := newNode(t)
	img := backingFile(t, 64<<20)
	srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
	vol := "restage"
	vc := map[string]string{driver.KeyURI: srv.URI(""), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "60s"}
	target := n.stagePublish(vol, blockCap(), vc)
	n.stop()
	srv.Stop()
	n.start()
	time.Sleep(2 * time.Second) // adoption fails and backs off
	n.unpublishUnstage(vol, target)
	if backendAttached(t, attach.BackendID(vol)) {
		t.Fatal("device still attached after unstage")
	}
	srv.Start()
	target = n.stagePublish(vol, blockCap(), vc)
	data := randomBytes(t, 4096)
	write(t, target, true, data)
	time.Sleep(8 * time.Second) // longer than the adoption backoff
	if got := read(t, target, true, 4096); !bytes.Equal(got, data) {
		t.Error("data read back differs")
	}
	waitHealth(t, n, vol, csi.VolumeHealthErrorType_UNKNOWN_VOLUME_HEALTH_TYPE, 5*time.Second)
	if healthy, degraded := n.att.Health(); healthy != 1 || degraded != 0 {
		t.Errorf("attacher health = %d healthy, %d degraded; want 1, 0", healthy, degraded)
	}
	// The new device keeps working through a server restart: supervised.
	srv.Kill()
	srv.Start()
	if got := read(t, target, true, 4096); !bytes.Equal(got, data) {
		t.Error("data read back after the server restart differs")
	}
	n.unpublishUnstage(vol, target)
}

// serverConnections counts a server process's established TCP
// connections (its socket descriptors that /proc/net/tcp shows in state
// ESTABLISHED).
func serverConnections(t *testing.T, pid int) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	inodes := map[string]bool{}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join(dir, e.Name()))
		if ino, ok := strings.CutPrefix(l, "socket:["); err == nil && ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	n := 0
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) >= 10 && inodes[fs[9]] && fs[3] == "01" {
				n++
			}
		}
	}
	return n
}

// TestKernelRestartDuringOutage: 16 block volumes on one server; the
// plugin is killed, the server frozen (SIGSTOP) and I/O issued on every
// device; the kernel declares the connections dead after the request
// timeout while no plugin listens. The restarted plugin must answer CSI at
// once, and once the server resumes every volume must be reconnected
// within the dead-connection timeout (the waiting I/O completes), leaving
// exactly one connection per volume on the server. Before, start-up
// adopted serially (no CSI answer for minutes), no volume was reconnected
// and all failed with EIO when the dead-connection timeout ran out.
func TestKernelRestartDuringOutage(t *testing.T) {
	requireKernel(t)
	const count = 16
	root := t.TempDir()
	kubelet, state := filepath.Join(root, "kubelet"), filepath.Join(root, "state")
	srv := servers.Nbdkit(t, servers.TCP, "memory", "size=64M")
	vc := map[string]string{driver.KeyURI: srv.URI(""), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s"}
	first := time.Now()
	p := startPlugin(t, kubelet, state)
	fresh := time.Since(first)
	ctx := context.Background()
	targets := make([]string, count)
	for i := range count {
		vol := fmt.Sprintf("outage-%02d", i)
		staging := kubeletStaging(kubelet, vol)
		targets[i] = filepath.Join(kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices", "publish", vol, "pod1")
		if _, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging,
			VolumeCapability: blockCap(), VolumeContext: vc}); err != nil {
			t.Fatal(err)
		}
		if _, err := p.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging,
			TargetPath: targets[i], VolumeCapability: blockCap()}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_, _ = p.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: targets[i]})
			_, _ = p.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging})
		})
	}
	if n := serverConnections(t, srv.PID()); n != count {
		t.Fatalf("%d server connections before the outage, want %d", n, count)
	}

	p.kill()
	if err := syscall.Kill(srv.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = syscall.Kill(srv.PID(), syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)
	// I/O on every device while the server is frozen: it times out, the
	// kernel marks the connections dead and the requests wait for a
	// reconnect.
	var wg sync.WaitGroup
	errs := make([]error, count)
	for i, target := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fd, err := unix.Open(target, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
			if err != nil {
				errs[i] = err
				return
			}
			defer unix.Close(fd)
			// O_DIRECT wants an aligned buffer: a page of its own.
			aligned, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
			if err != nil {
				errs[i] = err
				return
			}
			defer unix.Munmap(aligned)
			_, errs[i] = unix.Pread(fd, aligned, int64(i)*4096)
		}()
	}
	time.Sleep(time.Second)

	start := time.Now()
	p.start()
	p.waitReady()
	ready := time.Since(start)
	cctx, cancel := context.WithTimeout(ctx, time.Second)
	_, err := p.node.NodeGetCapabilities(cctx, &csi.NodeGetCapabilitiesRequest{})
	cancel()
	if err != nil {
		t.Fatalf("restarted plugin does not answer CSI within 1 s: %v", err)
	}
	t.Logf("restarted plugin answered CSI %v after start with %d volumes behind a frozen server (%v when started with none)", ready, count, fresh)
	// Adopting even one volume before serving would wait for a handshake
	// timeout (15 s); the machine's own start-up time is the baseline.
	if ready > fresh+5*time.Second {
		t.Errorf("restarted plugin took %v to answer (%v with no volumes)", ready, fresh)
	}
	time.Sleep(12 * time.Second) // past the 5 s request timeout: connections dead
	resume()
	resumedAt := time.Now()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(100 * time.Second):
		t.Fatal("I/O still waiting 100 s after the server resumed (dead-connection timeout is 120 s)")
	}
	t.Logf("all %d volumes' I/O completed %v after the server resumed", count, time.Since(resumedAt))
	for i, err := range errs {
		if err != nil {
			t.Errorf("volume %d: I/O failed: %v", i, err)
		}
	}
	if holders := deviceHolders(targets); len(holders) > 0 {
		t.Logf("processes holding the devices open: %v", holders)
	}
	// One connection per volume: nothing leaked by adoption.
	deadline := time.Now().Add(30 * time.Second)
	for {
		n := serverConnections(t, srv.PID())
		if n == count {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%d server connections after the recovery, want %d", n, count)
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// deviceHolders lists processes with a descriptor on one of the paths (or
// an nbd device node), for diagnosing an unmount that finds it busy.
func deviceHolders(paths []string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range procs {
		l, err := os.Readlink(fd)
		if err != nil {
			continue
		}
		for _, p := range paths {
			if l == p || strings.HasPrefix(l, "/dev/nbd") {
				cmd, _ := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(fd)), "comm"))
				out = append(out, fmt.Sprintf("%s(%s)→%s", strings.TrimSpace(string(cmd)), fd, l))
				break
			}
		}
	}
	return out
}
