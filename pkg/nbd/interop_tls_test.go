// SPDX-License-Identifier: Apache-2.0

package nbd_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/nbd"
)

// tlsServer starts a TLS-requiring server. verifyPeer makes it demand a
// client certificate signed by the CA.
type tlsServer struct {
	name  string
	start func(t *testing.T, l servers.Listen, c *servers.Certs, verifyPeer bool) *servers.Server
	// alwaysVerifiesPeer: nbd-server 3.24 fails every TLS handshake
	// without a valid client certificate (its verify_cert callback runs
	// unconditionally and cacertfile is mandatory).
	alwaysVerifiesPeer bool
}

// clientTLS returns the client's TLS material for srv: the CA, plus the
// client certificate when the server insists on one.
func (srv tlsServer) clientTLS(c *servers.Certs) (opts nbd.TLSOptions, dir string) {
	if srv.alwaysVerifiesPeer {
		return nbd.TLSOptions{CAFile: c.CAFile, CertFile: c.ClientCertFile, KeyFile: c.ClientKeyFile}, c.ClientDir
	}
	return nbd.TLSOptions{CAFile: c.CAFile}, c.CADir
}

var tlsServers = []tlsServer{
	{"nbdkit", func(t *testing.T, l servers.Listen, c *servers.Certs, verifyPeer bool) *servers.Server {
		args := []string{"--tls=require", "--tls-certificates=" + c.Dir}
		if verifyPeer {
			args = append(args, "--tls-verify-peer")
		}
		return servers.Nbdkit(t, l, append(args, "memory", "size=1M")...)
	}, false},
	{"qemu-nbd", func(t *testing.T, l servers.Listen, c *servers.Certs, verifyPeer bool) *servers.Server {
		img := t.TempDir() + "/disk.img"
		emptyFile(t, img, 1<<20)
		vp := "off"
		if verifyPeer {
			vp = "on"
		}
		return servers.QemuNBD(t, l,
			"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer="+vp+",dir="+c.Dir,
			"--tls-creds=tls0", "-x", "disk", "-f", "raw", img)
	}, false},
	{"nbd-server", func(t *testing.T, l servers.Listen, c *servers.Certs, verifyPeer bool) *servers.Server {
		img := t.TempDir() + "/disk.img"
		emptyFile(t, img, 1<<20)
		return servers.NBDServer(t, l, "[disk]\nexportname = "+img+"\n",
			"certfile = "+c.ServerCertFile, "keyfile = "+c.ServerKeyFile, "cacertfile = "+c.CAFile, "force_tls = true")
	}, true},
}

// exportOf names the export each TLS server serves.
func exportOf(server string) string {
	if server == "nbdkit" {
		return ""
	}
	return "disk"
}

