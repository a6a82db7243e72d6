// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/ktls"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// TestInteropKernelTLSPrepare dials GnuTLS servers (nbdkit, qemu-nbd;
// with and without client certificates) for the kernel with kernel TLS and
// asks for the offload. Offload derives the kernel state and proves it by
// opening the last record of each direction before it touches the socket,
// so where the kernel has no tls module (this host) it must get as far as
// ErrUnavailable, and the session must then still carry NBD in userspace
// (what the relay fallback does). Where the kernel has one, the offload
// must succeed with TLS 1.2 (preferred, see WithKernelTLS). The VM tests
// (test/kernel) cover the kernel side.
func TestInteropKernelTLSPrepare(t *testing.T) {
	certs := servers.GenerateCerts(t)
	for _, srv := range tlsServers[:2] {
		for _, verifyPeer := range []bool{false, true} {
			name := srv.name
			if verifyPeer {
				name += "/client-cert"
			}
			t.Run(name, func(t *testing.T) {
				s := srv.start(t, servers.TCP, certs, verifyPeer)
				opts := &nbd.TLSOptions{CAFile: certs.CAFile}
				if verifyPeer {
					opts.CertFile, opts.KeyFile = certs.ClientCertFile, certs.ClientKeyFile
				}
				c, err := nbd.Dial(testCtx(t), mustURI(t, s.TLSURI(exportOf(srv.name))), nbd.WithTLS(opts), nbd.WithKernelTLS(false))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				f, info, err := c.KernelTLS()
				switch {
				case err == nil:
					f.Close()
					if info.Version != 0x0303 {
						t.Errorf("offloaded version %#x, want TLS 1.2", info.Version)
					}
					return
				case !errors.Is(err, ktls.ErrUnavailable):
					t.Fatalf("KernelTLS = %v, want success or ErrUnavailable (the derived state proven, the kernel lacking tls)", err)
				}
				// Refused offload: the session is intact.
				readOverStream(t, c)
				if _, _, err := c.KernelTLS(); err == nil {
					t.Error("second KernelTLS after a refusal succeeded")
				}
			})
		}
	}
}

// readOverStream sends NBD_CMD_READ of 4096 bytes at 0 over the stream
// and checks the simple reply.
func readOverStream(t *testing.T, c *nbd.Conn) {
	t.Helper()
	var req [28]byte
	binary.BigEndian.PutUint32(req[0:], 0x25609513)
	binary.BigEndian.PutUint64(req[8:], 42)
	binary.BigEndian.PutUint32(req[24:], 4096)
	st, err := c.Stream()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Write(req[:]); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 16+4096)
	if _, err := io.ReadFull(st, reply); err != nil {
		t.Fatal(err)
	}
	if m := binary.BigEndian.Uint32(reply); m != 0x67446698 || binary.BigEndian.Uint32(reply[4:]) != 0 ||
		binary.BigEndian.Uint64(reply[8:]) != 42 || !bytes.Equal(reply[16:], make([]byte, 4096)) {
		t.Fatalf("bad reply header % x", reply[:16])
	}
}

// TestInteropKernelTLS13Only: a server that refuses TLS 1.2 (qemu-nbd with
// a GnuTLS priority without it) answers the kernel-TLS offer of TLS 1.2
// with a protocol_version alert; Dial redials allowing TLS 1.3, and the
// TLS 1.3 state is proven as for TLS 1.2. Before, the alert (which
// crypto/tls reports as a remote-error *net.OpError, not a tls.AlertError)
// was not recognised and the dial failed.
func TestInteropKernelTLS13Only(t *testing.T) {
	certs := servers.GenerateCerts(t)
	img := t.TempDir() + "/disk.img"
	emptyFile(t, img, 1<<20)
	s := servers.QemuNBD(t, servers.TCP,
		"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,priority=NORMAL:-VERS-ALL:+VERS-TLS1.3,dir="+certs.Dir,
		"--tls-creds=tls0", "-x", "disk", "-f", "raw", img)
	c, err := nbd.Dial(testCtx(t), mustURI(t, s.TLSURI("disk")), nbd.WithTLS(&nbd.TLSOptions{CAFile: certs.CAFile}), nbd.WithKernelTLS(false))
	if err != nil {
		t.Fatalf("Dial of a TLS 1.3-only server with kernel TLS: %v", err)
	}
	defer c.Close()
	f, info, err := c.KernelTLS()
	switch {
	case err == nil:
		f.Close()
		if info.Version != 0x0304 {
			t.Errorf("offloaded version %#x, want TLS 1.3", info.Version)
		}
	case !errors.Is(err, ktls.ErrUnavailable):
		t.Fatalf("KernelTLS = %v, want success or ErrUnavailable", err)
	default:
		readOverStream(t, c)
	}
}

