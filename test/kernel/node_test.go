// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// backingFile returns a sparse file of size bytes for nbdkit's file plugin,
// so that the data can also be checked from the server side and survives a
// server restart.
func backingFile(t *testing.T, size int64) string {
	t.Helper()
	return servers.SparseFile(t, filepath.Join(t.TempDir(), "disk.img"), size)
}

// TestKernelNodeLifecycle: stage → publish → write → unpublish → unstage →
// stage again → the data is still there, for ext4, xfs and raw block.
func TestKernelNodeLifecycle(t *testing.T) {
	n := newNode(t)
	for _, tc := range []struct {
		name string
		cap  *csi.VolumeCapability
	}{{"ext4", fsCap("ext4")}, {"xfs", fsCap("xfs")}, {"block", blockCap()}} {
		t.Run(tc.name, func(t *testing.T) {
			img := backingFile(t, 512<<20)
			srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
			vol := "lifecycle-" + tc.name
			vc := map[string]string{driver.KeyURI: srv.URI("")}
			data := randomBytes(t, 4<<20)

			start := time.Now()
			target := n.stagePublish(vol, tc.cap, vc)
			t.Logf("stage+publish %s: %v", tc.name, time.Since(start))
			write(t, target, tc.cap.GetBlock() != nil, data)
			n.unpublishUnstage(vol, target)
			if _, err := n.att.Lookup(context.Background(), vol); !errors.Is(err, driver.ErrNotAttached) {
				t.Fatalf("device still attached after unstage: %v", err)
			}

			target = n.stagePublish(vol, tc.cap, vc)
			if got := read(t, target, tc.cap.GetBlock() != nil, len(data)); sum(got) != sum(data) {
				t.Fatalf("data changed across unstage/stage")
			}
			if tc.cap.GetBlock() != nil {
				// Raw writes reached the server: compare with the backing file.
				b, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(b[:len(data)], data) {
					t.Fatal("backing file on the server differs from what was written")
				}
			}
			st, err := n.svc.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target})
			if err != nil || len(st.Usage) == 0 || st.Usage[0].Total <= 0 {
				t.Fatalf("stats: %v %v", st, err)
			}
			n.unpublishUnstage(vol, target)
		})
	}
}