// TestInteropTLS runs the TLS cases against every server that does x509:
// no TLS configured → ErrTLSRequired with advice; the right CA → an
// encrypted session that moves data; a wrong CA or a wrong name →
// certificate verification errors; a client certificate when the server
// verifies peers.
func TestInteropTLS(t *testing.T) {
	certs := servers.GenerateCerts(t)
	other := servers.GenerateCerts(t)
	for _, srv := range tlsServers {
		for _, l := range []servers.Listen{servers.TCP, servers.Unix} {
			t.Run(srv.name+"/"+l.String(), func(t *testing.T) {
				s := srv.start(t, l, certs, false)
				export := exportOf(srv.name)

				clientOpts, clientDir := srv.clientTLS(certs)
				withTLS := func(mod func(*nbd.TLSOptions)) nbd.Option {
					o := clientOpts
					if mod != nil {
						mod(&o)
					}
					return nbd.WithTLS(&o)
				}

				// Plaintext: refused, and the error says why and how to
				// fix it.
				_, err := nbd.Probe(testCtx(t), mustURI(t, s.URI(export)))
				if !errors.Is(err, nbd.ErrTLSRequired) || !strings.Contains(err.Error(), "TLS required") ||
					!strings.Contains(err.Error(), "use an nbds://") {
					t.Errorf("plaintext Probe = %v, want an error wrapping ErrTLSRequired", err)
				}
				c, err := nbd.Dial(testCtx(t), mustURI(t, s.URI(export)))
				if !errors.Is(err, nbd.ErrTLSRequired) || !strings.Contains(err.Error(), "use an nbds:// or nbds+unix:// URI") {
					t.Errorf("plaintext Dial = %v, want an error wrapping ErrTLSRequired that names the remedy", err)
				}
				if c != nil {
					c.Close()
				}

				if _, err := nbd.List(testCtx(t), mustURI(t, s.URI(""))); !errors.Is(err, nbd.ErrTLSRequired) {
					t.Errorf("plaintext List = %v, want an error wrapping ErrTLSRequired", err)
				}
				list, err := nbd.List(testCtx(t), mustURI(t, s.TLSURI("")), withTLS(nil))
				if err != nil || !slices.ContainsFunc(list, func(e nbd.ListEntry) bool { return e.Name == export }) {
					t.Errorf("List over TLS = %+v, %v; want a list naming %q", list, err, export)
				}

				// The CA through the URI, as libnbd spells it.
				uri := s.TLSURI(export) + sep(s.TLSURI(export)) + "tls-certificates=" + clientDir
				info := compareWithNbdinfo(t, uri)
				if !info.TLS {
					t.Errorf("Probe(%s).TLS = false", uri)
				}
				// The CA through options; data moves.
				c = dial(t, s.TLSURI(export), userspace, withTLS(nil))
				if !c.Export().TLS {
					t.Errorf("Dial: TLS = false")
				}
				checkReadWrite(t, c, 4096, 64<<10)
				if _, err := c.File(); !errors.Is(err, nbd.ErrBadArgument) {
					t.Errorf("File() on a TLS connection = %v, want ErrBadArgument", err)
				}

				// Wrong CA.
				_, err = nbd.Probe(testCtx(t), mustURI(t, s.TLSURI(export)), withTLS(func(o *nbd.TLSOptions) { o.CAFile = other.CAFile }))
				var verr *tls.CertificateVerificationError
				var uerr x509.UnknownAuthorityError
				if !errors.As(err, &verr) || !errors.As(err, &uerr) {
					t.Errorf("Probe with the wrong CA = %v, want a certificate verification error (unknown authority)", err)
				}
				// Wrong name.
				_, err = nbd.Probe(testCtx(t), mustURI(t, s.TLSURI(export)), withTLS(func(o *nbd.TLSOptions) { o.ServerName = "wrong.example" }))
				var herr x509.HostnameError
				if !errors.As(err, &herr) {
					t.Errorf("Probe with the wrong server name = %v, want a hostname verification error", err)
				}
				// No verification still encrypts.
				if info := probe(t, s.TLSURI(export), withTLS(func(o *nbd.TLSOptions) { o.CAFile, o.InsecureSkipVerify = "", true })); !info.TLS {
					t.Errorf("Probe with InsecureSkipVerify: TLS = false")
				}
			})
		}
	}
}

// TestInteropTLSClientCertificate runs against servers that verify peers:
// without a client certificate the handshake fails, with one it succeeds.
func TestInteropTLSClientCertificate(t *testing.T) {
	certs := servers.GenerateCerts(t)
	other := servers.GenerateCerts(t)
	for _, srv := range tlsServers {
		t.Run(srv.name, func(t *testing.T) {
			s := srv.start(t, servers.TCP, certs, true)
			export := exportOf(srv.name)
			u := mustURI(t, s.TLSURI(export))
			_, err := nbd.Probe(testCtx(t), u, nbd.WithTLS(&nbd.TLSOptions{CAFile: certs.CAFile}))
			if err == nil {
				t.Errorf("Probe without a client certificate succeeded")
			}
			_, err = nbd.Probe(testCtx(t), u, nbd.WithTLS(&nbd.TLSOptions{
				CAFile: certs.CAFile, CertFile: other.ClientCertFile, KeyFile: other.ClientKeyFile}))
			if err == nil {
				t.Errorf("Probe with a client certificate from another CA succeeded")
			}
			opt := nbd.WithTLS(&nbd.TLSOptions{CAFile: certs.CAFile, CertFile: certs.ClientCertFile, KeyFile: certs.ClientKeyFile})
			if info := probe(t, u.String(), opt); !info.TLS {
				t.Errorf("Probe with a client certificate: TLS = false")
			}
			// The tls-certificates directory supplies the client
			// certificate too.
			uri := s.TLSURI(export) + sep(s.TLSURI(export)) + "tls-certificates=" + certs.ClientDir
			c := dial(t, uri, userspace)
			checkReadWrite(t, c, 0, 4096)
		})
	}
}

