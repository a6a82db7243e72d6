// SPDX-License-Identifier: Apache-2.0

package kernel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/nbd-csi/nbd-csi/internal/nbdscript"
	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// tlsSecrets returns the node-stage secrets for certs: the CA, and the
// client certificate when clientCert.
func tlsSecrets(t *testing.T, certs *servers.Certs, clientCert bool) map[string]string {
	t.Helper()
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	s := map[string]string{driver.SecretCA: read(certs.CAFile)}
	if clientCert {
		s[driver.SecretCert], s[driver.SecretKey] = read(certs.ClientCertFile), read(certs.ClientKeyFile)
	}
	return s
}

// attachment returns what the attacher reports for vol.
func (n *node) attachment(vol string) *driver.Attachment {
	n.t.Helper()
	a, err := n.att.Lookup(context.Background(), vol)
	if err != nil {
		n.t.Fatal(err)
	}
	return a
}

// mixedIO runs a mixed O_DIRECT workload on dev: 1 MiB and 4 KiB writes
// of random data at random aligned offsets, each followed by reads of
// earlier writes, and then checks every byte through the device and in
// the server's backing file img.
func mixedIO(t *testing.T, dev, img string, span int64) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := map[int64][]byte{}
	rng := rand.New(rand.NewPCG(1, 2))
	buf := alignedBuf(1 << 20)
	for i := 0; i < 48; i++ {
		size := int64(1 << 20)
		if i%3 == 2 {
			size = 4096
		}
		off := rng.Int64N(span/size) * size
		data := buf[:size]
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatalf("write %d bytes at %d: %v", size, off, err)
		}
		for o := range want {
			if o+int64(len(want[o])) > off && o < off+size {
				delete(want, o) // overlapped: the later write wins
			}
		}
		want[off] = bytes.Clone(data)
		// Read back some earlier write.
		for o, w := range want {
			got := alignedBuf(len(w))
			if _, err := f.ReadAt(got, o); err != nil {
				t.Fatalf("read at %d: %v", o, err)
			}
			if !bytes.Equal(got, w) {
				t.Fatalf("read at %d differs from what was written", o)
			}
			break
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	for o, w := range want {
		got := alignedBuf(len(w))
		if _, err := f.ReadAt(got, o); err != nil || !bytes.Equal(got, w) {
			t.Fatalf("device at %d differs after sync (%v)", o, err)
		}
		if !bytes.Equal(b[o:o+int64(len(w))], w) {
			t.Fatalf("server's file at %d differs from what was written", o)
		}
	}
}

func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(unsafePointer(b)%4096)
	if off == 4096 {
		off = 0
	}
	return b[off : off+n]
}

// tlsServersFor starts the GnuTLS servers of the kTLS tests.
var ktlsServers = []struct {
	name  string
	start func(t *testing.T, certs *servers.Certs, img string, verifyPeer bool) *servers.Server
}{
	{"nbdkit", func(t *testing.T, certs *servers.Certs, img string, verifyPeer bool) *servers.Server {
		args := []string{"--tls=require", "--tls-certificates=" + certs.Dir}
		if verifyPeer {
			args = append(args, "--tls-verify-peer")
		}
		return servers.Nbdkit(t, servers.TCP, append(args, "file", "file="+img)...)
	}},
	{"qemu-nbd", func(t *testing.T, certs *servers.Certs, img string, verifyPeer bool) *servers.Server {
		vp := "off"
		if verifyPeer {
			vp = "on"
		}
		return servers.QemuNBD(t, servers.TCP, "--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer="+vp+",dir="+certs.Dir,
			"--tls-creds=tls0", "-f", "raw", img)
	}},
}

