// SPDX-License-Identifier: Apache-2.0

package nbd

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/nbd-csi/nbd-csi/pkg/ktls"
	"github.com/nbd-csi/nbd-csi/pkg/nbd/internal/nbdproto"
)

// DefaultHandshakeTimeout bounds connect plus handshake when the caller's
// context has no deadline, so a silent server never hangs the caller.
const DefaultHandshakeTimeout = 30 * time.Second

// Option configures Dial, Probe and List.
type Option func(*config)

type config struct {
	limits           ListLimits
	profile          Profile
	tls              *TLSOptions
	metaContexts     []string
	handshakeTimeout time.Duration
	netDialer        net.Dialer
	// kernelTLS prepares TLS sessions for Conn.KernelTLS; kernelTLS13
	// lets them use TLS 1.3 (see WithKernelTLS).
	kernelTLS, kernelTLS13 bool
}

func newConfig(opts []Option) *config {
	c := &config{
		handshakeTimeout: DefaultHandshakeTimeout,
		metaContexts:     []string{nbdproto.MetaBaseAllocation},
		limits:           DefaultListLimits,
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// ListLimits is the budget for one server's NBD_OPT_LIST answer. A server
// past it makes List fail with a *LimitError naming the server and the
// limit, before the entry past it is kept.
type ListLimits struct {
	// Exports is the most exports one listing may hold.
	Exports int
	// Bytes is the most bytes of names plus descriptions one listing may
	// hold.
	Bytes int
}

// DefaultListLimits is the budget unless WithListLimits says otherwise:
// 16,384 exports and 16 MiB of names and descriptions. A listing at the
// limit costs the client well under 100 MB.
var DefaultListLimits = ListLimits{Exports: 16384, Bytes: 16 << 20}

// WithListLimits sets the listing budget; zero fields keep the defaults.
func WithListLimits(l ListLimits) Option {
	return func(c *config) {
		if l.Exports > 0 {
			c.limits.Exports = l.Exports
		}
		if l.Bytes > 0 {
			c.limits.Bytes = l.Bytes
		}
	}
}

// WithProfile selects the negotiation profile (default ProfileKernel).
func WithProfile(p Profile) Option { return func(c *config) { c.profile = p } }

// WithTLS asks for TLS with the given material. Once TLS is asked for, by
// this option or by an nbds URI, the connection fails rather than continue
// in plaintext.
func WithTLS(t *TLSOptions) Option { return func(c *config) { c.tls = t } }

// WithKernelTLS prepares a TLS connection so that Conn.KernelTLS can move
// its session into the kernel's TLS layer. It changes nothing for a
// plaintext connection and nothing about verification.
//
// Such a connection offers TLS 1.2 with the ECDHE AES-GCM suites first:
// the kernel can do a TLS 1.2 session for its whole life, while in TLS 1.3
// the server may update its keys (GnuTLS does after 2^24 records with
// AES-GCM), which the kernel cannot follow with no userspace watching: the
// connection then ends and must be replaced. A TLS 1.2 handshake that
// fails for any reason but a refused server certificate is tried again
// allowing TLS 1.3 (servers refuse TLS 1.2 differently: an alert, or just
// closing); allow13 allows it from the start. Both offer only the
// offloadable suites for TLS 1.2 (ktls.OffloadCipherSuites): a server that
// speaks TLS 1.2 with nothing else (e.g. ChaCha20 only) needs tls=relay.
func WithKernelTLS(allow13 bool) Option {
	return func(c *config) { c.kernelTLS, c.kernelTLS13 = true, allow13 }
}

// WithMetaContexts sets the metadata contexts requested with the userspace
// profile (default base:allocation). None disables NBD_OPT_SET_META_CONTEXT.
func WithMetaContexts(names ...string) Option {
	return func(c *config) { c.metaContexts = names }
}

// WithHandshakeTimeout bounds connect plus handshake when the context has no
// deadline (default DefaultHandshakeTimeout).
func WithHandshakeTimeout(d time.Duration) Option {
	return func(c *config) { c.handshakeTimeout = d }
}

// TLSOptions is the TLS material for a connection. Paths are PEM files.
type TLSOptions struct {
	// CAFile is the CA bundle to verify the server with; empty means the
	// system roots.
	CAFile string
	// CertFile and KeyFile are the client certificate and key, for servers
	// that verify clients. Both or neither.
	CertFile, KeyFile string
	// CAPEM, CertPEM and KeyPEM give the same material in memory (e.g. from
	// a Kubernetes secret); they are used when the file fields are empty.
	CAPEM, CertPEM, KeyPEM []byte
	// ServerName overrides the name checked in the server certificate.
	ServerName string
	// InsecureSkipVerify disables verification of the server certificate.
	// Encryption still applies.
	InsecureSkipVerify bool
}

// tlsConfig builds the crypto/tls configuration for u. It returns nil when
// neither the URI nor the options ask for TLS.
func (c *config) tlsConfig(u *URI) (*tls.Config, error) {
	if !u.TLS() && c.tls == nil {
		return nil, nil
	}
	o := TLSOptions{}
	if c.tls != nil {
		o = *c.tls
	}
	if u.TLSCertificates != "" {
		dir := u.TLSCertificates
		if o.CAFile == "" && o.CAPEM == nil {
			o.CAFile = filepath.Join(dir, "ca-cert.pem")
		}
		if o.CertFile == "" && o.CertPEM == nil {
			if _, err := os.Stat(filepath.Join(dir, "client-cert.pem")); err == nil {
				o.CertFile = filepath.Join(dir, "client-cert.pem")
				o.KeyFile = filepath.Join(dir, "client-key.pem")
			}
		}
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.kernelTLS {
		// TLS 1.2 only with the suites the kernel can take, on the
		// first try and on the retry that allows TLS 1.3 alike (else
		// closing the first try would get a suite Offload refuses).
		// TLS 1.3 suites are not configurable in crypto/tls.
		cfg.CipherSuites = ktls.OffloadCipherSuites
		if !c.kernelTLS13 {
			cfg.MaxVersion = tls.VersionTLS12
		}
	}
	cfg.ServerName = o.ServerName
	if cfg.ServerName == "" {
		cfg.ServerName = u.ServerName()
	}
	cfg.InsecureSkipVerify = o.InsecureSkipVerify || !u.TLSVerifyPeer
	if !cfg.InsecureSkipVerify && cfg.ServerName == "" {
		return nil, fmt.Errorf("%w: TLS over a unix socket needs tls-hostname (the name in the server certificate)", ErrBadArgument)
	}

	caPEM := o.CAPEM
	if o.CAFile != "" {
		b, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read TLS CA: %w", err)
		}
		caPEM = b
	}
	if caPEM != nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("%w: TLS CA contains no PEM certificate", ErrBadArgument)
		}
		cfg.RootCAs = pool
	}

	certPEM, keyPEM := o.CertPEM, o.KeyPEM
	if o.CertFile != "" || o.KeyFile != "" {
		if o.CertFile == "" || o.KeyFile == "" {
			return nil, fmt.Errorf("%w: TLS client certificate and key must be given together", ErrBadArgument)
		}
		var err error
		if certPEM, err = os.ReadFile(o.CertFile); err != nil {
			return nil, fmt.Errorf("read TLS client certificate: %w", err)
		}
		if keyPEM, err = os.ReadFile(o.KeyFile); err != nil {
			// The error names only the path, never the content.
			return nil, fmt.Errorf("read TLS client key: %w", err)
		}
	}
	if (certPEM == nil) != (keyPEM == nil) {
		return nil, fmt.Errorf("%w: TLS client certificate and key must be given together", ErrBadArgument)
	}
	if certPEM != nil {
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			// crypto/tls errors do not include key material.
			return nil, fmt.Errorf("%w: TLS client certificate/key: %v", ErrBadArgument, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}
