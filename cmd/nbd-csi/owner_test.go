// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// startServe runs `nbd-csi serve` with args until the test ends and waits
// for its socket; it returns the process.
func startServe(t *testing.T, sock string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(nbdcsiBinary(t), append([]string{"serve", "--endpoint=unix://" + sock}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("nbd-csi serve stderr:\n%s", stderr.String())
		}
	})
	for i := 0; ; i++ {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return cmd
		}
		select {
		case <-done:
			t.Fatalf("nbd-csi serve exited: %s", stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if i > 500 {
			t.Fatal("nbd-csi serve did not create its socket")
		}
	}
}

func dialCSI(t *testing.T, sock string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// mountTmpfs mounts a tmpfs at dir (made if missing) for the test.
func mountTmpfs(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount tmpfs at %s: %v", dir, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
}

// isMountPoint reports whether dir is the root of a mount (its device
// differs from its parent's).
func isMountPoint(t *testing.T, dir string) bool {
	t.Helper()
	var st, pst unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatalf("stat %s: %v", dir, err)
	}
	if err := unix.Stat(filepath.Dir(dir), &pst); err != nil {
		t.Fatal(err)
	}
	return st.Dev != pst.Dev
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o640); err != nil {
		t.Fatal(err)
	}
}

func fileHas(t *testing.T, path, content string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil || string(b) != content {
		t.Errorf("%s: %q, %v; want it untouched with %q", path, b, err, content)
	}
}

// TestIntegrationNodeOwnership runs `nbd-csi serve --mode=node` on this host
// (no nbd module needed) and sends it node RPCs that name paths it does
// not own: outside the kubelet directory, climbing out with "..", through
// symlinks, other drivers' and volumes' kubelet paths, and a volume never
// staged. Real tmpfs mounts and files stand in for what must not be
// touched.
func TestIntegrationNodeOwnership(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("NBDCSI_REQUIRE_SERVERS") == "1" {
			t.Fatal("needs root for tmpfs mounts (make test runs as root in CI)")
		}
		t.Skip("needs root for tmpfs mounts")
	}
	dir := t.TempDir()
	kubelet := filepath.Join(dir, "kubelet")
	outside := filepath.Join(dir, "outside")
	sock := filepath.Join(dir, "csi.sock")
	startServe(t, sock, "--mode=node", "--node-id=n1", "--kubelet-dir="+kubelet,
		"--state-dir="+filepath.Join(dir, "state"), "--skip-modprobe", "--orphan-grace-period=0")
	node := csi.NewNodeClient(dialCSI(t, sock))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	podTarget := func(uid, pv string) string {
		return filepath.Join(kubelet, "pods", uid, "volumes", "kubernetes.io~csi", pv, "mount")
	}
	staging := func(vol string) string {
		h := sha256.Sum256([]byte(vol))
		return filepath.Join(kubelet, "plugins", "kubernetes.io", "csi", driver.DefaultDriverName, hex.EncodeToString(h[:]), "globalmount")
	}
	unpublish := func(vol, target string) error {
		_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
		return err
	}
	unstage := func(vol, path string) error {
		_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: path})
		return err
	}
	wantCode := func(t *testing.T, what string, err error, want codes.Code) {
		t.Helper()
		if status.Code(err) != want {
			t.Errorf("%s: %v, want %s", what, err, want)
		}
	}

	t.Run("unpublish of a file outside the kubelet directory", func(t *testing.T) {
		f := filepath.Join(outside, "precious.txt")
		writeFile(t, f, "data")
		wantCode(t, "unpublish", unpublish("never-staged", f), codes.InvalidArgument)
		fileHas(t, f, "data")
	})
	t.Run("unpublish climbing out of pods with ..", func(t *testing.T) {
		foreign := filepath.Join(outside, "foreign-tmpfs")
		mountTmpfs(t, foreign)
		if err := os.MkdirAll(podTarget("uid1", "pv1"), 0o750); err != nil {
			t.Fatal(err)
		}
		climb := podTarget("uid1", "pv1") + "/../../../../../../../outside/foreign-tmpfs"
		if filepath.Clean(climb) != foreign {
			t.Fatalf("%s does not climb to %s", climb, foreign)
		}
		wantCode(t, "unpublish", unpublish("never-staged", climb), codes.InvalidArgument)
		if !isMountPoint(t, foreign) {
			t.Errorf("%s was unmounted", foreign)
		}
	})
	t.Run("unpublish of a target symlinked outside", func(t *testing.T) {
		foreign := filepath.Join(outside, "linked-tmpfs")
		mountTmpfs(t, foreign)
		target := podTarget("uid2", "pv2")
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(foreign, target); err != nil {
			t.Fatal(err)
		}
		wantCode(t, "unpublish", unpublish("never-staged", target), codes.InvalidArgument)
		if !isMountPoint(t, foreign) {
			t.Errorf("%s was unmounted", foreign)
		}
		if fi, err := os.Lstat(target); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Errorf("symlink %s: %v, %v; want it left", target, fi, err)
		}
		// The same through a symlinked parent directory.
		linkedPods := filepath.Join(kubelet, "pods", "uid3")
		if err := os.Symlink(outside, linkedPods); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(outside, "volumes", "kubernetes.io~csi", "pv3", "mount"), "data")
		wantCode(t, "unpublish via a symlinked pod directory", unpublish("never-staged", podTarget("uid3", "pv3")), codes.InvalidArgument)
		fileHas(t, filepath.Join(outside, "volumes", "kubernetes.io~csi", "pv3", "mount"), "data")
	})
	t.Run("publish at a target symlinked outside", func(t *testing.T) {
		target := podTarget("uid4", "pv4")
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(outside, "publish-here"), target); err != nil {
			t.Fatal(err)
		}
		_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "v4", StagingTargetPath: staging("v4"),
			TargetPath: target, VolumeCapability: &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}})
		wantCode(t, "publish", err, codes.InvalidArgument)
		if _, err := os.Lstat(filepath.Join(outside, "publish-here")); err == nil {
			t.Errorf("publish created %s", filepath.Join(outside, "publish-here"))
		}
	})
	t.Run("unpublish of a regular file at a kubelet target path", func(t *testing.T) {
		target := filepath.Join(kubelet, "plugins", "kubernetes.io", "csi", "volumeDevices", "publish", "pv5", "uid5")
		writeFile(t, target, "not ours")
		if err := unpublish("never-staged", target); err != nil {
			t.Errorf("unpublish of a volume never published there: %v, want OK", err)
		}
		fileHas(t, target, "not ours")
	})
	t.Run("unpublish of a mount nothing ties to the volume", func(t *testing.T) {
		target := podTarget("uid6", "pv6")
		mountTmpfs(t, target)
		wantCode(t, "unpublish with no record", unpublish("never-staged", target), codes.FailedPrecondition)
		if !isMountPoint(t, target) {
			t.Errorf("%s was unmounted", target)
		}
		writeFile(t, filepath.Join(filepath.Dir(target), "vol_data.json"), `{"driverName":"other.csi.example.com","volumeHandle":"never-staged"}`)
		wantCode(t, "unpublish of another driver's target", unpublish("never-staged", target), codes.InvalidArgument)
		if !isMountPoint(t, target) {
			t.Errorf("%s was unmounted", target)
		}
		// The kubelet's record naming this driver and volume makes it ours.
		writeFile(t, filepath.Join(filepath.Dir(target), "vol_data.json"),
			`{"driverName":"`+driver.DefaultDriverName+`","volumeHandle":"never-staged"}`)
		if err := unpublish("never-staged", target); err != nil {
			t.Fatalf("unpublish of our target: %v", err)
		}
		if _, err := os.Lstat(target); err == nil {
			t.Errorf("%s still exists after unpublish", target)
		}
	})
	t.Run("unstage outside the kubelet directory", func(t *testing.T) {
		foreign := filepath.Join(outside, "staging-tmpfs")
		mountTmpfs(t, foreign)
		wantCode(t, "unstage", unstage("never-staged", foreign), codes.InvalidArgument)
		if !isMountPoint(t, foreign) {
			t.Errorf("%s was unmounted", foreign)
		}
		wantCode(t, "unstage at another volume's staging path", unstage("never-staged", staging("other")), codes.InvalidArgument)
	})
	t.Run("unstage of a volume never staged", func(t *testing.T) {
		if err := unstage("never-staged", staging("never-staged")); err != nil {
			t.Errorf("unstage: %v, want OK (nothing to undo)", err)
		}
	})
	t.Run("stats and expand outside", func(t *testing.T) {
		_, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "v", VolumePath: outside})
		wantCode(t, "stats", err, codes.NotFound)
		_, err = node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: "v", VolumePath: outside})
		wantCode(t, "expand", err, codes.NotFound)
	})
}

