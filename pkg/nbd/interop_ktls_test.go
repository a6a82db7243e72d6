// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
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
	if _, err := c.Stream().Write(req[:]); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 16+4096)
	if _, err := io.ReadFull(c.Stream(), reply); err != nil {
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
