// SPDX-License-Identifier: Apache-2.0

package servers

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Certs is a throw-away PKI in one directory, laid out as qemu's
// tls-creds-x509 dir=, nbdkit's --tls-certificates and libnbd's
// tls-certificates= URI parameter expect:
//
//	ca-cert.pem                      the CA
//	server-cert.pem, server-key.pem  SAN 127.0.0.1, ::1, localhost
//	client-cert.pem, client-key.pem  CN nbd-csi-test-client
type Certs struct {
	Dir                           string
	CAFile                        string
	ServerCertFile, ServerKeyFile string
	ClientCertFile, ClientKeyFile string
	// ClientDir holds only ca-cert.pem, client-cert.pem and
	// client-key.pem: what a client, not the server, should get.
	ClientDir string
	// CADir holds only ca-cert.pem (a client without a certificate).
	CADir string
}

// GenerateCerts creates a CA, a server certificate for 127.0.0.1, ::1 and
// localhost, and a client certificate, with ECDSA P-256 keys. Key usages
// satisfy qemu's sanity checks: the CA may sign certificates; the leaf
// certificates are no CA, allow digital signature and key encipherment, and
// carry the serverAuth or clientAuth purpose.
func GenerateCerts(t testing.TB) *Certs {
	t.Helper()
	dir := t.TempDir()
	c := &Certs{
		Dir:            dir,
		CAFile:         filepath.Join(dir, "ca-cert.pem"),
		ServerCertFile: filepath.Join(dir, "server-cert.pem"),
		ServerKeyFile:  filepath.Join(dir, "server-key.pem"),
		ClientCertFile: filepath.Join(dir, "client-cert.pem"),
		ClientKeyFile:  filepath.Join(dir, "client-key.pem"),
		ClientDir:      filepath.Join(dir, "client"),
		CADir:          filepath.Join(dir, "ca-only"),
	}
	now := time.Now()
	caKey := newKey(t)
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "nbd-csi test CA", Organization: []string{"nbd-csi tests"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("create CA certificate: %v", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatalf("parse CA certificate: %v", err)
	}

	leaf := func(cn string, usage x509.ExtKeyUsage, hosts bool) ([]byte, *ecdsa.PrivateKey) {
		key := newKey(t)
		tmpl := &x509.Certificate{
			SerialNumber:          serial(t),
			Subject:               pkix.Name{CommonName: cn, Organization: []string{"nbd-csi tests"}},
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.Add(24 * time.Hour),
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage:           []x509.ExtKeyUsage{usage},
		}
		if hosts {
			tmpl.DNSNames = []string{"localhost"}
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatalf("create %s certificate: %v", cn, err)
		}
		return der, key
	}
	srvDER, srvKey := leaf("localhost", x509.ExtKeyUsageServerAuth, true)
	cliDER, cliKey := leaf("nbd-csi-test-client", x509.ExtKeyUsageClientAuth, false)

	writePEM(t, c.CAFile, "CERTIFICATE", caDER, 0o644)
	writePEM(t, c.ServerCertFile, "CERTIFICATE", srvDER, 0o644)
	writePEM(t, c.ServerKeyFile, "PRIVATE KEY", pkcs8(t, srvKey), 0o600)
	writePEM(t, c.ClientCertFile, "CERTIFICATE", cliDER, 0o644)
	writePEM(t, c.ClientKeyFile, "PRIVATE KEY", pkcs8(t, cliKey), 0o600)
	for _, d := range []string{c.ClientDir, c.CADir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(d, "ca-cert.pem"), "CERTIFICATE", caDER, 0o644)
	}
	writePEM(t, filepath.Join(c.ClientDir, "client-cert.pem"), "CERTIFICATE", cliDER, 0o644)
	writePEM(t, filepath.Join(c.ClientDir, "client-key.pem"), "PRIVATE KEY", pkcs8(t, cliKey), 0o600)
	return c
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("generate key: %v", err)
	}
	return k
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatalf("serial: %v", err)
	}
	return n.Add(n, big.NewInt(1))
}

func pkcs8(t testing.TB, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	b, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatalf("marshal key: %v", err)
	}
	return b
}

func writePEM(t testing.TB, path, typ string, der []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}