// TestIntegrationServeEndpoint: serve removes a stale socket at its
// endpoint, but never a regular file, and never a socket another process
// listens on.
func TestIntegrationServeEndpoint(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "regular")
	writeFile(t, file, "keep me")
	cmd := exec.Command(nbdcsiBinary(t), "serve", "--mode=node", "--endpoint=unix://"+file, "--node-id=n1",
		"--kubelet-dir="+filepath.Join(dir, "kubelet"), "--state-dir="+filepath.Join(dir, "state"), "--skip-modprobe")
	out, err := runBounded(cmd)
	if err == nil {
		t.Errorf("serve on a regular file's path succeeded:\n%s", out)
	}
	fileHas(t, file, "keep me")

	live := filepath.Join(dir, "live.sock")
	l, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cmd = exec.Command(nbdcsiBinary(t), "serve", "--mode=node", "--endpoint=unix://"+live, "--node-id=n1",
		"--kubelet-dir="+filepath.Join(dir, "kubelet"), "--state-dir="+filepath.Join(dir, "state"), "--skip-modprobe")
	if out, err := runBounded(cmd); err == nil || !strings.Contains(out, "listening") {
		t.Errorf("serve on a live socket: %v\n%s", err, out)
	}
	if c, err := net.Dial("unix", live); err != nil {
		t.Errorf("the live socket's owner lost it: %v", err)
	} else {
		c.Close()
	}

	// A stale socket (nobody listens) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	sl, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	sl.(*net.UnixListener).SetUnlinkOnClose(false)
	sl.Close()
	startServe(t, stale, "--mode=node", "--node-id=n1", "--kubelet-dir="+filepath.Join(dir, "kubelet"),
		"--state-dir="+filepath.Join(dir, "state2"), "--skip-modprobe")
}

// runBounded runs cmd for at most 30 s and returns its combined output.
func runBounded(cmd *exec.Cmd) (string, error) {
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.String(), err
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		return out.String(), nil // still serving: counts as success for the caller
	}
}
