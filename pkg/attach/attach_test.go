// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/device"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

func socketPair(t *testing.T) (*os.File, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// plugin is one plugin process's Attacher over the shared fake kernel;
// restart() is a new process (the kernel's devices stay).
type plugin struct {
	t  *testing.T
	k  *fakeKernel
	a  *Attacher
	mu sync.Mutex
	ev []device.Event
	// secrets is the TLS directory (survives restarts).
	secrets string
}

func newPlugin(t *testing.T, k *fakeKernel) *plugin {
	p := &plugin{t: t, k: k, secrets: filepath.Join(t.TempDir(), "tls")}
	p.start()
	return p
}

func (p *plugin) start() {
	p.mu.Lock()
	p.ev = nil
	p.mu.Unlock()
	p.a = newAttacher(context.Background(), Options{SecretsDir: p.secrets, PollInterval: 50 * time.Millisecond,
		OnEvent: func(_ string, e device.Event) {
			p.mu.Lock()
			p.ev = append(p.ev, e)
			p.mu.Unlock()
		}}, p.k, nil)
	a := p.a
	p.t.Cleanup(func() { a.Close() })
}

func (p *plugin) restart() {
	p.a.Close()
	p.start()
}

func (p *plugin) events() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, e := range p.ev {
		out = append(out, e.Kind.String())
	}
	return out
}

func spec(t *testing.T, uri string, conns int) driver.AttachSpec {
	t.Helper()
	u, err := nbd.ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	return driver.AttachSpec{VolumeID: "vol", URI: u, Connections: conns, Timeout: 5 * time.Second, DeadConnTimeout: 30 * time.Second}
}

// serverConns counts the server's open connections: its socket
// descriptors that are not listening (per /proc/net/{unix,tcp,tcp6}).
func serverConns(t *testing.T, srv *servers.Server) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", srv.PID())
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
	listening := 0
	for _, f := range []string{"/proc/net/unix", "/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			switch {
			case f == "/proc/net/unix" && len(fs) >= 7 && inodes[fs[6]] && fs[3] == "00010000":
				listening++
			case f != "/proc/net/unix" && len(fs) >= 10 && inodes[fs[9]] && fs[3] == "0A":
				listening++
			}
		}
	}
	return len(inodes) - listening
}

