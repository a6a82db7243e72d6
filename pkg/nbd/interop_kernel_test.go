// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// TestInteropKernelProfile dials every server with the kernel profile,
// takes the socket with Conn.File, and then speaks transmission by hand on
// that descriptor, as the kernel would: a 28-byte simple READ request must
// get a 16-byte simple reply (magic 0x67446698) followed by the right data.
// Any handshake byte left unread (option replies, the 124 bytes of
// EXPORT_NAME padding, the oldstyle reserved field) would show up where the
// reply magic is expected. The exports hold nbdkit's pattern: each 8-byte
// word is its own offset.
func TestInteropKernelProfile(t *testing.T) {
	img := filepath.Join(t.TempDir(), "pattern.img")
	patternFile(t, img, 1<<20)
	nbdkit := func(l servers.Listen, args ...string) func(t *testing.T) string {
		return func(t *testing.T) string {
			return servers.Nbdkit(t, l, append(args, "pattern", "size=1M")...).URI("")
		}
	}
	tests := []struct {
		name      string
		uri       func(t *testing.T) string
		handshake nbd.HandshakeStyle
	}{
		{"nbdkit/fixed-newstyle", nbdkit(servers.Unix), nbd.HandshakeFixedNewstyle},
		{"nbdkit/tcp", nbdkit(servers.TCP), nbd.HandshakeFixedNewstyle},
		{"nbdkit/no-sr", nbdkit(servers.Unix, "--no-sr"), nbd.HandshakeFixedNewstyle},
		{"nbdkit/mask-handshake=0", nbdkit(servers.Unix, "--mask-handshake=0"), nbd.HandshakeNewstyle},
		{"nbdkit/mask-handshake=1", nbdkit(servers.TCP, "--mask-handshake=1"), nbd.HandshakeFixedNewstyle},
		{"nbdkit/mask-handshake=2", nbdkit(servers.Unix, "--mask-handshake=2"), nbd.HandshakeNewstyle},
		{"nbdkit/oldstyle", nbdkit(servers.TCP, "--oldstyle"), nbd.HandshakeOldstyle},
		{"qemu-nbd", func(t *testing.T) string {
			return servers.QemuNBD(t, servers.Unix, "-r", "-x", "disk", "-f", "raw", img).URI("disk")
		}, nbd.HandshakeFixedNewstyle},
		{"nbd-server", func(t *testing.T) string {
			return servers.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\nreadonly = true\n").URI("disk")
		}, nbd.HandshakeFixedNewstyle},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			uri := tc.uri(t)
			c, err := nbd.Dial(testCtx(t), mustURI(t, uri), nbd.WithProfile(nbd.ProfileKernel))
			if err != nil {
				t.Fatalf("Dial(%s): %v", uri, err)
			}
			info := c.Export()
			if info.Handshake != tc.handshake {
				t.Errorf("handshake %s, want %s", info.Handshake, tc.handshake)
			}
			if info.StructuredReplies || len(info.MetaContexts) != 0 || info.Flags.Has(nbd.FlagSendDF) {
				t.Errorf("kernel profile negotiated structured replies: sr=%v contexts=%v flags=%s",
					info.StructuredReplies, info.MetaContexts, info.Flags)
			}
			if info.Size != 1<<20 {
				t.Errorf("size %d, want %d", info.Size, 1<<20)
			}
			if err := c.ReadAt(testCtx(t), make([]byte, 512), 0); err == nil {
				t.Errorf("ReadAt on a kernel-profile connection succeeded; it must refuse")
			}
			f, err := c.File()
			if err != nil {
				t.Fatalf("File: %v", err)
			}
			defer f.Close()
			// The kernel keeps its own descriptor; closing the Conn
			// must not disturb it.
			if err := c.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			for i, r := range []struct{ off, n uint64 }{{0, 4096}, {65536, 512}, {1<<20 - 8192, 8192}} {
				rawRead(t, f, uint64(i+1)*0x0101010101, r.off, r.n)
			}
			rawDisconnect(t, f)
		})
	}
}