// TestKernelKTLS attaches TLS exports of nbdkit and qemu-nbd (x509, with
// and without client certificates) with the default tls=auto: the kernel
// gets a kernel-TLS socket (no relay), a mixed O_DIRECT workload reads
// back what it wrote and the server's file holds it. A wrong CA is still
// refused, and tls=kernel attaches too.
func TestKernelKTLS(t *testing.T) {
	n := newNode(t)
	certs := servers.GenerateCerts(t)
	other := servers.GenerateCerts(t)
	for _, srv := range ktlsServers {
		for _, clientCert := range []bool{false, true} {
			name := srv.name
			if clientCert {
				name += "/client-cert"
			}
			t.Run(name, func(t *testing.T) {
				img := backingFile(t, 64<<20)
				s := srv.start(t, certs, img, clientCert)
				vol := "ktls-" + strings.ReplaceAll(name, "/", "-")
				vc := map[string]string{driver.KeyURI: s.TLSURI("")}
				// Wrong CA: refused, nothing attached.
				bad := tlsSecrets(t, other, false)
				if clientCert {
					bad = tlsSecrets(t, certs, true)
					bad[driver.SecretCA] = tlsSecrets(t, other, false)[driver.SecretCA]
				}
				_, err := n.svc.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: n.staging(vol),
					VolumeCapability: blockCap(), VolumeContext: vc, Secrets: bad})
				if err == nil || !strings.Contains(err.Error(), "unknown authority") {
					t.Fatalf("stage with the wrong CA = %v, want a certificate verification error", err)
				}
				if backendAttached(t, "nbd-csi:"+vol) {
					t.Fatal("device attached with the wrong CA")
				}

				target := n.stagePublishSecrets(vol, blockCap(), vc, tlsSecrets(t, certs, clientCert))
				a := n.attachment(vol)
				if a.TLS != driver.TLSKernel {
					t.Fatalf("attachment TLS = %q (fallback: %s), want kernel", a.TLS, a.TLSFallback)
				}
				if relays := relaySockets(t); relays != 0 {
					t.Errorf("%d unix socket pairs open in the plugin: a relay is running", relays)
				}
				mixedIO(t, a.Device, img, 64<<20)
				n.unpublishUnstage(vol, target)
			})
		}
	}
	t.Run("multi-conn", func(t *testing.T) {
		img := backingFile(t, 32<<20)
		s := ktlsServers[0].start(t, certs, img, false)
		vol := "ktls-multiconn"
		target := n.stagePublishSecrets(vol, blockCap(), map[string]string{driver.KeyURI: s.TLSURI(""), driver.KeyConnections: "4"}, tlsSecrets(t, certs, false))
		a := n.attachment(vol)
		if a.TLS != driver.TLSKernel {
			t.Fatalf("attachment TLS = %q (%s)", a.TLS, a.TLSFallback)
		}
		if got := clientConns(t, s.Address()); got != 4 {
			t.Errorf("%d client connections to the server, want 4", got)
		}
		mixedIO(t, a.Device, img, 32<<20)
		n.unpublishUnstage(vol, target)
	})
	t.Run("tls=kernel", func(t *testing.T) {
		img := backingFile(t, 16<<20)
		s := ktlsServers[0].start(t, certs, img, false)
		vol := "ktls-required"
		target := n.stagePublishSecrets(vol, blockCap(), map[string]string{driver.KeyURI: s.TLSURI(""), driver.KeyTLS: driver.TLSKernel}, tlsSecrets(t, certs, false))
		if a := n.attachment(vol); a.TLS != driver.TLSKernel {
			t.Fatalf("attachment TLS = %q", a.TLS)
		}
		n.unpublishUnstage(vol, target)
	})
}

// clientConns counts established TCP connections to addr (host:port of
// 127.0.0.1) seen from the client side.
func clientConns(t *testing.T, addr string) int {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	var p int
	fmt.Sscan(port, &p)
	want := fmt.Sprintf("0100007F:%04X", p)
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[2] == want && f[3] == "01" {
			n++
		}
	}
	return n
}

// relaySockets counts the unix sockets of this process (a relay holds a
// socket pair per connection; the tests use TCP servers).
func relaySockets(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	unixInodes := map[string]bool{}
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) >= 7 {
			unixInodes[f[6]] = true
		}
	}
	count := 0
	for _, e := range entries {
		l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil || !strings.HasPrefix(l, "socket:[") {
			continue
		}
		ino := strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")
		if unixInodes[ino] {
			count++
		}
	}
	return count
}

