// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"crypto/tls"
	"net"
	"slices"
	"testing"

	"github.com/nbd-csi/nbd-csi/internal/servers"
	"github.com/nbd-csi/nbd-csi/pkg/ktls"
)

// TestKernelTLSConfigKeepsOffloadSuites: the kernel-TLS configuration
// offers only the TLS 1.2 suites the kernel can take, on the first try
// (TLS 1.2 only) and on the retry allowing TLS 1.3 alike. Before, the
// retry went back to Go's default suites, so a server that refused the
// first try (or an attacker who closed it) got a TLS 1.2 session with a
// suite the offload refuses (ChaCha20, CBC): the volume went to the
// relay. A real crypto/tls handshake with a server offering only
// ChaCha20 in TLS 1.2 must therefore fail on the retry too.
func TestKernelTLSConfigKeepsOffloadSuites(t *testing.T) {
	certs := servers.GenerateCerts(t)
	u, err := ParseURI("nbds://127.0.0.1/x?tls-certificates=" + certs.Dir)
	if err != nil {
		t.Fatal(err)
	}
	srvCert, err := tls.LoadX509KeyPair(certs.ServerCertFile, certs.ServerKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, allow13 := range []bool{false, true} {
		c := newConfig([]Option{WithKernelTLS(allow13)})
		cfg, err := c.tlsConfig(u)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(cfg.CipherSuites, ktls.OffloadCipherSuites) {
			t.Errorf("allow13=%v: CipherSuites %v, want the offloadable %v", allow13, cfg.CipherSuites, ktls.OffloadCipherSuites)
		}
		cs, p := net.Pipe()
		srv := tls.Server(p, &tls.Config{
			Certificates: []tls.Certificate{srvCert},
			MaxVersion:   tls.VersionTLS12,
			CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256},
		})
		go func() { _ = srv.Handshake(); srv.Close() }()
		cl := tls.Client(cs, cfg)
		err = cl.Handshake()
		if err == nil {
			t.Errorf("allow13=%v: negotiated %s with a ChaCha20-only TLS 1.2 server; the kernel cannot take it", allow13, tls.CipherSuiteName(cl.ConnectionState().CipherSuite))
		}
		cl.Close()
	}
}