// TestInteropKernelProfileTLS dials TLS servers with the kernel profile:
// File refuses (the kernel cannot speak TLS), and Stream, the TLS session a
// relay carries to the kernel, speaks simple replies from its first byte.
func TestInteropKernelProfileTLS(t *testing.T) {
	certs := servers.GenerateCerts(t)
	img := filepath.Join(t.TempDir(), "pattern.img")
	patternFile(t, img, 1<<20)
	caOnly := &nbd.TLSOptions{CAFile: certs.CAFile}
	withClient := &nbd.TLSOptions{CAFile: certs.CAFile, CertFile: certs.ClientCertFile, KeyFile: certs.ClientKeyFile}
	tests := []struct {
		name  string
		start func(t *testing.T) string
		tls   *nbd.TLSOptions
	}{
		{"nbdkit", func(t *testing.T) string {
			return servers.Nbdkit(t, servers.TCP, "--tls=require", "--tls-certificates="+certs.Dir, "pattern", "size=1M").TLSURI("")
		}, caOnly},
		{"qemu-nbd", func(t *testing.T) string {
			return servers.QemuNBD(t, servers.Unix, "--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="+certs.Dir,
				"--tls-creds=tls0", "-r", "-x", "disk", "-f", "raw", img).TLSURI("disk")
		}, caOnly},
		{"nbd-server", func(t *testing.T) string {
			return servers.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\nreadonly = true\n",
				"certfile = "+certs.ServerCertFile, "keyfile = "+certs.ServerKeyFile, "cacertfile = "+certs.CAFile).TLSURI("disk")
		}, withClient},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			uri := tc.start(t)
			c, err := nbd.Dial(testCtx(t), mustURI(t, uri), nbd.WithProfile(nbd.ProfileKernel), nbd.WithTLS(tc.tls))
			if err != nil {
				t.Fatalf("Dial(%s): %v", uri, err)
			}
			info := c.Export()
			if !info.TLS || info.StructuredReplies || info.Size != 1<<20 {
				t.Errorf("Dial: tls=%v sr=%v size=%d; want TLS, simple replies, %d bytes", info.TLS, info.StructuredReplies, info.Size, 1<<20)
			}
			if _, err := c.File(); !errors.Is(err, nbd.ErrBadArgument) {
				t.Errorf("File() on a TLS connection = %v, want ErrBadArgument", err)
			}
			st, err := c.Stream()
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			rawRead(t, st, 7, 0, 4096)
			rawRead(t, st, 8, 1<<19, 65536)
			rawDisconnect(t, st)
		})
	}
}

// rawConn is a socket, a dup'd socket file or a TLS session.
type rawConn interface {
	io.ReadWriter
	SetDeadline(time.Time) error
}

// rawRead sends NBD_CMD_READ on f and checks the simple reply and data.
func rawRead(t *testing.T, f rawConn, cookie, off, n uint64) {
	t.Helper()
	_ = f.SetDeadline(time.Now().Add(interopTimeout))
	var req [nbdproto.RequestLen]byte
	binary.BigEndian.PutUint32(req[0:], nbdproto.RequestMagic)
	binary.BigEndian.PutUint16(req[4:], 0)
	binary.BigEndian.PutUint16(req[6:], nbdproto.CmdRead)
	binary.BigEndian.PutUint64(req[8:], cookie)
	binary.BigEndian.PutUint64(req[16:], off)
	binary.BigEndian.PutUint32(req[24:], uint32(n))
	if len(req) != 28 {
		t.Fatalf("request header is %d bytes, want 28", len(req))
	}
	if _, err := f.Write(req[:]); err != nil {
		t.Fatalf("write READ request: %v", err)
	}
	var rep [16]byte
	if _, err := io.ReadFull(f, rep[:]); err != nil {
		t.Fatalf("read reply header: %v", err)
	}
	if m := binary.BigEndian.Uint32(rep[0:]); m != 0x67446698 {
		t.Fatalf("reply magic %#x (reply bytes % x), want the simple reply magic 0x67446698: handshake bytes were left unread", m, rep)
	}
	if e := binary.BigEndian.Uint32(rep[4:]); e != 0 {
		t.Fatalf("READ(%d, %d) failed with NBD error %d", off, n, e)
	}
	if got := binary.BigEndian.Uint64(rep[8:]); got != cookie {
		t.Fatalf("reply cookie %#x, want %#x", got, cookie)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(f, data); err != nil {
		t.Fatalf("read data: %v", err)
	}
	if !bytes.Equal(data, pattern(off, int(n))) {
		t.Fatalf("READ(%d, %d) returned other data than the export holds", off, n)
	}
}

// rawDisconnect sends NBD_CMD_DISC and checks the server closes.
func rawDisconnect(t *testing.T, f rawConn) {
	t.Helper()
	var req [nbdproto.RequestLen]byte
	binary.BigEndian.PutUint32(req[0:], nbdproto.RequestMagic)
	binary.BigEndian.PutUint16(req[6:], nbdproto.CmdDisc)
	if _, err := f.Write(req[:]); err != nil {
		t.Fatalf("write DISC: %v", err)
	}
	_ = f.SetDeadline(time.Now().Add(interopTimeout))
	if n, err := f.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("after NBD_CMD_DISC: read %d bytes, %v; want EOF", n, err)
	}
}