func eventually(t *testing.T, what string, d time.Duration, f func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !f(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// settled waits until the server has exactly want connections and keeps
// that for a while (closed connections take a moment to reach it).
func settled(t *testing.T, srv *servers.Server, want int) {
	t.Helper()
	eventually(t, fmt.Sprintf("%d server connections (have %d)", want, serverConns(t, srv)), 5*time.Second, func() bool { return serverConns(t, srv) == want })
	time.Sleep(300 * time.Millisecond)
	if n := serverConns(t, srv); n != want {
		t.Fatalf("server has %d connections, want %d", n, want)
	}
}

func (p *plugin) adopted(t *testing.T) {
	t.Helper()
	eventually(t, "adoption", 10*time.Second, func() bool {
		w := p.a.watchOf("vol")
		if w == nil {
			return false
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		return !w.adopting
	})
}

func (p *plugin) healthy() (bool, string) {
	w := p.a.watchOf("vol")
	if w == nil {
		return false, "no watch"
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.healthy, w.condition
}

func (k *fakeKernel) takenSince(i int) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, r := range k.reconfigs[i:] {
		n += r.taken
	}
	return n
}

func (k *fakeKernel) reconfigCount() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.reconfigs)
}

func newServer(t *testing.T, l servers.Listen) *servers.Server {
	return servers.Nbdkit(t, l, "memory", "size=16M")
}

// TestAdoptHealthyLeavesNothingIdle: adopting a healthy volume after a
// restart offers the kernel a connection (it cannot know whether one is
// dead); the kernel ignores it, and it must be closed, not kept — before,
// Adopt kept a duplicate of every socket it offered (attach.go:421
// keep(n.files)), so each restart left one idle negotiated connection per
// volume on the server, and renew() later shut down sockets the kernel
// never held.
func TestAdoptHealthyLeavesNothingIdle(t *testing.T) {
	for _, l := range []servers.Listen{servers.Unix, servers.TCP} {
		t.Run(l.String(), func(t *testing.T) {
			srv := newServer(t, l)
			k := newFakeKernel(t)
			p := newPlugin(t, k)
			ctx := context.Background()
			if _, err := p.a.Attach(ctx, spec(t, srv.URI(""), 1)); err != nil {
				t.Fatal(err)
			}
			settled(t, srv, 1)
			p.restart()
			if err := p.a.Adopt(ctx, spec(t, srv.URI(""), 1)); err != nil {
				t.Fatal(err)
			}
			p.adopted(t)
			settled(t, srv, 1)
			if n := k.takenSince(0); n != 0 {
				t.Errorf("the kernel took %d sockets into a healthy device", n)
			}
			if ok, cond := p.healthy(); !ok {
				t.Errorf("adopted healthy volume reported degraded: %s", cond)
			}
			if ev := p.events(); slices.Contains(ev, "link-dead") {
				t.Errorf("events %v for a healthy volume", ev)
			}
			w := p.a.watchOf("vol")
			w.mu.Lock()
			held := len(w.conns)
			w.mu.Unlock()
			if held != 0 {
				t.Errorf("the plugin records %d connections the kernel never took from it", held)
			}
		})
	}
}

// TestLostNotificationsNoDegrade: an AnyIndex event (ENOBUFS, the watcher
// reopened) makes every volume look; a healthy one must neither report
// degraded nor be left with extra connections. Before, every volume redialled
// and kept the ignored sockets (one idle connection per volume per event)
// and reported DEGRADED.
func TestLostNotificationsNoDegrade(t *testing.T) {
	for _, adopted := range []bool{false, true} {
		t.Run(fmt.Sprintf("adopted=%v", adopted), func(t *testing.T) {
			srv := newServer(t, servers.Unix)
			k := newFakeKernel(t)
			p := newPlugin(t, k)
			ctx := context.Background()
			if _, err := p.a.Attach(ctx, spec(t, srv.URI(""), 1)); err != nil {
				t.Fatal(err)
			}
			if adopted {
				p.restart()
				if err := p.a.Adopt(ctx, spec(t, srv.URI(""), 1)); err != nil {
					t.Fatal(err)
				}
				p.adopted(t)
			}
			time.Sleep(200 * time.Millisecond)
			for range 3 {
				k.lose()
				time.Sleep(100 * time.Millisecond)
			}
			settled(t, srv, 1)
			if ok, cond := p.healthy(); !ok {
				t.Errorf("degraded after lost notifications: %s", cond)
			}
			if ev := p.events(); slices.Contains(ev, "link-dead") {
				t.Errorf("events %v for a healthy volume", ev)
			}
			if live, dead := k.live(0); live != 1 || dead != 0 {
				t.Errorf("kernel slots: %d live, %d dead", live, dead)
			}
		})
	}
}

// TestReconnectFillsOnlyDeadSlots: with two connections and one dying, the
// kernel takes one replacement; the plugin must offer one (or close what
// the kernel ignored) and end with exactly the kernel's connections open.
func TestReconnectFillsOnlyDeadSlots(t *testing.T) {
	for _, l := range []servers.Listen{servers.Unix, servers.TCP} {
		t.Run(l.String(), func(t *testing.T) {
			srv := newServer(t, l)
			k := newFakeKernel(t)
			p := newPlugin(t, k)
			ctx := context.Background()
			if _, err := p.a.Attach(ctx, spec(t, srv.URI(""), 2)); err != nil {
				t.Fatal(err)
			}
			settled(t, srv, 2)
			k.kill(0, 0)
			eventually(t, "reconnect", 10*time.Second, func() bool {
				live, dead := k.live(0)
				ok, _ := p.healthy()
				return live == 2 && dead == 0 && ok
			})
			settled(t, srv, 2)
			w := p.a.watchOf("vol")
			w.mu.Lock()
			held := len(w.conns)
			w.mu.Unlock()
			if held != 2 {
				t.Errorf("the plugin records %d connections, the kernel has 2", held)
			}
			if ev := p.events(); !slices.Contains(ev, "reconnected") {
				t.Errorf("events %v", ev)
			}
		})
	}
}

// growable is an nbdkit file export whose file can be grown.
func growable(t *testing.T, l servers.Listen) (*servers.Server, string) {
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	return servers.Nbdkit(t, l, "file", "file="+img), img
}

// TestResizeAfterRestartRefused: after a plugin restart the plugin knows
// none of the kernel's connections, so it cannot renew them for a grown
// export: online expansion must answer FailedPrecondition
// (nbd.ErrNotSupportedByExport) and leave the device alone. Before, Adopt's
// reconnect kept copies of sockets the kernel ignored, Resize resized the
// device, shut those copies down (the kernel's connections stayed,
// negotiated at the old size), waited 5 s and reported success: the
// filesystem then grew over connections that refuse I/O past the old end.
func TestResizeAfterRestartRefused(t *testing.T) {
	srv, img := growable(t, servers.Unix)
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	ctx := context.Background()
	sp := spec(t, srv.URI(""), 1)
	if _, err := p.a.Attach(ctx, sp); err != nil {
		t.Fatal(err)
	}
	p.restart()
	if err := p.a.Adopt(ctx, sp); err != nil {
		t.Fatal(err)
	}
	p.adopted(t)
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	n := k.reconfigCount()
	_, err := p.a.Resize(ctx, "vol", sp)
	if !errors.Is(err, nbd.ErrNotSupportedByExport) {
		t.Fatalf("resize after restart: %v, want ErrNotSupportedByExport", err)
	}
	k.mu.Lock()
	size := k.devs[0].size
	for _, r := range k.reconfigs[n:] {
		if r.resizedToBytes != 0 || r.taken != 0 {
			t.Errorf("refused resize reconfigured the device: %+v", r)
		}
	}
	k.mu.Unlock()
	if size != 8<<20 {
		t.Errorf("refused resize changed the device size to %d", size)
	}
	if live, _ := k.live(0); live != 1 {
		t.Errorf("refused resize touched the connection: %d live", live)
	}
}

// TestResizeRenewsConnections: in the process that made them, every
// connection is ended (TCP through sock_diag, unix through its handle) and
// replaced by one negotiated at the new size before Resize returns.
func TestResizeRenewsConnections(t *testing.T) {
	for _, l := range []servers.Listen{servers.Unix, servers.TCP} {
		t.Run(l.String(), func(t *testing.T) {
			srv, img := growable(t, l)
			k := newFakeKernel(t)
			p := newPlugin(t, k)
			ctx := context.Background()
			sp := spec(t, srv.URI(""), 2)
			if _, err := p.a.Attach(ctx, sp); err != nil {
				t.Fatal(err)
			}
			k.mu.Lock()
			var old []*os.File
			for _, s := range k.devs[0].slots {
				old = append(old, s.f)
			}
			k.mu.Unlock()
			if err := os.Truncate(img, 16<<20); err != nil {
				t.Fatal(err)
			}
			rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			size, err := p.a.Resize(rctx, "vol", sp)
			if err != nil || size != 16<<20 {
				t.Fatalf("resize: %d, %v", size, err)
			}
			k.mu.Lock()
			for _, s := range k.devs[0].slots {
				if slices.Contains(old, s.f) || s.dead {
					t.Errorf("a connection negotiated at the old size is still in use")
				}
			}
			k.mu.Unlock()
			settled(t, srv, 2)
		})
	}
}

// TestDetachDuringAdoptBackoff: the volume is unstaged while its adoption
// waits for the server, then staged again on a new device. The adoption
// must end with the unstage: before, adoptLater's goroutine (owned by
// nothing) later replaced the live watch with one on the old device,
// released the live relays and reported the volume disconnected.
func TestDetachDuringAdoptBackoff(t *testing.T) {
	srv, k, p, sp := restartedDuringOutage(t)
	ctx := context.Background()
	if err := p.a.Adopt(ctx, sp); err != nil {
		t.Fatal(err)
	}
	time.Sleep(700 * time.Millisecond) // in the backoff
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := p.a.Detach(dctx, "vol"); err != nil {
		t.Fatal(err)
	}
	if p.a.watchOf("vol") != nil {
		t.Fatal("watch kept after detach")
	}
	srv.Start()
	att, err := p.a.Attach(ctx, sp)
	if err != nil {
		t.Fatal(err)
	}
	n := k.reconfigCount()
	time.Sleep(3 * time.Second) // longer than the old backoff
	w := p.a.watchOf("vol")
	if w == nil || fmt.Sprintf("/dev/nbd%d", w.index) != att.Device {
		t.Fatalf("volume's watch is not on its new device %s", att.Device)
	}
	if ok, cond := p.healthy(); !ok {
		t.Errorf("restaged volume reported %q", cond)
	}
	k.mu.Lock()
	for _, r := range k.reconfigs[n:] {
		t.Errorf("reconfigure of nbd%d after the restage", r.index)
	}
	k.mu.Unlock()
	if live, _ := k.live(1); live != 1 {
		t.Errorf("new device has %d live connections", live)
	}
}

// TestDetachFailureKeepsSupervising: a DISCONNECT that fails leaves the
// device attached, so it must stay supervised. Before, Detach dropped the
// watch (and the relays) before DISCONNECT.
func TestDetachFailureKeepsSupervising(t *testing.T) {
	srv := newServer(t, servers.Unix)
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	ctx := context.Background()
	if _, err := p.a.Attach(ctx, spec(t, srv.URI(""), 1)); err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	k.detachErr = errors.New("device busy")
	k.mu.Unlock()
	if err := p.a.Detach(ctx, "vol"); err == nil {
		t.Fatal("detach succeeded")
	}
	k.kill(0, 0)
	eventually(t, "reconnect after the failed detach", 10*time.Second, func() bool {
		live, dead := k.live(0)
		return live == 1 && dead == 0
	})
	k.mu.Lock()
	k.detachErr = nil
	k.mu.Unlock()
	if err := p.a.Detach(ctx, "vol"); err != nil {
		t.Fatal(err)
	}
}

// TestAdoptNotAttached: Adopt of a volume with no device says so with
// driver.ErrNotAttached, as the interface promises (it returned
// device.ErrNotFound, and the node logged an error instead of the line for
// a rebooted node).
func TestAdoptNotAttached(t *testing.T) {
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	err := p.a.Adopt(context.Background(), spec(t, "nbd+unix:///?socket=/nonexistent", 1))
	if !errors.Is(err, driver.ErrNotAttached) {
		t.Fatalf("got %v, want ErrNotAttached", err)
	}
}

// TestAdoptDuringOutageReconnects: the plugin restarts while the server is
// down and the kernel has marked the connection dead (no plugin heard the
// notification). Adoption keeps trying and reconnects once the server is
// back. Before, start-up blocked on the probe and the volume was never
// reconnected.
func TestAdoptDuringOutageReconnects(t *testing.T) {
	srv, k, p, sp := restartedDuringOutage(t)
	ctx := context.Background()
	start := time.Now()
	if err := p.a.Adopt(ctx, sp); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Adopt took %v", d)
	}
	time.Sleep(3 * time.Second)
	if ok, cond := p.healthy(); ok || !strings.Contains(cond, "reconnecting") {
		t.Errorf("volume with a dead connection and no server reported healthy=%v %q", ok, cond)
	}
	srv.Start()
	eventually(t, "reconnect after the server returned", 15*time.Second, func() bool {
		live, dead := k.live(0)
		ok, _ := p.healthy()
		return live == 1 && dead == 0 && ok
	})
	settled(t, srv, 1)
}

