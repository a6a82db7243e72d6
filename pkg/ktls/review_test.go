// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"crypto/tls"
	"io"
	"testing"
)

// TestPrepareTLS13IgnoresCCS: in TLS 1.3 a change_cipher_spec record is
// plaintext, unauthenticated, and ignored by crypto/tls at any time (RFC
// 8446 Appendix D.4; Go's readRecordOrCCS retries without decrypting and
// without advancing the sequence number), so an on-path attacker (or a
// middlebox) can insert one into the server's stream during option
// negotiation. The session is unharmed, and the kernel would never see
// the CCS (it was consumed before the hand-off). The Recorder must not
// count it as a record under the application keys, else the receive
// sequence number is one too high: the offload is refused, which an
// attacker can use to force every volume onto the relay (tls: auto) or to
// fail every attach (tls: kernel).
func TestPrepareTLS13IgnoresCCS(t *testing.T) {
	s := dialPair(t, tls.VersionTLS13, 0)
	s.exchange(t, []byte("option-1"), []byte("reply-1"))
	// Option 2: the server's reply is preceded by an injected CCS record.
	go func() {
		buf := make([]byte, 8)
		if _, err := io.ReadFull(s.srv, buf); err != nil {
			return
		}
		if _, err := s.srv.NetConn().Write([]byte{typeChangeCipherSpec, 3, 3, 0, 1, 1}); err != nil {
			return
		}
		_, _ = s.srv.Write([]byte("reply-2"))
	}()
	if _, err := s.tc.Write([]byte("option-2")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 7)
	if _, err := io.ReadFull(s.tc, got); err != nil || string(got) != "reply-2" {
		t.Fatalf("crypto/tls read %q, %v (it ignores the CCS)", got, err)
	}
	st, err := s.rec.prepare(s.tc)
	if err != nil {
		t.Fatalf("prepare refused a healthy session after an ignored CCS: %v", err)
	}
	// The derived state must work as the kernel's.
	if _, err := s.srv.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	readRaw(t, st, s.raw, st.rxSeq)
}

// TestKeyLogWipeLeavesNoCopy: wipe must clear every copy of the secrets
// the key log made. Write appends, and append reallocates as the log
// grows (a TLS 1.3 client logs four lines), abandoning the old backing
// array with the earlier secrets in it, uncleared, until the garbage
// collector reuses the memory (a core dump or a memory disclosure then
// shows them).
func TestKeyLogWipeLeavesNoCopy(t *testing.T) {
	var k keyLog
	line := []byte("CLIENT_HANDSHAKE_TRAFFIC_SECRET 0101 5ec2e75ec2e75ec2e7\n")
	if _, err := k.Write(line); err != nil {
		t.Fatal(err)
	}
	first := k.buf[:len(k.buf):len(k.buf)] // the array holding the first secret
	for i := 0; i < 3; i++ {
		if _, err := k.Write(line); err != nil {
			t.Fatal(err)
		}
	}
	k.wipe()
	for _, b := range first {
		if b != 0 {
			t.Fatalf("after wipe an abandoned copy of the key log still holds %q", first)
		}
	}
}