// write puts data at the start of the volume: a file for filesystems, the
// raw device for block volumes. It syncs before returning.
func write(t *testing.T, target string, block bool, data []byte) {
	t.Helper()
	path := target
	if !block {
		path = filepath.Join(target, "data")
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, target string, block bool, n int) []byte {
	t.Helper()
	path := target
	if !block {
		path = filepath.Join(target, "data")
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// writer appends 64 KiB records to a file and fsyncs each, until stopped;
// every record carries its sequence number so the file can be verified.
type writer struct {
	path    string
	stop    chan struct{}
	done    chan struct{}
	records atomic.Int64
	err     error

	mu    sync.Mutex
	times []time.Time // when each record was acknowledged
}

// maxGapSince returns the longest time between two acknowledged records
// (or since the last one) from t on.
func (w *writer) maxGapSince(t time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var gap time.Duration
	prev := t
	for _, at := range w.times {
		if at.Before(t) {
			continue
		}
		gap = max(gap, at.Sub(prev))
		prev = at
	}
	return max(gap, time.Since(prev))
}

// resumedAfter returns how long after t the first record was
// acknowledged.
func (w *writer) resumedAfter(t time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, at := range w.times {
		if !at.Before(t) {
			return at.Sub(t)
		}
	}
	return time.Since(t)
}

func startWriter(t *testing.T, path string) *writer {
	t.Helper()
	w := &writer{path: path, stop: make(chan struct{}), done: make(chan struct{})}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(w.done)
		defer f.Close()
		rec := make([]byte, 64<<10)
		for i := int64(0); ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			fill(rec, i)
			if _, err := f.Write(rec); err != nil {
				w.err = fmt.Errorf("record %d: write: %w", i, err)
				return
			}
			if err := f.Sync(); err != nil {
				w.err = fmt.Errorf("record %d: fsync: %w", i, err)
				return
			}
			w.mu.Lock()
			w.times = append(w.times, time.Now())
			w.mu.Unlock()
			w.records.Store(i + 1)
		}
	}()
	return w
}

func fill(rec []byte, i int64) {
	for j := range rec {
		rec[j] = byte(i*31 + int64(j)%251)
	}
}

// finish stops the writer and verifies every record it acknowledged.
func (w *writer) finish(t *testing.T) int64 {
	t.Helper()
	if err := w.stopNow(); err != nil {
		t.Fatalf("writer saw an I/O error: %v", err)
	}
	return w.verify(t)
}

// failed reports whether the writer stopped on an error.
func (w *writer) failed() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

// stopNow stops the writer and returns the error it stopped on, if any.
func (w *writer) stopNow() error {
	select {
	case <-w.done:
	default:
		close(w.stop)
		<-w.done
	}
	return w.err
}

// verify checks every record the stopped writer acknowledged and returns
// how many there were.
func (w *writer) verify(t *testing.T) int64 {
	t.Helper()
	n := w.records.Load()
	b, err := os.ReadFile(w.path)
	if err != nil {
		t.Fatal(err)
	}
	rec := make([]byte, 64<<10)
	for i := int64(0); i < n; i++ {
		fill(rec, i)
		if !bytes.Equal(b[i*int64(len(rec)):(i+1)*int64(len(rec))], rec) {
			t.Fatalf("acknowledged record %d of %d is corrupt", i, n)
		}
	}
	return n
}

// waitRecords waits until the writer has acknowledged at least n records.
func (w *writer) waitRecords(t *testing.T, n int64, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for w.records.Load() < n {
		if w.err != nil || time.Now().After(deadline) {
			t.Fatalf("writer stuck at %d records (want %d): %v", w.records.Load(), n, w.err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestKernelNodePluginRestart: the attacher and node service are torn down
// and rebuilt (as a plugin restart does) while a writer runs on a published
// volume; the writer never sees an error, and unpublish/unstage work from
// the new instance.
func TestKernelNodePluginRestart(t *testing.T) {
	n := newNode(t)
	srv := servers.Nbdkit(t, servers.Unix, "file", "file="+backingFile(t, 256<<20))
	target := n.stagePublish("restart", fsCap("ext4"), map[string]string{driver.KeyURI: srv.URI("")})
	w := startWriter(t, filepath.Join(target, "log"))
	w.waitRecords(t, 20, time.Minute)
	n.stop()
	before := w.records.Load()
	w.waitRecords(t, before+20, time.Minute) // I/O goes on with no plugin at all
	n.start()
	w.waitRecords(t, w.records.Load()+20, time.Minute)
	got := w.finish(t)
	t.Logf("writer acknowledged %d records across the restart", got)
	n.unpublishUnstage("restart", target)
}

// TestKernelNodeServerRestart: the NBD server crashes and is restarted while
// a writer runs; the volume's health goes DEGRADED, then recovers, the
// writer sees a stall but no error, and every acknowledged record is intact.
func TestKernelNodeServerRestart(t *testing.T) {
	n := newNode(t)
	img := backingFile(t, 256<<20)
	srv := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
	vc := map[string]string{driver.KeyURI: srv.URI(""), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s"}
	target := n.stagePublish("outage", fsCap("ext4"), vc)
	w := startWriter(t, filepath.Join(target, "log"))
	w.waitRecords(t, 20, time.Minute)
	sockets := openSockets(t)

	// A crash, not a graceful stop: nbdkit stopping gracefully answers
	// requests in flight with ESHUTDOWN, which the kernel driver fails
	// with EIO instead of retrying (docs/operations.md).
	srv.Kill()
	degraded := waitHealth(t, n, "outage", csi.VolumeHealthErrorType_DEGRADED, 30*time.Second)
	time.Sleep(2 * time.Second)
	srv.Start()
	waitHealth(t, n, "outage", csi.VolumeHealthErrorType_UNKNOWN_VOLUME_HEALTH_TYPE, 60*time.Second)
	w.waitRecords(t, w.records.Load()+20, 2*time.Minute)
	got := w.finish(t)
	t.Logf("health went degraded (%v) and back; writer acknowledged %d records", degraded, got)
	// What the metrics count: the outage and the reconnect, and the volume
	// healthy again.
	ev := n.sawEvents()
	if !slices.Contains(ev, "link-dead") || !slices.Contains(ev, "reconnected") {
		t.Errorf("supervision events %v lack link-dead or reconnected", ev)
	}
	if healthy, degradedN := n.att.Health(); healthy != 1 || degradedN != 0 {
		t.Errorf("attacher health = %d healthy, %d degraded; want 1, 0", healthy, degradedN)
	}
	// The plugin let go of its copy of the dead connection: as many
	// sockets open as before the outage, not one more per reconnect.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		now := openSockets(t)
		if now == sockets {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%d sockets open after the reconnect, %d before the outage", now, sockets)
			break
		}
	}
	n.unpublishUnstage("outage", target)
}

// openSockets counts this process's open socket descriptors.
func openSockets(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

// waitHealth waits until the volume reports status (UNKNOWN… = healthy,
// no entries) and returns the message seen.
func waitHealth(t *testing.T, n *node, vol string, want csi.VolumeHealthErrorType, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		h, err := n.svc.NodeGetVolumeHealth(context.Background(), &csi.NodeGetVolumeHealthRequest{VolumeId: vol})
		if err != nil {
			t.Fatal(err)
		}
		st := h.VolumeHealth.HealthStatuses
		if want == csi.VolumeHealthErrorType_UNKNOWN_VOLUME_HEALTH_TYPE && len(st) == 0 {
			return ""
		}
		if len(st) > 0 && st[0].Status == want {
			return st[0].Message
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume health %v, want %v", st, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestKernelNodeManyVolumes stages 64 volumes at once on one node, each
// with its own filesystem, then checks every one got its own device.
func TestKernelNodeManyVolumes(t *testing.T) {
	n := newNode(t)
	dir := t.TempDir()
	const count = 64
	for i := 0; i < count; i++ {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("v%02d", i)))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(64 << 20); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	srv := servers.Nbdkit(t, servers.Unix, "file", "dir="+dir)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, count)
	for i := 0; i < count; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			vol := fmt.Sprintf("v%02d", i)
			_, err := n.svc.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: vol,
				StagingTargetPath: n.staging(vol), VolumeCapability: fsCap("ext4"),
				VolumeContext: map[string]string{driver.KeyURI: srv.URI(vol)}})
			if err != nil {
				errs <- fmt.Errorf("%s: %w", vol, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("staged %d volumes concurrently in %v (%v per volume)", count, time.Since(start), time.Since(start)/count)
	atts, err := n.att.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	devs := map[string]string{}
	for _, a := range atts {
		if other, dup := devs[a.Device]; dup {
			t.Errorf("%s is used by %s and %s", a.Device, other, a.VolumeID)
		}
		devs[a.Device] = a.VolumeID
	}
	if len(atts) != count {
		t.Errorf("%d devices attached, want %d", len(atts), count)
	}
	for i := 0; i < count; i++ {
		vol := fmt.Sprintf("v%02d", i)
		if _, err := n.svc.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol)}); err != nil {
			t.Errorf("unstage %s: %v", vol, err)
		}
	}
}