// TestKernelKTLSServerRestart: the server crashes and restarts under a
// writer on a kTLS volume; supervision reconnects over kTLS, the writer
// sees no error and every acknowledged record is intact.
func TestKernelKTLSServerRestart(t *testing.T) {
	n := newNode(t)
	certs := servers.GenerateCerts(t)
	img := backingFile(t, 256<<20)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "file", "file="+img)
	vc := map[string]string{driver.KeyURI: srv.TLSURI(""), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s", driver.KeyTLS: driver.TLSKernel}
	target := n.stagePublishSecrets("ktls-outage", fsCap("ext4"), vc, tlsSecrets(t, certs, false))
	w := startWriter(t, filepath.Join(target, "log"))
	w.waitRecords(t, 20, time.Minute)
	srv.Kill()
	waitHealth(t, n, "ktls-outage", csi.VolumeHealthErrorType_DEGRADED, 30*time.Second)
	time.Sleep(2 * time.Second)
	srv.Start()
	waitHealth(t, n, "ktls-outage", csi.VolumeHealthErrorType_UNKNOWN_VOLUME_HEALTH_TYPE, 60*time.Second)
	w.waitRecords(t, w.records.Load()+20, 2*time.Minute)
	got := w.finish(t)
	if a := n.attachment("ktls-outage"); a.TLS != driver.TLSKernel {
		t.Errorf("after the reconnect TLS = %q (%s), want kernel", a.TLS, a.TLSFallback)
	}
	if ev := n.sawEvents(); !slices.Contains(ev, "reconnected") {
		t.Errorf("events %v lack reconnected", ev)
	}
	t.Logf("writer acknowledged %d records across the server crash", got)
	n.unpublishUnstage("ktls-outage", target)
}

// tlsProxy terminates NBD STARTTLS with Go's crypto/tls in front of a
// plaintext NBD server, so that a test can make the server side of a
// session send an alert (close_notify) at a chosen moment.
type tlsProxy struct {
	t       *testing.T
	ln      net.Listener
	backend string
	cfg     *tls.Config

	mu    sync.Mutex
	conns []*tls.Conn
}

func newTLSProxy(t *testing.T, backend string, cfg *tls.Config) *tlsProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tlsProxy{t: t, ln: ln, backend: backend, cfg: cfg}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *tlsProxy) uri() string { return "nbds://" + p.ln.Addr().String() + "/" }

// serve speaks fixed newstyle up to STARTTLS, then joins the TLS session
// to a plaintext connection to the backend past its greeting.
func (p *tlsProxy) serve(c net.Conn) {
	defer c.Close()
	tc, b, err := nbdscript.AcceptStartTLS(c, p.cfg, p.backend)
	if err != nil {
		return
	}
	defer b.Close()
	p.mu.Lock()
	p.conns = append(p.conns, tc)
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(b, tc); done <- struct{}{} }()
	go func() { _, _ = io.Copy(tc, b); done <- struct{}{} }()
	<-done
}

// alert makes every session send close_notify (a TLS alert record) and
// then drops it, as a server ending sessions would.
func (p *tlsProxy) alert() int {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		_ = c.CloseWrite()
	}
	time.Sleep(200 * time.Millisecond)
	for _, c := range conns {
		_ = c.Close()
	}
	return len(conns)
}

// TestKernelKTLSAlert: the server side of a kTLS session sends an alert
// (close_notify) mid-I/O under a writer. The kernel's TLS layer cannot
// pass a non-data record to the nbd driver, so the connection ends; the
// documented behaviour is an ordinary reconnect through RECONFIGURE
// (docs/tls.md), with no acknowledged write lost. Run for a TLS 1.2 server
// and a TLS 1.3-only one (the client's TLS 1.2 offer is refused and it
// redials with TLS 1.3).
func TestKernelKTLSAlert(t *testing.T) {
	certs := servers.GenerateCerts(t)
	cert, err := tls.LoadX509KeyPair(certs.ServerCertFile, certs.ServerKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(v), func(t *testing.T) {
			n := newNode(t)
			img := backingFile(t, 256<<20)
			backend := servers.Nbdkit(t, servers.Unix, "file", "file="+img)
			p := newTLSProxy(t, backend.Address(), &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: v, MaxVersion: v})
			vol := "ktls-alert-" + strings.ToLower(strings.ReplaceAll(tls.VersionName(v), " ", ""))
			vc := map[string]string{driver.KeyURI: p.uri(), driver.KeyTimeout: "5s", driver.KeyDeadConnectionTimeout: "120s", driver.KeyTLS: driver.TLSKernel}
			target := n.stagePublishSecrets(vol, fsCap("ext4"), vc, tlsSecrets(t, certs, false))
			w := startWriter(t, filepath.Join(target, "log"))
			w.waitRecords(t, 20, time.Minute)
			for i := 0; i < 3; i++ {
				if p.alert() == 0 {
					t.Fatal("no session to alert")
				}
				start := w.records.Load()
				w.waitRecords(t, start+20, 2*time.Minute)
			}
			got := w.finish(t)
			if a := n.attachment(vol); a.TLS != driver.TLSKernel {
				t.Errorf("TLS = %q (%s), want kernel", a.TLS, a.TLSFallback)
			}
			if ev := n.sawEvents(); !slices.Contains(ev, "reconnected") {
				t.Errorf("events %v lack reconnected after the alerts", ev)
			}
			t.Logf("%s: three alerts mid-write, writer acknowledged %d records, none lost", tls.VersionName(v), got)
			n.unpublishUnstage(vol, target)
		})
	}
}

