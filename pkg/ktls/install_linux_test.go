// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCryptoInfoLayout pins the encoding to linux/tls.h:
// struct tls12_crypto_info_aes_gcm_128 is 40 bytes (info 4, iv 8, key 16,
// salt 4, rec_seq 8), _256 is 56 (key 32).
func TestCryptoInfoLayout(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version uint16
		suite   uint16
		size    int
	}{
		{"tls12-aes128", tls.VersionTLS12, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, 40},
		{"tls13-aes256", tls.VersionTLS13, tls.TLS_AES_256_GCM_SHA384, 56},
	} {
		t.Run(tc.name, func(t *testing.T) {
			su := suites[tc.suite]
			k := trafficKeys{key: bytes.Repeat([]byte{0xaa}, su.keyLen), iv: [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}
			st := &state{version: tc.version, suite: su}
			b := cryptoInfo(st, k, 0x0102030405060708)
			if len(b) != tc.size {
				t.Fatalf("size %d, want %d", len(b), tc.size)
			}
			wantV := uint16(0x0303)
			if tc.version == tls.VersionTLS13 {
				wantV = 0x0304
			}
			if v := binary.NativeEndian.Uint16(b); v != wantV {
				t.Errorf("version %#x", v)
			}
			if c := binary.NativeEndian.Uint16(b[2:]); c != su.kcipher {
				t.Errorf("cipher %d", c)
			}
			wantIV := []byte{5, 6, 7, 8, 9, 10, 11, 12}
			if tc.version == tls.VersionTLS12 {
				wantIV = []byte{1, 2, 3, 4, 5, 6, 7, 8} // the sequence number
			}
			if !bytes.Equal(b[4:12], wantIV) {
				t.Errorf("iv % x", b[4:12])
			}
			if !bytes.Equal(b[12:12+su.keyLen], k.key) {
				t.Error("key misplaced")
			}
			if !bytes.Equal(b[12+su.keyLen:16+su.keyLen], []byte{1, 2, 3, 4}) {
				t.Errorf("salt % x", b[12+su.keyLen:16+su.keyLen])
			}
			if !bytes.Equal(b[16+su.keyLen:], []byte{1, 2, 3, 4, 5, 6, 7, 8}) {
				t.Errorf("rec_seq % x", b[16+su.keyLen:])
			}
		})
	}
}

// TestSetsockoptBytes: the setsockopt that takes the key material from
// its own (clearable) bytes passes them to the kernel intact; checked
// with a byte-valued option every kernel has (TCP_CONGESTION "reno").
func TestSetsockoptBytes(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := setsockoptBytes(fd, unix.SOL_TCP, unix.TCP_CONGESTION, []byte("reno")); err != nil {
		t.Fatal(err)
	}
	got, err := unix.GetsockoptString(fd, unix.SOL_TCP, unix.TCP_CONGESTION)
	if err != nil || got != "reno" {
		t.Fatalf("TCP_CONGESTION = %q, %v; want reno", got, err)
	}
	if err := setsockoptBytes(fd, unix.SOL_TCP, unix.TCP_CONGESTION, []byte("no-such-algorithm")); !errors.Is(err, unix.ENOENT) {
		t.Errorf("unknown algorithm: %v, want ENOENT", err)
	}
}

// TestAvailableMatchesKernel: the probe agrees with the kernel's list of
// loaded ULPs after it ran (a probe that found the ULP has it loaded), and
// an absent ULP is ErrUnavailable. On this repository's hosts (no tls
// module) that is the ErrUnavailable branch; the VM tests take the other.
func TestAvailableMatchesKernel(t *testing.T) {
	err := probeULP()
	b, rerr := os.ReadFile("/proc/sys/net/ipv4/tcp_available_ulp")
	if rerr != nil {
		t.Fatalf("reading the kernel's ULP list: %v", rerr)
	}
	loaded := slices.Contains(strings.Fields(string(b)), "tls")
	switch {
	case err == nil && !loaded:
		t.Errorf("probe found the tls ULP, the kernel lists %q", b)
	case err != nil && loaded:
		t.Errorf("probe = %v, but the kernel lists tls in %q", err, b)
	case err != nil && !errors.Is(err, ErrUnavailable):
		t.Errorf("probe = %v, want ErrUnavailable", err)
	}
	if got := Available(); (got == nil) != (err == nil) {
		t.Errorf("Available() = %v, probe = %v", got, err)
	}
}
