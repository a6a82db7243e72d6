// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// envRunMain makes the test binary run main() instead of the tests, so a
// test can start `nbd-csi …` as a process (see TestMain).
const envRunMain = "NBDCSI_TEST_RUN_MAIN"

// nbdESHUTDOWN is NBD_ESHUTDOWN, the error a server stopping gracefully
// answers requests with (NBD protocol, "Error values").
const nbdESHUTDOWN = 108

// stopUnderLoad runs writers on two connections to srv, stops the server
// with Terminate after they have some writes acknowledged, and returns the
// error replies (CommandError) the writers got, the offsets and contents of
// the last acknowledged write to each block, and of the last write without
// a reply (which may or may not have been applied).
func stopUnderLoad(t *testing.T, srv *servers.Server, export string) (replies []*nbd.CommandError, acked, unacked map[uint64][]byte) {
	t.Helper()
	u, err := nbd.ParseURI(srv.URI(export))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	acked, unacked = map[uint64][]byte{}, map[uint64][]byte{}
	var (
		mu       sync.Mutex
		others   []error
		wg       sync.WaitGroup
		progress = make(chan struct{}, 1)
	)
	const writers, block = 2, 4096
	for w := range writers {
		c, err := nbd.Dial(ctx, u, nbd.WithProfile(nbd.ProfileUserspace))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := uint64(0); ; i++ {
				off := (i*writers + uint64(w)) * block % (4 << 20)
				p := make([]byte, block)
				binary.BigEndian.PutUint64(p, i+1)
				p[8] = byte(w)
				err := c.WriteAt(ctx, p, off, 0)
				var ce *nbd.CommandError
				mu.Lock()
				switch {
				case err == nil:
					acked[off] = p
				case errors.As(err, &ce):
					replies = append(replies, ce)
				default:
					others = append(others, err)
				}
				if err != nil {
					// A request cut off by the kill may or may not
					// have reached the file before the reply.
					unacked[off] = p
				}
				mu.Unlock()
				if err != nil {
					return
				}
				select {
				case progress <- struct{}{}:
				default:
				}
			}
		}()
	}
	for range 50 {
		select {
		case <-progress:
		case <-time.After(10 * time.Second):
			mu.Lock()
			t.Fatalf("writers made no progress: error replies %v, other errors %v", replies, others)
		}
	}
	term := srv.Terminate(5 * time.Second)
	t.Logf("%s stopped: %+v", srv.Name, term)
	wg.Wait()
	t.Logf("writers stopped on: error replies %v, other errors %v", replies, others)
	return replies, acked, unacked
}

// TestRunServerStopDropsConnections: nbdkit stopped with SIGTERM answers
// requests in flight with ESHUTDOWN (the kernel turns that into EIO); run
// under `nbd-csi run-server` the same SIGTERM only drops the connections,
// every write acknowledged before is in the backing file, and the port can
// be bound again as soon as the wrapper has exited — also for qemu-nbd and
// for nbd-server, which daemonizes (run-server adopts and kills the daemon,
// or the restart could not bind the port). Bare qemu-nbd and nbd-server send
// no ESHUTDOWN either (TestKernelServerStop shows the same on the kernel).
func TestRunServerStopDropsConnections(t *testing.T) {
	wrap := servers.Wrapper{os.Args[0], "run-server", "--sync", os.TempDir(), "--"}
	for _, tc := range []struct {
		name    string
		start   func(t *testing.T, img string) (*servers.Server, string)
		wantESD bool // ESHUTDOWN replies expected
	}{
		{"nbdkit/bare", func(t *testing.T, img string) (*servers.Server, string) {
			return servers.Nbdkit(t, servers.TCP, "file", "file="+img), ""
		}, true},
		{"nbdkit/run-server", func(t *testing.T, img string) (*servers.Server, string) {
			return wrap.Nbdkit(t, servers.TCP, "file", "file="+img), ""
		}, false},
		{"qemu-nbd/bare", func(t *testing.T, img string) (*servers.Server, string) {
			return servers.QemuNBD(t, servers.TCP, "-f", "raw", img), ""
		}, false},
		{"qemu-nbd/run-server", func(t *testing.T, img string) (*servers.Server, string) {
			return wrap.QemuNBD(t, servers.TCP, "-f", "raw", img), ""
		}, false},
		{"nbd-server/bare", func(t *testing.T, img string) (*servers.Server, string) {
			return servers.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\n"), "disk"
		}, false},
		{"nbd-server/run-server", func(t *testing.T, img string) (*servers.Server, string) {
			return wrap.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\n"), "disk"
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(envRunMain, "1") // inherited by the wrapper process only
			img := filepath.Join(t.TempDir(), "disk.img")
			if err := os.WriteFile(img, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, 4<<20); err != nil {
				t.Fatal(err)
			}
			srv, export := tc.start(t, img)
			const stops = 3
			var shutdown int
			for range stops {
				replies, acked, unacked := stopUnderLoad(t, srv, export)
				for _, r := range replies {
					if r.Errno != nbdESHUTDOWN {
						t.Errorf("error reply %v, want none or ESHUTDOWN", r)
					}
					shutdown++
				}
				b, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				for off, p := range acked {
					got := b[off : off+uint64(len(p))]
					if !bytes.Equal(got, p) && !bytes.Equal(got, unacked[off]) {
						t.Fatalf("acknowledged write at %d is not in the backing file", off)
					}
				}
				srv.Start() // fails the test if the port cannot be bound
			}
			if tc.wantESD && shutdown == 0 {
				t.Errorf("no request answered with ESHUTDOWN in %d stops under load; the documented behaviour has changed", stops)
			}
			if !tc.wantESD && shutdown != 0 {
				t.Errorf("%d requests answered with ESHUTDOWN", shutdown)
			}
			t.Logf("%d ESHUTDOWN replies in %d stops", shutdown, stops)
		})
	}
}

// TestRunServerExit: usage errors exit 2; a server that ends on its own
// ends run-server with its verdict.
func TestRunServerExit(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"run-server"}, 2},
		{[]string{"run-server", "--sync", "/nonexistent/dir", "--", "true"}, 2},
		{[]string{"run-server", "--", "/nonexistent/server"}, 1},
		{[]string{"run-server", "--", "true"}, 0},
		{[]string{"run-server", "--", "false"}, 1},
		// A daemon left behind that fails is reported too.
		{[]string{"run-server", "--", "sh", "-c", "(sleep 0.2; exit 3) &"}, 1},
		{[]string{"run-server", "--", "sh", "-c", "(sleep 0.2; exit 0) &"}, 0},
	} {
		cmd := exec.Command(os.Args[0], tc.args...)
		cmd.Env = append(os.Environ(), envRunMain+"=1")
		out, err := cmd.CombinedOutput()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.want {
			t.Errorf("nbd-csi %v: exit %d, want %d\n%s", tc.args, code, tc.want, out)
		}
	}
}