// TestKernelKTLSFallback: with no tls module (unloaded, and the kernel's
// module loader pointed at nothing) tls=auto attaches through the relay
// and says so; tls=kernel refuses with FailedPrecondition.
func TestKernelKTLSFallback(t *testing.T) {
	n := newNode(t)
	certs := servers.GenerateCerts(t)
	img := backingFile(t, 16<<20)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "file", "file="+img)
	noTLSModule(t)
	vc := map[string]string{driver.KeyURI: srv.TLSURI(""), driver.KeyTLS: driver.TLSKernel}
	_, err := n.svc.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: "ktls-fb", StagingTargetPath: n.staging("ktls-fb"),
		VolumeCapability: blockCap(), VolumeContext: vc, Secrets: tlsSecrets(t, certs, false)})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("tls=kernel without the tls module: %v, want FailedPrecondition", err)
	}
	delete(vc, driver.KeyTLS)
	target := n.stagePublishSecrets("ktls-fb", blockCap(), vc, tlsSecrets(t, certs, false))
	a := n.attachment("ktls-fb")
	if a.TLS != driver.TLSRelay || a.TLSFallback == "" {
		t.Fatalf("attachment TLS = %q, fallback %q; want relay with a reason", a.TLS, a.TLSFallback)
	}
	if ev := n.sawEvents(); !slices.Contains(ev, "tls-relay-fallback") {
		t.Errorf("events %v lack tls-relay-fallback", ev)
	}
	t.Logf("fallback reason: %s", a.TLSFallback)
	mixedIO(t, a.Device, img, 16<<20)
	n.unpublishUnstage("ktls-fb", target)
}

// noTLSModule unloads the tls module and stops the kernel from loading it
// again until the test ends.
func noTLSModule(t *testing.T) {
	t.Helper()
	const helper = "/proc/sys/kernel/modprobe"
	old, err := os.ReadFile(helper)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(helper, []byte("/nonexistent-modprobe\n"), 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.WriteFile(helper, old, 0) })
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		if _, err := os.Stat("/sys/module/tls"); errors.Is(err, os.ErrNotExist) {
			return
		}
		out, err := exec.Command("rmmod", "tls").CombinedOutput()
		if err == nil {
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("rmmod tls: %v: %s", err, out)
		}
	}
}

func unsafePointer(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// TestKernelKTLSCLI: `nbd-csi attach` of a TLS export with kernel TLS
// returns with the device usable, as for a plaintext export, and the
// device keeps serving I/O after the command exited (no relay process);
// with --tls=relay the command stays in the foreground and SIGTERM
// detaches.
func TestKernelKTLSCLI(t *testing.T) {
	requireKernel(t)
	bin := pluginBinary(t)
	certs := servers.GenerateCerts(t)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "memory", "size=64M")
	out, err := exec.Command(bin, "attach", "--id", "cli-ktls", "--tls-ca", certs.CAFile, srv.TLSURI("")).Output()
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	data := randomBytes(t, 1<<20)
	write(t, dev, true, data)
	if got := read(t, dev, true, len(data)); sum(got) != sum(data) {
		t.Fatal("data read back differs")
	}
	if err := exec.Command(bin, "detach", "--id", "cli-ktls").Run(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	// A wrong CA is refused.
	other := servers.GenerateCerts(t)
	if out, err := exec.Command(bin, "attach", "--id", "cli-bad", "--tls-ca", other.CAFile, srv.TLSURI("")).CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "unknown authority") {
		t.Errorf("attach with the wrong CA: %v: %s", err, out)
	}

	cmd := exec.Command(bin, "attach", "--tls=relay", "--id", "cli-relay", "--tls-ca", certs.CAFile, srv.TLSURI(""))
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("relay attach printed nothing: %v", err)
	}
	dev = strings.TrimSpace(line)
	if got := read(t, dev, true, len(data)); sum(got) != sum(data) {
		t.Fatal("relay device: data read back differs")
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("relay attach after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("relay attach did not exit after SIGTERM")
	}
	if backendAttached(t, "nbd-csi-cli:cli-relay") {
		t.Error("relay device still attached after the command exited")
	}
}
