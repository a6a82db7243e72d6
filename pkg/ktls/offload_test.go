// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"io"
	"math/big"
	"net"
	"testing"
	"time"
)

// testCert returns a self-signed ECDSA server certificate for "server".
func testCert(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "server"}, DNSNames: []string{"server"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, IsCA: true, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// session is a client session over a Recorder to a crypto/tls server on
// loopback.
type session struct {
	raw  net.Conn
	rec  *Recorder
	tc   *tls.Conn
	srv  *tls.Conn
	errs chan error
}

func dialPair(t *testing.T, version uint16, suite uint16) *session {
	t.Helper()
	cert, pool := testCert(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srvCh := make(chan *tls.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvCh <- nil
			return
		}
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: version, MaxVersion: version}
		if suite != 0 {
			cfg.CipherSuites = []uint16{suite}
		}
		s := tls.Server(c, cfg)
		if err := s.Handshake(); err != nil {
			c.Close()
			srvCh <- nil
			return
		}
		srvCh <- s
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	rec := NewRecorder(raw)
	tc := tls.Client(rec, &tls.Config{RootCAs: pool, ServerName: "server", MinVersion: tls.VersionTLS12,
		MaxVersion: version, CipherSuites: OffloadCipherSuites, KeyLogWriter: rec.KeyLog()})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := rec.HandshakeDone(); err != nil {
		t.Fatal(err)
	}
	srv := <-srvCh
	if srv == nil {
		t.Fatal("server handshake failed")
	}
	t.Cleanup(func() { raw.Close(); srv.Close() })
	return &session{raw: raw, rec: rec, tc: tc, srv: srv}
}

// exchange runs a request/response round like NBD option haggling: the
// client writes req, the server answers with replies (one Write each,
// large ones span several records).
func (s *session) exchange(t *testing.T, req []byte, replies ...[]byte) {
	t.Helper()
	go func() {
		buf := make([]byte, len(req))
		if _, err := io.ReadFull(s.srv, buf); err != nil {
			return
		}
		for _, r := range replies {
			if _, err := s.srv.Write(r); err != nil {
				return
			}
		}
	}()
	if _, err := s.tc.Write(req); err != nil {
		t.Fatal(err)
	}
	want := bytes.Join(replies, nil)
	got := make([]byte, len(want))
	if _, err := io.ReadFull(s.tc, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("reply corrupted")
	}
}

// seal builds the record the kernel would send at seq with st's TX state.
func seal(t *testing.T, st *state, seq uint64, plain []byte) []byte {
	t.Helper()
	b, _ := aes.NewCipher(st.tx.key)
	a, _ := cipher.NewGCM(b)
	if st.version == tls.VersionTLS13 {
		inner := append(append([]byte{}, plain...), typeApplicationData)
		hdr := []byte{typeApplicationData, 3, 3, 0, 0}
		binary.BigEndian.PutUint16(hdr[3:], uint16(len(inner)+a.Overhead()))
		nonce := st.tx.iv
		for i := 0; i < 8; i++ {
			nonce[4+i] ^= byte(seq >> (56 - 8*i))
		}
		return a.Seal(hdr, nonce[:], inner, hdr)
	}
	hdr := []byte{typeApplicationData, 3, 3, 0, 0}
	binary.BigEndian.PutUint16(hdr[3:], uint16(8+len(plain)+a.Overhead()))
	var nonce [12]byte
	copy(nonce[:4], st.tx.iv[:4])
	binary.BigEndian.PutUint64(nonce[4:], seq)
	var ad [13]byte
	binary.BigEndian.PutUint64(ad[:], seq)
	ad[8], ad[9], ad[10] = typeApplicationData, 3, 3
	binary.BigEndian.PutUint16(ad[11:], uint16(len(plain)))
	return a.Seal(append(hdr, nonce[4:]...), nonce[:], plain, ad[:])
}

// readRaw reads one record from the socket and opens it at seq with st's
// RX state, as the kernel would.
func readRaw(t *testing.T, st *state, c net.Conn, seq uint64) {
	t.Helper()
	hdr := make([]byte, recordHeaderLen)
	if _, err := io.ReadFull(c, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(c, body); err != nil {
		t.Fatal(err)
	}
	if err := st.open(append(hdr, body...), st.rx, seq+1, false); err != nil {
		t.Fatalf("kernel-side open of the record at %d: %v", seq, err)
	}
}

// TestPrepareAgainstCryptoTLS runs real crypto/tls sessions, derives the
// kernel state and then speaks as the kernel would with it: the server's
// crypto/tls must accept what the derived TX state seals, and the derived
// RX state must open what the server sends next, at the counted sequence
// numbers. Nothing of the next record may have been read by crypto/tls.
func TestPrepareAgainstCryptoTLS(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 3000) // 48000 bytes: 3 records
	for _, tc := range []struct {
		name    string
		version uint16
		suite   uint16
	}{
		{"tls12-aes128", tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
		{"tls12-aes256", tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384},
		{"tls13", tls.VersionTLS13, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := dialPair(t, tc.version, tc.suite)
			s.exchange(t, []byte("option-1"), []byte("reply-a"), []byte("reply-b"))
			s.exchange(t, big, big, []byte("ack"))
			st, err := s.rec.prepare(s.tc)
			if err != nil {
				t.Fatal(err)
			}
			if tc.suite != 0 && st.suite.name != suites[tc.suite].name {
				t.Fatalf("suite %v", st.suite.name)
			}
			// Kernel TX: three records the server must read in order.
			go func() {
				for i := uint64(0); i < 3; i++ {
					if _, err := s.raw.Write(seal(t, st, st.txSeq+i, []byte{'k', byte('0' + i)})); err != nil {
						return
					}
				}
			}()
			got := make([]byte, 6)
			if _, err := io.ReadFull(s.srv, got); err != nil || string(got) != "k0k1k2" {
				t.Fatalf("server read %q, %v", got, err)
			}
			// Kernel RX: the server's next records.
			if _, err := s.srv.Write([]byte("after")); err != nil {
				t.Fatal(err)
			}
			if _, err := s.srv.Write(big); err != nil {
				t.Fatal(err)
			}
			for i := uint64(0); i < 4; i++ {
				readRaw(t, st, s.raw, st.rxSeq+i)
			}
		})
	}
}

// TestRecorderNoOverRead: two records arrive together; reading the first
// leaves the second in the socket.
func TestRecorderNoOverRead(t *testing.T) {
	s := dialPair(t, tls.VersionTLS13, 0)
	s.exchange(t, []byte("x"), []byte("y"))
	if _, err := s.srv.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.srv.Write([]byte("second")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // both records in the socket
	buf := make([]byte, 5)
	if _, err := io.ReadFull(s.tc, buf); err != nil || string(buf) != "first" {
		t.Fatalf("read %q, %v", buf, err)
	}
	st, err := s.rec.prepare(s.tc)
	if err != nil {
		t.Fatal(err)
	}
	readRaw(t, st, s.raw, st.rxSeq)
}

// TestPrepareRefusesBufferedPlaintext: crypto/tls holding the rest of a
// record refuses the offload and marks the session broken (the probe
// consumed a byte of data the peer should not have sent).
func TestPrepareRefusesBufferedPlaintext(t *testing.T) {
	s := dialPair(t, tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
	s.exchange(t, []byte("x"), []byte("y"))
	if _, err := s.srv.Write([]byte("0123456789")); err != nil {
		t.Fatal(err)
	}
	one := make([]byte, 1)
	if _, err := io.ReadFull(s.tc, one); err != nil {
		t.Fatal(err)
	}
	_, err := s.rec.prepare(s.tc)
	if !errors.Is(err, ErrUndrained) || !errors.Is(err, ErrBroken) {
		t.Fatalf("prepare = %v, want ErrUndrained and ErrBroken", err)
	}
}

// TestPrepareRefusesWithoutKeys: no key log, no offload.
func TestPrepareRefusesWithoutKeys(t *testing.T) {
	s := dialPair(t, tls.VersionTLS13, 0)
	s.exchange(t, []byte("x"), []byte("y"))
	s.rec.keys.wipe()
	if _, err := s.rec.prepare(s.tc); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("prepare = %v, want ErrUnsupported", err)
	}
}