// TestInteropTLSUnavailable asks for TLS from servers that cannot do it:
// the client fails with ErrTLSUnavailable and never continues in plaintext.
func TestInteropTLSUnavailable(t *testing.T) {
	img := t.TempDir() + "/disk.img"
	emptyFile(t, img, 1<<20)
	tests := []struct {
		name  string
		start func(t *testing.T) *servers.Server
	}{
		{"nbdkit/tls=off", func(t *testing.T) *servers.Server {
			return servers.Nbdkit(t, servers.TCP, "--tls=off", "memory", "size=1M")
		}},
		{"nbdkit/oldstyle", func(t *testing.T) *servers.Server {
			return servers.Nbdkit(t, servers.TCP, "--oldstyle", "memory", "size=1M")
		}},
		{"nbdkit/newstyle", func(t *testing.T) *servers.Server {
			return servers.Nbdkit(t, servers.TCP, "--mask-handshake=0", "memory", "size=1M")
		}},
		{"qemu-nbd", func(t *testing.T) *servers.Server {
			return servers.QemuNBD(t, servers.TCP, "-f", "raw", img)
		}},
		{"nbd-server", func(t *testing.T) *servers.Server {
			return servers.NBDServer(t, servers.TCP, "[disk]\nexportname = "+img+"\n")
		}},
	}
	certs := servers.GenerateCerts(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.start(t)
			export := ""
			if tc.name == "nbd-server" {
				export = "disk"
			}
			for _, profile := range []nbd.Profile{nbd.ProfileKernel, nbd.ProfileUserspace} {
				opt := nbd.WithTLS(&nbd.TLSOptions{CAFile: certs.CAFile})
				_, err := nbd.Probe(testCtx(t), mustURI(t, s.TLSURI(export)), opt, nbd.WithProfile(profile))
				if !errors.Is(err, nbd.ErrTLSUnavailable) {
					t.Errorf("Probe(%s, %s) = %v, want an error wrapping ErrTLSUnavailable", s.TLSURI(export), profile, err)
				}
				c, err := nbd.Dial(testCtx(t), mustURI(t, s.TLSURI(export)), opt, nbd.WithProfile(profile))
				if !errors.Is(err, nbd.ErrTLSUnavailable) {
					t.Errorf("Dial(%s, %s) = %v, want an error wrapping ErrTLSUnavailable", s.TLSURI(export), profile, err)
				}
				if c != nil {
					c.Close()
				}
			}
			// The server still works in plaintext: the refusal was
			// about TLS, not a broken server.
			if info := probe(t, s.URI(export)); info.TLS {
				t.Errorf("plaintext Probe reports TLS")
			}
		})
	}
}

// sep returns the separator to append a query parameter to uri.
func sep(uri string) string {
	if strings.Contains(uri, "?") {
		return "&"
	}
	return "?"
}

// checkReadWrite writes n random bytes at off through c, reads them back
// and compares.
func checkReadWrite(t *testing.T, c *nbd.Conn, off uint64, n int) {
	t.Helper()
	ctx := testCtx(t)
	data := randomBytes(t, n)
	if err := c.WriteAt(ctx, data, off, 0); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	got := make([]byte, n)
	if err := c.ReadAt(ctx, got, off); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("ReadAt returned other bytes than WriteAt wrote")
	}
}

// TestInteropTLSParameterImpliesTLS: a TLS parameter on an nbd:// URI makes
// TLS mandatory. Against a server that offers TLS but does not require it
// (nbdkit --tls=on) the session is encrypted; against one without TLS the
// connection is refused, never continued in plaintext.
func TestInteropTLSParameterImpliesTLS(t *testing.T) {
	certs := servers.GenerateCerts(t)
	offers := servers.Nbdkit(t, servers.TCP, "--tls=on", "--tls-certificates="+certs.Dir, "memory", "size=1M")
	plain := servers.Nbdkit(t, servers.TCP, "--tls=off", "memory", "size=1M")
	for _, param := range []string{"tls-certificates=" + certs.CADir, "tls-hostname=localhost&tls-certificates=" + certs.CADir, "tls-verify-peer=0", "tls-type=x509&tls-verify-peer=0"} {
		t.Run(param, func(t *testing.T) {
			u, err := nbd.ParseURI(offers.URI("") + "?" + param)
			if err != nil {
				t.Fatal(err)
			}
			info, err := nbd.Probe(testCtx(t), u)
			if err != nil {
				t.Fatalf("Probe(%s): %v", u, err)
			}
			if !info.TLS {
				t.Fatalf("Probe(%s) negotiated plaintext; a TLS parameter must make TLS mandatory", u)
			}
			u, err = nbd.ParseURI(plain.URI("") + "?" + param)
			if err != nil {
				t.Fatal(err)
			}
			info, err = nbd.Probe(testCtx(t), u)
			if err == nil {
				t.Fatalf("Probe(%s) against a server without TLS succeeded (tls=%v); want a refusal", u, info.TLS)
			}
			t.Logf("refused: %v", err)
		})
	}
}