// TestInteropKernelTLSDupFailsFirst: KernelTLS must take everything that
// can fail (the dup of the socket for the kernel: EMFILE, ENFILE) before
// it moves the session into the kernel. Before, a failed dup after a
// successful offload returned an ordinary error with the session in the
// kernel, and tls=auto fell back to the relay on the same *tls.Conn:
// crypto/tls then encrypted at the sequence numbers the kernel also uses
// (AES-GCM nonce reuse under one key). The offload is a seam here (the
// host has no tls module); nbdkit is real.
func TestInteropKernelTLSDupFailsFirst(t *testing.T) {
	certs := servers.GenerateCerts(t)
	srv := tlsServers[0]
	s := srv.start(t, servers.TCP, certs, false)
	offloaded := false
	nbd.SetKernelTLSSeams(t,
		func(*tls.Conn, *ktls.Recorder) (*ktls.Info, error) { offloaded = true; return &ktls.Info{}, nil },
		func(net.Conn) (*os.File, error) { return nil, syscall.EMFILE })
	c, err := nbd.Dial(testCtx(t), mustURI(t, s.TLSURI(exportOf(srv.name))), nbd.WithTLS(&nbd.TLSOptions{CAFile: certs.CAFile}), nbd.WithKernelTLS(false))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := c.KernelTLS(); !errors.Is(err, syscall.EMFILE) {
		t.Fatalf("KernelTLS with a failing dup = %v, want EMFILE", err)
	}
	if offloaded {
		t.Fatal("KernelTLS moved the session into the kernel before the dup that failed: the session is the kernel's, yet the error invites a relay on it")
	}
	if c.InKernel() {
		t.Fatal("InKernel after a failed dup")
	}
	readOverStream(t, c) // untouched: the relay may carry it
}

// TestInteropKernelTLSBrokenRefusesStream: once an offload left the
// session partly in the kernel (ErrBroken), the Conn must refuse to hand
// out the *tls.Conn, so no fallback can encrypt under the kernel's keys.
func TestInteropKernelTLSBrokenRefusesStream(t *testing.T) {
	certs := servers.GenerateCerts(t)
	srv := tlsServers[0]
	s := srv.start(t, servers.TCP, certs, false)
	var dup *os.File
	nbd.SetKernelTLSSeams(t,
		func(*tls.Conn, *ktls.Recorder) (*ktls.Info, error) { return nil, ktls.ErrBroken },
		func(raw net.Conn) (f *os.File, err error) {
			dup, err = raw.(*net.TCPConn).File()
			return dup, err
		})
	c, err := nbd.Dial(testCtx(t), mustURI(t, s.TLSURI(exportOf(srv.name))), nbd.WithTLS(&nbd.TLSOptions{CAFile: certs.CAFile}), nbd.WithKernelTLS(false))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := c.KernelTLS(); !errors.Is(err, ktls.ErrBroken) {
		t.Fatalf("KernelTLS = %v, want ErrBroken", err)
	}
	if !c.InKernel() {
		t.Error("InKernel false after ErrBroken")
	}
	if st, err := c.Stream(); !errors.Is(err, nbd.ErrBadArgument) || st != nil {
		t.Errorf("Stream after a broken offload = %v, %v; want ErrBadArgument", st, err)
	}
	if _, err := dup.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("the dup taken for the kernel is still open after the failed offload (Stat: %v)", err)
	}
}
