// SPDX-License-Identifier: Apache-2.0

package attach

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/nbdscript"
	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/driver"
	"github.com/nbd-csi/nbd-csi/pkg/ktls"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"golang.org/x/sys/unix"
)

// TestAttachTLSModesWithoutKernelTLS runs where the kernel has no TLS
// layer (this repository's development hosts: no tls module; the VM tests
// in test/kernel cover a kernel with one): tls=auto falls back to the
// relay and says why (Attachment and a tls-relay-fallback event), tls=kernel
// refuses with ErrPlatform and attaches nothing, tls=relay relays without
// calling it a fallback. Where the tls module is there, seams answer as a
// kernel without it does.
func TestAttachTLSModesWithoutKernelTLS(t *testing.T) {
	if ktls.Available() == nil {
		oldA, oldK := kernelTLSAvailable, kernelTLS
		t.Cleanup(func() { kernelTLSAvailable, kernelTLS = oldA, oldK })
		noULP := fmt.Errorf("%w: test: the kernel has no tls ULP (no tls module)", ktls.ErrUnavailable)
		kernelTLSAvailable = func() error { return noULP }
		kernelTLS = func(*nbd.Conn) (*os.File, error) { return nil, noULP }
	}
	certs := servers.GenerateCerts(t)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "memory", "size=1M")
	ctx := context.Background()
	for _, tc := range []struct {
		mode     string
		wantTLS  string
		fallback bool
	}{
		{"", driver.TLSRelay, true}, // auto
		{driver.TLSAuto, driver.TLSRelay, true},
		{driver.TLSRelay, driver.TLSRelay, false},
		{driver.TLSKernel, "", false},
	} {
		t.Run("mode="+tc.mode, func(t *testing.T) {
			k := newFakeKernel(t)
			p := newPlugin(t, k)
			sp := spec(t, srv.TLSURI(""), 1)
			sp.TLS = &nbd.TLSOptions{CAFile: certs.CAFile}
			sp.TLSMode = tc.mode
			att, err := p.a.Attach(ctx, sp)
			if tc.wantTLS == "" {
				if !errors.Is(err, nbd.ErrPlatform) {
					t.Fatalf("attach = %v, want ErrPlatform", err)
				}
				if devs, _ := k.List(ctx); len(devs) != 0 {
					t.Fatalf("refused attach left %d devices", len(devs))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := p.a.Lookup(ctx, "vol")
			if err != nil {
				t.Fatal(err)
			}
			if got.TLS != tc.wantTLS || (got.TLSFallback != "") != tc.fallback {
				t.Errorf("TLS %q fallback %q; want %q, fallback reported %v", got.TLS, got.TLSFallback, tc.wantTLS, tc.fallback)
			}
			if ev := p.events(); slices.Contains(ev, "tls-relay-fallback") != tc.fallback {
				t.Errorf("events %v; fallback event wanted: %v", ev, tc.fallback)
			}
			_ = att
			// What `nbd-csi devices --state-dir` shows.
			mode, reason, err := ReadTLSMode(p.secrets, "vol")
			if err != nil || mode != tc.wantTLS || (reason != "") != tc.fallback {
				t.Errorf("recorded mode %q reason %q (%v); want %q, reason given %v", mode, reason, err, tc.wantTLS, tc.fallback)
			}
			if err := p.a.Detach(ctx, "vol"); err != nil {
				t.Fatal(err)
			}
			if mode, _, err := ReadTLSMode(p.secrets, "vol"); mode != "" || err != nil {
				t.Errorf("mode %q (%v) still recorded after detach", mode, err)
			}
		})
	}
}

// junkProxy terminates NBD STARTTLS with crypto/tls in front of a
// plaintext server (like a TLS NBD server would) and, on its first
// session only, appends bytes nobody asked for to the record carrying the
// NBD_OPT_GO acknowledgement: a server breaking the protocol right at the
// hand-off.
type junkProxy struct {
	ln      net.Listener
	backend string
	cfg     *tls.Config
	first   atomic.Bool
}

func newJunkProxy(t *testing.T, backend string, cfg *tls.Config) *junkProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &junkProxy{ln: ln, backend: backend, cfg: cfg}
	p.first.Store(true)
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

func (p *junkProxy) serve(c net.Conn) {
	defer c.Close()
	tc, b, err := nbdscript.AcceptStartTLS(c, p.cfg, p.backend)
	if err != nil {
		return
	}
	defer b.Close()
	junk := p.first.Swap(false)
	goAck := make([]byte, 20)
	binary.BigEndian.PutUint64(goAck, 0x3e889045565a9)
	binary.BigEndian.PutUint32(goAck[8:], 7) // NBD_OPT_GO
	binary.BigEndian.PutUint32(goAck[12:], 1)
	go func() { _, _ = io.Copy(b, tc); b.Close() }()
	buf := make([]byte, 64<<10)
	var seen []byte
	for {
		n, err := b.Read(buf)
		if n > 0 {
			out := buf[:n]
			if junk {
				seen = append(seen, out...)
				if bytes.Contains(seen, goAck) {
					out = append(bytes.Clone(out), "JUNKJUNK"...)
					junk = false
				}
			}
			if _, err := tc.Write(out); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestAttachTLSUndrainedFallsBackOnFreshSession: a server that sends data
// nobody asked for in the record of its GO acknowledgement leaves it in
// crypto/tls, where the kernel would never see it: the offload is refused
// (the probe that found it consumed a byte, so that session is closed), and
// with tls=auto a fresh session goes to the relay, visibly.
func TestAttachTLSUndrainedFallsBackOnFreshSession(t *testing.T) {
	certs := servers.GenerateCerts(t)
	cert, err := tls.LoadX509KeyPair(certs.ServerCertFile, certs.ServerKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	kernelTLSOffered(t) // the offload must be tried to find the junk
	backend := servers.Nbdkit(t, servers.Unix, "memory", "size=1M")
	p := newJunkProxy(t, backend.Address(), &tls.Config{Certificates: []tls.Certificate{cert}})
	k := newFakeKernel(t)
	pl := newPlugin(t, k)
	sp := spec(t, "nbds://"+p.ln.Addr().String()+"/", 1)
	sp.TLS = &nbd.TLSOptions{CAFile: certs.CAFile}
	if _, err := pl.a.Attach(context.Background(), sp); err != nil {
		t.Fatal(err)
	}
	got, err := pl.a.Lookup(context.Background(), "vol")
	if err != nil {
		t.Fatal(err)
	}
	if got.TLS != driver.TLSRelay || !strings.Contains(got.TLSFallback, ktls.ErrUndrained.Error()) {
		t.Fatalf("TLS %q fallback %q; want the relay, because of unread data", got.TLS, got.TLSFallback)
	}
	if err := pl.a.Detach(context.Background(), "vol"); err != nil {
		t.Fatal(err)
	}
}

// TestAttachTLSMixedReportsRelay: a multi-connection tls=auto volume of
// which one connection went to the relay and the other to kernel TLS must
// say so (Attachment, the record for `nbd-csi devices`, the Event), even
// when the relayed one is not the last. Before, the volume reported the
// last connection's mode only, so a relayed connection (which stalls when
// the plugin restarts) hid behind "kernel". The offload is a seam here
// (the host has no tls module): the first refuses as the real one does
// without the module (ErrUnavailable, session intact, so the relay takes
// it), the second "succeeds" with a socket the test keeps quiet; nbdkit
// and the relay are real.
func TestAttachTLSMixedReportsRelay(t *testing.T) {
	certs := servers.GenerateCerts(t)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "memory", "size=1M")
	kernelTLSOffered(t)
	var calls atomic.Int32
	old := kernelTLS
	t.Cleanup(func() { kernelTLS = old })
	kernelTLS = func(c *nbd.Conn) (*os.File, error) {
		if calls.Add(1) == 1 {
			return nil, fmt.Errorf("%w: setsockopt TCP_ULP tls: no such file or directory (no tls module)", ktls.ErrUnavailable)
		}
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		peer := os.NewFile(uintptr(fds[1]), "quiet-peer")
		t.Cleanup(func() { peer.Close() })
		return os.NewFile(uintptr(fds[0]), "fake-ktls"), nil
	}
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	sp := spec(t, srv.TLSURI(""), 2)
	sp.TLS = &nbd.TLSOptions{CAFile: certs.CAFile}
	ctx := context.Background()
	if _, err := p.a.Attach(ctx, sp); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := p.a.Detach(ctx, "vol"); err != nil {
			t.Error(err)
		}
	}()
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d offloads tried, want 2 (a multi-conn export, two connections)", n)
	}
	got, err := p.a.Lookup(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}
	if got.TLS != "mixed" || !strings.Contains(got.TLSFallback, "1 of 2") || !strings.Contains(got.TLSFallback, "no tls module") {
		t.Errorf("Attachment TLS %q fallback %q; want mixed, 1 of 2 connections through the relay and why", got.TLS, got.TLSFallback)
	}
	if mode, reason, err := ReadTLSMode(p.secrets, "vol"); err != nil || mode != "mixed" || !strings.Contains(reason, "no tls module") {
		t.Errorf("recorded mode %q reason %q (%v); want mixed and why", mode, reason, err)
	}
	if ev := p.events(); !slices.Contains(ev, "tls-relay-fallback") {
		t.Errorf("events %v; want a tls-relay-fallback event", ev)
	}
}

func TestSummarizeTLS(t *testing.T) {
	k, r := connTLS{mode: driver.TLSKernel}, connTLS{mode: driver.TLSRelay, fallback: "why"}
	for _, tc := range []struct {
		conns        []connTLS
		mode, reason string
	}{
		{nil, "", ""},
		{[]connTLS{{}, {}}, "", ""},
		{[]connTLS{k, k}, driver.TLSKernel, ""},
		{[]connTLS{r, r}, driver.TLSRelay, "why"},
		{[]connTLS{{mode: driver.TLSRelay}}, driver.TLSRelay, ""}, // tls=relay: no fallback
		{[]connTLS{k, r, k}, driver.TLSMixed, "1 of 3 connections go through the relay: why"},
	} {
		if m, why := summarizeTLS(tc.conns); m != tc.mode || why != tc.reason {
			t.Errorf("summarizeTLS(%v) = %q, %q; want %q, %q", tc.conns, m, why, tc.mode, tc.reason)
		}
	}
}

// kernelTLSOffered makes the tls ULP probe say yes for the test t, so that
// the offload is tried (and refused by the kernel, or a seam) on a host
// without the module.
func kernelTLSOffered(t *testing.T) {
	old := kernelTLSAvailable
	t.Cleanup(func() { kernelTLSAvailable = old })
	kernelTLSAvailable = func() error { return nil }
}

// TestAttachTLSAutoWithoutULPPrefersTLS13: with tls=auto on a kernel
// without the tls ULP the volume uses the relay anyway, so its sessions
// must not be dialled for kernel TLS: no TLS 1.2 preference (a TLS 1.2
// handshake shows the client certificate in clear), no recording. The
// relayed session is TLS 1.3, and the fallback says why. Before, every
// session started at TLS 1.2. The probe is the real one on this host (no
// tls module) unless the module is there, then a seam says no.
func TestAttachTLSAutoWithoutULPPrefersTLS13(t *testing.T) {
	if ktls.Available() == nil {
		old := kernelTLSAvailable
		t.Cleanup(func() { kernelTLSAvailable = old })
		kernelTLSAvailable = func() error { return fmt.Errorf("%w: test: no tls ULP", ktls.ErrUnavailable) }
	}
	certs := servers.GenerateCerts(t)
	srv := servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "--tls-verify-peer", "memory", "size=1M")
	k := newFakeKernel(t)
	p := newPlugin(t, k)
	sp := spec(t, srv.TLSURI(""), 1)
	sp.TLS = &nbd.TLSOptions{CAFile: certs.CAFile, CertFile: certs.ClientCertFile, KeyFile: certs.ClientKeyFile}
	ctx := context.Background()
	if _, err := p.a.Attach(ctx, sp); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := p.a.Detach(ctx, "vol"); err != nil {
			t.Error(err)
		}
	}()
	got, err := p.a.Lookup(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}
	if got.TLS != driver.TLSRelay || !strings.Contains(got.TLSFallback, ktls.ErrUnavailable.Error()) {
		t.Errorf("TLS %q fallback %q; want the relay, because kernel TLS is unavailable", got.TLS, got.TLSFallback)
	}
	w := p.a.watchOf("vol")
	w.mu.Lock()
	var tc *tls.Conn
	if len(w.conns) == 1 && w.conns[0].relay != nil {
		tc, _ = w.conns[0].relay.remote.(*tls.Conn)
	}
	w.mu.Unlock()
	if tc == nil {
		t.Fatal("no relayed TLS session recorded")
	}
	if v := tc.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Errorf("relayed session is %s, want TLS 1.3 (kernel TLS is unavailable: no reason for TLS 1.2)", tls.VersionName(v))
	}
}
