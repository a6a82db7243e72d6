// SPDX-License-Identifier: Apache-2.0

package ktls

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"strings"
	"testing"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	s = strings.NewReplacer(" ", "", "\n", "", "\t", "", ":", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestKeys13RFC8448 checks HKDF-Expand-Label key and IV derivation against
// RFC 8448 §3 (Simple 1-RTT Handshake, TLS_AES_128_GCM_SHA256).
func TestKeys13RFC8448(t *testing.T) {
	for _, tc := range []struct{ name, secret, key, iv string }{
		{
			name:   "server handshake traffic",
			secret: "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38",
			key:    "3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc",
			iv:     "5d 31 3e b2 67 12 76 ee 13 00 0b 30",
		},
		{
			name:   "server application traffic",
			secret: "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43",
			key:    "9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56",
			iv:     "cf 78 2b 88 dd 83 54 9a ad f1 e9 84",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := keys13(suites[0x1301], unhex(t, tc.secret))
			if err != nil {
				t.Fatal(err)
			}
			if want := unhex(t, tc.key); !bytes.Equal(k.key, want) {
				t.Errorf("key = %x, want %x", k.key, want)
			}
			if want := unhex(t, tc.iv); !bytes.Equal(k.iv[:], want) {
				t.Errorf("iv = %x, want %x", k.iv, want)
			}
		})
	}
}

// TestPRF12 checks the TLS 1.2 PRF key expansion against OpenSSL 3.0's
// TLS1-PRF KDF, an independent implementation:
//
//	openssl kdf -keylen 40 -kdfopt digest:SHA256 -kdfopt hexsecret:$MS \
//	  -kdfopt hexseed:$(printf 'key expansion' | xxd -p)$SR$CR TLS1-PRF
//
// with MS = "0123456789abcdef" six times, CR = bytes 0..31, SR = bytes
// 32..63 (and -keylen 72 digest:SHA384 for the second case).
func TestPRF12(t *testing.T) {
	ms := unhex(t, strings.Repeat("0123456789abcdef", 6))
	var cr, sr []byte
	for i := 0; i < 32; i++ {
		cr = append(cr, byte(i))
		sr = append(sr, byte(32+i))
	}
	seed := append(append([]byte{}, sr...), cr...)
	got := prf12(sha256.New, ms, "key expansion", seed, 40)
	want := unhex(t, "5C:0D:92:90:29:E9:14:4D:86:3C:67:88:27:29:96:F3:77:62:87:3B:AF:7D:FE:C2:0E:EE:9E:42:4D:05:22:18:28:2C:4F:15:4B:5B:B2:37")
	if !bytes.Equal(got, want) {
		t.Errorf("PRF-SHA256 = %x, want %x", got, want)
	}
	got = prf12(sha512.New384, ms, "key expansion", seed, 72)
	want = unhex(t, "D1:AB:66:FA:35:A0:92:DA:27:18:5F:41:64:22:B1:5E:40:7D:60:66:4B:0C:E9:7D:4B:81:1D:1A:78:77:9E:D5:10:46:89:BE:23:09:91:76:AC:57:37:85:CB:59:0C:51:FB:F8:23:55:1B:E8:7D:B0:50:63:94:24:76:60:C6:F4:61:52:82:0B:87:3F:61:FE")
	if !bytes.Equal(got, want) {
		t.Errorf("PRF-SHA384 = %x, want %x", got, want)
	}
	// keys12 splits the AES-128-GCM key block as RFC 5246 §6.3 orders
	// it: client key, server key, client IV, server IV.
	c, s := keys12(suites[0xc02f], ms, cr, sr)
	want = unhex(t, "5C:0D:92:90:29:E9:14:4D:86:3C:67:88:27:29:96:F3:77:62:87:3B:AF:7D:FE:C2:0E:EE:9E:42:4D:05:22:18:28:2C:4F:15:4B:5B:B2:37")
	if !bytes.Equal(c.key, want[:16]) || !bytes.Equal(s.key, want[16:32]) || !bytes.Equal(c.iv[:4], want[32:36]) || !bytes.Equal(s.iv[:4], want[36:40]) {
		t.Errorf("keys12 split wrong: client %x/%x server %x/%x", c.key, c.iv[:4], s.key, s.iv[:4])
	}
}

func TestKeyLogBounded(t *testing.T) {
	var k keyLog
	if _, err := k.Write(make([]byte, maxKeyLog+1)); err == nil {
		t.Fatal("oversized key log accepted")
	}
	cr := bytes.Repeat([]byte{1}, 32)
	line := "CLIENT_RANDOM " + hex.EncodeToString(cr) + " " + hex.EncodeToString([]byte("secret")) + "\n"
	if _, err := k.Write([]byte("junk\nCLIENT_RANDOM zz yy\n" + line)); err != nil {
		t.Fatal(err)
	}
	s, err := k.secret("CLIENT_RANDOM", cr)
	if err != nil || string(s) != "secret" {
		t.Fatalf("secret = %q, %v", s, err)
	}
	if _, err := k.secret("CLIENT_RANDOM", bytes.Repeat([]byte{2}, 32)); err == nil {
		t.Fatal("secret of another connection returned")
	}
}