// TestAttachTLSSaveFailureLeavesNoDevice: when the TLS material cannot be
// kept, nothing is attached. Before, the failure came after the kernel
// attach and left a device nobody supervised.
func TestAttachTLSSaveFailureLeavesNoDevice(t *testing.T) {
	certs := servers.GenerateCerts(t)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "memory", "size=1M")
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	// A regular file where the secrets directory should be.
	if err := os.WriteFile(p.secrets, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	sp := spec(t, srv.TLSURI(""), 1)
	sp.TLS = &nbd.TLSOptions{CAFile: certs.CAFile}
	if _, err := p.a.Attach(context.Background(), sp); err == nil {
		t.Fatal("attach succeeded")
	}
	if devs, _ := k.List(context.Background()); len(devs) != 0 {
		t.Fatalf("failed attach left %d devices", len(devs))
	}
}

// TestOneWatcherPerNode: supervising many volumes costs one LINK_DEAD
// subscription and one STATUS call per interval. Before, each volume had
// its own multicast socket and STATUS poller.
func TestOneWatcherPerNode(t *testing.T) {
	srv := newServer(t, servers.Unix)
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	ctx := context.Background()
	for i := range 8 {
		sp := spec(t, srv.URI(""), 1)
		sp.VolumeID = fmt.Sprintf("vol%d", i)
		if _, err := p.a.Attach(ctx, sp); err != nil {
			t.Fatal(err)
		}
	}
	k.mu.Lock()
	s0 := k.statuses
	k.mu.Unlock()
	time.Sleep(time.Second) // 20 intervals
	k.mu.Lock()
	watches, statuses := k.watches, k.statuses-s0
	k.mu.Unlock()
	if watches != 1 || statuses > 25 {
		t.Errorf("8 volumes: %d LINK_DEAD subscriptions, %d STATUS calls in 20 intervals", watches, statuses)
	}
	// A death still reaches the right volume.
	k.kill(3, 0)
	eventually(t, "reconnect of vol3", 10*time.Second, func() bool {
		live, dead := k.live(3)
		return live == 1 && dead == 0 && k.takenSince(0) == 1
	})
}

