// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
)

// stopGrace is the grace period between SIGTERM and SIGKILL in
// TestKernelServerStop (Kubernetes gives 30 s by default, systemd 90 s;
// shorter here, the behaviour is the same).
const stopGrace = 10 * time.Second

// stopOutcome is what a writer on the volume must see when its server is
// stopped with SIGTERM and started again.
type stopOutcome int

const (
	// stallOnly: I/O stalls while the server is down and resumes; no
	// error, every acknowledged record intact.
	stallOnly stopOutcome = iota
	// eio: the writer gets EIO (the server answered requests in flight
	// with an error reply).
	eio
)

func (o stopOutcome) String() string {
	if o == eio {
		return "EIO"
	}
	return "stall only"
}

// TestKernelServerStop: each NBD server is stopped the way Kubernetes and
// systemd stop a service — SIGTERM, then SIGKILL after a grace period — and
// started again on the same TCP port, while a writer fsyncs numbered records
// on an ext4 volume staged through the node service. docs/operations.md
// ("Restarting the NBD server") states per server what this proves:
//
//   - under `nbd-csi run-server` every server only drops its connections:
//     the writer stalls, sees no error, and every acknowledged record is
//     intact;
//   - bare nbdkit 1.32 answers requests in flight with ESHUTDOWN, and the
//     writer gets EIO;
//   - bare qemu-nbd and nbd-server: the outcome measured, asserted below.
//
// It also logs how long each server took to exit and when its port could
// be bound again.
func TestKernelServerStop(t *testing.T) {
	n := newNode(t)
	wrap := servers.Wrapper{pluginBinary(t), "run-server", "--"}
	for _, tc := range []struct {
		name  string
		start func(t *testing.T, img string) (srv *servers.Server, export string)
		want  stopOutcome
	}{
		{"nbdkit/bare", func(t *testing.T, img string) (*servers.Server, string) {
			return servers.Nbdkit(t, servers.TCP, "file", "file="+img), ""
		}, eio},
		{"nbdkit/run-server", func(t *testing.T, img string) (*servers.Server, string) {
			return wrap.Nbdkit(t, servers.TCP, "file", "file="+img), ""
		}, stallOnly},
		{"qemu-nbd/bare", func(t *testing.T, img string) (*servers.Server, string) {
			return servers.QemuNBD(t, servers.TCP, "-f", "raw", img), ""
		}, stallOnly},
		{"qemu-nbd/run-server", func(t *testing.T, img string) (*servers.Server, string) {
			return wrap.QemuNBD(t, servers.TCP, "-f", "raw", img), ""
		}, stallOnly},
		{"nbd-server/bare", func(t *testing.T, img string) (*servers.Server, string) {
			return servers.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\nflush = true\nfua = true\n"), "disk"
		}, stallOnly},
		{"nbd-server/run-server", func(t *testing.T, img string) (*servers.Server, string) {
			return wrap.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\nflush = true\nfua = true\n"), "disk"
		}, stallOnly},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, export := tc.start(t, backingFile(t, 256<<20))
			vol := "stop-" + filepath.Base(filepath.Dir(tc.name)) + "-" + filepath.Base(tc.name)
			vc := map[string]string{driver.KeyURI: srv.URI(export), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s"}
			target := n.stagePublish(vol, fsCap("ext4"), vc)
			w := startWriter(t, filepath.Join(target, "log"))
			w.waitRecords(t, 20, time.Minute)

			before := w.records.Load()
			stopped := time.Now()
			term := srv.Terminate(stopGrace)
			srv.Start() // fails the test if the port cannot be bound
			t.Logf("%s: exited %v after SIGTERM (SIGKILL needed: %v), port bindable again after %v; serving again %v after SIGTERM",
				tc.name, term.Exited.Round(time.Millisecond), term.Killed, term.Rebindable.Round(time.Millisecond),
				time.Since(stopped).Round(time.Millisecond))

			// Wait for 20 more records, or for the writer to fail.
			resumed := time.Now()
			deadline := resumed.Add(2 * time.Minute)
			for w.records.Load() < before+20 && !w.failed() && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			stall := time.Since(resumed)
			werr := w.stopNow()
			dropCaches(t) // verify reads the records back from the server
			t.Logf("%s: writer acknowledged %d records (%d before SIGTERM), error: %v; %v from restart to 20 more records or the error",
				tc.name, w.records.Load(), before, werr, stall.Round(time.Millisecond))

			switch tc.want {
			case eio:
				if !errors.Is(werr, syscall.EIO) {
					t.Fatalf("writer error = %v, want EIO (the documented behaviour of a bare %s stopped with SIGTERM)", werr, srv.Name)
				}
				// The records acknowledged before the error are intact.
				w.verify(t)
			case stallOnly:
				if werr != nil {
					t.Fatalf("writer saw an I/O error across SIGTERM of %s: %v", tc.name, werr)
				}
				if w.records.Load() < before+20 {
					t.Fatalf("writer stuck at %d records (%d before the stop)", w.records.Load(), before)
				}
				t.Logf("%s: %d records verified", tc.name, w.verify(t))
			}
		})
	}
}

// dropCaches writes back nothing and drops the clean page cache, so that
// what is read next comes from the NBD server, not from memory.
func dropCaches(t *testing.T) {
	t.Helper()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatalf("drop caches: %v", err)
	}
}
