// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbd-csi/nbd-csi/internal/servers"
)

// TestPrepareAgainstOpenSSL derives and proves the kernel state against an
// independent TLS implementation (openssl s_server -rev, which also sends
// TLS 1.3 NewSessionTickets after the handshake) for the suites the Go
// server tests cannot select: TLS 1.3 AES-256-GCM-SHA384, which GnuTLS
// servers prefer. Needs the openssl binary (installed in the dev image).
func TestPrepareAgainstOpenSSL(t *testing.T) {
	bin := servers.LookPath(t, "openssl")
	dir := t.TempDir()
	key, crt := filepath.Join(dir, "k.pem"), filepath.Join(dir, "c.pem")
	if out, err := exec.Command(bin, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", key, "-out", crt, "-subj", "/CN=server", "-days", "1").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, tc := range []struct {
		name string
		args []string
		ver  uint16
	}{
		{"tls13-aes256", []string{"-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"}, tls.VersionTLS13},
		{"tls13-aes128", []string{"-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"}, tls.VersionTLS13},
		{"tls12-aes256", []string{"-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"}, tls.VersionTLS12},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			port := ln.Addr().(*net.TCPAddr).Port
			ln.Close()
			args := append([]string{"s_server", "-quiet", "-rev", "-naccept", "1", "-accept", "127.0.0.1:" + itoa(port), "-key", key, "-cert", crt}, tc.args...)
			cmd := exec.Command(bin, args...)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
			raw := dialWhenUp(t, port)
			defer raw.Close()
			rec := NewRecorder(raw)
			c := tls.Client(rec, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12, MaxVersion: tc.ver, KeyLogWriter: rec.KeyLog()})
			if err := c.Handshake(); err != nil {
				t.Fatal(err)
			}
			if err := rec.HandshakeDone(); err != nil {
				t.Fatal(err)
			}
			br := bufio.NewReaderSize(c, 16) // s_server -rev answers line by line
			for _, l := range []string{"hello\n", "world\n"} {
				if _, err := io.WriteString(c, l); err != nil {
					t.Fatal(err)
				}
				got, err := br.ReadString('\n')
				if err != nil || strings.TrimSpace(got) != reverse(strings.TrimSpace(l)) {
					t.Fatalf("read %q, %v", got, err)
				}
			}
			if br.Buffered() != 0 {
				t.Fatal("bufio kept bytes")
			}
			st, err := rec.prepare(c)
			if err != nil {
				t.Fatalf("%s %s: %v", tls.VersionName(c.ConnectionState().Version), tls.CipherSuiteName(c.ConnectionState().CipherSuite), err)
			}
			t.Logf("%s %s txSeq %d rxSeq %d: proven", tls.VersionName(st.version), tls.CipherSuiteName(c.ConnectionState().CipherSuite), st.txSeq, st.rxSeq)
			// Speak as the kernel: the server must accept a sealed record
			// and its answer must open at the next sequence number.
			if _, err := raw.Write(seal(t, st, st.txSeq, []byte("kernel\n"))); err != nil {
				t.Fatal(err)
			}
			readRaw(t, st, raw, st.rxSeq)
		})
	}
}

func itoa(i int) string {
	b := []byte{}
	for ; i > 0; i /= 10 {
		b = append([]byte{byte('0' + i%10)}, b...)
	}
	return string(b)
}

func reverse(s string) string {
	r := []rune(s)
	for i, j := 0, len(r)-1; i < j; i, j = i+1, j-1 {
		r[i], r[j] = r[j], r[i]
	}
	return string(r)
}

// TestPrepareRefusesAfterKeyUpdate: a TLS 1.3 server that updates its keys
// (openssl s_server's "K" command: KeyUpdate with update_requested, so
// crypto/tls answers with its own KeyUpdate) before its last reply leaves
// both directions on keys the key log never saw. The offload must be
// refused, not installed with TRAFFIC_SECRET_0 (the kernel would then fail
// every record and the connection would reset in a loop).
func TestPrepareRefusesAfterKeyUpdate(t *testing.T) {
	bin := servers.LookPath(t, "openssl")
	dir := t.TempDir()
	key, crt := filepath.Join(dir, "k.pem"), filepath.Join(dir, "c.pem")
	if out, err := exec.Command(bin, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", key, "-out", crt, "-subj", "/CN=server", "-days", "1").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cmd := exec.Command(bin, "s_server", "-naccept", "1", "-tls1_3", "-accept", "127.0.0.1:"+itoa(port), "-key", key, "-cert", crt)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	raw := dialWhenUp(t, port)
	defer raw.Close()
	rec := NewRecorder(raw)
	c := tls.Client(rec, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, KeyLogWriter: rec.KeyLog()})
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := rec.HandshakeDone(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, "option\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // s_server handles the client's data first
	if _, err := io.WriteString(stdin, "K\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if _, err := io.WriteString(stdin, "reply\n"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "reply\n" {
		t.Fatalf("read %q, %v", got, err)
	}
	// Proof that the KeyUpdate happened: crypto/tls answered it with its
	// own KeyUpdate, a second record after the option.
	if n := rec.wr.records - rec.markWritten; n != 2 {
		t.Fatalf("client wrote %d records after the handshake, want 2 (option, KeyUpdate)", n)
	}
	_, err = rec.prepare(c)
	if err == nil {
		t.Fatal("prepare accepted a session whose keys were updated")
	}
	t.Logf("refused: %v", err)
}

// dialWhenUp connects to the openssl s_server starting on port, waiting up
// to 5 s for it to listen.
func dialWhenUp(t *testing.T, port int) net.Conn {
	t.Helper()
	var err error
	for i := 0; i < 100; i++ {
		var raw net.Conn
		if raw, err = net.Dial("tcp", "127.0.0.1:"+itoa(port)); err == nil {
			return raw
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal(err)
	return nil
}