// TestWithoutSockDiag: where sock_diag does not answer (its modules not
// loaded: it then answers ENOENT as for a socket that does not exist),
// nothing is concluded from it: reconnects still work, nothing is kept,
// online resize is refused.
func TestWithoutSockDiag(t *testing.T) {
	srv, img := growable(t, servers.Unix)
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	p.a.diagUnixOnce.Do(func() {})
	p.a.diagTCPOnce.Do(func() {})
	p.a.diagUnix, p.a.diagTCP = false, false
	ctx := context.Background()
	sp := spec(t, srv.URI(""), 1)
	if _, err := p.a.Attach(ctx, sp); err != nil {
		t.Fatal(err)
	}
	k.kill(0, 0)
	eventually(t, "reconnect", 10*time.Second, func() bool {
		live, dead := k.live(0)
		return live == 1 && dead == 0
	})
	k.lose()
	settled(t, srv, 1)
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := p.a.Resize(ctx, "vol", sp); !errors.Is(err, nbd.ErrNotSupportedByExport) {
		t.Fatalf("resize without sock_diag: %v", err)
	}
}

// TestDeviceGoneDuringReconnect: a device torn down while its supervisor
// retries (the server is down) ends supervision at the next STATUS sweep.
// Before, the reconnect loop went on for ever, RECONFIGUREing a device the
// kernel no longer had ("not configured, cannot reconfigure").
func TestDeviceGoneDuringReconnect(t *testing.T) {
	srv := newServer(t, servers.Unix)
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	if _, err := p.a.Attach(context.Background(), spec(t, srv.URI(""), 1)); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	k.kill(0, 0)
	eventually(t, "degraded", 5*time.Second, func() bool { ok, _ := p.healthy(); return !ok })
	k.mu.Lock()
	d := k.devs[0]
	delete(k.devs, 0)
	for _, s := range d.slots {
		s.f.Close()
	}
	k.mu.Unlock()
	w := p.a.watchOf("vol")
	select {
	case <-w.done:
	case <-time.After(5 * time.Second):
		t.Fatal("supervision of a device that is gone goes on")
	}
	if _, cond := p.healthy(); cond != "device disconnected" {
		t.Errorf("condition %q", cond)
	}
}

// restartedDuringOutage attaches a one-connection volume from a unix-socket
// server, restarts the plugin, stops the server and ends the connection the
// way the kernel marks it dead while no plugin listens.
func restartedDuringOutage(t *testing.T) (*servers.Server, *fakeKernel, *plugin, driver.AttachSpec) {
	t.Helper()
	srv := newServer(t, servers.Unix)
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	sp := spec(t, srv.URI(""), 1)
	if _, err := p.a.Attach(context.Background(), sp); err != nil {
		t.Fatal(err)
	}
	p.restart()
	srv.Stop()
	k.killQuietly(0, 0)
	return srv, k, p, sp
}
